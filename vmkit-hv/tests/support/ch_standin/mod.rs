//! A stand-in for cloud-hypervisor, for tests on hosts where the real one cannot
//! run.
//!
//! # How it runs
//!
//! The stand-in is a real process that the backend spawns exactly as it spawns
//! cloud-hypervisor. [`install`] writes a small `cloud-hypervisor` shell script that
//! answers `--version` itself and otherwise re-executes the current test binary with
//! the libtest filter `ch_standin_entry --exact --ignored`, passing its arguments
//! (`--api-socket path=...`) and the [`Behaviour`] in the environment. Each test
//! file that uses it declares
//!
//! ```ignore
//! #[test]
//! #[ignore = "the cloud-hypervisor stand-in's entry point, run by the backend"]
//! fn ch_standin_entry() {
//!     ch_standin::entry();
//! }
//! ```
//!
//! which does nothing in a normal test run (it is ignored, and without the
//! environment it returns at once) and runs [`server::run`] when the backend starts
//! the script. So there is no extra binary, feature or build step: `cargo test`
//! builds everything the tests need. A watchdog ends a stand-in whose test process
//! is gone.
//!
//! # What it checks
//!
//! [`schema`] loads `shared/specs/cloud-hypervisor.yaml` (or `$VMKIT_CH_SPEC`) when
//! the stand-in starts and validates every request body against the spec's schema
//! for that path and method; [`server`] documents the state table and the replies.

#![allow(dead_code)]

pub mod agent;
pub mod schema;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vmkit_core::testing::suites::HypervisorFixture;
use vmkit_core::{DiskConfig, DiskFormat, MacAddr, MachineConfig, NicConfig, VmId, VmName};
use vmkit_hv::{ChConfig, CloudHypervisor};

/// The name of the ignored test that runs the stand-in.
pub const ENTRY: &str = "ch_standin_entry";
const ARGS_ENV: &str = "VMKIT_CH_STANDIN_ARGS";
const BEHAVIOUR_ENV: &str = "VMKIT_CH_STANDIN";
const WATCH_ENV: &str = "VMKIT_CH_STANDIN_WATCH";
/// Separates arguments in [`ARGS_ENV`] (ASCII unit separator).
const ARG_SEP: char = '\u{1f}';

/// How the stand-in guest behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behaviour {
    /// How long after boot the agent starts listening (connections before are
    /// closed, as when nothing listens in a real guest).
    pub agent_delay_ms: u64,
    /// The guest ignores ACPI power-button events.
    pub ignore_power_button: bool,
    /// Extra serial output at boot, in bytes.
    pub console_bytes: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            agent_delay_ms: 300,
            ignore_power_button: false,
            console_bytes: 0,
        }
    }
}

impl Behaviour {
    fn encode(&self) -> String {
        format!(
            "agent_delay_ms={},ignore_power_button={},console_bytes={}",
            self.agent_delay_ms, self.ignore_power_button, self.console_bytes
        )
    }

    fn decode(text: &str) -> Self {
        let mut b = Self::default();
        for (key, value) in text.split(',').filter_map(|kv| kv.split_once('=')) {
            match key {
                "agent_delay_ms" => b.agent_delay_ms = value.parse().unwrap_or(b.agent_delay_ms),
                "ignore_power_button" => b.ignore_power_button = value == "true",
                "console_bytes" => b.console_bytes = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        b
    }
}

/// The body of the `ch_standin_entry` test: runs the stand-in when the backend
/// started this binary as `cloud-hypervisor`, else returns.
pub fn entry() {
    let Ok(args) = std::env::var(ARGS_ENV) else {
        return;
    };
    let args: Vec<String> = args
        .split(ARG_SEP)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    let behaviour = std::env::var(BEHAVIOUR_ENV)
        .map(|b| Behaviour::decode(&b))
        .unwrap_or_default();
    if let Some((pid, start)) = std::env::var(WATCH_ENV).ok().and_then(|w| {
        let (pid, start) = w.split_once(':')?;
        Some((pid.parse().ok()?, start.parse().ok()?))
    }) {
        server::watch_parent(pid, start);
    }
    std::process::exit(server::run(&args, behaviour));
}

/// Start time of a live (not zombie) process.
pub fn proc_start(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes the `cloud-hypervisor` script into `dir` and returns its path.
pub fn install(dir: &Path, behaviour: &Behaviour) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().expect("the test binary has a path");
    let me = std::process::id();
    let start = proc_start(me).expect("our own /proc entry");
    let script = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = \"--version\" ]; then echo 'cloud-hypervisor v0.0.0-vmkit-standin'; exit 0; fi\n\
         {ARGS_ENV}=\"$(printf '%s\\037' \"$@\")\"\n\
         export {ARGS_ENV}\n\
         export {BEHAVIOUR_ENV}={behaviour}\n\
         export {WATCH_ENV}={me}:{start}\n\
         exec {exe} {ENTRY} --exact --ignored --nocapture --test-threads=1 -q\n",
        behaviour = sh_quote(&behaviour.encode()),
        exe = sh_quote(&exe.to_string_lossy()),
    );
    let path = dir.join("cloud-hypervisor");
    std::fs::write(&path, script).expect("write the stand-in script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the stand-in script executable");
    path
}

/// Spawns `cmd`, retrying while its program is "text file busy" (a script just
/// written, whose descriptor a concurrently forked process still holds).
pub fn spawn(cmd: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A temporary host for backend tests: the stand-in program, kernel, initramfs and
/// per-VM disks and run directories.
pub struct TestHost {
    pub dir: tempfile::TempDir,
    pub binary: PathBuf,
    count: AtomicU32,
}

impl TestHost {
    /// A host whose stand-in guests behave as `behaviour` says.
    pub fn new(behaviour: Behaviour) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmkch")
            .tempdir()
            .expect("tempdir");
        let binary = install(dir.path(), &behaviour);
        std::fs::write(dir.path().join("vmlinuz"), b"stand-in kernel").expect("kernel");
        std::fs::write(dir.path().join("initrd.img"), b"stand-in initramfs").expect("initramfs");
        Self {
            dir,
            binary,
            count: AtomicU32::new(0),
        }
    }

    /// Backend settings for tests: the stand-in, short timeouts, memory hotplug.
    pub fn ch_config(&self) -> ChConfig {
        ChConfig::new()
            .binary(&self.binary)
            .api_timeout(Duration::from_secs(5))
            .start_timeout(Duration::from_secs(20))
            .agent_timeout(Duration::from_secs(2))
            .stop_timeout(Duration::from_secs(3))
            .hotplug_memory_mib(1024)
            .console_check_interval(Duration::from_millis(100))
    }

    /// A backend on the stand-in.
    pub fn backend(&self) -> CloudHypervisor {
        CloudHypervisor::new(self.ch_config())
    }

    /// A bootable machine in a fresh run directory, with a fresh raw root disk, a
    /// NIC, 1 of at most 2 vCPUs and 256 MiB.
    pub fn machine(&self, name: &str) -> MachineConfig {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        let run_dir = self.dir.path().join(format!("{name}-{n}"));
        let disk = self.dir.path().join(format!("{name}-{n}.raw"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(64 << 20))
            .expect("root disk");
        let mut config = MachineConfig::new(
            VmId::generate(),
            VmName::new(name).expect("a valid VM name"),
            run_dir,
            self.dir.path().join("vmlinuz"),
        );
        config.initramfs = Some(self.dir.path().join("initrd.img"));
        config.cmdline = "root=/dev/vda rw".into();
        config.disks.push(DiskConfig::new(disk, DiskFormat::Raw));
        let low = u8::try_from(n % 250).unwrap_or(0);
        config.nic = Some(NicConfig::new(
            format!("vmkch{n}"),
            MacAddr([0x52, 0x54, 0x00, 0x0a, 0x00, low]),
        ));
        config.vcpus = 1;
        config.max_vcpus = 2;
        config.memory_mib = 256;
        config.console_limit = 64 * 1024;
        config
    }
}

impl HypervisorFixture for TestHost {
    fn machine(&self, name: &str) -> MachineConfig {
        TestHost::machine(self, name)
    }

    fn boot_timeout(&self) -> Duration {
        Duration::from_secs(20)
    }
}
