//! Events: every state change, stored in order and readable as a feed.

use serde::{Deserialize, Serialize};

use crate::name::VmName;
use crate::time::Timestamp;
use crate::vm::VmId;
use crate::vm_state::VmState;

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
    /// The VM was renamed; the event carries its new name.
    Renamed {
        /// The name it had.
        from: VmName,
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
    /// A custom domain was attached to the VM.
    DomainAdded {
        /// The host name.
        host: String,
        /// How its owner proved it theirs.
        proven_by: crate::domain::ProvenBy,
    },
    /// A custom domain was detached from the VM.
    DomainRemoved {
        /// The host name.
        host: String,
    },
    /// The HTTPS edge got a certificate (or renewed one).
    CertificateIssued {
        /// The names it covers.
        names: Vec<String>,
        /// When it expires.
        expires: Timestamp,
    },
    /// Getting a certificate failed; it is tried again later.
    CertificateFailed {
        /// The names asked for.
        names: Vec<String>,
        /// What went wrong.
        error: String,
        /// Seconds until the next try.
        retry_in_secs: u64,
    },
    /// A user was registered or added.
    UserAdded {
        /// Their handle.
        user: crate::user::Handle,
        /// Their role.
        role: crate::user::Role,
    },
    /// A user was removed (after their VMs and snapshots were deleted or handed over).
    UserRemoved {
        /// Their handle.
        user: crate::user::Handle,
    },
    /// A user was suspended.
    UserSuspended {
        /// Their handle.
        user: crate::user::Handle,
    },
    /// A suspended user was let back in.
    UserResumed {
        /// Their handle.
        user: crate::user::Handle,
    },
    /// A user's role changed.
    UserRoleChanged {
        /// Their handle.
        user: crate::user::Handle,
        /// The role they have now.
        role: crate::user::Role,
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

/// Which events the store keeps: at most `max_events`, and none older than `max_age`
/// (measured against the time of the newest event). The newest event is always kept,
/// so numbering carries on from it.
///
/// Stores apply the rule as they append, removing at most [`EventRetention::TRIM_PER_APPEND`]
/// of the oldest events per append: bounded work, and a log over the limit (the rule
/// was tightened) shrinks back to it within a few appends.
///
/// ```
/// use std::time::Duration;
/// use vmkit_core::EventRetention;
///
/// let keep = EventRetention::new(10_000).max_age(Duration::from_secs(30 * 86_400));
/// assert_eq!(keep.max_events, 10_000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventRetention {
    /// Most events kept (at least 1); the oldest go first.
    pub max_events: u64,
    /// Events this much older than the newest go; `None` keeps events of any age.
    pub max_age: Option<std::time::Duration>,
}

impl EventRetention {
    /// The most events one append removes.
    pub const TRIM_PER_APPEND: usize = 64;

    /// Keeps the newest `max_events` events (at least 1), of any age.
    pub fn new(max_events: u64) -> Self {
        Self {
            max_events: max_events.max(1),
            max_age: None,
        }
    }

    /// Keeps every event.
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// Also removes events older than `age` (relative to the newest).
    pub fn max_age(mut self, age: std::time::Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Whether the oldest of `kept` stored events, stamped `oldest`, goes when the
    /// newest is stamped `newest`. The last event is never removed.
    pub fn removes(&self, kept: u64, oldest: Timestamp, newest: Timestamp) -> bool {
        if kept <= 1 {
            return false;
        }
        let too_many = kept > self.max_events.max(1);
        let too_old = self.max_age.is_some_and(|age| {
            let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            newest.0.saturating_sub(oldest.0) > age_ms
        });
        too_many || too_old
    }
}

impl Default for EventRetention {
    /// The newest 100 000 events, none older than 90 days.
    fn default() -> Self {
        Self::new(100_000).max_age(std::time::Duration::from_secs(90 * 86_400))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_removes_beyond_the_count_and_the_age_but_never_the_last() {
        let keep = EventRetention::new(3).max_age(std::time::Duration::from_secs(10));
        let t = |s: u64| Timestamp(s * 1000);
        assert!(!keep.removes(3, t(0), t(5)), "three recent events stay");
        assert!(keep.removes(4, t(0), t(5)), "a fourth is one too many");
        assert!(keep.removes(2, t(0), t(11)), "eleven seconds is too old");
        assert!(!keep.removes(2, t(1), t(11)), "ten seconds is not");
        assert!(!keep.removes(1, t(0), t(1000)), "the last event stays");
        assert!(!EventRetention::unlimited().removes(u64::MAX, t(0), t(u64::MAX / 1000)));
        assert_eq!(EventRetention::new(0).max_events, 1);
    }
}
