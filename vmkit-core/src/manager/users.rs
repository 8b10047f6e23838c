//! Users, registration and invites: operator and engine operations. Who may call
//! them (an admin, the user themself) is decided in front of them, by the access
//! policy of the transports.
//!
//! # Removing a user
//!
//! [`Manager::remove_user`] first suspends the user (so that they cannot sign in
//! and make more while it runs), then deletes or hands over each of their VMs and
//! snapshots, then removes the record with their SSH keys, API keys, quota and the
//! shares made to them, in one store transaction. If a VM or snapshot cannot be
//! dealt with, the user stays (suspended) and the error names what is left; running
//! the remove again picks up where it stopped.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{DeleteOptions, Manager};
use crate::error::{ErrorChain, ManagerError};
use crate::event::{EventKind, NewEvent};
use crate::invite::Invite;
use crate::state_store::StoreError;
use crate::time::Timestamp;
use crate::user::{Handle, Role, SshPublicKey, User, UserId, UserStatus};

/// Who may register themselves with [`Manager::register`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RegistrationPolicy {
    /// Anyone.
    Open,
    /// Whoever has a valid invite code ([`Manager::new_invite`]), which their
    /// registration uses up.
    Invite,
    /// No one: the operator adds users ([`Manager::add_user`]). The library's
    /// default.
    #[default]
    Closed,
}

/// A user added by the operator ([`Manager::add_user`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewUser {
    /// Their handle.
    pub handle: Handle,
    /// Their first SSH public key, if any.
    pub ssh_key: Option<SshPublicKey>,
    /// Their contact address, if any.
    pub email: Option<String>,
    /// Their role.
    pub role: Role,
}

impl NewUser {
    /// A user with `handle`, role [`Role::User`], no key and no email.
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            ssh_key: None,
            email: None,
            role: Role::User,
        }
    }

    /// Sets their first SSH key.
    pub fn ssh_key(mut self, key: SshPublicKey) -> Self {
        self.ssh_key = Some(key);
        self
    }

    /// Sets their contact address.
    pub fn email(mut self, email: impl Into<String>) -> Self {
        self.email = Some(email.into());
        self
    }

    /// Sets their role.
    pub fn role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }
}

/// Someone registering themselves ([`Manager::register`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Registration {
    /// The handle they ask for.
    pub handle: Handle,
    /// The SSH public key they sign in with.
    pub ssh_key: SshPublicKey,
    /// Their contact address, if they give one.
    pub email: Option<String>,
    /// The invite code they were given, if any.
    pub invite: Option<String>,
}

impl Registration {
    /// A registration of `handle` with `ssh_key`, no email and no invite.
    pub fn new(handle: Handle, ssh_key: SshPublicKey) -> Self {
        Self {
            handle,
            ssh_key,
            email: None,
            invite: None,
        }
    }

    /// Sets the contact address.
    pub fn email(mut self, email: impl Into<String>) -> Self {
        self.email = Some(email.into());
        self
    }

    /// Sets the invite code.
    pub fn invite(mut self, code: impl Into<String>) -> Self {
        self.invite = Some(code.into());
        self
    }
}

/// What [`Manager::remove_user`] does with the user's VMs and snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmDisposition {
    /// Delete each of them, with everything they hold, through the normal delete
    /// paths.
    Delete,
    /// Give each of them to this other user. The receiver's quota is not checked:
    /// an operator's hand-over may take them past it (they then cannot create more
    /// until they are under it again).
    HandOver(Handle),
}

/// Checks the form of an email address: one `@` with something on both sides, no
/// whitespace or control characters, at most 254 characters.
fn check_email(email: &str) -> Result<(), ManagerError> {
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        });
    if valid {
        Ok(())
    } else {
        Err(ManagerError::InvalidEmail(email.to_owned()))
    }
}

impl Manager {
    /// Registers someone as [`ManagerConfig::registration`](super::ManagerConfig::registration)
    /// allows: with [`RegistrationPolicy::Open`] anyone; with
    /// [`RegistrationPolicy::Invite`] whoever gives a valid invite code, which is
    /// used up (a code also counts with `Open`); with [`RegistrationPolicy::Closed`]
    /// no one ([`ManagerError::RegistrationClosed`]).
    ///
    /// The user gets the invite's role, else [`Role::User`]. Refused with
    /// [`ManagerError::HandleTaken`] or [`ManagerError::SshKeyTaken`] before the
    /// invite is used, and [`ManagerError::InviteInvalid`] for a code that is
    /// unknown, used or expired (which of these is not said).
    pub async fn register(&self, registration: Registration) -> Result<User, ManagerError> {
        let policy = self.inner.config.registration;
        match (policy, &registration.invite) {
            (RegistrationPolicy::Closed, _) => return Err(ManagerError::RegistrationClosed),
            (RegistrationPolicy::Invite, None) => return Err(ManagerError::InviteRequired),
            _ => {}
        }
        if let Some(email) = &registration.email {
            check_email(email)?;
        }
        let store = &self.inner.backends.store;
        let _guard = self.inner.keys.lock().await;
        // Checked before the invite is used, so that a taken handle does not cost it.
        self.check_free(&registration.handle, Some(&registration.ssh_key))
            .await?;
        let invite = match &registration.invite {
            Some(code) => Some(
                store
                    .consume_invite(code, Timestamp::now())
                    .await?
                    .ok_or(ManagerError::InviteInvalid)?,
            ),
            None => None,
        };
        let user = User::new(UserId::LOCAL, registration.handle)
            .role(invite.as_ref().map_or(Role::User, |i| i.role))
            .email(registration.email);
        match store.create_user(&user, Some(&registration.ssh_key)).await {
            Ok(user) => {
                info!(user = %user.handle, id = %user.id, role = %user.role, "registered a user");
                self.user_added(&user).await;
                Ok(user)
            }
            Err(error) => {
                // The registration failed: the invite counts again.
                if let Some(invite) = invite
                    && let Err(e) = store.put_invite(&invite).await
                {
                    warn!(invite = %invite.id, error = %e, "cannot give back the invite of a failed registration");
                }
                Err(error.into())
            }
        }
    }

    /// Adds a user, whatever the registration policy: the operator's way in.
    /// [`ManagerError::HandleTaken`] or [`ManagerError::SshKeyTaken`] if another
    /// user has the handle or the key.
    pub async fn add_user(&self, new: NewUser) -> Result<User, ManagerError> {
        if let Some(email) = &new.email {
            check_email(email)?;
        }
        let _guard = self.inner.keys.lock().await;
        self.check_free(&new.handle, new.ssh_key.as_ref()).await?;
        let user = User::new(UserId::LOCAL, new.handle)
            .role(new.role)
            .email(new.email);
        let user = self
            .inner
            .backends
            .store
            .create_user(&user, new.ssh_key.as_ref())
            .await?;
        info!(user = %user.handle, id = %user.id, role = %user.role, "added a user");
        self.user_added(&user).await;
        Ok(user)
    }

    /// Every registered user, by id (the local operator's own record,
    /// [`UserId::LOCAL`], is not one).
    pub async fn users(&self) -> Result<Vec<User>, ManagerError> {
        let mut users = self.inner.backends.store.list_users().await?;
        users.retain(|u| u.id != UserId::LOCAL);
        Ok(users)
    }

    /// The user with `handle`; [`ManagerError::UserNotFound`] if there is none.
    pub async fn user(&self, handle: &Handle) -> Result<User, ManagerError> {
        self.inner
            .backends
            .store
            .user_by_handle(handle)
            .await?
            .filter(|u| u.id != UserId::LOCAL)
            .ok_or_else(|| ManagerError::UserNotFound(handle.to_string()))
    }

    /// Suspends the user (`true`: they are refused at sign-in; their VMs are kept
    /// and keep running) or lets them back in (`false`). Doing what is already so
    /// changes nothing and records no event.
    pub async fn set_suspended(
        &self,
        handle: &Handle,
        suspended: bool,
    ) -> Result<User, ManagerError> {
        let status = if suspended {
            UserStatus::Suspended
        } else {
            UserStatus::Active
        };
        let _guard = self.inner.keys.lock().await;
        let mut user = self.user(handle).await?;
        if user.status == status {
            return Ok(user);
        }
        user.status = status;
        self.inner.backends.store.update_user(&user).await?;
        info!(user = %user.handle, %status, "changed a user's status");
        let kind = if suspended {
            EventKind::UserSuspended {
                user: user.handle.clone(),
            }
        } else {
            EventKind::UserResumed {
                user: user.handle.clone(),
            }
        };
        self.emit(NewEvent::host(kind)).await;
        Ok(user)
    }

    /// Gives the user `role`. Setting the role they have changes nothing and
    /// records no event.
    pub async fn set_role(&self, handle: &Handle, role: Role) -> Result<User, ManagerError> {
        let _guard = self.inner.keys.lock().await;
        let mut user = self.user(handle).await?;
        if user.role == role {
            return Ok(user);
        }
        user.role = role;
        self.inner.backends.store.update_user(&user).await?;
        info!(user = %user.handle, %role, "changed a user's role");
        self.emit(NewEvent::host(EventKind::UserRoleChanged {
            user: user.handle.clone(),
            role,
        }))
        .await;
        Ok(user)
    }

    /// Removes a user: suspends them, deletes or hands over each of their VMs and
    /// snapshots as `disposition` says, then removes their record with their SSH
    /// keys, API keys, quota and the shares made to them (see the module docs).
    ///
    /// [`ManagerError::UserNotFound`] if there is no such user (or no such receiver
    /// of a hand-over), [`ManagerError::HandOverToSelf`] for a hand-over to the user
    /// being removed. [`ManagerError::UserRemovalIncomplete`] when a VM or snapshot
    /// could not be dealt with: the user is left suspended with what remains, and
    /// the same call again carries on.
    pub async fn remove_user(
        &self,
        handle: &Handle,
        disposition: VmDisposition,
    ) -> Result<(), ManagerError> {
        let user = self.user(handle).await?;
        let receiver = match &disposition {
            VmDisposition::Delete => None,
            VmDisposition::HandOver(to) => {
                let receiver = self.user(to).await?;
                if receiver.id == user.id {
                    return Err(ManagerError::HandOverToSelf(handle.clone()));
                }
                Some(receiver)
            }
        };
        // No more sign-ins, so no more VMs, while the VMs go.
        self.set_suspended(handle, true).await?;

        let (action, failures) = match &receiver {
            None => ("deleted", self.delete_holdings(user.id).await?),
            Some(receiver) => ("handed over", self.hand_over(user.id, receiver.id).await?),
        };
        if let Some((_, first)) = failures.first() {
            return Err(ManagerError::UserRemovalIncomplete {
                handle: handle.clone(),
                action,
                error: first.clone(),
                left: failures.into_iter().map(|(what, _)| what).collect(),
            });
        }

        let store = &self.inner.backends.store;
        let _guard = self.inner.keys.lock().await;
        match store.delete_user(user.id).await {
            Ok(_) => {}
            Err(StoreError::UserHoldsResources { holdings, .. }) => {
                return Err(ManagerError::UserRemovalIncomplete {
                    handle: handle.clone(),
                    action,
                    error: "they were made while the user was being removed".to_owned(),
                    left: holdings,
                });
            }
            Err(e) => return Err(e.into()),
        }
        info!(user = %handle, "removed a user");
        self.emit(NewEvent::host(EventKind::UserRemoved {
            user: handle.clone(),
        }))
        .await;
        Ok(())
    }

    /// Makes an invite for a user of `role`, valid for `ttl`, on behalf of
    /// `created_by` ([`UserId::LOCAL`] for the operator). Returns it with its code
    /// (`vmi_…`): only the code's hash is stored, so it is shown this once. Invites
    /// that have expired are removed meanwhile.
    pub async fn new_invite(
        &self,
        created_by: UserId,
        ttl: Duration,
        role: Role,
    ) -> Result<(Invite, String), ManagerError> {
        let store = &self.inner.backends.store;
        let now = Timestamp::now();
        for old in store.list_invites().await? {
            if old.is_expired(now) {
                store.delete_invite(&old.id).await?;
            }
        }
        let (invite, code) = Invite::new(created_by, ttl, role);
        store.put_invite(&invite).await?;
        info!(invite = %invite.id, %role, "made an invite");
        Ok((invite, code))
    }

    /// Every stored invite, by id; expired ones too, until the next
    /// [`Manager::new_invite`] removes them.
    pub async fn invites(&self) -> Result<Vec<Invite>, ManagerError> {
        Ok(self.inner.backends.store.list_invites().await?)
    }

    /// Deletes the invite `id`: its code no longer counts.
    /// [`ManagerError::InviteNotFound`] if there is none.
    pub async fn delete_invite(&self, id: &str) -> Result<(), ManagerError> {
        if self.inner.backends.store.delete_invite(id).await? {
            Ok(())
        } else {
            Err(ManagerError::InviteNotFound(id.to_owned()))
        }
    }

    /// Refuses a handle or key another user has.
    async fn check_free(
        &self,
        handle: &Handle,
        key: Option<&SshPublicKey>,
    ) -> Result<(), ManagerError> {
        let store = &self.inner.backends.store;
        if store.user_by_handle(handle).await?.is_some() {
            return Err(ManagerError::HandleTaken(handle.clone()));
        }
        if let Some(key) = key {
            let fingerprint = key.fingerprint();
            if store.user_by_key(&fingerprint).await?.is_some() {
                return Err(ManagerError::SshKeyTaken(fingerprint));
            }
        }
        Ok(())
    }

    async fn user_added(&self, user: &User) {
        self.emit(NewEvent::host(EventKind::UserAdded {
            user: user.handle.clone(),
            role: user.role,
        }))
        .await;
    }

    /// Deletes every VM and snapshot of `owner` through the normal delete paths;
    /// the ones that failed, with why. One failure does not stop the others.
    async fn delete_holdings(&self, owner: UserId) -> Result<Vec<(String, String)>, ManagerError> {
        let store = &self.inner.backends.store;
        let mut failures = Vec::new();
        for vm in store.list_vms(Some(owner)).await? {
            if let Err(e) = self.delete(&vm.name, DeleteOptions::default()).await {
                warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot delete a VM of a user being removed");
                failures.push((format!("VM {}", vm.name), ErrorChain(&e).to_string()));
            }
        }
        for snapshot in store.list_snapshots(Some(owner)).await? {
            if let Err(e) = self.delete_snapshot(&snapshot.name).await {
                warn!(snapshot = %snapshot.name, error = %ErrorChain(&e), "cannot delete a snapshot of a user being removed");
                failures.push((
                    format!("snapshot {}", snapshot.name),
                    ErrorChain(&e).to_string(),
                ));
            }
        }
        Ok(failures)
    }

    /// Gives every VM and snapshot of `from` to `to`, each under its lock (so that
    /// no operation under way writes the old owner back); the ones that failed.
    async fn hand_over(
        &self,
        from: UserId,
        to: UserId,
    ) -> Result<Vec<(String, String)>, ManagerError> {
        let store = &self.inner.backends.store;
        let mut failures = Vec::new();
        for vm in store.list_vms(Some(from)).await? {
            let _guard = self.lock(&vm.name).await;
            let moved = async {
                let Some(mut vm) = store.get_vm_by_id(vm.id).await? else {
                    return Ok(());
                };
                if vm.owner == from {
                    vm.owner = to;
                    self.save(&mut vm).await?;
                }
                Ok::<_, ManagerError>(())
            }
            .await;
            if let Err(e) = moved {
                failures.push((format!("VM {}", vm.name), ErrorChain(&e).to_string()));
            }
        }
        for snapshot in store.list_snapshots(Some(from)).await? {
            let _guard = self.lock_snapshot(&snapshot.name).await;
            let moved = async {
                let Some(mut snapshot) = store.get_snapshot(&snapshot.name).await? else {
                    return Ok(());
                };
                if snapshot.owner == from {
                    snapshot.owner = to;
                    store.update_snapshot(&snapshot).await?;
                }
                Ok::<_, ManagerError>(())
            }
            .await;
            if let Err(e) = moved {
                failures.push((
                    format!("snapshot {}", snapshot.name),
                    ErrorChain(&e).to_string(),
                ));
            }
        }
        Ok(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_addresses_need_one_at_with_text_on_both_sides() {
        for good in ["a@b", "ada@example.com", "a.b+c@d.e"] {
            assert!(check_email(good).is_ok(), "{good}");
        }
        for bad in ["", "ada", "@example.com", "ada@", "a@b@c", "a b@c", "a@b\n"] {
            assert!(
                matches!(check_email(bad), Err(ManagerError::InvalidEmail(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_policy_reads_in_snake_case_and_is_closed_by_default() {
        assert_eq!(RegistrationPolicy::default(), RegistrationPolicy::Closed);
        let open: RegistrationPolicy = serde_json::from_str("\"invite\"").unwrap();
        assert_eq!(open, RegistrationPolicy::Invite);
    }
}
