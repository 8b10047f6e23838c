//! The VM lifecycle manager: the one owner of every VM's state machine.
//!
//! Every operation is a command on one VM. Commands on the same VM are serialised
//! by a per-name lock; commands on different VMs run in parallel. Every resource a
//! command takes is written to the VM's record as soon as it exists, so that a
//! failure (or a crash of the process) can be undone step by step.
//!
//! What the guests do by themselves (reboot, power off, panic) reaches the manager
//! through [`Manager::supervise`], which an embedder runs beside it (the daemon
//! does); [`Manager::check_vmms`] polls as a safety net.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OwnedMutexGuard, broadcast};
use tracing::{debug, info, warn};
use vmkit_guest::{Client, ClientConfig, ExecRequest, ExecStream, HelloInfo, NetworkConfig};

use crate::confine::ConfinementConfig;
use crate::error::{ErrorChain, ManagerError};
use crate::event::{Event, EventKind, EventRetention, NewEvent};
use crate::hypervisor::{
    DiskConfig, Hypervisor, MachineConfig, NicConfig, VmmExit, VmmHandle, VmmState,
};
use crate::image::ImageCatalog;
use crate::name::VmName;
use crate::network::Network;
use crate::quota::Quota;
use crate::spec::{SpecLimits, VmSpec};
use crate::state::VmState;
use crate::storage::{Storage, Volume};
use crate::store::StateStore;
use crate::time::Timestamp;
use crate::user::UserId;
use crate::vm::{Health, VmId, VmRecord};

mod confine;
mod events;
mod keys;
mod ops;
mod reconcile;
mod snapshots;
mod supervise;
mod users;

pub use events::EventFeed;
pub use ops::{ResizeRequest, VmMetrics};
pub use reconcile::{ExitPolicy, ReconcileFailure, ReconcileReport};
pub use users::{NewUser, Registration, RegistrationPolicy, VmDisposition};

/// How the manager behaves. Build with [`ManagerConfig::new`] and the setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ManagerConfig {
    /// Root of vmkit's files; VM run directories live in `<data_dir>/run/<vm-id>`.
    pub data_dir: PathBuf,
    /// The largest VM this host accepts.
    pub spec_limits: SpecLimits,
    /// Quota of users who have none set.
    pub default_quota: Quota,
    /// How long a booting guest has to answer the agent's hello.
    pub boot_timeout: Duration,
    /// How long a guest has to shut down when asked before it is stopped by force.
    pub shutdown_grace: Duration,
    /// Timeout of a single agent call.
    pub agent_timeout: Duration,
    /// How long [`Manager::check_vmms`] waits for one VMM to report its state
    /// before it gives up on that VM (for this round).
    pub vmm_check_timeout: Duration,
    /// Largest console log kept per VM, in bytes.
    pub console_limit: u64,
    /// DNS servers handed to guests.
    pub dns: Vec<Ipv4Addr>,
    /// What [`Manager::reconcile`] does with a VM whose VMM died while no daemon
    /// watched it.
    pub on_vmm_exit: ExitPolicy,
    /// What a create request takes for what it leaves out (the API's
    /// [`CreateVm`](crate::api::CreateVm) fields); by default [`VmSpec::default`].
    pub default_spec: VmSpec,
    /// Which events the store keeps ([`EventRetention::default`]: the newest
    /// 100 000, none older than 90 days); applied as events are stored.
    pub event_retention: EventRetention,
    /// Whether and how VMMs are confined: each VM gets a uid of the range at create
    /// and keeps it until it is deleted; its VMMs run as that uid in a cgroup with
    /// these limits. `None` (the default of the library; the daemon turns it on when
    /// it runs as root) runs VMMs as the manager's own user, unconfined. A backend
    /// that cannot confine (not root, no cgroups) refuses to start a VMM.
    pub confinement: Option<ConfinementConfig>,
    /// Who may register themselves ([`Manager::register`]); by default no one
    /// ([`RegistrationPolicy::Closed`]): the operator adds users.
    pub registration: RegistrationPolicy,
}

impl ManagerConfig {
    /// Defaults sized for both real KVM and software emulation (TCG), where a
    /// guest kernel takes several seconds to reach userspace.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            spec_limits: SpecLimits::default(),
            default_quota: Quota::default(),
            boot_timeout: Duration::from_secs(90),
            shutdown_grace: Duration::from_secs(15),
            agent_timeout: Duration::from_secs(10),
            vmm_check_timeout: Duration::from_secs(15),
            console_limit: 1 << 20,
            dns: Vec::new(),
            on_vmm_exit: ExitPolicy::default(),
            default_spec: VmSpec::default(),
            event_retention: EventRetention::default(),
            confinement: None,
            registration: RegistrationPolicy::Closed,
        }
    }

    /// Sets who may register themselves.
    pub fn registration(mut self, policy: RegistrationPolicy) -> Self {
        self.registration = policy;
        self
    }

    /// Confines VMMs as `confinement` says (`None`: unconfined).
    pub fn confinement(mut self, confinement: Option<ConfinementConfig>) -> Self {
        self.confinement = confinement;
        self
    }

    /// Sets the spec limits.
    pub fn spec_limits(mut self, limits: SpecLimits) -> Self {
        self.spec_limits = limits;
        self
    }

    /// Sets the default quota.
    pub fn default_quota(mut self, quota: Quota) -> Self {
        self.default_quota = quota;
        self
    }

    /// Sets the boot timeout.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Sets the shutdown grace period.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Sets the agent call timeout.
    pub fn agent_timeout(mut self, timeout: Duration) -> Self {
        self.agent_timeout = timeout;
        self
    }

    /// Sets how long a VMM check waits for one VMM.
    pub fn vmm_check_timeout(mut self, timeout: Duration) -> Self {
        self.vmm_check_timeout = timeout;
        self
    }

    /// Sets the DNS servers handed to guests.
    pub fn dns(mut self, dns: Vec<Ipv4Addr>) -> Self {
        self.dns = dns;
        self
    }

    /// Sets what reconcile does with VMs whose VMM died.
    pub fn on_vmm_exit(mut self, policy: ExitPolicy) -> Self {
        self.on_vmm_exit = policy;
        self
    }

    /// Sets the defaults of create requests (the image, above all).
    pub fn default_spec(mut self, spec: VmSpec) -> Self {
        self.default_spec = spec;
        self
    }

    /// Sets which events the store keeps.
    pub fn event_retention(mut self, retention: EventRetention) -> Self {
        self.event_retention = retention;
        self
    }

    /// The directory holding every VM's run directory.
    pub fn run_root(&self) -> PathBuf {
        self.data_dir.join("run")
    }

    /// The run directory of `vm`.
    pub fn run_dir(&self, vm: VmId) -> PathBuf {
        self.run_root().join(vm.to_string())
    }
}

/// The backends a manager drives. The network is optional: without one, VMs get no
/// NIC.
///
/// A VM is driven for its whole life by the hypervisor backend that created it
/// (recorded in [`VmRecord::hypervisor`]). New VMs get [`Backends::hypervisor`];
/// the backends added with [`Backends::with_other_hypervisor`] drive the VMs that
/// they created earlier, e.g. before the host's default backend changed. A VM whose
/// backend is in neither is refused with a clear error, never handed to another.
#[derive(Clone)]
#[non_exhaustive]
pub struct Backends {
    /// Starts new VMMs, and drives the VMs it created.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Further backends, by [`Hypervisor::kind`]: each drives the VMs it created.
    pub other_hypervisors: Vec<Arc<dyn Hypervisor>>,
    /// Holds volumes.
    pub storage: Arc<dyn Storage>,
    /// Gives VMs a network, if present.
    pub network: Option<Arc<dyn Network>>,
    /// Durable state.
    pub store: Arc<dyn StateStore>,
    /// Finds images by name.
    pub images: Arc<dyn ImageCatalog>,
}

impl Backends {
    /// Backends without a network.
    pub fn new(
        hypervisor: Arc<dyn Hypervisor>,
        storage: Arc<dyn Storage>,
        store: Arc<dyn StateStore>,
        images: Arc<dyn ImageCatalog>,
    ) -> Self {
        Self {
            hypervisor,
            other_hypervisors: Vec::new(),
            storage,
            network: None,
            store,
            images,
        }
    }

    /// Adds a backend that drives the VMs it created (new VMs still get
    /// [`Backends::hypervisor`]). One of the same kind as the default, or as one
    /// added before, is ignored: the first of a kind wins.
    pub fn with_other_hypervisor(mut self, hypervisor: Arc<dyn Hypervisor>) -> Self {
        if self.hypervisor_of(hypervisor.kind()).is_none() {
            self.other_hypervisors.push(hypervisor);
        }
        self
    }

    /// The backend of kind `kind` ([`Hypervisor::kind`]), if these backends have it.
    pub fn hypervisor_of(&self, kind: &str) -> Option<&Arc<dyn Hypervisor>> {
        self.hypervisors().find(|h| h.kind() == kind)
    }

    /// Every hypervisor backend, the default first.
    pub fn hypervisors(&self) -> impl Iterator<Item = &Arc<dyn Hypervisor>> {
        std::iter::once(&self.hypervisor).chain(&self.other_hypervisors)
    }

    /// Adds a network backend.
    pub fn with_network(mut self, network: Arc<dyn Network>) -> Self {
        self.network = Some(network);
        self
    }
}

/// A request to create a VM.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CreateRequest {
    /// Name; a readable one is generated when `None`.
    pub name: Option<VmName>,
    /// Owner.
    pub owner: UserId,
    /// What to create.
    pub spec: VmSpec,
    /// Disks to start from instead of the image's: a clone.
    pub from: Option<CloneSource>,
}

/// Where a clone's disks come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CloneSource {
    /// An existing VM's disks (a running VM is paused while they are copied).
    Vm(VmName),
    /// A snapshot's disks.
    Snapshot(VmName),
}

impl CreateRequest {
    /// A request for `spec` owned by `owner` with a generated name.
    pub fn new(owner: UserId, spec: VmSpec) -> Self {
        Self {
            name: None,
            owner,
            spec,
            from: None,
        }
    }

    /// Sets the name.
    pub fn name(mut self, name: VmName) -> Self {
        self.name = Some(name);
        self
    }
}

/// Options of a delete.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct DeleteOptions {
    /// Keep the data volume (its record is dropped; the file stays for the operator).
    pub keep_data: bool,
}

impl DeleteOptions {
    /// Keeps the data volume (or not): `DeleteOptions::default().keep_data(true)`.
    pub fn keep_data(mut self, keep: bool) -> Self {
        self.keep_data = keep;
        self
    }
}

/// What a delete left behind: with [`DeleteOptions::keep_data`], the data volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Deleted {
    /// The VM that is gone.
    pub name: VmName,
    /// Where its data volume now lives (a file or a device node that vmkit no longer
    /// manages) when the delete kept it; `None` when it kept nothing or the VM had no
    /// data volume. An earlier, interrupted delete that kept it already recorded the
    /// place in its [`EventKind::DataKept`] event instead.
    pub kept_data: Option<PathBuf>,
}

/// The VM lifecycle manager. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    config: ManagerConfig,
    backends: Backends,
    locks: StdMutex<HashMap<VmName, Arc<Mutex<()>>>>,
    /// One lock per snapshot name, taken after the VM's lock where both are held:
    /// a delete of a snapshot waits for a restore or a clone from it.
    snapshot_locks: StdMutex<HashMap<VmName, Arc<Mutex<()>>>>,
    agents: StdMutex<HashMap<VmId, Client>>,
    /// One connection attempt per VM at a time: a VMM's agent channel may serve a
    /// single client (QEMU's virtio-serial socket does), so a second concurrent
    /// connect would wait behind the first and time out.
    connecting: StdMutex<HashMap<VmId, Arc<Mutex<()>>>>,
    /// Each VM's guest boot as its agent last said hello: a reboot is over when the
    /// agent says hello with another boot id.
    boots: StdMutex<HashMap<VmId, Boot>>,
    /// VMs whose guest rebooted and whose agent is not back yet: the agent checks
    /// leave them to the reboot.
    rebooting: StdMutex<HashSet<VmId>>,
    events: broadcast::Sender<Event>,
    /// VMMs found alive that could not be driven (attach failed without proof of
    /// death), by VM: left running and re-attached later (see
    /// [`Manager::retry_unreachable`]). A mark counts only while the VM's record
    /// still holds that handle.
    unreachable: StdMutex<HashMap<VmId, VmmHandle>>,
    /// Serialises changes of SSH keys, so that of two adds of one key one is told
    /// it exists.
    keys: Mutex<()>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("hypervisor", &self.inner.backends.hypervisor.kind())
            .field("data_dir", &self.inner.config.data_dir)
            .finish_non_exhaustive()
    }
}

/// A guest boot, as its agent said hello.
#[derive(Clone, Debug)]
struct Boot {
    /// The guest kernel's boot id.
    id: String,
    /// The guest resets its VMM had reported by then ([`crate::VmmEvents::resets`]),
    /// when it reports them: the resets up to this boot need no reaction.
    resets: Option<u64>,
}

/// Undo actions for the steps of a create, run in reverse on failure.
enum Undo {
    Uid(VmId),
    Volume(Volume),
    Lease(VmId),
    Tap(VmId),
    Vmm(VmmHandle),
}

const RUNNING_OR_PAUSED: &[VmState] = &[VmState::Running, VmState::Paused];
const STOPPED: &[VmState] = &[VmState::Stopped];
const PAUSED: &[VmState] = &[VmState::Paused];
const RUNNING: &[VmState] = &[VmState::Running];
const RESTARTABLE: &[VmState] = &[VmState::Running, VmState::Paused, VmState::Stopped];

impl Manager {
    /// Builds a manager and sets up host networking if there is a network backend.
    pub async fn new(config: ManagerConfig, backends: Backends) -> Result<Self, ManagerError> {
        if let Some(network) = &backends.network {
            network.setup_host().await?;
        }
        let (events, _) = broadcast::channel(1024);
        let manager = Self {
            inner: Arc::new(Inner {
                config,
                backends,
                locks: StdMutex::new(HashMap::new()),
                snapshot_locks: StdMutex::new(HashMap::new()),
                agents: StdMutex::new(HashMap::new()),
                connecting: StdMutex::new(HashMap::new()),
                boots: StdMutex::new(HashMap::new()),
                rebooting: StdMutex::new(HashSet::new()),
                events,
                unreachable: StdMutex::new(HashMap::new()),
                keys: Mutex::new(()),
            }),
        };
        manager.secure_data_dir()?;
        Ok(manager)
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// The backends.
    pub fn backends(&self) -> &Backends {
        &self.inner.backends
    }

    /// A VM by name.
    pub async fn get(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        self.inner
            .backends
            .store
            .get_vm(name)
            .await?
            .ok_or_else(|| ManagerError::NotFound(name.clone()))
    }

    /// VMs by name; only `owner`'s when given.
    pub async fn list(&self, owner: Option<UserId>) -> Result<Vec<VmRecord>, ManagerError> {
        Ok(self.inner.backends.store.list_vms(owner).await?)
    }

    /// Creates a VM and returns once its agent answered. Quotas are checked before
    /// anything is taken; on failure every step taken is undone in reverse order and
    /// no record remains.
    pub async fn create(&self, request: CreateRequest) -> Result<VmRecord, ManagerError> {
        let b = &self.inner.backends;
        request.spec.validate(&self.inner.config.spec_limits)?;
        let image = b.images.resolve(&request.spec.image).await?;
        let quota = self.quota_of(request.owner).await?;
        let name = match request.name {
            Some(name) => name,
            None => self.free_name().await?,
        };
        let _guard = self.lock(&name).await;
        let mut vm = VmRecord::new(name, request.owner, request.spec);
        // A clone runs on its source's backend (its disk formats and saved memory
        // are that backend's); a fresh VM on the default.
        vm.hypervisor = Some(match &request.from {
            Some(source) => self.backend_of_source(source).await?,
            None => b.hypervisor.kind().to_owned(),
        });
        b.store.create_vm(&vm, &quota).await?;
        info!(vm = %vm.name, id = %vm.id, "creating VM");
        self.emit(NewEvent::vm(vm.id, &vm.name, EventKind::Creating))
            .await;

        let mut undo = Vec::new();
        let created = match self
            .create_steps(&mut vm, &image, request.from.as_ref(), &quota, &mut undo)
            .await
        {
            Ok(()) => {
                vm.health = Health::Healthy;
                self.set_state(&mut vm, VmState::Running).await
            }
            Err(error) => Err(error),
        };
        match created {
            Ok(()) => Ok(vm),
            Err(error) => {
                warn!(vm = %vm.name, error = %ErrorChain(&error), "create failed; rolling back");
                self.rollback(&vm, undo).await;
                if let Err(e) = b.store.delete_vm(vm.id).await {
                    warn!(vm = %vm.name, error = %e, "cannot remove the record of a failed create");
                }
                self.emit(NewEvent::vm(
                    vm.id,
                    &vm.name,
                    EventKind::CreateFailed {
                        error: ErrorChain(&error).to_string(),
                    },
                ))
                .await;
                Err(error)
            }
        }
    }

    async fn create_steps(
        &self,
        vm: &mut VmRecord,
        image: &crate::image::Image,
        from: Option<&CloneSource>,
        quota: &Quota,
        undo: &mut Vec<Undo>,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        // The VMM's uid first: the disks are handed to it at every start, and it is
        // released last.
        if self.inner.config.confinement.is_some() {
            undo.push(Undo::Uid(vm.id));
            self.ensure_uid(vm).await?;
        }
        match from {
            None => {
                let formats = self.hv(vm)?.capabilities().disk_formats;
                let base = b.storage.import_image(image).await?;
                let mut root = b.storage.clone_root(vm.id, &base, &formats).await?;
                undo.push(Undo::Volume(root.clone()));
                vm.resources.root = Some(root.clone());
                // The root disk counts at its size, which is the image's when the
                // spec asks for less: checked again now that it is known.
                self.save_within_quota(vm, quota).await?;
                let root_bytes = vm.spec.root_gib << 30;
                if root_bytes > root.size_bytes {
                    root = b.storage.resize(&root, root_bytes).await?;
                    vm.resources.root = Some(root);
                    self.save(vm).await?;
                }
                if vm.spec.disk_gib > 0 {
                    let data = b.storage.create_data(vm.id, vm.spec.disk_gib << 30).await?;
                    undo.push(Undo::Volume(data.clone()));
                    vm.resources.data = Some(data);
                    self.save(vm).await?;
                }
            }
            Some(source) => self.copy_disks_from(vm, source, quota, undo).await?,
        }

        if let Some(network) = &b.network {
            let lease = b.store.allocate_lease(vm.id, &network.pool()).await?;
            undo.push(Undo::Lease(vm.id));
            vm.resources.lease = Some(lease.clone());
            self.save(vm).await?;
            // Record the intent before the TAP exists, so a crash in between still
            // leaves a record pointing at it.
            undo.push(Undo::Tap(vm.id));
            let mut attachment = network.attach(vm.id, &lease).await?;
            if attachment.dns.is_empty() {
                attachment.dns = self.inner.config.dns.clone();
            }
            vm.resources.net = Some(attachment);
            self.save(vm).await?;
        }

        let config = self.machine_config(vm, image)?;
        let handle = self.hv(vm)?.start(&config).await?;
        undo.push(Undo::Vmm(handle.clone()));
        vm.resources.vmm = Some(handle.clone());
        self.save(vm).await?;

        self.wait_ready(vm, &handle).await?;
        self.configure_guest(vm).await?;
        Ok(())
    }

    async fn rollback(&self, vm: &VmRecord, undo: Vec<Undo>) {
        let b = &self.inner.backends;
        self.forget_vm(vm.id);
        for step in undo.into_iter().rev() {
            let result = match step {
                Undo::Vmm(handle) => match self.hv(vm) {
                    Ok(hv) => {
                        let killed = hv.kill(&handle).await;
                        let cleaned = hv.cleanup(&handle).await;
                        killed.and(cleaned).map_err(ManagerError::from)
                    }
                    Err(e) => Err(e),
                },
                Undo::Tap(id) => match &b.network {
                    Some(n) => n.detach(id).await.map_err(ManagerError::from),
                    None => Ok(()),
                },
                Undo::Lease(id) => b
                    .store
                    .release_lease(id)
                    .await
                    .map(drop)
                    .map_err(ManagerError::from),
                Undo::Volume(v) => b.storage.delete(&v).await.map_err(ManagerError::from),
                Undo::Uid(id) => self.release_uid_of(id).await,
            };
            if let Err(error) = result {
                warn!(vm = %vm.name, error = %ErrorChain(&error), "rollback step failed; reconcile will retry");
            }
        }
    }

    /// Deletes a VM and everything it holds, except its data volume when
    /// `options` keep it: then it says where that went. Allowed in every state; a VM
    /// left half-deleted by an earlier failure is finished off.
    pub async fn delete(
        &self,
        name: &VmName,
        options: DeleteOptions,
    ) -> Result<Deleted, ManagerError> {
        let _guard = self.lock(name).await;
        let b = &self.inner.backends;
        let mut vm = self.get(name).await?;
        if vm.resources.vmm.is_some() {
            // Refused before anything changes: its VMM cannot be stopped.
            self.hv(&vm)?;
        }
        if vm.state != VmState::Deleting {
            vm.keep_data = options.keep_data;
            self.set_state(&mut vm, VmState::Deleting).await?;
        } else if options.keep_data && !vm.keep_data {
            // Finishing an interrupted delete: asking to keep the data still counts.
            vm.keep_data = true;
            self.save(&mut vm).await?;
        }
        let options = DeleteOptions {
            keep_data: vm.keep_data,
        };
        self.forget_vm(vm.id);
        if let Some(handle) = vm.resources.vmm.clone() {
            if options.keep_data {
                self.graceful_stop(&vm, &handle).await?;
            } else {
                self.hv(&vm)?.kill(&handle).await?;
            }
            self.hv(&vm)?.cleanup(&handle).await?;
            vm.resources.vmm = None;
            self.save(&mut vm).await?;
        }
        if let Some(net) = vm.resources.net.take() {
            if let Some(network) = &b.network {
                network.detach(net.vm).await?;
            }
            self.save(&mut vm).await?;
        }
        if vm.resources.lease.take().is_some() {
            b.store.release_lease(vm.id).await?;
            self.save(&mut vm).await?;
        }
        if let Some(root) = vm.resources.root.take() {
            b.storage.delete(&root).await?;
            self.save(&mut vm).await?;
        }
        let mut kept_data = None;
        if let Some(data) = vm.resources.data.take() {
            if options.keep_data {
                let kept = b.storage.release(&data).await?;
                self.disown(&vm, &kept);
                self.data_kept(&vm, &kept).await;
                kept_data = Some(kept);
            } else {
                b.storage.delete(&data).await?;
            }
            self.save(&mut vm).await?;
        }
        self.drop_console(vm.id).await?;
        // Last: the uid still owned the disks until they went.
        if vm.resources.uid.take().is_some() {
            self.release_uid_of(vm.id).await?;
            self.save(&mut vm).await?;
        }
        let deleted = b
            .store
            .delete_vm_with_event(
                vm.id,
                NewEvent::vm(vm.id, &vm.name, EventKind::Deleted),
                &self.inner.config.event_retention,
            )
            .await?;
        info!(vm = %vm.name, "deleted VM");
        // No subscriber is not an error.
        let _ = self.inner.events.send(deleted);
        Ok(Deleted {
            name: vm.name,
            kept_data,
        })
    }

    /// Records where the data volume of `vm`, handed over to the operator, went.
    async fn data_kept(&self, vm: &VmRecord, path: &std::path::Path) {
        info!(vm = %vm.name, path = %path.display(), "kept the data volume");
        self.emit(NewEvent::vm(
            vm.id,
            &vm.name,
            EventKind::DataKept {
                path: path.to_owned(),
            },
        ))
        .await;
    }

    /// Starts a stopped VM and returns once its agent answered.
    pub async fn start(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "start", STOPPED)?;
        self.start_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Stops a running or paused VM: asks the guest to power off, then stops the
    /// VMM by force after the grace period. Disks, address and TAP are kept.
    pub async fn stop(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "stop", RUNNING_OR_PAUSED)?;
        self.stop_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Stops the VM if it runs, then starts it.
    pub async fn restart(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "restart", RESTARTABLE)?;
        if vm.state != VmState::Stopped {
            self.stop_locked(&mut vm).await?;
        }
        self.start_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Pauses a running VM's vCPUs (running → paused). Memory, disks and network stay.
    pub async fn pause(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "pause", RUNNING)?;
        self.reattach(&mut vm).await?;
        let hv = self.hv(&vm)?;
        if !hv.capabilities().pause {
            return Err(ManagerError::Unsupported("pause"));
        }
        let handle = self.vmm_of(&vm)?;
        hv.pause(&handle).await?;
        self.set_state(&mut vm, VmState::Paused).await?;
        Ok(vm)
    }

    /// Resumes a paused VM (paused → running).
    pub async fn resume(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "resume", PAUSED)?;
        self.reattach(&mut vm).await?;
        let handle = self.vmm_of(&vm)?;
        self.hv(&vm)?.resume(&handle).await?;
        self.set_state(&mut vm, VmState::Running).await?;
        Ok(vm)
    }

    /// The backend that drives `vm`: the one that created it, never another.
    fn hv(&self, vm: &VmRecord) -> Result<&dyn Hypervisor, ManagerError> {
        let b = &self.inner.backends;
        let kind = self.backend_kind(vm);
        match b.hypervisor_of(kind) {
            Some(hv) => Ok(&**hv),
            None => Err(ManagerError::BackendUnavailable {
                name: vm.name.clone(),
                backend: kind.to_owned(),
                available: b.hypervisors().map(|h| h.kind()).collect(),
            }),
        }
    }

    /// The kind of backend of `vm`: recorded at create; for a record from before
    /// backends were recorded, its VMM's, else the default.
    fn backend_kind<'a>(&'a self, vm: &'a VmRecord) -> &'a str {
        match (&vm.hypervisor, &vm.resources.vmm) {
            (Some(kind), _) => kind,
            (None, Some(handle)) => &handle.backend,
            (None, None) => self.inner.backends.hypervisor.kind(),
        }
    }

    /// The backend a clone from `source` runs on: its source's.
    async fn backend_of_source(&self, source: &CloneSource) -> Result<String, ManagerError> {
        let b = &self.inner.backends;
        let (vm, recorded) = match source {
            CloneSource::Vm(name) => (Some(self.get(name).await?), None),
            CloneSource::Snapshot(name) => {
                let snapshot = self.get_snapshot(name).await?;
                (
                    b.store.get_vm_by_id(snapshot.vm).await?,
                    snapshot.hypervisor,
                )
            }
        };
        Ok(match (recorded, vm) {
            (Some(kind), _) => kind,
            (None, Some(vm)) => self.backend_kind(&vm).to_owned(),
            (None, None) => b.hypervisor.kind().to_owned(),
        })
    }

    fn vmm_of(&self, vm: &VmRecord) -> Result<VmmHandle, ManagerError> {
        vm.resources.vmm.clone().ok_or_else(|| {
            ManagerError::Store(crate::store::StoreError::Corrupt(format!(
                "VM {} is {} but has no VMM",
                vm.name, vm.state
            )))
        })
    }

    /// Runs a command in a running VM; output streams as it is produced.
    pub async fn exec(
        &self,
        name: &VmName,
        request: ExecRequest,
    ) -> Result<ExecStream, ManagerError> {
        let (vm, client) = self.running_agent(name, "exec").await?;
        client
            .exec(request)
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))
    }

    /// Checks every VM that should have a running VMM (all at once, each bounded by
    /// [`ManagerConfig::vmm_check_timeout`]) and settles those whose VMM has gone as
    /// [`Manager::supervise`] does: stopped, console kept, an event saying why.
    /// The safety net under `supervise`, and the only check for backends that
    /// cannot report events. A VMM that does not answer, or any other failure,
    /// concerns its VM only: it is logged and the others are checked. Returns the
    /// VMs whose VMM ended unexpectedly (crash, panic, kill), for the exit policy.
    pub async fn check_vmms(&self) -> Result<Vec<VmName>, ManagerError> {
        let timeout = self.inner.config.vmm_check_timeout;
        let mut checks = tokio::task::JoinSet::new();
        for vm in self.list(None).await? {
            // A quarantined VM waits for its rm; an unreachable one for its re-attach
            // (`retry_unreachable`, which also finds out if it died).
            if !matches!(vm.state, VmState::Running | VmState::Paused)
                || vm.quarantined.is_some()
                || self.is_unreachable(&vm)
            {
                continue;
            }
            let Some(handle) = vm.resources.vmm.clone() else {
                continue;
            };
            let manager = self.clone();
            checks.spawn(async move {
                // A VM whose backend is missing is left to reconcile and rm.
                let Ok(hv) = manager.hv(&vm) else {
                    return (vm.name.clone(), Ok(None));
                };
                let outcome = match tokio::time::timeout(timeout, hv.info(&handle)).await {
                    Err(_) => Err(format!("its VMM did not answer within {timeout:?}")),
                    Ok(Err(e)) => Err(ErrorChain(&e).to_string()),
                    Ok(Ok(info)) if info.state == VmmState::Exited => {
                        // The reason, if the backend saw it.
                        let exit = match hv.watch(&handle).await {
                            Ok(watch) => watch.current().exit,
                            Err(_) => None,
                        };
                        manager
                            .vmm_ended(vm.id, &handle, exit.unwrap_or(VmmExit::Crashed))
                            .await
                            .map_err(|e| ErrorChain(&e).to_string())
                    }
                    Ok(Ok(_)) => Ok(None),
                };
                (vm.name, outcome)
            });
        }
        let mut died = Vec::new();
        while let Some(joined) = checks.join_next().await {
            match joined {
                Ok((_, Ok(Some(name)))) => died.push(name),
                Ok((_, Ok(None))) => {}
                Ok((name, Err(reason))) => {
                    warn!(vm = %name, %reason, "cannot check the VMM; checking the others")
                }
                Err(e) => warn!(error = %e, "a VMM check failed"),
            }
        }
        died.sort();
        Ok(died)
    }

    /// Pings the agent of every running VM (all at once, each bounded by `timeout`)
    /// and records a change of health as an event. A guest that stalls or breaks the
    /// protocol is marked unhealthy; nothing else is affected. Returns the VMs whose
    /// health changed.
    pub async fn check_agents(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(VmName, Health)>, ManagerError> {
        let mut pings = tokio::task::JoinSet::new();
        for vm in self.list(None).await? {
            // A rebooting guest's agent is away; the reboot brings it back.
            if vm.state != VmState::Running
                || vm.resources.vmm.is_none()
                || self.is_rebooting(vm.id)
                || self.is_unreachable(&vm)
            {
                continue;
            }
            let manager = self.clone();
            pings.spawn(async move {
                let outcome = tokio::time::timeout(timeout, async {
                    let client = manager.agent(&vm).await?;
                    client
                        .ping()
                        .await
                        .map_err(|e| ManagerError::agent(&vm.name, &e))
                })
                .await;
                let health = match outcome {
                    Ok(Ok(_)) => Health::Healthy,
                    Ok(Err(e)) => {
                        manager.forget_agent(vm.id);
                        Health::Unhealthy {
                            reason: ErrorChain(&e).to_string(),
                        }
                    }
                    Err(_) => Health::Unhealthy {
                        reason: format!("the agent did not answer a ping within {timeout:?}"),
                    },
                };
                (vm, health)
            });
        }
        let mut changed = Vec::new();
        while let Some(joined) = pings.join_next().await {
            let Ok((vm, health)) = joined else { continue };
            if vm.health == health {
                continue;
            }
            match self.record_health(&vm, &health).await {
                Ok(true) => changed.push((vm.name, health)),
                Ok(false) => {}
                Err(e) => {
                    warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot record the agent's health; checking the others")
                }
            }
        }
        Ok(changed)
    }

    /// Records the `health` of the agent of `vm` as checked, if the VM still runs
    /// the VMM that was checked and is not rebooting. Returns whether it did.
    async fn record_health(&self, vm: &VmRecord, health: &Health) -> Result<bool, ManagerError> {
        let _guard = self.lock(&vm.name).await;
        let Some(mut current) = self.inner.backends.store.get_vm(&vm.name).await? else {
            return Ok(false);
        };
        // Only the VMM that was checked, still running, gets the verdict.
        if current.state != VmState::Running
            || current.resources.vmm != vm.resources.vmm
            || self.is_rebooting(current.id)
        {
            return Ok(false);
        }
        match health {
            Health::Unhealthy { reason } => {
                warn!(vm = %current.name, %reason, "agent unhealthy")
            }
            _ => info!(vm = %current.name, "agent healthy"),
        }
        current.health = health.clone();
        self.save_with_event(
            &mut current,
            EventKind::HealthChanged {
                health: health.clone(),
            },
        )
        .await?;
        Ok(true)
    }

    async fn start_locked(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        let image = b.images.resolve(&vm.spec.image).await?;
        self.ensure_uid(vm).await?;
        self.set_state(vm, VmState::Starting).await?;
        let config = self.machine_config(vm, &image)?;
        let started = async {
            let handle = self.hv(vm)?.start(&config).await?;
            vm.resources.vmm = Some(handle.clone());
            self.save(vm).await?;
            self.wait_ready(vm, &handle).await?;
            self.configure_guest(vm).await
        }
        .await;
        self.finish_start(vm, started).await
    }

    /// Records the outcome of a start: running, or stopped with nothing left
    /// running and the failure as an event.
    async fn finish_start(
        &self,
        vm: &mut VmRecord,
        started: Result<(), ManagerError>,
    ) -> Result<(), ManagerError> {
        match started {
            Ok(()) => {
                vm.health = Health::Healthy;
                self.set_state(vm, VmState::Running).await
            }
            Err(error) => {
                let hv = self.hv(vm);
                if let Some(handle) = vm.resources.vmm.take()
                    && let Ok(hv) = hv
                {
                    let _ = hv.kill(&handle).await;
                    self.keep_console(vm.id, &handle).await;
                    let _ = hv.cleanup(&handle).await;
                }
                self.set_state(vm, VmState::Stopped).await?;
                self.emit(NewEvent::vm(
                    vm.id,
                    &vm.name,
                    EventKind::OperationFailed {
                        operation: "start".into(),
                        error: ErrorChain(&error).to_string(),
                    },
                ))
                .await;
                Err(error)
            }
        }
    }

    async fn stop_locked(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        self.set_state(vm, VmState::Stopping).await?;
        if let Some(handle) = vm.resources.vmm.clone() {
            self.graceful_stop(vm, &handle).await?;
            self.keep_console(vm.id, &handle).await;
            self.hv(vm)?.cleanup(&handle).await?;
        }
        vm.resources.vmm = None;
        vm.health = Health::Unknown;
        self.set_state(vm, VmState::Stopped).await
    }

    async fn graceful_stop(&self, vm: &VmRecord, handle: &VmmHandle) -> Result<(), ManagerError> {
        // The agent powers the guest off cleanly even where ACPI is not handled
        // (tiny images); the hypervisor's ACPI request and forced stop follow.
        if let Some(client) = self.cached_agent(vm.id) {
            let asked =
                tokio::time::timeout(self.inner.config.agent_timeout, client.shutdown(false));
            if let Err(e) = asked
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                debug!(vm = %vm.name, error = %e, "agent shutdown request failed");
            }
        }
        self.forget_agent(vm.id);
        self.hv(vm)?
            .shutdown(handle, self.inner.config.shutdown_grace)
            .await?;
        Ok(())
    }

    /// Waits until the guest agent answers hello, the VMM dies, or the boot timeout
    /// passes. On failure the error carries the tail of the guest console.
    async fn wait_ready(
        &self,
        vm: &VmRecord,
        handle: &VmmHandle,
    ) -> Result<HelloInfo, ManagerError> {
        self.wait_ready_after(vm, handle, None).await
    }

    /// [`Manager::wait_ready`] for a boot after the one whose boot id was
    /// `last_boot`: a hello with that id (an agent of the old boot) does not count.
    async fn wait_ready_after(
        &self,
        vm: &VmRecord,
        handle: &VmmHandle,
        last_boot: Option<&str>,
    ) -> Result<HelloInfo, ManagerError> {
        let hv = self.hv(vm)?;
        let deadline = Instant::now() + self.inner.config.boot_timeout;
        let failure = |reason: String| async move {
            let console = hv.console_tail(handle, 4096).await.unwrap_or_default();
            ManagerError::BootFailed {
                name: vm.name.clone(),
                reason,
                console,
            }
        };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(failure(format!(
                    "the agent did not answer within {:?}",
                    self.inner.config.boot_timeout
                ))
                .await);
            }
            if hv.info(handle).await?.state == VmmState::Exited {
                return Err(failure("the VMM exited during boot".to_owned()).await);
            }
            let stream = match hv.connect_agent(handle).await {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(vm = %vm.name, error = %e, "agent not reachable yet");
                    tokio::time::sleep(Duration::from_millis(100).min(remaining)).await;
                    continue;
                }
            };
            // One hello per connection, bounded by the time left: the request waits
            // in the channel until the agent opens it, so it is never sent twice.
            let client = Client::new(stream, self.agent_client_config());
            let waiter = client.clone();
            let hello = waiter.hello_within(remaining);
            tokio::pin!(hello);
            let outcome = loop {
                tokio::select! {
                    r = &mut hello => break Some(r),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if hv.info(handle).await?.state == VmmState::Exited {
                            break None;
                        }
                    }
                }
            };
            match outcome {
                None => return Err(failure("the VMM exited during boot".to_owned()).await),
                Some(Ok(hello)) if last_boot == Some(hello.boot_id.as_str()) => {
                    debug!(vm = %vm.name, "the agent of the previous boot answered; reconnecting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(Ok(hello)) => {
                    // Guest text: logged with Debug, which quotes and escapes it.
                    info!(vm = %vm.name, agent = ?hello.agent_version, kernel = ?hello.kernel, "agent ready");
                    self.remember_agent(vm.id, client, &hello, handle).await;
                    return Ok(hello);
                }
                Some(Err(e)) => {
                    debug!(vm = %vm.name, error = %e, "agent hello failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Tells a freshly booted guest who it is: its address (when it has a NIC), its
    /// host name (the VM's name) and its owner's SSH keys. Every call is idempotent,
    /// so it runs again on every start.
    async fn configure_guest(&self, vm: &VmRecord) -> Result<(), ManagerError> {
        let client = self.agent(vm).await?;
        let agent_error = |e: vmkit_guest::ClientError| ManagerError::agent(&vm.name, &e);
        if let Some(net) = &vm.resources.net {
            let config = NetworkConfig::new(net.mac.to_string(), net.ip, net.prefix, net.gateway)
                .dns(net.dns.iter().copied());
            client
                .configure_network(&config)
                .await
                .map_err(agent_error)?;
        }
        client
            .set_hostname(vm.name.as_str())
            .await
            .map_err(agent_error)?;
        // Also with no keys: that removes the ones the owner has removed since.
        let keys = self.inner.backends.store.ssh_keys(vm.owner).await?;
        client
            .install_ssh_keys(None, keys.iter().map(|k| k.to_openssh()))
            .await
            .map_err(agent_error)?;
        // The host grows only disks; the guest grows its filesystems to them.
        // Best effort: an agent too old for it, or a filesystem that cannot grow,
        // leaves a working VM.
        match client.grow_filesystems().await {
            Ok(report) => {
                for fs in report.filesystems.iter().filter(|fs| fs.grew()) {
                    info!(vm = %vm.name, mount = ?fs.mount, from = fs.before_bytes, to = fs.after_bytes, "the guest grew a filesystem to its disk");
                }
                for failure in &report.failures {
                    warn!(vm = %vm.name, failure = ?failure, "the guest could not grow a filesystem");
                }
            }
            Err(e) => {
                warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot ask the guest to grow its filesystems")
            }
        }
        Ok(())
    }

    fn agent_client_config(&self) -> ClientConfig {
        ClientConfig::default().call_timeout(self.inner.config.agent_timeout)
    }

    /// The agent client of a running VM, connecting if needed.
    async fn agent(&self, vm: &VmRecord) -> Result<Client, ManagerError> {
        if let Some(client) = self.cached_agent(vm.id) {
            return Ok(client);
        }
        let gate = self.connect_gate(vm.id);
        let _connecting = gate.lock().await;
        if let Some(client) = self.cached_agent(vm.id) {
            return Ok(client);
        }
        let handle = vm
            .resources
            .vmm
            .as_ref()
            .ok_or_else(|| ManagerError::Agent {
                name: vm.name.clone(),
                message: "the VM has no VMM".into(),
            })?;
        let stream = self.hv(vm)?.connect_agent(handle).await?;
        let client = Client::new(stream, self.agent_client_config());
        let hello = client
            .hello()
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))?;
        self.remember_agent(vm.id, client.clone(), &hello, handle)
            .await;
        Ok(client)
    }

    /// The gate of connection attempts to the agent of `vm`.
    fn connect_gate(&self, vm: VmId) -> Arc<Mutex<()>> {
        let mut connecting = self
            .inner
            .connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        connecting.entry(vm).or_default().clone()
    }

    /// The boot the agent of `vm` last said hello from.
    fn boot(&self, vm: VmId) -> Option<Boot> {
        let boots = self.inner.boots.lock().unwrap_or_else(|p| p.into_inner());
        boots.get(&vm).cloned()
    }

    fn set_rebooting(&self, vm: VmId, rebooting: bool) {
        let mut set = self
            .inner
            .rebooting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if rebooting {
            set.insert(vm);
        } else {
            set.remove(&vm);
        }
    }

    fn is_rebooting(&self, vm: VmId) -> bool {
        let set = self
            .inner
            .rebooting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.contains(&vm)
    }

    fn cached_agent(&self, vm: VmId) -> Option<Client> {
        let agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.get(&vm).filter(|c| !c.is_closed()).cloned()
    }

    /// Keeps `client`, connected to the agent of `vm` (whose VMM is `handle`),
    /// which said `hello`.
    async fn remember_agent(
        &self,
        vm: VmId,
        client: Client,
        hello: &HelloInfo,
        handle: &VmmHandle,
    ) {
        let resets = match self.inner.backends.hypervisor_of(&handle.backend) {
            Some(hv) => hv.watch(handle).await.ok().map(|w| w.current().resets),
            None => None,
        };
        let mut agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.insert(vm, client);
        drop(agents);
        let mut boots = self.inner.boots.lock().unwrap_or_else(|p| p.into_inner());
        boots.insert(
            vm,
            Boot {
                id: hello.boot_id.clone(),
                resets,
            },
        );
    }

    /// Drops the agent client of `vm` and what its hello said.
    fn forget_agent(&self, vm: VmId) {
        let mut agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.remove(&vm);
        drop(agents);
        let mut boots = self.inner.boots.lock().unwrap_or_else(|p| p.into_inner());
        boots.remove(&vm);
    }

    /// Drops every per-VM table entry of a VM that is gone.
    fn forget_vm(&self, vm: VmId) {
        self.forget_agent(vm);
        self.set_rebooting(vm, false);
        self.forget_unreachable(vm);
        let mut connecting = self
            .inner
            .connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        connecting.remove(&vm);
    }

    fn machine_config(
        &self,
        vm: &VmRecord,
        image: &crate::image::Image,
    ) -> Result<MachineConfig, ManagerError> {
        let root = vm.resources.root.as_ref().ok_or_else(|| {
            ManagerError::Store(crate::store::StoreError::Corrupt(format!(
                "VM {} has no root volume",
                vm.name
            )))
        })?;
        let mut config = MachineConfig::new(
            vm.id,
            vm.name.clone(),
            self.inner.config.run_dir(vm.id),
            image.kernel.clone(),
        );
        config.initramfs = image.initramfs.clone();
        config.cmdline = format!("{} vmkit.name={}", image.cmdline, vm.name);
        config.disks.push(DiskConfig::new(&root.path, root.format));
        if let Some(data) = &vm.resources.data {
            config.disks.push(DiskConfig::new(&data.path, data.format));
        }
        config.nic = vm
            .resources
            .net
            .as_ref()
            .map(|n| NicConfig::new(n.tap.clone(), n.mac));
        config.vcpus = vm.spec.vcpus;
        config.max_vcpus = vm.spec.vcpus.max(
            self.inner
                .config
                .spec_limits
                .max_vcpus
                .min(vm.spec.vcpus * 2),
        );
        config.memory_mib = vm.spec.memory_mib;
        config.console_limit = self.inner.config.console_limit;
        config.confinement = self.confinement_of(vm)?;
        Ok(config)
    }

    fn require(
        &self,
        vm: &VmRecord,
        operation: &'static str,
        allowed: &'static [VmState],
    ) -> Result<(), ManagerError> {
        if let Some(reason) = &vm.quarantined {
            return Err(ManagerError::Quarantined {
                name: vm.name.clone(),
                reason: reason.clone(),
            });
        }
        if allowed.contains(&vm.state) {
            Ok(())
        } else {
            Err(ManagerError::WrongState {
                name: vm.name.clone(),
                state: vm.state,
                operation,
                allowed,
            })
        }
    }

    /// Moves `vm` to state `to`: the record and its [`EventKind::StateChanged`] event
    /// are stored in one transaction. On failure `vm` keeps its old state.
    async fn set_state(&self, vm: &mut VmRecord, to: VmState) -> Result<(), ManagerError> {
        let from = vm.state;
        debug_assert!(from.can_transition_to(to), "{from} -> {to}");
        vm.state = to;
        if let Err(e) = self
            .save_with_event(vm, EventKind::StateChanged { from, to })
            .await
        {
            vm.state = from;
            return Err(e);
        }
        Ok(())
    }

    async fn save(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        vm.updated_at = Timestamp::now();
        Ok(self.inner.backends.store.update_vm(vm).await?)
    }

    /// Saves `vm` if its owner's holdings with it stay within `quota` (checked in
    /// the same store transaction).
    async fn save_within_quota(
        &self,
        vm: &mut VmRecord,
        quota: &Quota,
    ) -> Result<(), ManagerError> {
        vm.updated_at = Timestamp::now();
        Ok(self
            .inner
            .backends
            .store
            .update_vm_within_quota(vm, quota)
            .await?)
    }

    /// Saves `vm` and stores the event `kind` about it in one transaction, then
    /// broadcasts the event.
    async fn save_with_event(
        &self,
        vm: &mut VmRecord,
        kind: EventKind,
    ) -> Result<(), ManagerError> {
        vm.updated_at = Timestamp::now();
        let event = NewEvent::vm(vm.id, &vm.name, kind);
        let stored = self
            .inner
            .backends
            .store
            .update_vm_with_event(vm, event, &self.inner.config.event_retention)
            .await?;
        // No subscriber is not an error.
        let _ = self.inner.events.send(stored);
        Ok(())
    }

    async fn emit(&self, event: NewEvent) {
        let retention = &self.inner.config.event_retention;
        match self
            .inner
            .backends
            .store
            .append_event(event, retention)
            .await
        {
            Ok(stored) => {
                // No subscriber is not an error.
                let _ = self.inner.events.send(stored);
            }
            Err(error) => warn!(%error, "cannot store event"),
        }
    }

    async fn free_name(&self) -> Result<VmName, ManagerError> {
        for _ in 0..16 {
            let name = VmName::generate();
            if self.inner.backends.store.get_vm(&name).await?.is_none() {
                return Ok(name);
            }
        }
        // 34 * 34 * 9000 names: sixteen collisions in a row means the store is lying.
        Err(ManagerError::Store(crate::store::StoreError::Corrupt(
            "no free generated name after 16 tries".into(),
        )))
    }

    async fn lock(&self, name: &VmName) -> VmGuard {
        self.lock_in(name, false).await
    }

    /// Takes the lock of snapshot `name`; with a VM's lock, take that one first.
    async fn lock_snapshot(&self, name: &VmName) -> VmGuard {
        self.lock_in(name, true).await
    }

    async fn lock_in(&self, name: &VmName, snapshot: bool) -> VmGuard {
        let lock = {
            let mut locks = self
                .inner
                .lock_table(snapshot)
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            locks.entry(name.clone()).or_default().clone()
        };
        VmGuard {
            guard: Some(lock.lock_owned().await),
            name: name.clone(),
            snapshot,
            inner: self.inner.clone(),
        }
    }

    /// The quota of `owner`: their own, else the default.
    async fn quota_of(&self, owner: UserId) -> Result<Quota, ManagerError> {
        Ok(self
            .inner
            .backends
            .store
            .get_quota(owner)
            .await?
            .unwrap_or(self.inner.config.default_quota))
    }

    /// What `owner` holds now: VMs and snapshots.
    async fn usage_of(&self, owner: UserId) -> Result<crate::quota::Usage, ManagerError> {
        let store = &self.inner.backends.store;
        let vms = store.list_vms(Some(owner)).await?;
        let snapshots = store.list_snapshots(Some(owner)).await?;
        Ok(crate::quota::Usage::of_holdings(&vms, &snapshots))
    }
}

impl Inner {
    fn lock_table(&self, snapshot: bool) -> &StdMutex<HashMap<VmName, Arc<Mutex<()>>>> {
        if snapshot {
            &self.snapshot_locks
        } else {
            &self.locks
        }
    }
}

/// Holds a VM's (or a snapshot's) operation lock; drops the map entry when no one
/// else waits.
struct VmGuard {
    guard: Option<OwnedMutexGuard<()>>,
    name: VmName,
    snapshot: bool,
    inner: Arc<Inner>,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .inner
            .lock_table(self.snapshot)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = locks.get(&self.name) {
            // Only the map holds it: nobody waits.
            if Arc::strong_count(lock) == 1 {
                locks.remove(&self.name);
            }
        }
    }
}
