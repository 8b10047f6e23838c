//! An in-memory hypervisor whose guests run a fake agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use vmkit_guest::{ExecRequest, ExitStatus, Handler, HelloInfo, OutputSink, ServerConfig};

use super::faults::{Breakage, Faults};
use crate::hypervisor::{
    AgentStream, Hypervisor, HypervisorCapabilities, HypervisorError, MachineConfig, Resize,
    VmmExit, VmmHandle, VmmInfo, VmmState, VmmWatch, VmmWatchSender,
};
use crate::storage::DiskFormat;

/// How the fake guest's agent behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AgentBehavior {
    /// Answers every request.
    #[default]
    Healthy,
    /// Accepts connections but never answers (a guest that hangs in boot).
    Silent,
    /// Refuses connections (no agent in the image).
    Absent,
}

#[derive(Debug, Clone)]
struct FakeVmm {
    config: MachineConfig,
    state: VmmState,
    vcpus: u32,
    memory_mib: u64,
    console: String,
    guest: GuestState,
    /// Boots of this VMM's guest so far (1 at start): part of its boot id.
    boots: u32,
}

/// What a fake guest's agent was told to configure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuestState {
    /// The host name it was given.
    pub hostname: Option<String>,
    /// The address it was given.
    pub network: Option<vmkit_guest::NetworkConfig>,
    /// The SSH keys installed for its default user.
    pub ssh_keys: Vec<String>,
    /// How often it was asked to grow its filesystems to its disks.
    pub grow_requests: u32,
}

#[derive(Debug, Default)]
struct Shared {
    vmms: BTreeMap<u32, FakeVmm>,
    snapshots: BTreeMap<PathBuf, FakeVmm>,
    /// The consoles of VMMs that exited, readable until `cleanup`, as a real
    /// backend's log in its run directory is.
    exited: BTreeMap<u32, String>,
    /// What each VMM's watchers are told, by pid; kept after the VMM exits.
    watches: BTreeMap<u32, VmmWatchSender>,
    /// The agent connections of each running guest, cut when it reboots or exits.
    connections: BTreeMap<u32, Vec<tokio::task::AbortHandle>>,
    /// VMMs that stopped answering: `info` and `attach` never return.
    hung: std::collections::HashSet<u32>,
}

impl Shared {
    /// The VMM `pid` exits for `why`; its console stays readable until cleanup.
    fn exit(&mut self, pid: u32, why: VmmExit) {
        if let Some(vmm) = self.vmms.remove(&pid) {
            self.exited.insert(pid, vmm.console);
            self.cut_connections(pid);
            if let Some(watch) = self.watches.get(&pid) {
                watch.exit(why);
            }
        }
    }

    fn cut_connections(&mut self, pid: u32) {
        for task in self.connections.remove(&pid).unwrap_or_default() {
            task.abort();
        }
    }
}

/// The port on a fake guest's loopback where a web server answers (see the fake
/// agent's sessions).
pub const FAKE_LOOPBACK_HTTP_PORT: u16 = 8000;

/// A complete in-memory [`Hypervisor`]: VMMs are entries in a table with the real
/// state rules (pause only when running, snapshot only when paused, restore into a
/// fresh VMM), and each guest runs a fake agent speaking the real protocol over an
/// in-memory stream. Its exec understands `echo`, `cat` (of standard input, of
/// `/proc/sys/kernel/random/boot_id`, or of the files the agent was told to write:
/// `/etc/hostname` and the default user's `/root/.ssh/authorized_keys`), `true`,
/// `false`, `exit N`, `sleep SECS`, `hostname` and `uname`; anything else exits 127.
///
/// It reports its VMMs' events ([`Hypervisor::watch`]) and simulates what a guest
/// does to them: [`guest_reboot`](Self::guest_reboot) (a reset in place with a new
/// boot id), [`guest_poweroff`](Self::guest_poweroff),
/// [`guest_panic`](Self::guest_panic), [`crash`](Self::crash), and a VMM that stops
/// answering ([`hang`](Self::hang)).
///
/// Like the real backends it drives only its own handles (another backend's is
/// refused with [`HypervisorError::InvalidConfig`]), and reports
/// [`HypervisorError::NotRunning`] only for a VMM that is gone. Its kind is `fake`
/// unless set ([`FakeHypervisor::with_kind`]), so that a test can give a manager two.
/// [`Faults::break_op`] breaks `hypervisor.attach`, `hypervisor.kill`,
/// `hypervisor.cleanup` and `hypervisor.discard` per VM.
#[derive(Debug, Clone)]
pub struct FakeHypervisor {
    kind: &'static str,
    shared: Arc<Mutex<Shared>>,
    next_pid: Arc<AtomicU32>,
    faults: Faults,
    behavior: Arc<Mutex<AgentBehavior>>,
    hostile: Arc<Mutex<std::collections::HashSet<u32>>>,
}

impl Default for FakeHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHypervisor {
    /// A fake that fails nothing.
    pub fn new() -> Self {
        Self::with_faults(Faults::new())
    }

    /// A fake whose calls count towards `faults`.
    pub fn with_faults(faults: Faults) -> Self {
        Self {
            kind: "fake",
            shared: Arc::default(),
            next_pid: Arc::new(AtomicU32::new(1000)),
            faults,
            behavior: Arc::default(),
            hostile: Arc::default(),
        }
    }

    /// The same fake under another [`Hypervisor::kind`] (a fresh one: no VMMs
    /// shared with `self`), e.g. `FakeHypervisor::new().with_kind("fake-ch")`.
    pub fn with_kind(self, kind: &'static str) -> Self {
        Self {
            kind,
            shared: Arc::default(),
            ..self
        }
    }

    /// Sets how guests' agents behave from now on.
    pub fn set_agent_behavior(&self, behavior: AgentBehavior) {
        *self.behavior.lock().unwrap_or_else(|p| p.into_inner()) = behavior;
    }

    /// Makes the agent of `handle`'s guest hostile from now on: instead of its next
    /// reply it sends a frame header announcing 4 GiB, on connections open now and
    /// later.
    pub fn make_agent_hostile(&self, handle: &VmmHandle) {
        self.hostile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.pid);
    }

    fn is_hostile(&self, pid: u32) -> bool {
        self.hostile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&pid)
    }

    /// Makes the VMM of `handle` exit as if it crashed.
    pub fn crash(&self, handle: &VmmHandle) {
        self.lock().exit(handle.pid, VmmExit::Crashed);
    }

    /// The guest of `handle` reboots in place, as `reboot` in a guest does: the same
    /// VMM boots again with a new boot id, its agent connections break, and what
    /// the agent was told to configure is forgotten (a new boot starts from the
    /// image). Watchers see a reset.
    pub fn guest_reboot(&self, handle: &VmmHandle) {
        let mut shared = self.lock();
        let Some(vmm) = shared.vmms.get_mut(&handle.pid) else {
            return;
        };
        vmm.boots += 1;
        vmm.guest = GuestState::default();
        vmm.console.push_str(&format!(
            "reboot: Restarting system\nfake boot {}\n",
            vmm.boots
        ));
        shared.cut_connections(handle.pid);
        if let Some(watch) = shared.watches.get(&handle.pid) {
            watch.reset();
        }
    }

    /// The guest of `handle` powers itself off (`poweroff` in the guest).
    pub fn guest_poweroff(&self, handle: &VmmHandle) {
        let mut shared = self.lock();
        if let Some(vmm) = shared.vmms.get_mut(&handle.pid) {
            vmm.console.push_str("reboot: Power down\n");
        }
        shared.exit(handle.pid, VmmExit::PowerOff);
    }

    /// The guest kernel of `handle` panics; the VMM reports it and exits, its
    /// console ending with the panic.
    pub fn guest_panic(&self, handle: &VmmHandle) {
        let mut shared = self.lock();
        if let Some(vmm) = shared.vmms.get_mut(&handle.pid) {
            vmm.console
                .push_str("Kernel panic - not syncing: sysrq triggered crash\n");
        }
        shared.exit(handle.pid, VmmExit::Panic);
    }

    /// Makes the VMM of `handle` stop answering (as a QEMU that was sent SIGSTOP):
    /// `info` and `attach` never return until [`FakeHypervisor::unhang`].
    pub fn hang(&self, handle: &VmmHandle) {
        self.lock().hung.insert(handle.pid);
    }

    /// Makes a VMM hung with [`FakeHypervisor::hang`] answer again.
    pub fn unhang(&self, handle: &VmmHandle) {
        self.lock().hung.remove(&handle.pid);
    }

    /// Waits while the VMM `pid` is hung.
    async fn answer(&self, pid: u32) {
        while self.lock().hung.contains(&pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the guest of the VMM `pid` was told to configure, if it runs.
    pub fn guest(&self, pid: u32) -> Option<GuestState> {
        self.lock().vmms.get(&pid).map(|v| v.guest.clone())
    }

    /// The machine config the VMM `pid` was started with, if it runs.
    pub fn machine_config(&self, pid: u32) -> Option<MachineConfig> {
        self.lock().vmms.get(&pid).map(|v| v.config.clone())
    }

    /// Pids of the VMMs that run.
    pub fn running(&self) -> Vec<u32> {
        self.lock().vmms.keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, op: &'static str) -> Result<(), HypervisorError> {
        self.faults.check(op).map_err(|f| HypervisorError::Refused {
            operation: op,
            message: f.to_string(),
        })
    }

    /// Refuses another backend's handle, as the real backends do.
    fn owns(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        if handle.backend == self.kind {
            Ok(())
        } else {
            Err(HypervisorError::InvalidConfig(format!(
                "the handle belongs to the {} backend, not {}",
                handle.backend, self.kind
            )))
        }
    }

    /// Fails `operation` on the VM of `run_dir` (named after its id) as
    /// [`Faults::break_op`] broke it, if it did; a timeout after 10 s (of tokio's
    /// clock: a test with paused time does not wait).
    async fn broken(&self, operation: &'static str, run_dir: &Path) -> Result<(), HypervisorError> {
        let vm = run_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match self.faults.broken(operation, vm) {
            None => Ok(()),
            Some(Breakage::Timeout) => {
                let timeout = Duration::from_secs(10);
                tokio::time::sleep(timeout).await;
                Err(HypervisorError::Timeout { operation, timeout })
            }
            Some(_) => Err(HypervisorError::io(
                format!("{operation} failed (injected)"),
                std::io::Error::from(std::io::ErrorKind::ResourceBusy),
            )),
        }
    }

    fn with_vmm<T>(
        &self,
        handle: &VmmHandle,
        f: impl FnOnce(&mut FakeVmm) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        self.owns(handle)?;
        let mut shared = self.lock();
        let vmm = shared
            .vmms
            .get_mut(&handle.pid)
            .ok_or(HypervisorError::NotRunning { pid: handle.pid })?;
        f(vmm)
    }

    fn spawn(&self, config: &MachineConfig, vmm: FakeVmm) -> VmmHandle {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let mut shared = self.lock();
        shared.vmms.insert(pid, vmm);
        shared.watches.insert(pid, VmmWatch::channel().0);
        drop(shared);
        VmmHandle {
            backend: self.kind.to_owned(),
            pid,
            pid_start: u64::from(pid),
            run_dir: config.run_dir.clone(),
            control_socket: config.run_dir.join("fake.sock"),
            agent_socket: config.run_dir.join("agent.sock"),
        }
    }
}

fn validate(config: &MachineConfig) -> Result<(), HypervisorError> {
    if config.disks.is_empty() {
        return Err(HypervisorError::InvalidConfig("no root disk".into()));
    }
    if config.vcpus == 0 || config.vcpus > config.max_vcpus.max(config.vcpus) {
        return Err(HypervisorError::InvalidConfig(
            "vcpus must be at least 1".into(),
        ));
    }
    if config.memory_mib < 64 {
        return Err(HypervisorError::InvalidConfig("memory below 64 MiB".into()));
    }
    Ok(())
}

fn refused(operation: &'static str, state: VmmState) -> HypervisorError {
    HypervisorError::Refused {
        operation,
        message: format!("the VM is {state:?}"),
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn capabilities(&self) -> HypervisorCapabilities {
        HypervisorCapabilities {
            pause: true,
            resize_vcpus: true,
            resize_memory: true,
            snapshot: true,
            disk_formats: vec![DiskFormat::Raw, DiskFormat::Qcow2],
        }
    }

    async fn start(&self, config: &MachineConfig) -> Result<VmmHandle, HypervisorError> {
        self.check("hypervisor.start")?;
        validate(config)?;
        Ok(self.spawn(
            config,
            FakeVmm {
                config: config.clone(),
                state: VmmState::Running,
                vcpus: config.vcpus,
                memory_mib: config.memory_mib,
                console: format!("fake boot of {}\n", config.name),
                guest: GuestState::default(),
                boots: 1,
            },
        ))
    }

    async fn attach(&self, handle: &VmmHandle) -> Result<VmmState, HypervisorError> {
        self.owns(handle)?;
        self.answer(handle.pid).await;
        // A gone VMM is proven gone whatever else is broken.
        self.with_vmm(handle, |_| Ok(()))?;
        self.broken("hypervisor.attach", &handle.run_dir).await?;
        self.with_vmm(handle, |v| Ok(v.state))
    }

    async fn info(&self, handle: &VmmHandle) -> Result<VmmInfo, HypervisorError> {
        self.owns(handle)?;
        self.answer(handle.pid).await;
        let shared = self.lock();
        Ok(match shared.vmms.get(&handle.pid) {
            Some(v) => VmmInfo {
                state: v.state,
                pid: handle.pid,
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
            },
            None => VmmInfo {
                state: VmmState::Exited,
                pid: handle.pid,
                vcpus: 0,
                memory_mib: 0,
            },
        })
    }

    async fn shutdown(&self, handle: &VmmHandle, _grace: Duration) -> Result<(), HypervisorError> {
        self.owns(handle)?;
        self.check("hypervisor.shutdown")?;
        self.lock().exit(handle.pid, VmmExit::Killed);
        Ok(())
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        self.owns(handle)?;
        self.check("hypervisor.kill")?;
        self.broken("hypervisor.kill", &handle.run_dir).await?;
        self.lock().exit(handle.pid, VmmExit::Killed);
        Ok(())
    }

    async fn pause(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        self.with_vmm(handle, |v| match v.state {
            VmmState::Running => {
                v.state = VmmState::Paused;
                Ok(())
            }
            s => Err(refused("pause", s)),
        })
    }

    async fn resume(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        self.with_vmm(handle, |v| match v.state {
            VmmState::Paused => {
                v.state = VmmState::Running;
                Ok(())
            }
            s => Err(refused("resume", s)),
        })
    }

    async fn resize(&self, handle: &VmmHandle, resize: Resize) -> Result<(), HypervisorError> {
        self.with_vmm(handle, |v| {
            if let Some(vcpus) = resize.vcpus {
                if vcpus == 0 || vcpus > v.config.max_vcpus {
                    return Err(HypervisorError::Refused {
                        operation: "resize",
                        message: format!("vcpus must be 1..={}", v.config.max_vcpus),
                    });
                }
                v.vcpus = vcpus;
            }
            if let Some(mem) = resize.memory_mib {
                v.memory_mib = mem;
            }
            Ok(())
        })
    }

    async fn snapshot(&self, handle: &VmmHandle, dir: &Path) -> Result<(), HypervisorError> {
        let vmm = self.with_vmm(handle, |v| match v.state {
            VmmState::Paused => Ok(v.clone()),
            s => Err(refused("snapshot", s)),
        })?;
        self.lock().snapshots.insert(dir.to_owned(), vmm);
        Ok(())
    }

    async fn restore(
        &self,
        config: &MachineConfig,
        dir: &Path,
    ) -> Result<VmmHandle, HypervisorError> {
        let snapshot =
            self.lock()
                .snapshots
                .get(dir)
                .cloned()
                .ok_or_else(|| HypervisorError::Refused {
                    operation: "restore",
                    message: format!("no snapshot in {}", dir.display()),
                })?;
        Ok(self.spawn(
            config,
            FakeVmm {
                config: config.clone(),
                state: VmmState::Paused,
                ..snapshot
            },
        ))
    }

    async fn connect_agent(&self, handle: &VmmHandle) -> Result<AgentStream, HypervisorError> {
        let state = self.with_vmm(handle, |v| Ok(v.state))?;
        if state != VmmState::Running {
            return Err(refused("connect_agent", state));
        }
        let behavior = *self.behavior.lock().unwrap_or_else(|p| p.into_inner());
        let (host, guest) = tokio::io::duplex(64 * 1024);
        match behavior {
            AgentBehavior::Absent => {
                return Err(HypervisorError::io(
                    "connecting to the agent",
                    std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                ));
            }
            AgentBehavior::Silent => {
                // Hold the guest end open and never read it.
                tokio::spawn(async move {
                    let _guest = guest;
                    std::future::pending::<()>().await;
                });
            }
            AgentBehavior::Healthy => {
                let agent = Arc::new(FakeAgent {
                    hostname: handle_name(self, handle),
                    hypervisor: self.clone(),
                    pid: handle.pid,
                });
                let (inner, agent_end) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let _ = vmkit_guest::serve(agent_end, agent, ServerConfig::default()).await;
                });
                let relay = tokio::spawn(relay(guest, inner, self.clone(), handle.pid));
                self.lock()
                    .connections
                    .entry(handle.pid)
                    .or_default()
                    .push(relay.abort_handle());
            }
        }
        Ok(Box::new(host))
    }

    async fn console_tail(
        &self,
        handle: &VmmHandle,
        max_bytes: usize,
    ) -> Result<String, HypervisorError> {
        let console = {
            let shared = self.lock();
            shared
                .vmms
                .get(&handle.pid)
                .map(|v| v.console.clone())
                .or_else(|| shared.exited.get(&handle.pid).cloned())
                .unwrap_or_default()
        };
        let start = console.len().saturating_sub(max_bytes);
        Ok(console.get(start..).map(str::to_owned).unwrap_or(console))
    }

    async fn cleanup(&self, handle: &VmmHandle) -> Result<(), HypervisorError> {
        self.owns(handle)?;
        self.check("hypervisor.cleanup")?;
        self.broken("hypervisor.cleanup", &handle.run_dir).await?;
        let mut shared = self.lock();
        if shared.vmms.contains_key(&handle.pid) {
            return Err(HypervisorError::Refused {
                operation: "cleanup",
                message: "the VMM still runs".into(),
            });
        }
        shared.exited.remove(&handle.pid);
        shared.watches.remove(&handle.pid);
        shared.connections.remove(&handle.pid);
        Ok(())
    }

    async fn watch(&self, handle: &VmmHandle) -> Result<VmmWatch, HypervisorError> {
        self.owns(handle)?;
        let shared = self.lock();
        match shared.watches.get(&handle.pid) {
            Some(watch) => Ok(watch.subscribe()),
            None => Err(HypervisorError::NotRunning { pid: handle.pid }),
        }
    }

    async fn discard(&self, run_dir: &Path) -> Result<(), HypervisorError> {
        self.check("hypervisor.discard")?;
        self.broken("hypervisor.discard", run_dir).await?;
        let mut shared = self.lock();
        let pids: Vec<u32> = shared
            .vmms
            .iter()
            .filter(|(_, v)| v.config.run_dir == run_dir)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in pids {
            shared.exit(pid, VmmExit::Killed);
            shared.exited.remove(&pid);
        }
        drop(shared);
        // The fake makes no run directories, but one made for it goes as the
        // contract says.
        match std::fs::remove_dir_all(run_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HypervisorError::io(
                format!("cannot remove {}", run_dir.display()),
                e,
            )),
        }
    }
}

/// Carries bytes between the host's end and the fake agent, unless the guest turned
/// hostile: then the agent's next reply is replaced by an absurd frame header.
async fn relay(
    host: tokio::io::DuplexStream,
    agent: tokio::io::DuplexStream,
    hv: FakeHypervisor,
    pid: u32,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut host_rx, mut host_tx) = tokio::io::split(host);
    let (mut agent_rx, mut agent_tx) = tokio::io::split(agent);
    let to_agent = async move {
        let _ = tokio::io::copy(&mut host_rx, &mut agent_tx).await;
    };
    let to_host = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match agent_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk: &[u8] = if hv.is_hostile(pid) {
                &[0xff, 0xff, 0xff, 0xff, b'{']
            } else {
                &buf[..n]
            };
            if host_tx.write_all(chunk).await.is_err() || hv.is_hostile(pid) {
                return;
            }
        }
    };
    tokio::join!(to_agent, to_host);
}

fn handle_name(hv: &FakeHypervisor, handle: &VmmHandle) -> String {
    hv.lock()
        .vmms
        .get(&handle.pid)
        .map(|v| v.config.name.to_string())
        .unwrap_or_default()
}

/// The fake guest's agent.
struct FakeAgent {
    hostname: String,
    hypervisor: FakeHypervisor,
    pid: u32,
}

#[async_trait]
impl Handler for FakeAgent {
    async fn hello(&self) -> HelloInfo {
        HelloInfo::new(
            "fake",
            self.boot_id().unwrap_or_default(),
            "fake",
            std::env::consts::ARCH,
        )
    }

    async fn exec(&self, req: ExecRequest, out: OutputSink) -> Result<ExitStatus, String> {
        let exit = ExitStatus::exited;
        let args: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        match args.as_slice() {
            [] => Err("empty argv".to_owned()),
            ["echo", rest @ ..] => {
                out.stdout(format!("{}\n", rest.join(" ")).as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exit(0))
            }
            ["cat"] => {
                out.stdout(&req.stdin).await.map_err(|e| e.to_string())?;
                Ok(exit(0))
            }
            ["cat", path] => match self.file(path) {
                Some(text) => {
                    out.stdout(text.as_bytes())
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(exit(0))
                }
                None => {
                    out.stderr(format!("cat: {path}: No such file or directory\n").as_bytes())
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(exit(1))
                }
            },
            ["hostname"] => {
                out.stdout(format!("{}\n", self.hostname).as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exit(0))
            }
            ["uname", ..] => {
                out.stdout(b"Linux fake\n")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exit(0))
            }
            ["true"] => Ok(exit(0)),
            ["false"] => Ok(exit(1)),
            ["exit", code] => Ok(exit(code.parse().unwrap_or(2))),
            ["sleep", secs] => {
                let secs: f64 = secs.parse().map_err(|_| "sleep: bad number".to_owned())?;
                let wanted = Duration::from_secs_f64(secs.max(0.0));
                match req.timeout_ms.map(Duration::from_millis) {
                    Some(limit) if limit < wanted => {
                        tokio::time::sleep(limit).await;
                        Ok(ExitStatus::killed(9).after_timeout())
                    }
                    _ => {
                        tokio::time::sleep(wanted).await;
                        Ok(exit(0))
                    }
                }
            }
            [cmd, ..] => {
                out.stderr(format!("{cmd}: command not found\n").as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exit(127))
            }
        }
    }

    async fn shutdown(&self, _reboot: bool) -> Result<(), String> {
        self.hypervisor.lock().exit(self.pid, VmmExit::PowerOff);
        Ok(())
    }

    async fn configure_network(&self, config: vmkit_guest::NetworkConfig) -> Result<(), String> {
        self.configure("agent.configure_network", |g| g.network = Some(config))
    }

    async fn set_hostname(&self, hostname: String) -> Result<(), String> {
        self.configure("agent.set_hostname", |g| g.hostname = Some(hostname))
    }

    async fn install_ssh_keys(
        &self,
        user: Option<String>,
        keys: Vec<String>,
    ) -> Result<(), String> {
        if user.is_some() {
            return Err("the fake guest has only its default user".to_owned());
        }
        self.configure("agent.install_ssh_keys", |g| g.ssh_keys = keys)
    }

    /// The fake guest has no SSH server, and only root.
    async fn ssh_info(&self) -> Result<vmkit_guest::SshInfo, String> {
        Ok(vmkit_guest::SshInfo::new(Vec::new(), None, false))
    }

    /// A session runs `cat` (its input to its output until the input ends; INT
    /// ends it by that signal, a hang-up by HUP), `echo ARGS` and `hostname`;
    /// anything else is not found (127), as a shell says. A connection to the
    /// guest's loopback ([`SessionRequest::connect`](vmkit_guest::SessionRequest::connect))
    /// finds a web server on [`FAKE_LOOPBACK_HTTP_PORT`] only, which answers one
    /// request with `200` and `loopback app on port N`, after the request's
    /// `X-Vmkit-User` and `X-Vmkit-User-Id` headers (lowercase, one a line).
    async fn session(
        &self,
        req: vmkit_guest::SessionRequest,
        input: vmkit_guest::SessionInput,
        out: OutputSink,
    ) -> Result<ExitStatus, String> {
        let args: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        let write = |e: vmkit_guest::OutputClosed| e.to_string();
        if let Some(port) = req.connect {
            if port != FAKE_LOOPBACK_HTTP_PORT {
                return Err(format!("nothing answers on port {port} in the guest"));
            }
            let (mut stdin, _controls) = input.split();
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stdin.next().await {
                    Some(data) => head.extend_from_slice(&data),
                    None => return Ok(ExitStatus::exited(0)),
                }
            }
            // The identity headers the edge added come first, one a line, so that
            // an end-to-end test sees them.
            let head = String::from_utf8_lossy(&head);
            let mut body = String::new();
            for line in head.lines() {
                let lower = line.to_ascii_lowercase();
                if lower.starts_with("x-vmkit-user:") || lower.starts_with("x-vmkit-user-id:") {
                    body.push_str(&lower);
                    body.push('\n');
                }
            }
            body.push_str(&format!("loopback app on port {port}"));
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            out.stdout(response.as_bytes()).await.map_err(write)?;
            return Ok(ExitStatus::exited(0));
        }
        match args.as_slice() {
            ["cat"] => {
                let (mut stdin, mut controls) = input.split();
                loop {
                    tokio::select! {
                        data = stdin.next() => match data {
                            Some(data) => out.stdout(&data).await.map_err(write)?,
                            None => return Ok(ExitStatus::exited(0)),
                        },
                        control = controls.next() => match control {
                            Some(vmkit_guest::SessionControl::Signal(name)) if name == "INT" => {
                                return Ok(ExitStatus::killed(libc::SIGINT));
                            }
                            Some(_) => {}
                            None => return Ok(ExitStatus::killed(libc::SIGHUP)),
                        },
                    }
                }
            }
            ["echo", rest @ ..] => {
                out.stdout(format!("{}\n", rest.join(" ")).as_bytes())
                    .await
                    .map_err(write)?;
                Ok(ExitStatus::exited(0))
            }
            ["hostname"] => {
                out.stdout(format!("{}\n", self.hostname).as_bytes())
                    .await
                    .map_err(write)?;
                Ok(ExitStatus::exited(0))
            }
            _ => {
                let program = args.first().copied().unwrap_or("sh");
                out.stderr(format!("{program}: not found\n").as_bytes())
                    .await
                    .map_err(write)?;
                Ok(ExitStatus::exited(127))
            }
        }
    }

    /// Counts the request; the fake guest's filesystems always fill their disks.
    /// Not a fault step: the manager asks best effort, and a failure changes nothing.
    async fn grow_filesystems(&self) -> Result<vmkit_guest::GrowReport, String> {
        let mut shared = self.hypervisor.lock();
        let vmm = shared
            .vmms
            .get_mut(&self.pid)
            .ok_or_else(|| "the VM is gone".to_owned())?;
        vmm.guest.grow_requests += 1;
        Ok(vmkit_guest::GrowReport::default())
    }

    /// A unit's journal is three lines naming the unit; the only file is
    /// `/etc/hostname`. With `follow`, nothing new is ever written: the stream stays
    /// open until the host cancels it.
    async fn logs(&self, req: vmkit_guest::LogsRequest, out: OutputSink) -> Result<(), String> {
        let all: Vec<String> = match &req.source {
            vmkit_guest::LogSource::Unit(unit) => {
                (1..=3).map(|i| format!("{unit}: fake line {i}")).collect()
            }
            vmkit_guest::LogSource::File(path) if path == "/etc/hostname" => {
                vec![self.hostname.clone()]
            }
            vmkit_guest::LogSource::File(path) => {
                return Err(format!("cannot open {path}: No such file or directory"));
            }
            _ => return Err("unknown log source".to_owned()),
        };
        let from = all.len().saturating_sub(req.lines as usize);
        out.lines(&all[from..]).await.map_err(|e| e.to_string())?;
        if req.follow {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    /// An idle guest: no CPU use, half its memory in use, a tenth of its disk.
    async fn metrics(&self, _interval: Duration) -> Result<vmkit_guest::Metrics, String> {
        let memory_mib = self
            .hypervisor
            .lock()
            .vmms
            .get(&self.pid)
            .map(|v| v.memory_mib)
            .ok_or_else(|| "the VM is gone".to_owned())?;
        let mut metrics = vmkit_guest::Metrics::default();
        metrics.mem_total_bytes = memory_mib << 20;
        metrics.mem_available_bytes = memory_mib << 19;
        metrics.mem_pct = 50.0;
        metrics.disk_pct = 10.0;
        Ok(metrics)
    }
}

impl FakeAgent {
    /// The boot id of the guest's current boot: it changes with every reboot.
    fn boot_id(&self) -> Option<String> {
        let shared = self.hypervisor.lock();
        let vmm = shared.vmms.get(&self.pid)?;
        Some(format!("fake-boot-{}-{}", self.pid, vmm.boots))
    }

    /// The contents of a file the agent wrote, if it wrote `path`.
    fn file(&self, path: &str) -> Option<String> {
        let guest = self.hypervisor.guest(self.pid)?;
        let lines = match path {
            "/proc/sys/kernel/random/boot_id" => vec![self.boot_id()?],
            "/etc/hostname" => vec![guest.hostname?],
            "/root/.ssh/authorized_keys" => guest.ssh_keys,
            _ => return None,
        };
        Some(lines.iter().map(|line| format!("{line}\n")).collect())
    }

    fn configure(&self, op: &'static str, f: impl FnOnce(&mut GuestState)) -> Result<(), String> {
        self.hypervisor
            .faults
            .check(op)
            .map_err(|e| e.to_string())?;
        let mut shared = self.hypervisor.lock();
        let vmm = shared
            .vmms
            .get_mut(&self.pid)
            .ok_or_else(|| "the VM is gone".to_owned())?;
        f(&mut vmm.guest);
        Ok(())
    }
}
