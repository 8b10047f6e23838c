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
use tokio::sync::{Mutex, broadcast};
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
use crate::state_store::StateStore;
use crate::storage::{Storage, Volume};
use crate::time::Timestamp;
use crate::token::TokenHash;
use crate::user::UserId;
use crate::vm::{Health, Idempotency, VmId, VmRecord};
use crate::vm_state::VmState;

mod agents;
mod commands;
mod confine;
mod create;
mod events;
mod keys;
mod lifecycle;
mod locks;
mod monitor;
mod ops;
mod reconcile;
mod rename;
mod snapshots;
mod ssh;
mod supervise;
mod users;

use locks::{KeyGuard, KeyedLocks};

pub use commands::{
    ApiKeyView, Commands, DomainView, MAX_API_KEY_LABEL_LEN, ShareView, ShareWith, ShareWithView,
    Whoami,
};
pub use events::EventFeed;
pub use ops::{ResizeRequest, VmMetrics};
pub use reconcile::{ExitPolicy, ReconcileFailure, ReconcileReport};
pub use ssh::SshTarget;
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
    /// How long a create or start waits, after the agent's hello, for the guest's
    /// SSH server to answer (images with one, VMs with a network): a VM is ready
    /// when SSH into it works. One that does not answer in time is left running and
    /// reported as ready all the same, with a warning.
    pub ssh_ready_timeout: Duration,
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
            ssh_ready_timeout: Duration::from_secs(120),
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

    /// Sets how long a create or start waits for the guest's SSH server.
    pub fn ssh_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ssh_ready_timeout = timeout;
        self
    }

    /// Sets the timeout of a single agent call.
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
    /// Decides what each caller may do through the command surface
    /// ([`Manager::commands`]): vmkit's [`Policy`](crate::Policy) unless replaced.
    pub policy: Arc<dyn crate::access::AccessPolicy>,
    /// Custom domains, when the host offers them: the VM domain and how ownership
    /// proofs are read from DNS.
    pub domains: Option<crate::domain::CustomDomains>,
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
            policy: Arc::new(crate::access::Policy),
            domains: None,
        }
    }

    /// Replaces the access policy of the command surface.
    pub fn with_policy(mut self, policy: Arc<dyn crate::access::AccessPolicy>) -> Self {
        self.policy = policy;
        self
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

    /// Offers custom domains (`domain add NAME HOST`), proven through `domains`.
    pub fn with_custom_domains(mut self, domains: crate::domain::CustomDomains) -> Self {
        self.domains = Some(domains);
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
    /// A key the client chose for this request, so that it can ask again after a
    /// timeout without making a second VM (see [`Manager::create`]).
    pub idempotency_key: Option<String>,
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
            idempotency_key: None,
        }
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// What identifies the request for its idempotency key: the hash of what it
    /// asks for (name, spec, source).
    fn fingerprint(&self) -> TokenHash {
        let asked = serde_json::json!({
            "name": self.name,
            "spec": self.spec,
            "from": self.from,
        });
        TokenHash::of(&asked.to_string())
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
    locks: KeyedLocks<VmName>,
    /// One lock per snapshot name, taken after the VM's lock where both are held:
    /// a delete of a snapshot waits for a restore or a clone from it.
    snapshot_locks: KeyedLocks<VmName>,
    /// One lock per idempotency key of an owner: a retried create waits for the
    /// first to end, then finds its VM.
    idempotency_locks: KeyedLocks<(UserId, String)>,
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
    /// The secret the gateway's per-VM SSH client keys derive from.
    vm_keys: crate::vm_keys::VmKeys,
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
    /// What the agent said of the guest's SSH server in this boot, once asked.
    ssh: Option<vmkit_guest::SshInfo>,
}

/// Undo actions for the steps of a create, run in reverse on failure.
enum Undo {
    Uid(VmId),
    Volume(Volume),
    Lease(VmId),
    Tap(VmId),
    Vmm(VmmHandle),
}

// The states each operation is allowed in, as its [`Action`](crate::Action) says.
use crate::access::{PAUSED, RUNNING, RUNNING_OR_PAUSED, SETTLED, STOPPED};

impl Manager {
    /// Builds a manager and sets up host networking if there is a network backend.
    pub async fn new(config: ManagerConfig, backends: Backends) -> Result<Self, ManagerError> {
        if let Some(network) = &backends.network {
            network.setup_host().await?;
        }
        let (events, _) = broadcast::channel(1024);
        // Kept with the data when there is a data directory, so that the keys
        // installed in running VMs still open them after a restart.
        let vm_keys = match config.data_dir.is_dir() {
            true => {
                let path = config.data_dir.join(crate::vm_keys::VM_KEYS_FILE);
                crate::vm_keys::VmKeys::load_or_create(&path).map_err(|source| {
                    ManagerError::Io {
                        context: format!("loading the VMs' SSH access secret {}", path.display()),
                        source,
                    }
                })?
            }
            false => crate::vm_keys::VmKeys::ephemeral(),
        };
        let manager = Self {
            inner: Arc::new(Inner {
                config,
                backends,
                locks: KeyedLocks::new(),
                snapshot_locks: KeyedLocks::new(),
                idempotency_locks: KeyedLocks::new(),
                agents: StdMutex::new(HashMap::new()),
                connecting: StdMutex::new(HashMap::new()),
                boots: StdMutex::new(HashMap::new()),
                rebooting: StdMutex::new(HashSet::new()),
                events,
                unreachable: StdMutex::new(HashMap::new()),
                keys: Mutex::new(()),
                vm_keys,
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
    ///
    /// Within an operation of the command surface, the name answers only for the VM
    /// whose access was checked: should that VM have been deleted and its name taken
    /// by another since, the other VM is [not found](ManagerError::NotFound).
    pub async fn get(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let vm = self
            .inner
            .backends
            .store
            .get_vm(name)
            .await?
            .ok_or_else(|| ManagerError::NotFound(name.clone()))?;
        if !commands::pinned_vm(name, vm.id) {
            return Err(ManagerError::NotFound(name.clone()));
        }
        Ok(vm)
    }

    /// VMs by name; only `owner`'s when given.
    pub async fn list(&self, owner: Option<UserId>) -> Result<Vec<VmRecord>, ManagerError> {
        Ok(self.inner.backends.store.list_vms(owner).await?)
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
            ManagerError::Store(crate::state_store::StoreError::Corrupt(format!(
                "VM {} is {} but has no VMM",
                vm.name, vm.state
            )))
        })
    }

    fn machine_config(
        &self,
        vm: &VmRecord,
        image: &crate::image::Image,
    ) -> Result<MachineConfig, ManagerError> {
        let root = vm.resources.root.as_ref().ok_or_else(|| {
            ManagerError::Store(crate::state_store::StoreError::Corrupt(format!(
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

    /// Records an event of the host (not of one VM), such as a front door's: it is
    /// stored (failing that, logged) and sent to followers.
    pub async fn record_host_event(&self, kind: EventKind) {
        self.emit(NewEvent::host(kind)).await;
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

    async fn lock(&self, name: &VmName) -> KeyGuard<VmName> {
        self.inner.locks.lock(name).await
    }

    /// Takes the lock of snapshot `name`; with a VM's lock, take that one first.
    async fn lock_snapshot(&self, name: &VmName) -> KeyGuard<VmName> {
        self.inner.snapshot_locks.lock(name).await
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
