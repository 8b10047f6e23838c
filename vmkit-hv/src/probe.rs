//! What the host offers — KVM, the VMM programs, network permissions, disk space —
//! and which [`Hypervisor`](vmkit_core::Hypervisor) backend to use on it.
//!
//! [`probe_host`] looks; [`choose_backend`] decides. `vmkit doctor` prints both, and
//! the gateway's `hypervisor = "auto"` uses the choice.
//!
//! Opening `/dev/kvm` and asking its API version shows that KVM is there, not that
//! it can run a stock guest: some hosts (nested setups, sandboxes) expose a KVM that
//! runs only special guests. The proof is a real boot, which the QEMU backend's KVM
//! probe performs; its result goes into [`HostReport::kvm_guest_boot`], and `auto`
//! picks cloud-hypervisor only when that boot succeeded.
//!
//! ```
//! use vmkit_hv::probe::{self, Backend, GuestBootCheck, Preference, ProbeOptions};
//!
//! let options = ProbeOptions::new(std::env::temp_dir())
//!     .cloud_hypervisor("/nonexistent/cloud-hypervisor");
//! let mut report = probe::probe_host(&options);
//! report.kvm_guest_boot = Some(GuestBootCheck::new(false, "not run in a doc test"));
//! let choice = probe::choose_backend(Preference::Auto, &report);
//! assert_eq!(choice.backend, Backend::Qemu);
//! println!("{}: {}", choice.backend, choice.reason);
//! ```

use std::ffi::CString;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `KVM_GET_API_VERSION`: `_IO(KVMIO, 0x00)` with `KVMIO` = 0xAE.
const KVM_GET_API_VERSION: u64 = 0xAE00;
/// The only KVM API version Linux has ever reported.
const KVM_API_VERSION: i32 = 12;
/// `CAP_NET_ADMIN`'s bit in the capability sets.
const CAP_NET_ADMIN: u32 = 12;

/// Which backend the operator asked for (`hypervisor = "auto" | "cloud-hypervisor" |
/// "qemu"` in the gateway's config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Preference {
    /// The best backend that works on this host.
    #[default]
    Auto,
    /// cloud-hypervisor, whatever the probe says.
    CloudHypervisor,
    /// QEMU, whatever the probe says.
    Qemu,
}

impl FromStr for Preference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cloud-hypervisor" => Ok(Self::CloudHypervisor),
            "qemu" => Ok(Self::Qemu),
            _ => Err(format!(
                "`{s}` is not a hypervisor: use auto, cloud-hypervisor or qemu"
            )),
        }
    }
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::CloudHypervisor => "cloud-hypervisor",
            Self::Qemu => "qemu",
        })
    }
}

/// A Hypervisor backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Backend {
    /// [`CloudHypervisor`](crate::CloudHypervisor).
    CloudHypervisor,
    /// The QEMU backend.
    Qemu,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CloudHypervisor => "cloud-hypervisor",
            Self::Qemu => "qemu",
        })
    }
}

/// The backend to use, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Choice {
    /// The backend.
    pub backend: Backend,
    /// One sentence on why it was chosen.
    pub reason: String,
    /// What the probe found that will keep the chosen backend from working (empty
    /// when nothing): an explicit preference is honoured even so, and the caller
    /// decides whether to start.
    pub problems: Vec<String>,
}

/// Where [`probe_host`] looks.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProbeOptions {
    /// The data directory whose free space is reported.
    pub data_dir: PathBuf,
    /// The `cloud-hypervisor` program (a path, or a name looked up in `PATH`).
    pub cloud_hypervisor: PathBuf,
    /// The QEMU system emulator for this host's architecture.
    pub qemu: PathBuf,
    /// The `nft` program, which the bridge network drives.
    pub nft: PathBuf,
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// Longest wait for a program's `--version`.
    pub version_timeout: Duration,
}

impl ProbeOptions {
    /// Defaults: `cloud-hypervisor` and `qemu-system-<arch>` from `PATH`, `/dev/kvm`,
    /// 5 s for `--version`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            cloud_hypervisor: PathBuf::from("cloud-hypervisor"),
            qemu: PathBuf::from(format!("qemu-system-{}", std::env::consts::ARCH)),
            nft: PathBuf::from("nft"),
            kvm_device: PathBuf::from("/dev/kvm"),
            version_timeout: Duration::from_secs(5),
        }
    }

    /// Sets the `cloud-hypervisor` program.
    pub fn cloud_hypervisor(mut self, program: impl Into<PathBuf>) -> Self {
        self.cloud_hypervisor = program.into();
        self
    }

    /// Sets the QEMU program.
    pub fn qemu(mut self, program: impl Into<PathBuf>) -> Self {
        self.qemu = program.into();
        self
    }

    /// Sets the `nft` program.
    pub fn nft(mut self, program: impl Into<PathBuf>) -> Self {
        self.nft = program.into();
        self
    }

    /// Sets the KVM device.
    pub fn kvm_device(mut self, device: impl Into<PathBuf>) -> Self {
        self.kvm_device = device.into();
        self
    }
}

/// What the host offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HostReport {
    /// The KVM device.
    pub kvm: KvmReport,
    /// Whether KVM booted a standard guest, from the QEMU backend's KVM probe;
    /// `None` until the caller runs it. [`probe_host`] does not boot anything.
    pub kvm_guest_boot: Option<GuestBootCheck>,
    /// The `cloud-hypervisor` program.
    pub cloud_hypervisor: BinaryReport,
    /// The QEMU program.
    pub qemu: BinaryReport,
    /// Whether this process may create bridges, TAPs and nftables rules.
    pub network: NetworkPermissions,
    /// The `nft` program (nftables), without which the bridge network cannot
    /// isolate guests and the daemon refuses to start with networking on.
    pub nft: BinaryReport,
    /// Free space in the data directory.
    pub disk: DiskReport,
    /// The other programs vmkit runs (disk images, filesystems, image builds), each
    /// with what needs it.
    pub tools: Vec<ToolReport>,
}

/// One of the other programs vmkit runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolReport {
    /// What needs it, for `vmkit doctor`.
    pub needed_for: String,
    /// The Debian package that has it.
    pub package: String,
    /// What was found.
    pub program: BinaryReport,
}

/// The programs besides the VMMs and `nft` that vmkit runs: the program, the
/// arguments that make it print its version, what needs it and its Debian package.
pub const TOOLS: &[(&str, &[&str], &str, &str)] = &[
    (
        "qemu-img",
        &["--version"],
        "qcow2 volumes and snapshots",
        "qemu-utils",
    ),
    ("mkfs.ext4", &["-V"], "data volumes and images", "e2fsprogs"),
    ("debugfs", &["-V"], "image builds", "e2fsprogs"),
    ("cpio", &["--version"], "the tiny image", "cpio"),
    ("busybox", &["--help"], "the tiny image", "busybox-static"),
    ("mmdebstrap", &["--version"], "the base image", "mmdebstrap"),
];

/// The KVM device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KvmReport {
    /// The device looked at.
    pub device: PathBuf,
    /// `KVM_GET_API_VERSION`, when the device opened.
    pub api_version: Option<i32>,
    /// Why KVM cannot be used, if it cannot.
    pub problem: Option<String>,
}

impl KvmReport {
    /// The device opens and speaks the KVM API (not yet proof that a standard guest
    /// runs: see [`HostReport::kvm_guest_boot`]).
    pub fn usable(&self) -> bool {
        self.problem.is_none() && self.api_version == Some(KVM_API_VERSION)
    }
}

/// The result of booting a standard guest under KVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GuestBootCheck {
    /// Whether the guest booted.
    pub ok: bool,
    /// What happened, for `vmkit doctor`.
    pub detail: String,
}

impl GuestBootCheck {
    /// A check result.
    pub fn new(ok: bool, detail: impl Into<String>) -> Self {
        Self {
            ok,
            detail: detail.into(),
        }
    }
}

/// A VMM program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BinaryReport {
    /// What was asked for.
    pub requested: PathBuf,
    /// Where it was found.
    pub path: Option<PathBuf>,
    /// The first line of its `--version`.
    pub version: Option<String>,
    /// Why it cannot be used, if it cannot.
    pub problem: Option<String>,
}

impl BinaryReport {
    /// The program is there and answered `--version`.
    pub fn found(&self) -> bool {
        self.path.is_some() && self.problem.is_none()
    }
}

/// What the process may do to the host's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NetworkPermissions {
    /// The effective user is root.
    pub root: bool,
    /// `CAP_NET_ADMIN` is in the effective capability set.
    pub cap_net_admin: bool,
}

impl NetworkPermissions {
    /// Bridges, TAPs and nftables rules can be made (`CAP_NET_ADMIN`, which root has
    /// unless it was dropped).
    pub fn may_configure(&self) -> bool {
        self.cap_net_admin
    }
}

/// Free space in the data directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DiskReport {
    /// The data directory (or, when it does not exist yet, where it would be).
    pub data_dir: PathBuf,
    /// Bytes available to this user on its filesystem.
    pub free_bytes: Option<u64>,
    /// Why the space is unknown, if it is.
    pub problem: Option<String>,
}

/// Looks at the host. Runs each VMM program's `--version` (with a timeout) and
/// opens the KVM device; changes nothing and boots nothing.
pub fn probe_host(options: &ProbeOptions) -> HostReport {
    HostReport {
        kvm: probe_kvm(&options.kvm_device),
        kvm_guest_boot: None,
        cloud_hypervisor: probe_binary(&options.cloud_hypervisor, options.version_timeout),
        qemu: probe_binary(&options.qemu, options.version_timeout),
        network: probe_network(),
        nft: probe_binary(&options.nft, options.version_timeout),
        disk: probe_disk(&options.data_dir),
        tools: TOOLS
            .iter()
            .map(|(program, args, needed_for, package)| ToolReport {
                needed_for: (*needed_for).to_owned(),
                package: (*package).to_owned(),
                program: probe_binary_with(Path::new(program), args, options.version_timeout),
            })
            .collect(),
    }
}

/// Looks at the host as [`probe_host`] does, then — when KVM and QEMU are there —
/// boots the QEMU backend's KVM probe guest to learn whether KVM runs a standard
/// guest, and records it in [`HostReport::kvm_guest_boot`]. This is what `auto`
/// needs: a KVM device that opens is not proof that a stock kernel runs under it.
pub async fn probe_host_with_boot(options: &ProbeOptions) -> HostReport {
    let blocking = options.clone();
    let mut report = match tokio::task::spawn_blocking(move || probe_host(&blocking)).await {
        Ok(report) => report,
        Err(_) => probe_host(options),
    };
    if report.kvm.usable() && report.qemu.found() {
        let qemu = crate::Qemu::new(crate::QemuConfig::new().binary(options.qemu.clone()));
        let choice = qemu.accel_choice().await;
        report.kvm_guest_boot = Some(GuestBootCheck::new(
            choice.accel == crate::Accel::Kvm,
            choice.reason.clone(),
        ));
    }
    report
}

/// Picks the backend for `preference`. `auto` picks cloud-hypervisor when its
/// program is there, the KVM device works and KVM has booted a standard guest
/// ([`HostReport::kvm_guest_boot`] is `Some` and ok); otherwise QEMU, which also
/// runs without KVM (TCG).
pub fn choose_backend(preference: Preference, report: &HostReport) -> Choice {
    match preference {
        Preference::CloudHypervisor => Choice {
            backend: Backend::CloudHypervisor,
            reason: "cloud-hypervisor was asked for".into(),
            problems: ch_problems(report),
        },
        Preference::Qemu => Choice {
            backend: Backend::Qemu,
            reason: "QEMU was asked for".into(),
            problems: qemu_problems(report),
        },
        Preference::Auto => match ch_problems(report).into_iter().next() {
            None => Choice {
                backend: Backend::CloudHypervisor,
                reason: "cloud-hypervisor is installed and KVM boots a standard guest".into(),
                problems: Vec::new(),
            },
            Some(why_not) => Choice {
                backend: Backend::Qemu,
                reason: format!("not cloud-hypervisor: {why_not}"),
                problems: qemu_problems(report),
            },
        },
    }
}

fn ch_problems(report: &HostReport) -> Vec<String> {
    let mut problems = Vec::new();
    if !report.cloud_hypervisor.found() {
        problems.push(
            report
                .cloud_hypervisor
                .problem
                .clone()
                .unwrap_or_else(|| "no cloud-hypervisor program".into()),
        );
    }
    if !report.kvm.usable() {
        problems.push(format!(
            "KVM is unusable: {}",
            report.kvm.problem.as_deref().unwrap_or("unknown reason")
        ));
    } else {
        match &report.kvm_guest_boot {
            Some(check) if check.ok => {}
            Some(check) => problems.push(format!(
                "KVM cannot boot a standard guest: {}",
                check.detail
            )),
            None => problems.push("KVM has not been checked with a guest boot".into()),
        }
    }
    problems
}

fn qemu_problems(report: &HostReport) -> Vec<String> {
    if report.qemu.found() {
        Vec::new()
    } else {
        vec![
            report
                .qemu
                .problem
                .clone()
                .unwrap_or_else(|| "no QEMU program".into()),
        ]
    }
}

fn probe_kvm(device: &Path) -> KvmReport {
    let mut report = KvmReport {
        device: device.to_owned(),
        api_version: None,
        problem: None,
    };
    let file = match OpenOptions::new().read(true).write(true).open(device) {
        Ok(f) => f,
        Err(e) => {
            report.problem = Some(match e.kind() {
                io::ErrorKind::NotFound => format!(
                    "{} does not exist: the kvm module is not loaded, virtualisation is off in \
                     the firmware, or this container does not pass the device through",
                    device.display()
                ),
                io::ErrorKind::PermissionDenied => format!(
                    "no permission to open {}: run as root or join its group (usually kvm)",
                    device.display()
                ),
                _ => format!("cannot open {}: {e}", device.display()),
            });
            return report;
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version < 0 {
        report.problem = Some(format!(
            "{} is not a KVM device: KVM_GET_API_VERSION failed ({})",
            device.display(),
            io::Error::last_os_error()
        ));
    } else {
        report.api_version = Some(version);
        if version != KVM_API_VERSION {
            report.problem = Some(format!(
                "KVM API version {version}, expected {KVM_API_VERSION}"
            ));
        }
    }
    report
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` itself when it names a path, else its first match in `PATH`.
fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn probe_binary(program: &Path, timeout: Duration) -> BinaryReport {
    probe_binary_with(program, &["--version"], timeout)
}

/// Finds `program` and runs it with `version_args`, which make it print its version.
fn probe_binary_with(program: &Path, version_args: &[&str], timeout: Duration) -> BinaryReport {
    let mut report = BinaryReport {
        requested: program.to_owned(),
        path: None,
        version: None,
        problem: None,
    };
    let Some(path) = resolve(program) else {
        report.problem = Some(if program.components().count() > 1 {
            format!("{} does not exist or is not executable", program.display())
        } else {
            format!("{} is not in PATH", program.display())
        });
        return report;
    };
    match run_version(&path, version_args, timeout) {
        Ok(version) => report.version = Some(version),
        Err(problem) => report.problem = Some(problem),
    }
    report.path = Some(path);
    report
}

fn run_version(program: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut command = Command::new(program);
    // Some programs (mkfs.ext4 -V, debugfs -V) print their version on stderr.
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A program that was just written stays "text file busy" while a process forked
    // meanwhile holds the writer's descriptor; that passes within milliseconds.
    let mut tries = 0;
    let mut child = loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => {
                break other.map_err(|e| format!("cannot run {shown}: {e}"))?;
            }
        }
    };
    // Read while it runs: a long --help must not fill the pipe and stall it.
    let readers = [
        child.stdout.take().map(pipe_reader),
        child.stderr.take().map(pipe_reader),
    ];
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown} did not finish within {timeout:?}"));
            }
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let [out, err] = readers.map(|r| r.and_then(|r| r.join().ok()).unwrap_or_default());
    if !status.success() {
        return Err(format!("{shown} failed ({status})"));
    }
    [out, err]
        .iter()
        .flat_map(|text| text.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("{shown} printed nothing"))
}

/// Reads a child's pipe to its end in a thread (at most 64 KiB are kept).
fn pipe_reader(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if bytes.len() < 64 << 10 {
                bytes.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn probe_network() -> NetworkPermissions {
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let cap_net_admin = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0);
    NetworkPermissions {
        root,
        cap_net_admin,
    }
}

fn probe_disk(data_dir: &Path) -> DiskReport {
    let mut report = DiskReport {
        data_dir: data_dir.to_owned(),
        free_bytes: None,
        problem: None,
    };
    match free_bytes(data_dir) {
        Ok(free) => report.free_bytes = Some(free),
        Err(problem) => report.problem = Some(problem),
    }
    report
}

/// Space available to unprivileged users on the filesystem of `dir`, or of its
/// nearest existing ancestor when it does not exist yet.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    let absolute =
        std::path::absolute(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let existing = absolute
        .ancestors()
        .find(|p| p.exists())
        .ok_or_else(|| format!("no part of {} exists", dir.display()))?;
    let c_path = CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", existing.display()))?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to overwrite.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statvfs to fill.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } == -1 {
        return Err(format!(
            "statvfs({}) failed: {}",
            existing.display(),
            io::Error::last_os_error()
        ));
    }
    // The fields are u64 on 64-bit Linux and narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Ok(blocks.saturating_mul(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(found: bool) -> BinaryReport {
        BinaryReport {
            requested: "prog".into(),
            path: found.then(|| "/usr/bin/prog".into()),
            version: found.then(|| "prog 1.0".into()),
            problem: (!found).then(|| "prog is not in PATH".into()),
        }
    }

    fn host(ch: bool, kvm: bool, boot: Option<bool>, qemu: bool) -> HostReport {
        HostReport {
            kvm: KvmReport {
                device: "/dev/kvm".into(),
                api_version: kvm.then_some(KVM_API_VERSION),
                problem: (!kvm).then(|| "/dev/kvm does not exist".into()),
            },
            kvm_guest_boot: boot.map(|ok| GuestBootCheck::new(ok, "test")),
            cloud_hypervisor: binary(ch),
            qemu: binary(qemu),
            network: NetworkPermissions {
                root: true,
                cap_net_admin: true,
            },
            nft: binary(true),
            disk: DiskReport {
                data_dir: "/var/lib/vmkit".into(),
                free_bytes: Some(1 << 30),
                problem: None,
            },
            tools: Vec::new(),
        }
    }

    #[test]
    fn a_tool_that_prints_its_version_on_stderr_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("mkfs.fake");
        std::fs::write(&tool, "#!/bin/sh\necho 'mke2fs 1.47.0 (5-Feb-2023)' >&2\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();

        let report = probe_binary_with(&tool, &["-V"], Duration::from_secs(5));

        assert!(report.found(), "{report:?}");
        assert_eq!(
            report.version.as_deref(),
            Some("mke2fs 1.47.0 (5-Feb-2023)")
        );
    }

    #[test]
    fn a_tool_that_fails_or_is_missing_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("broken");
        std::fs::write(&tool, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();

        let broken = probe_binary_with(&tool, &["-V"], Duration::from_secs(5));
        let missing = probe_binary_with(
            Path::new("vmkit-no-such-tool"),
            &["-V"],
            Duration::from_secs(5),
        );

        assert!(!broken.found());
        assert!(broken.problem.unwrap().contains("failed"));
        assert!(!missing.found());
        assert!(missing.problem.unwrap().contains("not in PATH"));
    }

    #[test]
    fn auto_follows_the_choice_table() {
        // (cloud-hypervisor found, KVM device usable, guest boot, expected backend)
        let table = [
            (true, true, Some(true), Backend::CloudHypervisor),
            (true, true, Some(false), Backend::Qemu),
            (true, true, None, Backend::Qemu),
            (true, false, None, Backend::Qemu),
            (true, false, Some(true), Backend::Qemu),
            (false, true, Some(true), Backend::Qemu),
            (false, false, None, Backend::Qemu),
        ];
        for (ch, kvm, boot, expected) in table {
            let choice = choose_backend(Preference::Auto, &host(ch, kvm, boot, true));
            assert_eq!(
                choice.backend, expected,
                "ch={ch} kvm={kvm} boot={boot:?}: {}",
                choice.reason
            );
            assert!(choice.problems.is_empty(), "{:?}", choice.problems);
        }
    }

    #[test]
    fn auto_says_why_it_did_not_pick_cloud_hypervisor() {
        let no_ch = choose_backend(Preference::Auto, &host(false, true, Some(true), true));
        assert!(no_ch.reason.contains("not in PATH"), "{}", no_ch.reason);
        let bad_boot = choose_backend(Preference::Auto, &host(true, true, Some(false), true));
        assert!(
            bad_boot.reason.contains("standard guest"),
            "{}",
            bad_boot.reason
        );
        let unchecked = choose_backend(Preference::Auto, &host(true, true, None, true));
        assert!(
            unchecked.reason.contains("not been checked"),
            "{}",
            unchecked.reason
        );
        let no_kvm = choose_backend(Preference::Auto, &host(true, false, None, true));
        assert!(
            no_kvm.reason.contains("KVM is unusable"),
            "{}",
            no_kvm.reason
        );
    }

    #[test]
    fn auto_reports_a_missing_qemu_as_a_problem() {
        let choice = choose_backend(Preference::Auto, &host(false, false, None, false));
        assert_eq!(choice.backend, Backend::Qemu);
        assert_eq!(choice.problems, ["prog is not in PATH"]);
    }

    #[test]
    fn an_explicit_preference_is_honoured_with_its_problems() {
        let ch = choose_backend(Preference::CloudHypervisor, &host(false, false, None, true));
        assert_eq!(ch.backend, Backend::CloudHypervisor);
        assert_eq!(ch.problems.len(), 2, "{:?}", ch.problems);
        let ok = choose_backend(
            Preference::CloudHypervisor,
            &host(true, true, Some(true), false),
        );
        assert!(ok.problems.is_empty());
        let qemu = choose_backend(Preference::Qemu, &host(true, true, Some(true), true));
        assert_eq!((qemu.backend, qemu.problems.len()), (Backend::Qemu, 0));
    }

    #[test]
    fn preferences_parse_and_print_as_in_the_config_file() {
        for (text, pref) in [
            ("auto", Preference::Auto),
            ("cloud-hypervisor", Preference::CloudHypervisor),
            ("qemu", Preference::Qemu),
        ] {
            assert_eq!(text.parse::<Preference>(), Ok(pref));
            assert_eq!(pref.to_string(), text);
            assert_eq!(
                serde_json::to_value(pref).expect("json"),
                serde_json::json!(text)
            );
        }
        assert!("firecracker".parse::<Preference>().is_err());
    }

    #[test]
    fn probing_this_host_reports_every_part() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = ProbeOptions::new(dir.path().join("not-yet"))
            .cloud_hypervisor("/nonexistent/cloud-hypervisor")
            .qemu("vmkit-no-such-qemu")
            .kvm_device(dir.path().join("kvm"));
        let report = probe_host(&options);
        assert!(!report.kvm.usable());
        assert!(
            report
                .kvm
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("does not exist"))
        );
        assert!(!report.cloud_hypervisor.found());
        assert_eq!(
            report.qemu.problem.as_deref(),
            Some("vmkit-no-such-qemu is not in PATH")
        );
        assert!(
            report.disk.free_bytes.is_some_and(|b| b > 0),
            "{:?}",
            report.disk
        );
        assert_eq!(report.kvm_guest_boot, None);
    }

    #[test]
    fn a_program_on_path_is_found_with_its_version() {
        // `true --version` prints coreutils' version on GNU systems; any shell script
        // does the same here without depending on that.
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("fake-vmm");
        std::fs::write(&program, "#!/bin/sh\necho 'fake-vmm v1.2.3'\n").expect("write");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let report = probe_binary(&program, Duration::from_secs(5));
        assert!(report.found(), "{report:?}");
        assert_eq!(report.version.as_deref(), Some("fake-vmm v1.2.3"));
    }
}
