//! Snapshots: a VM's disks (and, where the hypervisor can, its memory) at one
//! moment, kept under a name to restore the VM to, or to clone new VMs from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::address::MacAddr;
use crate::name::VmName;
use crate::spec::VmSpec;
use crate::storage::Volume;
use crate::time::Timestamp;
use crate::user::UserId;
use crate::vm::VmId;

/// A stored snapshot.
///
/// Its disks are ordinary volumes held under the snapshot's own [`Snapshot::id`],
/// drawn from the VM id space so that host resource names never collide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// Unique name (the rules of VM names).
    pub name: VmName,
    /// The id its volumes are held under.
    pub id: VmId,
    /// The VM it was taken of.
    pub vm: VmId,
    /// That VM's name at the time.
    pub vm_name: VmName,
    /// Owner (the VM's owner).
    pub owner: UserId,
    /// The VM's spec at the time.
    pub spec: VmSpec,
    /// Copy of the root volume.
    pub root: Volume,
    /// Copy of the data volume, if the VM had one.
    pub data: Option<Volume>,
    /// Directory of the saved VMM state (memory and devices), when the VM ran and
    /// the hypervisor can snapshot; `None` for a disk-only snapshot.
    pub memory: Option<PathBuf>,
    /// The VM's MAC at the time, which a memory restore needs unchanged.
    pub mac: Option<MacAddr>,
    /// The hypervisor backend of the VM ([`crate::VmRecord::hypervisor`]), which
    /// clones from the snapshot run on; `None` in snapshots taken before backends
    /// were recorded (then the VM's, if it still exists, else the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// When it was taken.
    pub created_at: Timestamp,
}

impl Snapshot {
    /// Whether the snapshot holds the VM's memory (a restore resumes the guest
    /// where it was) rather than only its disks (a restore boots them).
    pub fn has_memory(&self) -> bool {
        self.memory.is_some()
    }
}
