//! [`StateStore`] on redb: one transaction per method.

use std::net::Ipv4Addr;
use std::ops::Bound;

use async_trait::async_trait;
use redb::{
    ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
    WriteTransaction,
};
use vmkit_core::{
    ApiKey, CustomDomain, Event, EventRetention, Handle, Invite, IpLease, IpPool, NewEvent, Quota,
    Share, ShareTarget, Snapshot, SshPublicKey, StateStore, StoreCapabilities, StoreError,
    Timestamp, TokenHash, UidRange, Usage, User, UserId, VmId, VmName, VmRecord, WebToken,
};

use super::RedbStore;
use super::tables::{
    API_KEYS, Context, DOMAINS, EVENTS, INVITES, LEASE_BY_VM, LEASES, META, NEXT_USER_ID_KEY,
    QUOTAS, SHARES, SNAPSHOTS, SSH_KEYS, StoredKey, UID_BY_VM, UIDS, USER_HANDLES, USERS, VM_NAMES,
    VMS, WEB_TOKENS, decode, encode, share_key,
};

/// The user with id `id`, read through any table handle of [`USERS`].
fn user_at(
    users: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<User>, StoreError> {
    let Some(bytes) = users.get(id).context("cannot read table users")? else {
        return Ok(None);
    };
    decode(bytes.value(), format_args!("user {}", UserId(id))).map(Some)
}

/// The lowest user id not yet handed out.
fn next_user_id(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META).context("cannot open table meta")?;
    let stored = meta
        .get(NEXT_USER_ID_KEY)
        .context("cannot read the next user id")?
        .map_or(1, |v| v.value());
    let users = txn.open_table(USERS).context("cannot open table users")?;
    let last = users
        .last()
        .context("cannot read table users")?
        .map_or(0, |(id, _)| id.value());
    Ok(stored.max(last.saturating_add(1)).max(1))
}

/// Stores `user` under its id in `txn`, moving its handle index entry and keeping
/// its id from being handed out again; [`StoreError::HandleTaken`] if another user
/// has the handle.
fn put_user_in(txn: &WriteTransaction, user: &User) -> Result<(), StoreError> {
    let id = user.id.0;
    let bytes = encode(user, "a user")?;
    let mut users = txn.open_table(USERS).context("cannot open table users")?;
    let mut handles = txn
        .open_table(USER_HANDLES)
        .context("cannot open table user_handles")?;
    if let Some(holder) = handles
        .get(user.handle.as_str())
        .context("cannot read table user_handles")?
        && holder.value() != id
    {
        return Err(StoreError::HandleTaken(user.handle.clone()));
    }
    if let Some(old) = user_at(&users, id)?
        && old.handle != user.handle
    {
        handles
            .remove(old.handle.as_str())
            .context("cannot write table user_handles")?;
    }
    handles
        .insert(user.handle.as_str(), id)
        .context("cannot write table user_handles")?;
    users
        .insert(id, bytes.as_slice())
        .context("cannot write table users")?;
    drop((users, handles));
    keep_user_id_used(txn, user.id)
}

/// Keeps `id` from being handed out by [`next_user_id`] again.
fn keep_user_id_used(txn: &WriteTransaction, id: UserId) -> Result<(), StoreError> {
    let next = next_user_id(txn)?.max(id.0.saturating_add(1));
    let mut meta = txn.open_table(META).context("cannot open table meta")?;
    meta.insert(NEXT_USER_ID_KEY, next)
        .context("cannot write the next user id")?;
    Ok(())
}

/// The names of the VMs and snapshots `owner` holds in `txn`, sorted.
fn holdings_in(txn: &WriteTransaction, owner: UserId) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let vms = txn.open_table(VMS).context("cannot open table vms")?;
    for entry in vms.iter().context("cannot read table vms")? {
        let (id, bytes) = entry.context("cannot read table vms")?;
        let vm: VmRecord = decode(bytes.value(), format_args!("VM {:016x}", id.value()))?;
        if vm.owner == owner {
            out.push(format!("VM {}", vm.name));
        }
    }
    let snapshots = txn
        .open_table(SNAPSHOTS)
        .context("cannot open table snapshots")?;
    for entry in snapshots.iter().context("cannot read table snapshots")? {
        let (name, bytes) = entry.context("cannot read table snapshots")?;
        let snapshot: Snapshot = decode(bytes.value(), format_args!("snapshot {}", name.value()))?;
        if snapshot.owner == owner {
            out.push(format!("snapshot {}", snapshot.name));
        }
    }
    out.sort();
    Ok(out)
}

/// The record of VM `id`, read through any table handle of [`VMS`].
fn vm_at(
    vms: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<VmRecord>, StoreError> {
    let Some(bytes) = vms.get(id).context("cannot read table vms")? else {
        return Ok(None);
    };
    decode(bytes.value(), format_args!("VM {id:016x}")).map(Some)
}

/// The VM named `name`, through the name index.
fn vm_named(
    names: &impl ReadableTable<&'static str, u64>,
    vms: &impl ReadableTable<u64, &'static [u8]>,
    name: &str,
) -> Result<Option<VmRecord>, StoreError> {
    let Some(id) = names.get(name).context("cannot read table vm_names")? else {
        return Ok(None);
    };
    let id = id.value();
    vm_at(vms, id)?.map(Some).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "the name {name} points to VM {id:016x}, which does not exist"
        ))
    })
}

/// The shares of VM `vm` with their keys, in key order.
fn shares_of(
    shares: &impl ReadableTable<(u64, &'static str), &'static [u8]>,
    vm: u64,
) -> Result<Vec<(String, Share)>, StoreError> {
    let mut out = Vec::new();
    for entry in shares
        .range((vm, "")..)
        .context("cannot read table shares")?
    {
        let (key, bytes) = entry.context("cannot read table shares")?;
        let (owner, target) = key.value();
        if owner != vm {
            break;
        }
        let share = decode(
            bytes.value(),
            format_args!("the share {target} of VM {vm:016x}"),
        )?;
        out.push((target.to_owned(), share));
    }
    Ok(out)
}

/// Leases the lowest free address of `pool` to `vm` in `txn`, or returns the lease
/// `vm` holds.
fn allocate(txn: &WriteTransaction, vm: VmId, pool: &IpPool) -> Result<IpLease, StoreError> {
    let mut leases = txn.open_table(LEASES).context("cannot open table leases")?;
    let mut by_vm = txn
        .open_table(LEASE_BY_VM)
        .context("cannot open table lease_by_vm")?;
    if let Some(ip) = by_vm
        .get(vm.as_u64())
        .context("cannot read table lease_by_vm")?
    {
        let ip = Ipv4Addr::from(ip.value());
        let bytes = leases
            .get(u32::from(ip))
            .context("cannot read table leases")?
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "VM {vm} is indexed as holding {ip}, which has no lease"
                ))
            })?;
        return decode(bytes.value(), format_args!("the lease of {ip}"));
    }

    let exhausted = || StoreError::PoolExhausted(pool.subnet.to_string());
    // The guest range of `IpPool::guest_addresses`: network + 2 ..= broadcast - 1.
    let first = u32::from(pool.subnet.network())
        .checked_add(2)
        .ok_or_else(exhausted)?;
    let last = u32::from(pool.subnet.broadcast())
        .checked_sub(1)
        .ok_or_else(exhausted)?;
    // Walk the leases of the range in address order; the first gap is the lowest free
    // address. Costs one step per lease, not per address of the pool.
    let mut candidate = first;
    for entry in leases
        .range(first..=last)
        .context("cannot read table leases")?
    {
        let (taken, _) = entry.context("cannot read table leases")?;
        if taken.value() != candidate {
            break;
        }
        candidate = candidate.checked_add(1).ok_or_else(exhausted)?;
    }
    if candidate > last {
        return Err(exhausted());
    }

    let lease = IpLease::new(vm, Ipv4Addr::from(candidate), pool);
    leases
        .insert(candidate, encode(&lease, "a lease")?.as_slice())
        .context("cannot write table leases")?;
    by_vm
        .insert(vm.as_u64(), candidate)
        .context("cannot write table lease_by_vm")?;
    Ok(lease)
}

/// What `owner` holds in `txn` (VMs and snapshots), leaving out VM `except`.
fn usage_in(
    txn: &WriteTransaction,
    owner: UserId,
    except: Option<VmId>,
) -> Result<Usage, StoreError> {
    let vms = txn.open_table(VMS).context("cannot open table vms")?;
    let mut owned = Vec::new();
    // A scan: a host holds few VMs, and the check must see every one of the owner's
    // in this transaction.
    for entry in vms.iter().context("cannot read table vms")? {
        let (id, bytes) = entry.context("cannot read table vms")?;
        let vm: VmRecord = decode(bytes.value(), format_args!("VM {:016x}", id.value()))?;
        if vm.owner == owner && Some(vm.id) != except {
            owned.push(vm);
        }
    }
    let table = txn
        .open_table(SNAPSHOTS)
        .context("cannot open table snapshots")?;
    let mut snapshots = Vec::new();
    for entry in table.iter().context("cannot read table snapshots")? {
        let (name, bytes) = entry.context("cannot read table snapshots")?;
        let snapshot: Snapshot = decode(bytes.value(), format_args!("snapshot {}", name.value()))?;
        if snapshot.owner == owner {
            snapshots.push(snapshot);
        }
    }
    Ok(Usage::of_holdings(&owned, &snapshots))
}

/// Replaces the record of existing VM `vm` in `txn`, moving its name index entry on
/// a rename.
fn update_in(txn: &WriteTransaction, vm: &VmRecord) -> Result<(), StoreError> {
    let bytes = encode(vm, "a VM record")?;
    let mut vms = txn.open_table(VMS).context("cannot open table vms")?;
    let Some(old) = vm_at(&vms, vm.id.as_u64())? else {
        return Err(StoreError::NotFound(format!("VM {}", vm.name)));
    };
    if old.name != vm.name {
        // A rename: move the name index entry, keeping names unique.
        let mut names = txn
            .open_table(VM_NAMES)
            .context("cannot open table vm_names")?;
        if names
            .get(vm.name.as_str())
            .context("cannot read table vm_names")?
            .is_some()
        {
            return Err(StoreError::NameTaken(vm.name.clone()));
        }
        names
            .remove(old.name.as_str())
            .context("cannot write table vm_names")?;
        names
            .insert(vm.name.as_str(), vm.id.as_u64())
            .context("cannot write table vm_names")?;
    }
    vms.insert(vm.id.as_u64(), bytes.as_slice())
        .context("cannot write table vms")?;
    Ok(())
}

/// The JSON record at `key` of the string-keyed `table`, read in `txn`; `what` names
/// it when it does not decode.
fn record_at<T: serde::de::DeserializeOwned>(
    txn: &ReadTransaction,
    table: TableDefinition<'static, &'static str, &'static [u8]>,
    key: &str,
    what: impl std::fmt::Display,
) -> Result<Option<T>, StoreError> {
    let name = table.name().to_owned();
    let table = txn
        .open_table(table)
        .context(&format!("cannot open table {name}"))?;
    match table
        .get(key)
        .context(&format!("cannot read table {name}"))?
    {
        Some(bytes) => Ok(Some(decode(bytes.value(), what)?)),
        None => Ok(None),
    }
}

/// Deletes the record of VM `id` and its shares and custom domains in `txn`; whether
/// it existed.
fn delete_in(txn: &WriteTransaction, id: VmId) -> Result<bool, StoreError> {
    let mut vms = txn.open_table(VMS).context("cannot open table vms")?;
    let Some(old) = vm_at(&vms, id.as_u64())? else {
        return Ok(false);
    };
    vms.remove(id.as_u64()).context("cannot write table vms")?;
    let mut names = txn
        .open_table(VM_NAMES)
        .context("cannot open table vm_names")?;
    names
        .remove(old.name.as_str())
        .context("cannot write table vm_names")?;
    let mut shares = txn.open_table(SHARES).context("cannot open table shares")?;
    for (target, _) in shares_of(&shares, id.as_u64())? {
        shares
            .remove((id.as_u64(), target.as_str()))
            .context("cannot write table shares")?;
    }
    let mut domains = txn
        .open_table(DOMAINS)
        .context("cannot open table domains")?;
    let mut gone = Vec::new();
    for entry in domains.iter().context("cannot read table domains")? {
        let (host, bytes) = entry.context("cannot read table domains")?;
        let domain: CustomDomain = decode(
            bytes.value(),
            format_args!("custom domain {}", host.value()),
        )?;
        if domain.vm == id {
            gone.push(domain.host);
        }
    }
    for host in gone {
        domains
            .remove(host.as_str())
            .context("cannot write table domains")?;
    }
    Ok(true)
}

/// Appends `event` in `txn`, numbered one past the last, and removes the oldest
/// events `retention` no longer keeps (at most [`EventRetention::TRIM_PER_APPEND`]).
fn append_in(
    txn: &WriteTransaction,
    event: NewEvent,
    retention: &EventRetention,
) -> Result<Event, StoreError> {
    let mut events = txn.open_table(EVENTS).context("cannot open table events")?;
    let last = events
        .last()
        .context("cannot read table events")?
        .map_or(0, |(seq, _)| seq.value());
    let seq = last
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt(format!("the last event is numbered {last}")))?;
    let stored = Event::from_new(seq, event);
    events
        .insert(seq, encode(&stored, "an event")?.as_slice())
        .context("cannot write table events")?;
    let mut kept = events.len().context("cannot read table events")?;
    for _ in 0..EventRetention::TRIM_PER_APPEND {
        let Some((oldest, at)) = (match events.first().context("cannot read table events")? {
            Some((seq, bytes)) => {
                let seq = seq.value();
                let event: Event = decode(bytes.value(), format_args!("event {seq}"))?;
                Some((seq, event.at))
            }
            None => None,
        }) else {
            break;
        };
        if !retention.removes(kept, at, stored.at) {
            break;
        }
        events.remove(oldest).context("cannot write table events")?;
        kept -= 1;
    }
    Ok(stored)
}

/// Hands `vm` the lowest free uid of `range` in `txn`, or returns the uid `vm` holds.
fn allocate_uid(txn: &WriteTransaction, vm: VmId, range: &UidRange) -> Result<u32, StoreError> {
    let mut uids = txn.open_table(UIDS).context("cannot open table uids")?;
    let mut by_vm = txn
        .open_table(UID_BY_VM)
        .context("cannot open table uid_by_vm")?;
    if let Some(uid) = by_vm
        .get(vm.as_u64())
        .context("cannot read table uid_by_vm")?
    {
        return Ok(uid.value());
    }
    // The first gap in the held uids of the range, as for leases.
    let mut candidate = range.first;
    for entry in uids
        .range(range.first..=range.last())
        .context("cannot read table uids")?
    {
        let (taken, _) = entry.context("cannot read table uids")?;
        if taken.value() != candidate {
            break;
        }
        candidate += 1;
    }
    if candidate > range.last() {
        return Err(StoreError::UidsExhausted(*range));
    }
    uids.insert(candidate, vm.as_u64())
        .context("cannot write table uids")?;
    by_vm
        .insert(vm.as_u64(), candidate)
        .context("cannot write table uid_by_vm")?;
    Ok(candidate)
}

/// Deletes the web tokens `keep` says no to; how many.
fn retain_web_tokens(
    txn: &redb::WriteTransaction,
    keep: impl Fn(&WebToken) -> bool,
) -> Result<usize, StoreError> {
    let mut tokens = txn
        .open_table(WEB_TOKENS)
        .context("cannot open table web_tokens")?;
    let mut doomed = Vec::new();
    for entry in tokens.iter().context("cannot read table web_tokens")? {
        let (key, bytes) = entry.context("cannot read table web_tokens")?;
        let token: WebToken = decode(bytes.value(), format_args!("web token {}", key.value()))?;
        if !keep(&token) {
            doomed.push(key.value().to_owned());
        }
    }
    for key in &doomed {
        tokens
            .remove(key.as_str())
            .context("cannot write table web_tokens")?;
    }
    Ok(doomed.len())
}

#[async_trait]
impl StateStore for RedbStore {
    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities::new(true)
    }

    // ---- users and keys ----

    async fn put_user(&self, user: &User) -> Result<(), StoreError> {
        let user = user.clone();
        self.write("put_user", move |txn| put_user_in(txn, &user))
            .await
    }

    async fn create_user(
        &self,
        user: &User,
        key: Option<&SshPublicKey>,
    ) -> Result<User, StoreError> {
        let mut user = user.clone();
        let key = key.map(|k| (k.fingerprint(), k.clone()));
        self.write("create_user", move |txn| {
            user.id = UserId(next_user_id(txn)?);
            put_user_in(txn, &user)?;
            if let Some((fingerprint, key)) = key {
                let mut keys = txn
                    .open_table(SSH_KEYS)
                    .context("cannot open table ssh_keys")?;
                if keys
                    .get(fingerprint.as_str())
                    .context("cannot read table ssh_keys")?
                    .is_some()
                {
                    return Err(StoreError::KeyTaken(fingerprint));
                }
                let bytes = encode(&StoredKey { user: user.id, key }, "an SSH key")?;
                keys.insert(fingerprint.as_str(), bytes.as_slice())
                    .context("cannot write table ssh_keys")?;
            }
            Ok(user)
        })
        .await
    }

    async fn update_user(&self, user: &User) -> Result<(), StoreError> {
        let user = user.clone();
        self.write("update_user", move |txn| {
            {
                let users = txn.open_table(USERS).context("cannot open table users")?;
                if user_at(&users, user.id.0)?.is_none() {
                    return Err(StoreError::NotFound(format!("user {}", user.id)));
                }
            }
            put_user_in(txn, &user)
        })
        .await
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.read("get_user", move |txn| {
            let users = txn.open_table(USERS).context("cannot open table users")?;
            user_at(&users, id.0)
        })
        .await
    }

    async fn user_by_handle(&self, handle: &Handle) -> Result<Option<User>, StoreError> {
        let handle = handle.clone();
        self.read("user_by_handle", move |txn| {
            let handles = txn
                .open_table(USER_HANDLES)
                .context("cannot open table user_handles")?;
            let Some(id) = handles
                .get(handle.as_str())
                .context("cannot read table user_handles")?
            else {
                return Ok(None);
            };
            let id = id.value();
            let users = txn.open_table(USERS).context("cannot open table users")?;
            user_at(&users, id)?.map(Some).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the handle {handle} points to user {}, who does not exist",
                    UserId(id)
                ))
            })
        })
        .await
    }

    async fn delete_user(&self, id: UserId) -> Result<bool, StoreError> {
        self.write("delete_user", move |txn| {
            let mut users = txn.open_table(USERS).context("cannot open table users")?;
            let Some(user) = user_at(&users, id.0)? else {
                return Ok(false);
            };
            let holdings = holdings_in(txn, id)?;
            if !holdings.is_empty() {
                return Err(StoreError::UserHoldsResources { user: id, holdings });
            }
            users.remove(id.0).context("cannot write table users")?;
            drop(users);
            txn.open_table(USER_HANDLES)
                .context("cannot open table user_handles")?
                .remove(user.handle.as_str())
                .context("cannot write table user_handles")?;
            // Ids are never reused: the next one stays above this one.
            keep_user_id_used(txn, id)?;

            let mut keys = txn
                .open_table(SSH_KEYS)
                .context("cannot open table ssh_keys")?;
            let mut gone = Vec::new();
            for entry in keys.iter().context("cannot read table ssh_keys")? {
                let (fingerprint, bytes) = entry.context("cannot read table ssh_keys")?;
                let stored: StoredKey = decode(
                    bytes.value(),
                    format_args!("SSH key {}", fingerprint.value()),
                )?;
                if stored.user == id {
                    gone.push(fingerprint.value().to_owned());
                }
            }
            for fingerprint in gone {
                keys.remove(fingerprint.as_str())
                    .context("cannot write table ssh_keys")?;
            }

            let mut api_keys = txn
                .open_table(API_KEYS)
                .context("cannot open table api_keys")?;
            let mut gone = Vec::new();
            for entry in api_keys.iter().context("cannot read table api_keys")? {
                let (key_id, bytes) = entry.context("cannot read table api_keys")?;
                let key: ApiKey =
                    decode(bytes.value(), format_args!("API key {}", key_id.value()))?;
                if key.user == id {
                    gone.push(key_id.value().to_owned());
                }
            }
            for key_id in gone {
                api_keys
                    .remove(key_id.as_str())
                    .context("cannot write table api_keys")?;
            }

            txn.open_table(QUOTAS)
                .context("cannot open table quotas")?
                .remove(id.0)
                .context("cannot write table quotas")?;

            let mut shares = txn.open_table(SHARES).context("cannot open table shares")?;
            let mut gone = Vec::new();
            for entry in shares.iter().context("cannot read table shares")? {
                let (key, bytes) = entry.context("cannot read table shares")?;
                let (vm, target) = key.value();
                let share: Share = decode(
                    bytes.value(),
                    format_args!("the share {target} of VM {vm:016x}"),
                )?;
                if share.target == ShareTarget::User(id) {
                    gone.push((vm, target.to_owned()));
                }
            }
            for (vm, target) in gone {
                shares
                    .remove((vm, target.as_str()))
                    .context("cannot write table shares")?;
            }
            Ok(true)
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        self.read("list_users", |txn| {
            let users = txn.open_table(USERS).context("cannot open table users")?;
            let mut out = Vec::new();
            for entry in users.iter().context("cannot read table users")? {
                let (id, bytes) = entry.context("cannot read table users")?;
                out.push(decode(
                    bytes.value(),
                    format_args!("user {}", UserId(id.value())),
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn add_ssh_key(&self, user: UserId, key: &SshPublicKey) -> Result<(), StoreError> {
        let fingerprint = key.fingerprint();
        let bytes = encode(
            &StoredKey {
                user,
                key: key.clone(),
            },
            "an SSH key",
        )?;
        self.write("add_ssh_key", move |txn| {
            let mut keys = txn
                .open_table(SSH_KEYS)
                .context("cannot open table ssh_keys")?;
            let owner = match keys
                .get(fingerprint.as_str())
                .context("cannot read table ssh_keys")?
            {
                Some(existing) => Some(
                    decode::<StoredKey>(existing.value(), format_args!("SSH key {fingerprint}"))?
                        .user,
                ),
                None => None,
            };
            if owner.is_some_and(|owner| owner != user) {
                return Err(StoreError::KeyTaken(fingerprint));
            }
            keys.insert(fingerprint.as_str(), bytes.as_slice())
                .context("cannot write table ssh_keys")?;
            Ok(())
        })
        .await
    }

    async fn remove_ssh_key(&self, fingerprint: &str) -> Result<bool, StoreError> {
        let fingerprint = fingerprint.to_owned();
        self.write("remove_ssh_key", move |txn| {
            let mut keys = txn
                .open_table(SSH_KEYS)
                .context("cannot open table ssh_keys")?;
            let removed = keys
                .remove(fingerprint.as_str())
                .context("cannot write table ssh_keys")?;
            Ok(removed.is_some())
        })
        .await
    }

    async fn user_by_key(&self, fingerprint: &str) -> Result<Option<UserId>, StoreError> {
        let fingerprint = fingerprint.to_owned();
        self.read("user_by_key", move |txn| {
            let keys = txn
                .open_table(SSH_KEYS)
                .context("cannot open table ssh_keys")?;
            let Some(bytes) = keys
                .get(fingerprint.as_str())
                .context("cannot read table ssh_keys")?
            else {
                return Ok(None);
            };
            let stored: StoredKey = decode(bytes.value(), format_args!("SSH key {fingerprint}"))?;
            Ok(Some(stored.user))
        })
        .await
    }

    async fn ssh_keys(&self, user: UserId) -> Result<Vec<SshPublicKey>, StoreError> {
        self.read("ssh_keys", move |txn| {
            let keys = txn
                .open_table(SSH_KEYS)
                .context("cannot open table ssh_keys")?;
            let mut out = Vec::new();
            // A scan: a user has few keys and a host few users; an index would cost
            // a second table on every write for no measurable gain.
            for entry in keys.iter().context("cannot read table ssh_keys")? {
                let (fingerprint, bytes) = entry.context("cannot read table ssh_keys")?;
                let stored: StoredKey = decode(
                    bytes.value(),
                    format_args!("SSH key {}", fingerprint.value()),
                )?;
                if stored.user == user {
                    out.push(stored.key);
                }
            }
            Ok(out)
        })
        .await
    }

    // ---- quotas ----

    async fn set_quota(&self, user: UserId, quota: &Quota) -> Result<(), StoreError> {
        let bytes = encode(quota, "a quota")?;
        self.write("set_quota", move |txn| {
            let mut quotas = txn.open_table(QUOTAS).context("cannot open table quotas")?;
            quotas
                .insert(user.0, bytes.as_slice())
                .context("cannot write table quotas")?;
            Ok(())
        })
        .await
    }

    async fn get_quota(&self, user: UserId) -> Result<Option<Quota>, StoreError> {
        self.read("get_quota", move |txn| {
            let quotas = txn.open_table(QUOTAS).context("cannot open table quotas")?;
            let Some(bytes) = quotas.get(user.0).context("cannot read table quotas")? else {
                return Ok(None);
            };
            decode(bytes.value(), format_args!("the quota of {user}")).map(Some)
        })
        .await
    }

    // ---- VMs ----

    async fn create_vm(&self, vm: &VmRecord, quota: &Quota) -> Result<(), StoreError> {
        let vm = vm.clone();
        let quota = *quota;
        let bytes = encode(&vm, "a VM record")?;
        self.write("create_vm", move |txn| {
            let vms = txn.open_table(VMS).context("cannot open table vms")?;
            let names = txn
                .open_table(VM_NAMES)
                .context("cannot open table vm_names")?;
            if names
                .get(vm.name.as_str())
                .context("cannot read table vm_names")?
                .is_some()
            {
                return Err(StoreError::NameTaken(vm.name));
            }
            if vms
                .get(vm.id.as_u64())
                .context("cannot read table vms")?
                .is_some()
            {
                // As in the in-memory store: ids are random and never reused.
                return Err(StoreError::Corrupt(format!("duplicate VM id {}", vm.id)));
            }
            drop((vms, names));
            let usage = usage_in(txn, vm.owner, None)?;
            quota.check(&usage, &vm.spec)?;
            let mut vms = txn.open_table(VMS).context("cannot open table vms")?;
            let mut names = txn
                .open_table(VM_NAMES)
                .context("cannot open table vm_names")?;
            vms.insert(vm.id.as_u64(), bytes.as_slice())
                .context("cannot write table vms")?;
            names
                .insert(vm.name.as_str(), vm.id.as_u64())
                .context("cannot write table vm_names")?;
            Ok(())
        })
        .await
    }

    async fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let vm = vm.clone();
        self.write("update_vm", move |txn| update_in(txn, &vm))
            .await
    }

    async fn update_vm_with_event(
        &self,
        vm: &VmRecord,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError> {
        let vm = vm.clone();
        let retention = *retention;
        self.write("update_vm_with_event", move |txn| {
            update_in(txn, &vm)?;
            append_in(txn, event, &retention)
        })
        .await
    }

    async fn update_vm_within_quota(&self, vm: &VmRecord, quota: &Quota) -> Result<(), StoreError> {
        let vm = vm.clone();
        let quota = *quota;
        self.write("update_vm_within_quota", move |txn| {
            let others = usage_in(txn, vm.owner, Some(vm.id))?;
            let mut before = others;
            {
                let vms = txn.open_table(VMS).context("cannot open table vms")?;
                if let Some(old) = vm_at(&vms, vm.id.as_u64())? {
                    before.add_vm(&old);
                }
            }
            let mut after = others;
            after.add_vm(&vm);
            quota.check_change(&before, &after)?;
            update_in(txn, &vm)
        })
        .await
    }

    async fn get_vm(&self, name: &VmName) -> Result<Option<VmRecord>, StoreError> {
        let name = name.clone();
        self.read("get_vm", move |txn| {
            let names = txn
                .open_table(VM_NAMES)
                .context("cannot open table vm_names")?;
            let vms = txn.open_table(VMS).context("cannot open table vms")?;
            vm_named(&names, &vms, name.as_str())
        })
        .await
    }

    async fn get_vm_by_id(&self, id: VmId) -> Result<Option<VmRecord>, StoreError> {
        self.read("get_vm_by_id", move |txn| {
            let vms = txn.open_table(VMS).context("cannot open table vms")?;
            vm_at(&vms, id.as_u64())
        })
        .await
    }

    async fn list_vms(&self, owner: Option<UserId>) -> Result<Vec<VmRecord>, StoreError> {
        self.read("list_vms", move |txn| {
            let names = txn
                .open_table(VM_NAMES)
                .context("cannot open table vm_names")?;
            let vms = txn.open_table(VMS).context("cannot open table vms")?;
            let mut out = Vec::new();
            // The name index is in name order, which is the order promised.
            for entry in names.iter().context("cannot read table vm_names")? {
                let (name, id) = entry.context("cannot read table vm_names")?;
                let vm = vm_at(&vms, id.value())?.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "the name {} points to VM {:016x}, which does not exist",
                        name.value(),
                        id.value()
                    ))
                })?;
                if owner.is_none_or(|o| vm.owner == o) {
                    out.push(vm);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn delete_vm(&self, id: VmId) -> Result<bool, StoreError> {
        self.write("delete_vm", move |txn| delete_in(txn, id)).await
    }

    async fn delete_vm_with_event(
        &self,
        id: VmId,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError> {
        let retention = *retention;
        self.write("delete_vm_with_event", move |txn| {
            delete_in(txn, id)?;
            append_in(txn, event, &retention)
        })
        .await
    }

    // ---- shares ----

    async fn put_share(&self, share: &Share) -> Result<(), StoreError> {
        let vm = share.vm.as_u64();
        let key = share_key(share)?;
        let bytes = encode(share, "a share")?;
        self.write("put_share", move |txn| {
            let mut shares = txn.open_table(SHARES).context("cannot open table shares")?;
            shares
                .insert((vm, key.as_str()), bytes.as_slice())
                .context("cannot write table shares")?;
            Ok(())
        })
        .await
    }

    async fn remove_share(&self, share: &Share) -> Result<bool, StoreError> {
        let vm = share.vm.as_u64();
        let key = share_key(share)?;
        self.write("remove_share", move |txn| {
            let mut shares = txn.open_table(SHARES).context("cannot open table shares")?;
            let removed = shares
                .remove((vm, key.as_str()))
                .context("cannot write table shares")?;
            Ok(removed.is_some())
        })
        .await
    }

    async fn shares(&self, vm: VmId) -> Result<Vec<Share>, StoreError> {
        self.read("shares", move |txn| {
            let shares = txn.open_table(SHARES).context("cannot open table shares")?;
            Ok(shares_of(&shares, vm.as_u64())?
                .into_iter()
                .map(|(_, share)| share)
                .collect())
        })
        .await
    }

    // ---- custom domains ----

    async fn put_domain(&self, domain: &CustomDomain) -> Result<(), StoreError> {
        let key = domain.host.clone();
        let bytes = encode(domain, "a custom domain")?;
        self.write("put_domain", move |txn| {
            txn.open_table(DOMAINS)
                .context("cannot open table domains")?
                .insert(key.as_str(), bytes.as_slice())
                .context("cannot write table domains")?;
            Ok(())
        })
        .await
    }

    async fn get_domain(&self, host: &str) -> Result<Option<CustomDomain>, StoreError> {
        let key = host.to_owned();
        self.read("get_domain", move |txn| {
            record_at(txn, DOMAINS, &key, format_args!("custom domain {key}"))
        })
        .await
    }

    async fn list_domains(&self, vm: Option<VmId>) -> Result<Vec<CustomDomain>, StoreError> {
        self.read("list_domains", move |txn| {
            let domains = txn
                .open_table(DOMAINS)
                .context("cannot open table domains")?;
            let mut out = Vec::new();
            for entry in domains.iter().context("cannot read table domains")? {
                let (host, bytes) = entry.context("cannot read table domains")?;
                let domain: CustomDomain = decode(
                    bytes.value(),
                    format_args!("custom domain {}", host.value()),
                )?;
                if vm.is_none_or(|v| domain.vm == v) {
                    out.push(domain);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn remove_domain(&self, host: &str) -> Result<bool, StoreError> {
        let key = host.to_owned();
        self.write("remove_domain", move |txn| {
            let mut domains = txn
                .open_table(DOMAINS)
                .context("cannot open table domains")?;
            let removed = domains
                .remove(key.as_str())
                .context("cannot write table domains")?;
            Ok(removed.is_some())
        })
        .await
    }

    // ---- IP leases ----

    async fn allocate_lease(&self, vm: VmId, pool: &IpPool) -> Result<IpLease, StoreError> {
        let pool = *pool;
        self.write("allocate_lease", move |txn| allocate(txn, vm, &pool))
            .await
    }

    async fn release_lease(&self, vm: VmId) -> Result<bool, StoreError> {
        self.write("release_lease", move |txn| {
            let mut by_vm = txn
                .open_table(LEASE_BY_VM)
                .context("cannot open table lease_by_vm")?;
            let Some(ip) = by_vm
                .remove(vm.as_u64())
                .context("cannot write table lease_by_vm")?
                .map(|ip| ip.value())
            else {
                return Ok(false);
            };
            let mut leases = txn.open_table(LEASES).context("cannot open table leases")?;
            leases.remove(ip).context("cannot write table leases")?;
            Ok(true)
        })
        .await
    }

    async fn list_leases(&self) -> Result<Vec<IpLease>, StoreError> {
        self.read("list_leases", |txn| {
            let leases = txn.open_table(LEASES).context("cannot open table leases")?;
            let mut out = Vec::new();
            for entry in leases.iter().context("cannot read table leases")? {
                let (ip, bytes) = entry.context("cannot read table leases")?;
                out.push(decode(
                    bytes.value(),
                    format_args!("the lease of {}", Ipv4Addr::from(ip.value())),
                )?);
            }
            Ok(out)
        })
        .await
    }

    // ---- VMM uids ----

    async fn allocate_uid(&self, vm: VmId, range: &UidRange) -> Result<u32, StoreError> {
        let range = *range;
        self.write("allocate_uid", move |txn| allocate_uid(txn, vm, &range))
            .await
    }

    async fn release_uid(&self, vm: VmId) -> Result<bool, StoreError> {
        self.write("release_uid", move |txn| {
            let mut by_vm = txn
                .open_table(UID_BY_VM)
                .context("cannot open table uid_by_vm")?;
            let Some(uid) = by_vm
                .remove(vm.as_u64())
                .context("cannot write table uid_by_vm")?
                .map(|uid| uid.value())
            else {
                return Ok(false);
            };
            let mut uids = txn.open_table(UIDS).context("cannot open table uids")?;
            uids.remove(uid).context("cannot write table uids")?;
            Ok(true)
        })
        .await
    }

    async fn list_uids(&self) -> Result<Vec<(VmId, u32)>, StoreError> {
        self.read("list_uids", |txn| {
            let uids = txn.open_table(UIDS).context("cannot open table uids")?;
            let mut out = Vec::new();
            for entry in uids.iter().context("cannot read table uids")? {
                let (uid, vm) = entry.context("cannot read table uids")?;
                out.push((VmId::from_u64(vm.value()), uid.value()));
            }
            Ok(out)
        })
        .await
    }

    // ---- API keys ----

    async fn put_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        let id = key.id.clone();
        let bytes = encode(key, "an API key")?;
        self.write("put_api_key", move |txn| {
            let mut keys = txn
                .open_table(API_KEYS)
                .context("cannot open table api_keys")?;
            keys.insert(id.as_str(), bytes.as_slice())
                .context("cannot write table api_keys")?;
            Ok(())
        })
        .await
    }

    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let id = id.to_owned();
        self.read("get_api_key", move |txn| {
            let keys = txn
                .open_table(API_KEYS)
                .context("cannot open table api_keys")?;
            let Some(bytes) = keys
                .get(id.as_str())
                .context("cannot read table api_keys")?
            else {
                return Ok(None);
            };
            decode(bytes.value(), format_args!("API key {id}")).map(Some)
        })
        .await
    }

    async fn delete_api_key(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write("delete_api_key", move |txn| {
            let mut keys = txn
                .open_table(API_KEYS)
                .context("cannot open table api_keys")?;
            let removed = keys
                .remove(id.as_str())
                .context("cannot write table api_keys")?;
            Ok(removed.is_some())
        })
        .await
    }

    async fn record_api_key_use(&self, id: &str, at: Timestamp) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write("record_api_key_use", move |txn| {
            let mut keys = txn
                .open_table(API_KEYS)
                .context("cannot open table api_keys")?;
            let Some(mut key) = keys
                .get(id.as_str())
                .context("cannot read table api_keys")?
                .map(|bytes| decode::<ApiKey>(bytes.value(), format_args!("API key {id}")))
                .transpose()?
            else {
                return Ok(false);
            };
            key.last_used_at = Some(at);
            let bytes = encode(&key, "an API key")?;
            keys.insert(id.as_str(), bytes.as_slice())
                .context("cannot write table api_keys")?;
            Ok(true)
        })
        .await
    }

    /// A scan of the table: a user has a few keys and the host a few users' worth,
    /// so no index by user is kept (and none to migrate).
    async fn list_api_keys(&self, user: UserId) -> Result<Vec<ApiKey>, StoreError> {
        self.read("list_api_keys", move |txn| {
            let keys = txn
                .open_table(API_KEYS)
                .context("cannot open table api_keys")?;
            let mut out = Vec::new();
            for entry in keys.iter().context("cannot read table api_keys")? {
                let (id, bytes) = entry.context("cannot read table api_keys")?;
                let key: ApiKey = decode(bytes.value(), format_args!("API key {}", id.value()))?;
                if key.user == user {
                    out.push(key);
                }
            }
            Ok(out)
        })
        .await
    }

    // ---- snapshots ----

    async fn put_snapshot(&self, snapshot: &Snapshot, quota: &Quota) -> Result<(), StoreError> {
        let name = snapshot.name.clone();
        let bytes = encode(snapshot, "a snapshot")?;
        let snapshot = snapshot.clone();
        let quota = *quota;
        self.write("put_snapshot", move |txn| {
            let before = usage_in(txn, snapshot.owner, None)?;
            let mut after = before;
            after.add_snapshot(&snapshot);
            let mut table = txn
                .open_table(SNAPSHOTS)
                .context("cannot open table snapshots")?;
            if table
                .get(name.as_str())
                .context("cannot read table snapshots")?
                .is_some()
            {
                return Err(StoreError::SnapshotTaken(name));
            }
            quota.check_change(&before, &after)?;
            table
                .insert(name.as_str(), bytes.as_slice())
                .context("cannot write table snapshots")?;
            Ok(())
        })
        .await
    }

    async fn get_snapshot(&self, name: &VmName) -> Result<Option<Snapshot>, StoreError> {
        let name = name.clone();
        self.read("get_snapshot", move |txn| {
            let table = txn
                .open_table(SNAPSHOTS)
                .context("cannot open table snapshots")?;
            let Some(bytes) = table
                .get(name.as_str())
                .context("cannot read table snapshots")?
            else {
                return Ok(None);
            };
            decode(bytes.value(), format_args!("snapshot {name}")).map(Some)
        })
        .await
    }

    async fn list_snapshots(&self, owner: Option<UserId>) -> Result<Vec<Snapshot>, StoreError> {
        self.read("list_snapshots", move |txn| {
            let table = txn
                .open_table(SNAPSHOTS)
                .context("cannot open table snapshots")?;
            let mut out = Vec::new();
            for entry in table.iter().context("cannot read table snapshots")? {
                let (name, bytes) = entry.context("cannot read table snapshots")?;
                let snapshot: Snapshot =
                    decode(bytes.value(), format_args!("snapshot {}", name.value()))?;
                if owner.is_none_or(|o| snapshot.owner == o) {
                    out.push(snapshot);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn update_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let name = snapshot.name.clone();
        let bytes = encode(snapshot, "a snapshot")?;
        self.write("update_snapshot", move |txn| {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .context("cannot open table snapshots")?;
            if table
                .get(name.as_str())
                .context("cannot read table snapshots")?
                .is_none()
            {
                return Err(StoreError::NotFound(format!("snapshot {name}")));
            }
            table
                .insert(name.as_str(), bytes.as_slice())
                .context("cannot write table snapshots")?;
            Ok(())
        })
        .await
    }

    async fn delete_snapshot(&self, name: &VmName) -> Result<bool, StoreError> {
        let name = name.clone();
        self.write("delete_snapshot", move |txn| {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .context("cannot open table snapshots")?;
            let removed = table
                .remove(name.as_str())
                .context("cannot write table snapshots")?;
            Ok(removed.is_some())
        })
        .await
    }

    // ---- invites ----

    async fn put_invite(&self, invite: &Invite) -> Result<(), StoreError> {
        let id = invite.id.clone();
        let bytes = encode(invite, "an invite")?;
        self.write("put_invite", move |txn| {
            let mut invites = txn
                .open_table(INVITES)
                .context("cannot open table invites")?;
            invites
                .insert(id.as_str(), bytes.as_slice())
                .context("cannot write table invites")?;
            Ok(())
        })
        .await
    }

    async fn list_invites(&self) -> Result<Vec<Invite>, StoreError> {
        self.read("list_invites", |txn| {
            let invites = txn
                .open_table(INVITES)
                .context("cannot open table invites")?;
            let mut out = Vec::new();
            for entry in invites.iter().context("cannot read table invites")? {
                let (id, bytes) = entry.context("cannot read table invites")?;
                out.push(decode(
                    bytes.value(),
                    format_args!("invite {}", id.value()),
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_invite(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write("delete_invite", move |txn| {
            let mut invites = txn
                .open_table(INVITES)
                .context("cannot open table invites")?;
            let removed = invites
                .remove(id.as_str())
                .context("cannot write table invites")?;
            Ok(removed.is_some())
        })
        .await
    }

    async fn consume_invite(
        &self,
        secret: &str,
        now: Timestamp,
    ) -> Result<Option<Invite>, StoreError> {
        let secret = secret.to_owned();
        self.write("consume_invite", move |txn| {
            let mut invites = txn
                .open_table(INVITES)
                .context("cannot open table invites")?;
            // Every invite is compared, so the time taken does not say which matched.
            let mut found = None;
            for entry in invites.iter().context("cannot read table invites")? {
                let (id, bytes) = entry.context("cannot read table invites")?;
                let invite: Invite = decode(bytes.value(), format_args!("invite {}", id.value()))?;
                if invite.hash.matches(&secret) {
                    found = Some(invite);
                }
            }
            let Some(invite) = found else {
                return Ok(None);
            };
            invites
                .remove(invite.id.as_str())
                .context("cannot write table invites")?;
            Ok((!invite.is_expired(now)).then_some(invite))
        })
        .await
    }

    // ---- web tokens ----

    async fn put_web_token(&self, token: &WebToken) -> Result<(), StoreError> {
        let key = token.hash.to_hex();
        let bytes = encode(token, "a web token")?;
        self.write("put_web_token", move |txn| {
            let mut tokens = txn
                .open_table(WEB_TOKENS)
                .context("cannot open table web_tokens")?;
            tokens
                .insert(key.as_str(), bytes.as_slice())
                .context("cannot write table web_tokens")?;
            Ok(())
        })
        .await
    }

    async fn get_web_token(&self, hash: &TokenHash) -> Result<Option<WebToken>, StoreError> {
        let key = hash.to_hex();
        self.read("get_web_token", move |txn| {
            record_at(txn, WEB_TOKENS, &key, format_args!("web token {key}"))
        })
        .await
    }

    async fn take_web_token(&self, hash: &TokenHash) -> Result<Option<WebToken>, StoreError> {
        let key = hash.to_hex();
        self.write("take_web_token", move |txn| {
            let mut tokens = txn
                .open_table(WEB_TOKENS)
                .context("cannot open table web_tokens")?;
            let removed = tokens
                .remove(key.as_str())
                .context("cannot write table web_tokens")?;
            match removed {
                Some(bytes) => Ok(Some(decode(
                    bytes.value(),
                    format_args!("web token {key}"),
                )?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn delete_web_tokens(
        &self,
        user: UserId,
        parent: Option<&TokenHash>,
    ) -> Result<usize, StoreError> {
        let parent = parent.copied();
        self.write("delete_web_tokens", move |txn| {
            retain_web_tokens(txn, |t| {
                t.user != user || (parent.is_some() && t.parent != parent)
            })
        })
        .await
    }

    async fn purge_web_tokens(&self, now: Timestamp) -> Result<usize, StoreError> {
        self.write("purge_web_tokens", move |txn| {
            retain_web_tokens(txn, |t| !t.is_expired(now))
        })
        .await
    }

    // ---- events ----

    async fn append_event(
        &self,
        event: NewEvent,
        retention: &EventRetention,
    ) -> Result<Event, StoreError> {
        let retention = *retention;
        self.write("append_event", move |txn| append_in(txn, event, &retention))
            .await
    }

    async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read("events", move |txn| {
            let events = txn.open_table(EVENTS).context("cannot open table events")?;
            let mut out = Vec::new();
            let range = events
                .range::<u64>((Bound::Excluded(after), Bound::Unbounded))
                .context("cannot read table events")?;
            for entry in range.take(limit) {
                let (seq, bytes) = entry.context("cannot read table events")?;
                out.push(decode(
                    bytes.value(),
                    format_args!("event {}", seq.value()),
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.read("last_event_seq", |txn| {
            let events = txn.open_table(EVENTS).context("cannot open table events")?;
            Ok(events
                .last()
                .context("cannot read table events")?
                .map_or(0, |(seq, _)| seq.value()))
        })
        .await
    }

    async fn first_event_seq(&self) -> Result<u64, StoreError> {
        self.read("first_event_seq", |txn| {
            let events = txn.open_table(EVENTS).context("cannot open table events")?;
            Ok(events
                .first()
                .context("cannot read table events")?
                .map_or(1, |(seq, _)| seq.value()))
        })
        .await
    }
}
