//! Secrets that users present (API keys, invite codes, share links, sessions): made
//! from 32 random bytes, stored only as their SHA-256 hash, and compared in constant
//! time.
//!
//! ```
//! use vmkit_core::{TokenHash, new_secret};
//!
//! let secret = new_secret("vmi_");
//! assert!(secret.starts_with("vmi_"));
//! let stored = TokenHash::of(&secret);
//! assert!(stored.matches(&secret));
//! assert!(!stored.matches("vmi_guess"));
//! ```

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

/// A new secret: `prefix` followed by 32 random bytes (from the operating system's
/// generator through `rand`'s thread generator) as URL-safe unpadded base64: 43
/// characters that need no escaping in a URL, a header or a shell.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The SHA-256 hash of a secret: what is stored instead of it. Serialized as 64
/// lowercase hex digits.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenHash([u8; 32]);

impl PartialEq for TokenHash {
    /// In constant time: comparing a presented secret's hash with a stored one
    /// says nothing about how much of them agrees.
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for TokenHash {}

impl std::hash::Hash for TokenHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Why a string is not a [`TokenHash`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a token hash is 64 lowercase hex digits (SHA-256)")]
#[non_exhaustive]
pub struct TokenHashError;

impl TokenHash {
    /// The hash of `secret`.
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// The SHA-256 hash of `salt` followed by `secret`: a stored secret that the
    /// same secret under another salt does not match.
    pub fn salted(salt: &[u8], secret: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(salt);
        hasher.update(secret.as_bytes());
        Self(hasher.finalize().into())
    }

    /// Whether `secret` under `salt` hashes to this hash, compared in constant time.
    pub fn matches_salted(&self, salt: &[u8], secret: &str) -> bool {
        let candidate = Self::salted(salt, secret);
        self.0.ct_eq(&candidate.0).into()
    }

    /// Whether `secret` hashes to this hash. The hashes are compared in constant
    /// time, so the time taken says nothing about how much of them agrees.
    pub fn matches(&self, secret: &str) -> bool {
        let candidate = Self::of(secret);
        self.0.ct_eq(&candidate.0).into()
    }

    /// A short public name of the hash (its first 12 hex digits), to tell stored
    /// tokens apart in lists without giving away anything that could be presented.
    pub fn short(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The hash as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, TokenHashError> {
        let digits = hex.as_bytes();
        if digits.len() != 64 {
            return Err(TokenHashError);
        }
        let value = |d: u8| match d {
            b'0'..=b'9' => Ok(d - b'0'),
            b'a'..=b'f' => Ok(d - b'a' + 10),
            _ => Err(TokenHashError),
        };
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = value(pair[0])? << 4 | value(pair[1])?;
        }
        Ok(Self(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl TryFrom<String> for TokenHash {
    type Error = TokenHashError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::from_hex(&s)
    }
}

impl From<TokenHash> for String {
    fn from(h: TokenHash) -> String {
        h.to_hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_unique_and_url_safe() {
        let a = new_secret("vmi_");
        let b = new_secret("vmi_");
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 43);
        assert!(
            a[4..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{a}"
        );
    }

    #[test]
    fn a_hash_matches_only_its_secret() {
        let h = TokenHash::of("vmk_secret");
        assert!(h.matches("vmk_secret"));
        assert!(!h.matches("vmk_secreT"));
        assert!(!h.matches(""));
    }

    #[test]
    fn a_hash_is_stored_as_lowercase_hex_sha256() {
        let h = TokenHash::of("abc");
        let json = serde_json::to_string(&h).unwrap();
        // `printf abc | sha256sum`
        assert_eq!(
            json,
            "\"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\""
        );
        assert_eq!(serde_json::from_str::<TokenHash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<TokenHash>("\"BA78\"").is_err());
        let upper = json.to_uppercase();
        assert!(serde_json::from_str::<TokenHash>(&upper).is_err());
    }
}
