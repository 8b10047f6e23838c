//! Schema versions and the migrations between them.
//!
//! The file's layout version is stored in the `meta` table under `schema_version`.
//! [`MIGRATIONS`]`[n]` takes a file from version `n` to `n + 1`; on open, every step
//! from the file's version to [`CURRENT`] runs in **one** write transaction that also
//! stamps the new version, so a crash or an error part-way leaves the file as it was.
//!
//! Version 0 is a file without a stamp: a new, empty file, or one written before the
//! layout was versioned, which held the primary tables (`vms`, `leases`, ...) without
//! the `vm_names` and `lease_by_vm` indexes.

use redb::{Database, ReadableTable, WriteTransaction};
use vmkit_core::{Handle, IpLease, StoreError, User, VmRecord};

use super::tables::{
    API_KEYS, Context, DOMAINS, EVENTS, INVITES, LEASE_BY_VM, LEASES, META, NEXT_USER_ID_KEY,
    QUOTAS, SCHEMA_VERSION_KEY, SHARES, SNAPSHOTS, SSH_KEYS, UID_BY_VM, UIDS, USER_HANDLES, USERS,
    VM_NAMES, VMS, WEB_TOKENS, decode, encode,
};

/// One migration step: changes the layout of version `n` into that of `n + 1`.
pub(super) type Migration = fn(&WriteTransaction) -> Result<(), StoreError>;

/// Every step, in order: entry `n` migrates from version `n`.
pub(super) const MIGRATIONS: &[Migration] =
    &[v0_to_v1, v1_to_v2, v2_to_v3, v3_to_v4, v4_to_v5, v5_to_v6];

/// The layout version this build writes.
pub(super) const CURRENT: u64 = MIGRATIONS.len() as u64;

/// Brings the file up to [`CURRENT`], or refuses a file written by a newer vmkit.
pub(super) fn migrate(db: &Database) -> Result<(), StoreError> {
    let txn = db
        .begin_write()
        .context("cannot begin the schema transaction")?;
    let found = stored_version(&txn)?;
    if found == CURRENT {
        // Nothing to change; do not rewrite the file on every open.
        return txn.abort().context("cannot end the schema transaction");
    }
    // Dropping `txn` on an error below aborts it.
    run(&txn, found, MIGRATIONS)?;
    txn.commit().context("cannot commit the schema migration")?;
    tracing::info!(from = found, to = CURRENT, "migrated the state file");
    Ok(())
}

/// The version stamped in the file; 0 when there is none.
pub(super) fn stored_version(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META).context("cannot open table meta")?;
    let version = meta
        .get(SCHEMA_VERSION_KEY)
        .context("cannot read the schema version")?
        .map(|v| v.value());
    Ok(version.unwrap_or(0))
}

/// Runs `steps[from..]` in `txn` and stamps the version they lead to.
pub(super) fn run(
    txn: &WriteTransaction,
    from: u64,
    steps: &[Migration],
) -> Result<(), StoreError> {
    let supported = steps.len() as u64;
    if from > supported {
        return Err(StoreError::SchemaTooNew {
            found: from,
            supported,
        });
    }
    // `from <= steps.len()`, so the index is in bounds.
    for (version, step) in steps.iter().enumerate().skip(from as usize) {
        tracing::debug!(from = version, "running state file migration");
        step(txn)?;
    }
    let mut meta = txn.open_table(META).context("cannot open table meta")?;
    meta.insert(SCHEMA_VERSION_KEY, supported)
        .context("cannot write the schema version")?;
    Ok(())
}

/// 0 → 1: creates every table of version 1 and builds the name and lease indexes from
/// the primary tables.
fn v0_to_v1(txn: &WriteTransaction) -> Result<(), StoreError> {
    // Opening a table in a write transaction creates it.
    txn.open_table(USERS).context("cannot create table users")?;
    txn.open_table(SSH_KEYS)
        .context("cannot create table ssh_keys")?;
    txn.open_table(QUOTAS)
        .context("cannot create table quotas")?;
    txn.open_table(SHARES)
        .context("cannot create table shares")?;
    txn.open_table(API_KEYS)
        .context("cannot create table api_keys")?;
    txn.open_table(EVENTS)
        .context("cannot create table events")?;

    let vms = txn.open_table(VMS).context("cannot open table vms")?;
    let mut names = txn
        .open_table(VM_NAMES)
        .context("cannot create table vm_names")?;
    for entry in vms.iter().context("cannot read table vms")? {
        let (id, bytes) = entry.context("cannot read table vms")?;
        let vm: VmRecord = decode(bytes.value(), format_args!("VM {:016x}", id.value()))?;
        let previous = names
            .insert(vm.name.as_str(), id.value())
            .context("cannot write table vm_names")?;
        if let Some(other) = previous {
            return Err(StoreError::Corrupt(format!(
                "VMs {:016x} and {} are both named {}",
                other.value(),
                vm.id,
                vm.name
            )));
        }
    }

    let leases = txn.open_table(LEASES).context("cannot open table leases")?;
    let mut by_vm = txn
        .open_table(LEASE_BY_VM)
        .context("cannot create table lease_by_vm")?;
    for entry in leases.iter().context("cannot read table leases")? {
        let (ip, bytes) = entry.context("cannot read table leases")?;
        let ip = std::net::Ipv4Addr::from(ip.value());
        let lease: IpLease = decode(bytes.value(), format_args!("the lease of {ip}"))?;
        let previous = by_vm
            .insert(lease.vm.as_u64(), u32::from(lease.ip))
            .context("cannot write table lease_by_vm")?;
        if let Some(other) = previous {
            return Err(StoreError::Corrupt(format!(
                "VM {} holds two leases, {} and {ip}",
                lease.vm,
                std::net::Ipv4Addr::from(other.value())
            )));
        }
    }
    Ok(())
}

/// 4 → 5: adds the web tokens table (browser sign-in).
fn v4_to_v5(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(WEB_TOKENS)
        .context("cannot create table web_tokens")?;
    Ok(())
}

/// 5 → 6: adds the custom domains table.
fn v5_to_v6(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(DOMAINS)
        .context("cannot create table domains")?;
    Ok(())
}

/// 1 → 2: adds the snapshots table.
fn v1_to_v2(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SNAPSHOTS)
        .context("cannot create table snapshots")?;
    Ok(())
}

/// 2 → 3: adds the VMM uid table and its index.
fn v2_to_v3(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(UIDS).context("cannot create table uids")?;
    txn.open_table(UID_BY_VM)
        .context("cannot create table uid_by_vm")?;
    Ok(())
}

/// 3 → 4: users get handles, roles and statuses. Adds the invites table, the handle
/// index and the next user id; rewrites every user record in the new form. A user
/// whose old name is a valid handle keeps it as their handle, any other gets
/// `u<ID>` (the local operator's record `local`); of two users with one name, the
/// older (lower id) keeps it.
fn v3_to_v4(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(INVITES)
        .context("cannot create table invites")?;
    let mut users = txn.open_table(USERS).context("cannot open table users")?;
    let mut handles = txn
        .open_table(USER_HANDLES)
        .context("cannot create table user_handles")?;
    let mut records = Vec::new();
    for entry in users.iter().context("cannot read table users")? {
        let (id, bytes) = entry.context("cannot read table users")?;
        let user: User = decode(bytes.value(), format_args!("user {}", id.value()))?;
        records.push(user);
    }
    let mut next_id = 1;
    for mut user in records {
        let taken = |h: &Handle| -> Result<bool, StoreError> {
            Ok(handles
                .get(h.as_str())
                .context("cannot read table user_handles")?
                .is_some())
        };
        if taken(&user.handle)? {
            let numbered = Handle::numbered(user.id);
            let mut candidate = numbered.clone();
            let mut n = 1;
            while taken(&candidate)? {
                n += 1;
                candidate = Handle::try_from(format!("{numbered}-{n}"))
                    .map_err(|e| StoreError::Corrupt(format!("user {}: {e}", user.id)))?;
            }
            user.handle = candidate;
        }
        handles
            .insert(user.handle.as_str(), user.id.0)
            .context("cannot write table user_handles")?;
        users
            .insert(user.id.0, encode(&user, "a user")?.as_slice())
            .context("cannot write table users")?;
        next_id = u64::max(next_id, user.id.0.saturating_add(1));
    }
    let mut meta = txn.open_table(META).context("cannot open table meta")?;
    meta.insert(NEXT_USER_ID_KEY, next_id)
        .context("cannot write the next user id")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{ReadableDatabase, TableDefinition};

    use super::*;

    const MARK: TableDefinition<'static, &str, u64> = TableDefinition::new("mark");

    fn mark(txn: &WriteTransaction) -> Result<(), StoreError> {
        let mut t = txn.open_table(MARK).context("open mark")?;
        t.insert("step", 1).context("write mark")?;
        Ok(())
    }

    fn fail(_: &WriteTransaction) -> Result<(), StoreError> {
        Err(StoreError::Corrupt("this step fails".into()))
    }

    fn version(db: &Database) -> Option<u64> {
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).ok()?;
        meta.get(SCHEMA_VERSION_KEY)
            .expect("get")
            .map(|v| v.value())
    }

    #[test]
    fn a_failing_step_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("s.redb")).expect("create");
        let txn = db.begin_write().expect("begin");
        let steps: &[Migration] = &[mark, fail];
        assert!(matches!(run(&txn, 0, steps), Err(StoreError::Corrupt(_))));
        drop(txn);

        assert_eq!(version(&db), None, "no version was stamped");
        let read = db.begin_read().expect("read");
        assert!(
            read.open_table(MARK).is_err(),
            "the first step's change was rolled back with the failing one"
        );
    }

    #[test]
    fn steps_run_from_the_stored_version_and_stamp_the_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("s.redb")).expect("create");
        let txn = db.begin_write().expect("begin");
        let steps: &[Migration] = &[fail, mark];
        run(&txn, 1, steps).expect("step 0 is skipped for a version-1 file");
        txn.commit().expect("commit");
        assert_eq!(version(&db), Some(2));
    }

    #[test]
    fn a_version_past_the_last_step_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("s.redb")).expect("create");
        let txn = db.begin_write().expect("begin");
        let past = CURRENT + 1;
        assert!(matches!(
            run(&txn, past, MIGRATIONS),
            Err(StoreError::SchemaTooNew {
                found,
                supported: CURRENT
            }) if found == past
        ));
    }
}
