//! The cloud-hypervisor backend. Its design is documented on [`CloudHypervisor`].

mod api;
mod body;
mod config;
mod console;
mod events;
mod process;
mod vsock;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloud_hypervisor_client::models;
use serde::{Deserialize, Serialize};
use vmkit_core::guest::VSOCK_PORT;
use vmkit_core::{
    AgentStream, DiskFormat, Hypervisor, HypervisorCapabilities, HypervisorError, MachineConfig,
    Resize, VmmHandle, VmmInfo, VmmState, VmmWatch,
};

pub use config::ChConfig;

use api::{Api, ApiFailure};
use body::RunPaths;

use crate::process::VmmProcess;

/// How long `kill` waits for the killed process to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Longest single `vmm.ping` while a new VMM starts.
const START_PING: Duration = Duration::from_secs(1);
/// Memory is hot-added by cloud-hypervisor's ACPI method in multiples of this.
const HOTPLUG_STEP_MIB: u64 = 128;

/// The [`Hypervisor`] backend on [cloud-hypervisor], driven through its official
/// REST API.
///
/// # How it works
///
/// **One process per VM.** [`start`](Hypervisor::start) runs
/// `cloud-hypervisor --api-socket path=<run_dir>/api.sock --event-monitor
/// path=<run_dir>/events.json` (the program from
/// [`ChConfig::binary`]) with a double fork and `setsid`, so the VMM is not the
/// daemon's child: it outlives a daemon restart, gets no signal sent to the daemon's
/// process group, and is reaped by init. Its stdin is `/dev/null`, its stdout and
/// stderr go to `vmm.stdout.log` and `vmm.stderr.log` in the run directory. The
/// handle keeps its pid and its start time from `/proc/PID/stat`; every signal goes
/// through a pidfd after checking that start time, so a recycled pid is never hit,
/// and a process that is gone (or a zombie) counts as exited. Before a VMM is
/// spawned, an API or vsock socket left in the run directory by a crashed VMM is
/// removed (one that still answers is left alone and the start is refused).
///
/// **The API.** Requests are made with the [cloud-hypervisor-client] crate (0.6,
/// generated from cloud-hypervisor's OpenAPI spec) over the Unix socket through
/// hyperlocal, without connection pooling, and every call has a timeout
/// ([`ChConfig::api_timeout`], [`ChConfig::snapshot_timeout`]). None of the crate's
/// types appear in vmkit's API. `start` sends `vm.create` with the whole machine
/// (see [`vm_create_json`](CloudHypervisor::vm_create_json): payload with
/// ` console=ttyS0` appended to the command line, boot and max vCPUs, memory, raw
/// disks with `image_type` always stated and `backing_files` never set, the TAP and
/// MAC, vsock CID 3 on `<run_dir>/vsock.sock`, virtio-rng from `/dev/urandom`,
/// serial to `<run_dir>/console.log`, virtio-console off, a pvpanic device), then
/// `vm.boot`.
/// cloud-hypervisor's error replies become [`HypervisorError::Refused`] carrying its
/// own message (its JSON error chain joined with `": "`). A VMM that died is found
/// by its pid and start time ([`HypervisorError::NotRunning`], or
/// [`VmmState::Exited`] from `info`); one that hangs by the timeout on its socket
/// ([`HypervisorError::Timeout`]).
///
/// **Shutdown.** [`shutdown`](Hypervisor::shutdown) presses the virtual power
/// button (`vm.power-button`, an ACPI event) when the guest runs and waits up to the
/// grace period for the guest to power off, which ends the cloud-hypervisor process.
/// Then it stops by force: `vm.shutdown` (which in cloud-hypervisor stops the vCPUs
/// at once; it is not an ACPI request), `vmm.shutdown`, and SIGKILL if the process
/// is still there after [`ChConfig::stop_timeout`].
///
/// **The agent channel: host-initiated hybrid vsock.** [`connect_agent`]
/// connects to `<run_dir>/vsock.sock`, writes `CONNECT 1024\n`
/// ([`vmkit_core::guest::VSOCK_PORT`]), expects `OK <port>\n` and hands over the
/// stream. The other direction (the agent dials CID 2 and the host listens on
/// `<socket>_1024` before boot) was not chosen because the agent already listens on
/// AF_VSOCK port 1024, which is what the QEMU path and the protocol expect, so it
/// works unchanged; because the host then needs no listener per VM that must exist
/// before boot and be re-created after every daemon restart (a daemon that restarts
/// simply connects again); and because each caller gets its own connection, so the
/// manager may reconnect at any time. The price is polling while the guest boots
/// (cloud-hypervisor closes the stream while nothing listens), which
/// `connect_agent`'s callers do anyway.
///
/// **Events.** A task per VMM reads the event monitor's file as it grows
/// ([`watch`](Hypervisor::watch)): a guest reboot (`vm`/`rebooting`) is a reset
/// of the same VMM; a kernel panic the guest reports through its pvpanic device
/// (`guest`/`panic`) makes the backend stop the VMM (cloud-hypervisor itself goes
/// on) and report [`VmmExit::Panic`](vmkit_core::VmmExit::Panic); a `vm`/`shutdown`
/// the backend did not ask for, then the end of the process, is a guest power-off.
///
/// **Snapshot and restore.** [`snapshot`](Hypervisor::snapshot) needs a paused
/// guest (cloud-hypervisor refuses otherwise, and so does this backend, with
/// cloud-hypervisor's message) and writes `config.json`, `state.json` and the memory
/// into the directory (created if missing; cloud-hypervisor will not overwrite an
/// earlier snapshot there). cloud-hypervisor refuses `vm.restore` once `vm.create`
/// has been called, so [`restore`](Hypervisor::restore) spawns a fresh VMM and calls
/// only `vm.restore` (with `resume: false`: the guest comes back paused). Because
/// cloud-hypervisor recreates devices from the snapshot's `config.json`, restore
/// first rewrites in that file the vsock socket, serial file, disk paths and TAP
/// name to those of the config it is given, so a snapshot can come back in another
/// run directory; CPUs, memory and the MAC stay as snapshotted.
///
/// **Console cap.** cloud-hypervisor writes the serial file itself, without
/// `O_APPEND`, so it cannot be truncated under it. The backend keeps its disk usage
/// within [`MachineConfig::console_limit`] by punching a hole over all but the last
/// `console_limit` bytes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): checked every
/// [`ChConfig::console_check_interval`] by a task per running VM and on every
/// [`console_tail`](Hypervisor::console_tail), which never returns more than the
/// cap. The file's length keeps growing; only its blocks are freed.
///
/// **Confinement.** For a config with [`MachineConfig::confinement`] the VMM is
/// started as the VM's uid and gid in the VM's cgroup (see `crate::spawn`), with
/// `--seccomp true` stated (cloud-hypervisor's own filters); `vm.create` carries
/// `landlock_enable: true` and a read-write rule for the run directory (where the VMM
/// makes its vsock socket and serial file; cloud-hypervisor adds the paths of the
/// config itself), and a restore writes the same into the snapshot's `config.json`,
/// with a read-only rule for the snapshot directory. The VM's disks and TAP are handed
/// to its uid before the spawn. The run directory is root's with the VM's group,
/// mode 1770: the VMM may create files there, and the sticky bit keeps it from
/// removing or replacing vmkit's (the API socket, the run state); the console log is
/// opened with `O_NOFOLLOW`. Untested against a real cloud-hypervisor like the rest.
///
/// **Resize.** vCPUs up to `max_vcpus`. Memory only grows, by ACPI hotplug in steps
/// of 128 MiB, up to [`ChConfig::hotplug_memory_mib`] more than at boot; with the
/// default of 0 memory resize is reported as unsupported.
///
/// # What has run against a real cloud-hypervisor
///
/// **Nothing.** No cloud-hypervisor binary can be installed where this backend was
/// written. Every test runs it against a stand-in API server (in `tests/support/`)
/// that loads the official spec (`shared/specs/cloud-hypervisor.yaml`) at test
/// time, validates every request body against the spec's schemas, keeps the state
/// machine of cloud-hypervisor's `vmm/src/lib.rs` and `vm.rs` and answers with its
/// status codes and error chains, and plays the VMM side of hybrid vsock with a fake
/// agent. So the request bodies, the call order, the state rules, the process
/// handling and the error paths are tested; untested are KVM itself, real devices,
/// how a real guest reacts to the power button, the timing of the real vsock muxer,
/// the exact wording of errors the stand-in does not copy from cloud-hypervisor's
/// source, and differences between cloud-hypervisor releases. Known ones: releases
/// whose `NetConfig.ip` defaults to `192.168.249.1` put that address on the TAP
/// (vmkit sends no `ip`); releases that do not remove a stale API socket themselves
/// are covered by the backend removing it; the crate's `VmState` lacks the spec's
/// `BreakPoint`, so a VM stopped in a debugger reads as a protocol error.
///
/// # Example
///
/// The exact `vm.create` body for a machine, with no VMM involved:
///
/// ```
/// use vmkit_core::{DiskConfig, DiskFormat, MachineConfig, VmId, VmName};
/// use vmkit_hv::{ChConfig, CloudHypervisor};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let machine = MachineConfig::new(
///     VmId::generate(),
///     VmName::new("web")?,
///     "/var/lib/vmkit/run/web".into(),
///     "/var/lib/vmkit/images/base/vmlinuz".into(),
/// )
/// .vcpus(2)
/// .disk(DiskConfig::new("/var/lib/vmkit/volumes/web.raw", DiskFormat::Raw));
/// let ch = CloudHypervisor::new(ChConfig::new());
/// let body: serde_json::Value = serde_json::from_str(&ch.vm_create_json(&machine)?)?;
/// assert_eq!(body["disks"][0]["image_type"], "Raw");
/// assert_eq!(body["cpus"]["boot_vcpus"], 2);
/// assert_eq!(body["vsock"]["socket"], "/var/lib/vmkit/run/web/vsock.sock");
/// # Ok(())
/// # }
/// ```
///
/// [cloud-hypervisor]: https://www.cloudhypervisor.org/
/// [cloud-hypervisor-client]: https://crates.io/crates/cloud-hypervisor-client
/// [`connect_agent`]: Hypervisor::connect_agent
#[derive(Clone, Debug)]
pub struct CloudHypervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ChConfig,
    /// VMMs (pid, start time) whose console log a task watches.
    watched: Mutex<HashSet<(u32, u64)>>,
    /// The event watches of VMMs (pid, start time), started at start, restore or
    /// the first [`Hypervisor::watch`].
    events: Mutex<HashMap<(u32, u64), events::EventWatch>>,
}

/// What the backend keeps in the run directory for a later daemon.
#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    console_limit: u64,
    /// The directories of the VMM's cgroup, recorded before they are created.
    #[serde(default)]
    cgroup: Vec<PathBuf>,
}

impl CloudHypervisor {
    /// The backend's [`Hypervisor::kind`], also stored in its handles.
    pub const KIND: &'static str = "cloud-hypervisor";

    /// A backend with `config`.
    pub fn new(config: ChConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                watched: Mutex::default(),
                events: Mutex::default(),
            }),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &ChConfig {
        &self.inner.config
    }

    /// The exact JSON body [`start`](Hypervisor::start) sends to `vm.create` for
    /// `config` (after making its paths absolute), for logs and tests.
    pub fn vm_create_json(&self, config: &MachineConfig) -> Result<String, HypervisorError> {
        body::validate(config)?;
        let config = body::absolutize(config)?;
        let vm = body::vm_config(&config, &self.inner.config)?;
        serde_json::to_string(&vm)
            .map_err(|e| HypervisorError::Protocol(format!("encoding vm.create: {e}")))
    }

    fn api_error(
        &self,
        operation: &'static str,
        failure: ApiFailure,
        id: &VmmProcess,
        timeout: Duration,
    ) -> HypervisorError {
        match failure {
            ApiFailure::Refused { message, .. } => HypervisorError::Refused { operation, message },
            ApiFailure::Protocol(message) => {
                HypervisorError::Protocol(format!("{operation}: {message}"))
            }
            ApiFailure::Unreachable(_) | ApiFailure::Timeout if !id.is_alive() => {
                HypervisorError::NotRunning { pid: id.pid }
            }
            ApiFailure::Unreachable(source) => HypervisorError::Io {
                context: format!(
                    "calling {operation} on the cloud-hypervisor API at {}",
                    id.marker.display()
                ),
                source,
            },
            ApiFailure::Timeout => HypervisorError::Timeout { operation, timeout },
        }
    }

    /// The identity of a running VMM, or `NotRunning`.
    fn running(&self, handle: &VmmHandle) -> Result<VmmProcess, HypervisorError> {
        let id = VmmProcess::from_handle(handle);
        if id.is_alive() {
            Ok(id)
        } else {
            Err(HypervisorError::NotRunning { pid: handle.pid })
        }
    }

    /// Prepares the run directory of `config` and its confinement, spawns a VMM there
    /// and waits until its API answers.
    async fn spawn_vmm(
        &self,
        config: &MachineConfig,
        paths: &RunPaths,
    ) -> Result<(VmmHandle, VmmProcess), HypervisorError> {
        let plan = crate::confine::plan(config)?;
        let dirs = plan.as_ref().map(|p| p.dirs.clone()).unwrap_or_default();
        prepare_run_dir(
            paths,
            config.console_limit,
            &dirs,
            config.confinement.map(|c| c.gid),
        )?;
        let jail = plan.map(|p| p.apply(config, 0)).transpose()?;
        let credentials = jail.as_ref().map(|j| j.credentials()).transpose()?;
        let binary = self.inner.config.binary.clone();
        let args = vmm_args(paths, jail.is_some());
        let spawn_paths = paths.clone();
        let spawned = tokio::task::spawn_blocking(move || {
            process::spawn_detached(&binary, &args, &spawn_paths, credentials.as_ref())
        })
        .await
        .map_err(|e| HypervisorError::io("spawning the VMM", io::Error::other(e)))??;
        let Some(start_time) = spawned.start else {
            return Err(exited_during_start(paths));
        };
        let id = VmmProcess {
            pid: spawned.pid,
            start_time,
            marker: paths.api.clone(),
        };
        if let Err(e) = crate::process::write_identity(&paths.dir, &id) {
            force_kill(&id).await;
            return Err(HypervisorError::io("cannot record the VMM's identity", e));
        }
        if let Err(err) = self.wait_for_api(&id, paths).await {
            force_kill(&id).await;
            return Err(err);
        }
        Ok((make_handle(paths, &id), id))
    }

    async fn wait_for_api(&self, id: &VmmProcess, paths: &RunPaths) -> Result<(), HypervisorError> {
        let timeout = self.inner.config.start_timeout;
        let deadline = Instant::now() + timeout;
        let api = Api::new(&paths.api);
        loop {
            if !id.is_alive() {
                return Err(exited_during_start(paths));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(HypervisorError::Timeout {
                    operation: "start (waiting for the API socket)",
                    timeout,
                });
            }
            match api.ping(remaining.min(START_PING)).await {
                Ok(ping) => return check_ping_pid(&ping, id, &api),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The event watch of the VMM of `handle`, started if there is none.
    fn event_watch(&self, handle: &VmmHandle) -> VmmWatch {
        let key = (handle.pid, handle.pid_start);
        let mut watches = lock(&self.inner.events);
        watches
            .entry(key)
            .or_insert_with(|| {
                events::watch(
                    VmmProcess::from_handle(handle),
                    RunPaths::new(&handle.run_dir).events,
                )
            })
            .watch
            .clone()
    }

    /// Records that the backend itself stops the VMM of `handle`.
    fn mark_stopping(&self, handle: &VmmHandle) {
        if let Some(w) = lock(&self.inner.events).get(&(handle.pid, handle.pid_start)) {
            w.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Starts the task that keeps the console log of `handle` within `limit`.
    fn watch_console(&self, handle: &VmmHandle, limit: u64) {
        let key = (handle.pid, handle.pid_start);
        if !lock(&self.inner.watched).insert(key) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let id = VmmProcess::from_handle(handle);
        let path = RunPaths::new(&handle.run_dir).console;
        let interval = self.inner.config.console_check_interval;
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                if !id.is_alive() {
                    lock(&inner.watched).remove(&key);
                    return;
                }
                drop(inner);
                if let Err(err) = console::compact(&path, limit)
                    && !warned
                {
                    tracing::warn!(
                        path = %path.display(),
                        error = %err,
                        "cannot shorten the console log; only reads are capped"
                    );
                    warned = true;
                }
            }
        });
    }

    async fn vm_info(&self, id: &VmmProcess) -> Result<Option<models::VmInfo>, HypervisorError> {
        let t = self.inner.config.api_timeout;
        match Api::new(&id.marker).info(t).await {
            Ok(info) => Ok(Some(info)),
            // 404: the VMM runs but no VM was created (or restored) in it.
            Err(ApiFailure::Refused { status: 404, .. }) => Ok(None),
            Err(f) => Err(self.api_error("vm.info", f, id, t)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn exited_during_start(paths: &RunPaths) -> HypervisorError {
    HypervisorError::Refused {
        operation: "start",
        message: format!(
            "cloud-hypervisor exited during start-up: {}",
            process::stderr_tail(paths)
        ),
    }
}

fn check_ping_pid(
    ping: &models::VmmPingResponse,
    id: &VmmProcess,
    api: &Api,
) -> Result<(), HypervisorError> {
    match ping.pid {
        Some(pid) if pid != i64::from(id.pid) => Err(HypervisorError::Protocol(format!(
            "process {pid}, not the VMM {}, answers on {}",
            id.pid,
            api.socket().display()
        ))),
        _ => Ok(()),
    }
}

/// SIGKILL and a short wait, for clean-up paths that report another error.
async fn force_kill(id: &VmmProcess) {
    if let Err(err) = id.kill() {
        tracing::warn!(pid = id.pid, error = %err, "cannot kill the VMM");
    }
    id.wait_gone(KILL_WAIT).await;
}

fn make_handle(paths: &RunPaths, id: &VmmProcess) -> VmmHandle {
    VmmHandle::new(
        CloudHypervisor::KIND,
        id.pid,
        id.start_time,
        paths.dir.clone(),
        paths.api.clone(),
        paths.vsock.clone(),
    )
}

fn map_state(state: models::VmState) -> VmmState {
    match state {
        models::VmState::Created => VmmState::Created,
        models::VmState::Running => VmmState::Running,
        models::VmState::Paused => VmmState::Paused,
        models::VmState::Shutdown => VmmState::Shutdown,
    }
}

fn info_from(info: &models::VmInfo, pid: u32) -> VmmInfo {
    let vcpus = info
        .config
        .cpus
        .as_ref()
        .and_then(|c| u32::try_from(c.boot_vcpus).ok())
        .unwrap_or(0);
    let bytes = info
        .memory_actual_size
        .or_else(|| info.config.memory.as_ref().map(|m| m.size))
        .and_then(|b| u64::try_from(b).ok())
        .unwrap_or(0);
    VmmInfo::new(map_state(info.state), pid, vcpus, bytes >> 20)
}

/// The command line of a VMM in `paths`: its API socket and, when confined, its
/// seccomp filters stated on (they are cloud-hypervisor's default; landlock comes
/// with `vm.create`).
fn vmm_args(paths: &RunPaths, confined: bool) -> Vec<OsString> {
    let mut socket_arg = OsString::from("path=");
    socket_arg.push(&paths.api);
    let mut events_arg = OsString::from("path=");
    events_arg.push(&paths.events);
    let mut args = vec![
        OsString::from("--api-socket"),
        socket_arg,
        OsString::from("--event-monitor"),
        events_arg,
    ];
    if confined {
        args.extend(["--seccomp", "true"].map(OsString::from));
    }
    args
}

fn read_run_state(paths: &RunPaths) -> Option<RunState> {
    let text = std::fs::read(&paths.state).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Creates the run directory (mode 0700: its sockets control the VM), removes
/// sockets a crashed VMM left there, and records what a later daemon needs (the
/// cgroup `dirs` before they exist). For a VMM confined to group `gid` the directory
/// is root's, of group `gid`, mode 1770: the VMM makes its sockets and serial file
/// there, and the sticky bit keeps it from removing or replacing vmkit's files.
fn prepare_run_dir(
    paths: &RunPaths,
    console_limit: u64,
    dirs: &[PathBuf],
    gid: Option<u32>,
) -> Result<(), HypervisorError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.dir)
        .map_err(|e| HypervisorError::io(format!("creating {}", paths.dir.display()), e))?;
    for socket in [&paths.api, &paths.vsock] {
        clear_stale_socket(socket)?;
    }
    let state = serde_json::to_vec(&RunState {
        console_limit,
        cgroup: dirs.to_vec(),
    })
    .map_err(|e| HypervisorError::Protocol(format!("encoding the run state: {e}")))?;
    std::fs::write(&paths.state, state)
        .map_err(|e| HypervisorError::io(format!("writing {}", paths.state.display()), e))?;
    if let Some(gid) = gid {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(&paths.dir, Some(0), Some(gid))
            .and_then(|()| {
                std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o1770))
            })
            .map_err(|e| {
                HypervisorError::io(format!("handing {} to the VMM", paths.dir.display()), e)
            })?;
    }
    Ok(())
}

/// Removes the cgroup recorded in `run_dir`, killing what still runs in it.
async fn remove_cgroup_of(run_dir: &Path) -> Result<(), HypervisorError> {
    let dirs = read_run_state(&RunPaths::new(run_dir))
        .map(|s| s.cgroup)
        .unwrap_or_default();
    crate::confine::remove_cgroup(&dirs).await
}

/// Removes the socket at `path` unless something still listens on it.
fn clear_stale_socket(path: &Path) -> Result<(), HypervisorError> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(HypervisorError::InvalidConfig(format!(
            "{} is in use: a VMM still listens on it",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a stale socket");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HypervisorError::io(
                format!("removing the stale socket {}", path.display()),
                e,
            )),
        },
    }
}

fn file_url(dir: &Path) -> Result<(PathBuf, String), HypervisorError> {
    let dir = std::path::absolute(dir)
        .map_err(|e| HypervisorError::io(format!("resolving {}", dir.display()), e))?;
    let url = format!("file://{}", body::path_str(&dir)?);
    Ok((dir, url))
}

#[async_trait]
impl Hypervisor for CloudHypervisor {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn capabilities(&self) -> HypervisorCapabilities {
        let mut caps = HypervisorCapabilities::default();
        caps.pause = true;
        caps.resize_vcpus = true;
        caps.resize_memory = self.inner.config.hotplug_memory_mib > 0;
        caps.snapshot = true;
        caps.disk_formats = vec![DiskFormat::Raw];
        caps
    }

    /// Spawns the VMM, then `vm.create` and `vm.boot`. On error the VMM is killed.
    async fn start(&self, config: &MachineConfig) -> Result<VmmHandle, HypervisorError> {
        body::validate(config)?;
        let config = body::absolutize(config)?;
        let vm = body::vm_config(&config, &self.inner.config)?;
        let paths = RunPaths::new(&config.run_dir);
        let (handle, id) = self.spawn_vmm(&config, &paths).await?;

        let api = Api::new(&paths.api);
        let t = self.inner.config.api_timeout;
        let booted = async {
            api.create(t, vm)
                .await
                .map_err(|f| self.api_error("vm.create", f, &id, t))?;
            api.boot(t)
                .await
                .map_err(|f| self.api_error("vm.boot", f, &id, t))
        }
        .await;
        if let Err(err) = booted {
            force_kill(&id).await;
            return Err(err);
        }
        self.watch_console(&handle, config.console_limit);
        self.event_watch(&handle);
        Ok(handle)
    }

    /// Checks the process, `vmm.ping` (whose pid must be the handle's) and
    /// `vm.info`; restarts the console watcher.
    async fn attach(&self, handle: &VmmHandle) -> Result<VmmState, HypervisorError> {
        if handle.backend != Self::KIND {
            return Err(HypervisorError::InvalidConfig(format!(
                "the handle belongs to the {} backend",
                handle.backend
            )));
        }
        let id = self.running(handle)?;
        let api = Api::new(&handle.control_socket);
        let t = self.inner.config.api_timeout;
        let ping = api
            .ping(t)
            .await
            .map_err(|f| self.api_error("vmm.ping", f, &id, t))?;
        check_ping_pid(&ping, &id, &api)?;
        let state = match self.vm_info(&id).await? {
            Some(info) => map_state(info.state),
            None => VmmState::Created,
        };
        let paths = RunPaths::new(&handle.run_dir);
        if let Some(run) = read_run_state(&paths) {
            self.watch_console(handle, run.console_limit);
        }
        Ok(state)
    }

    async fn info(&self, handle: &VmmHandle) -> Result<VmmInfo, HypervisorError> {
        let id = VmmProcess::from_handle(handle);
        if !id.is_alive() {
            return Ok(VmmInfo::new(VmmState::Exited, handle.pid, 0, 0));
        }
        match self.vm_info(&id).await {
            Ok(Some(info)) => Ok(info_from(&info, handle.pid)),
            Ok(None) => Ok(VmmInfo::new(VmmState::Created, handle.pid, 0, 0)),
            Err(HypervisorError::NotRunning { .. }) => {
                Ok(VmmInfo::new(VmmState::Exited, handle.pid, 0, 0))
            }
            Err(err) => Err(err),
        }
    }

    /// Power button and `grace`; then `vm.shutdown`, `vmm.shutdown`; then SIGKILL.
    async fn shutdown(&self, handle: &VmmHandle, grace: Duration) -> Result<(), HypervisorError> {
        let id = VmmProcess::from_handle(handle);
        if !id.is_alive() {
            return Ok(());
        }
        self.mark_stopping(handle);
        let api = Api::new(&handle.control_socket);
        let t = self.inner.config.api_timeout;
        let running = matches!(
            api.info(t).await,
            Ok(info) if info.state == models::VmState::Running
        );
        if running && api.power_button(t).await.is_ok() && id.wait_gone(grace).await {
            return Ok(());
        }
        let stop = self.inner.config.stop_timeout;
        if let Err(failure) = api.shutdown_vm(stop).await {
            tracing::debug!(pid = id.pid, ?failure, "vm.shutdown during a forced stop");
        }
        if let Err(failure) = api.shutdown_vmm(stop).await {
            tracing::debug!(pid = id.pid, ?failure, "vmm.shutdown during a forced stop");
        }
        if id.wait_gone(stop).await {
            return Ok(());
        }
        tracing::warn!(pid = id.pid, "the VMM ignored vmm.shutdown; killing it");
        self.kill(handle).await
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        let id = VmmProcess::from_handle(handle);
        self.mark_stopping(handle);
        id.kill().map_err(|e| {
            HypervisorError::io(format!("sending SIGKILL to the VMM (pid {})", id.pid), e)
        })?;
        if id.wait_gone(KILL_WAIT).await {
            Ok(())
        } else {
            Err(HypervisorError::Timeout {
                operation: "kill",
                timeout: KILL_WAIT,
            })
        }
    }

    async fn pause(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        let id = self.running(handle)?;
        let t = self.inner.config.api_timeout;
        Api::new(&id.marker)
            .pause(t)
            .await
            .map_err(|f| self.api_error("vm.pause", f, &id, t))
    }

    async fn resume(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        let id = self.running(handle)?;
        let t = self.inner.config.api_timeout;
        Api::new(&id.marker)
            .resume(t)
            .await
            .map_err(|f| self.api_error("vm.resume", f, &id, t))
    }

    async fn resize(&self, handle: &VmmHandle, resize: Resize) -> Result<(), HypervisorError> {
        if resize.vcpus.is_none() && resize.memory_mib.is_none() {
            return Ok(());
        }
        let id = self.running(handle)?;
        let ram = match resize.memory_mib {
            None => None,
            Some(_) if self.inner.config.hotplug_memory_mib == 0 => {
                return Err(HypervisorError::Unsupported {
                    backend: Self::KIND,
                    operation: "memory resize (ChConfig::hotplug_memory_mib is 0)",
                });
            }
            Some(mib) => {
                let current = self.info(handle).await?.memory_mib;
                if mib < current {
                    return Err(HypervisorError::Unsupported {
                        backend: Self::KIND,
                        operation: "shrinking memory (ACPI hotplug only adds)",
                    });
                }
                if (mib - current) % HOTPLUG_STEP_MIB != 0 {
                    return Err(HypervisorError::InvalidConfig(format!(
                        "memory grows in steps of {HOTPLUG_STEP_MIB} MiB; {mib} MiB is {} MiB more than {current} MiB",
                        mib - current
                    )));
                }
                Some(body::mib_to_bytes(mib)?)
            }
        };
        let vcpus = resize
            .vcpus
            .map(|n| {
                i32::try_from(n)
                    .map_err(|_| HypervisorError::InvalidConfig(format!("{n} vCPUs is too many")))
            })
            .transpose()?;
        let t = self.inner.config.api_timeout;
        Api::new(&id.marker)
            .resize(t, vcpus, ram)
            .await
            .map_err(|f| self.api_error("vm.resize", f, &id, t))
    }

    async fn snapshot(&self, handle: &VmmHandle, dir: &Path) -> Result<(), HypervisorError> {
        let id = self.running(handle)?;
        let (dir, url) = file_url(dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| HypervisorError::io(format!("creating {}", dir.display()), e))?;
        let t = self.inner.config.snapshot_timeout;
        Api::new(&id.marker)
            .snapshot(t, url)
            .await
            .map_err(|f| self.api_error("vm.snapshot", f, &id, t))
    }

    /// A fresh VMM that is only ever sent `vm.restore`.
    async fn restore(
        &self,
        config: &MachineConfig,
        dir: &Path,
    ) -> Result<VmmHandle, HypervisorError> {
        body::validate(config)?;
        let config = body::absolutize(config)?;
        let (dir, url) = file_url(dir)?;
        let snapshot_config = dir.join(body::SNAPSHOT_CONFIG);
        let text = match std::fs::read(&snapshot_config) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(HypervisorError::Refused {
                    operation: "restore",
                    message: format!("no cloud-hypervisor snapshot in {}", dir.display()),
                });
            }
            Err(e) => {
                return Err(HypervisorError::io(
                    format!("reading {}", snapshot_config.display()),
                    e,
                ));
            }
        };
        let mut value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
            HypervisorError::Protocol(format!("{}: {e}", snapshot_config.display()))
        })?;
        body::patch_snapshot_config(&mut value, &config, &dir)?;
        let patched = serde_json::to_vec(&value)
            .map_err(|e| HypervisorError::Protocol(format!("encoding config.json: {e}")))?;
        let tmp = dir.join(".config.json.vmkit");
        std::fs::write(&tmp, patched)
            .and_then(|()| std::fs::rename(&tmp, &snapshot_config))
            .map_err(|e| {
                HypervisorError::io(format!("rewriting {}", snapshot_config.display()), e)
            })?;

        let paths = RunPaths::new(&config.run_dir);
        let (handle, id) = self.spawn_vmm(&config, &paths).await?;
        let t = self.inner.config.snapshot_timeout;
        if let Err(f) = Api::new(&paths.api).restore(t, url).await {
            let err = self.api_error("vm.restore", f, &id, t);
            force_kill(&id).await;
            return Err(err);
        }
        self.watch_console(&handle, config.console_limit);
        self.event_watch(&handle);
        Ok(handle)
    }

    /// The hybrid-vsock handshake on the handle's agent socket.
    async fn connect_agent(&self, handle: &VmmHandle) -> Result<AgentStream, HypervisorError> {
        self.running(handle)?;
        let stream = vsock::connect(
            &handle.agent_socket,
            VSOCK_PORT,
            self.inner.config.agent_timeout,
        )
        .await?;
        Ok(Box::new(stream))
    }

    async fn console_tail(
        &self,
        handle: &VmmHandle,
        max_bytes: usize,
    ) -> Result<String, HypervisorError> {
        let paths = RunPaths::new(&handle.run_dir);
        let limit = read_run_state(&paths).map_or(u64::MAX, |s| s.console_limit);
        if let Err(err) = console::compact(&paths.console, limit) {
            tracing::debug!(error = %err, "cannot shorten the console log");
        }
        let max = u64::try_from(max_bytes).unwrap_or(u64::MAX).min(limit);
        console::tail(&paths.console, max)
            .map_err(|e| HypervisorError::io(format!("reading {}", paths.console.display()), e))
    }

    async fn cleanup(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        if VmmProcess::from_handle(handle).is_alive() {
            return Err(HypervisorError::Refused {
                operation: "cleanup",
                message: "the VMM still runs".into(),
            });
        }
        lock(&self.inner.events).remove(&(handle.pid, handle.pid_start));
        remove_cgroup_of(&handle.run_dir).await?;
        match std::fs::remove_dir_all(&handle.run_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HypervisorError::io(
                format!("removing {}", handle.run_dir.display()),
                e,
            )),
        }
    }

    async fn discard(&self, run_dir: &Path) -> Result<(), HypervisorError> {
        remove_cgroup_of(run_dir).await?;
        crate::process::discard_run_dir(run_dir, body::API_SOCKET, KILL_WAIT).await
    }

    /// Follows the VMM's event monitor (see the `events` module): guest reboots
    /// (resets), power-off, panic.
    async fn watch(&self, handle: &VmmHandle) -> Result<VmmWatch, HypervisorError> {
        if handle.backend != Self::KIND {
            return Err(HypervisorError::InvalidConfig(format!(
                "the handle belongs to the {} backend",
                handle.backend
            )));
        }
        Ok(self.event_watch(handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_vmm_states_its_seccomp_filters_on() {
        let paths = RunPaths::new(Path::new("/run/vmkit/x"));
        let args = |confined| {
            vmm_args(&paths, confined)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
        };
        let common = [
            "--api-socket",
            "path=/run/vmkit/x/api.sock",
            "--event-monitor",
            "path=/run/vmkit/x/events.json",
        ];
        assert_eq!(args(true), [&common[..], &["--seccomp", "true"]].concat());
        assert_eq!(args(false), common);
    }

    #[test]
    fn handles_name_the_run_dir_sockets_and_capabilities_follow_the_config() {
        let paths = RunPaths::new(Path::new("/run/vmkit/x"));
        let id = VmmProcess {
            pid: 42,
            start_time: 7,
            marker: paths.api.clone(),
        };
        let handle = make_handle(&paths, &id);
        assert_eq!(handle.backend, "cloud-hypervisor");
        assert_eq!((handle.pid, handle.pid_start), (42, 7));
        assert_eq!(handle.control_socket, Path::new("/run/vmkit/x/api.sock"));
        assert_eq!(handle.agent_socket, Path::new("/run/vmkit/x/vsock.sock"));
        let caps = CloudHypervisor::new(ChConfig::new()).capabilities();
        assert!(caps.pause && caps.snapshot && caps.resize_vcpus && !caps.resize_memory);
        assert_eq!(caps.disk_formats, [DiskFormat::Raw]);
        let caps = CloudHypervisor::new(ChConfig::new().hotplug_memory_mib(1024)).capabilities();
        assert!(caps.resize_memory);
    }
}
