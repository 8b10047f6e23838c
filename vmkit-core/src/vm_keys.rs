//! The keys a gateway signs in to VMs' own SSH servers with.
//!
//! `ssh NAME@host` ends at the gateway, which opens its own connection to the VM's
//! sshd. It signs in there with a key of that VM alone: an ed25519 key derived from
//! one host secret and the VM's id, whose public half the manager has the guest
//! agent install (see [`Manager::ssh_target`](crate::Commands::ssh_target)). Nothing
//! per VM is stored: the secret (32 random bytes, `vm_access.key` in the data
//! directory, mode 0600) and the VM id give the key again after a restart, and a key
//! of one VM opens no other.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{SshPublicKey, VmId};

/// The file in the data directory that holds the host secret.
pub const VM_KEYS_FILE: &str = "vm_access.key";

/// The host secret the per-VM keys derive from.
#[derive(Clone)]
pub struct VmKeys {
    secret: [u8; 32],
}

impl std::fmt::Debug for VmKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmKeys(..)")
    }
}

impl VmKeys {
    /// A secret of this process alone: keys installed with it open nothing once it
    /// is gone (a library user's manager without a data directory).
    pub fn ephemeral() -> Self {
        Self {
            secret: rand::random(),
        }
    }

    /// The secret kept at `path` (64 hex digits), made there (mode 0600) when the
    /// file does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(text.trim()).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold 64 hex digits; delete it to make a new one \
                         (VMs get the new keys at their next start)",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = Self::ephemeral();
                crate::files::write_file_atomic(
                    path,
                    format!("{}\n", hex(&keys.secret)).as_bytes(),
                    0o600,
                )?;
                Ok(keys)
            }
            Err(e) => Err(e),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut secret = [0u8; 32];
        for (i, byte) in secret.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self { secret })
    }

    /// The key of `vm`.
    pub fn for_vm(&self, vm: VmId) -> VmKey {
        let seed = hmac_sha256(
            &self.secret,
            format!("vmkit vm ssh client key v1 {vm}").as_bytes(),
        );
        VmKey { seed }
    }
}

/// One VM's key: an ed25519 key pair from a 32-byte seed.
#[derive(Clone, PartialEq, Eq)]
pub struct VmKey {
    seed: [u8; 32],
}

impl std::fmt::Debug for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("VmKey")
            .field(&self.public_key().fingerprint())
            .finish()
    }
}

impl VmKey {
    /// The ed25519 seed (the private key), to sign in with.
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public half, as the VM's `authorized_keys` holds it.
    pub fn public_key(&self) -> SshPublicKey {
        let pair = ssh_key::private::Ed25519Keypair::from_seed(&self.seed);
        let key = ssh_key::PublicKey::new(
            ssh_key::public::KeyData::Ed25519(pair.public),
            "vmkit-gateway",
        );
        let line = key
            .to_openssh()
            .expect("an ed25519 public key always encodes");
        SshPublicKey::parse(&line).expect("an ed25519 public key always parses")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key` (at most one block long).
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2_shape() {
        // RFC 4231 test case 2 has a 4-byte key "Jefe"; zero-padding a key to the
        // block is what HMAC does, so the 32-byte zero-padded key gives the same MAC.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn keys_differ_per_vm_and_per_secret_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VM_KEYS_FILE);
        let keys = VmKeys::load_or_create(&path).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let (a, b) = (VmId::generate(), VmId::generate());
        assert_ne!(keys.for_vm(a), keys.for_vm(b));
        assert_eq!(
            keys.for_vm(a),
            VmKeys::load_or_create(&path).unwrap().for_vm(a)
        );
        assert_ne!(keys.for_vm(a), VmKeys::ephemeral().for_vm(a));
        assert!(
            keys.for_vm(a)
                .public_key()
                .to_openssh()
                .starts_with("ssh-ed25519 ")
        );
    }

    #[test]
    fn a_damaged_secret_file_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VM_KEYS_FILE);
        std::fs::write(&path, "not hex").unwrap();
        let error = VmKeys::load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("delete it"), "{error}");
    }
}
