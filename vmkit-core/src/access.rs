//! Who is asking, and what they may do: the one access policy every door applies.
//!
//! Every operation of the command surface ([`Manager::commands`](crate::Manager::commands))
//! is an [`Action`]. Each action says what it needs ([`Action::needs`]) and, for one on
//! a VM, in which states it is allowed ([`Action::allowed_states`]). [`Policy`] decides
//! from the [`Caller`] and, for a VM, the VM's record and shares as one lookup read them:
//!
//! - the local operator (the root-only socket) and admins may do everything;
//! - an owner may do everything to their VMs and snapshots;
//! - a share grants what it names ([`Access`]): the VM's web ports, SSH (a shell,
//!   `exec`, logs from inside the guest), or management (start, stop, restart, pause,
//!   resume, resize, snapshot, restore, clone). Deleting, sharing and the snapshots stay
//!   the owner's. Any share lets its holder see the VM (get, metrics);
//! - a suspended user may do nothing but ask who they are;
//! - a VM the caller may not see answers [`Denied::NotFound`], exactly as one that does
//!   not exist; one they see but may not act on answers [`Denied::Forbidden`];
//! - a caller identified by an API key is held to its limits ([`KeyLimits`]): a
//!   read-only key may only read, a key limited to one VM sees and acts on that VM
//!   only, and no key makes or revokes keys ([`Denied::KeyLimited`]).

use serde::{Deserialize, Serialize};

use crate::share::{Access, Share, ShareTarget};
use crate::token::TokenHash;
use crate::user::{ApiKey, ApiKeyScope, Role, User, UserId, UserStatus};
use crate::vm::{VmId, VmRecord};
use crate::vm_state::VmState;

/// The door a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Door {
    /// The daemon's root-only Unix socket (the `vmkit` CLI).
    Socket,
    /// The SSH gateway (the lobby, or SSH into a VM).
    Ssh,
    /// The HTTPS edge (a VM's web port) or the HTTPS API.
    Https,
    /// The MCP tool server.
    Mcp,
    /// The web dashboard.
    Dashboard,
    /// A program embedding vmkit-core that calls the command surface itself.
    Library,
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
#[non_exhaustive]
pub enum Principal {
    /// The host's operator, on the root-only socket: an admin, owner of the VMs made
    /// there ([`UserId::LOCAL`]).
    Operator,
    /// A registered user, as their record stood when they were identified.
    User {
        /// Their id.
        id: UserId,
        /// Their role.
        role: Role,
        /// Whether they are suspended.
        suspended: bool,
    },
    /// Someone presenting a share link: the hash of the secret they presented, which
    /// grants what a [`ShareTarget::Link`] share with that hash names.
    Link(TokenHash),
    /// Nobody in particular.
    Anonymous,
}

/// The limits of the API key a caller was identified by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KeyLimits {
    /// The key's id.
    pub id: String,
    /// What it may do.
    pub scope: ApiKeyScope,
    /// The one VM it may see and act on, if limited to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmId>,
}

impl KeyLimits {
    /// The limits of `key`.
    pub fn of(key: &ApiKey) -> Self {
        Self {
            id: key.id.clone(),
            scope: key.scope,
            vm: key.vm,
        }
    }
}

/// A principal and the door they came through: what every operation of the command
/// surface takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Caller {
    /// Who.
    pub principal: Principal,
    /// Through which door.
    pub door: Door,
    /// The limits of the API key the caller was identified by; `None` for a
    /// person at a door with their SSH key or a session, or the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<KeyLimits>,
}

impl Caller {
    /// The local operator on the root-only socket.
    pub fn operator() -> Self {
        Self {
            principal: Principal::Operator,
            door: Door::Socket,
            api_key: None,
        }
    }

    /// `user` as their record stands, coming through `door`.
    pub fn user(user: &User, door: Door) -> Self {
        Self {
            principal: Principal::User {
                id: user.id,
                role: user.role,
                suspended: user.status == UserStatus::Suspended,
            },
            door,
            api_key: None,
        }
    }

    /// The same principal, identified by the API key `key` and held to its limits.
    pub fn with_api_key(mut self, key: &ApiKey) -> Self {
        self.api_key = Some(KeyLimits::of(key));
        self
    }

    /// Someone holding the share link `secret`, coming through `door`.
    pub fn link(secret: &str, door: Door) -> Self {
        Self {
            principal: Principal::Link(TokenHash::of(secret)),
            door,
            api_key: None,
        }
    }

    /// Nobody in particular, coming through `door`.
    pub fn anonymous(door: Door) -> Self {
        Self {
            principal: Principal::Anonymous,
            door,
            api_key: None,
        }
    }

    /// The same principal coming through another door.
    pub fn via(mut self, door: Door) -> Self {
        self.door = door;
        self
    }

    /// Whether the caller may do everything (the operator, an active admin).
    pub fn is_admin(&self) -> bool {
        match &self.principal {
            Principal::Operator => true,
            Principal::User {
                role, suspended, ..
            } => *role == Role::Admin && !suspended,
            _ => false,
        }
    }

    /// The user things the caller makes belong to: the operator's own id for the
    /// operator, the user's for a user; `None` for a link holder or anonymous.
    pub fn owner(&self) -> Option<UserId> {
        match &self.principal {
            Principal::Operator => Some(UserId::LOCAL),
            Principal::User { id, .. } => Some(*id),
            _ => None,
        }
    }

    fn suspended(&self) -> bool {
        matches!(
            self.principal,
            Principal::User {
                suspended: true,
                ..
            }
        )
    }
}

/// What an action on a VM needs of the caller, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Grant {
    /// To see the VM: any share, or ownership.
    See,
    /// Its web ports: an [`Access::Http`] share.
    Http,
    /// A shell in it: an [`Access::Ssh`] share.
    Ssh,
    /// Its lifecycle: an [`Access::Manage`] share.
    Manage,
    /// Ownership (or admin).
    Own,
}

/// What an action needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Needs {
    /// Anyone may ask, signed in or not.
    Anyone,
    /// A signed-in user (or the operator), not suspended.
    SignedIn,
    /// An admin (or the operator).
    Admin,
    /// This grant on the VM the action names.
    Vm(Grant),
    /// Ownership of the snapshot the action names (or admin).
    Snapshot,
}

macro_rules! actions {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, $needs:expr, $states:expr; )*) => {
        /// Every operation of the command surface: one catalogue that each door
        /// adapts, with what each needs and in which VM states it is allowed.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[non_exhaustive]
        pub enum Action {
            $( $(#[$doc])* $variant, )*
        }

        impl Action {
            /// Every action.
            pub const ALL: &'static [Action] = &[$(Action::$variant),*];

            /// The action's name as errors and logs say it (`start`, `create`, ...).
            pub fn as_str(self) -> &'static str {
                match self { $(Action::$variant => $name,)* }
            }

            /// What the caller needs for it.
            pub fn needs(self) -> Needs {
                match self { $(Action::$variant => $needs,)* }
            }

            /// The VM states in which it is allowed; `None` when it names no VM or
            /// any state will do.
            pub fn allowed_states(self) -> Option<&'static [VmState]> {
                match self { $(Action::$variant => $states,)* }
            }
        }
    };
}

const ANY: Option<&[VmState]> = None;
/// States a VM may be started from.
pub(crate) const STOPPED: &[VmState] = &[VmState::Stopped];
/// States a VM may be stopped from.
pub(crate) const RUNNING_OR_PAUSED: &[VmState] = &[VmState::Running, VmState::Paused];
/// States a VM may be paused, or reached inside, from.
pub(crate) const RUNNING: &[VmState] = &[VmState::Running];
/// States a VM may be resumed from.
pub(crate) const PAUSED: &[VmState] = &[VmState::Paused];
/// States a VM may be restarted, resized, renamed, snapshotted, restored or cloned
/// from.
pub(crate) const SETTLED: &[VmState] = &[VmState::Running, VmState::Paused, VmState::Stopped];

actions! {
    /// Who the caller is.
    Whoami => "whoami", Needs::Anyone, ANY;
    /// Register an account (as the host's registration policy allows).
    Register => "register", Needs::Anyone, ANY;
    /// List the VMs the caller may see.
    ListVms => "list VMs", Needs::SignedIn, ANY;
    /// Create a VM owned by the caller.
    Create => "create", Needs::SignedIn, ANY;
    /// List the images VMs can be made from.
    ListImages => "list images", Needs::SignedIn, ANY;
    /// List the caller's SSH keys.
    ListKeys => "list SSH keys", Needs::SignedIn, ANY;
    /// Register an SSH key for the caller.
    AddKey => "add an SSH key", Needs::SignedIn, ANY;
    /// Remove one of the caller's SSH keys.
    RemoveKey => "remove an SSH key", Needs::SignedIn, ANY;
    /// List the snapshots the caller may see.
    ListSnapshots => "list snapshots", Needs::SignedIn, ANY;
    /// Read the host's event log (every VM's events).
    Events => "read events", Needs::Admin, ANY;
    /// Manage users and invites.
    ManageUsers => "manage users", Needs::Admin, ANY;
    /// See a VM.
    Get => "get", Needs::Vm(Grant::See), ANY;
    /// Read a VM's metrics.
    Metrics => "read metrics of", Needs::Vm(Grant::See), Some(RUNNING_OR_PAUSED);
    /// Reach a VM's web ports.
    UseHttp => "reach the web ports of", Needs::Vm(Grant::Http), Some(RUNNING);
    /// SSH into a VM.
    UseSsh => "ssh into", Needs::Vm(Grant::Ssh), Some(RUNNING);
    /// Run a command in a VM.
    Exec => "exec", Needs::Vm(Grant::Ssh), Some(RUNNING);
    /// Read a VM's console or its logs inside.
    Logs => "read logs of", Needs::Vm(Grant::Ssh), ANY;
    /// Start a VM.
    Start => "start", Needs::Vm(Grant::Manage), Some(STOPPED);
    /// Stop a VM.
    Stop => "stop", Needs::Vm(Grant::Manage), Some(RUNNING_OR_PAUSED);
    /// Restart a VM.
    Restart => "restart", Needs::Vm(Grant::Manage), Some(SETTLED);
    /// Pause a VM.
    Pause => "pause", Needs::Vm(Grant::Manage), Some(RUNNING);
    /// Resume a VM.
    Resume => "resume", Needs::Vm(Grant::Manage), Some(PAUSED);
    /// Resize a VM.
    Resize => "resize", Needs::Vm(Grant::Manage), Some(SETTLED);
    /// Snapshot a VM.
    Snapshot => "snapshot", Needs::Vm(Grant::Manage), Some(SETTLED);
    /// Restore a VM from one of the caller's snapshots.
    Restore => "restore", Needs::Vm(Grant::Manage), Some(SETTLED);
    /// Copy a VM into a new one owned by the caller.
    Clone => "clone", Needs::Vm(Grant::Manage), Some(SETTLED);
    /// Delete a VM.
    Delete => "delete", Needs::Vm(Grant::Own), ANY;
    /// Rename a VM (its URL and `ssh NAME@host` change with it).
    Rename => "rename", Needs::Vm(Grant::Own), Some(SETTLED);
    /// Share a VM, or take a share back.
    Share => "share", Needs::Vm(Grant::Own), ANY;
    /// List a VM's shares.
    ListShares => "list the shares of", Needs::Vm(Grant::Own), ANY;
    /// Make, list or revoke one's own API keys (a person's, never a key's).
    ManageApiKeys => "manage API keys", Needs::SignedIn, ANY;
    /// Delete a snapshot.
    DeleteSnapshot => "delete snapshot", Needs::Snapshot, ANY;
    /// Make a VM from a snapshot.
    CloneSnapshot => "clone snapshot", Needs::Snapshot, ANY;
}

impl Action {
    /// Whether the action only reads (lists, details, logs, metrics, shares, who
    /// am I): all a read-only API key may do.
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Action::Whoami
                | Action::ListVms
                | Action::ListImages
                | Action::ListKeys
                | Action::ListSnapshots
                | Action::Events
                | Action::Get
                | Action::Metrics
                | Action::Logs
                | Action::ListShares
        )
    }

    /// Whether a key limited to one VM may take the action, which names no VM:
    /// asking who it is, listing (the one VM) and the images.
    fn open_to_one_vm_keys(self) -> bool {
        matches!(self, Action::Whoami | Action::ListVms | Action::ListImages)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the policy refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// The VM (or snapshot) is not one the caller may see: answered exactly as one
    /// that does not exist.
    #[error("no such VM or snapshot")]
    NotFound,
    /// The caller sees the VM but may not do this to it.
    #[error("you may not {action} this VM: {why}")]
    Forbidden {
        /// What was refused.
        action: Action,
        /// What it would take.
        why: &'static str,
    },
    /// The action needs a signed-in user.
    #[error("sign in first: {action} needs an account")]
    SignInRequired {
        /// What was refused.
        action: Action,
    },
    /// The caller's account is suspended.
    #[error("your account is suspended; ask the host's operator")]
    Suspended,
    /// The action is the host's admins' only.
    #[error("only the host's admins may {action}")]
    AdminOnly {
        /// What was refused.
        action: Action,
    },
    /// The API key the caller was identified by does not allow the action.
    #[error("this API key may not {action}: {why}")]
    KeyLimited {
        /// What was refused.
        action: Action,
        /// Which limit refused it.
        why: &'static str,
    },
}

/// An access policy: the decisions of the command surface. Each decision is made
/// from what one lookup read (the VM's record and shares), so that what it decided
/// on is what the operation then acts on. [`Policy`] is vmkit's; an integrator with
/// other rules implements this and hands it to the manager
/// ([`Backends::with_policy`](crate::Backends::with_policy)).
pub trait AccessPolicy: Send + Sync {
    /// May `caller` take `action`, which names no VM or snapshot?
    fn host(&self, caller: &Caller, action: Action) -> Result<(), Denied>;
    /// May `caller` take `action` on `vm`, whose shares are `shares`?
    fn vm(
        &self,
        caller: &Caller,
        action: Action,
        vm: &VmRecord,
        shares: &[Share],
    ) -> Result<(), Denied>;
    /// May `caller` take `action` on a snapshot owned by `owner`?
    fn snapshot(&self, caller: &Caller, action: Action, owner: UserId) -> Result<(), Denied>;
    /// Whether `vm` belongs in `caller`'s lists.
    fn lists(&self, caller: &Caller, vm: &VmRecord, shares: &[Share]) -> bool;
}

impl AccessPolicy for Policy {
    fn host(&self, caller: &Caller, action: Action) -> Result<(), Denied> {
        Policy::host(self, caller, action)
    }
    fn vm(
        &self,
        caller: &Caller,
        action: Action,
        vm: &VmRecord,
        shares: &[Share],
    ) -> Result<(), Denied> {
        Policy::vm(self, caller, action, vm, shares)
    }
    fn snapshot(&self, caller: &Caller, action: Action, owner: UserId) -> Result<(), Denied> {
        Policy::snapshot(self, caller, action, owner)
    }
    fn lists(&self, caller: &Caller, vm: &VmRecord, shares: &[Share]) -> bool {
        Policy::lists(self, caller, vm, shares)
    }
}

/// vmkit's access policy. Stateless.
///
/// - the local operator (the root-only socket) and admins may do everything;
/// - an owner may do everything to their VMs and snapshots;
/// - a share grants what it names ([`Access`]): the VM's web ports, SSH (a shell,
///   `exec`, its logs), or management (start, stop, restart, pause, resume, resize,
///   snapshot, restore from one's own snapshots, clone). Deleting and sharing stay
///   the owner's, and so do snapshots. Any share lets its holder see the VM (get,
///   metrics); only shares with a user by name put it in that user's lists;
/// - a suspended user may do nothing but ask who they are; anonymous callers and
///   link holders can act only on what public and link shares grant;
/// - a VM the caller may not see answers [`Denied::NotFound`], exactly as one that
///   does not exist; one they see but may not act on answers [`Denied::Forbidden`].
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct Policy;

impl Policy {
    /// May `caller` take `action`, which names no VM or snapshot?
    pub fn host(&self, caller: &Caller, action: Action) -> Result<(), Denied> {
        if caller.suspended() && action != Action::Whoami {
            return Err(Denied::Suspended);
        }
        key_limits(caller, action)?;
        match action.needs() {
            Needs::Anyone => Ok(()),
            Needs::SignedIn if caller.owner().is_some() => Ok(()),
            Needs::SignedIn => Err(Denied::SignInRequired { action }),
            Needs::Admin if caller.is_admin() => Ok(()),
            Needs::Admin if caller.owner().is_none() => Err(Denied::SignInRequired { action }),
            Needs::Admin => Err(Denied::AdminOnly { action }),
            // An action on a VM or snapshot asked without one: nothing to see.
            Needs::Vm(_) | Needs::Snapshot => Err(Denied::NotFound),
        }
    }

    /// May `caller` take `action` on `vm`, whose shares are `shares`?
    pub fn vm(
        &self,
        caller: &Caller,
        action: Action,
        vm: &VmRecord,
        shares: &[Share],
    ) -> Result<(), Denied> {
        let Needs::Vm(needed) = action.needs() else {
            return self.host(caller, action);
        };
        if caller.suspended() {
            return Err(Denied::Suspended);
        }
        if !key_reaches(caller, vm) {
            return Err(Denied::NotFound);
        }
        let held = self.grants(caller, vm, shares);
        if held.is_empty() {
            return Err(Denied::NotFound);
        }
        key_limits(caller, action)?;
        let allowed = held.contains(&Grant::Own) || held.contains(&needed) || needed == Grant::See;
        if allowed {
            return Ok(());
        }
        Err(Denied::Forbidden {
            action,
            why: match needed {
                Grant::Http => "it takes a share of its web ports",
                Grant::Ssh => "it takes a share with SSH access",
                Grant::Manage => "it takes a share with manage access",
                _ => "only its owner may",
            },
        })
    }

    /// May `caller` take `action` on a snapshot owned by `owner`? A snapshot is its
    /// owner's (and the admins') alone: anyone else is told it does not exist.
    pub fn snapshot(&self, caller: &Caller, action: Action, owner: UserId) -> Result<(), Denied> {
        if caller.suspended() {
            return Err(Denied::Suspended);
        }
        if caller.is_admin() || caller.owner() == Some(owner) {
            return key_limits(caller, action);
        }
        Err(Denied::NotFound)
    }

    /// Whether `caller` may see `vm` at all.
    pub fn sees(&self, caller: &Caller, vm: &VmRecord, shares: &[Share]) -> bool {
        self.vm(caller, Action::Get, vm, shares).is_ok()
    }

    /// Whether `vm` belongs in `caller`'s lists: theirs, shared with them by name
    /// (not merely public or by link), or everything for an admin.
    pub fn lists(&self, caller: &Caller, vm: &VmRecord, shares: &[Share]) -> bool {
        if caller.suspended() || !key_reaches(caller, vm) {
            return false;
        }
        if caller.is_admin() || caller.owner() == Some(vm.owner) {
            return true;
        }
        let Some(me) = caller.owner() else {
            return false;
        };
        shares
            .iter()
            .any(|s| s.vm == vm.id && s.target == ShareTarget::User(me))
    }

    /// What `caller` holds on `vm`: empty when they may not even see it.
    fn grants(&self, caller: &Caller, vm: &VmRecord, shares: &[Share]) -> Vec<Grant> {
        if caller.is_admin() || caller.owner() == Some(vm.owner) {
            return vec![Grant::Own];
        }
        let mut held: Vec<Grant> = shares
            .iter()
            .filter(|s| s.vm == vm.id && share_applies(&s.target, caller))
            .map(|s| match s.access {
                Access::Http => Grant::Http,
                Access::Ssh => Grant::Ssh,
                Access::Manage => Grant::Manage,
            })
            .collect();
        if !held.is_empty() {
            held.push(Grant::See);
        }
        held
    }
}

/// Whether the caller's API key, if any, reaches `vm`: a key limited to another VM
/// does not (and the VM is then as one that does not exist).
fn key_reaches(caller: &Caller, vm: &VmRecord) -> bool {
    match &caller.api_key {
        Some(KeyLimits { vm: Some(only), .. }) => *only == vm.id,
        _ => true,
    }
}

/// Whether the caller's API key, if any, allows `action`.
fn key_limits(caller: &Caller, action: Action) -> Result<(), Denied> {
    let Some(key) = &caller.api_key else {
        return Ok(());
    };
    let why = if action == Action::ManageApiKeys {
        "API keys are made and revoked by a person signed in with their SSH key or a \
         browser session, never with another key"
    } else if key.scope == ApiKeyScope::ReadOnly && !action.is_read() {
        "it is read-only"
    } else if key.vm.is_some()
        && !matches!(action.needs(), Needs::Vm(_))
        && !action.open_to_one_vm_keys()
    {
        "it is limited to one VM"
    } else {
        return Ok(());
    };
    Err(Denied::KeyLimited { action, why })
}

fn share_applies(target: &ShareTarget, caller: &Caller) -> bool {
    match (target, &caller.principal) {
        (ShareTarget::Public, _) => true,
        (ShareTarget::User(u), Principal::User { id, .. }) => u == id,
        (ShareTarget::Link(stored), Principal::Link(presented)) => stored == presented,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::VmName;
    use crate::spec::VmSpec;
    use crate::vm::VmId;

    const OWNER: UserId = UserId(1);
    const FRIEND: UserId = UserId(2);
    const STRANGER: UserId = UserId(3);

    fn member(id: UserId, role: Role, suspended: bool) -> Caller {
        Caller {
            principal: Principal::User {
                id,
                role,
                suspended,
            },
            door: Door::Library,
            api_key: None,
        }
    }

    fn vm() -> VmRecord {
        VmRecord::new(VmName::new("web").unwrap(), OWNER, VmSpec::new("tiny"))
    }

    #[test]
    fn every_vm_action_names_what_it_needs_and_host_actions_name_no_states() {
        for action in Action::ALL {
            if !matches!(action.needs(), Needs::Vm(_)) {
                assert_eq!(action.allowed_states(), None, "{action:?}");
            }
            assert!(!action.as_str().is_empty());
        }
    }

    #[test]
    fn a_vm_a_caller_may_not_see_is_not_found_and_one_they_see_is_forbidden() {
        let vm = vm();
        let share = Share::new(vm.id, ShareTarget::User(FRIEND), Access::Http);
        let policy = Policy;
        let stranger = member(STRANGER, Role::User, false);
        assert_eq!(
            policy.vm(&stranger, Action::Stop, &vm, std::slice::from_ref(&share)),
            Err(Denied::NotFound)
        );
        let friend = member(FRIEND, Role::User, false);
        assert!(matches!(
            policy.vm(&friend, Action::Stop, &vm, std::slice::from_ref(&share)),
            Err(Denied::Forbidden { .. })
        ));
        assert_eq!(
            policy.vm(&friend, Action::UseHttp, &vm, std::slice::from_ref(&share)),
            Ok(())
        );
        // A share of another VM grants nothing here.
        let elsewhere = Share::new(VmId::generate(), ShareTarget::User(FRIEND), Access::Manage);
        assert_eq!(
            policy.vm(&friend, Action::Get, &vm, &[elsewhere]),
            Err(Denied::NotFound)
        );
    }

    #[test]
    fn a_link_grants_only_to_its_secret() {
        let vm = vm();
        let share = Share::new(
            vm.id,
            ShareTarget::Link(TokenHash::of("vms_right")),
            Access::Http,
        );
        let policy = Policy;
        let right = Caller::link("vms_right", Door::Https);
        let wrong = Caller::link("vms_wrong", Door::Https);
        let shares = std::slice::from_ref(&share);
        assert_eq!(policy.vm(&right, Action::UseHttp, &vm, shares), Ok(()));
        assert_eq!(
            policy.vm(&wrong, Action::UseHttp, &vm, shares),
            Err(Denied::NotFound)
        );
        assert!(!policy.lists(&right, &vm, shares), "a link lists nothing");
    }

    fn keyed(id: UserId, role: Role, scope: ApiKeyScope, vm: Option<VmId>) -> Caller {
        let mut key = ApiKey::new("k", id, "vmk_k_secret").scope(scope);
        key.vm = vm;
        member(id, role, false).with_api_key(&key)
    }

    #[test]
    fn a_read_only_key_may_take_only_reading_actions() {
        let vm = vm();
        let policy = Policy;
        let key = keyed(OWNER, Role::Admin, ApiKeyScope::ReadOnly, None);
        for action in Action::ALL {
            let decided = match action.needs() {
                Needs::Vm(_) => policy.vm(&key, *action, &vm, &[]),
                Needs::Snapshot => policy.snapshot(&key, *action, OWNER),
                _ => policy.host(&key, *action),
            };
            match action.is_read() {
                true => assert_eq!(decided, Ok(()), "{action:?}"),
                false => assert!(
                    matches!(decided, Err(Denied::KeyLimited { .. })),
                    "{action:?}: {decided:?}"
                ),
            }
        }
    }

    #[test]
    fn a_key_limited_to_one_vm_finds_no_other_and_makes_none() {
        let (mine, other) = (vm(), vm());
        let policy = Policy;
        let key = keyed(OWNER, Role::Admin, ApiKeyScope::Full, Some(mine.id));
        assert_eq!(policy.vm(&key, Action::Delete, &mine, &[]), Ok(()));
        assert_eq!(
            policy.vm(&key, Action::Get, &other, &[]),
            Err(Denied::NotFound)
        );
        assert!(policy.lists(&key, &mine, &[]) && !policy.lists(&key, &other, &[]));
        for action in [
            Action::Create,
            Action::ListSnapshots,
            Action::AddKey,
            Action::Events,
        ] {
            assert!(
                matches!(policy.host(&key, action), Err(Denied::KeyLimited { .. })),
                "{action:?}"
            );
        }
        assert_eq!(policy.host(&key, Action::ListVms), Ok(()));
        assert!(matches!(
            policy.host(&key, Action::ManageApiKeys),
            Err(Denied::KeyLimited { .. })
        ));
        let person = member(OWNER, Role::User, false);
        assert_eq!(policy.host(&person, Action::ManageApiKeys), Ok(()));
    }

    #[test]
    fn suspended_users_may_only_ask_who_they_are_and_admins_everything() {
        let vm = vm();
        let policy = Policy;
        let suspended = member(OWNER, Role::Admin, true);
        assert_eq!(policy.host(&suspended, Action::Whoami), Ok(()));
        assert_eq!(
            policy.host(&suspended, Action::ListVms),
            Err(Denied::Suspended)
        );
        assert_eq!(
            policy.vm(&suspended, Action::Get, &vm, &[]),
            Err(Denied::Suspended)
        );
        let admin = member(STRANGER, Role::Admin, false);
        for action in Action::ALL {
            match action.needs() {
                Needs::Vm(_) => assert_eq!(policy.vm(&admin, *action, &vm, &[]), Ok(())),
                Needs::Snapshot => {
                    assert_eq!(policy.snapshot(&admin, *action, OWNER), Ok(()))
                }
                _ => assert_eq!(policy.host(&admin, *action), Ok(())),
            }
        }
        assert_eq!(
            policy.host(&Caller::anonymous(Door::Ssh), Action::Create),
            Err(Denied::SignInRequired {
                action: Action::Create
            })
        );
        assert_eq!(
            policy.host(&member(OWNER, Role::User, false), Action::Events),
            Err(Denied::AdminOnly {
                action: Action::Events
            })
        );
    }
}
