//! The Hypervisor seam: one VMM process per VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::address::MacAddr;
use crate::confine::Confinement;
use crate::name::VmName;
use crate::storage::DiskFormat;
use crate::vm::VmId;

/// A fully resolved machine: everything a backend needs to start a VMM, with no
/// lookups left to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MachineConfig {
    /// The VM's id.
    pub vm: VmId,
    /// The VM's name (for process titles and logs).
    pub name: VmName,
    /// A directory the backend owns for this VM: sockets, pid file, console log.
    pub run_dir: PathBuf,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line without the console, which the backend adds.
    pub cmdline: String,
    /// Disks in order: the first is the root disk (`/dev/vda`).
    pub disks: Vec<DiskConfig>,
    /// The network interface, if any.
    pub nic: Option<NicConfig>,
    /// vCPUs at boot.
    pub vcpus: u32,
    /// Most vCPUs the VM may be resized to.
    pub max_vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Largest size of the console log in bytes; older output is dropped.
    pub console_limit: u64,
    /// How the VMM is confined: its uid/gid and cgroup limits. `None` runs it as the
    /// caller, unconfined.
    #[serde(default)]
    pub confinement: Option<Confinement>,
}

impl MachineConfig {
    /// A config with the given identity, run directory and kernel, one vCPU, 512 MiB,
    /// no disks and no NIC.
    pub fn new(vm: VmId, name: VmName, run_dir: PathBuf, kernel: PathBuf) -> Self {
        Self {
            vm,
            name,
            run_dir,
            kernel,
            initramfs: None,
            cmdline: String::new(),
            disks: Vec::new(),
            nic: None,
            vcpus: 1,
            max_vcpus: 1,
            memory_mib: 512,
            console_limit: 1 << 20,
            confinement: None,
        }
    }

    /// Sets the initramfs.
    pub fn initramfs(mut self, initramfs: impl Into<PathBuf>) -> Self {
        self.initramfs = Some(initramfs.into());
        self
    }

    /// Sets the kernel command line (without the console).
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    /// Appends a disk; the first one added is the root disk.
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.disks.push(disk);
        self
    }

    /// Sets the network interface.
    pub fn nic(mut self, nic: NicConfig) -> Self {
        self.nic = Some(nic);
        self
    }

    /// Sets the vCPUs at boot, and raises the most vCPUs to match when it is lower.
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self.max_vcpus = self.max_vcpus.max(vcpus);
        self
    }

    /// Sets the most vCPUs the VM may be resized to (never below the boot vCPUs).
    pub fn max_vcpus(mut self, max_vcpus: u32) -> Self {
        self.max_vcpus = max_vcpus.max(self.vcpus);
        self
    }

    /// Sets the memory in MiB.
    pub fn memory_mib(mut self, memory_mib: u64) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Sets the largest size of the console log in bytes.
    pub fn console_limit(mut self, bytes: u64) -> Self {
        self.console_limit = bytes;
        self
    }

    /// Confines the VMM as `confinement` says (`None`: unconfined).
    pub fn confinement(mut self, confinement: Option<Confinement>) -> Self {
        self.confinement = confinement;
        self
    }
}

/// A disk attached to the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DiskConfig {
    /// Path of the file or block device.
    pub path: PathBuf,
    /// Its format, always stated to the VMM (never probed from guest-written data).
    pub format: DiskFormat,
    /// Whether the guest may write it.
    pub read_only: bool,
}

impl DiskConfig {
    /// A writable disk.
    pub fn new(path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        Self {
            path: path.into(),
            format,
            read_only: false,
        }
    }

    /// Makes the disk read-only to the guest (or writable again).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }
}

/// The VM's network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NicConfig {
    /// Host TAP device name.
    pub tap: String,
    /// Guest MAC address.
    pub mac: MacAddr,
}

impl NicConfig {
    /// A NIC on `tap` with `mac`.
    pub fn new(tap: impl Into<String>, mac: MacAddr) -> Self {
        Self {
            tap: tap.into(),
            mac,
        }
    }
}

/// How to find a VMM again, after a daemon restart too. Stored with the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmmHandle {
    /// Backend that started it (its [`Hypervisor::kind`]).
    pub backend: String,
    /// VMM process id.
    pub pid: u32,
    /// Start time of that process (clock ticks since boot, from `/proc/PID/stat`),
    /// so a recycled pid is never mistaken for the VMM. 0 when unknown.
    pub pid_start: u64,
    /// The VM's run directory.
    pub run_dir: PathBuf,
    /// The VMM's control socket (QMP, or the cloud-hypervisor API).
    pub control_socket: PathBuf,
    /// The host end of the agent channel.
    pub agent_socket: PathBuf,
}

/// What a VMM reports about its guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VmmState {
    /// The VMM runs but the guest has not been booted.
    Created,
    /// The guest runs.
    Running,
    /// The guest is paused.
    Paused,
    /// The guest shut down; the VMM process may still be there.
    Shutdown,
    /// The VMM process is gone.
    Exited,
}

/// Information about a running VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmmInfo {
    /// Guest state.
    pub state: VmmState,
    /// Process id.
    pub pid: u32,
    /// vCPUs currently online.
    pub vcpus: u32,
    /// Memory currently assigned, in MiB.
    pub memory_mib: u64,
}

/// Why a VMM ended, as its backend saw it happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VmmExit {
    /// The guest powered itself off (`poweroff`, ACPI power-off).
    PowerOff,
    /// The guest rebooted and this backend ends the VMM on a reboot instead of
    /// resetting it in place; the caller boots it again if it wants.
    Reboot,
    /// The guest kernel panicked and said so (pvpanic); the VMM was stopped.
    Panic,
    /// The VMM process ended without saying why: it crashed, or something other
    /// than the backend killed it.
    Crashed,
    /// The host stopped the VMM: the backend's own `shutdown` or `kill`, or a
    /// request from outside (a signal, a monitor command).
    Killed,
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmmExit::PowerOff => "the guest powered off",
            VmmExit::Reboot => "the guest rebooted",
            VmmExit::Panic => "the guest kernel panicked",
            VmmExit::Crashed => "the VMM process ended unexpectedly",
            VmmExit::Killed => "the host stopped the VMM",
        })
    }
}

/// What a VMM's backend has seen happen to it since it began watching it (at
/// start, restore or attach): how often the guest reset (rebooted in place) and,
/// once it has ended, why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmmEvents {
    /// Guest resets seen: each is a reboot that keeps the same VMM.
    pub resets: u64,
    /// Why the VMM ended; `None` while it runs.
    pub exit: Option<VmmExit>,
}

impl VmmEvents {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A subscription to one VMM's events, from [`Hypervisor::watch`]. It carries the
/// latest [`VmmEvents`], so a subscriber that looks late misses no reset (they are
/// counted) and no exit (it stays). Backends make one with [`VmmWatch::channel`].
#[derive(Clone, Debug)]
pub struct VmmWatch {
    rx: tokio::sync::watch::Receiver<VmmEvents>,
}

/// The backend's end of [`VmmWatch`]es: it records what it sees.
#[derive(Debug)]
pub struct VmmWatchSender {
    tx: tokio::sync::watch::Sender<VmmEvents>,
}

impl VmmWatch {
    /// A new pair: the backend keeps the sender, subscribers clone the watch.
    pub fn channel() -> (VmmWatchSender, VmmWatch) {
        let (tx, rx) = tokio::sync::watch::channel(VmmEvents::new());
        (VmmWatchSender { tx }, VmmWatch { rx })
    }

    /// What has been seen so far.
    pub fn current(&self) -> VmmEvents {
        self.rx.borrow().clone()
    }

    /// Waits until something new is seen and returns it all. `None` once the backend
    /// has stopped watching: after the VMM ended (its exit is in
    /// [`VmmWatch::current`]), or without seeing it end (the backend was dropped;
    /// then ask [`Hypervisor::info`] or watch again).
    pub async fn changed(&mut self) -> Option<VmmEvents> {
        match self.rx.changed().await {
            Ok(()) => Some(self.rx.borrow_and_update().clone()),
            Err(_) => None,
        }
    }

    /// Waits until the VMM ends and says why; `None` if the backend stopped
    /// watching first.
    pub async fn wait_exit(&mut self) -> Option<VmmExit> {
        loop {
            if let Some(exit) = self.rx.borrow_and_update().exit {
                return Some(exit);
            }
            self.rx.changed().await.ok()?;
        }
    }
}

impl VmmWatchSender {
    /// Records a guest reset.
    pub fn reset(&self) {
        self.tx.send_modify(|e| e.resets += 1);
    }

    /// Records the end of the VMM; the first reason recorded stays.
    pub fn exit(&self, exit: VmmExit) {
        self.tx.send_if_modified(|e| {
            let first = e.exit.is_none();
            if first {
                e.exit = Some(exit);
            }
            first
        });
    }

    /// What has been recorded so far.
    pub fn current(&self) -> VmmEvents {
        self.tx.borrow().clone()
    }

    /// A new subscription.
    pub fn subscribe(&self) -> VmmWatch {
        VmmWatch {
            rx: self.tx.subscribe(),
        }
    }
}

/// What a Hypervisor backend can do; the manager asks instead of trying.
///
/// Start from [`HypervisorCapabilities::default`] (nothing, raw disks) and set fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HypervisorCapabilities {
    /// Pause and resume.
    pub pause: bool,
    /// Change vCPUs of a running VM.
    pub resize_vcpus: bool,
    /// Change memory of a running VM.
    pub resize_memory: bool,
    /// Snapshot a paused VM and restore it.
    pub snapshot: bool,
    /// Disk formats it can be given, best first.
    pub disk_formats: Vec<DiskFormat>,
}

impl Default for HypervisorCapabilities {
    fn default() -> Self {
        Self {
            pause: false,
            resize_vcpus: false,
            resize_memory: false,
            snapshot: false,
            disk_formats: vec![DiskFormat::Raw],
        }
    }
}

impl VmmHandle {
    /// A handle to the VMM `pid` (started at `pid_start`) of backend `backend`.
    pub fn new(
        backend: impl Into<String>,
        pid: u32,
        pid_start: u64,
        run_dir: PathBuf,
        control_socket: PathBuf,
        agent_socket: PathBuf,
    ) -> Self {
        Self {
            backend: backend.into(),
            pid,
            pid_start,
            run_dir,
            control_socket,
            agent_socket,
        }
    }
}

impl VmmInfo {
    /// Information about a VMM.
    pub fn new(state: VmmState, pid: u32, vcpus: u32, memory_mib: u64) -> Self {
        Self {
            state,
            pid,
            vcpus,
            memory_mib,
        }
    }
}

impl Resize {
    /// A resize of the given dimensions.
    pub fn new(vcpus: Option<u32>, memory_mib: Option<u64>) -> Self {
        Self { vcpus, memory_mib }
    }
}

/// A resize request; `None` leaves a dimension as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Resize {
    /// New vCPU count.
    pub vcpus: Option<u32>,
    /// New memory size in MiB.
    pub memory_mib: Option<u64>,
}

/// Errors from a Hypervisor backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HypervisorError {
    /// The VMM binary could not be started.
    #[error("cannot start {binary}; is it installed? (`vmkit doctor` checks the host)")]
    Spawn {
        /// The program.
        binary: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process is gone: no process has the handle's pid and start time.
    /// Only for that proof of death, never for a VMM that does not answer.
    #[error("the VMM (pid {pid}) is not running")]
    NotRunning {
        /// Its last known pid.
        pid: u32,
    },
    /// The VMM refused a request; carries its own message.
    #[error("the VMM refused {operation}: {message}")]
    Refused {
        /// The request.
        operation: &'static str,
        /// The VMM's message.
        message: String,
    },
    /// The backend cannot do this at all (see its capabilities).
    #[error("the {backend} backend does not support {operation}")]
    Unsupported {
        /// Backend kind.
        backend: &'static str,
        /// The operation.
        operation: &'static str,
    },
    /// The VMM did not answer in time.
    #[error("the VMM did not complete {operation} within {timeout:?}")]
    Timeout {
        /// The request.
        operation: &'static str,
        /// How long was waited.
        timeout: Duration,
    },
    /// The VMM spoke in a way the backend does not understand.
    #[error("unexpected reply from the VMM: {0}")]
    Protocol(String),
    /// The config cannot be run by this backend.
    #[error("invalid machine config: {0}")]
    InvalidConfig(String),
    /// An I/O operation on the VMM's files or sockets failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl HypervisorError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A byte stream to a guest agent.
pub trait AgentIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentIo for T {}

/// A boxed agent stream, as returned by [`Hypervisor::connect_agent`].
pub type AgentStream = Box<dyn AgentIo>;

/// A virtual machine monitor backend. One VMM process per VM, started so that it
/// outlives the daemon; every method other than [`Hypervisor::start`] and
/// [`Hypervisor::restore`] works on a [`VmmHandle`] from an earlier start, possibly
/// made by a previous daemon.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name of the backend, such as `qemu`.
    fn kind(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> HypervisorCapabilities;

    /// Starts a VMM for `config` and boots the guest. On error nothing is left
    /// running (the backend kills what it started).
    async fn start(&self, config: &MachineConfig) -> Result<VmmHandle, HypervisorError>;

    /// Checks that the VMM of `handle` still runs and can be driven (after a daemon
    /// restart), and takes up what the backend keeps per VMM (its console log, say);
    /// returns its guest state.
    ///
    /// Fails with [`HypervisorError::NotRunning`] only on proof of death: no process
    /// has the handle's pid and start time. The manager then stops (or restarts) the
    /// VM. Any other error — a control socket that times out or refuses the
    /// connection, a handle of another backend ([`HypervisorError::InvalidConfig`]) —
    /// says nothing of the VMM's life: the manager leaves the VM running and tries
    /// again later, so a backend must never report a VMM it cannot reach as
    /// `NotRunning`.
    async fn attach(&self, handle: &VmmHandle) -> Result<VmmState, HypervisorError>;

    /// Reports the VMM's state. A VMM whose process is gone reports
    /// [`VmmState::Exited`] rather than an error.
    async fn info(&self, handle: &VmmHandle) -> Result<VmmInfo, HypervisorError>;

    /// Shuts the guest down: asks politely (ACPI), waits up to `grace`, then
    /// stops the VMM by force. Returns once the process is gone. Idempotent.
    async fn shutdown(&self, handle: &VmmHandle, grace: Duration) -> Result<(), HypervisorError>;

    /// Kills the VMM at once. Idempotent.
    async fn kill(&self, handle: &VmmHandle) -> Result<(), HypervisorError>;

    /// Pauses the guest's vCPUs.
    async fn pause(&self, handle: &VmmHandle) -> Result<(), HypervisorError>;

    /// Resumes a paused guest.
    async fn resume(&self, handle: &VmmHandle) -> Result<(), HypervisorError>;

    /// Resizes a running guest.
    async fn resize(&self, handle: &VmmHandle, resize: Resize) -> Result<(), HypervisorError>;

    /// Writes a snapshot of a paused guest into `dir`.
    async fn snapshot(&self, handle: &VmmHandle, dir: &Path) -> Result<(), HypervisorError>;

    /// Starts a fresh VMM for `config` from the snapshot in `dir`; the guest is paused.
    async fn restore(
        &self,
        config: &MachineConfig,
        dir: &Path,
    ) -> Result<VmmHandle, HypervisorError>;

    /// Opens a byte stream to the guest agent. Fails while the guest is booting
    /// and its agent does not listen yet; callers retry.
    async fn connect_agent(&self, handle: &VmmHandle) -> Result<AgentStream, HypervisorError>;

    /// The last `max_bytes` of the guest's console output.
    async fn console_tail(
        &self,
        handle: &VmmHandle,
        max_bytes: usize,
    ) -> Result<String, HypervisorError>;

    /// Follows the VMM's events as they happen: guest resets (reboots that keep the
    /// VMM) and its end with the reason ([`VmmExit`]), from when the backend began
    /// watching it (its start, restore or attach). The manager reacts to these
    /// instead of polling [`Hypervisor::info`], which stays the fallback. A backend
    /// that cannot tell keeps this default, which says so.
    async fn watch(&self, handle: &VmmHandle) -> Result<VmmWatch, HypervisorError> {
        let _ = handle;
        Err(HypervisorError::Unsupported {
            backend: self.kind(),
            operation: "watching VMM events",
        })
    }

    /// Removes the run directory of a VMM that is gone. Idempotent.
    async fn cleanup(&self, handle: &VmmHandle) -> Result<(), HypervisorError>;

    /// Stops every VMM this backend started in `run_dir` and removes the directory.
    /// For run directories that no record refers to, which a crash can leave behind
    /// (a VMM started just before the daemon died, a cleanup cut short); the VMMs are
    /// found without a handle. Idempotent; a missing directory is not an error.
    async fn discard(&self, run_dir: &Path) -> Result<(), HypervisorError>;
}
