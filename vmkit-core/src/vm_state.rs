//! The VM state machine.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a VM is in its lifecycle.
///
/// ```text
///  Creating ──► Running ◄──► Paused
///     │          │  ▲           │
///     │          ▼  │           │
///     │      Stopping  Starting │
///     │          │  ▲           │
///     │          ▼  │           │
///     │         Stopped ◄───────┘ (VMM died)
///     ▼
///  Deleting  ◄── from every state
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VmState {
    /// Resources are being taken and the VM booted for the first time.
    Creating,
    /// The VMM is being started and the agent awaited.
    Starting,
    /// The guest runs and its agent answered.
    Running,
    /// The guest is paused by the VMM.
    Paused,
    /// The guest is being shut down.
    Stopping,
    /// No VMM runs; disks, address and TAP are kept.
    Stopped,
    /// The VM and its resources are being removed.
    Deleting,
}

impl VmState {
    /// Whether the state machine allows moving from `self` to `to`.
    pub fn can_transition_to(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Creating, Running)
                | (Starting, Running)
                | (Starting, Stopped)
                | (Running, Stopping)
                | (Running, Paused)
                | (Running, Stopped)
                | (Paused, Running)
                | (Paused, Stopping)
                | (Paused, Stopped)
                | (Stopping, Stopped)
                | (Stopped, Starting)
                | (_, Deleting)
        )
    }

    /// Whether this state only exists while an operation is under way.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            VmState::Creating | VmState::Starting | VmState::Stopping | VmState::Deleting
        )
    }

    /// The state's name as used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Deleting => "deleting",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::*;

    #[test]
    fn lifecycle_transitions_are_allowed() {
        for (a, b) in [
            (Creating, Running),
            (Running, Stopping),
            (Stopping, Stopped),
            (Stopped, Starting),
            (Starting, Running),
            (Running, Paused),
            (Paused, Running),
            (Running, Deleting),
            (Stopped, Deleting),
            (Creating, Deleting),
        ] {
            assert!(a.can_transition_to(b), "{a} -> {b}");
        }
    }

    #[test]
    fn impossible_transitions_are_refused() {
        for (a, b) in [
            (Stopped, Running),
            (Stopped, Paused),
            (Deleting, Running),
            (Creating, Stopped),
            (Paused, Starting),
            (Running, Creating),
        ] {
            assert!(!a.can_transition_to(b), "{a} -> {b}");
        }
    }
}
