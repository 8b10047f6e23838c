//! A cgroup per VMM, under a `vmkit` parent, on cgroup v2 or v1.
//!
//! # Layout
//!
//! cgroup v2 (one unified hierarchy, current distributions): `<mount>/vmkit/<vm-id>`,
//! with `cpu memory pids` (and `io` where the kernel has it) enabled in the
//! `cgroup.subtree_control` of the root and of `vmkit`. The leaf gets `cpu.weight`,
//! `cpu.max`, `memory.max`, `io.weight` and `pids.max`.
//!
//! cgroup v1 (one hierarchy per controller): `<mount of cpu>/vmkit/<vm-id>` with
//! `cpu.shares`, `cpu.cfs_period_us` and `cpu.cfs_quota_us`; `<mount of
//! memory>/vmkit/<vm-id>` with `memory.limit_in_bytes`; `<mount of pids>/vmkit/<vm-id>`
//! with `pids.max`; and `<mount of blkio>/vmkit/<vm-id>` with `blkio.weight` where the
//! I/O scheduler offers it (it is skipped otherwise).
//!
//! A host with a v2 mount whose root offers the `cpu` and `memory` controllers uses v2;
//! otherwise one with v1 mounts of `cpu`, `memory` and `pids` uses v1; otherwise
//! VMMs cannot be confined.
//!
//! The `vmkit` parent is not a systemd slice: systemd would take a unit of that name
//! over and may rewrite its controllers. It sits beside `system.slice` and holds no
//! process itself (cgroup v2's rule that only leaves hold processes).
//!
//! # Lifetime
//!
//! The VMM enters its cgroup in the forked child, before `exec`, so every thread it
//! ever runs, guest code included, is accounted and limited. The directories are
//! recorded in the run directory before they are made, and removed (killing anything
//! left in them) before the run directory is, so discarding a run directory that a
//! crash left behind removes its cgroup too.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmkit_core::CgroupLimits;

/// The parent of every VMM's cgroup, under the root of each hierarchy.
pub(crate) const PARENT: &str = "vmkit";
/// The period of `cpu.max` (v2) and `cpu.cfs_period_us` (v1): 100 ms, the kernel's.
const CPU_PERIOD_US: u64 = 100_000;
/// How long removing a cgroup waits for the processes it killed to be gone.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// The cgroup hierarchies of a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    /// cgroup v2, mounted here.
    V2(PathBuf),
    /// cgroup v1: the mount of each controller vmkit uses (`blkio` may be missing).
    V1 {
        /// `cpu` (often shared with `cpuacct`).
        cpu: PathBuf,
        /// `memory`.
        memory: PathBuf,
        /// `pids`.
        pids: PathBuf,
        /// `blkio`, if mounted.
        blkio: Option<PathBuf>,
    },
}

/// The mounts of cgroup filesystems in a `/proc/self/mountinfo`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Mounts {
    /// Mount points of `cgroup2`.
    pub(crate) v2: Vec<PathBuf>,
    /// Mount points of `cgroup` (v1) with their controllers.
    pub(crate) v1: Vec<(PathBuf, Vec<String>)>,
}

/// Decodes the octal escapes (`\040` for a space) of a mountinfo path.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// Parses `/proc/self/mountinfo` text: `id parent major:minor root mountpoint
/// options [optional fields] - fstype source super-options`.
pub(crate) fn parse_mountinfo(text: &str) -> Mounts {
    let mut mounts = Mounts::default();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some(fstype), Some(_source), Some(options)) =
            (right.next(), right.next(), right.next())
        else {
            continue;
        };
        match fstype {
            "cgroup2" => mounts.v2.push(unescape(mount_point)),
            "cgroup" => {
                let controllers = options
                    .split(',')
                    .filter(|o| matches!(*o, "cpu" | "cpuacct" | "memory" | "pids" | "blkio"))
                    .map(str::to_owned)
                    .collect();
                mounts.v1.push((unescape(mount_point), controllers));
            }
            _ => {}
        }
    }
    mounts
}

/// Picks the hierarchy to use among `mounts`; `controllers_of` reads a v2 mount's
/// `cgroup.controllers`.
pub(crate) fn choose(
    mounts: &Mounts,
    controllers_of: impl Fn(&Path) -> Option<String>,
) -> Result<Hierarchy, String> {
    for v2 in &mounts.v2 {
        if let Some(list) = controllers_of(v2) {
            let have: Vec<&str> = list.split_whitespace().collect();
            if have.contains(&"cpu") && have.contains(&"memory") {
                return Ok(Hierarchy::V2(v2.clone()));
            }
        }
    }
    let find = |name: &str| {
        mounts
            .v1
            .iter()
            .find(|(_, c)| c.iter().any(|c| c == name))
            .map(|(p, _)| p.clone())
    };
    match (find("cpu"), find("memory"), find("pids")) {
        (Some(cpu), Some(memory), Some(pids)) => Ok(Hierarchy::V1 {
            cpu,
            memory,
            pids,
            blkio: find("blkio"),
        }),
        _ => Err(if mounts.v2.is_empty() && mounts.v1.is_empty() {
            "no cgroup filesystem is mounted".to_owned()
        } else {
            "neither a cgroup v2 mount with the cpu and memory controllers nor cgroup v1 \
             mounts of cpu, memory and pids were found"
                .to_owned()
        }),
    }
}

/// The hierarchy of this host, from `/proc/self/mountinfo`.
pub(crate) fn detect() -> Result<Hierarchy, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    choose(&parse_mountinfo(&text), |p| {
        std::fs::read_to_string(p.join("cgroup.controllers")).ok()
    })
}

impl Hierarchy {
    /// `cgroup v2 at ...` or `cgroup v1 (...)`, for messages and `vmkit doctor`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Hierarchy::V2(root) => {
                let controllers =
                    std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                format!(
                    "cgroup v2 at {} (controllers: {})",
                    root.display(),
                    controllers.trim()
                )
            }
            Hierarchy::V1 { blkio, .. } => format!(
                "cgroup v1 (cpu, memory, pids{})",
                if blkio.is_some() { ", blkio" } else { "" }
            ),
        }
    }

    /// The directories of the cgroup `name` under [`PARENT`], one per hierarchy.
    pub(crate) fn dirs(&self, name: &str) -> Vec<PathBuf> {
        let leaf = |mount: &Path| mount.join(PARENT).join(name);
        match self {
            Hierarchy::V2(root) => vec![leaf(root)],
            Hierarchy::V1 {
                cpu,
                memory,
                pids,
                blkio,
            } => {
                let mut dirs: Vec<PathBuf> = Vec::new();
                for mount in [Some(cpu), Some(memory), Some(pids), blkio.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    let dir = leaf(mount);
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                dirs
            }
        }
    }

    /// Creates (or reuses) the cgroup `name` with `limits` for a VM of `vcpus` and
    /// `memory_mib`.
    pub(crate) fn create(&self, name: &str, limits: &Limits) -> io::Result<VmCgroup> {
        match self {
            Hierarchy::V2(root) => {
                let parent = root.join(PARENT);
                mkdir(&parent)?;
                let available = std::fs::read_to_string(root.join("cgroup.controllers"))?;
                let wanted: Vec<&str> = ["cpu", "memory", "pids", "io"]
                    .into_iter()
                    .filter(|c| available.split_whitespace().any(|a| a == *c))
                    .collect();
                for dir in [root.as_path(), parent.as_path()] {
                    enable_controllers(dir, &wanted)?;
                }
                let leaf = parent.join(name);
                mkdir(&leaf)?;
                let cgroup = VmCgroup {
                    dirs: vec![leaf],
                    version: 2,
                };
                cgroup.apply(limits)?;
                Ok(cgroup)
            }
            Hierarchy::V1 { .. } => {
                let dirs = self.dirs(name);
                for dir in &dirs {
                    mkdir(dir)?;
                }
                let cgroup = VmCgroup { dirs, version: 1 };
                cgroup.apply(limits)?;
                Ok(cgroup)
            }
        }
    }
}

/// Writes `+controller` for each of `wanted` that `dir` does not yet enable for its
/// children.
fn enable_controllers(dir: &Path, wanted: &[&str]) -> io::Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&file)?;
    for controller in wanted {
        if enabled.split_whitespace().any(|c| c == *controller) {
            continue;
        }
        write_file(&file, &format!("+{controller}"))?;
    }
    Ok(())
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot create the cgroup {}: {e}", dir.display()),
        )),
    }
}

/// Writes `value` to a cgroup file in one `write`, as the kernel wants it.
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    // O_TRUNC as a shell's `>` does: cgroupfs ignores it, a plain file (tests) keeps
    // the last value.
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    file.write_all(value.as_bytes()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot write {value:?} to {}: {e}", path.display()),
        )
    })
}

/// The values written into a VMM's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// cgroup v2 `cpu.weight` (1–10000; v1 `cpu.shares` is this × 1024 / 100).
    pub(crate) cpu_weight: u64,
    /// CPU time per [`CPU_PERIOD_US`], in µs.
    pub(crate) cpu_quota_us: u64,
    /// Bytes of memory.
    pub(crate) memory_max: u64,
    /// `io.weight` (1–10000; v1 `blkio.weight` 10–1000).
    pub(crate) io_weight: u64,
    /// Most tasks.
    pub(crate) pids_max: u64,
}

impl Limits {
    /// The limits of a VM of `vcpus` and `memory_mib` under `policy` (see
    /// [`CgroupLimits`]).
    pub(crate) fn new(vcpus: u32, memory_mib: u64, policy: &CgroupLimits) -> Self {
        let vcpus = u64::from(vcpus.max(1));
        Self {
            cpu_weight: (100 * vcpus).clamp(1, 10_000),
            cpu_quota_us: (vcpus * 1000 + policy.vmm_cpu_millis) * CPU_PERIOD_US / 1000,
            memory_max: memory_mib
                .saturating_add(policy.memory_overhead_mib)
                .saturating_mul(1 << 20),
            io_weight: u64::from(policy.io_weight).clamp(1, 10_000),
            pids_max: policy.pids_max.max(1),
        }
    }
}

/// The cgroup of one VMM: one directory (v2) or one per hierarchy (v1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VmCgroup {
    dirs: Vec<PathBuf>,
    version: u8,
}

impl VmCgroup {
    /// The cgroup made of `dirs` (as recorded in a run directory).
    pub(crate) fn from_dirs(dirs: Vec<PathBuf>) -> Self {
        // A v2 cgroup has `cgroup.type`; v1 directories do not.
        let version = if dirs.iter().any(|d| d.join("cgroup.type").exists()) {
            2
        } else {
            1
        };
        Self { dirs, version }
    }

    /// Its directories.
    #[cfg(test)]
    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Writes `limits` into the cgroup's files.
    pub(crate) fn apply(&self, limits: &Limits) -> io::Result<()> {
        if self.version == 2 {
            let dir = &self.dirs[0];
            write_file(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
            write_file(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
            )?;
            write_file(&dir.join("memory.max"), &limits.memory_max.to_string())?;
            write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
            let io = dir.join("io.weight");
            if io.exists() {
                write_file(&io, &format!("default {}", limits.io_weight))?;
            }
            return Ok(());
        }
        for dir in &self.dirs {
            let shares = dir.join("cpu.shares");
            if shares.exists() {
                write_file(&shares, &(limits.cpu_weight * 1024 / 100).to_string())?;
                write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(
                    &dir.join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us.to_string(),
                )?;
            }
            let memory = dir.join("memory.limit_in_bytes");
            if memory.exists() {
                write_file(&memory, &limits.memory_max.to_string())?;
            }
            let pids = dir.join("pids.max");
            if pids.exists() {
                write_file(&pids, &limits.pids_max.to_string())?;
            }
            // Only with an I/O scheduler that weighs cgroups (BFQ, CFQ).
            let blkio = dir.join("blkio.weight");
            if blkio.exists() {
                let weight = (limits.io_weight / 10).clamp(10, 1000);
                write_file(&blkio, &weight.to_string())?;
            }
        }
        Ok(())
    }

    /// Opens every `cgroup.procs` for writing, for a child to enter the cgroup (by
    /// writing `0`) before it runs the VMM.
    pub(crate) fn open_procs(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
                    })
            })
            .collect()
    }

    /// The processes in the cgroup (of the first hierarchy that lists any).
    pub(crate) fn pids(&self) -> io::Result<Vec<u32>> {
        let mut all = Vec::new();
        for dir in &self.dirs {
            match std::fs::read_to_string(dir.join("cgroup.procs")) {
                Ok(text) => all.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    /// Kills whatever still runs in the cgroup, waits for it to be gone and removes
    /// the directories. Idempotent. Everything in a VM's cgroup is its VMM or a
    /// child of it, so nothing else can be hit.
    pub(crate) async fn remove(&self) -> io::Result<()> {
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "processes {pids:?} in cgroup {} survived SIGKILL for {DRAIN_WAIT:?}",
                        self.dirs[0].display()
                    ),
                ));
            }
            for pid in pids {
                kill_member(pid, &self.dirs);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for dir in &self.dirs {
            // A cgroup whose last task just exited may still be busy for a moment.
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("cannot remove the cgroup {}: {e}", dir.display()),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// SIGKILLs whatever runs in the cgroup, without waiting (for destructors).
    pub(crate) fn kill_all(&self) {
        for pid in self.pids().unwrap_or_default() {
            kill_member(pid, &self.dirs);
        }
    }

    /// Reads a file of the cgroup, for checks.
    #[cfg(test)]
    pub(crate) fn read(&self, index: usize, file: &str) -> String {
        std::fs::read_to_string(self.dirs[index].join(file))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

/// SIGKILLs `pid` if it is still in one of `dirs`, through a pidfd so that a pid
/// recycled between the check and the signal is not hit.
fn kill_member(pid: u32, dirs: &[PathBuf]) {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    if fd < 0 {
        return;
    }
    let Ok(fd) = std::os::fd::RawFd::try_from(fd) else {
        return;
    };
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let member = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        dirs.iter().any(|dir| {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| text.lines().any(|l| l.ends_with(&format!("/{PARENT}/{n}"))))
        })
    });
    if member {
        // SAFETY: the descriptor is open for the call; the siginfo pointer is null and
        // the flags 0, which the call defines as "like kill(2)".
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
38 33 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
39 33 0:34 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
40 33 0:35 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,pids
41 33 0:36 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,blkio
";

    #[test]
    fn a_hybrid_host_without_v2_controllers_uses_its_v1_mounts() {
        let mounts = parse_mountinfo(MOUNTINFO_V1);
        assert_eq!(mounts.v2, [PathBuf::from("/sys/fs/cgroup/unified")]);
        let chosen = choose(&mounts, |_| Some(String::new())).unwrap();
        assert_eq!(
            chosen,
            Hierarchy::V1 {
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                blkio: Some("/sys/fs/cgroup/blkio".into()),
            }
        );
        assert_eq!(
            chosen.dirs("abc"),
            [
                "/sys/fs/cgroup/cpu,cpuacct/vmkit/abc",
                "/sys/fs/cgroup/memory/vmkit/abc",
                "/sys/fs/cgroup/pids/vmkit/abc",
                "/sys/fs/cgroup/blkio/vmkit/abc"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_v2_mount_with_cpu_and_memory_wins() {
        let text = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let mounts = parse_mountinfo(text);
        let chosen = choose(&mounts, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(chosen, Hierarchy::V2("/sys/fs/cgroup".into()));
    }

    #[test]
    fn no_usable_controllers_is_an_error_that_says_so() {
        let text = "34 33 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let err = choose(&parse_mountinfo(text), |_| Some(String::new())).unwrap_err();
        assert!(err.contains("cpu and memory"), "{err}");
        assert!(
            choose(&Mounts::default(), |_| None)
                .unwrap_err()
                .contains("no cgroup")
        );
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let text = "1 1 0:1 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(text).v2, [PathBuf::from("/mnt/my cgroup")]);
    }

    #[test]
    fn limits_follow_the_vcpus_and_memory() {
        let policy = CgroupLimits::default()
            .vmm_cpu_millis(500)
            .memory_overhead_mib(256)
            .io_weight(300)
            .pids_max(400);
        let limits = Limits::new(2, 1024, &policy);
        assert_eq!(
            limits,
            Limits {
                cpu_weight: 200,
                cpu_quota_us: 250_000,
                memory_max: (1024 + 256) << 20,
                io_weight: 300,
                pids_max: 400,
            }
        );
    }

    /// A directory laid out like a cgroup v2 mount: the files the kernel would have.
    fn fake_v2_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let parent = root.path().join(PARENT);
        std::fs::create_dir(&parent).unwrap();
        std::fs::write(
            parent.join("cgroup.subtree_control"),
            "cpu io memory pids\n",
        )
        .unwrap();
        let leaf = parent.join("vm1");
        std::fs::create_dir(&leaf).unwrap();
        for f in [
            "cpu.weight",
            "cpu.max",
            "memory.max",
            "io.weight",
            "pids.max",
            "cgroup.type",
        ] {
            std::fs::write(leaf.join(f), "").unwrap();
        }
        root
    }

    #[test]
    fn v2_enables_the_controllers_and_writes_every_limit() {
        let root = fake_v2_root();
        let hierarchy = Hierarchy::V2(root.path().to_owned());
        let limits = Limits::new(3, 512, &CgroupLimits::default());
        let cgroup = hierarchy.create("vm1", &limits).unwrap();

        assert_eq!(cgroup.dirs(), [root.path().join("vmkit/vm1")]);
        // A real cgroupfs accumulates `+x` writes; a plain file keeps the last one.
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+io",
            "the root enables cpu, memory, pids and io, io last"
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("vmkit/cgroup.subtree_control")).unwrap(),
            "cpu io memory pids\n",
            "what the parent enables already is not written again"
        );
        assert_eq!(cgroup.read(0, "cpu.weight"), "300");
        assert_eq!(cgroup.read(0, "cpu.max"), "400000 100000");
        assert_eq!(
            cgroup.read(0, "memory.max"),
            ((512u64 + 320) << 20).to_string()
        );
        assert_eq!(cgroup.read(0, "io.weight"), "default 100");
        assert_eq!(cgroup.read(0, "pids.max"), "512");
        assert_eq!(VmCgroup::from_dirs(cgroup.dirs().to_vec()), cgroup);
    }
}
