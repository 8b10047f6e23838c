//! An in-memory state store.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::faults::{Faults, InjectedFault};
use crate::address::{IpLease, IpPool};
use crate::confine::UidRange;
use crate::event::{Event, EventRetention, NewEvent};
use crate::invite::Invite;
use crate::name::VmName;
use crate::quota::{Quota, Usage};
use crate::share::Share;
use crate::snapshot::Snapshot;
use crate::state_store::{StateStore, StoreCapabilities, StoreError};
use crate::time::Timestamp;
use crate::user::{ApiKey, Handle, SshPublicKey, User, UserId};
use crate::vm::{VmId, VmRecord};

/// A complete state store in memory. Not durable; every write can be made to fail
/// through [`Faults`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    faults: Faults,
}

#[derive(Debug, Default)]
struct State {
    users: BTreeMap<UserId, User>,
    keys: BTreeMap<String, (UserId, SshPublicKey)>,
    quotas: BTreeMap<UserId, Quota>,
    vms: BTreeMap<VmId, VmRecord>,
    shares: Vec<Share>,
    leases: BTreeMap<std::net::Ipv4Addr, IpLease>,
    uids: BTreeMap<u32, VmId>,
    api_keys: BTreeMap<String, ApiKey>,
    snapshots: BTreeMap<VmName, Snapshot>,
    events: std::collections::VecDeque<Event>,
    invites: BTreeMap<String, Invite>,
    web_tokens: std::collections::HashMap<crate::token::TokenHash, crate::web::WebToken>,
    domains: BTreeMap<String, crate::domain::CustomDomain>,
    /// The lowest id [`StateStore::create_user`] may hand out.
    next_user_id: u64,
}

impl State {
    /// What `owner` holds, leaving out VM `except` (the one being changed).
    fn usage(&self, owner: UserId, except: Option<VmId>) -> Usage {
        Usage::of_holdings(
            self.vms
                .values()
                .filter(|v| v.owner == owner && Some(v.id) != except),
            self.snapshots.values().filter(|s| s.owner == owner),
        )
    }

    /// Appends `event` and trims what `retention` no longer keeps.
    fn append(&mut self, event: NewEvent, retention: &EventRetention) -> Event {
        let seq = self.events.back().map_or(1, |e| e.seq + 1);
        let stored = Event::from_new(seq, event);
        self.events.push_back(stored.clone());
        for _ in 0..EventRetention::TRIM_PER_APPEND {
            let kept = self.events.len() as u64;
            match self.events.front() {
                Some(oldest) if retention.removes(kept, oldest.at, stored.at) => {
                    self.events.pop_front();
                }
                _ => break,
            }
        }
        stored
    }

    /// Refuses `user`'s handle if another user has it.
    fn check_handle(&self, user: &User) -> Result<(), StoreError> {
        if self
            .users
            .values()
            .any(|u| u.handle == user.handle && u.id != user.id)
        {
            return Err(StoreError::HandleTaken(user.handle.clone()));
        }
        Ok(())
    }

    /// Stores `user`, keeping ids from being handed out again.
    fn insert_user(&mut self, user: &User) {
        self.next_user_id = self.next_user_id.max(user.id.0.saturating_add(1));
        self.users.insert(user.id, user.clone());
    }

    fn update_vm(&mut self, vm: &VmRecord) -> Result<(), StoreError> {
        if self
            .vms
            .values()
            .any(|v| v.name == vm.name && v.id != vm.id)
        {
            return Err(StoreError::NameTaken(vm.name.clone()));
        }
        match self.vms.get_mut(&vm.id) {
            Some(existing) => {
                *existing = vm.clone();
                Ok(())
            }
            None => Err(StoreError::NotFound(format!("VM {}", vm.name))),
        }
    }
}

fn injected(f: InjectedFault) -> StoreError {
    StoreError::backend("injected failure", f)
}

impl MemoryStore {
    /// An empty store that fails nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose writes count towards `faults`.
    pub fn with_faults(faults: Faults) -> Self {
        Self {
            state: Mutex::default(),
            faults,
        }
    }

    fn write(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        self.faults.check(op).map_err(injected)?;
        Ok(self.read())
    }

    fn read(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities::new(false)
    }

    async fn put_user(&self, user: &User) -> Result<(), StoreError> {
        let mut s = self.write("store.put_user")?;
        s.check_handle(user)?;
        s.insert_user(user);
        Ok(())
    }

    async fn create_user(
        &self,
        user: &User,
        key: Option<&SshPublicKey>,
    ) -> Result<User, StoreError> {
        let mut s = self.write("store.create_user")?;
        let mut user = user.clone();
        let last = s.users.keys().next_back().map_or(0, |id| id.0);
        user.id = UserId(s.next_user_id.max(last.saturating_add(1)).max(1));
        s.check_handle(&user)?;
        if let Some(key) = key {
            let fp = key.fingerprint();
            if s.keys.contains_key(&fp) {
                return Err(StoreError::KeyTaken(fp));
            }
            s.keys.insert(fp, (user.id, key.clone()));
        }
        s.insert_user(&user);
        Ok(user)
    }

    async fn update_user(&self, user: &User) -> Result<(), StoreError> {
        let mut s = self.write("store.update_user")?;
        if !s.users.contains_key(&user.id) {
            return Err(StoreError::NotFound(format!("user {}", user.id)));
        }
        s.check_handle(user)?;
        s.insert_user(user);
        Ok(())
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        Ok(self.read().users.get(&id).cloned())
    }

    async fn user_by_handle(&self, handle: &Handle) -> Result<Option<User>, StoreError> {
        Ok(self
            .read()
            .users
            .values()
            .find(|u| u.handle == *handle)
            .cloned())
    }

    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError> {
        let mut s = self.write("store.delete_user")?;
        if !s.users.contains_key(&id) {
            return Ok(false);
        }
        let mut holdings: Vec<String> = s
            .vms
            .values()
            .filter(|v| v.owner == id)
            .map(|v| format!("VM {}", v.name))
            .collect();
        holdings.extend(
            s.snapshots
                .values()
                .filter(|sn| sn.owner == id)
                .map(|sn| format!("snapshot {}", sn.name)),
        );
        if !holdings.is_empty() {
            holdings.sort();
            return Err(StoreError::UserHoldsResources { user: id, holdings });
        }
        s.users.remove(&id);
        s.keys.retain(|_, (owner, _)| *owner != id);
        s.api_keys.retain(|_, k| k.user != id);
        s.quotas.remove(&id);
        s.shares
            .retain(|sh| sh.target != crate::share::ShareTarget::User(id));
        Ok(true)
    }

    async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        Ok(self.read().users.values().cloned().collect())
    }

    async fn add_ssh_key(&self, user: UserId, key: &SshPublicKey) -> Result<(), StoreError> {
        let mut s = self.write("store.add_ssh_key")?;
        let fp = key.fingerprint();
        match s.keys.get(&fp) {
            Some((owner, _)) if *owner != user => Err(StoreError::KeyTaken(fp)),
            _ => {
                s.keys.insert(fp, (user, key.clone()));
                Ok(())
            }
        }
    }

    async fn remove_ssh_key(&self, fingerprint: &str) -> Result<bool, StoreError> {
        Ok(self
            .write("store.remove_ssh_key")?
            .keys
            .remove(fingerprint)
            .is_some())
    }

    async fn user_by_key(&self, fingerprint: &str) -> Result<Option<UserId>, StoreError> {
        Ok(self.read().keys.get(fingerprint).map(|(u, _)| *u))
    }

    async fn ssh_keys(&self, user: UserId) -> Result<Vec<SshPublicKey>, StoreError> {
        Ok(self
            .read()
            .keys
            .values()
            .filter(|(u, _)| *u == user)
            .map(|(_, k)| k.clone())
            .collect())
    }

    async fn set_quota(&self, user: UserId, quota: &Quota) -> Result<(), StoreError> {
        self.write("store.set_quota")?.quotas.insert(user, *quota);
        Ok(())
    }

    async fn get_quota(&self, user: UserId) -> Result<Option<Quota>, StoreError> {
        Ok(self.read().quotas.get(&user).copied())
    }

    async fn create_vm(&self, vm: &VmRecord, quota: &Quota) -> Result<(), StoreError> {
        let mut s = self.write("store.create_vm")?;
        if s.vms.values().any(|v| v.name == vm.name) {
            return Err(StoreError::NameTaken(vm.name.clone()));
        }
        if s.vms.contains_key(&vm.id) {
            return Err(StoreError::Corrupt(format!("duplicate VM id {}", vm.id)));
        }
        let usage = s.usage(vm.owner, None);
        quota.check(&usage, &vm.spec)?;
        s.vms.insert(vm.id, vm.clone());
        Ok(())
    }

    async fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.write("store.update_vm")?.update_vm(vm)
    }

    async fn update_vm_with_event(
        &self,
        vm: &VmRecord,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError> {
        // One step: a fault injected here fails both writes, as a failed commit does.
        let mut s = self.write("store.update_vm")?;
        s.update_vm(vm)?;
        Ok(s.append(event, retention))
    }

    async fn update_vm_within_quota(&self, vm: &VmRecord, quota: &Quota) -> Result<(), StoreError> {
        let mut s = self.write("store.update_vm")?;
        let others = s.usage(vm.owner, Some(vm.id));
        let mut before = others;
        if let Some(old) = s.vms.get(&vm.id) {
            before.add_vm(old);
        }
        let mut after = others;
        after.add_vm(vm);
        quota.check_change(&before, &after)?;
        s.update_vm(vm)
    }

    async fn get_vm(&self, name: &VmName) -> Result<Option<VmRecord>, StoreError> {
        Ok(self.read().vms.values().find(|v| v.name == *name).cloned())
    }

    async fn get_vm_by_id(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        Ok(self.read().vms.get(&id).cloned())
    }

    async fn list_vms(&self, owner: Option<UserId>) -> Result<Vec<VmRecord>, StoreError> {
        let mut vms: Vec<_> = self
            .read()
            .vms
            .values()
            .filter(|v| owner.is_none_or(|o| v.owner == o))
            .cloned()
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    async fn delete_vm(&self, id: VmId) -> Result<bool, StoreError> {
        let mut s = self.write("store.delete_vm")?;
        s.shares.retain(|sh| sh.vm != id);
        s.domains.retain(|_, d| d.vm != id);
        Ok(s.vms.remove(&id).is_some())
    }

    async fn delete_vm_with_event(
        &self,
        id: VmId,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError> {
        let mut s = self.write("store.delete_vm")?;
        s.shares.retain(|sh| sh.vm != id);
        s.domains.retain(|_, d| d.vm != id);
        s.vms.remove(&id);
        Ok(s.append(event, retention))
    }

    async fn put_share(&self, share: &Share) -> Result<(), StoreError> {
        let mut s = self.write("store.put_share")?;
        s.shares.retain(|x| {
            !(x.vm == share.vm
                && x.target == share.target
                && x.access == share.access
                && x.port == share.port)
        });
        s.shares.push(share.clone());
        Ok(())
    }

    async fn remove_share(&self, share: &Share) -> Result<bool, StoreError> {
        let mut s = self.write("store.remove_share")?;
        let before = s.shares.len();
        s.shares.retain(|x| {
            !(x.vm == share.vm
                && x.target == share.target
                && x.access == share.access
                && x.port == share.port)
        });
        Ok(s.shares.len() != before)
    }

    async fn shares(&self, vm: VmId) -> Result<Vec<Share>, StoreError> {
        Ok(self
            .read()
            .shares
            .iter()
            .filter(|s| s.vm == vm)
            .cloned()
            .collect())
    }

    async fn allocate_lease(&self, vm: VmId, pool: &IpPool) -> Result<IpLease, StoreError> {
        let mut s = self.write("store.allocate_lease")?;
        if let Some(existing) = s.leases.values().find(|l| l.vm == vm) {
            return Ok(existing.clone());
        }
        let ip = pool
            .guest_addresses()
            .find(|ip| !s.leases.contains_key(ip))
            .ok_or_else(|| StoreError::PoolExhausted(pool.subnet.to_string()))?;
        let lease = IpLease::new(vm, ip, pool);
        s.leases.insert(ip, lease.clone());
        Ok(lease)
    }

    async fn release_lease(&self, vm: VmId) -> Result<bool, StoreError> {
        let mut s = self.write("store.release_lease")?;
        let before = s.leases.len();
        s.leases.retain(|_, l| l.vm != vm);
        Ok(s.leases.len() != before)
    }

    async fn list_leases(&self) -> Result<Vec<IpLease>, StoreError> {
        Ok(self.read().leases.values().cloned().collect())
    }

    async fn allocate_uid(&self, vm: VmId, range: &UidRange) -> Result<u32, StoreError> {
        let mut s = self.write("store.allocate_uid")?;
        if let Some((uid, _)) = s.uids.iter().find(|(_, v)| **v == vm) {
            return Ok(*uid);
        }
        let uid = (range.first..=range.last())
            .find(|uid| !s.uids.contains_key(uid))
            .ok_or(StoreError::UidsExhausted(*range))?;
        s.uids.insert(uid, vm);
        Ok(uid)
    }

    async fn release_uid(&self, vm: VmId) -> Result<bool, StoreError> {
        let mut s = self.write("store.release_uid")?;
        let before = s.uids.len();
        s.uids.retain(|_, v| *v != vm);
        Ok(s.uids.len() != before)
    }

    async fn list_uids(&self) -> Result<Vec<(VmId, u32)>, StoreError> {
        Ok(self
            .read()
            .uids
            .iter()
            .map(|(uid, vm)| (*vm, *uid))
            .collect())
    }

    async fn put_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        self.write("store.put_api_key")?
            .api_keys
            .insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        Ok(self.read().api_keys.get(id).cloned())
    }

    async fn delete_api_key(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .write("store.delete_api_key")?
            .api_keys
            .remove(id)
            .is_some())
    }

    async fn record_api_key_use(&self, id: &str, at: Timestamp) -> Result<bool, StoreError> {
        let mut s = self.write("store.record_api_key_use")?;
        Ok(match s.api_keys.get_mut(id) {
            Some(key) => {
                key.last_used_at = Some(at);
                true
            }
            None => false,
        })
    }

    async fn list_api_keys(&self, user: UserId) -> Result<Vec<ApiKey>, StoreError> {
        Ok(self
            .read()
            .api_keys
            .values()
            .filter(|k| k.user == user)
            .cloned()
            .collect())
    }

    async fn put_snapshot(&self, snapshot: &Snapshot, quota: &Quota) -> Result<(), StoreError> {
        let mut s = self.write("store.put_snapshot")?;
        if s.snapshots.contains_key(&snapshot.name) {
            return Err(StoreError::SnapshotTaken(snapshot.name.clone()));
        }
        let before = s.usage(snapshot.owner, None);
        let mut after = before;
        after.add_snapshot(snapshot);
        quota.check_change(&before, &after)?;
        s.snapshots.insert(snapshot.name.clone(), snapshot.clone());
        Ok(())
    }

    async fn get_snapshot(&self, name: &VmName) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.read().snapshots.get(name).cloned())
    }

    async fn list_snapshots(&self, owner: Option<UserId>) -> Result<Vec<Snapshot>, StoreError> {
        Ok(self
            .read()
            .snapshots
            .values()
            .filter(|s| owner.is_none_or(|o| s.owner == o))
            .cloned()
            .collect())
    }

    async fn update_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut s = self.write("store.update_snapshot")?;
        match s.snapshots.get_mut(&snapshot.name) {
            Some(existing) => {
                *existing = snapshot.clone();
                Ok(())
            }
            None => Err(StoreError::NotFound(format!("snapshot {}", snapshot.name))),
        }
    }

    async fn delete_snapshot(&self, name: &VmName) -> Result<bool, StoreError> {
        let mut s = self.write("store.delete_snapshot")?;
        Ok(s.snapshots.remove(name).is_some())
    }

    async fn put_invite(&self, invite: &Invite) -> Result<(), StoreError> {
        self.write("store.put_invite")?
            .invites
            .insert(invite.id.clone(), invite.clone());
        Ok(())
    }

    async fn list_invites(&self) -> Result<Vec<Invite>, StoreError> {
        Ok(self.read().invites.values().cloned().collect())
    }

    async fn delete_invite(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .write("store.delete_invite")?
            .invites
            .remove(id)
            .is_some())
    }

    async fn consume_invite(
        &self,
        secret: &str,
        now: Timestamp,
    ) -> Result<Option<Invite>, StoreError> {
        let mut s = self.write("store.consume_invite")?;
        // Every invite is compared, so the time taken does not say which matched.
        let mut found = None;
        for invite in s.invites.values() {
            if invite.hash.matches(secret) {
                found = Some(invite.id.clone());
            }
        }
        let Some(id) = found else {
            return Ok(None);
        };
        Ok(s.invites.remove(&id).filter(|i| !i.is_expired(now)))
    }

    async fn put_domain(&self, domain: &crate::domain::CustomDomain) -> Result<(), StoreError> {
        self.write("store.put_domain")?
            .domains
            .insert(domain.host.clone(), domain.clone());
        Ok(())
    }

    async fn get_domain(
        &self,
        host: &str,
    ) -> Result<Option<crate::domain::CustomDomain>, StoreError> {
        Ok(self.read().domains.get(host).cloned())
    }

    async fn list_domains(
        &self,
        vm: Option<VmId>,
    ) -> Result<Vec<crate::domain::CustomDomain>, StoreError> {
        Ok(self
            .read()
            .domains
            .values()
            .filter(|d| vm.is_none_or(|v| d.vm == v))
            .cloned()
            .collect())
    }

    async fn remove_domain(&self, host: &str) -> Result<bool, StoreError> {
        Ok(self
            .write("store.remove_domain")?
            .domains
            .remove(host)
            .is_some())
    }

    async fn put_web_token(&self, token: &crate::web::WebToken) -> Result<(), StoreError> {
        self.write("store.put_web_token")?
            .web_tokens
            .insert(token.hash, token.clone());
        Ok(())
    }

    async fn get_web_token(
        &self,
        hash: &crate::token::TokenHash,
    ) -> Result<Option<crate::web::WebToken>, StoreError> {
        Ok(self.read().web_tokens.get(hash).cloned())
    }

    async fn take_web_token(
        &self,
        hash: &crate::token::TokenHash,
    ) -> Result<Option<crate::web::WebToken>, StoreError> {
        Ok(self.write("store.take_web_token")?.web_tokens.remove(hash))
    }

    async fn delete_web_tokens(
        &self,
        user: UserId,
        parent: Option<&crate::token::TokenHash>,
    ) -> Result<usize, StoreError> {
        let mut s = self.write("store.delete_web_tokens")?;
        let before = s.web_tokens.len();
        s.web_tokens
            .retain(|_, t| t.user != user || (parent.is_some() && t.parent.as_ref() != parent));
        Ok(before - s.web_tokens.len())
    }

    async fn purge_web_tokens(&self, now: Timestamp) -> Result<usize, StoreError> {
        let mut s = self.write("store.purge_web_tokens")?;
        let before = s.web_tokens.len();
        s.web_tokens.retain(|_, t| !t.is_expired(now));
        Ok(before - s.web_tokens.len())
    }

    async fn append_event(
        &self,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError> {
        // Events are a log, not a step of any operation: they do not count as steps.
        Ok(self.read().append(event, retention))
    }

    async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        Ok(self
            .read()
            .events
            .iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(self.read().events.back().map_or(0, |e| e.seq))
    }

    async fn first_event_seq(&self) -> Result<u64, StoreError> {
        let s = self.read();
        Ok(s.events.front().map_or(1, |e| e.seq))
    }
}
