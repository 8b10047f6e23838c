//! VM records: identity, spec, state and the resources a VM holds.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::address::IpLease;
use crate::hypervisor::VmmHandle;
use crate::name::VmName;
use crate::network::NetAttachment;
use crate::spec::VmSpec;
use crate::storage::Volume;
use crate::time::Timestamp;
use crate::token::TokenHash;
use crate::user::UserId;
use crate::vm_state::VmState;

/// A VM's stable identity: random, never reused, independent of its name.
///
/// Host resources (volumes, TAPs, run directories) are named after the id, so a
/// name freed by a delete can be taken again at once without meeting leftovers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(u64);

impl VmId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(rand::rng().random::<u64>() | 1 << 63)
    }

    /// The id as a number.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// An id from its numeric value.
    pub fn from_u64(v: u64) -> Self {
        Self(v)
    }
}

impl fmt::Display for VmId {
    /// Sixteen lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A string that is not a [`VmId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a VM id; expected 16 hex digits")]
#[non_exhaustive]
pub struct VmIdParseError(String);

impl FromStr for VmId {
    type Err = VmIdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 {
            return Err(VmIdParseError(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| VmIdParseError(s.to_owned()))
    }
}

impl TryFrom<String> for VmId {
    type Error = VmIdParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<VmId> for String {
    fn from(id: VmId) -> String {
        id.to_string()
    }
}

/// Host resources a VM holds. Every field is recorded as soon as the resource
/// exists, so that an interrupted create or delete can be finished or undone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmResources {
    /// The copy-on-write root volume.
    pub root: Option<Volume>,
    /// The persistent data volume.
    pub data: Option<Volume>,
    /// The leased address.
    pub lease: Option<IpLease>,
    /// The TAP and guest network settings.
    pub net: Option<NetAttachment>,
    /// The running VMM.
    pub vmm: Option<VmmHandle>,
    /// The host uid (and gid) its VMMs run as, held from create to delete when
    /// VMMs are confined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

/// Whether a running VM's agent answers as it should.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
#[non_exhaustive]
pub enum Health {
    /// Not known: the VM is not running, or has not been checked yet.
    #[default]
    Unknown,
    /// The agent answered its last check.
    Healthy,
    /// The agent did not answer, or broke the protocol.
    Unhealthy {
        /// What went wrong.
        reason: String,
    },
}

/// Everything vmkit knows about one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmRecord {
    /// Stable identity.
    pub id: VmId,
    /// Unique name.
    pub name: VmName,
    /// Owner.
    pub owner: UserId,
    /// What was asked for.
    pub spec: VmSpec,
    /// Lifecycle state.
    pub state: VmState,
    /// Resources held.
    pub resources: VmResources,
    /// Whether its agent answers (running VMs only).
    #[serde(default)]
    pub health: Health,
    /// Set when a delete that keeps the data volume began, so that a delete
    /// interrupted by a crash is finished the same way.
    #[serde(default)]
    pub keep_data: bool,
    /// Set while the VM's disks are being replaced by a snapshot's, so that a
    /// restore interrupted by a crash is finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<VmName>,
    /// The hypervisor backend that drives it (its [`Hypervisor::kind`]), chosen at
    /// create (a clone takes its source's) and kept for its life: a daemon whose
    /// default backend changed still drives it with this one. `None` only in
    /// records written before backends were recorded; reconcile fills it in from
    /// the VMM handle, else with the manager's default backend.
    ///
    /// [`Hypervisor::kind`]: crate::Hypervisor::kind
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// Set when reconcile could not settle the VM (a cleanup failed, say), with
    /// what went wrong. A quarantined VM refuses every operation but a delete,
    /// which finishes it once the cause is gone; a later reconcile that settles it
    /// lifts the quarantine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// While a restore runs: the id the copies of the snapshot's disks are made
    /// under, recorded before the first copy. The copies become the VM's disks (and
    /// keep that id) once both exist; only then are the old disks deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_into: Option<VmId>,
    /// The idempotency key of the request that made it, with that request's
    /// fingerprint (see [`Manager::create`](crate::Manager::create)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// The idempotency key of the last restore asked with one, with its request's
    /// fingerprint: the same restore asked again returns the VM as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_with: Option<Idempotency>,
    /// The port `https://NAME.domain` reaches in the guest (`share port`); 80 when
    /// `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
}

/// The idempotency key a VM was made with, and what was asked with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Idempotency {
    /// The key the client chose.
    pub key: String,
    /// The hash of the request made with it.
    pub request: TokenHash,
}

impl VmRecord {
    /// A new record in state [`VmState::Creating`] that holds nothing yet.
    pub fn new(name: VmName, owner: UserId, spec: VmSpec) -> Self {
        let now = Timestamp::now();
        Self {
            id: VmId::generate(),
            name,
            owner,
            spec,
            state: VmState::Creating,
            resources: VmResources::default(),
            health: Health::Unknown,
            keep_data: false,
            restoring: None,
            hypervisor: None,
            quarantined: None,
            restore_into: None,
            idempotency: None,
            restored_with: None,
            http_port: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// The port `https://NAME.domain` reaches in the guest.
    pub fn default_http_port(&self) -> u16 {
        self.http_port.unwrap_or(crate::gateway::DEFAULT_HTTP_PORT)
    }

    /// The guest's address, when it has one.
    pub fn ip(&self) -> Option<std::net::Ipv4Addr> {
        self.resources.lease.as_ref().map(|l| l.ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_id_round_trips_as_sixteen_hex_digits() {
        let id = VmId::generate();
        let s = id.to_string();
        assert_eq!(s.len(), 16);
        assert_eq!(s.parse::<VmId>().unwrap(), id);
        assert!("xyz".parse::<VmId>().is_err());
    }
}
