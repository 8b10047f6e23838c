//! Users, their SSH public keys and API keys.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::time::Timestamp;

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

/// A user of the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct User {
    /// Identifier.
    pub id: UserId,
    /// Display name or handle.
    pub name: String,
    /// Contact address, when known.
    pub email: Option<String>,
    /// When the user was first seen.
    pub created_at: Timestamp,
    /// What they may do.
    #[serde(default)]
    pub role: Role,
    /// Whether they may sign in.
    #[serde(default)]
    pub status: UserStatus,
}

/// A user's role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Role {
    /// May do everything on the host.
    Admin,
    /// May use their own VMs and what is shared with them.
    #[default]
    User,
}

/// Whether a user may sign in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UserStatus {
    /// They may.
    #[default]
    Active,
    /// An admin suspended them: every operation but `whoami` is refused.
    Suspended,
}

impl User {
    /// A new user record created now.
    pub fn new(id: UserId, name: impl Into<String>) -> Self {
        Self {
            id,
            name: name.into(),
            email: None,
            created_at: Timestamp::now(),
            role: Role::User,
            status: UserStatus::Active,
        }
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
}

impl SshPublicKey {
    /// Parses an `authorized_keys`-style line: `TYPE BASE64 [COMMENT]`. Whitespace
    /// around it (the newline ending a `.pub` file) is ignored; a second line is
    /// refused.
    pub fn parse(line: &str) -> Result<Self, SshKeyError> {
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
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
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

/// An API key as stored: only its SHA-256 hash is kept; the secret is shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ApiKey {
    /// Public identifier (the part before the secret).
    pub id: String,
    /// Owner.
    pub user: UserId,
    /// Hex SHA-256 of the full key.
    pub hash: String,
    /// Creation time.
    pub created_at: Timestamp,
}

impl ApiKey {
    /// A stored record for the key `secret` (the full `vmk_...` string).
    pub fn new(id: impl Into<String>, user: UserId, secret: &str) -> Self {
        Self {
            id: id.into(),
            user,
            hash: hex(&Sha256::digest(secret.as_bytes())),
            created_at: Timestamp::now(),
        }
    }

    /// A new key for `user`: the record to store and the secret, `vmk_<id>_<random>`,
    /// to show once.
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

    /// The id in an API key's secret (`vmk_<id>_<random>`), if it has that form.
    pub fn id_of(secret: &str) -> Option<&str> {
        let (id, rest) = secret.strip_prefix("vmk_")?.split_once('_')?;
        (!id.is_empty() && !rest.is_empty()).then_some(id)
    }

    /// Whether `secret` is this key.
    pub fn verify(&self, secret: &str) -> bool {
        let candidate = hex(&Sha256::digest(secret.as_bytes()));
        // Constant-time comparison of equal-length hex strings.
        candidate.len() == self.hash.len()
            && candidate
                .bytes()
                .zip(self.hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

    #[test]
    fn api_key_verifies_only_its_secret() {
        let key = ApiKey::new("k1", UserId(7), "vmk_secret");
        assert!(key.verify("vmk_secret"));
        assert!(!key.verify("vmk_secreT"));
        assert_ne!(key.hash, "vmk_secret");
    }
}
