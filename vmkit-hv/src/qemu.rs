//! The QEMU backend: one `qemu-system-x86_64` process per VM, driven over QMP.
//!
//! # Processes
//!
//! QEMU is started detached with a double fork (see `crate::spawn`), so the VMM is
//! never our child, leaves no zombie in the daemon and outlives it. Its stdout and
//! stderr go to `qemu.log` in the run directory; startup errors come back in the
//! error. vmkit binds QEMU's three sockets itself and hands QEMU the listening
//! descriptors (`-chardev socket,fd=N`), so QEMU never needs to write in the run
//! directory. The start is complete when QEMU greets on QMP. (`-daemonize` is not
//! used: its fork is what `-sandbox spawn=deny` forbids.) The guest is created paused
//! (`-S`) and resumed once QEMU has accepted the console pump's connection, so no
//! boot output is lost.
//! A [`VmmHandle`] records the pid and its start time from `/proc/<pid>/stat`; every
//! check and signal compares them, so a recycled pid is never taken for the VMM.
//!
//! # Confinement
//!
//! With [`MachineConfig::confinement`] set, QEMU runs as the VM's uid and gid from its
//! first instruction, in the VM's cgroup, with
//! `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`
//! (seccomp mode 2). The VM's disks are its uid's (mode 0600, set at every start)
//! and so is its TAP (`TUNSETOWNER`); everything else it reads (kernel, initramfs,
//! a qcow2 overlay's base) must be readable by others. The run directory stays
//! root's (0700): QEMU has its sockets as descriptors, and the files vmkit writes
//! there cannot be swapped for links by a VMM. Snapshots work unchanged: the memory
//! file is opened by vmkit and passed over QMP. See `crate::confine`.
//!
//! # Run directory
//!
//! `qmp.sock` (QMP), `agent.sock` (the agent's virtio-serial port), `console.sock`
//! (the serial port), `console.log` (its capped log, see below), `vmkit-vmm.id` (the
//! VMM's pid and start time), `qemu.log` and `vmkit-qemu.json` (settings that
//! `attach` needs, such as the console cap, and the VMM's cgroup). Unix socket paths
//! must fit in 107 bytes, which limits the run directory's length.
//!
//! # Console
//!
//! The serial port is a server socket that a pump task in this process reads into
//! `console.log`. The log never exceeds `MachineConfig::console_limit`: when a write
//! would pass the cap, the newest half is rewritten into a new file that is renamed
//! over the old one (each byte is rewritten O(1) times on average; readers never see
//! a partial file). While the daemon is down nobody reads the socket and QEMU drops
//! the output rather than stall the guest; [`Hypervisor::attach`] reconnects the pump.
//! The alternative, a `file,append=on` chardev trimmed from outside, can only be
//! trimmed while the daemon runs and races with QEMU's appends, so its cap would be
//! neither exact nor enforced when it matters.
//!
//! # Guest reboot and panics
//!
//! One supervisor task per VMM holds its QMP connection (QEMU's monitor serves one
//! client at a time): every command of this backend goes through it, and it reads
//! QEMU's events as they come (see the `supervisor` module). [`Hypervisor::watch`]
//! hands them out as [`VmmEvents`](vmkit_core::VmmEvents). The supervisor starts at
//! `start`, `restore` and `attach` (or the first command for a VMM) and ends with
//! the VMM.
//!
//! - A guest reboot (and a triple fault) resets the guest in place: QEMU runs
//!   without `-no-reboot`, the same VMM boots again and emits `RESET`, counted as a
//!   reset.
//! - A guest power-off ends the VMM (`SHUTDOWN` with `guest: true`):
//!   [`VmmExit::PowerOff`](vmkit_core::VmmExit::PowerOff).
//! - A kernel panic: every VM has a `pvpanic-pci` device, and QEMU runs with
//!   `-action panic=shutdown`, so a guest whose kernel loads the pvpanic driver
//!   (vmkit's images do: the Debian cloud kernel builds it as the module
//!   `pvpanic_pci`, which their initramfs loads) reports the panic
//!   (`GUEST_PANICKED`), and QEMU stops:
//!   [`VmmExit::Panic`](vmkit_core::VmmExit::Panic), console kept by the manager.
//!   The kernel command line gets `panic=-1` unless it sets `panic=`, so a guest
//!   *without* the driver reboots at once after a panic instead of hanging: the
//!   panic then reads as a reboot (the console shows it), and a guest that panics
//!   at every boot reboots until it is stopped, as a physical machine with
//!   `panic=-1` would.
//! - The host stopping the VMM (this backend's `shutdown` or `kill`, a `quit`, a
//!   signal) is [`VmmExit::Killed`](vmkit_core::VmmExit::Killed); a VMM that ends
//!   without a word is [`VmmExit::Crashed`](vmkit_core::VmmExit::Crashed).

mod console;
mod hotplug;
mod probe;
mod qmp;
mod snapshot;
mod supervisor;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::{Mutex, OnceCell, watch};
use vmkit_core::{
    AgentStream, Confinement, DiskFormat, Hypervisor, HypervisorCapabilities, HypervisorError,
    MachineConfig, Resize, VmmHandle, VmmInfo, VmmState, VmmWatch,
};

pub use probe::{Accel, AccelChoice};

use crate::process::{IDENTITY_FILE, VmmProcess, recorded_identity, write_identity};
use console::ConsoleLog;
use qmp::{Qmp, QmpError};
use supervisor::{QmpClient, Supervisor};

/// The backend's name in handles.
const KIND: &str = "qemu";
/// QEMU's `argv[0]`, a path in its run directory (`<run_dir>/qemu`): the one place its
/// command line names the directory, where a discard finds it.
const PROGRAM_NAME: &str = "qemu";
/// Longest Unix socket path: `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long `shutdown` waits for QEMU to exit after `quit`.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for the kernel to remove a SIGKILLed process.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long to wait for the console pump to write the last output of a gone VMM.
const PUMP_SETTLE: Duration = Duration::from_secs(2);
/// How long a broken QMP connection waits for the VMM to finish exiting.
const EXIT_GRACE: Duration = Duration::from_secs(2);

const QMP_SOCKET: &str = "qmp.sock";
const AGENT_SOCKET: &str = "agent.sock";
const CONSOLE_SOCKET: &str = "console.sock";
const CONSOLE_LOG: &str = "console.log";
const QEMU_LOG: &str = "qemu.log";
const STATE_FILE: &str = "vmkit-qemu.json";
/// Every file the backend creates in a run directory.
const RUN_FILES: [&str; 7] = [
    QMP_SOCKET,
    AGENT_SOCKET,
    CONSOLE_SOCKET,
    CONSOLE_LOG,
    IDENTITY_FILE,
    QEMU_LOG,
    STATE_FILE,
];

/// Settings of the QEMU backend. Build with [`QemuConfig::new`] and the `with_`
/// setters.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QemuConfig {
    /// The QEMU program (default `qemu-system-x86_64`, looked up in `PATH`).
    pub binary: PathBuf,
    /// The accelerator (default [`Accel::Auto`]).
    pub accel: Accel,
    /// Timeout of every QMP call, the connection included (default 10 s).
    pub qmp_timeout: Duration,
    /// How long QEMU may take to initialise at start (default 30 s).
    pub start_timeout: Duration,
    /// How long saving or loading a snapshot may take (default 120 s, which fits a
    /// 1 GiB guest under TCG with room to spare).
    pub snapshot_timeout: Duration,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            qmp_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(30),
            snapshot_timeout: Duration::from_secs(120),
        }
    }
}

impl QemuConfig {
    /// The defaults: `qemu-system-x86_64` from `PATH`, automatic accelerator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `binary` as the QEMU program.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = binary.into();
        self
    }

    /// Uses `accel` ([`Accel::Auto`] probes the host once).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Sets the timeout of every QMP call.
    pub fn qmp_timeout(mut self, timeout: Duration) -> Self {
        self.qmp_timeout = timeout;
        self
    }

    /// Sets how long QEMU may take to initialise at start.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Sets how long saving or loading a snapshot may take.
    pub fn snapshot_timeout(mut self, timeout: Duration) -> Self {
        self.snapshot_timeout = timeout;
        self
    }
}

/// The QEMU [`Hypervisor`] backend (`q35` machine, virtio devices, QMP control).
///
/// # Snapshots
///
/// [`snapshot`](Hypervisor::snapshot) needs a paused guest. It saves the devices and
/// the memory with QMP `migrate` into `<dir>/memory`, a file vmkit opens and passes to
/// QEMU (`getfd`, `fd:` URI: no shell, no helper process), waits until QEMU reports
/// the migration complete ([`QemuConfig::snapshot_timeout`]), syncs it, and writes
/// `<dir>/vmkit-qemu-snapshot.json` last: the resolved machine type (`pc-q35-7.2`),
/// the accelerator, vCPUs, memory, number of disks and MAC, read from QEMU. The disks
/// are not in the snapshot; the caller copies them. Afterwards QEMU's run state is
/// `postmigrate`: the guest stays paused ([`VmmState::Paused`]) and QEMU has flushed
/// the disks and released them, so this is when to copy them;
/// [`resume`](Hypervisor::resume) runs the guest on (and takes the disks back). QEMU
/// saves a guest only once until it runs again, so a second snapshot before a resume
/// is refused.
///
/// [`restore`](Hypervisor::restore) checks the description against its config (a
/// different vCPU count, memory size, number of disks, MAC or accelerator is refused
/// with a message that says so, before QEMU starts), starts QEMU as
/// [`start`](Hypervisor::start) does but on the saved machine type and with
/// `-incoming defer`, passes it the memory file (`migrate-incoming`) and returns once
/// the guest is paused with the loaded state. A stream QEMU cannot load makes it exit;
/// restore then fails with QEMU's own message. On any failure nothing is left running
/// and the run directory is removed, as with `start`. The guest keeps everything it
/// had, including the MAC of its NIC and its agent (which sees the host reconnect on
/// the new VMM's agent socket).
///
/// ```no_run
/// use vmkit_hv::{Qemu, QemuConfig};
///
/// # async fn demo() {
/// let qemu = Qemu::new(QemuConfig::new());
/// println!("QEMU will use {}", qemu.accel_choice().await);
/// # }
/// ```
#[derive(Debug)]
pub struct Qemu {
    config: QemuConfig,
    accel: OnceCell<AccelChoice>,
    /// Console pumps of the VMs this instance started or attached to, by run dir.
    pumps: Mutex<HashMap<PathBuf, Pump>>,
    /// The supervisor of each VMM this instance started or attached to, by run dir:
    /// it holds the VMM's QMP connection (see the `supervisor` module).
    supervisors: std::sync::Mutex<HashMap<PathBuf, Supervisor>>,
}

/// A running console pump.
#[derive(Debug)]
struct Pump {
    task: tokio::task::AbortHandle,
    /// Closed when the task ends.
    done: watch::Receiver<()>,
}

impl Pump {
    fn is_finished(&self) -> bool {
        self.done.has_changed().is_err()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Like a daemon going away: the VMMs keep running, their consoles unread.
        for pump in self.pumps.get_mut().values() {
            pump.task.abort();
        }
    }
}

/// How a VMM's guest comes to life.
enum Boot<'a> {
    /// The kernel boots (`start`).
    Fresh,
    /// The state of a snapshot is loaded (`restore`).
    Restore {
        /// The machine type it was saved on.
        machine: &'a str,
        /// Its migration stream.
        memory: &'a std::fs::File,
        /// Its directory, for messages.
        dir: &'a Path,
    },
}

impl Boot<'_> {
    /// The operation, for errors.
    fn operation(&self) -> &'static str {
        match self {
            Boot::Fresh => "start",
            Boot::Restore { .. } => "restore",
        }
    }
}

/// The size of TCG's translated-code cache, in MiB. QEMU 7.2's default is 1 GiB; a
/// boot of the base image translates about 270 MiB, so 512 never flushes during a
/// boot and bounds what the cache adds to a VMM's memory (its cgroup allows for it).
const TCG_TB_MIB: u64 = 512;
/// The `-accel` value under TCG.
const TCG_ACCEL: &str = "tcg,tb-size=512";

/// The seccomp filter of a confined QEMU: on, with every optional group denied.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// What `attach` needs that the handle does not carry.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RunState {
    console_limit: u64,
    /// The VMM's confinement, if any (a resize updates its cgroup's CPU limits).
    #[serde(default)]
    confinement: Option<Confinement>,
    /// The directories of its cgroup, recorded before they are created.
    #[serde(default)]
    cgroup: Vec<PathBuf>,
    /// Its memory, for the limits of a resize.
    #[serde(default)]
    memory_mib: u64,
}

/// The descriptors vmkit hands a QEMU: its listening sockets and, when confined, its
/// TAP (attached by vmkit: `/dev/net/tun` may be root's only).
#[derive(Clone, Copy, Debug)]
struct SocketFds {
    qmp: RawFd,
    agent: RawFd,
    console: RawFd,
    tap: Option<RawFd>,
}

/// The files of one run directory.
#[derive(Clone, Debug)]
struct RunPaths {
    dir: PathBuf,
}

impl RunPaths {
    /// Paths under `dir` (made absolute: QEMU changes directory to `/`), checked to fit
    /// Unix socket addresses.
    fn new(dir: &Path) -> Result<Self, HypervisorError> {
        let dir = std::path::absolute(dir).map_err(|e| {
            HypervisorError::io(format!("cannot resolve run dir {}", dir.display()), e)
        })?;
        let paths = Self { dir };
        let longest = [QMP_SOCKET, AGENT_SOCKET, CONSOLE_SOCKET]
            .into_iter()
            .map(|name| paths.file(name))
            .max_by_key(|p| p.as_os_str().len())
            .unwrap_or_default();
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HypervisorError::InvalidConfig(format!(
                "run dir {} is too long: its socket {} is {} bytes and Unix sockets allow \
                 {MAX_SOCKET_PATH}; use a run dir of at most {} bytes",
                paths.dir.display(),
                longest.display(),
                longest.as_os_str().len(),
                MAX_SOCKET_PATH - 1 - CONSOLE_SOCKET.len(),
            )));
        }
        Ok(paths)
    }

    fn from_handle(handle: &VmmHandle) -> Self {
        Self {
            dir: handle.run_dir.clone(),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Qemu {
    /// A backend with `config`. Nothing runs until the first VM starts (which probes
    /// the accelerator if it is [`Accel::Auto`]).
    pub fn new(config: QemuConfig) -> Self {
        Self {
            config,
            accel: OnceCell::new(),
            pumps: Mutex::new(HashMap::new()),
            supervisors: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The backend's settings.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The accelerator VMs run with: [`Accel::Kvm`] or [`Accel::Tcg`]. The first call
    /// probes the host when the config says [`Accel::Auto`]; later calls reuse it.
    pub async fn accel(&self) -> Accel {
        self.accel_choice().await.accel
    }

    /// The accelerator and the reason for it (for `vmkit doctor`). Probed once.
    pub async fn accel_choice(&self) -> &AccelChoice {
        self.accel
            .get_or_init(|| async {
                match self.config.accel {
                    Accel::Auto => probe::probe(&self.config.binary).await,
                    other => AccelChoice {
                        accel: other,
                        reason: "set in the configuration".to_owned(),
                    },
                }
            })
            .await
    }

    /// The QEMU arguments for `config` under `accel`, with the descriptors of
    /// `sockets`, on `machine` (`q35`, or the exact type a snapshot was saved on), and
    /// waiting for a snapshot's state when `incoming`.
    fn command_line(
        config: &MachineConfig,
        accel: Accel,
        sockets: SocketFds,
        machine: &str,
        incoming: bool,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&OsStr]| args.extend(parts.iter().map(|p| p.to_os_string()));
        push(&["-msg".as_ref(), "timestamp=on".as_ref()]);
        if config.confinement.is_some() {
            push(&["-sandbox".as_ref(), SANDBOX.as_ref()]);
        }
        let name = config.name.as_str();
        let process_name = format!("guest={name},process=vmkit-{name}");
        push(&["-name".as_ref(), process_name.as_ref()]);
        push(&[
            "-nodefaults".as_ref(),
            "-no-user-config".as_ref(),
            "-display".as_ref(),
            "none".as_ref(),
            "-S".as_ref(),
            // A guest reboot resets in place; a panic the guest reports (pvpanic,
            // below) ends the VMM: see "Guest reboot and panics".
            "-action".as_ref(),
            "panic=shutdown".as_ref(),
            "-M".as_ref(),
            machine.as_ref(),
        ]);
        if incoming {
            push(&["-incoming".as_ref(), "defer".as_ref()]);
        }
        let (accel, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg | Accel::Auto => (TCG_ACCEL, "max"),
        };
        push(&[
            "-accel".as_ref(),
            accel.as_ref(),
            "-cpu".as_ref(),
            cpu.as_ref(),
        ]);
        let smp = format!("{},maxcpus={}", config.vcpus, config.max_vcpus);
        let memory = format!("{}M", config.memory_mib);
        push(&[
            "-smp".as_ref(),
            smp.as_ref(),
            "-m".as_ref(),
            memory.as_ref(),
        ]);

        push(&["-kernel".as_ref(), absolute(&config.kernel).as_os_str()]);
        if let Some(initramfs) = &config.initramfs {
            push(&["-initrd".as_ref(), absolute(initramfs).as_os_str()]);
        }
        push(&["-append".as_ref(), kernel_cmdline(&config.cmdline).as_ref()]);

        for (i, disk) in config.disks.iter().enumerate() {
            let mut drive = OsString::from("file=");
            drive.push(escape_commas(absolute(&disk.path).as_os_str()));
            drive.push(format!(
                ",format={},if=none,id=disk{i},cache=writeback,discard=unmap",
                disk.format
            ));
            if disk.read_only {
                drive.push(",readonly=on");
            }
            // One queue per vCPU slot, stated: QEMU's default is one per boot vCPU,
            // and a snapshot of a VM resized live must restore into the same device.
            let device = format!(
                "virtio-blk-pci,drive=disk{i},num-queues={}",
                config.max_vcpus
            );
            push(&[
                "-drive".as_ref(),
                &drive,
                "-device".as_ref(),
                device.as_ref(),
            ]);
        }
        if let Some(nic) = &config.nic {
            let netdev = match sockets.tap {
                Some(fd) => format!("tap,id=n0,fd={fd}"),
                None => format!("tap,id=n0,ifname={},script=no,downscript=no", nic.tap),
            };
            let device = format!("virtio-net-pci,netdev=n0,mac={}", nic.mac);
            push(&[
                "-netdev".as_ref(),
                netdev.as_ref(),
                "-device".as_ref(),
                device.as_ref(),
            ]);
        }
        push(&[
            "-device".as_ref(),
            "virtio-rng-pci".as_ref(),
            "-device".as_ref(),
            "pvpanic-pci".as_ref(),
        ]);

        let socket = |id: &str, fd: RawFd| {
            OsString::from(format!("socket,id={id},fd={fd},server=on,wait=off"))
        };
        let port = format!(
            "virtserialport,chardev=agent,name={}",
            vmkit_core::guest::VIRTIO_PORT_NAME
        );
        push(&[
            "-device".as_ref(),
            "virtio-serial-pci".as_ref(),
            "-chardev".as_ref(),
            &socket("agent", sockets.agent),
            "-device".as_ref(),
            port.as_ref(),
            "-chardev".as_ref(),
            &socket("console", sockets.console),
            "-serial".as_ref(),
            "chardev:console".as_ref(),
            "-chardev".as_ref(),
            &socket("qmp", sockets.qmp),
            "-mon".as_ref(),
            "chardev=qmp,mode=control".as_ref(),
        ]);
        args
    }

    /// Starts QEMU for `config` and brings its guest to life as `boot` says. Records
    /// the VMM it started in `started` as soon as it is known, and the cgroup it made
    /// in `cgroup`, so that on error the caller can stop it and clean up.
    async fn launch(
        &self,
        config: &MachineConfig,
        paths: &RunPaths,
        boot: &Boot<'_>,
        started: &mut Option<VmmProcess>,
        cgroup: &mut Vec<PathBuf>,
    ) -> Result<VmmHandle, HypervisorError> {
        let operation = boot.operation();
        let accel = self.accel().await;
        let plan = crate::confine::plan(config)?;
        let dirs = plan.as_ref().map(|p| p.dirs.clone()).unwrap_or_default();
        let state = serde_json::to_vec(&RunState {
            console_limit: config.console_limit,
            confinement: config.confinement,
            cgroup: dirs.clone(),
            memory_mib: config.memory_mib + tcg_memory(accel),
        })
        .map_err(|e| HypervisorError::Protocol(format!("cannot encode the run state: {e}")))?;
        // Recorded before the cgroup exists, so that a discard finds it.
        tokio::fs::write(paths.file(STATE_FILE), state)
            .await
            .map_err(|e| HypervisorError::io("cannot write the run state", e))?;
        *cgroup = dirs;
        let jail = plan
            .map(|p| p.apply(config, tcg_memory(accel)))
            .transpose()?;
        let credentials = jail.as_ref().map(|j| j.credentials()).transpose()?;

        let bind = |name: &str| {
            let path = paths.file(name);
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path)
                .map_err(|e| HypervisorError::io(format!("cannot listen on {}", path.display()), e))
        };
        let (qmp_socket, agent_socket, console_socket) = (
            bind(QMP_SOCKET)?,
            bind(AGENT_SOCKET)?,
            bind(CONSOLE_SOCKET)?,
        );
        let sockets = SocketFds {
            qmp: qmp_socket.as_raw_fd(),
            agent: agent_socket.as_raw_fd(),
            console: console_socket.as_raw_fd(),
            tap: jail.as_ref().and_then(|j| j.tap()).map(AsRawFd::as_raw_fd),
        };
        let log = std::fs::File::create(paths.file(QEMU_LOG))
            .map_err(|e| HypervisorError::io("cannot create qemu.log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HypervisorError::io("cannot duplicate qemu.log", e))?;
        let args = match boot {
            Boot::Fresh => Self::command_line(config, accel, sockets, "q35", false),
            Boot::Restore { machine, .. } => {
                Self::command_line(config, accel, sockets, machine, true)
            }
        };
        tracing::debug!(?args, confined = jail.is_some(), "starting QEMU");
        let binary = self.config.binary.clone();
        let cwd = paths.dir.clone();
        let spawned = tokio::task::spawn_blocking(move || {
            let keep: Vec<RawFd> = [sockets.qmp, sockets.agent, sockets.console]
                .into_iter()
                .chain(sockets.tap)
                .collect();
            let result = crate::spawn::spawn_detached(crate::spawn::Launch {
                binary: &binary,
                args: &args,
                cwd: &cwd,
                stdout: log,
                stderr: log2,
                keep: &keep,
                // The run dir on the command line, where a discard finds the VMM; QEMU
                // locates its data files through /proc/self/exe, not argv[0].
                arg0: Some(cwd.join(PROGRAM_NAME).into_os_string()),
                credentials: credentials.as_ref(),
            });
            // QEMU has its own copies now (of the TAP too, which `jail` holds).
            drop((qmp_socket, agent_socket, console_socket));
            result
        })
        .await
        .map_err(|e| HypervisorError::io("cannot start QEMU", std::io::Error::other(e)))?
        .map_err(|e| match e {
            HypervisorError::Spawn { source, .. } => self.spawn_error(source),
            other => other,
        })?;
        let Some(start_time) = spawned.start else {
            return Err(self.exited_during(operation, paths).await);
        };
        let vmm = VmmProcess {
            pid: spawned.pid,
            start_time,
            marker: paths.dir.join(PROGRAM_NAME),
        };
        *started = Some(vmm.clone());
        write_identity(&paths.dir, &vmm)
            .map_err(|e| HypervisorError::io("cannot record the VMM's identity", e))?;
        let handle = make_handle(vmm.pid, vmm.start_time, paths);
        self.wait_greeting(&handle, &vmm, operation, paths).await?;

        self.ensure_pump(&handle, config.console_limit).await?;
        let mut qmp = self.qmp(&handle, operation).await?;
        self.wait_console_accepted(&handle, &mut qmp).await?;
        match boot {
            Boot::Fresh => {
                self.exec(&handle, &mut qmp, operation, "cont", None)
                    .await?;
            }
            Boot::Restore { memory, dir, .. } => {
                match self.load_snapshot(&handle, &mut qmp, memory).await {
                    Ok(()) => {}
                    // QEMU exits when it cannot load a stream; its log says why.
                    Err(HypervisorError::NotRunning { .. }) => {
                        return Err(HypervisorError::Refused {
                            operation,
                            message: format!(
                                "QEMU could not load the snapshot in {} and exited: {}",
                                dir.display(),
                                read_qemu_log(paths).await
                            ),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(handle)
    }

    /// Starts a VMM for `config` as `boot` says; on any error, and when the future is
    /// dropped half-way, nothing is left running and the run files are removed.
    async fn boot(
        &self,
        config: &MachineConfig,
        boot: Boot<'_>,
    ) -> Result<VmmHandle, HypervisorError> {
        validate(config)?;
        let paths = RunPaths::new(&config.run_dir)?;
        let created_dir = prepare_run_dir(&paths)?;
        // Cleans up if this future is dropped half-way; errors clean up below.
        let mut guard = StartGuard {
            paths: &paths,
            started: None,
            cgroup: Vec::new(),
            created_dir,
            armed: true,
        };
        let result = self
            .launch(config, &paths, &boot, &mut guard.started, &mut guard.cgroup)
            .await;
        guard.armed = false;
        match result {
            Ok(handle) => Ok(handle),
            Err(e) => {
                let cgroup = std::mem::take(&mut guard.cgroup);
                self.abort_start(&paths, guard.started.take(), &cgroup, created_dir)
                    .await;
                Err(e)
            }
        }
    }

    /// Waits until QEMU has accepted the console pump's connection (its main loop does
    /// that asynchronously), so that the guest's first byte reaches the log.
    async fn wait_console_accepted(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
    ) -> Result<(), HypervisorError> {
        let deadline = tokio::time::Instant::now() + self.config.qmp_timeout;
        loop {
            let chardevs = self
                .exec(handle, qmp, "start", "query-chardev", None)
                .await?;
            let connected = chardevs.as_array().is_some_and(|all| {
                all.iter().any(|c| {
                    c["label"] == "console"
                        && c["filename"]
                            .as_str()
                            .is_some_and(|f| !f.starts_with("disconnected:"))
                })
            });
            if connected {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HypervisorError::Timeout {
                    operation: "connect the console",
                    timeout: self.config.qmp_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn_error(&self, source: std::io::Error) -> HypervisorError {
        let source = if source.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} not found; install QEMU (Debian/Ubuntu: apt install qemu-system-x86) \
                     or set QemuConfig::binary",
                    self.config.binary.display()
                ),
            )
        } else {
            source
        };
        HypervisorError::Spawn {
            binary: self.config.binary.clone(),
            source,
        }
    }

    /// Undoes a failed start: kills the VMM it started, if any, removes its cgroup
    /// and the files. A cgroup that cannot be removed keeps the run directory's record
    /// of it, for a later discard.
    async fn abort_start(
        &self,
        paths: &RunPaths,
        started: Option<VmmProcess>,
        cgroup: &[PathBuf],
        created_dir: bool,
    ) {
        if let Some(vmm) = started {
            if let Err(e) = vmm.kill() {
                tracing::warn!(pid = vmm.pid, error = %e, "cannot kill QEMU after a failed start");
            }
            vmm.wait_gone(KILL_WAIT).await;
        }
        self.drop_supervisor(&paths.dir);
        self.stop_pump(&paths.dir).await;
        if let Err(e) = crate::confine::remove_cgroup(cgroup).await {
            tracing::warn!(error = %e, "cannot remove the cgroup of a failed start; reconcile will");
            return;
        }
        remove_run_files(paths, created_dir);
    }

    /// Waits until QEMU greets on QMP: it has opened its devices and runs its main
    /// loop. A QEMU that exits first is refused with its own message.
    async fn wait_greeting(
        &self,
        handle: &VmmHandle,
        vmm: &VmmProcess,
        operation: &'static str,
        paths: &RunPaths,
    ) -> Result<(), HypervisorError> {
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        loop {
            if !vmm.is_alive() {
                return Err(self.exited_during(operation, paths).await);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(HypervisorError::Timeout {
                    operation,
                    timeout: self.config.start_timeout,
                });
            }
            // The socket is vmkit's, so the connection is queued at once; the greeting
            // comes when QEMU's main loop accepts it, or the connection closes when
            // QEMU dies first.
            match Qmp::connect(
                &handle.control_socket,
                remaining.min(self.config.qmp_timeout),
            )
            .await
            {
                Ok(_greeted) => return Ok(()),
                Err(e) => {
                    tracing::debug!(error = %e, "QEMU not ready yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// QEMU's own message for a start it gave up: what it wrote to its log, with a
    /// hint when a confined QEMU could not open a file.
    async fn exited_during(&self, operation: &'static str, paths: &RunPaths) -> HypervisorError {
        let message = read_qemu_log(paths).await;
        let message = if message.is_empty() {
            "QEMU exited during start-up without a message".to_owned()
        } else if message.contains("Permission denied") {
            format!(
                "{message} (a confined QEMU runs as the VM's uid: the kernel, initramfs and \
                 any qcow2 base must be readable by others, and every directory above them \
                 searchable, mode o+x)"
            )
        } else {
            message
        };
        HypervisorError::Refused { operation, message }
    }

    /// A QMP client of the VMM of `handle`, for an operation (named for the callers'
    /// reading; failures are mapped per command by [`Self::exec`]): its commands go
    /// through the VMM's supervisor, which is started if this instance has none yet.
    /// Never fails: a VMM that cannot be reached fails the commands.
    async fn qmp(
        &self,
        handle: &VmmHandle,
        _operation: &'static str,
    ) -> Result<QmpClient, HypervisorError> {
        Ok(self.with_supervisor(handle, Supervisor::client))
    }

    /// Runs `f` on the supervisor of the VMM of `handle`, started if there is none
    /// (or only one of an earlier VMM in the same run directory).
    fn with_supervisor<T>(&self, handle: &VmmHandle, f: impl FnOnce(&Supervisor) -> T) -> T {
        let mut supervisors = self.supervisors.lock().unwrap_or_else(|p| p.into_inner());
        let current = supervisors
            .get(&handle.run_dir)
            .is_some_and(|s| s.pid == handle.pid && s.pid_start == handle.pid_start);
        if !current {
            let supervisor = Supervisor::spawn(
                VmmProcess::from_handle(handle),
                handle.pid_start,
                handle.control_socket.clone(),
                self.config.qmp_timeout,
            );
            supervisors.insert(handle.run_dir.clone(), supervisor);
        }
        let supervisor = supervisors
            .get(&handle.run_dir)
            .expect("inserted above when missing");
        f(supervisor)
    }

    /// Stops supervising the VMM in `run_dir`.
    fn drop_supervisor(&self, run_dir: &Path) {
        let removed = self
            .supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_dir);
        drop(removed);
    }

    /// Records that the backend itself stops the VMM of `handle`, so that its end
    /// reads as [`VmmExit::Killed`](vmkit_core::VmmExit::Killed).
    fn mark_stopping(&self, handle: &VmmHandle) {
        let supervisors = self.supervisors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = supervisors.get(&handle.run_dir)
            && s.pid == handle.pid
            && s.pid_start == handle.pid_start
        {
            s.stopping();
        }
    }

    /// Runs one QMP command, mapping its failure like [`Self::qmp_error`].
    async fn exec(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
        operation: &'static str,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, HypervisorError> {
        match qmp.execute(command, arguments).await {
            Ok(value) => Ok(value),
            Err(e) => Err(self.qmp_error(handle, operation, e).await),
        }
    }

    /// Maps a QMP failure. A connection that breaks is what a VMM that is exiting
    /// does: QEMU closes its sockets a moment before the process ends, so such a
    /// failure waits briefly for the exit and reports `NotRunning` when it comes.
    async fn qmp_error(
        &self,
        handle: &VmmHandle,
        operation: &'static str,
        e: QmpError,
    ) -> HypervisorError {
        let vmm = VmmProcess::from_handle(handle);
        let broken = matches!(e, QmpError::Connect(_) | QmpError::Io(_) | QmpError::Closed);
        let grace = if broken { EXIT_GRACE } else { Duration::ZERO };
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if !vmm.is_alive() {
                return HypervisorError::NotRunning { pid: handle.pid };
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match e {
            QmpError::Timeout(timeout) => HypervisorError::Timeout { operation, timeout },
            QmpError::Command { desc, .. } => HypervisorError::Refused {
                operation,
                message: desc,
            },
            QmpError::Connect(source) => HypervisorError::io(
                format!(
                    "cannot connect to QMP at {} for {operation}",
                    handle.control_socket.display()
                ),
                source,
            ),
            QmpError::Io(source) => {
                HypervisorError::io(format!("QMP connection failed during {operation}"), source)
            }
            QmpError::Closed => HypervisorError::Protocol(format!(
                "QEMU closed the QMP connection during {operation}"
            )),
            QmpError::Protocol(message) => HypervisorError::Protocol(message),
        }
    }

    /// The guest's run state as QMP reports it (`running`, `paused`, ...).
    async fn run_status(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
        operation: &'static str,
    ) -> Result<String, HypervisorError> {
        let status = self
            .exec(handle, qmp, operation, "query-status", None)
            .await?;
        status
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| HypervisorError::Protocol(format!("query-status returned {status}")))
    }

    /// Connects a console pump for `handle` unless one is running already.
    async fn ensure_pump(&self, handle: &VmmHandle, cap: u64) -> Result<(), HypervisorError> {
        let mut pumps = self.pumps.lock().await;
        if pumps.get(&handle.run_dir).is_some_and(|p| !p.is_finished()) {
            return Ok(());
        }
        let paths = RunPaths::from_handle(handle);
        let socket = paths.file(CONSOLE_SOCKET);
        let stream = tokio::time::timeout(self.config.qmp_timeout, UnixStream::connect(&socket))
            .await
            .map_err(|_| HypervisorError::Timeout {
                operation: "connect the console",
                timeout: self.config.qmp_timeout,
            })?
            .map_err(|e| {
                HypervisorError::io(
                    format!("cannot connect the console at {}", socket.display()),
                    e,
                )
            })?;
        let log = ConsoleLog::open(&paths.file(CONSOLE_LOG), cap)
            .await
            .map_err(|e| HypervisorError::io("cannot open the console log", e))?;
        let (tx, rx) = watch::channel(());
        let task = tokio::spawn(async move {
            console::pump(stream, log).await;
            drop(tx);
        });
        pumps.insert(
            handle.run_dir.clone(),
            Pump {
                task: task.abort_handle(),
                done: rx,
            },
        );
        Ok(())
    }

    /// Waits (briefly) for the pump of a gone VMM to write its last output.
    async fn settle_pump(&self, run_dir: &Path) {
        let done = self.pumps.lock().await.get(run_dir).map(|p| p.done.clone());
        if let Some(mut done) = done {
            let _ =
                tokio::time::timeout(PUMP_SETTLE, async { while done.changed().await.is_ok() {} })
                    .await;
        }
    }

    async fn stop_pump(&self, run_dir: &Path) {
        if let Some(pump) = self.pumps.lock().await.remove(run_dir) {
            pump.task.abort();
        }
    }

    /// Kills the VMM of `handle` and waits until it is gone.
    async fn force_stop(
        &self,
        handle: &VmmHandle,
        operation: &'static str,
    ) -> Result<(), HypervisorError> {
        let vmm = VmmProcess::from_handle(handle);
        self.mark_stopping(handle);
        vmm.kill().map_err(|e| {
            HypervisorError::io(format!("cannot kill QEMU (pid {})", handle.pid), e)
        })?;
        if !vmm.wait_gone(KILL_WAIT).await {
            return Err(HypervisorError::Timeout {
                operation,
                timeout: KILL_WAIT,
            });
        }
        self.settle_pump(&handle.run_dir).await;
        Ok(())
    }

    fn require_running(handle: &VmmHandle) -> Result<(), HypervisorError> {
        if VmmProcess::from_handle(handle).is_alive() {
            Ok(())
        } else {
            Err(HypervisorError::NotRunning { pid: handle.pid })
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> HypervisorCapabilities {
        let mut caps = HypervisorCapabilities::default();
        caps.pause = true;
        caps.snapshot = true;
        caps.resize_vcpus = true;
        caps.disk_formats = vec![DiskFormat::Qcow2, DiskFormat::Raw];
        caps
    }

    async fn start(&self, config: &MachineConfig) -> Result<VmmHandle, HypervisorError> {
        self.boot(config, Boot::Fresh).await
    }

    async fn attach(&self, handle: &VmmHandle) -> Result<VmmState, HypervisorError> {
        if handle.backend != KIND {
            return Err(HypervisorError::InvalidConfig(format!(
                "the handle belongs to the {} backend, not {KIND}",
                handle.backend
            )));
        }
        Self::require_running(handle)?;
        let mut qmp = self.qmp(handle, "attach").await?;
        let status = self.run_status(handle, &mut qmp, "attach").await?;
        let state = read_run_state(&RunPaths::from_handle(handle)).await;
        self.ensure_pump(handle, state.console_limit).await?;
        Ok(map_status(&status))
    }

    async fn info(&self, handle: &VmmHandle) -> Result<VmmInfo, HypervisorError> {
        let exited = || vmm_info(VmmState::Exited, handle.pid, 0, 0);
        if !VmmProcess::from_handle(handle).is_alive() {
            return Ok(exited());
        }
        let result = async {
            let mut qmp = self.qmp(handle, "info").await?;
            let status = self.run_status(handle, &mut qmp, "info").await?;
            let cpus = self
                .exec(handle, &mut qmp, "info", "query-cpus-fast", None)
                .await?;
            let memory = self
                .exec(handle, &mut qmp, "info", "query-memory-size-summary", None)
                .await?;
            let vcpus = cpus.as_array().map_or(0, Vec::len) as u32;
            let bytes = memory["base-memory"].as_u64().unwrap_or(0)
                + memory["plugged-memory"].as_u64().unwrap_or(0);
            Ok(vmm_info(
                map_status(&status),
                handle.pid,
                vcpus,
                bytes >> 20,
            ))
        }
        .await;
        match result {
            // It exited while we asked.
            Err(HypervisorError::NotRunning { .. }) => Ok(exited()),
            other => other,
        }
    }

    async fn shutdown(&self, handle: &VmmHandle, grace: Duration) -> Result<(), HypervisorError> {
        let vmm = VmmProcess::from_handle(handle);
        if !vmm.is_alive() {
            self.settle_pump(&handle.run_dir).await;
            return Ok(());
        }
        self.mark_stopping(handle);
        // Ask politely; a guest that cannot hear (paused, not yet booted) is resumed or
        // skipped. Failures here only mean going on to the next step sooner.
        match self.qmp(handle, "shutdown").await {
            Ok(mut qmp) => {
                let status = self.run_status(handle, &mut qmp, "shutdown").await;
                let ask = match status.as_deref() {
                    Ok("paused" | "postmigrate") => qmp.execute("cont", None).await.is_ok(),
                    Ok("running") => true,
                    _ => false,
                };
                if ask && let Err(e) = qmp.execute("system_powerdown", None).await {
                    tracing::debug!(pid = handle.pid, error = %e, "system_powerdown failed");
                }
                drop(qmp);
                if ask && vmm.wait_gone(grace).await {
                    self.settle_pump(&handle.run_dir).await;
                    return Ok(());
                }
            }
            Err(e) => {
                tracing::debug!(pid = handle.pid, error = %e, "no QMP for a graceful shutdown")
            }
        }
        // Then `quit`, which flushes the disks, then SIGKILL.
        if let Ok(qmp) = self.qmp(handle, "shutdown").await {
            match qmp.execute("quit", None).await {
                Ok(_) | Err(QmpError::Closed) => {}
                Err(e) => tracing::debug!(pid = handle.pid, error = %e, "quit failed"),
            }
            drop(qmp);
            if vmm.wait_gone(QUIT_WAIT).await {
                self.settle_pump(&handle.run_dir).await;
                return Ok(());
            }
        }
        tracing::warn!(
            pid = handle.pid,
            "QEMU ignored shutdown and quit; killing it"
        );
        self.force_stop(handle, "shutdown").await
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        self.force_stop(handle, "kill").await
    }

    async fn pause(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        Self::require_running(handle)?;
        let mut qmp = self.qmp(handle, "pause").await?;
        let status = self.run_status(handle, &mut qmp, "pause").await?;
        if status != "running" {
            return Err(HypervisorError::Refused {
                operation: "pause",
                message: format!("the guest is {status}, not running"),
            });
        }
        self.exec(handle, &mut qmp, "pause", "stop", None).await?;
        Ok(())
    }

    async fn resume(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        Self::require_running(handle)?;
        let mut qmp = self.qmp(handle, "resume").await?;
        let status = self.run_status(handle, &mut qmp, "resume").await?;
        // `postmigrate`: paused after a snapshot; `cont` takes the disks back too.
        if status != "paused" && status != "postmigrate" {
            return Err(HypervisorError::Refused {
                operation: "resume",
                message: format!("the guest is {status}, not paused"),
            });
        }
        self.exec(handle, &mut qmp, "resume", "cont", None).await?;
        Ok(())
    }

    /// Plugs or unplugs vCPUs (ACPI CPU hotplug, up to the `max_vcpus` the VMM was
    /// started with; see the `hotplug` module). Memory is not resized live: QEMU
    /// starts without hotplug memory slots.
    async fn resize(&self, handle: &VmmHandle, resize: Resize) -> Result<(), HypervisorError> {
        Self::require_running(handle)?;
        if resize.memory_mib.is_some() {
            return Err(HypervisorError::Unsupported {
                backend: KIND,
                operation: "live memory resize (stop the VM, resize, start it)",
            });
        }
        let Some(vcpus) = resize.vcpus else {
            return Ok(());
        };
        self.resize_vcpus(handle, vcpus).await?;
        // The CPU limits of a confined VMM follow its vCPUs.
        let state = read_run_state(&RunPaths::from_handle(handle)).await;
        match &state.confinement {
            Some(confinement) => {
                crate::confine::set_vcpus(&state.cgroup, confinement, vcpus, state.memory_mib)
            }
            None => Ok(()),
        }
    }

    /// Saves the paused guest's devices and memory into `dir` (created if needed;
    /// refused if it holds a snapshot already). The guest stays paused; see "Snapshots"
    /// above.
    async fn snapshot(&self, handle: &VmmHandle, dir: &Path) -> Result<(), HypervisorError> {
        self.save_snapshot(handle, dir).await
    }

    /// Starts a VMM for `config` as `start` does, but loads the snapshot in `dir`
    /// instead of booting; the guest is paused. `config` must describe the machine
    /// the snapshot was taken of (vCPUs, memory, number of disks, MAC), with the
    /// snapshot's disk copies; anything else is refused before QEMU starts. The vCPU
    /// slots (`max_vcpus`) are the snapshot's, whatever the config says.
    async fn restore(
        &self,
        config: &MachineConfig,
        dir: &Path,
    ) -> Result<VmmHandle, HypervisorError> {
        validate(config)?;
        let (meta, memory) = snapshot::open(dir)?;
        meta.check(config, self.accel().await, dir)?;
        // The machine the state was saved on, with its vCPU slots.
        let mut config = config.clone();
        config.max_vcpus = meta.max_vcpus.max(config.vcpus);
        self.boot(
            &config,
            Boot::Restore {
                machine: &meta.machine,
                memory: &memory,
                dir,
            },
        )
        .await
    }

    async fn connect_agent(&self, handle: &VmmHandle) -> Result<AgentStream, HypervisorError> {
        Self::require_running(handle)?;
        let stream = UnixStream::connect(&handle.agent_socket)
            .await
            .map_err(|e| {
                HypervisorError::io(
                    format!(
                        "cannot connect to the agent socket {}",
                        handle.agent_socket.display()
                    ),
                    e,
                )
            })?;
        Ok(Box::new(stream))
    }

    async fn console_tail(
        &self,
        handle: &VmmHandle,
        max_bytes: usize,
    ) -> Result<String, HypervisorError> {
        if !VmmProcess::from_handle(handle).is_alive() {
            self.settle_pump(&handle.run_dir).await;
        }
        let path = RunPaths::from_handle(handle).file(CONSOLE_LOG);
        let bytes = console::read_tail(&path, max_bytes as u64)
            .await
            .map_err(|e| HypervisorError::io(format!("cannot read {}", path.display()), e))?;
        Ok(console::tail_text(&bytes))
    }

    async fn cleanup(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        if VmmProcess::from_handle(handle).is_alive() {
            return Err(HypervisorError::Refused {
                operation: "cleanup",
                message: format!(
                    "QEMU (pid {}) still runs; shut it down or kill it first",
                    handle.pid
                ),
            });
        }
        self.drop_supervisor(&handle.run_dir);
        self.stop_pump(&handle.run_dir).await;
        // The cgroup before the run dir that records it.
        let state = read_run_state(&RunPaths::from_handle(handle)).await;
        crate::confine::remove_cgroup(&state.cgroup).await?;
        match tokio::fs::remove_dir_all(&handle.run_dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HypervisorError::io(
                format!("cannot remove run dir {}", handle.run_dir.display()),
                e,
            )),
        }
    }

    async fn discard(&self, run_dir: &Path) -> Result<(), HypervisorError> {
        // Everything in the VM's cgroup is its VMM: killed with the cgroup, which goes
        // before the run dir that records it.
        let state = read_run_state(&RunPaths {
            dir: run_dir.to_owned(),
        })
        .await;
        crate::confine::remove_cgroup(&state.cgroup).await?;
        crate::process::discard_run_dir(run_dir, PROGRAM_NAME, KILL_WAIT).await?;
        self.drop_supervisor(run_dir);
        self.stop_pump(run_dir).await;
        Ok(())
    }

    /// Follows the VMM's events through its supervisor (see the module docs,
    /// "Guest reboot and panics"). Works for a VMM that has ended too, as long as
    /// this instance supervised it: its exit reason stays until `cleanup`.
    async fn watch(&self, handle: &VmmHandle) -> Result<VmmWatch, HypervisorError> {
        if handle.backend != KIND {
            return Err(HypervisorError::InvalidConfig(format!(
                "the handle belongs to the {} backend, not {KIND}",
                handle.backend
            )));
        }
        Ok(self.with_supervisor(handle, Supervisor::watch))
    }
}

/// Undoes a start whose future was dropped before it finished: SIGKILL to the VMM (no
/// waiting, in a destructor) and removal of the files.
struct StartGuard<'a> {
    paths: &'a RunPaths,
    started: Option<VmmProcess>,
    /// The cgroup of the start, once recorded.
    cgroup: Vec<PathBuf>,
    created_dir: bool,
    armed: bool,
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let started = self
            .started
            .take()
            .or_else(|| recorded_identity(&self.paths.dir));
        if let Some(vmm) = started
            && let Err(e) = vmm.kill()
        {
            tracing::warn!(pid = vmm.pid, error = %e, "cannot kill QEMU of a cancelled start");
        }
        if !self.cgroup.is_empty() {
            // A VMM spawned while the start was cancelled is in the cgroup even if
            // its pid never reached us. The cgroup itself (busy until the killed
            // processes are gone) is left, with its record, to a discard.
            crate::cgroup::VmCgroup::from_dirs(self.cgroup.clone()).kill_all();
            return;
        }
        remove_run_files(self.paths, self.created_dir);
    }
}

/// The kernel command line: the config's, `panic=-1` unless it chooses,
/// `no_timer_check` and the serial console.
///
/// `no_timer_check` skips the kernel's boot-time check that the emulated PIT ticks
/// within a few milliseconds: on an overloaded host, under TCG, a VMM whose threads
/// are scheduled as one group (its own cgroup) can miss that window, and the guest
/// then panics with "IO-APIC + timer doesn't work" (seen with twenty confined VMs
/// booting at once on two cores). The emulated timer is correct; the check only
/// measures the host's load. Cloud images pass it for the same reason.
fn kernel_cmdline(cmdline: &str) -> String {
    let mut line = cmdline.trim().to_owned();
    let has = |line: &str, prefix: &str| {
        line.split_ascii_whitespace()
            .any(|w| w == prefix || w.starts_with(&format!("{prefix}=")))
    };
    for (word, present) in [
        ("panic=-1", has(&line, "panic")),
        ("no_timer_check", has(&line, "no_timer_check")),
    ] {
        if present {
            continue;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    line.push_str(" console=ttyS0");
    line
}

/// The memory a VMM needs beyond its guest and its own overhead under `accel`: the
/// translated-code cache under TCG.
fn tcg_memory(accel: Accel) -> u64 {
    match accel {
        Accel::Kvm => 0,
        Accel::Tcg | Accel::Auto => TCG_TB_MIB,
    }
}

/// `path` made absolute: QEMU works in its run directory, not the daemon's.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// A value for a QEMU option list: commas are doubled.
fn escape_commas(value: &OsStr) -> OsString {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from(<OsStr as OsStrExt>::from_bytes(&out))
}

/// Checks what QEMU would otherwise reject late or obscurely.
fn validate(config: &MachineConfig) -> Result<(), HypervisorError> {
    let invalid = |msg: String| Err(HypervisorError::InvalidConfig(msg));
    if config.disks.is_empty() {
        return invalid("a QEMU machine needs at least its root disk".to_owned());
    }
    if config.vcpus == 0 || config.max_vcpus < config.vcpus {
        return invalid(format!(
            "vcpus must be at least 1 and at most max_vcpus (got {} and {})",
            config.vcpus, config.max_vcpus
        ));
    }
    if config.memory_mib == 0 {
        return invalid("memory_mib must be more than 0".to_owned());
    }
    let files = std::iter::once(("kernel", &config.kernel))
        .chain(config.initramfs.iter().map(|p| ("initramfs", p)))
        .chain(config.disks.iter().map(|d| ("disk", &d.path)));
    for (what, path) in files {
        if !path.exists() {
            return invalid(format!("the {what} {} does not exist", path.display()));
        }
    }
    if let Some(nic) = &config.nic {
        let valid = !nic.tap.is_empty()
            && nic.tap.len() <= 15
            && nic
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return invalid(format!(
                "TAP name {:?} is not 1 to 15 letters, digits, '-', '_' or '.'",
                nic.tap
            ));
        }
    }
    Ok(())
}

/// Creates the run dir (returning whether it did), refusing one a live QEMU uses.
/// Creates the run dir (mode 0700, root's: a confined QEMU needs nothing in it),
/// returning whether it did; refuses one a live QEMU uses.
fn prepare_run_dir(paths: &RunPaths) -> Result<bool, HypervisorError> {
    if let Some(previous) = recorded_identity(&paths.dir) {
        return Err(HypervisorError::InvalidConfig(format!(
            "run dir {} is in use by QEMU pid {}",
            paths.dir.display(),
            previous.pid
        )));
    }
    let existed = paths.dir.is_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.dir)
        .map_err(|e| {
            HypervisorError::io(format!("cannot create run dir {}", paths.dir.display()), e)
        })?;
    Ok(!existed)
}

/// Removes the backend's files from a run dir, and the dir if it is then empty (or
/// the backend created it).
fn remove_run_files(paths: &RunPaths, created_dir: bool) {
    for name in RUN_FILES {
        let _ = std::fs::remove_file(paths.file(name));
    }
    let _ = std::fs::remove_file(paths.file(CONSOLE_LOG).with_extension("log.tmp"));
    if created_dir {
        let _ = std::fs::remove_dir_all(&paths.dir);
    } else {
        let _ = std::fs::remove_dir(&paths.dir);
    }
}

async fn read_run_state(paths: &RunPaths) -> RunState {
    let default = RunState {
        console_limit: 1 << 20,
        ..RunState::default()
    };
    match tokio::fs::read(paths.file(STATE_FILE)).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(default),
        Err(_) => default,
    }
}

/// Maps QEMU's `RunState` to the trait's states.
fn map_status(status: &str) -> VmmState {
    match status {
        "running" => VmmState::Running,
        "prelaunch" | "inmigrate" => VmmState::Created,
        "shutdown" | "guest-panicked" | "internal-error" => VmmState::Shutdown,
        // `postmigrate`: paused after a snapshot. The rest (`paused`, `finish-migrate`,
        // `save-vm`, `restore-vm`, ...) are pauses too.
        _ => VmmState::Paused,
    }
}

/// What QEMU wrote to its log (startup errors, and a failed snapshot load).
async fn read_qemu_log(paths: &RunPaths) -> String {
    let log = tokio::fs::read(paths.file(QEMU_LOG))
        .await
        .unwrap_or_default();
    String::from_utf8_lossy(&log).trim().to_owned()
}

fn make_handle(pid: u32, pid_start: u64, paths: &RunPaths) -> VmmHandle {
    VmmHandle::new(
        KIND,
        pid,
        pid_start,
        paths.dir.clone(),
        paths.file(QMP_SOCKET),
        paths.file(AGENT_SOCKET),
    )
}

fn vmm_info(state: VmmState, pid: u32, vcpus: u32, memory_mib: u64) -> VmmInfo {
    VmmInfo::new(state, pid, vcpus, memory_mib)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_core::{DiskConfig, MacAddr, NicConfig, VmId, VmName};

    fn machine(dir: &Path) -> MachineConfig {
        let mut config = MachineConfig::new(
            VmId::generate(),
            VmName::new("alpha").unwrap(),
            dir.join("run"),
            dir.join("vmlinuz"),
        );
        config.initramfs = Some(dir.join("initrd.img"));
        config.cmdline = "root=/dev/vda rw".to_owned();
        config.disks = vec![DiskConfig::new(dir.join("a,b.qcow2"), DiskFormat::Qcow2)];
        config.nic = Some(NicConfig::new("vmk0", MacAddr([0x52, 0x54, 0, 1, 2, 3])));
        config.vcpus = 2;
        config.max_vcpus = 4;
        config.memory_mib = 256;
        config
    }

    fn args_of(config: &MachineConfig, accel: Accel) -> Vec<String> {
        args_on(config, accel, "q35", false)
    }

    fn args_on(config: &MachineConfig, accel: Accel, machine: &str, incoming: bool) -> Vec<String> {
        let sockets = SocketFds {
            qmp: 5,
            agent: 6,
            console: 7,
            tap: config.confinement.map(|_| 8),
        };
        Qemu::command_line(config, accel, sockets, machine, incoming)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn command_line_has_every_device_with_explicit_formats() {
        let dir = Path::new("/srv/vm");
        let args = args_of(&machine(dir), Accel::Tcg);
        assert_eq!(
            value_after(&args, "-accel"),
            ["tcg,tb-size=512"],
            "TCG's code cache is bounded: the VMM's cgroup allows for it"
        );
        assert_eq!(value_after(&args, "-cpu"), ["max"]);
        assert_eq!(value_after(&args, "-smp"), ["2,maxcpus=4"]);
        assert_eq!(value_after(&args, "-m"), ["256M"]);
        assert_eq!(value_after(&args, "-M"), ["q35"]);
        assert_eq!(
            value_after(&args, "-append"),
            ["root=/dev/vda rw panic=-1 no_timer_check console=ttyS0"]
        );
        assert_eq!(
            value_after(&args, "-drive"),
            ["file=/srv/vm/a,,b.qcow2,format=qcow2,if=none,id=disk0,cache=writeback,discard=unmap"]
        );
        assert!(
            value_after(&args, "-device").contains(&"virtio-blk-pci,drive=disk0,num-queues=4"),
            "one queue per vCPU slot: {args:?}"
        );
        assert_eq!(
            value_after(&args, "-netdev"),
            ["tap,id=n0,ifname=vmk0,script=no,downscript=no"]
        );
        assert!(
            value_after(&args, "-device")
                .contains(&"virtio-net-pci,netdev=n0,mac=52:54:00:01:02:03")
        );
        assert!(
            value_after(&args, "-device")
                .contains(&"virtserialport,chardev=agent,name=org.vmkit.agent.0")
        );
        assert_eq!(
            value_after(&args, "-chardev"),
            [
                "socket,id=agent,fd=6,server=on,wait=off",
                "socket,id=console,fd=7,server=on,wait=off",
                "socket,id=qmp,fd=5,server=on,wait=off"
            ],
            "QEMU gets its sockets listening, from vmkit"
        );
        for flag in ["-nodefaults", "-no-user-config", "-S"] {
            assert!(args.iter().any(|a| a == flag), "{flag} is missing");
        }
        for absent in ["-daemonize", "-pidfile", "-sandbox", "-runas"] {
            assert!(!args.iter().any(|a| a == absent), "{absent} is there");
        }
    }

    #[test]
    fn a_confined_qemu_runs_under_its_seccomp_sandbox() {
        let mut config = machine(Path::new("/srv/vm"));
        config.confinement = Some(vmkit_core::Confinement::new(
            0x5000_0001,
            vmkit_core::CgroupLimits::default(),
        ));
        let args = args_of(&config, Accel::Tcg);
        assert_eq!(
            value_after(&args, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(
            !args.iter().any(|a| a == "-daemonize" || a == "-runas"),
            "it starts unprivileged and cannot fork"
        );
        assert_eq!(
            value_after(&args, "-netdev"),
            ["tap,id=n0,fd=8"],
            "it gets its TAP attached: /dev/net/tun may be root's only"
        );
    }

    #[test]
    fn a_reboot_resets_in_place_and_a_reported_panic_ends_the_vmm() {
        let args = args_of(&machine(Path::new("/srv/vm")), Accel::Tcg);
        assert!(
            !args.iter().any(|a| a == "-no-reboot"),
            "a guest reboot must not end the VMM"
        );
        assert_eq!(value_after(&args, "-action"), ["panic=shutdown"]);
        assert!(value_after(&args, "-device").contains(&"pvpanic-pci"));
    }

    #[test]
    fn a_restoring_vmm_waits_for_the_state_on_the_saved_machine_type() {
        let args = args_on(
            &machine(Path::new("/srv/vm")),
            Accel::Tcg,
            "pc-q35-7.2",
            true,
        );
        assert_eq!(value_after(&args, "-M"), ["pc-q35-7.2"]);
        assert_eq!(value_after(&args, "-incoming"), ["defer"]);
        assert!(args.iter().any(|a| a == "-S"), "the guest stays paused");
        assert_eq!(
            value_after(&args, "-kernel"),
            ["/srv/vm/vmlinuz"],
            "the devices are those of a start, the kernel included"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let args = args_of(&machine(Path::new("/srv/vm")), Accel::Kvm);
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
    }

    #[test]
    fn read_only_disks_are_opened_read_only() {
        let mut config = machine(Path::new("/srv/vm"));
        config.disks[0].read_only = true;
        config.disks[0].format = DiskFormat::Raw;
        let args = args_of(&config, Accel::Tcg);
        assert!(
            value_after(&args, "-drive")[0].ends_with(
                ",format=raw,if=none,id=disk0,cache=writeback,discard=unmap,readonly=on"
            )
        );
    }

    #[test]
    fn a_cmdline_that_sets_panic_keeps_it() {
        assert_eq!(
            kernel_cmdline("panic=10 quiet"),
            "panic=10 quiet no_timer_check console=ttyS0"
        );
        assert_eq!(kernel_cmdline(""), "panic=-1 no_timer_check console=ttyS0");
        assert_eq!(
            kernel_cmdline("no_timer_check panic=5"),
            "no_timer_check panic=5 console=ttyS0"
        );
    }

    #[test]
    fn a_run_dir_too_long_for_unix_sockets_is_invalid_config() {
        let long = PathBuf::from("/").join("d".repeat(100));
        let err = RunPaths::new(&long).unwrap_err();
        assert!(
            matches!(&err, HypervisorError::InvalidConfig(m) if m.contains("too long")),
            "{err}"
        );
        let fits = PathBuf::from("/").join("d".repeat(MAX_SOCKET_PATH - 2 - CONSOLE_SOCKET.len()));
        RunPaths::new(&fits).unwrap();
    }

    #[test]
    fn a_bad_tap_name_is_invalid_config() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["vmlinuz", "initrd.img", "a,b.qcow2"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let mut config = machine(dir.path());
        validate(&config).unwrap();
        config.nic = Some(NicConfig::new(
            "tap,script=/evil",
            MacAddr([0x52, 0x54, 0, 0, 0, 1]),
        ));
        assert!(matches!(
            validate(&config),
            Err(HypervisorError::InvalidConfig(_))
        ));
    }

    #[test]
    fn handle_info_and_capabilities_describe_the_qemu_vmm() {
        let paths = RunPaths::new(Path::new("/run/vm")).unwrap();
        let handle = make_handle(7, 99, &paths);
        assert_eq!((handle.pid, handle.pid_start), (7, 99));
        assert_eq!(handle.control_socket, Path::new("/run/vm/qmp.sock"));
        assert_eq!(handle.agent_socket, Path::new("/run/vm/agent.sock"));
        let info = vmm_info(VmmState::Paused, 7, 2, 512);
        assert_eq!(
            (info.state, info.vcpus, info.memory_mib),
            (VmmState::Paused, 2, 512)
        );
        let caps = Qemu::new(QemuConfig::new()).capabilities();
        assert!(caps.pause && caps.snapshot && caps.resize_vcpus && !caps.resize_memory);
        assert_eq!(caps.disk_formats, [DiskFormat::Qcow2, DiskFormat::Raw]);
    }

    #[test]
    fn qemu_run_states_map_to_vmm_states() {
        assert_eq!(map_status("running"), VmmState::Running);
        assert_eq!(map_status("paused"), VmmState::Paused);
        assert_eq!(map_status("prelaunch"), VmmState::Created);
        assert_eq!(map_status("postmigrate"), VmmState::Paused);
        assert_eq!(map_status("shutdown"), VmmState::Shutdown);
        assert_eq!(map_status("internal-error"), VmmState::Shutdown);
    }
}
