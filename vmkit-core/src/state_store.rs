//! The state-store seam: users, keys, VMs, quotas, shares, leases, API keys, events.

use async_trait::async_trait;

use crate::address::{IpLease, IpPool};
use crate::confine::UidRange;
use crate::domain::CustomDomain;
use crate::event::{Event, EventRetention, NewEvent};
use crate::invite::Invite;
use crate::name::VmName;
use crate::quota::{Quota, QuotaExceeded};
use crate::share::Share;
use crate::snapshot::Snapshot;
use crate::time::Timestamp;
use crate::token::TokenHash;
use crate::user::{ApiKey, Handle, SshPublicKey, User, UserId};
use crate::vm::{VmId, VmRecord};
use crate::web::WebToken;

/// What a store guarantees.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreCapabilities {
    /// Committed writes survive a crash of the process (and of the host).
    pub durable: bool,
}

impl StoreCapabilities {
    /// Capabilities of a store; `durable` when committed writes survive a crash.
    pub fn new(durable: bool) -> Self {
        Self { durable }
    }
}

/// Errors from a state store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A VM of that name exists.
    #[error("a VM named {0} already exists; choose another name")]
    NameTaken(VmName),
    /// A snapshot of that name exists.
    #[error("a snapshot named {0} already exists; choose another name or delete it")]
    SnapshotTaken(VmName),
    /// The VM would take its owner past their quota.
    #[error(transparent)]
    QuotaExceeded(#[from] QuotaExceeded),
    /// The record does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The SSH key belongs to another user.
    #[error("SSH key {0} is registered to another user")]
    KeyTaken(String),
    /// Another user has this handle.
    #[error("the handle {0} is taken; choose another")]
    HandleTaken(Handle),
    /// The user still owns VMs or snapshots, so the record cannot go.
    #[error("user {user} still owns {}; delete them or hand them over first", .holdings.join(", "))]
    UserHoldsResources {
        /// The user.
        user: UserId,
        /// The names of the VMs and snapshots left.
        holdings: Vec<String>,
    },
    /// Every address of the pool is leased.
    #[error("no free address in {0}; delete VMs or widen the subnet")]
    PoolExhausted(String),
    /// Every uid of the range is held by a VM.
    #[error(
        "every VMM uid of {0} is held by a VM; delete VMs or widen the range ([confinement] uids)"
    )]
    UidsExhausted(UidRange),
    /// Another process holds the state file.
    #[error("state file {path} is in use by another process; is a vmkit-gateway already running?")]
    Locked {
        /// The file.
        path: String,
    },
    /// The file was written by a newer vmkit.
    #[error(
        "state file schema version {found} is newer than this vmkit supports ({supported}); upgrade vmkit"
    )]
    SchemaTooNew {
        /// Version in the file.
        found: u64,
        /// Newest version this build reads.
        supported: u64,
    },
    /// The stored data does not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The backing database failed.
    #[error("state store failure: {message}")]
    Backend {
        /// What failed.
        message: String,
        /// Cause.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StoreError {
    /// A backend failure with its cause.
    pub fn backend(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Backend {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Durable state. Every method is one atomic transaction; a method that returns
/// `Ok` has committed.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// What this store guarantees.
    fn capabilities(&self) -> StoreCapabilities;

    // ---- users and keys ----

    /// Inserts or replaces a user under its own id; [`StoreError::HandleTaken`] if
    /// another user has its handle. For new users prefer
    /// [`StateStore::create_user`], which allocates the id.
    async fn put_user(&self, user: &User) -> Result<(), StoreError>;
    /// Stores `user` under a fresh id (its own `id` is ignored): one above every id
    /// stored or used before, so an id is never reused, even after a delete. With
    /// `key`, registers that SSH key for the new user in the same transaction.
    /// [`StoreError::HandleTaken`] if another user has the handle,
    /// [`StoreError::KeyTaken`] if another user has the key; then nothing is
    /// stored. Returns the stored record.
    async fn create_user(
        &self,
        user: &User,
        key: Option<&SshPublicKey>,
    ) -> Result<User, StoreError>;
    /// Replaces an existing user's record (matched by id); [`StoreError::NotFound`]
    /// if absent, [`StoreError::HandleTaken`] if its new handle is another user's.
    async fn update_user(&self, user: &User) -> Result<(), StoreError>;
    /// A user by id.
    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError>;
    /// A user by handle.
    async fn user_by_handle(&self, handle: &Handle) -> Result<Option<User>, StoreError>;
    /// All users, by id.
    async fn list_users(&self) -> Result<Vec<User>, StoreError>;
    /// Deletes a user with their SSH keys, API keys, quota and the shares made to
    /// them, in one transaction; whether the user existed. Refused with
    /// [`StoreError::UserHoldsResources`] while they own a VM or a snapshot.
    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError>;
    /// Registers `key` for `user`; [`StoreError::KeyTaken`] if another user has it.
    /// Registering the same key twice for the same user is not an error.
    async fn add_ssh_key(&self, user: UserId, key: &SshPublicKey) -> Result<(), StoreError>;
    /// Removes a key by fingerprint; whether it existed.
    async fn remove_ssh_key(&self, fingerprint: &str) -> Result<bool, StoreError>;
    /// The user owning the key with this fingerprint.
    async fn user_by_key(&self, fingerprint: &str) -> Result<Option<UserId>, StoreError>;
    /// A user's keys.
    async fn ssh_keys(&self, user: UserId) -> Result<Vec<SshPublicKey>, StoreError>;

    // ---- quotas ----

    /// Sets a user's quota.
    async fn set_quota(&self, user: UserId, quota: &Quota) -> Result<(), StoreError>;
    /// A user's quota, if one was set.
    async fn get_quota(&self, user: UserId) -> Result<Option<Quota>, StoreError>;

    // ---- VMs ----

    /// Inserts a new VM if its name is free and its owner's holdings (VMs and
    /// snapshots, see [`Usage::of_holdings`](crate::Usage::of_holdings)) plus this
    /// one stay within `quota`, checked in the same transaction.
    async fn create_vm(&self, vm: &VmRecord, quota: &Quota) -> Result<(), StoreError>;
    /// Replaces an existing VM record (matched by id); [`StoreError::NotFound`] if absent,
    /// [`StoreError::NameTaken`] if it was renamed to another VM's name.
    async fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError>;
    /// [`StateStore::update_vm`] and [`StateStore::append_event`] in one transaction:
    /// both are written or neither is.
    async fn update_vm_with_event(
        &self,
        vm: &VmRecord,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError>;
    /// [`StateStore::update_vm`] if the owner's holdings with this record in place of
    /// the stored one stay within `quota` ([`Quota::check_change`]: only what grows
    /// is checked), checked in the same transaction.
    async fn update_vm_within_quota(&self, vm: &VmRecord, quota: &Quota) -> Result<(), StoreError>;
    /// A VM by name.
    async fn get_vm(&self, name: &VmName) -> Result<Option<VmRecord>, StoreError>;
    /// A VM by id.
    async fn get_vm_by_id(&self, id: VmId) -> Result<Option<VmRecord>, StoreError>;
    /// VMs, by name; only `owner`'s when given.
    async fn list_vms(&self, owner: Option<UserId>) -> Result<Vec<VmRecord>, StoreError>;
    /// Deletes a VM record with its shares and custom domains; whether it existed.
    async fn delete_vm(&self, id: VmId) -> Result<bool, StoreError>;
    /// [`StateStore::delete_vm`] and [`StateStore::append_event`] in one
    /// transaction; the event is stored whether or not the record existed.
    async fn delete_vm_with_event(
        &self,
        id: VmId,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError>;

    // ---- shares ----

    /// Adds a share (replacing an equal one).
    async fn put_share(&self, share: &Share) -> Result<(), StoreError>;
    /// Removes a share; whether it existed.
    async fn remove_share(&self, share: &Share) -> Result<bool, StoreError>;
    /// Shares of a VM.
    async fn shares(&self, vm: VmId) -> Result<Vec<Share>, StoreError>;

    // ---- custom domains ----

    /// Attaches a custom domain, replacing the record of the same host (which may
    /// name another VM: the host moves).
    async fn put_domain(&self, domain: &CustomDomain) -> Result<(), StoreError>;
    /// The custom domain `host` (lowercase, no trailing dot).
    async fn get_domain(&self, host: &str) -> Result<Option<CustomDomain>, StoreError>;
    /// Custom domains, by host; only `vm`'s when given.
    async fn list_domains(&self, vm: Option<VmId>) -> Result<Vec<CustomDomain>, StoreError>;
    /// Detaches the custom domain `host`; whether it was attached.
    async fn remove_domain(&self, host: &str) -> Result<bool, StoreError>;

    // ---- IP leases ----

    /// Leases the lowest free address of `pool` to `vm`, or returns the lease `vm`
    /// already holds. Never hands out an address twice.
    async fn allocate_lease(&self, vm: VmId, pool: &IpPool) -> Result<IpLease, StoreError>;
    /// Releases `vm`'s lease; whether it had one.
    async fn release_lease(&self, vm: VmId) -> Result<bool, StoreError>;
    /// Every lease.
    async fn list_leases(&self) -> Result<Vec<IpLease>, StoreError>;

    // ---- VMM uids ----

    /// Hands `vm` the lowest uid of `range` that no VM holds, or returns the one `vm`
    /// already holds (even outside `range`). Never hands out a uid twice.
    async fn allocate_uid(&self, vm: VmId, range: &UidRange) -> Result<u32, StoreError>;
    /// Releases `vm`'s uid; whether it held one.
    async fn release_uid(&self, vm: VmId) -> Result<bool, StoreError>;
    /// Every held uid with its VM, by uid.
    async fn list_uids(&self) -> Result<Vec<(VmId, u32)>, StoreError>;

    // ---- API keys ----

    /// Stores an API key record.
    async fn put_api_key(&self, key: &ApiKey) -> Result<(), StoreError>;
    /// An API key record by id.
    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError>;
    /// Deletes an API key; whether it existed.
    async fn delete_api_key(&self, id: &str) -> Result<bool, StoreError>;
    /// Records that API key `id` identified its user at `at`, if the key still
    /// exists (a key revoked meanwhile stays revoked); whether it did.
    async fn record_api_key_use(&self, id: &str, at: Timestamp) -> Result<bool, StoreError>;
    /// `user`'s API key records, by id.
    async fn list_api_keys(&self, user: UserId) -> Result<Vec<ApiKey>, StoreError>;

    // ---- snapshots ----

    /// Inserts a snapshot if its name is free ([`StoreError::SnapshotTaken`]) and its
    /// owner's holdings with it stay within `quota`
    /// ([`StoreError::QuotaExceeded`]), checked in the same transaction.
    async fn put_snapshot(&self, snapshot: &Snapshot, quota: &Quota) -> Result<(), StoreError>;
    /// A snapshot by name.
    async fn get_snapshot(&self, name: &VmName) -> Result<Option<Snapshot>, StoreError>;
    /// Snapshots, by name; only `owner`'s when given.
    async fn list_snapshots(&self, owner: Option<UserId>) -> Result<Vec<Snapshot>, StoreError>;
    /// Replaces an existing snapshot's record (matched by name), e.g. to give it
    /// another owner; [`StoreError::NotFound`] if absent. No quota is checked.
    async fn update_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError>;
    /// Deletes a snapshot record; whether it existed.
    async fn delete_snapshot(&self, name: &VmName) -> Result<bool, StoreError>;

    // ---- invites ----

    /// Stores an invite (replacing one with the same id).
    async fn put_invite(&self, invite: &Invite) -> Result<(), StoreError>;
    /// Every stored invite, expired ones included, by id.
    async fn list_invites(&self) -> Result<Vec<Invite>, StoreError>;
    /// Deletes an invite by id; whether it existed.
    async fn delete_invite(&self, id: &str) -> Result<bool, StoreError>;
    /// Takes the invite whose code is `secret`, in one transaction: the invite
    /// whose hash matches (compared in constant time) is removed and returned if it
    /// has not expired at `now`. `None` when no invite matches or the one that
    /// matches has expired (it is removed then too). Of concurrent calls with one
    /// code, exactly one gets the invite.
    async fn consume_invite(
        &self,
        secret: &str,
        now: Timestamp,
    ) -> Result<Option<Invite>, StoreError>;

    // ---- web tokens ----

    /// Stores a web token (sign-in link, session, host ticket), replacing one with
    /// the same hash.
    async fn put_web_token(&self, token: &WebToken) -> Result<(), StoreError>;
    /// The web token with `hash`, expired or not.
    async fn get_web_token(&self, hash: &TokenHash) -> Result<Option<WebToken>, StoreError>;
    /// Removes and returns the web token with `hash`, in one transaction: of
    /// concurrent calls with one hash, exactly one gets it (single-use links and
    /// tickets).
    async fn take_web_token(&self, hash: &TokenHash) -> Result<Option<WebToken>, StoreError>;
    /// Deletes `user`'s web tokens: every one when `parent` is `None`, else those
    /// handed from the session whose hash is `parent`. How many.
    async fn delete_web_tokens(
        &self,
        user: UserId,
        parent: Option<&TokenHash>,
    ) -> Result<usize, StoreError>;
    /// Deletes every web token expired at `now`; how many.
    async fn purge_web_tokens(&self, now: Timestamp) -> Result<usize, StoreError>;

    // ---- events ----

    /// Appends an event, numbering it one past the last, and removes the oldest
    /// events `retention` no longer keeps (at most
    /// [`EventRetention::TRIM_PER_APPEND`]), in one transaction.
    async fn append_event(
        &self,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError>;
    /// Up to `limit` stored events with `seq > after`, oldest first. Numbers are
    /// consecutive from [`StateStore::first_event_seq`] on.
    async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// The number of the newest event; 0 when none is stored.
    async fn last_event_seq(&self) -> Result<u64, StoreError>;
    /// The number of the oldest stored event: where the kept history starts (older
    /// ones were removed by the retention rule). One past
    /// [`StateStore::last_event_seq`] when none is stored.
    async fn first_event_seq(&self) -> Result<u64, StoreError>;
}
