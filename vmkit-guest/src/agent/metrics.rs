//! The guest's load: `/proc`, `statvfs(3)` and, where it is installed, Docker.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::{DEFAULT_PATH, run_tool};
use crate::ops::{ContainerHealth, Metrics};

/// Where the data disk is mounted.
const DATA_MOUNT: &str = "/data";
/// How long a `docker` command may take.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The aggregate CPU line of `/proc/stat`: busy and total jiffies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CpuTimes {
    busy: u64,
    total: u64,
}

/// Parses the `cpu` line of `/proc/stat`. Idle time is `idle` plus `iowait`; `guest`
/// and `guest_nice` are already counted in `user` and `nice`.
pub(super) fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if values.len() < 4 {
        return None;
    }
    let total: u64 = values.iter().sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Busy share between two samples, 0–100.
pub(super) fn cpu_pct(before: CpuTimes, after: CpuTimes) -> f64 {
    let total = after.total.saturating_sub(before.total);
    let busy = after.busy.saturating_sub(before.busy).min(total);
    if total == 0 {
        0.0
    } else {
        clamp_pct(busy as f64 * 100.0 / total as f64)
    }
}

fn clamp_pct(value: f64) -> f64 {
    if value.is_finite() {
        value.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
pub(super) fn parse_meminfo(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable")?.min(total);
    Some((total, available))
}

/// The three load averages of `/proc/loadavg`.
pub(super) fn parse_loadavg(loadavg: &str) -> Option<[f64; 3]> {
    let mut values = loadavg
        .split_whitespace()
        .map(|v| v.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0));
    Some([values.next()??, values.next()??, values.next()??])
}

/// A filesystem's use as `df` computes it: used / (used + available to users).
fn disk_pct(path: &str) -> Result<f64, String> {
    let stat =
        nix::sys::statvfs::statvfs(path).map_err(|err| format!("statvfs({path}) failed: {err}"))?;
    let blocks = stat.blocks();
    let free = stat.blocks_free();
    let available = stat.blocks_available();
    let used = blocks.saturating_sub(free);
    let room = used + available;
    Ok(if room == 0 {
        0.0
    } else {
        clamp_pct(used as f64 * 100.0 / room as f64)
    })
}

/// Whether `path` is a mount point, per `/proc/self/mounts`.
fn is_mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|mounts| mounts.lines().any(|l| l.split(' ').nth(1) == Some(path)))
}

async fn read_proc(path: &str) -> Result<String, String> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|err| format!("cannot read {path}: {err}"))
}

pub(super) async fn collect(interval: Duration) -> Result<Metrics, String> {
    let bad = |path: &str| format!("{path} has an unexpected format");
    let before = parse_cpu(&read_proc("/proc/stat").await?).ok_or_else(|| bad("/proc/stat"))?;
    // Docker is asked while the CPU is sampled.
    let (containers, ()) = tokio::join!(containers(), tokio::time::sleep(interval));
    let after = parse_cpu(&read_proc("/proc/stat").await?).ok_or_else(|| bad("/proc/stat"))?;
    let (mem_total_bytes, mem_available_bytes) =
        parse_meminfo(&read_proc("/proc/meminfo").await?).ok_or_else(|| bad("/proc/meminfo"))?;
    let mem_pct = if mem_total_bytes == 0 {
        0.0
    } else {
        clamp_pct((mem_total_bytes - mem_available_bytes) as f64 * 100.0 / mem_total_bytes as f64)
    };
    let load =
        parse_loadavg(&read_proc("/proc/loadavg").await?).ok_or_else(|| bad("/proc/loadavg"))?;
    let uptime = read_proc("/proc/uptime").await?;
    let uptime_secs = uptime
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| bad("/proc/uptime"))? as u64;
    let (container_count, container_health) = match containers {
        Some(health) => (
            Some(u32::try_from(health.len()).unwrap_or(u32::MAX)),
            Some(health),
        ),
        None => (None, None),
    };
    Ok(Metrics {
        cpu_pct: cpu_pct(before, after),
        mem_pct,
        mem_total_bytes,
        mem_available_bytes,
        disk_pct: disk_pct("/")?,
        data_disk_pct: if is_mounted(DATA_MOUNT) {
            Some(disk_pct(DATA_MOUNT)?)
        } else {
            None
        },
        load,
        uptime_secs,
        container_count,
        container_health,
    })
}

/// Whether `program` is an executable file in `PATH`.
fn in_path(program: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    path.split(':')
        .any(|dir| Path::new(dir).join(program).is_file())
}

/// Running containers and their health, or `None` when Docker is not installed or does
/// not answer.
async fn containers() -> Option<BTreeMap<String, ContainerHealth>> {
    if !in_path("docker") {
        return None;
    }
    let ids = match run_tool("docker", &["ps", "--quiet", "--no-trunc"], DOCKER_TIMEOUT).await {
        Ok(ids) => ids,
        Err(err) => {
            tracing::debug!(error = %err, "docker does not answer");
            return None;
        }
    };
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Some(BTreeMap::new());
    }
    let mut args = vec![
        "inspect",
        "--format",
        "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
    ];
    args.extend(&ids);
    match run_tool("docker", &args, DOCKER_TIMEOUT).await {
        Ok(text) => Some(parse_health(&text)),
        Err(err) => {
            tracing::debug!(error = %err, "docker inspect failed");
            None
        }
    }
}

/// Parses `NAME STATUS` lines (names as Docker prints them, with a leading `/`).
pub(super) fn parse_health(text: &str) -> BTreeMap<String, ContainerHealth> {
    text.lines()
        .filter_map(|line| {
            let (name, status) = line.trim().rsplit_once(' ')?;
            let health = match status {
                "healthy" => ContainerHealth::Healthy,
                "unhealthy" => ContainerHealth::Unhealthy,
                "starting" => ContainerHealth::Starting,
                "none" => ContainerHealth::None,
                _ => ContainerHealth::Unknown,
            };
            Some((name.trim_start_matches('/').to_owned(), health))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_share_comes_from_two_samples() {
        let before = parse_cpu("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let after = parse_cpu("cpu  150 0 150 800 100 0 0 0 0 0\n").unwrap();
        assert_eq!(cpu_pct(before, after), 50.0);
        assert_eq!(cpu_pct(after, after), 0.0);
        // Counters that went backwards do not make a negative share.
        assert_eq!(cpu_pct(after, before), 0.0);
    }

    #[test]
    fn memory_comes_from_meminfo() {
        let meminfo = "MemTotal:        2048 kB\nMemFree:  100 kB\nMemAvailable:     512 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some((2048 * 1024, 512 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn load_averages_parse() {
        assert_eq!(
            parse_loadavg("0.50 1.25 2.00 1/123 4567\n"),
            Some([0.5, 1.25, 2.0])
        );
        assert_eq!(parse_loadavg("nan 1 2"), None);
    }

    #[test]
    fn docker_health_parses() {
        let health = parse_health("/web healthy\n/db none\n/job starting\n/x weird\n");
        assert_eq!(health["web"], ContainerHealth::Healthy);
        assert_eq!(health["db"], ContainerHealth::None);
        assert_eq!(health["job"], ContainerHealth::Starting);
        assert_eq!(health["x"], ContainerHealth::Unknown);
    }
}
