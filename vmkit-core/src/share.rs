//! Shares: who else may reach a VM, and how.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::token::TokenHash;
use crate::user::UserId;
use crate::vm::VmId;

/// Whom a VM is shared with.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
#[non_exhaustive]
pub enum ShareTarget {
    /// A known user.
    User(UserId),
    /// Anyone holding a link whose secret has this hash (the secret itself is
    /// shown once, when the link is made, and never stored).
    Link(TokenHash),
    /// Everyone (public).
    Public,
}

/// What a share grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Access {
    /// The VM's web ports over HTTPS.
    Http,
    /// SSH into the VM: a shell, `exec`, its logs.
    Ssh,
    /// Its lifecycle: start, stop, restart, pause, resume, resize, snapshot, restore
    /// (from one's own snapshots) and clone. Deleting and sharing stay the owner's.
    Manage,
}

/// One share of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Share {
    /// The shared VM.
    pub vm: VmId,
    /// With whom.
    pub target: ShareTarget,
    /// What is granted.
    pub access: Access,
    /// The one web port it grants ([`Access::Http`] only); every port when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// When it was granted.
    pub created_at: Timestamp,
}

impl Share {
    /// A share created now.
    pub fn new(vm: VmId, target: ShareTarget, access: Access) -> Self {
        Self {
            vm,
            target,
            access,
            port: None,
            created_at: Timestamp::now(),
        }
    }

    /// The same share, of web port `port` only.
    pub fn of_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Whether it grants anything on web port `port`: not a share of another port.
    pub fn covers_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}
