//! Secrets at rest: AES-256-GCM under a key kept outside the data directory.
//!
//! What vmkit stores that would let someone act as vmkit (the ACME account key,
//! SMTP and DNS credentials) is sealed with a [`SecretBox`] before it is written.
//! The key is 32 random bytes, written as 64 hex digits or as base64, in a file
//! ([`SecretBox::from_key_file`], made on first use with mode 0600) or in an
//! environment variable ([`SecretBox::from_env`]). Keep the key file **outside**
//! the data directory (`/etc/vmkit/secret.key`, not under `/var/lib/vmkit`), so a
//! copy of the data directory (a backup, a stolen disk image) does not carry the
//! key to its own secrets.
//!
//! A sealed value is `version (1 byte) || nonce (12 bytes) || ciphertext || tag
//! (16 bytes)`; the nonce is random for every seal, and the version byte and the
//! caller's associated data (`aad`, e.g. the file's purpose) are authenticated, so
//! a value moved to another purpose does not open.
//!
//! ```
//! use vmkit_core::SecretBox;
//!
//! let dir = tempfile::tempdir()?;
//! let key_file = dir.path().join("secret.key");
//! let sealer = SecretBox::from_key_file(&key_file)?; // made now, mode 0600
//! let sealed = sealer.seal(b"account key", b"acme-account");
//! assert_eq!(sealer.open(&sealed, b"acme-account")?, b"account key");
//! assert!(sealer.open(&sealed, b"smtp-password").is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The format of what [`SecretBox::seal`] makes.
const VERSION: u8 = 1;
/// The key's length: AES-256.
const KEY_LEN: usize = 32;
/// The length of the GCM tag.
const TAG_LEN: usize = 16;

/// Errors of [`SecretBox`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretBoxError {
    /// Reading or writing the key file failed.
    #[error("{what} {path} failed")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The key file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The key is not 32 bytes in hex or base64.
    #[error("the secret key in {place} is not 32 bytes as 64 hex digits or base64; {hint}")]
    BadKey {
        /// Where the key came from (a file or an environment variable).
        place: String,
        /// What to do.
        hint: &'static str,
    },
    /// The key file can be read by others.
    #[error("the secret key file {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`", path = path.display())]
    KeyFileOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The environment variable is not set.
    #[error(
        "the environment variable {var} holds no secret key; set it to 32 random bytes as hex (`openssl rand -hex 32`)"
    )]
    NoEnvKey {
        /// The variable.
        var: String,
    },
    /// A sealed value is not in a format this version knows.
    #[error("the sealed value is {why}; it was not made by this version's SecretBox::seal")]
    Malformed {
        /// What is wrong with it.
        why: String,
    },
    /// Authentication failed: another key, other associated data, or a changed
    /// value.
    #[error(
        "the sealed value does not open with this key: the key is not the one it was sealed \
         with, it was sealed for another purpose, or it was changed"
    )]
    Rejected,
}

/// AES-256-GCM with one key: seals and opens secrets stored at rest.
pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox").finish_non_exhaustive()
    }
}

impl SecretBox {
    /// A box with the key in `path`, made there (32 random bytes as hex, mode 0600)
    /// if the file does not exist. Keep `path` outside the data directory. A key
    /// file that others can read is refused.
    pub fn from_key_file(path: &Path) -> Result<Self, SecretBoxError> {
        let io = |what| {
            move |source| SecretBoxError::Io {
                what,
                path: path.to_owned(),
                source,
            }
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)
                    .map_err(io("reading the permissions of"))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SecretBoxError::KeyFileOpen {
                        path: path.to_owned(),
                        mode: mode & 0o777,
                    });
                }
                let key = parse_key(&text).ok_or_else(|| SecretBoxError::BadKey {
                    place: path.display().to_string(),
                    hint: "restore the file from a backup (secrets sealed with it need it)",
                })?;
                Ok(Self::from_bytes(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = SystemRandom::new();
                let mut key = [0u8; KEY_LEN];
                rng.fill(&mut key).map_err(|_| SecretBoxError::Io {
                    what: "drawing random bytes for",
                    path: path.to_owned(),
                    source: std::io::Error::other("the system random source failed"),
                })?;
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io("creating the secret key file"))?;
                file.write_all(format!("{hex}\n").as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io("writing the secret key file"))?;
                Ok(Self::from_bytes(&key))
            }
            Err(e) => Err(io("reading the secret key file")(e)),
        }
    }

    /// A box with the key in the environment variable `var` (hex or base64).
    pub fn from_env(var: &str) -> Result<Self, SecretBoxError> {
        let value = std::env::var(var).map_err(|_| SecretBoxError::NoEnvKey {
            var: var.to_owned(),
        })?;
        let key = parse_key(&value).ok_or_else(|| SecretBoxError::BadKey {
            place: format!("${var}"),
            hint: "make one with `openssl rand -hex 32`",
        })?;
        Ok(Self::from_bytes(&key))
    }

    /// A box with `key`.
    pub fn from_bytes(key: &[u8; KEY_LEN]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .expect("a 32-byte key is the length AES-256-GCM takes");
        Self {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// `plaintext` sealed with a fresh random nonce, bound to `aad` (say what the
    /// value is for: `b"acme-account"`).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // The system random source failing is not something to go on from: a
        // repeated nonce would reveal the key stream.
        self.rng
            .fill(&mut nonce)
            .expect("the system random source gives bytes");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(with_version(aad)),
                &mut body,
            )
            .expect("AES-GCM seals any input under 64 GiB");
        out.extend_from_slice(&body);
        out
    }

    /// The plaintext of `sealed`, if it was sealed with this key and `aad` and not
    /// changed since.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecretBoxError> {
        let Some((&version, rest)) = sealed.split_first() else {
            return Err(SecretBoxError::Malformed {
                why: "empty".into(),
            });
        };
        if version != VERSION {
            return Err(SecretBoxError::Malformed {
                why: format!("of format version {version} (this version reads {VERSION})"),
            });
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(SecretBoxError::Malformed {
                why: format!("{} bytes long, too short", sealed.len()),
            });
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretBoxError::Rejected)?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(with_version(aad)), &mut body)
            .map_err(|_| SecretBoxError::Rejected)?;
        Ok(plain.to_vec())
    }
}

/// The associated data actually authenticated: the version byte, then the caller's.
fn with_version(aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + aad.len());
    out.push(VERSION);
    out.extend_from_slice(aad);
    out
}

/// 32 bytes from 64 hex digits or base64 (standard, with or without padding).
fn parse_key(text: &str) -> Option<[u8; KEY_LEN]> {
    let text = text.trim();
    let bytes = if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..KEY_LEN)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .ok()?
    };
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_with_the_same_key_and_aad() {
        let sealer = SecretBox::from_bytes(&[7; 32]);
        let sealed = sealer.seal(b"the account key", b"acme");
        assert_eq!(sealed[0], VERSION);
        assert_eq!(sealed.len(), 1 + NONCE_LEN + 15 + TAG_LEN);
        assert!(!sealed.windows(15).any(|w| w == b"the account key"));
        assert_eq!(sealer.open(&sealed, b"acme").unwrap(), b"the account key");
        // A fresh nonce each time.
        assert_ne!(sealer.seal(b"the account key", b"acme"), sealed);
    }

    #[test]
    fn another_key_is_rejected() {
        let sealed = SecretBox::from_bytes(&[7; 32]).seal(b"secret", b"acme");
        let err = SecretBox::from_bytes(&[8; 32])
            .open(&sealed, b"acme")
            .unwrap_err();
        assert!(matches!(err, SecretBoxError::Rejected));
        assert!(err.to_string().contains("not the one it was sealed with"));
    }

    #[test]
    fn every_changed_byte_is_rejected() {
        let sealer = SecretBox::from_bytes(&[7; 32]);
        let sealed = sealer.seal(b"secret", b"acme");
        for i in 1..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            assert!(
                matches!(
                    sealer.open(&tampered, b"acme"),
                    Err(SecretBoxError::Rejected)
                ),
                "byte {i}"
            );
        }
        let mut other_version = sealed.clone();
        other_version[0] = 2;
        assert!(matches!(
            sealer.open(&other_version, b"acme"),
            Err(SecretBoxError::Malformed { .. })
        ));
        assert!(matches!(
            sealer.open(&sealed[..10], b"acme"),
            Err(SecretBoxError::Malformed { .. })
        ));
    }

    #[test]
    fn other_associated_data_is_rejected() {
        let sealer = SecretBox::from_bytes(&[7; 32]);
        let sealed = sealer.seal(b"secret", b"acme");
        assert!(matches!(
            sealer.open(&sealed, b"smtp"),
            Err(SecretBoxError::Rejected)
        ));
    }

    #[test]
    fn the_key_file_is_made_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let first = SecretBox::from_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = first.seal(b"secret", b"acme");
        let again = SecretBox::from_key_file(&path).unwrap();
        assert_eq!(again.open(&sealed, b"acme").unwrap(), b"secret");
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        std::fs::write(&path, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretBox::from_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn keys_are_read_as_hex_or_base64_and_bad_ones_refused() {
        let hex = "0707070707070707070707070707070707070707070707070707070707070707";
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_key(hex), Some([7; 32]));
        assert_eq!(parse_key(&format!("{b64}\n")), Some([7; 32]));
        assert_eq!(parse_key("abcd"), None);
        assert_eq!(parse_key(&"zz".repeat(32)), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        std::fs::write(&path, "short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = SecretBox::from_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("not 32 bytes"), "{err}");
    }

    #[test]
    fn a_missing_environment_key_says_how_to_make_one() {
        let err = SecretBox::from_env("VMKIT_TEST_SECRET_KEY_THAT_IS_NOT_SET")
            .unwrap_err()
            .to_string();
        assert!(err.contains("openssl rand -hex 32"), "{err}");
    }
}
