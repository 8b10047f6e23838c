//! Wire types of the vmkit REST API, shared by the daemon and its clients.
//!
//! The API is served by `vmkit-gateway` on a Unix socket (`<data_dir>/vmkit.sock`,
//! mode 0600), where every request is the host's operator's; the HTTPS API will
//! serve the same routes to users identified by API key. Each route is an operation
//! of the command surface ([`Manager::commands`](crate::Manager::commands)), decided
//! by the one access policy ([`Policy`](crate::Policy)): a VM the caller may not see
//! answers 404 exactly as one that does not exist; one they see but may not act on,
//! 403 (`forbidden`); a suspended account 403 (`suspended`); an admin's route 403
//! (`admin_only`); an operation that needs an account, 401 (`sign_in_required`).
//!
//! Answers are views ([`VmView`](crate::VmView), [`SnapshotView`](crate::SnapshotView),
//! [`MetricsView`](crate::MetricsView)), never the internal records: the host's side
//! of a VM (volumes and their paths, the VMM's pid and sockets, its uid) is in
//! `resources` for admins only. Every error is a JSON [`ErrorBody`] with a stable
//! `code` and an HTTP status derived from [`ErrorKind`] by [`status_for`]; its
//! message holds the error's causes for admins only (everyone else reads what failed
//! and what to do).
//!
//! `POST /v1/vms`, `/clone` and `/restore` take an `Idempotency-Key` header
//! ([`IDEMPOTENCY_KEY_HEADER`], 1 to 255 characters): asked again with the same key
//! and body (after a timeout, say), the answer is the VM the first request made (or
//! restored), not a second VM or `name_taken`; the same key with another body is 409
//! `idempotency_key_reused`. A create's key is kept with the VM for its life.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/livez` | | `ok` |
//! | GET | `/readyz` | | `ok`, or 503 with why (the store does not answer, or the reconcile at the daemon's start failed as a whole; the other routes serve anyway) |
//! | GET | `/v1/whoami` | | [`Whoami`](crate::Whoami) |
//! | GET | `/v1/vms` | | `[VmView]`: the VMs the caller owns or that are shared with them by name (all, for an admin) |
//! | POST | `/v1/vms` | [`CreateVm`] | 201 `VmView` once ready, owned by the caller |
//! | GET | `/v1/vms/{name}` | | `VmView` |
//! | DELETE | `/v1/vms/{name}?keep_data=bool` | | 204; with `keep_data=true`, [`Deleted`](crate::Deleted): where the data volume went (told to admins only) |
//! | POST | `/v1/vms/{name}/start`, `/stop`, `/restart`, `/pause`, `/resume` | | `VmView` |
//! | POST | `/v1/vms/{name}/exec` | [`ExecBody`] | NDJSON stream of [`ExecLine`] |
//! | POST | `/v1/vms/{name}/session` | header [`session::SESSION_HEADER`]: a `SessionRequest`, `Upgrade:` [`session::SESSION_PROTOCOL`] | 101, then frames both ways ([`session`]) |
//! | POST | `/v1/vms/{name}/rename` | [`NameBody`] | `VmView` |
//! | POST | `/v1/vms/{name}/resize` | [`ResizeRequest`](crate::ResizeRequest) | `VmView` |
//! | GET | `/v1/vms/{name}/logs?bytes=N` | | console tail, `text/plain` |
//! | GET | `/v1/vms/{name}/logs?unit=U\|file=F&lines=N&follow=B` | | a unit's journal or a file in the guest, NDJSON `{"line"}` (`{"error"}` last on failure) |
//! | GET | `/v1/vms/{name}/metrics` | | [`MetricsView`](crate::MetricsView) |
//! | POST | `/v1/vms/{name}/snapshots` | [`NameBody`] | 201 `SnapshotView` (the VM owner's) |
//! | POST | `/v1/vms/{name}/restore` | [`NameBody`] (one of the caller's snapshots) | `VmView` |
//! | POST | `/v1/vms/{name}/clone` | [`NameBody`] (optional new name) | 201 `VmView` once ready, owned by the caller |
//! | GET | `/v1/snapshots` | | `[SnapshotView]`: the caller's (all, for an admin) |
//! | DELETE | `/v1/snapshots/{name}` | | 204 |
//! | POST | `/v1/snapshots/{name}/clone` | [`NameBody`] (optional new name) | 201 `VmView` once ready |
//! | GET | `/v1/events?after=SEQ&limit=N&follow=bool` | | NDJSON stream of `Event` (below); admins only |
//! | GET | `/v1/images` | | `[String]` |
//! | GET | `/v1/keys` | | `[`[`SshKeyInfo`]`]`: the caller's SSH public keys |
//! | POST | `/v1/keys` | one OpenSSH public key line, as text | 201 [`SshKeyInfo`]; 400 not a key, 409 registered already |
//! | DELETE | `/v1/keys/{fingerprint}` | | 204; 404 no such key |
//! | GET | `/v1/api-keys` | | `[`[`ApiKeyView`](crate::ApiKeyView)`]`: the caller's API keys, never their secrets |
//! | POST | `/v1/api-keys` | [`NewApiKey`] | 201 [`ApiKeyView`](crate::ApiKeyView) with its `secret`, in this answer only; 404 no such VM |
//! | DELETE | `/v1/api-keys/{id}` | | 204; 404 `api_key_not_found` |
//! | GET | `/v1/vms/{name}/shares` | | `[`[`ShareView`](crate::ShareView)`]` (owner) |
//! | POST | `/v1/vms/{name}/shares` | [`ShareBody`] | 201 [`ShareView`](crate::ShareView); a link's `secret` is in this answer only |
//! | DELETE | `/v1/vms/{name}/shares?with=public\|user:ID\|link:NAME&access=A` | | `{"removed": N}` |
//! | GET | `/v1/domains?vm=NAME` | | `[`[`DomainView`](crate::DomainView)`]`: the custom domains of the VMs the caller may share (of one VM with `vm`) |
//! | POST | `/v1/vms/{name}/domains` | [`DomainBody`] | 201 `DomainView` once DNS proves the host the VM owner's; 403 `domain_unproven` (the message says what to publish), 409 `domain_taken` |
//! | DELETE | `/v1/domains/{host}` | | 204; 404 `domain_not_found` |
//! | GET | `/v1/users` | | `[`[`UserInfo`]`]`: the registered users, by id |
//! | POST | `/v1/users` | [`AddUser`] | 201 [`UserInfo`]; 400 bad handle, key or email, 409 handle or key taken |
//! | GET | `/v1/users/{handle}` | | [`UserInfo`]; 404 `user_not_found` |
//! | DELETE | `/v1/users/{handle}?vms=delete` or `?hand_over=HANDLE` (one of them) | | 204 once the user and their VMs are gone or handed over; 503 `user_removal_incomplete` names what is left |
//! | POST | `/v1/users/{handle}/suspend`, `/resume` | | [`UserInfo`] |
//! | GET | `/v1/invites` | | `[`[`InviteInfo`]`]` (expired ones too, until the next invite is made) |
//! | POST | `/v1/invites` | [`NewInvite`] | 201 [`CreatedInvite`]: the code, shown this once |
//! | DELETE | `/v1/invites/{id}` | | 204; 404 `invite_not_found` |
//!
//! Events are numbered from 1 (`seq`), oldest first in every answer. Without
//! `after`, `/v1/events` answers the newest `limit` events (default 1000, at most
//! 10000); with `after`, the first `limit` events numbered above it, so a client pages
//! forward by passing the last `seq` it got. With `follow=true` the answer does not
//! end: it holds every stored event after `after` (or, without `after`, the newest
//! `limit`), however many, then every new event as it is stored, each exactly once and
//! in order (see [`EventFeed`](crate::EventFeed)), until the daemon shuts down.
//!
//! Users and invites are admins' (the operator's, on this socket). The
//! answers are views: an invite's code is shown once, when it is made, and its hash
//! never.
//!
//! A user's SSH keys go into the guests of their VMs at every create and
//! start (replacing the keys vmkit put there before), so a key added or removed
//! reaches a running VM at its next start. A fingerprint is `SHA256:…` as
//! `ssh-keygen -l` prints it (the `SHA256:` may be left out), percent-encoded in the
//! path: its base64 may hold `/` and `+`.

pub mod session;

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::name::VmName;

use crate::error::ErrorKind;
use crate::invite::Invite;
use crate::spec::VmSpec;
use crate::time::Timestamp;
use crate::user::{Role, SshPublicKey, User, UserStatus};
use vmkit_guest::{ExecEvent, ExecRequest, ExitStatus};

/// The header a client sets on `POST /v1/vms`, `/clone` and `/restore` so that it
/// can ask again after a timeout without making a second VM (or restoring twice).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Body of `POST /v1/vms/{name}/domains`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DomainBody {
    /// The custom host name.
    pub host: String,
}

impl DomainBody {
    /// Attaches `host`.
    pub fn new(host: impl Into<String>) -> Self {
        Self { host: host.into() }
    }
}

/// Body of `POST /v1/vms/{name}/shares`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ShareBody {
    /// With whom.
    pub with: crate::ShareWith,
    /// What it grants.
    pub access: crate::Access,
}

impl ShareBody {
    /// Shares with `with`, granting `access`.
    pub fn new(with: crate::ShareWith, access: crate::Access) -> Self {
        Self { with, access }
    }
}

/// A body naming one thing: the snapshot to take or restore, or a clone's name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NameBody {
    /// The name; optional only for clones (generated when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl NameBody {
    /// A body with `name`.
    pub fn new(name: Option<String>) -> Self {
        Self { name }
    }
}

/// Body of `POST /v1/vms`. Missing fields take the manager's defaults
/// ([`ManagerConfig::default_spec`](crate::ManagerConfig::default_spec)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CreateVm {
    /// Name; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Image name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Data disk in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// Root disk in GiB (0: the image's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_gib: Option<u64>,
}

impl CreateVm {
    /// The spec this body asks for, with [`VmSpec::default`] for what it leaves out.
    pub fn spec(&self) -> VmSpec {
        self.spec_or(&VmSpec::default())
    }

    /// The spec this body asks for, with `defaults` for what it leaves out.
    pub fn spec_or(&self, defaults: &VmSpec) -> VmSpec {
        let d = defaults.clone();
        VmSpec {
            image: self.image.clone().unwrap_or(d.image),
            vcpus: self.vcpus.unwrap_or(d.vcpus),
            memory_mib: self.memory_mib.unwrap_or(d.memory_mib),
            disk_gib: self.disk_gib.unwrap_or(d.disk_gib),
            root_gib: self.root_gib.unwrap_or(d.root_gib),
        }
    }
}

/// An SSH public key as `GET /v1/keys` and `POST /v1/keys` answer it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SshKeyInfo {
    /// `SHA256:…`, as `ssh-keygen -l` prints it: what `DELETE /v1/keys/{fingerprint}`
    /// takes.
    pub fingerprint: String,
    /// The key type, such as `ssh-ed25519`.
    pub algorithm: String,
    /// The comment after the key data (often `user@host`); may be empty.
    pub comment: String,
    /// The whole `authorized_keys` line.
    pub key: String,
}

impl From<&SshPublicKey> for SshKeyInfo {
    fn from(key: &SshPublicKey) -> Self {
        Self {
            fingerprint: key.fingerprint(),
            algorithm: key.algorithm().to_owned(),
            comment: key.comment().to_owned(),
            key: key.to_openssh(),
        }
    }
}

/// A user as `/v1/users` answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UserInfo {
    /// Their id (what a VM's `owner` says).
    pub id: crate::UserId,
    /// Their handle.
    pub handle: String,
    /// Their contact address, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// What they may do.
    pub role: Role,
    /// Whether they may sign in.
    pub status: UserStatus,
    /// When they were registered (milliseconds since the Unix epoch).
    pub created_at: Timestamp,
    /// Their SSH public keys.
    pub ssh_keys: Vec<SshKeyInfo>,
}

impl UserInfo {
    /// The view of `user` with their `keys`.
    pub fn new(user: &User, keys: &[SshPublicKey]) -> Self {
        Self {
            id: user.id,
            handle: user.handle.to_string(),
            email: user.email.clone(),
            role: user.role,
            status: user.status,
            created_at: user.created_at,
            ssh_keys: keys.iter().map(SshKeyInfo::from).collect(),
        }
    }
}

/// Body of `POST /v1/users`: a user the operator adds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AddUser {
    /// Their handle.
    pub handle: String,
    /// Their first SSH public key, one OpenSSH line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<String>,
    /// Their contact address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Their role; `user` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

impl AddUser {
    /// A body adding `handle`.
    pub fn new(handle: impl Into<String>) -> Self {
        Self {
            handle: handle.into(),
            ..Self::default()
        }
    }
}

/// An invite as `/v1/invites` answers it: never its code or the code's hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InviteInfo {
    /// Its id, which `DELETE /v1/invites/{id}` takes.
    pub id: String,
    /// The role of the user who registers with it.
    pub role: Role,
    /// Who made it (user id; 0 is the local operator).
    pub created_by: crate::user::UserId,
    /// When it was made (milliseconds since the Unix epoch).
    pub created_at: Timestamp,
    /// When it stops being accepted.
    pub expires_at: Timestamp,
    /// Whether it had expired when this answer was made.
    pub expired: bool,
}

impl InviteInfo {
    /// The view of `invite` at `now`.
    pub fn new(invite: &Invite, now: Timestamp) -> Self {
        Self {
            id: invite.id.clone(),
            role: invite.role,
            created_by: invite.created_by,
            created_at: invite.created_at,
            expires_at: invite.expires_at,
            expired: invite.is_expired(now),
        }
    }
}

/// Body of `POST /v1/api-keys`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NewApiKey {
    /// What its owner calls it.
    #[serde(default)]
    pub label: String,
    /// How long it works, in seconds; forever when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    /// Whether it may only read.
    #[serde(default)]
    pub read_only: bool,
    /// The one VM it sees and acts on, if limited to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmName>,
}

/// Body of `POST /v1/invites`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NewInvite {
    /// How long the invite counts, in seconds; [`NewInvite::DEFAULT_TTL_SECS`] (7
    /// days) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// The role of the user who registers with it; `user` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

impl NewInvite {
    /// The lifetime of an invite made without `ttl_secs`: 7 days.
    pub const DEFAULT_TTL_SECS: u64 = 7 * 86_400;
}

/// Answer of `POST /v1/invites`: the invite and its code, which is not stored and
/// cannot be shown again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CreatedInvite {
    /// The invite.
    pub invite: InviteInfo,
    /// The code (`vmi_…`) to hand to the person invited.
    pub code: String,
}

impl CreatedInvite {
    /// The answer for `invite` with `code`.
    pub fn new(invite: InviteInfo, code: String) -> Self {
        Self { invite, code }
    }
}

/// Body of `POST /v1/vms/{name}/exec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExecBody {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input, base64.
    #[serde(default)]
    pub stdin: String,
    /// Timeout in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl ExecBody {
    /// A body running `argv`.
    pub fn new(argv: Vec<String>) -> Self {
        Self {
            argv,
            ..Self::default()
        }
    }

    /// The agent request this body asks for.
    pub fn to_request(&self) -> Result<ExecRequest, base64::DecodeError> {
        let mut req = ExecRequest::new(self.argv.iter().cloned());
        for (k, v) in &self.env {
            req = req.env(k.clone(), v.clone());
        }
        if let Some(cwd) = &self.cwd {
            req = req.cwd(cwd.clone());
        }
        if !self.stdin.is_empty() {
            req = req.stdin(STANDARD.decode(&self.stdin)?);
        }
        if let Some(ms) = self.timeout_ms {
            req = req.timeout(std::time::Duration::from_millis(ms));
        }
        Ok(req)
    }
}

/// One line of an exec stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExecLine {
    /// Standard output bytes, base64.
    Stdout(String),
    /// Standard error bytes, base64.
    Stderr(String),
    /// The command ended.
    Exit(ExitStatus),
    /// The stream failed; no exit status follows.
    Error(ErrorBody),
}

impl ExecLine {
    /// The line for an agent event.
    pub fn from_event(event: &ExecEvent) -> Option<Self> {
        match event {
            ExecEvent::Stdout(b) => Some(ExecLine::Stdout(STANDARD.encode(b))),
            ExecEvent::Stderr(b) => Some(ExecLine::Stderr(STANDARD.encode(b))),
            ExecEvent::Exit(s) => Some(ExecLine::Exit(*s)),
            _ => None,
        }
    }
}

/// Decodes the base64 payload of an exec line.
pub fn decode_bytes(b64: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD.decode(b64)
}

/// Encodes bytes for an [`ExecBody::stdin`].
pub fn encode_bytes(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// An error as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorBody {
    /// Stable machine-readable code (`name_taken`, `quota_exceeded`, ...).
    pub code: String,
    /// A sentence for people, saying what to do.
    pub message: String,
}

impl ErrorBody {
    /// An error body.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The header of `GET /v1/events` answers that holds the number of the oldest event
/// kept ([`Manager::first_event_seq`](crate::Manager::first_event_seq)): the
/// retention rule removed those before it, and asking for them (`after` below it
/// minus one) is answered `410 Gone` (`history_trimmed`).
pub const FIRST_EVENT_HEADER: &str = "vmkit-first-event";

/// The HTTP status for an error kind: the one mapping every transport uses.
pub fn status_for(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::InvalidInput => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Conflict => 409,
        ErrorKind::QuotaExceeded => 403,
        ErrorKind::Forbidden => 403,
        ErrorKind::Gone => 410,
        ErrorKind::Unsupported => 501,
        ErrorKind::Unavailable => 503,
        ErrorKind::Internal => 500,
        ErrorKind::Unauthenticated => 401,
    }
}

/// The default data directory: `/var/lib/vmkit` for root, else
/// `$XDG_DATA_HOME/vmkit` or `~/.local/share/vmkit`.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return PathBuf::from("/var/lib/vmkit");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(xdg).join("vmkit");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/vmkit"),
        None => PathBuf::from("/var/lib/vmkit"),
    }
}

/// The API socket inside a data directory.
pub fn socket_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("vmkit.sock")
}
