//! The gateway's host key: ed25519, made on first start, the same ever after.

use std::path::Path;

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{Algorithm, PrivateKey};

use super::SshError;

/// Loads the host key at `path`, or makes an ed25519 one there (mode 0600) when
/// there is none. A key that is not ed25519 is refused: the gateway offers only
/// `ssh-ed25519`.
pub(crate) fn load_or_create(path: &Path) -> Result<PrivateKey, SshError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = PrivateKey::from_openssh(text.as_bytes()).map_err(|e| SshError::HostKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            if key.algorithm() != Algorithm::Ed25519 {
                return Err(SshError::HostKey {
                    path: path.to_owned(),
                    reason: format!("it is {}, the gateway needs ssh-ed25519", key.algorithm()),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(source) => Err(SshError::Io {
            what: format!("reading the host key {}", path.display()),
            source,
        }),
    }
}

fn create(path: &Path) -> Result<PrivateKey, SshError> {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment("vmkit ssh gateway host key");
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| SshError::HostKey {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let io = |source| SshError::Io {
        what: format!("writing the host key {}", path.display()),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Whole or not at all, and never readable by others.
    vmkit_core::write_file_atomic(path, text.as_bytes(), 0o600).map_err(io)?;
    tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(Default::default()), "made the SSH host key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_host_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/host_ed25519");
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        assert_eq!(first.algorithm(), Algorithm::Ed25519);
    }

    #[test]
    fn a_corrupt_host_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host_ed25519");
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(SshError::HostKey { .. })
        ));
    }
}
