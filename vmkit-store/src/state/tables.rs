//! The tables of the state file, how values are encoded, and how redb errors are
//! reported.
//!
//! Values are the JSON encoding (serde_json) of the vmkit-core types, so a record can
//! be read with any JSON tool and new optional fields need no migration. Keys are
//! fixed-width integers where the domain has one (ids, addresses, sequence numbers),
//! so that ranges and "lowest free" walks follow numeric order.

use std::fmt::Display;

use redb::TableDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmkit_core::{SshPublicKey, StoreError, UserId};

/// `"schema_version"` → the layout version of the file; see `schema.rs`.
pub(super) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// The key of the schema version in [`META`].
pub(super) const SCHEMA_VERSION_KEY: &str = "schema_version";
/// The key in [`META`] of the lowest user id not yet handed out (schema version 4):
/// ids are never reused, even after the newest user is deleted.
pub(super) const NEXT_USER_ID_KEY: &str = "next_user_id";

/// User id → `User`.
pub(super) const USERS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("users");
/// User handle → user id: the index that makes handles unique, kept in the
/// transactions that write [`USERS`] (schema version 4).
pub(super) const USER_HANDLES: TableDefinition<'static, &str, u64> =
    TableDefinition::new("user_handles");
/// Invite id → `Invite` (schema version 4).
pub(super) const INVITES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("invites");
/// SSH key fingerprint (`SHA256:...`) → [`StoredKey`].
pub(super) const SSH_KEYS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("ssh_keys");
/// User id → `Quota`.
pub(super) const QUOTAS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("quotas");
/// VM id → `VmRecord`.
pub(super) const VMS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("vms");
/// VM name → VM id: the index that makes names unique, kept in the transactions that
/// write [`VMS`].
pub(super) const VM_NAMES: TableDefinition<'static, &str, u64> = TableDefinition::new("vm_names");
/// (VM id, [`share_key`]) → `Share`.
pub(super) const SHARES: TableDefinition<'static, (u64, &str), &[u8]> =
    TableDefinition::new("shares");
/// IPv4 address as a big-endian `u32` → `IpLease`.
pub(super) const LEASES: TableDefinition<'static, u32, &[u8]> = TableDefinition::new("leases");
/// VM id → its leased address: the index kept in the transactions that write
/// [`LEASES`].
pub(super) const LEASE_BY_VM: TableDefinition<'static, u64, u32> =
    TableDefinition::new("lease_by_vm");
/// VMM uid → the id of the VM holding it (schema version 3).
pub(super) const UIDS: TableDefinition<'static, u32, u64> = TableDefinition::new("uids");
/// VM id → its VMM uid: the index kept in the transactions that write [`UIDS`].
pub(super) const UID_BY_VM: TableDefinition<'static, u64, u32> = TableDefinition::new("uid_by_vm");
/// API key id → `ApiKey`.
pub(super) const API_KEYS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("api_keys");
/// Snapshot name → `Snapshot` (schema version 2).
pub(super) const SNAPSHOTS: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("snapshots");
/// Token hash (64 hex digits) → `WebToken` (schema version 5).
pub(super) const WEB_TOKENS: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("web_tokens");
/// Custom domain host → `CustomDomain`.
pub(super) const DOMAINS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("domains");
/// Sequence number → `Event`.
pub(super) const EVENTS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("events");

/// An SSH key with the user it is registered to, as stored in [`SSH_KEYS`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct StoredKey {
    /// The owner.
    pub(super) user: UserId,
    /// The key.
    pub(super) key: SshPublicKey,
}

/// The second half of a share's key: what makes two shares of a VM the same share.
pub(super) fn share_key(share: &vmkit_core::Share) -> Result<String, StoreError> {
    // Shares of every port keep the key they had before shares had ports.
    match share.port {
        None => serde_json::to_string(&(&share.target, share.access)),
        Some(port) => serde_json::to_string(&(&share.target, share.access, port)),
    }
    .map_err(|e| StoreError::backend("cannot encode the key of a share", e))
}

/// The JSON encoding of `value`, a `what` (for the error message).
pub(super) fn encode<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::backend(format!("cannot encode {what}"), e))
}

/// Decodes the JSON value read as `what`; a value that does not decode is corrupt.
pub(super) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl Display,
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Adds what was being done to a redb error, making it a [`StoreError::Backend`].
pub(super) trait Context<T> {
    /// Maps the error to [`StoreError::backend`] with `what` as its message.
    fn context(self, what: &str) -> Result<T, StoreError>;
}

impl<T, E> Context<T> for Result<T, E>
where
    E: Into<redb::Error>,
{
    fn context(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::backend(what.to_owned(), e.into()))
    }
}
