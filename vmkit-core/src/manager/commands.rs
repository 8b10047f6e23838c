//! The command surface: every operation a door offers, taken on behalf of a caller
//! and decided by one access policy.
//!
//! [`Manager::commands`] gives the operations for one [`Caller`]; each is an
//! [`Action`] of the catalogue, checked by the [`AccessPolicy`] before it runs, and
//! answers with views ([`VmView`], [`SnapshotView`], ...), never internal records. The
//! engine's own methods on [`Manager`] (`create`, `start`, ...) do no access check:
//! they are for the embedding program itself; the doors go through here.
//!
//! A check and the operation it allows act on the same VM: the VM (or snapshot) the
//! policy decided on is pinned for the operation, so that a name deleted and taken
//! by another user in between answers "not found" instead of reaching the other's
//! VM.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmkit_guest::{ExecRequest, ExecStream, LogStream, LogsRequest};

use super::{CloneSource, CreateRequest, DeleteOptions, Deleted, Manager, ResizeRequest};
use crate::access::{AccessPolicy, Action, Caller, Denied, KeyLimits, Principal};
use crate::error::ManagerError;
use crate::event::Event;
use crate::invite::Invite;
use crate::name::VmName;
use crate::share::{Access, Share, ShareTarget};
use crate::snapshot::Snapshot;
use crate::time::Timestamp;
use crate::token::{TokenHash, new_secret};
use crate::user::{ApiKey, ApiKeyScope, Handle, Role, SshPublicKey, User, UserId};

use super::users::{NewUser, Registration, VmDisposition};
use crate::view::{MetricsView, SnapshotView, VmView};
use crate::vm::{Idempotency, VmId, VmRecord};

mod domains;
pub use domains::DomainView;

tokio::task_local! {
    /// The VM and snapshot an operation of the command surface was allowed on.
    static PINNED: Pinned;
}

#[derive(Clone, Default)]
struct Pinned {
    vm: Option<(VmName, VmId)>,
    snapshot: Option<(VmName, VmId)>,
}

/// Whether VM `id` may answer for `name` in the running operation: always, but in
/// an operation of the command surface that was allowed on another VM of that name.
pub(super) fn pinned_vm(name: &VmName, id: VmId) -> bool {
    PINNED
        .try_with(|p| match &p.vm {
            Some((pinned, pinned_id)) if pinned == name => *pinned_id == id,
            _ => true,
        })
        .unwrap_or(true)
}

/// [`pinned_vm`] for snapshots.
pub(super) fn pinned_snapshot(name: &VmName, id: VmId) -> bool {
    PINNED
        .try_with(|p| match &p.snapshot {
            Some((pinned, pinned_id)) if pinned == name => *pinned_id == id,
            _ => true,
        })
        .unwrap_or(true)
}

/// Who the caller is, as `whoami` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Whoami {
    /// The principal.
    pub principal: Principal,
    /// The door they came through.
    pub door: crate::access::Door,
    /// Their user record, for a registered user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// Whether they may do everything on the host.
    pub admin: bool,
    /// The limits of the API key they were identified by, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<KeyLimits>,
}

/// Most characters of an API key's label.
pub const MAX_API_KEY_LABEL_LEN: usize = 64;

/// An API key as its owner sees it: never its hash, and its secret only in the
/// answer that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ApiKeyView {
    /// Its id (the part of the secret after `vmk_`), to revoke it by.
    pub id: String,
    /// What its owner calls it.
    pub label: String,
    /// What it may do.
    pub scope: ApiKeyScope,
    /// The VM it is limited to, by name; a VM deleted since is named by its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops working; never when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// Whether it has expired.
    pub expired: bool,
    /// When it last identified its owner (to the minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Timestamp>,
    /// The secret, `vmk_...`, answered once when the key is made and never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// With whom to share a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
#[non_exhaustive]
pub enum ShareWith {
    /// A registered user.
    User(UserId),
    /// Whoever holds a new link (its secret is answered once).
    Link,
    /// Everyone.
    Public,
}

/// A share as the VM's owner sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ShareView {
    /// The VM.
    pub vm: VmName,
    /// With whom: a user, everyone, or a link (by a short name of its hash).
    pub with: ShareWithView,
    /// What it grants.
    pub access: Access,
    /// The one web port it grants; every port when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// When it was made.
    pub created_at: Timestamp,
    /// The link's secret, answered once when the link is made and never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// With whom a share is, as [`ShareView`] says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
#[non_exhaustive]
pub enum ShareWithView {
    /// A registered user.
    User(UserId),
    /// A link, by a short name of its hash (enough to take it back, not to use it).
    Link(String),
    /// Everyone.
    Public,
}

impl ShareView {
    fn of(vm: &VmName, share: &Share) -> Self {
        Self {
            vm: vm.clone(),
            with: match &share.target {
                ShareTarget::User(u) => ShareWithView::User(*u),
                ShareTarget::Link(hash) => ShareWithView::Link(hash.short()),
                ShareTarget::Public => ShareWithView::Public,
            },
            access: share.access,
            port: share.port,
            created_at: share.created_at,
            secret: None,
        }
    }
}

/// The operations of the command surface for one caller. Cheap to clone; a clone
/// may move into a task of its own (a door runs long operations so, so that a
/// client hanging up does not cut them short).
#[derive(Clone)]
pub struct Commands {
    manager: Manager,
    caller: Caller,
    policy: Arc<dyn AccessPolicy>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// The command surface for `caller`: every operation a door offers, each
    /// checked by the access policy ([`Backends::with_policy`](super::Backends::with_policy)).
    pub fn commands(&self, caller: Caller) -> Commands {
        Commands {
            manager: self.clone(),
            policy: self.inner.backends.policy.clone(),
            caller,
        }
    }
}

fn denied(name: &VmName, denied: Denied) -> ManagerError {
    match denied {
        Denied::NotFound => ManagerError::NotFound(name.clone()),
        other => ManagerError::Denied(other),
    }
}

fn snapshot_denied(name: &VmName, denied: Denied) -> ManagerError {
    match denied {
        Denied::NotFound => ManagerError::SnapshotNotFound(name.clone()),
        other => ManagerError::Denied(other),
    }
}

impl Commands {
    /// Who the operations are taken for.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// What a create leaves unsaid takes from this
    /// ([`ManagerConfig::default_spec`](super::ManagerConfig::default_spec)).
    pub fn default_spec(&self) -> crate::spec::VmSpec {
        self.manager.inner.config.default_spec.clone()
    }

    /// The caller as their record stands now: a user suspended, made admin or
    /// removed since they were identified (in a session that is still open, say) is
    /// decided on as they are now; a removed user is nobody.
    async fn caller_now(&self) -> Result<Caller, ManagerError> {
        let Principal::User { id, .. } = &self.caller.principal else {
            return Ok(self.caller.clone());
        };
        let store = &self.manager.inner.backends.store;
        let door = self.caller.door;
        let Some(user) = store.get_user(*id).await? else {
            return Ok(Caller::anonymous(door));
        };
        let Some(limits) = &self.caller.api_key else {
            return Ok(Caller::user(&user, door));
        };
        // A key revoked or expired since it identified the caller counts no more.
        Ok(match store.get_api_key(&limits.id).await? {
            Some(key) if key.user == user.id && !key.expired(Timestamp::now()) => {
                Caller::user(&user, door).with_api_key(&key)
            }
            _ => Caller::anonymous(door),
        })
    }

    async fn host(&self, action: Action) -> Result<(), ManagerError> {
        self.policy
            .host(&self.caller_now().await?, action)
            .map_err(ManagerError::Denied)
    }

    /// The owner of what the caller makes; refused for one who cannot own.
    async fn owner(&self, action: Action) -> Result<UserId, ManagerError> {
        let caller = self.caller_now().await?;
        self.policy
            .host(&caller, action)
            .map_err(ManagerError::Denied)?;
        caller
            .owner()
            .ok_or(ManagerError::Denied(Denied::SignInRequired { action }))
    }

    /// One lookup of `name` and its shares, and the policy's decision on them.
    async fn vm(&self, action: Action, name: &VmName) -> Result<VmRecord, ManagerError> {
        let caller = self.caller_now().await?;
        let store = &self.manager.inner.backends.store;
        let vm = store
            .get_vm(name)
            .await?
            .ok_or_else(|| ManagerError::NotFound(name.clone()))?;
        let shares = store.shares(vm.id).await?;
        self.policy
            .vm(&caller, action, &vm, &shares)
            .map_err(|d| denied(name, d))?;
        Ok(vm)
    }

    async fn snapshot_of(&self, action: Action, name: &VmName) -> Result<Snapshot, ManagerError> {
        let snapshot = self
            .manager
            .inner
            .backends
            .store
            .get_snapshot(name)
            .await?
            .ok_or_else(|| ManagerError::SnapshotNotFound(name.clone()))?;
        self.policy
            .snapshot(&self.caller_now().await?, action, snapshot.owner)
            .map_err(|d| snapshot_denied(name, d))?;
        Ok(snapshot)
    }

    /// Runs `operation` with `vm` (and `snapshot`) pinned.
    async fn pinned<T>(
        &self,
        vm: Option<&VmRecord>,
        snapshot: Option<&Snapshot>,
        operation: impl Future<Output = T>,
    ) -> T {
        let pinned = Pinned {
            vm: vm.map(|v| (v.name.clone(), v.id)),
            snapshot: snapshot.map(|s| (s.name.clone(), s.id)),
        };
        PINNED.scope(pinned, operation).await
    }

    fn view(&self, vm: &VmRecord) -> VmView {
        VmView::of(vm, &self.caller)
    }

    /// Who the caller is.
    pub async fn whoami(&self) -> Result<Whoami, ManagerError> {
        self.host(Action::Whoami).await?;
        let caller = self.caller_now().await?;
        let user = match &caller.principal {
            Principal::User { id, .. } => self.manager.inner.backends.store.get_user(*id).await?,
            _ => None,
        };
        Ok(Whoami {
            admin: caller.is_admin(),
            principal: caller.principal,
            door: caller.door,
            user,
            api_key: caller.api_key,
        })
    }

    /// The VMs the caller may see in a list: theirs and those shared with them by
    /// name (every VM, for an admin), by name.
    pub async fn list(&self) -> Result<Vec<VmView>, ManagerError> {
        self.host(Action::ListVms).await?;
        let caller = self.caller_now().await?;
        let store = &self.manager.inner.backends.store;
        let mut views = Vec::new();
        for vm in store.list_vms(None).await? {
            // Most VMs are listed or not without their shares (the caller's own,
            // every one for an admin); the policy decides both ways.
            let listed = self.policy.lists(&caller, &vm, &[]) || {
                let shares = store.shares(vm.id).await?;
                self.policy.lists(&caller, &vm, &shares)
            };
            if listed {
                views.push(self.view(&vm));
            }
        }
        Ok(views)
    }

    /// A VM the caller may see.
    pub async fn get(&self, name: &VmName) -> Result<VmView, ManagerError> {
        let vm = self.vm(Action::Get, name).await?;
        Ok(self.view(&vm))
    }

    /// Creates a VM owned by the caller (whatever owner `request` names) and returns
    /// once it is ready. See [`Manager::create`] for the idempotency key.
    pub async fn create(&self, mut request: CreateRequest) -> Result<VmView, ManagerError> {
        request.owner = self.owner(Action::Create).await?;
        request.from = None;
        let vm = self.manager.create(request).await?;
        Ok(self.view(&vm))
    }

    /// Deletes a VM. Where a kept data volume went is told to admins only.
    pub async fn delete(
        &self,
        name: &VmName,
        options: DeleteOptions,
    ) -> Result<Deleted, ManagerError> {
        let vm = self.vm(Action::Delete, name).await?;
        let mut deleted = self
            .pinned(Some(&vm), None, self.manager.delete(name, options))
            .await?;
        if !self.caller.is_admin() {
            deleted.kept_data = None;
        }
        Ok(deleted)
    }

    async fn lifecycle<'a, F, Fut>(
        &'a self,
        action: Action,
        name: &'a VmName,
        operation: F,
    ) -> Result<VmView, ManagerError>
    where
        F: FnOnce(&'a Manager, &'a VmName) -> Fut,
        Fut: Future<Output = Result<VmRecord, ManagerError>>,
    {
        let vm = self.vm(action, name).await?;
        let vm = self
            .pinned(Some(&vm), None, operation(&self.manager, name))
            .await?;
        Ok(self.view(&vm))
    }

    /// Starts a stopped VM.
    pub async fn start(&self, name: &VmName) -> Result<VmView, ManagerError> {
        self.lifecycle(Action::Start, name, Manager::start).await
    }

    /// Stops a running or paused VM.
    pub async fn stop(&self, name: &VmName) -> Result<VmView, ManagerError> {
        self.lifecycle(Action::Stop, name, Manager::stop).await
    }

    /// Restarts a VM.
    pub async fn restart(&self, name: &VmName) -> Result<VmView, ManagerError> {
        self.lifecycle(Action::Restart, name, Manager::restart)
            .await
    }

    /// Pauses a running VM.
    pub async fn pause(&self, name: &VmName) -> Result<VmView, ManagerError> {
        self.lifecycle(Action::Pause, name, Manager::pause).await
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, name: &VmName) -> Result<VmView, ManagerError> {
        self.lifecycle(Action::Resume, name, Manager::resume).await
    }

    /// Resizes a VM.
    pub async fn resize(
        &self,
        name: &VmName,
        request: ResizeRequest,
    ) -> Result<VmView, ManagerError> {
        let vm = self.vm(Action::Resize, name).await?;
        let vm = self
            .pinned(Some(&vm), None, self.manager.resize(name, request))
            .await?;
        Ok(self.view(&vm))
    }

    /// Runs a command in a running VM.
    pub async fn exec(
        &self,
        name: &VmName,
        request: ExecRequest,
    ) -> Result<ExecStream, ManagerError> {
        let vm = self.vm(Action::Exec, name).await?;
        self.pinned(Some(&vm), None, self.manager.exec(name, request))
            .await
    }

    /// How a gateway reaches the caller's way into a running VM's own SSH server
    /// (needs SSH access to it). See [`SshTarget`](super::SshTarget).
    pub async fn ssh_target(&self, name: &VmName) -> Result<super::SshTarget, ManagerError> {
        let vm = self.vm(Action::UseSsh, name).await?;
        let mut target = self
            .pinned(Some(&vm), None, self.manager.ssh_target(name))
            .await?;
        target.vm = self.view(&vm);
        Ok(target)
    }

    /// Starts an interactive session in a running VM through its agent (needs SSH
    /// access to it): a shell with a terminal, or a command with its input
    /// streamed.
    pub async fn session(
        &self,
        name: &VmName,
        request: vmkit_guest::SessionRequest,
    ) -> Result<vmkit_guest::GuestSession, ManagerError> {
        let vm = self.vm(Action::Exec, name).await?;
        self.pinned(Some(&vm), None, self.manager.session(name, request))
            .await
    }

    /// The last `max_bytes` of a VM's console.
    pub async fn console(&self, name: &VmName, max_bytes: usize) -> Result<String, ManagerError> {
        let vm = self.vm(Action::Logs, name).await?;
        self.pinned(Some(&vm), None, self.manager.logs(name, max_bytes))
            .await
    }

    /// A unit's journal or a file in a running VM's guest.
    pub async fn guest_logs(
        &self,
        name: &VmName,
        request: LogsRequest,
    ) -> Result<Vec<String>, ManagerError> {
        let vm = self.vm(Action::Logs, name).await?;
        self.pinned(Some(&vm), None, self.manager.guest_logs(name, request))
            .await
    }

    /// A unit's journal or a file in a running VM's guest, followed.
    pub async fn follow_guest_logs(
        &self,
        name: &VmName,
        request: LogsRequest,
    ) -> Result<LogStream, ManagerError> {
        let vm = self.vm(Action::Logs, name).await?;
        self.pinned(
            Some(&vm),
            None,
            self.manager.follow_guest_logs(name, request),
        )
        .await
    }

    /// What a VM uses.
    pub async fn metrics(&self, name: &VmName) -> Result<MetricsView, ManagerError> {
        let vm = self.vm(Action::Metrics, name).await?;
        let metrics = self
            .pinned(Some(&vm), None, self.manager.metrics(name))
            .await?;
        Ok(MetricsView::of(metrics, &self.caller))
    }

    /// Snapshots a VM as `snapshot`; the snapshot is the VM owner's.
    pub async fn snapshot(
        &self,
        name: &VmName,
        snapshot: VmName,
    ) -> Result<SnapshotView, ManagerError> {
        let vm = self.vm(Action::Snapshot, name).await?;
        let taken = self
            .pinned(Some(&vm), None, self.manager.snapshot(name, snapshot))
            .await?;
        Ok(SnapshotView::of(&taken, &self.caller))
    }

    /// Restores a VM from one of the caller's snapshots (any, for an admin). With an
    /// idempotency key, the same restore asked again (after a client timeout) returns
    /// the VM as it is instead of restoring it a second time; the key is recorded
    /// once the restore is over (a crash in between lets a retry restore again).
    pub async fn restore(
        &self,
        name: &VmName,
        snapshot: &VmName,
        idempotency_key: Option<String>,
    ) -> Result<VmView, ManagerError> {
        let vm = self.vm(Action::Restore, name).await?;
        let from = self.snapshot_of(Action::Restore, snapshot).await?;
        let Some(key) = idempotency_key else {
            let vm = self
                .pinned(Some(&vm), Some(&from), self.manager.restore(name, snapshot))
                .await?;
            return Ok(self.view(&vm));
        };
        let mark = Idempotency {
            key: key.clone(),
            request: TokenHash::of(&format!("restore {} from {}", vm.id, from.id)),
        };
        let _key = self
            .manager
            .inner
            .idempotency_locks
            .lock(&(vm.owner, key.clone()))
            .await;
        let current = self.pinned(Some(&vm), None, self.manager.get(name)).await?;
        match &current.restored_with {
            Some(done) if done.key == key && done.request == mark.request => {
                return Ok(self.view(&current));
            }
            Some(done) if done.key == key => {
                return Err(ManagerError::IdempotencyKeyReused { key });
            }
            _ => {}
        }
        let restored = self
            .pinned(Some(&vm), Some(&from), async {
                let restored = self.manager.restore(name, snapshot).await?;
                self.manager.mark_restored(&restored, mark).await
            })
            .await?;
        Ok(self.view(&restored))
    }

    /// Copies a VM, or makes one from a snapshot, owned by the caller. With an
    /// idempotency key, asking again returns the first copy (see [`Manager::create`]).
    pub async fn clone_vm(
        &self,
        source: CloneSource,
        name: Option<VmName>,
        idempotency_key: Option<String>,
    ) -> Result<VmView, ManagerError> {
        let owner = self.owner(Action::Create).await?;
        let (vm, snapshot) = match &source {
            CloneSource::Vm(from) => (Some(self.vm(Action::Clone, from).await?), None),
            CloneSource::Snapshot(from) => (
                None,
                Some(self.snapshot_of(Action::CloneSnapshot, from).await?),
            ),
        };
        let copy = self
            .pinned(
                vm.as_ref(),
                snapshot.as_ref(),
                self.manager
                    .clone_keyed(source, name, owner, idempotency_key),
            )
            .await?;
        Ok(self.view(&copy))
    }

    /// The snapshots the caller owns (every one, for an admin).
    pub async fn snapshots(&self) -> Result<Vec<SnapshotView>, ManagerError> {
        self.host(Action::ListSnapshots).await?;
        let owner = match self.caller_now().await?.is_admin() {
            true => None,
            false => Some(self.owner(Action::ListSnapshots).await?),
        };
        let snapshots = self.manager.list_snapshots(owner).await?;
        Ok(snapshots
            .iter()
            .map(|s| SnapshotView::of(s, &self.caller))
            .collect())
    }

    /// Deletes one of the caller's snapshots.
    pub async fn delete_snapshot(&self, name: &VmName) -> Result<(), ManagerError> {
        let snapshot = self.snapshot_of(Action::DeleteSnapshot, name).await?;
        self.pinned(None, Some(&snapshot), self.manager.delete_snapshot(name))
            .await
    }

    /// Shares a VM. A link share answers its secret, once.
    pub async fn share(
        &self,
        name: &VmName,
        with: ShareWith,
        access: Access,
    ) -> Result<ShareView, ManagerError> {
        self.share_port(name, with, access, None).await
    }

    /// Shares a VM, web port `port` only when given (for [`Access::Http`]). A link
    /// share answers its secret, once.
    pub async fn share_port(
        &self,
        name: &VmName,
        with: ShareWith,
        access: Access,
        port: Option<u16>,
    ) -> Result<ShareView, ManagerError> {
        if port.is_some() && access != Access::Http {
            return Err(ManagerError::InvalidRequest(
                "only web access is shared per port; leave out the port for SSH or manage \
                 access"
                    .into(),
            ));
        }
        if port == Some(0) {
            return Err(ManagerError::InvalidRequest(
                "port 0 is not a port; give one from 1 to 65535".into(),
            ));
        }
        let vm = self.vm(Action::Share, name).await?;
        let store = &self.manager.inner.backends.store;
        let (target, secret) = match with {
            ShareWith::User(user) => {
                if store.get_user(user).await?.is_none() {
                    return Err(ManagerError::UserNotFound(user.to_string()));
                }
                (ShareTarget::User(user), None)
            }
            ShareWith::Public => (ShareTarget::Public, None),
            ShareWith::Link => {
                let secret = new_secret("vms_");
                (ShareTarget::Link(TokenHash::of(&secret)), Some(secret))
            }
        };
        let mut share = Share::new(vm.id, target, access);
        share.port = port;
        // Held across the write: a VM deleted meanwhile keeps no share.
        let _guard = self.manager.lock(name).await;
        if self
            .pinned(Some(&vm), None, self.manager.get(name))
            .await
            .is_err()
        {
            return Err(ManagerError::NotFound(name.clone()));
        }
        store.put_share(&share).await?;
        let mut view = ShareView::of(name, &share);
        view.secret = secret;
        Ok(view)
    }

    /// Takes back the shares of a VM with `with` (a user, everyone, or the link a
    /// [`ShareWithView::Link`] names) that grant `access` (every access when
    /// `None`); how many were taken back.
    pub async fn unshare(
        &self,
        name: &VmName,
        with: &ShareWithView,
        access: Option<Access>,
    ) -> Result<usize, ManagerError> {
        self.unshare_port(name, with, access, None).await
    }

    /// As [`Commands::unshare`], only the shares of web port `port` when given
    /// (every share, whatever its port, when `None`).
    pub async fn unshare_port(
        &self,
        name: &VmName,
        with: &ShareWithView,
        access: Option<Access>,
        port: Option<u16>,
    ) -> Result<usize, ManagerError> {
        let vm = self.vm(Action::Share, name).await?;
        let store = &self.manager.inner.backends.store;
        let mut removed = 0;
        for share in store.shares(vm.id).await? {
            let matches = match (&share.target, with) {
                (ShareTarget::User(u), ShareWithView::User(w)) => u == w,
                (ShareTarget::Public, ShareWithView::Public) => true,
                (ShareTarget::Link(hash), ShareWithView::Link(short)) => hash.short() == *short,
                _ => false,
            };
            if matches
                && access.is_none_or(|a| a == share.access)
                && port.is_none_or(|p| share.port == Some(p))
                && store.remove_share(&share).await?
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Sets the port `https://NAME.domain` reaches in the guest (`None`: 80). The
    /// VM's owner only, as sharing is.
    pub async fn set_http_port(
        &self,
        name: &VmName,
        port: Option<u16>,
    ) -> Result<VmView, ManagerError> {
        if port == Some(0) {
            return Err(ManagerError::InvalidRequest(
                "port 0 is not a port; give one from 1 to 65535".into(),
            ));
        }
        let vm = self.vm(Action::Share, name).await?;
        let store = &self.manager.inner.backends.store;
        let _guard = self.manager.lock(name).await;
        let mut current = store
            .get_vm(name)
            .await?
            .filter(|v| v.id == vm.id)
            .ok_or_else(|| ManagerError::NotFound(name.clone()))?;
        current.http_port = port.filter(|p| *p != crate::gateway::DEFAULT_HTTP_PORT);
        current.updated_at = Timestamp::now();
        store.update_vm(&current).await?;
        Ok(VmView::of(&current, &self.caller))
    }

    /// Turns a share link the caller holds into a lasting share with them: a share
    /// with the caller of what the link's share of `name` grants (the same access
    /// and port). The link itself stays. `None` when `secret` is no link of the VM.
    pub async fn accept_share_link(
        &self,
        name: &VmName,
        secret: &str,
    ) -> Result<Option<ShareView>, ManagerError> {
        let Some(user) = self.caller.owner() else {
            return Err(ManagerError::Denied(Denied::SignInRequired {
                action: Action::Share,
            }));
        };
        let store = &self.manager.inner.backends.store;
        let Some(vm) = store.get_vm(name).await? else {
            return Ok(None);
        };
        let hash = TokenHash::of(secret);
        let Some(link) = store
            .shares(vm.id)
            .await?
            .into_iter()
            .find(|s| matches!(&s.target, ShareTarget::Link(h) if *h == hash))
        else {
            return Ok(None);
        };
        if vm.owner == user {
            return Ok(Some(ShareView::of(name, &link)));
        }
        let mut share = Share::new(vm.id, ShareTarget::User(user), link.access);
        share.port = link.port;
        let _guard = self.manager.lock(name).await;
        match store.get_vm(name).await? {
            Some(v) if v.id == vm.id => {}
            _ => return Ok(None),
        }
        store.put_share(&share).await?;
        Ok(Some(ShareView::of(name, &share)))
    }

    /// A one-time link's secret that signs the caller's browser in
    /// (`ssh HOST browser`); see [`WebSessions`](crate::WebSessions).
    pub async fn sign_in_link(&self) -> Result<String, ManagerError> {
        self.no_api_key()?;
        let Some(user) = self.caller_now().await?.owner() else {
            return Err(ManagerError::Denied(Denied::SignInRequired {
                action: Action::Share,
            }));
        };
        Ok(
            crate::web::WebSessions::new(self.manager.inner.backends.store.clone())
                .sign_in_link(user)
                .await?,
        )
    }

    /// Signs the caller out of every browser session; how many ended.
    pub async fn sign_out_everywhere(&self) -> Result<usize, ManagerError> {
        self.no_api_key()?;
        let Some(user) = self.caller_now().await?.owner() else {
            return Err(ManagerError::Denied(Denied::SignInRequired {
                action: Action::Share,
            }));
        };
        Ok(
            crate::web::WebSessions::new(self.manager.inner.backends.store.clone())
                .sign_out_everywhere(user)
                .await?,
        )
    }

    /// A VM's shares.
    pub async fn shares(&self, name: &VmName) -> Result<Vec<ShareView>, ManagerError> {
        let vm = self.vm(Action::ListShares, name).await?;
        let shares = self.manager.inner.backends.store.shares(vm.id).await?;
        Ok(shares.iter().map(|s| ShareView::of(name, s)).collect())
    }

    /// The images VMs can be made from.
    pub async fn images(&self) -> Result<Vec<String>, ManagerError> {
        self.host(Action::ListImages).await?;
        Ok(self.manager.inner.backends.images.list().await?)
    }

    /// The caller's SSH keys.
    pub async fn ssh_keys(&self) -> Result<Vec<SshPublicKey>, ManagerError> {
        let owner = self.owner(Action::ListKeys).await?;
        self.manager.ssh_keys(owner).await
    }

    /// Registers an SSH key for the caller.
    pub async fn add_ssh_key(&self, key: &SshPublicKey) -> Result<(), ManagerError> {
        let owner = self.owner(Action::AddKey).await?;
        self.manager.add_ssh_key(owner, key).await
    }

    /// Removes one of the caller's SSH keys.
    pub async fn remove_ssh_key(&self, fingerprint: &str) -> Result<(), ManagerError> {
        let owner = self.owner(Action::RemoveKey).await?;
        self.manager.remove_ssh_key(owner, fingerprint).await
    }

    /// Checks that the caller may read the host's event log; the log itself is read
    /// with the manager's event methods ([`Manager::events`], [`Manager::follow_events`]).
    pub async fn may_read_events(&self) -> Result<(), ManagerError> {
        self.host(Action::Events).await
    }

    /// Up to `limit` events after `after` (the newest `limit` when `None`).
    pub async fn events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Event>, ManagerError> {
        self.may_read_events().await?;
        match after {
            Some(after) => self.manager.events(after, limit).await,
            None => self.manager.newest_events(limit).await,
        }
    }

    // ---- users and invites: admins' ----

    /// Registers the caller (anyone, before they have an account) as the host's
    /// registration policy allows ([`Manager::register`]).
    pub async fn register(&self, registration: Registration) -> Result<User, ManagerError> {
        self.host(Action::Register).await?;
        self.manager.register(registration).await
    }

    /// Adds a user, under any registration policy.
    pub async fn add_user(&self, new: NewUser) -> Result<User, ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.add_user(new).await
    }

    /// The registered users.
    pub async fn users(&self) -> Result<Vec<User>, ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.users().await
    }

    /// A user by handle.
    pub async fn user(&self, handle: &Handle) -> Result<User, ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.user(handle).await
    }

    /// A user's SSH keys.
    pub async fn keys_of(&self, user: UserId) -> Result<Vec<SshPublicKey>, ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.ssh_keys(user).await
    }

    /// Suspends a user or lets them back in.
    pub async fn set_suspended(
        &self,
        handle: &Handle,
        suspended: bool,
    ) -> Result<User, ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.set_suspended(handle, suspended).await
    }

    /// Changes a user's role.
    pub async fn set_role(&self, handle: &Handle, role: Role) -> Result<User, ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.set_role(handle, role).await
    }

    /// Removes a user, deleting their VMs and snapshots or handing them over.
    pub async fn remove_user(
        &self,
        handle: &Handle,
        disposition: VmDisposition,
    ) -> Result<(), ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.remove_user(handle, disposition).await
    }

    /// Makes an invite on the caller's behalf; its code is answered this once.
    pub async fn new_invite(
        &self,
        ttl: std::time::Duration,
        role: Role,
    ) -> Result<(Invite, String), ManagerError> {
        let by = self.owner(Action::ManageUsers).await?;
        self.manager.new_invite(by, ttl, role).await
    }

    /// The invites.
    pub async fn invites(&self) -> Result<Vec<Invite>, ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.invites().await
    }

    /// Deletes an invite.
    pub async fn delete_invite(&self, id: &str) -> Result<(), ManagerError> {
        self.host(Action::ManageUsers).await?;
        self.manager.delete_invite(id).await
    }

    /// Refuses a caller identified by an API key: a browser session is a person's.
    fn no_api_key(&self) -> Result<(), ManagerError> {
        match &self.caller.api_key {
            Some(_) => Err(ManagerError::Denied(Denied::KeyLimited {
                action: Action::ManageApiKeys,
                why: "a browser is signed in by a person at a door with their SSH key, \
                      never with an API key",
            })),
            None => Ok(()),
        }
    }

    // ---- API keys: a person's own ----

    /// Makes an API key for the caller, labelled `label`, expiring after
    /// `expires_in` (never when `None`), with `scope`, limited to the VM `vm` (one
    /// the caller sees) if named. The answer holds the secret, this once. A caller
    /// identified by an API key is refused: keys are made by a person.
    pub async fn create_api_key(
        &self,
        label: &str,
        expires_in: Option<std::time::Duration>,
        scope: ApiKeyScope,
        vm: Option<&VmName>,
    ) -> Result<ApiKeyView, ManagerError> {
        let owner = self.owner(Action::ManageApiKeys).await?;
        let label = label.trim();
        if label.chars().count() > MAX_API_KEY_LABEL_LEN || label.chars().any(char::is_control) {
            return Err(ManagerError::InvalidRequest(format!(
                "an API key's label is at most {MAX_API_KEY_LABEL_LEN} characters, none of \
                 them control characters"
            )));
        }
        let vm = match vm {
            Some(name) => Some(self.vm(Action::Get, name).await?),
            None => None,
        };
        let (mut key, secret) = ApiKey::generate(owner);
        key = key.label(label).scope(scope);
        if let Some(ttl) = expires_in {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let at = Timestamp(key.created_at.0.saturating_add(ms));
            key = key.expires_at(at);
        }
        if let Some(vm) = &vm {
            key = key.vm(vm.id);
        }
        self.manager.inner.backends.store.put_api_key(&key).await?;
        let mut view = self.api_key_view(&key).await?;
        view.secret = Some(secret);
        Ok(view)
    }

    /// The caller's API keys, oldest first (never their hashes or secrets).
    pub async fn api_keys(&self) -> Result<Vec<ApiKeyView>, ManagerError> {
        let owner = self.owner(Action::ManageApiKeys).await?;
        let mut keys = self
            .manager
            .inner
            .backends
            .store
            .list_api_keys(owner)
            .await?;
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut views = Vec::with_capacity(keys.len());
        for key in &keys {
            views.push(self.api_key_view(key).await?);
        }
        Ok(views)
    }

    /// Revokes one of the caller's API keys: it identifies nobody from now on.
    pub async fn revoke_api_key(&self, id: &str) -> Result<(), ManagerError> {
        let owner = self.owner(Action::ManageApiKeys).await?;
        let store = &self.manager.inner.backends.store;
        match store.get_api_key(id).await? {
            Some(key) if key.user == owner => {
                store.delete_api_key(id).await?;
                Ok(())
            }
            _ => Err(ManagerError::ApiKeyNotFound(id.to_owned())),
        }
    }

    async fn api_key_view(&self, key: &ApiKey) -> Result<ApiKeyView, ManagerError> {
        let vm = match key.vm {
            Some(id) => Some(
                match self.manager.inner.backends.store.get_vm_by_id(id).await? {
                    Some(vm) => vm.name.to_string(),
                    None => format!("{id} (deleted)"),
                },
            ),
            None => None,
        };
        Ok(ApiKeyView {
            id: key.id.clone(),
            label: key.label.clone(),
            scope: key.scope,
            vm,
            created_at: key.created_at,
            expires_at: key.expires_at,
            expired: key.expired(Timestamp::now()),
            last_used_at: key.last_used_at,
            secret: None,
        })
    }

    /// Renames a VM the caller owns, in a settled state ([`Manager::rename`]).
    pub async fn rename(&self, name: &VmName, new: VmName) -> Result<VmView, ManagerError> {
        let vm = self.vm(Action::Rename, name).await?;
        let vm = self
            .pinned(Some(&vm), None, self.manager.rename(name, new))
            .await?;
        Ok(self.view(&vm))
    }
}
