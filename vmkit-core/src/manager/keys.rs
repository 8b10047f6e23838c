//! Users' SSH public keys. A VM's guest gets its owner's keys on every create and
//! start (see `configure_guest`), so a change reaches a running VM at its next start.

use super::Manager;
use crate::error::ManagerError;
use crate::user::{SshPublicKey, UserId};

impl Manager {
    /// `user`'s SSH public keys.
    pub async fn ssh_keys(&self, user: UserId) -> Result<Vec<SshPublicKey>, ManagerError> {
        Ok(self.inner.backends.store.ssh_keys(user).await?)
    }

    /// Registers `key` for `user`: VMs get it from their next create or start.
    /// Refused with [`ManagerError::SshKeyExists`] if `user` has it already and
    /// [`ManagerError::SshKeyTaken`] if another user has it.
    pub async fn add_ssh_key(&self, user: UserId, key: &SshPublicKey) -> Result<(), ManagerError> {
        let _guard = self.inner.keys.lock().await;
        let store = &self.inner.backends.store;
        let fingerprint = key.fingerprint();
        match store.user_by_key(&fingerprint).await? {
            Some(owner) if owner == user => Err(ManagerError::SshKeyExists(fingerprint)),
            Some(_) => Err(ManagerError::SshKeyTaken(fingerprint)),
            None => Ok(store.add_ssh_key(user, key).await?),
        }
    }

    /// Removes `user`'s key with `fingerprint` (`SHA256:…`, as `ssh-keygen -l`
    /// prints it; the `SHA256:` may be left out). VMs lose it at their next create
    /// or start. [`ManagerError::SshKeyNotFound`] if `user` has no such key.
    pub async fn remove_ssh_key(
        &self,
        user: UserId,
        fingerprint: &str,
    ) -> Result<(), ManagerError> {
        let fingerprint = if fingerprint.starts_with("SHA256:") {
            fingerprint.to_owned()
        } else {
            format!("SHA256:{fingerprint}")
        };
        let _guard = self.inner.keys.lock().await;
        let store = &self.inner.backends.store;
        if store.user_by_key(&fingerprint).await? != Some(user)
            || !store.remove_ssh_key(&fingerprint).await?
        {
            return Err(ManagerError::SshKeyNotFound(fingerprint));
        }
        Ok(())
    }
}
