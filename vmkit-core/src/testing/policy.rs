//! The access-policy matrix: who asks × what they ask, with the answer each must
//! get, written out by hand (not derived from [`Policy`](crate::Policy)), so that
//! every door's adapter can be run against the same expectations.

use crate::access::{Caller, Door};
use crate::manager::{CloneSource, CreateRequest, ShareWith};
use crate::name::VmName;
use crate::quota::Quota;
use crate::share::Access;
use crate::spec::VmSpec;
use crate::state_store::StateStore;
use crate::user::{Role, User, UserId, UserStatus};

use super::FakeHost;

/// Who asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Who {
    /// The owner of VM `web` and snapshot `snap`.
    Owner,
    /// A user `web` is shared with for its web ports.
    HttpSharee,
    /// A user `web` is shared with for SSH.
    SshSharee,
    /// A user `web` is shared with for management.
    ManageSharee,
    /// Another user.
    Stranger,
    /// An admin.
    Admin,
    /// The owner, suspended.
    Suspended,
    /// Someone holding a link share of `web` (web ports).
    LinkHolder,
    /// Nobody in particular.
    Anonymous,
}

impl Who {
    /// Every one.
    pub const ALL: [Who; 9] = [
        Who::Owner,
        Who::HttpSharee,
        Who::SshSharee,
        Who::ManageSharee,
        Who::Stranger,
        Who::Admin,
        Who::Suspended,
        Who::LinkHolder,
        Who::Anonymous,
    ];
}

/// What they ask (of VM `web`, snapshot `snap`, or the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Who am I.
    Whoami,
    /// List VMs (the answer says whether `web` is in it).
    List,
    /// Create a VM.
    Create,
    /// Get `web`.
    Get,
    /// `web`'s metrics.
    Metrics,
    /// `web`'s console.
    Logs,
    /// Run `echo` in `web`.
    Exec,
    /// Start `web` (stopped first).
    Start,
    /// Stop `web`.
    Stop,
    /// Restart `web`.
    Restart,
    /// Pause `web`.
    Pause,
    /// Resume `web` (paused first).
    Resume,
    /// Resize `web`.
    Resize,
    /// Snapshot `web`.
    Snapshot,
    /// Restore `web` from `snap`.
    Restore,
    /// Copy `web`.
    Clone,
    /// Delete `web`.
    Delete,
    /// Rename `web` to `web2`.
    Rename,
    /// Share `web` publicly.
    Share,
    /// List `web`'s shares.
    Shares,
    /// List snapshots (the answer says whether `snap` is in it).
    ListSnapshots,
    /// Delete `snap`.
    DeleteSnapshot,
    /// Make a VM from `snap`.
    CloneSnapshot,
    /// Read the host's event log.
    Events,
    /// List one's SSH keys.
    Keys,
    /// List images.
    Images,
}

impl Op {
    /// Every one.
    pub const ALL: [Op; 26] = [
        Op::Whoami,
        Op::List,
        Op::Create,
        Op::Get,
        Op::Metrics,
        Op::Logs,
        Op::Exec,
        Op::Start,
        Op::Stop,
        Op::Restart,
        Op::Pause,
        Op::Resume,
        Op::Resize,
        Op::Snapshot,
        Op::Restore,
        Op::Clone,
        Op::Delete,
        Op::Rename,
        Op::Share,
        Op::Shares,
        Op::ListSnapshots,
        Op::DeleteSnapshot,
        Op::CloneSnapshot,
        Op::Events,
        Op::Keys,
        Op::Images,
    ];
}

/// The answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It was done.
    Done,
    /// A list was answered; whether it held `web` (or `snap`).
    Listed(bool),
    /// Not found, exactly as for a VM that does not exist.
    NotFound,
    /// Seen, but not allowed.
    Forbidden,
    /// Sign in first.
    SignIn,
    /// The account is suspended.
    Suspended,
    /// Admins only.
    AdminOnly,
}

/// The answer `who` must get to `op`.
pub fn expected(who: Who, op: Op) -> Outcome {
    use Op::*;
    use Outcome::*;
    let see = matches!(op, Get | Metrics);
    let ssh = matches!(op, Logs | Exec);
    let manage = matches!(
        op,
        Start | Stop | Restart | Pause | Resume | Resize | Snapshot | Restore | Clone
    );
    let own = matches!(op, Delete | Rename | Share | Shares);
    let snapshot = matches!(op, DeleteSnapshot | CloneSnapshot);
    let host = matches!(op, Create | Keys | Images);
    match who {
        _ if op == Whoami => Done,
        Who::Suspended => Suspended,
        Who::Owner | Who::Admin => match op {
            List | ListSnapshots => Listed(true),
            Events if who == Who::Owner => AdminOnly,
            _ => Done,
        },
        Who::Anonymous | Who::LinkHolder => match op {
            List | ListSnapshots | Events | Clone | CloneSnapshot => SignIn,
            _ if host => SignIn,
            _ if snapshot => NotFound,
            _ if who == Who::Anonymous => NotFound,
            _ if see => Done,
            _ => Forbidden,
        },
        Who::Stranger => match op {
            List | ListSnapshots => Listed(false),
            Events => AdminOnly,
            _ if host => Done,
            _ => NotFound,
        },
        Who::HttpSharee | Who::SshSharee | Who::ManageSharee => match op {
            List => Listed(true),
            ListSnapshots => Listed(false),
            Events => AdminOnly,
            _ if host => Done,
            _ if snapshot => NotFound,
            _ if see => Done,
            _ if ssh && who == Who::SshSharee => Done,
            // A restore is from one's own snapshots: `snap` is the owner's.
            Restore if who == Who::ManageSharee => NotFound,
            _ if manage && who == Who::ManageSharee => Done,
            _ if ssh || manage || own => Forbidden,
            _ => Forbidden,
        },
    }
}

/// A fake host with the matrix's users, VM `web` (running, shared as [`Who`]
/// says), and snapshot `snap` of it.
pub struct Scene {
    /// The host.
    pub host: FakeHost,
    link: String,
}

/// The owner's id in a [`Scene`].
pub const OWNER: UserId = UserId(1);

impl Scene {
    /// A fresh scene.
    pub async fn new() -> Self {
        let host = FakeHost::with_config(
            crate::ManagerConfig::new("/nonexistent/vmkit").default_quota(Quota::unlimited()),
        )
        .await;
        for (id, name, role, status) in [
            (1, "owner", Role::User, UserStatus::Active),
            (2, "http", Role::User, UserStatus::Active),
            (3, "ssh", Role::User, UserStatus::Active),
            (4, "manage", Role::User, UserStatus::Active),
            (5, "stranger", Role::User, UserStatus::Active),
            (6, "boss", Role::Admin, UserStatus::Active),
            (7, "suspended", Role::User, UserStatus::Suspended),
        ] {
            let mut user = User::new(UserId(id), crate::user::Handle::new(name).expect("handle"));
            user.role = role;
            user.status = status;
            host.store.put_user(&user).await.expect("put user");
        }
        let owner = host
            .manager
            .commands(Self::user_caller(1, Role::User, false));
        let web = VmName::new("web").expect("name");
        owner
            .create(CreateRequest::new(OWNER, VmSpec::new("tiny")).name(web.clone()))
            .await
            .expect("create web");
        for (user, access) in [(2, Access::Http), (3, Access::Ssh), (4, Access::Manage)] {
            owner
                .share(&web, ShareWith::User(UserId(user)), access)
                .await
                .expect("share");
        }
        let link = owner
            .share(&web, ShareWith::Link, Access::Http)
            .await
            .expect("share a link")
            .secret
            .expect("a link's secret is answered once");
        owner
            .snapshot(&web, VmName::new("snap").expect("name"))
            .await
            .expect("snapshot");
        Self { host, link }
    }

    fn user_caller(id: u64, role: Role, suspended: bool) -> Caller {
        let mut user = User::new(UserId(id), crate::user::Handle::new("x").expect("handle"));
        user.role = role;
        if suspended {
            user.status = UserStatus::Suspended;
        }
        Caller::user(&user, Door::Library)
    }

    /// The caller `who` is.
    pub fn caller(&self, who: Who) -> Caller {
        match who {
            Who::Owner => Self::user_caller(1, Role::User, false),
            Who::HttpSharee => Self::user_caller(2, Role::User, false),
            Who::SshSharee => Self::user_caller(3, Role::User, false),
            Who::ManageSharee => Self::user_caller(4, Role::User, false),
            Who::Stranger => Self::user_caller(5, Role::User, false),
            Who::Admin => Self::user_caller(6, Role::Admin, false),
            Who::Suspended => Self::user_caller(7, Role::User, true),
            Who::LinkHolder => Caller::link(&self.link, Door::Https),
            Who::Anonymous => Caller::anonymous(Door::Https),
        }
    }

    /// Puts `web` in the state `op` needs (stopped to start, paused to resume).
    pub async fn prepare(&self, op: Op) {
        let web = VmName::new("web").expect("name");
        match op {
            Op::Start => drop(self.host.manager.stop(&web).await.expect("stop")),
            Op::Resume => drop(self.host.manager.pause(&web).await.expect("pause")),
            _ => {}
        }
    }

    /// Where a clone from `web` (or `snap`) goes.
    pub fn clone_source(op: Op) -> CloneSource {
        match op {
            Op::CloneSnapshot => CloneSource::Snapshot(VmName::new("snap").expect("name")),
            _ => CloneSource::Vm(VmName::new("web").expect("name")),
        }
    }
}
