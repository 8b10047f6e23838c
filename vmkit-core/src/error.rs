//! The manager's error type, the coarse kinds transports map to status codes, and
//! [`ErrorChain`] to show an error with its causes.

use std::fmt;

use crate::access::Denied;
use crate::hypervisor::HypervisorError;
use crate::image::ImageError;
use crate::name::{NameError, VmName};
use crate::network::NetworkError;
use crate::quota::QuotaExceeded;
use crate::spec::SpecError;
use crate::state_store::StoreError;
use crate::storage::StorageError;
use crate::user::{Handle, HandleError, SshKeyError};
use crate::vm_state::VmState;

/// What kind of failure an error is; transports (REST, SSH, MCP) map this to their
/// own status codes in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed or asks for something impossible.
    InvalidInput,
    /// The VM (or image) does not exist.
    NotFound,
    /// The request conflicts with current state (name taken, wrong state).
    Conflict,
    /// The request would exceed a quota.
    QuotaExceeded,
    /// The request is refused: the host's policy (registration closed, an invite
    /// that does not count) or the caller's access (see [`Denied`]).
    Forbidden,
    /// What was asked for existed once and was removed for good (events past the
    /// retention rule).
    Gone,
    /// The backend cannot do this.
    Unsupported,
    /// A dependency failed or timed out; retrying may help.
    Unavailable,
    /// A bug or corrupt state.
    Internal,
    /// The caller must sign in first.
    Unauthenticated,
}

/// Errors of [`Manager`](crate::Manager) operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The VM name is invalid.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The spec is invalid or too large for this host.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// A VM with this name exists.
    #[error("a VM named {0} already exists; choose another name")]
    NameTaken(VmName),
    /// The owner's quota would be exceeded.
    #[error(transparent)]
    QuotaExceeded(QuotaExceeded),
    /// A snapshot with this name exists.
    #[error("a snapshot named {0} already exists; choose another name or delete it")]
    SnapshotTaken(VmName),
    /// No snapshot with this name.
    #[error("no snapshot named {0}; `vmkit snapshot ls` lists them")]
    SnapshotNotFound(VmName),
    /// No VM with this name.
    #[error("no VM named {0}; `vmkit vm ls` lists them")]
    NotFound(VmName),
    /// The VM's state does not allow the operation.
    #[error("cannot {operation} VM {name}: it is {state}; {operation} needs it to be {}", allowed_list(.allowed))]
    WrongState {
        /// The VM.
        name: VmName,
        /// Its state.
        state: VmState,
        /// The refused operation.
        operation: &'static str,
        /// States in which the operation is allowed.
        allowed: &'static [VmState],
    },
    /// The image cannot be used.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The request is malformed in a way the message says how to fix.
    #[error("{0}")]
    InvalidRequest(String),
    /// The guest did not come up.
    #[error("VM {name} did not become ready: {reason}\n--- last console output ---\n{console}")]
    BootFailed {
        /// The VM.
        name: VmName,
        /// What happened.
        reason: String,
        /// Tail of the guest console.
        console: String,
    },
    /// Talking to the guest agent failed.
    #[error("the agent of VM {name} failed: {message}")]
    Agent {
        /// The VM.
        name: VmName,
        /// What failed.
        message: String,
    },
    /// The text is not an SSH public key.
    #[error("not an SSH public key: {0}")]
    InvalidSshKey(#[from] SshKeyError),
    /// The user has registered this SSH key already.
    #[error("SSH key {0} is registered already; `vmkit key ls` lists your keys")]
    SshKeyExists(String),
    /// Another user has registered this SSH key.
    #[error("SSH key {0} is registered to another user; a key belongs to one user")]
    SshKeyTaken(String),
    /// The user has no SSH key with this fingerprint.
    #[error("no SSH key with fingerprint {0}; `vmkit key ls` lists your keys")]
    SshKeyNotFound(String),
    /// The caller has no API key with this id.
    #[error("no API key {0}; `api-key ls` lists your keys")]
    ApiKeyNotFound(String),
    /// The handle is not valid.
    #[error(transparent)]
    InvalidHandle(#[from] HandleError),
    /// The email address is not one.
    #[error("{0:?} is not an email address; give one such as you@example.com, or none")]
    InvalidEmail(String),
    /// Another user has this handle.
    #[error("the handle {0} is taken; choose another")]
    HandleTaken(Handle),
    /// No user with this handle.
    #[error("no user {0}; `vmkit user ls` lists them")]
    UserNotFound(String),
    /// Registration is closed on this host.
    #[error(
        "registration is closed on this host; ask its operator to add you (`vmkit user add`) \
         or for an invite"
    )]
    RegistrationClosed,
    /// Registration needs an invite and none was given.
    #[error("registration on this host needs an invite code; ask its operator for one")]
    InviteRequired,
    /// The invite code is unknown, used or expired (which one is not said).
    #[error(
        "this invite code is not valid: it is mistyped, used or expired; ask the operator for a new one"
    )]
    InviteInvalid,
    /// No invite with this id.
    #[error("no invite {0}; `vmkit invite ls` lists them")]
    InviteNotFound(String),
    /// A user's VMs were to be handed over to that same user.
    #[error("cannot hand the VMs of {0} over to {0}; name another user")]
    HandOverToSelf(Handle),
    /// Removing a user failed part-way: the user is still there (suspended), with
    /// what could not be deleted or handed over.
    #[error(
        "user {handle} was not removed: {} could not be {action} ({error}); the user is left \
         suspended with them: fix the cause and remove the user again",
        .left.join(", ")
    )]
    UserRemovalIncomplete {
        /// The user.
        handle: Handle,
        /// `deleted` or `handed over`.
        action: &'static str,
        /// The VMs and snapshots left (`VM web`, `snapshot s1`).
        left: Vec<String>,
        /// The first failure, with its causes.
        error: String,
    },
    /// The VM was created with a hypervisor backend this manager does not have.
    #[error(
        "VM {name} was created with {backend}, which this daemon does not drive (it drives {}); \
         a VM keeps the backend that created it: give the daemon a {backend} backend to use \
         it (a stopped one can also be removed)",
        .available.join(", ")
    )]
    BackendUnavailable {
        /// The VM.
        name: VmName,
        /// Its backend ([`crate::Hypervisor::kind`]).
        backend: String,
        /// The backends this manager has.
        available: Vec<&'static str>,
    },
    /// Reconcile could not settle the VM; only a delete is accepted.
    #[error(
        "VM {name} is quarantined: reconcile could not settle it ({reason}); only `vmkit vm rm \
         {name}` is accepted (if that fails too, fix the cause it names and run it again)"
    )]
    Quarantined {
        /// The VM.
        name: VmName,
        /// What reconcile could not do.
        reason: String,
    },
    /// The VM's VMM runs but vmkit cannot drive it (its control socket does not
    /// answer, say); it is left running and vmkit keeps trying to reach it.
    #[error(
        "vmkit cannot reach the VMM of VM {name} ({reason}); the VM is left running as it is \
         and vmkit keeps trying to re-attach it: try again later, or stop or remove it"
    )]
    VmmUnreachable {
        /// The VM.
        name: VmName,
        /// Why the last attempt failed.
        reason: String,
    },
    /// A backend cannot do what was asked.
    #[error("{0} is not supported by this host's backends")]
    Unsupported(&'static str),
    /// DNS does not (yet) prove the caller owns a custom domain.
    #[error("{host} is not proven yours: {}", .0.instructions(), host = .0.host)]
    DomainUnproven(Box<crate::domain::DomainProof>),
    /// The custom domain is attached to another user's VM.
    #[error("{0} is attached to another user's VM; its owner can detach it with `domain rm {0}`")]
    DomainTaken(String),
    /// No VM of the caller's has this custom domain.
    #[error("no VM of yours has the custom domain {0}; `domain ls` lists them")]
    DomainNotFound(String),
    /// Reading a custom domain's DNS records failed.
    #[error("could not read the DNS records of {host} ({message}); try again in a moment")]
    DomainLookup {
        /// The custom domain.
        host: String,
        /// What failed.
        message: String,
    },
    /// The hypervisor backend failed.
    #[error("the hypervisor backend failed")]
    Hypervisor(#[from] HypervisorError),
    /// The storage backend failed.
    #[error("the storage backend failed")]
    Storage(#[from] StorageError),
    /// The network backend failed.
    #[error("the network backend failed")]
    Network(#[from] NetworkError),
    /// The state store failed. Its messages name the store already.
    #[error(transparent)]
    Store(StoreError),
    /// Events after `after` were asked for, but the oldest kept is `first`: those in
    /// between were removed by the retention rule.
    #[error(
        "the event log no longer holds the events after {after}: its history starts at event {first} (older ones were removed by the retention rule); read from after={} on",
        .first.saturating_sub(1)
    )]
    HistoryTrimmed {
        /// The number the caller asked to read after.
        after: u64,
        /// The oldest event kept.
        first: u64,
    },
    /// The access policy refused the caller (a VM they may not see is answered
    /// with [`ManagerError::NotFound`] instead, as if it did not exist).
    #[error(transparent)]
    Denied(Denied),
    /// An idempotency key was used again with another request.
    #[error(
        "the Idempotency-Key {key:?} was used before with another request; use a new key for a new request"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
    },
    /// A file operation of the manager itself failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn allowed_list(states: &[VmState]) -> String {
    states
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(n) => ManagerError::NameTaken(n),
            StoreError::SnapshotTaken(n) => ManagerError::SnapshotTaken(n),
            StoreError::QuotaExceeded(q) => ManagerError::QuotaExceeded(q),
            StoreError::KeyTaken(fingerprint) => ManagerError::SshKeyTaken(fingerprint),
            StoreError::HandleTaken(handle) => ManagerError::HandleTaken(handle),
            other => ManagerError::Store(other),
        }
    }
}

impl ManagerError {
    /// The agent of VM `name` failed with `e` (its causes kept in the message).
    pub(crate) fn agent(name: &VmName, e: &vmkit_guest::ClientError) -> Self {
        Self::Agent {
            name: name.clone(),
            message: ErrorChain(e).to_string(),
        }
    }

    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ManagerError::InvalidName(_)
            | ManagerError::InvalidSpec(_)
            | ManagerError::InvalidRequest(_)
            | ManagerError::InvalidSshKey(_)
            | ManagerError::InvalidHandle(_)
            | ManagerError::InvalidEmail(_)
            | ManagerError::HandOverToSelf(_) => ErrorKind::InvalidInput,
            ManagerError::RegistrationClosed
            | ManagerError::InviteRequired
            | ManagerError::InviteInvalid => ErrorKind::Forbidden,
            ManagerError::HandleTaken(_) | ManagerError::DomainTaken(_) => ErrorKind::Conflict,
            ManagerError::DomainUnproven(_) => ErrorKind::Forbidden,
            ManagerError::DomainNotFound(_) => ErrorKind::NotFound,
            ManagerError::DomainLookup { .. } => ErrorKind::Unavailable,
            ManagerError::UserNotFound(_) | ManagerError::InviteNotFound(_) => ErrorKind::NotFound,
            ManagerError::UserRemovalIncomplete { .. } => ErrorKind::Unavailable,
            ManagerError::NameTaken(_)
            | ManagerError::SnapshotTaken(_)
            | ManagerError::SshKeyExists(_)
            | ManagerError::SshKeyTaken(_)
            | ManagerError::WrongState { .. }
            | ManagerError::Quarantined { .. } => ErrorKind::Conflict,
            ManagerError::QuotaExceeded(_) => ErrorKind::QuotaExceeded,
            ManagerError::IdempotencyKeyReused { .. } => ErrorKind::Conflict,
            ManagerError::Denied(Denied::SignInRequired { .. }) => ErrorKind::Unauthenticated,
            ManagerError::Denied(Denied::NotFound) => ErrorKind::NotFound,
            ManagerError::Denied(_) => ErrorKind::Forbidden,
            ManagerError::HistoryTrimmed { .. } => ErrorKind::Gone,
            ManagerError::NotFound(_)
            | ManagerError::SnapshotNotFound(_)
            | ManagerError::SshKeyNotFound(_)
            | ManagerError::ApiKeyNotFound(_) => ErrorKind::NotFound,
            ManagerError::Image(ImageError::NotFound { .. }) => ErrorKind::NotFound,
            ManagerError::Image(_) => ErrorKind::InvalidInput,
            ManagerError::Unsupported(_)
            | ManagerError::BackendUnavailable { .. }
            | ManagerError::Hypervisor(HypervisorError::Unsupported { .. })
            | ManagerError::Storage(StorageError::Unsupported(_)) => ErrorKind::Unsupported,
            ManagerError::Store(StoreError::Corrupt(_)) => ErrorKind::Internal,
            ManagerError::Store(StoreError::PoolExhausted(_))
            | ManagerError::Storage(StorageError::NoSpace(_)) => ErrorKind::Unavailable,
            ManagerError::BootFailed { .. }
            | ManagerError::Agent { .. }
            | ManagerError::VmmUnreachable { .. }
            | ManagerError::Hypervisor(_)
            | ManagerError::Storage(_)
            | ManagerError::Network(_)
            | ManagerError::Store(_)
            | ManagerError::Io { .. } => ErrorKind::Unavailable,
        }
    }

    /// A stable machine-readable code for APIs (`name_taken`, `quota_exceeded`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            ManagerError::InvalidName(_) => "invalid_name",
            ManagerError::InvalidSpec(_) => "invalid_spec",
            ManagerError::InvalidRequest(_) => "invalid_request",
            ManagerError::NameTaken(_) => "name_taken",
            ManagerError::QuotaExceeded(_) => "quota_exceeded",
            ManagerError::NotFound(_) => "not_found",
            ManagerError::SnapshotTaken(_) => "snapshot_taken",
            ManagerError::SnapshotNotFound(_) => "snapshot_not_found",
            ManagerError::WrongState { .. } => "wrong_state",
            ManagerError::InvalidSshKey(_) => "invalid_ssh_key",
            ManagerError::SshKeyExists(_) => "ssh_key_exists",
            ManagerError::SshKeyTaken(_) => "ssh_key_taken",
            ManagerError::SshKeyNotFound(_) => "ssh_key_not_found",
            ManagerError::ApiKeyNotFound(_) => "api_key_not_found",
            ManagerError::InvalidHandle(_) => "invalid_handle",
            ManagerError::InvalidEmail(_) => "invalid_email",
            ManagerError::HandleTaken(_) => "handle_taken",
            ManagerError::DomainUnproven(_) => "domain_unproven",
            ManagerError::DomainTaken(_) => "domain_taken",
            ManagerError::DomainNotFound(_) => "domain_not_found",
            ManagerError::DomainLookup { .. } => "dns_lookup_failed",
            ManagerError::UserNotFound(_) => "user_not_found",
            ManagerError::RegistrationClosed => "registration_closed",
            ManagerError::InviteRequired => "invite_required",
            ManagerError::InviteInvalid => "invite_invalid",
            ManagerError::InviteNotFound(_) => "invite_not_found",
            ManagerError::HandOverToSelf(_) => "invalid_hand_over",
            ManagerError::UserRemovalIncomplete { .. } => "user_removal_incomplete",
            ManagerError::Image(ImageError::NotFound { .. }) => "image_not_found",
            ManagerError::Image(_) => "invalid_image",
            ManagerError::BootFailed { .. } => "boot_failed",
            ManagerError::Agent { .. } => "agent_failed",
            ManagerError::Unsupported(_) => "unsupported",
            ManagerError::BackendUnavailable { .. } => "backend_unavailable",
            ManagerError::Quarantined { .. } => "quarantined",
            ManagerError::VmmUnreachable { .. } => "vmm_unreachable",
            ManagerError::Hypervisor(_) => "hypervisor_failed",
            ManagerError::Storage(_) => "storage_failed",
            ManagerError::Network(_) => "network_failed",
            ManagerError::Store(_) => "store_failed",
            ManagerError::HistoryTrimmed { .. } => "history_trimmed",
            ManagerError::Io { .. } => "io_failed",
            ManagerError::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            ManagerError::Denied(Denied::NotFound) => "not_found",
            ManagerError::Denied(Denied::SignInRequired { .. }) => "sign_in_required",
            ManagerError::Denied(Denied::Suspended) => "suspended",
            ManagerError::Denied(Denied::AdminOnly { .. }) => "admin_only",
            ManagerError::Denied(_) => "forbidden",
        }
    }
}

impl ManagerError {
    /// The message for a caller who is not an admin: what failed and what to do,
    /// without the host's detail (backend error chains, host paths, the reasons
    /// reconcile recorded). Admins get [`ErrorChain`] instead.
    pub fn public_message(&self) -> String {
        match self {
            ManagerError::Quarantined { name, .. } => format!(
                "VM {name} is quarantined: the host could not settle it after a failure; \
                 only a delete is accepted (ask the host's operator if that fails too)"
            ),
            ManagerError::BootFailed { name, .. } => {
                format!("VM {name} did not become ready; its console log says why")
            }
            ManagerError::Agent { name, .. } => {
                format!("the agent in VM {name} did not answer as it should; try again")
            }
            ManagerError::VmmUnreachable { name, .. } => format!(
                "the host cannot reach VM {name} right now; it is left running: try again later"
            ),
            ManagerError::Hypervisor(_)
            | ManagerError::Storage(_)
            | ManagerError::Network(_)
            | ManagerError::Store(_)
            | ManagerError::Io { .. } => format!(
                "the host failed ({}); try again, and tell the host's operator if it persists",
                self.code()
            ),
            other => other.to_string(),
        }
    }
}

/// Shows an error followed by its chain of sources, `error: cause: root cause`, as
/// `anyhow` shows `{:#}`.
///
/// vmkit's error messages leave their `#[source]` out, so `to_string()` alone says
/// what failed but not why; use this where an error becomes text for a person (an
/// API response, an event, a log line). It is `Send`, so it can be held across an
/// `.await`.
///
/// ```
/// use vmkit_core::{ErrorChain, HypervisorError, ManagerError};
///
/// let e = ManagerError::from(HypervisorError::InvalidConfig("no vCPUs".into()));
/// assert_eq!(e.to_string(), "the hypervisor backend failed");
/// assert_eq!(
///     ErrorChain(&e).to_string(),
///     "the hypervisor backend failed: invalid machine config: no vCPUs"
/// );
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + Send + Sync + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    // Regression: the wrappers used to print their source in their own message too, so
    // a chain (`{:#}`, the API's message) showed each cause twice.
    #[test]
    fn a_chain_names_each_cause_once() {
        let errors = [
            ManagerError::from(HypervisorError::Io {
                context: "cannot write the config".into(),
                source: cause(),
            }),
            ManagerError::from(StorageError::Io {
                context: "cannot create the volume".into(),
                source: cause(),
            }),
            ManagerError::from(NetworkError::Io {
                context: "cannot create the TAP".into(),
                source: cause(),
            }),
            ManagerError::from(StoreError::backend("cannot commit", cause())),
            ManagerError::Io {
                context: "cannot remove /run/vmkit/x".into(),
                source: cause(),
            },
        ];
        for e in errors {
            let chain = ErrorChain(&e).to_string();
            assert_eq!(chain.matches("cannot ").count(), 1, "{chain}");
            assert_eq!(chain.matches("disk on fire").count(), 1, "{chain}");
        }
    }

    #[test]
    fn a_backend_failure_says_which_backend_then_why() {
        let e = ManagerError::from(StorageError::Io {
            context: "cannot create the volume".into(),
            source: cause(),
        });
        assert_eq!(
            ErrorChain(&e).to_string(),
            "the storage backend failed: cannot create the volume: disk on fire"
        );
    }
}
