//! Users, their SSH public keys and API keys.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::time::Timestamp;
use crate::token::TokenHash;

/// A user's stable identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub u64);

impl UserId {
    /// The operator's own user, owner of VMs created through the local API.
    pub const LOCAL: UserId = UserId(0);
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "u{}", self.0)
    }
}

/// Most characters of a [`Handle`].
pub const MAX_HANDLE_LEN: usize = 32;

/// Handles no one can take: the lobby's commands (a handle is typed where a command
/// could be), names that look like the host's own accounts, and `vmkit`. Handles of
/// the form `u` followed by digits are refused too: they name users whose stored name
/// was not a valid handle (see [`User`]).
pub const RESERVED_HANDLES: &[&str] = &[
    "admin",
    "administrator",
    "api",
    "api-key",
    "browser",
    "daemon",
    "help",
    "local",
    "localhost",
    "ls",
    "new",
    "nobody",
    "operator",
    "rm",
    "root",
    "share",
    "ssh-key",
    "support",
    "sudo",
    "system",
    "vmkit",
    "whoami",
];

/// A user's handle: the name they are known by, unique on the host. Like a DNS
/// label: 1 to [`MAX_HANDLE_LEN`] lowercase letters, digits and hyphens, neither
/// starting nor ending with a hyphen, and not in [`RESERVED_HANDLES`].
///
/// ```
/// use vmkit_core::Handle;
///
/// assert_eq!(Handle::new("ada-l").unwrap().as_str(), "ada-l");
/// assert!(Handle::new("Ada").is_err());
/// assert!(Handle::new("root").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Handle(String);

/// Why a string is not a valid [`Handle`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The handle is empty.
    #[error("a handle cannot be empty; use 1 to 32 lowercase letters, digits or hyphens")]
    Empty,
    /// The handle is too long.
    #[error("a handle has at most 32 characters, this one has {len}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A character outside a-z, 0-9 and '-'.
    #[error("a handle may hold only lowercase letters, digits and hyphens, not {found:?}")]
    InvalidChar {
        /// The first such character.
        found: char,
    },
    /// Starts or ends with a hyphen.
    #[error("a handle cannot start or end with '-'")]
    EdgeHyphen,
    /// The handle is reserved.
    #[error("{0:?} is a reserved handle; choose another")]
    Reserved(String),
}

impl Handle {
    /// Validates `handle` as a new handle, reserved names included.
    pub fn new(handle: impl Into<String>) -> Result<Self, HandleError> {
        let handle = handle.into();
        check_form(&handle)?;
        let numbered = handle
            .strip_prefix('u')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if RESERVED_HANDLES.contains(&handle.as_str()) || numbered {
            return Err(HandleError::Reserved(handle));
        }
        Ok(Self(handle))
    }

    /// The handle of the local operator's own record ([`UserId::LOCAL`]): reserved,
    /// so no user can take it.
    pub fn local() -> Self {
        Self("local".to_owned())
    }

    /// The handle a user with a stored name that is not a valid handle gets:
    /// `u<ID>`, which [`Handle::new`] refuses for anyone else.
    pub fn numbered(id: UserId) -> Self {
        Self(format!("u{}", id.0))
    }

    /// The handle as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The form of a handle, without the reserved names: stored handles decode even if a
/// later vmkit reserves them.
fn check_form(handle: &str) -> Result<(), HandleError> {
    if handle.is_empty() {
        return Err(HandleError::Empty);
    }
    if handle.len() > MAX_HANDLE_LEN {
        return Err(HandleError::TooLong { len: handle.len() });
    }
    if let Some(found) = handle
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(HandleError::InvalidChar { found });
    }
    if handle.starts_with('-') || handle.ends_with('-') {
        return Err(HandleError::EdgeHyphen);
    }
    Ok(())
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Handle {
    type Err = HandleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Handle {
    type Error = HandleError;
    /// Decodes a stored handle: its form is checked, not the reserved names.
    fn try_from(s: String) -> Result<Self, Self::Error> {
        check_form(&s)?;
        Ok(Self(s))
    }
}

impl From<Handle> for String {
    fn from(h: Handle) -> String {
        h.0
    }
}

/// What a user may do on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Role {
    /// A user: their own VMs and what is shared with them.
    #[default]
    User,
    /// An administrator: everything, other users included.
    Admin,
}

impl Role {
    /// `user` or `admin`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a user may sign in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UserStatus {
    /// May sign in and use the host.
    #[default]
    Active,
    /// Refused at sign-in; their VMs are kept (and keep running) until an operator
    /// resumes or removes them.
    Suspended,
}

impl UserStatus {
    /// `active` or `suspended`.
    pub fn as_str(&self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Suspended => "suspended",
        }
    }
}

impl fmt::Display for UserStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user of the host.
///
/// Records stored by an older vmkit (a free-form `name`, no handle, role or status)
/// still decode: the name becomes the handle when it is a valid one, else the user is
/// `u<ID>` ([`Handle::numbered`]; the local operator's record is `local`); they are
/// active users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredUser")]
#[non_exhaustive]
pub struct User {
    /// Identifier, allocated by the store and never reused.
    pub id: UserId,
    /// Unique handle.
    pub handle: Handle,
    /// Contact address, when known.
    pub email: Option<String>,
    /// What the user may do.
    pub role: Role,
    /// Whether the user may sign in.
    pub status: UserStatus,
    /// When the user was registered.
    pub created_at: Timestamp,
}

/// A user record as stored, by this vmkit or an older one.
#[derive(Deserialize)]
struct StoredUser {
    id: UserId,
    #[serde(default)]
    handle: Option<Handle>,
    /// Before handles: a free-form display name.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    role: Role,
    #[serde(default)]
    status: UserStatus,
    #[serde(default)]
    created_at: Timestamp,
}

impl TryFrom<StoredUser> for User {
    type Error = HandleError;
    fn try_from(s: StoredUser) -> Result<Self, HandleError> {
        let handle = match (s.handle, s.name) {
            (Some(handle), _) => handle,
            (None, _) if s.id == UserId::LOCAL => Handle::local(),
            (None, Some(name)) => Handle::new(name).unwrap_or_else(|_| Handle::numbered(s.id)),
            (None, None) => Handle::numbered(s.id),
        };
        Ok(User {
            id: s.id,
            handle,
            email: s.email,
            role: s.role,
            status: s.status,
            created_at: s.created_at,
        })
    }
}

impl User {
    /// A new active user record with role [`Role::User`], created now.
    pub fn new(id: UserId, handle: Handle) -> Self {
        Self {
            id,
            handle,
            email: None,
            role: Role::User,
            status: UserStatus::Active,
            created_at: Timestamp::now(),
        }
    }

    /// The record of the local operator ([`UserId::LOCAL`], handle `local`), owner
    /// of the VMs made through the daemon's root socket. Not a registered user.
    pub fn local() -> Self {
        let mut user = Self::new(UserId::LOCAL, Handle::local());
        user.role = Role::Admin;
        user
    }

    /// Sets the role.
    pub fn role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// Sets the contact address.
    pub fn email(mut self, email: Option<String>) -> Self {
        self.email = email;
        self
    }

    /// Whether the user is suspended.
    pub fn is_suspended(&self) -> bool {
        self.status == UserStatus::Suspended
    }
}

/// Key algorithms accepted for SSH public keys.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// A parsed OpenSSH public key (`authorized_keys` line format).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SshPublicKey {
    algorithm: String,
    blob: Vec<u8>,
    comment: String,
}

/// Why a string is not an SSH public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SshKeyError {
    /// Not of the form `TYPE BASE64 [COMMENT]`.
    #[error("expected an OpenSSH public key line such as `ssh-ed25519 AAAA... you@host`")]
    Format,
    /// The key type is not one vmkit accepts.
    #[error("unsupported key type {0:?}; use ssh-ed25519, ssh-rsa or ecdsa-sha2-*")]
    UnsupportedType(String),
    /// The base64 part does not decode.
    #[error("the key data is not valid base64; copy the whole line of the .pub file")]
    Base64,
    /// The decoded blob does not name the same key type as the line.
    #[error(
        "the key data does not match its declared type {0:?}; copy the whole line of the .pub file unchanged"
    )]
    Mismatch(String),
    /// More than one line: several keys, or a key with something after it.
    #[error("expected one OpenSSH public key line, found several; give one key at a time")]
    SeveralLines,
    /// The key data names the right type but is not a valid key of it (a point off
    /// its curve, a truncated or padded blob, an RSA modulus under 1024 bits).
    #[error("the key data is not a valid {0} key; copy the whole line of the .pub file unchanged")]
    InvalidKey(String),
}

impl SshPublicKey {
    /// Parses an `authorized_keys`-style line: `TYPE BASE64 [COMMENT]`. Whitespace
    /// around it (the newline ending a `.pub` file) is ignored; a second line is
    /// refused. The key material is checked: an ed25519 or ECDSA point must be on
    /// its curve, an RSA modulus at least 1024 bits (OpenSSH's floor), and the blob
    /// must hold the key and nothing else.
    pub fn parse(line: &str) -> Result<Self, SshKeyError> {
        let key = Self::parse_form(line)?;
        check_material(&key.algorithm, &key.blob)?;
        Ok(key)
    }

    /// [`SshPublicKey::parse`] without the check of the key material: stored keys
    /// decode with it, so that a key accepted by an older, laxer vmkit still reads.
    fn parse_form(line: &str) -> Result<Self, SshKeyError> {
        let line = line.trim();
        if line.lines().nth(1).is_some() {
            return Err(SshKeyError::SeveralLines);
        }
        let mut parts = line.split_whitespace();
        let algorithm = parts.next().ok_or(SshKeyError::Format)?;
        let data = parts.next().ok_or(SshKeyError::Format)?;
        let comment = parts.collect::<Vec<_>>().join(" ");
        if !KEY_TYPES.contains(&algorithm) {
            return Err(SshKeyError::UnsupportedType(algorithm.to_owned()));
        }
        let blob = STANDARD.decode(data).map_err(|_| SshKeyError::Base64)?;
        // The blob starts with the key type as an SSH string: u32 length, bytes.
        let declared = blob
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .and_then(|len| blob.get(4..4 + len))
            .ok_or_else(|| SshKeyError::Mismatch(algorithm.to_owned()))?;
        if declared != algorithm.as_bytes() {
            return Err(SshKeyError::Mismatch(algorithm.to_owned()));
        }
        Ok(Self {
            algorithm: algorithm.to_owned(),
            blob,
            comment,
        })
    }

    /// The key type, such as `ssh-ed25519`.
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// The comment after the key data (often `user@host`); may be empty.
    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// The OpenSSH SHA-256 fingerprint, `SHA256:` followed by unpadded base64.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(&self.blob);
        format!("SHA256:{}", STANDARD_NO_PAD.encode(digest))
    }

    /// The key as an `authorized_keys` line.
    pub fn to_openssh(&self) -> String {
        let data = STANDARD.encode(&self.blob);
        if self.comment.is_empty() {
            format!("{} {data}", self.algorithm)
        } else {
            format!("{} {data} {}", self.algorithm, self.comment)
        }
    }
}

impl FromStr for SshPublicKey {
    type Err = SshKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SshPublicKey {
    type Error = SshKeyError;
    /// Decodes a stored key: its form is checked, not its material (see
    /// [`SshPublicKey::parse`]).
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse_form(&s)
    }
}

/// Checks that `blob` is one valid public key of type `algorithm`.
fn check_material(algorithm: &str, blob: &[u8]) -> Result<(), SshKeyError> {
    use ssh_key::public::{EcdsaPublicKey, KeyData};

    let invalid = || SshKeyError::InvalidKey(algorithm.to_owned());
    // Decoding checks the structure: lengths, SEC1 point encoding, positive
    // integers, no bytes left over.
    let key = ssh_key::PublicKey::from_bytes(blob).map_err(|_| invalid())?;
    let ecdsa = |point: &EcdsaPublicKey| -> bool {
        match point {
            EcdsaPublicKey::NistP256(_) => p256::ecdsa::VerifyingKey::try_from(point).is_ok(),
            EcdsaPublicKey::NistP384(_) => p384::ecdsa::VerifyingKey::try_from(point).is_ok(),
            EcdsaPublicKey::NistP521(_) => p521::ecdsa::VerifyingKey::try_from(point).is_ok(),
        }
    };
    let valid = match key.key_data() {
        KeyData::Ed25519(point) => ed25519_dalek::VerifyingKey::try_from(point).is_ok(),
        KeyData::SkEd25519(sk) => ed25519_dalek::VerifyingKey::try_from(sk.public_key()).is_ok(),
        KeyData::Ecdsa(point) => ecdsa(point),
        KeyData::SkEcdsaSha2NistP256(sk) => ecdsa(&EcdsaPublicKey::NistP256(*sk.ec_point())),
        KeyData::Rsa(rsa) => {
            let odd = |m: &ssh_key::Mpint| {
                m.as_positive_bytes()
                    .and_then(|b| b.last())
                    .is_some_and(|b| b & 1 == 1)
            };
            rsa.key_size() >= 1024 && odd(rsa.n()) && odd(rsa.e())
        }
        _ => false,
    };
    if valid { Ok(()) } else { Err(invalid()) }
}

impl From<SshPublicKey> for String {
    fn from(k: SshPublicKey) -> String {
        k.to_openssh()
    }
}

impl fmt::Display for SshPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_openssh())
    }
}

/// What an API key may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ApiKeyScope {
    /// Only what reads: lists, a VM's details, logs, metrics, shares, who am I.
    ReadOnly,
    /// Everything its user may do (but make or revoke API keys).
    #[default]
    Full,
}

impl ApiKeyScope {
    /// The scope as lists say it: `read-only` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyScope::ReadOnly => "read-only",
            ApiKeyScope::Full => "full",
        }
    }
}

impl fmt::Display for ApiKeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bytes of an API key's salt.
const API_KEY_SALT_BYTES: usize = 16;

/// An API key as stored: the SHA-256 hash of a per-key random salt followed by the
/// secret; the secret itself is shown once, when the key is made.
///
/// A record of an older vmkit has no salt (its hash is of the secret alone), no
/// label, scope, expiry or VM: it decodes as a full key that never expires and
/// verifies as before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ApiKey {
    /// Public identifier (the part of the secret after `vmk_`, before the random).
    pub id: String,
    /// Owner.
    pub user: UserId,
    /// The hash of the salt and the full key (stored as hex SHA-256).
    pub hash: TokenHash,
    /// The salt, as hex; `None` for a record of an older vmkit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// Creation time.
    pub created_at: Timestamp,
    /// What its owner calls it.
    #[serde(default)]
    pub label: String,
    /// When it stops identifying anyone; never when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// What it may do.
    #[serde(default)]
    pub scope: ApiKeyScope,
    /// The one VM it is limited to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::vm::VmId>,
    /// When it last identified its user (recorded at most about once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Timestamp>,
}

impl ApiKey {
    /// A stored record for the key `secret` (the full `vmk_...` string), under a
    /// new random salt: a full key without label or expiry, for any VM.
    pub fn new(id: impl Into<String>, user: UserId, secret: &str) -> Self {
        let mut salt = [0u8; API_KEY_SALT_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
        let salt_hex: String = salt.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            id: id.into(),
            user,
            hash: TokenHash::salted(&salt, secret),
            salt: Some(salt_hex),
            created_at: Timestamp::now(),
            label: String::new(),
            expires_at: None,
            scope: ApiKeyScope::Full,
            vm: None,
            last_used_at: None,
        }
    }

    /// A new key for `user`: the record to store and the secret,
    /// `vmk_<id>_<random>` with 256 random bits, to show once.
    pub fn generate(user: UserId) -> (Self, String) {
        let id = crate::token::new_secret("")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect::<String>()
            .to_ascii_lowercase();
        let secret = crate::token::new_secret(&format!("vmk_{id}_"));
        (Self::new(id, user, &secret), secret)
    }

    /// With `label`.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Expiring at `at`.
    pub fn expires_at(mut self, at: Timestamp) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// With `scope`.
    pub fn scope(mut self, scope: ApiKeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// Limited to the VM `vm`.
    pub fn vm(mut self, vm: crate::vm::VmId) -> Self {
        self.vm = Some(vm);
        self
    }

    /// The id in an API key's secret (`vmk_<id>_<random>`), if it has that form.
    pub fn id_of(secret: &str) -> Option<&str> {
        let (id, rest) = secret.strip_prefix("vmk_")?.split_once('_')?;
        (!id.is_empty() && !rest.is_empty()).then_some(id)
    }

    /// Whether `secret` is this key (the hashes compared in constant time). A
    /// record whose salt does not decode verifies nothing.
    pub fn verify(&self, secret: &str) -> bool {
        match &self.salt {
            None => self.hash.matches(secret),
            Some(hex) => match decode_hex(hex) {
                Some(salt) => self.hash.matches_salted(&salt, secret),
                None => false,
            },
        }
    }

    /// Whether the key has expired at `now`.
    pub fn expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real ed25519 public key line generated with ssh-keygen.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILCkWGIcqzUfwK2Ls1cyvWoL0Yu96sujsXIbpy6qXyQg alice@example";
    // Its fingerprint as printed by `ssh-keygen -lf`.
    const ED25519_FP: &str = "SHA256:pdOw1KFosVVI8uzoMTyb5y5n6IuwSNYsZbYqOFEvKmk";

    #[test]
    fn ed25519_key_is_parsed_and_fingerprinted_like_ssh_keygen() {
        let key = SshPublicKey::parse(ED25519).unwrap();
        assert_eq!(key.algorithm(), "ssh-ed25519");
        assert_eq!(key.comment(), "alice@example");
        assert_eq!(key.fingerprint(), ED25519_FP);
        assert_eq!(key.to_openssh(), ED25519);
        assert_eq!(
            SshPublicKey::parse(&format!("{ED25519}\n")).unwrap(),
            key,
            "the newline ending a .pub file is ignored"
        );
    }

    #[test]
    fn malformed_keys_are_rejected() {
        assert_eq!(SshPublicKey::parse(""), Err(SshKeyError::Format));
        assert_eq!(
            SshPublicKey::parse("ssh-dss AAAA"),
            Err(SshKeyError::UnsupportedType("ssh-dss".into()))
        );
        assert_eq!(
            SshPublicKey::parse("ssh-ed25519 !!!"),
            Err(SshKeyError::Base64)
        );
        assert_eq!(
            SshPublicKey::parse(&format!("{ED25519}\n{ED25519}\n")),
            Err(SshKeyError::SeveralLines)
        );
        // Valid base64 of an ssh-rsa blob declared as ed25519.
        let rsa_blob = STANDARD.encode(b"\0\0\0\x07ssh-rsa\0\0\0\x01\x23");
        assert_eq!(
            SshPublicKey::parse(&format!("ssh-ed25519 {rsa_blob}")),
            Err(SshKeyError::Mismatch("ssh-ed25519".into()))
        );
    }

    /// An ed25519 key line whose blob holds `point` as its key data.
    fn ed25519_line(point: &[u8]) -> String {
        let mut blob = b"\0\0\0\x0bssh-ed25519".to_vec();
        blob.extend((point.len() as u32).to_be_bytes());
        blob.extend(point);
        format!("ssh-ed25519 {}", STANDARD.encode(blob))
    }

    // Regression: only the type prefix of the blob used to be checked.
    #[test]
    fn a_key_with_the_right_type_but_broken_key_material_is_refused() {
        let good = SshPublicKey::parse(ED25519).unwrap();
        let point = &good.blob[good.blob.len() - 32..];
        let invalid = Err(SshKeyError::InvalidKey("ssh-ed25519".into()));

        assert!(SshPublicKey::parse(&ed25519_line(point)).is_ok());
        assert_eq!(
            SshPublicKey::parse(&ed25519_line(&point[..31])),
            invalid,
            "a truncated point"
        );
        let mut padded = good.blob.clone();
        padded.push(0);
        assert_eq!(
            SshPublicKey::parse(&format!("ssh-ed25519 {}", STANDARD.encode(padded))),
            invalid,
            "bytes after the key"
        );
        // 32 bytes that are no point of the curve.
        let off_curve = (0..=255u8)
            .map(|n| [n; 32])
            .find(|p| ed25519_dalek::VerifyingKey::from_bytes(p).is_err())
            .unwrap();
        assert_eq!(SshPublicKey::parse(&ed25519_line(&off_curve)), invalid);
        assert!(
            SshKeyError::InvalidKey("ssh-ed25519".into())
                .to_string()
                .contains("copy the whole line of the .pub file"),
        );
    }

    #[test]
    fn a_stored_key_decodes_without_the_material_check() {
        let off_curve = (0..=255u8)
            .map(|n| [n; 32])
            .find(|p| ed25519_dalek::VerifyingKey::from_bytes(p).is_err())
            .unwrap();
        let json = serde_json::to_string(&ed25519_line(&off_curve)).unwrap();
        assert!(serde_json::from_str::<SshPublicKey>(&json).is_ok());
    }

    #[test]
    fn ecdsa_and_rsa_keys_are_parsed_and_an_ecdsa_point_off_its_curve_is_refused() {
        // Generated with ssh-keygen -t ecdsa -b 256, -t rsa -b 2048, -t ecdsa -b 521.
        const P256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMFYjDXD/sSLErahZoFWpsQmSr/rMtyjLO9dslfhqtvmfLcDIPdEbPGvh7ral/w4Z/G0HVb1pbDs11uJzv4Av/k= e@x";
        const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDQ1EXsISNltnwGxisZTx4Z8v2liWvdwwsveJU64Q2uOmvnzN9JaGaWKgsukPNQXMZ7z1PLaKLlP/s+XzBEVqdF9uVnenrSoxn0UuONc99E6MJQG3hBYbYe18go2k7barNbCWQmDyhBY2gfCWGMomspBZ7ryECTqwqqzWa1P1z5vPG4CrNK2IcA9QVIVSwiGnyskrJhedXGGc75G7NBguBySINkWcAG/xtAiUre9gnDGIjco/9mPQ4ZxGD0i0T+xy49uVNhA9c5K0oku27FEGeqc6VFD3psWWM9hHU8whCqH8u/zpVL10MOOm7WHhs0Kge12Mvhu4DnLOmCvFM3pZiR r@x";
        const P521: &str = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBACzJF3P2N5EuZ+XDjbSewfuV2Yz2QZ4sdzc1WiafAg58HquKtCLl0V1OaN+0e41fkiGPUd8yIzUZ8WF0xc8FuKkFwD3nMc2iutabXzx61AsGz64cfiiY8ytkGAglFhkgo/+/LKZZX/g1xYDg4vUTqJ4C6O4CoPmbp+baVlMNN7EMunMhg== p@x";
        for (line, algorithm) in [
            (P256, "ecdsa-sha2-nistp256"),
            (RSA, "ssh-rsa"),
            (P521, "ecdsa-sha2-nistp521"),
        ] {
            assert_eq!(SshPublicKey::parse(line).unwrap().algorithm(), algorithm);
        }
        // The last byte of the P-256 point's y coordinate changed: off the curve.
        let mut blob = SshPublicKey::parse(P256).unwrap().blob;
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert_eq!(
            SshPublicKey::parse(&format!("ecdsa-sha2-nistp256 {}", STANDARD.encode(blob))),
            Err(SshKeyError::InvalidKey("ecdsa-sha2-nistp256".into()))
        );
    }

    #[test]
    fn handles_follow_the_dns_label_rules_and_refuse_reserved_names() {
        assert_eq!(Handle::new("ada").unwrap().as_str(), "ada");
        assert!(Handle::new("a-1").is_ok());
        assert!(Handle::new("x".repeat(32)).is_ok());
        assert_eq!(Handle::new(""), Err(HandleError::Empty));
        assert_eq!(
            Handle::new("x".repeat(33)),
            Err(HandleError::TooLong { len: 33 })
        );
        assert_eq!(
            Handle::new("Ada"),
            Err(HandleError::InvalidChar { found: 'A' })
        );
        assert_eq!(
            Handle::new("a_b"),
            Err(HandleError::InvalidChar { found: '_' })
        );
        assert_eq!(Handle::new("-ada"), Err(HandleError::EdgeHyphen));
        assert_eq!(Handle::new("ada-"), Err(HandleError::EdgeHyphen));
        for reserved in [
            "root", "admin", "vmkit", "new", "ls", "ssh-key", "local", "u12",
        ] {
            assert_eq!(
                Handle::new(reserved),
                Err(HandleError::Reserved(reserved.into())),
                "{reserved}"
            );
        }
        assert!(Handle::new("u").is_ok() && Handle::new("u1x").is_ok());
        // A stored handle decodes even if it is reserved now.
        assert_eq!(
            serde_json::from_str::<Handle>("\"root\"").unwrap().as_str(),
            "root"
        );
        assert!(serde_json::from_str::<Handle>("\"Root\"").is_err());
    }

    #[test]
    fn a_user_record_of_an_older_vmkit_decodes_with_its_name_as_handle() {
        let old = |json: &str| serde_json::from_str::<User>(json).unwrap();
        let ada = old(r#"{"id":2,"name":"ada","email":"a@b","created_at":7}"#);
        assert_eq!(ada.handle.as_str(), "ada");
        assert_eq!(ada.email.as_deref(), Some("a@b"));
        assert_eq!((ada.role, ada.status), (Role::User, UserStatus::Active));
        assert_eq!(ada.created_at, Timestamp(7));
        let grace = old(r#"{"id":3,"name":"Grace Hopper","email":null,"created_at":7}"#);
        assert_eq!(grace.handle.as_str(), "u3");
        let local = old(r#"{"id":0,"name":"local","email":null,"created_at":7}"#);
        assert_eq!(local.handle, Handle::local());

        let new = User::new(UserId(5), Handle::new("bea").unwrap()).role(Role::Admin);
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""handle":"bea""#) && json.contains(r#""role":"admin""#));
        assert_eq!(serde_json::from_str::<User>(&json).unwrap(), new);
    }

    #[test]
    fn api_key_verifies_only_its_secret() {
        let key = ApiKey::new("k1", UserId(7), "vmk_secret");
        assert!(key.verify("vmk_secret"));
        assert!(!key.verify("vmk_secreT"));
        assert_ne!(key.hash.to_hex(), "vmk_secret");
    }

    #[test]
    fn api_keys_of_the_same_secret_are_salted_apart() {
        let a = ApiKey::new("k1", UserId(7), "vmk_k1_secret");
        let b = ApiKey::new("k1", UserId(7), "vmk_k1_secret");
        assert_ne!(a.hash, b.hash, "each key has its own salt");
        assert_ne!(a.hash, TokenHash::of("vmk_k1_secret"));
        assert!(a.verify("vmk_k1_secret") && b.verify("vmk_k1_secret"));
    }

    #[test]
    fn an_api_key_record_of_an_older_vmkit_verifies_as_before_and_is_full() {
        let hash = TokenHash::of("vmk_old_secret").to_hex();
        let json = format!(r#"{{"id":"old","user":3,"hash":"{hash}","created_at":7}}"#);
        let key: ApiKey = serde_json::from_str(&json).unwrap();
        assert!(key.verify("vmk_old_secret"));
        assert!(!key.verify("vmk_old_secreT"));
        assert_eq!(key.scope, ApiKeyScope::Full);
        assert_eq!(
            (key.expires_at, key.vm, key.last_used_at),
            (None, None, None)
        );
        assert!(!key.expired(Timestamp(u64::MAX)));
    }

    #[test]
    fn a_generated_api_key_has_at_least_128_random_bits_and_expires_when_told() {
        let (key, secret) = ApiKey::generate(UserId(1));
        let random = secret.strip_prefix(&format!("vmk_{}_", key.id)).unwrap();
        assert!(random.len() * 6 >= 128, "{secret}");
        assert_eq!(ApiKey::id_of(&secret), Some(key.id.as_str()));
        let key = key.expires_at(Timestamp(100));
        assert!(!key.expired(Timestamp(99)));
        assert!(key.expired(Timestamp(100)));
    }
}
