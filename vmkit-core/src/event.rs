//! Events: every state change, stored in order and readable as a feed.

use serde::{Deserialize, Serialize};

use crate::name::VmName;
use crate::state::VmState;
use crate::time::Timestamp;
use crate::vm::VmId;

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
#[non_exhaustive]
pub enum EventKind {
    /// A create began.
    Creating,
    /// A VM moved between states.
    StateChanged {
        /// Old state.
        from: VmState,
        /// New state.
        to: VmState,
    },
    /// A create failed and was rolled back.
    CreateFailed {
        /// Why.
        error: String,
    },
    /// An operation on an existing VM failed.
    OperationFailed {
        /// Which operation.
        operation: String,
        /// Why.
        error: String,
    },
    /// The VM and its resources are gone.
    Deleted,
    /// A delete handed the VM's data volume over to the operator instead of
    /// deleting it.
    DataKept {
        /// Where the volume now lives: a file or a device node vmkit no longer
        /// manages.
        path: std::path::PathBuf,
    },
    /// The VMM exited without being asked to, and without saying why (it crashed or
    /// was killed from outside vmkit).
    VmmExited,
    /// The guest rebooted itself (`reboot` in the guest); the VM stays running and
    /// is configured again once its agent is back.
    GuestRebooted,
    /// The guest powered itself off (`poweroff` in the guest); the VM is stopped.
    GuestPoweredOff,
    /// The guest kernel panicked; the VM is stopped and its console (`vmkit vm
    /// logs`) ends with the panic.
    GuestPanicked,
    /// A running VM's agent became healthy or unhealthy.
    HealthChanged {
        /// The new health.
        health: crate::vm::Health,
    },
    /// The VM's resources changed.
    Resized {
        /// The spec it has now.
        spec: crate::spec::VmSpec,
    },
    /// A snapshot of the VM was taken.
    SnapshotTaken {
        /// Its name.
        snapshot: VmName,
    },
    /// A snapshot was deleted.
    SnapshotDeleted {
        /// Its name.
        snapshot: VmName,
    },
    /// The VM was restored to a snapshot.
    Restored {
        /// The snapshot.
        snapshot: VmName,
    },
    /// Reconcile acted on a VM or an orphaned resource.
    Reconciled {
        /// What was done.
        action: String,
    },
    /// Reconcile could not settle a VM (which it then quarantines) or remove an
    /// orphaned resource (which the next reconcile tries again).
    ReconcileFailed {
        /// What it tried.
        action: String,
        /// Why that failed.
        error: String,
    },
}

/// An event before the store has numbered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NewEvent {
    /// The VM concerned, if any.
    pub vm: Option<VmId>,
    /// Its name at the time.
    pub vm_name: Option<VmName>,
    /// What happened.
    pub kind: EventKind,
    /// When.
    pub at: Timestamp,
}

impl NewEvent {
    /// An event about `vm` happening now.
    pub fn vm(id: VmId, name: &VmName, kind: EventKind) -> Self {
        Self {
            vm: Some(id),
            vm_name: Some(name.clone()),
            kind,
            at: Timestamp::now(),
        }
    }

    /// An event about no particular VM, happening now.
    pub fn host(kind: EventKind) -> Self {
        Self {
            vm: None,
            vm_name: None,
            kind,
            at: Timestamp::now(),
        }
    }
}

/// A stored event with its sequence number (strictly increasing, starting at 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// Position in the feed.
    pub seq: u64,
    /// The VM concerned, if any.
    pub vm: Option<VmId>,
    /// Its name at the time.
    pub vm_name: Option<VmName>,
    /// What happened.
    pub kind: EventKind,
    /// When.
    pub at: Timestamp,
}

impl Event {
    /// Numbers `event` as `seq`.
    pub fn from_new(seq: u64, event: NewEvent) -> Self {
        Self {
            seq,
            vm: event.vm,
            vm_name: event.vm_name,
            kind: event.kind,
            at: event.at,
        }
    }
}
