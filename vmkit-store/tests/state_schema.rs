//! The state file's schema version: stamping, migration, refusal; corrupt records.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, TableDefinition};
use vmkit_core::{
    Access, Handle, IpLease, IpPool, Quota, Role, Share, ShareTarget, StateStore, StoreError, User,
    UserId, UserStatus, VmId, VmName, VmRecord, VmSpec, WebSessions,
};
use vmkit_store::RedbStore;

const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
const VMS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("vms");
const LEASES: TableDefinition<'static, u32, &[u8]> = TableDefinition::new("leases");
const USERS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("users");
const WEB_TOKENS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("web_tokens");
const DOMAINS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("domains");

fn stored_version(path: &Path) -> Option<u64> {
    let db = Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).ok()?;
    meta.get("schema_version").unwrap().map(|v| v.value())
}

fn vm(name: &str) -> VmRecord {
    VmRecord::new(VmName::new(name).unwrap(), UserId(1), VmSpec::new("tiny"))
}

#[test]
fn current_schema_version_is_six() {
    assert_eq!(RedbStore::SCHEMA_VERSION, 6);
}

#[tokio::test]
async fn a_version_one_file_gains_the_snapshots_table_and_keeps_its_vms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        store
            .create_vm(&vm("web"), &Quota::unlimited())
            .await
            .unwrap();
    }
    // Make it a version-1 file: no snapshots table, stamped 1.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        const SNAPSHOTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("snapshots");
        assert!(txn.delete_table(SNAPSHOTS).unwrap());
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), RedbStore::SCHEMA_VERSION);
    assert!(store.list_snapshots(None).await.unwrap().is_empty());
    assert_eq!(store.list_vms(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_version_two_file_gains_the_uid_tables_and_keeps_its_vms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let web = vm("web");
    {
        let store = RedbStore::open(&path).unwrap();
        store.create_vm(&web, &Quota::unlimited()).await.unwrap();
    }
    // Make it a version-2 file: no uid tables, stamped 2.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        const UIDS: TableDefinition<'static, u32, u64> = TableDefinition::new("uids");
        const UID_BY_VM: TableDefinition<'static, u64, u32> = TableDefinition::new("uid_by_vm");
        assert!(txn.delete_table(UIDS).unwrap());
        assert!(txn.delete_table(UID_BY_VM).unwrap());
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", 2)
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), RedbStore::SCHEMA_VERSION);
    assert!(store.list_uids().await.unwrap().is_empty());
    let range = vmkit_core::UidRange::new(70_000, 10).unwrap();
    assert_eq!(store.allocate_uid(web.id, &range).await.unwrap(), 70_000);
    assert_eq!(store.list_vms(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_version_four_file_gains_web_sessions_and_domains_and_keeps_its_shares() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let web = vm("web");
    let public = Share::new(web.id, ShareTarget::Public, Access::Http);
    {
        let store = RedbStore::open(&path).unwrap();
        store.create_vm(&web, &Quota::unlimited()).await.unwrap();
        // Shares of every port are what version 4 stored: keyed without a port.
        store.put_share(&public).await.unwrap();
    }
    // Make it a version-4 file: no web_tokens or domains table, stamped 4.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        assert!(txn.delete_table(WEB_TOKENS).unwrap());
        assert!(txn.delete_table(DOMAINS).unwrap());
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", 4)
            .unwrap();
        txn.commit().unwrap();
    }

    let redb = RedbStore::open(&path).unwrap();
    assert_eq!(redb.schema_version().unwrap(), RedbStore::SCHEMA_VERSION);
    let store: Arc<dyn StateStore> = Arc::new(redb);
    let shares = store.shares(web.id).await.unwrap();
    assert_eq!(shares.len(), 1);
    assert!(shares[0].port.is_none() && shares[0].target == ShareTarget::Public);
    // The old share is still the one a per-port share beside it does not replace.
    store
        .put_share(&public.clone().of_port(8080))
        .await
        .unwrap();
    assert_eq!(store.shares(web.id).await.unwrap().len(), 2);
    assert!(store.remove_share(&public).await.unwrap());

    // Browser sign-in works on the migrated file.
    let ada = store
        .create_user(&User::new(UserId(0), Handle::new("ada").unwrap()), None)
        .await
        .unwrap();
    let sessions = WebSessions::new(store.clone());
    let link = sessions.sign_in_link(ada.id).await.unwrap();
    let (_session, who) = sessions.redeem_sign_in_link(&link).await.unwrap().unwrap();
    assert_eq!(who.id, ada.id);
    assert!(sessions.redeem_sign_in_link(&link).await.unwrap().is_none());

    // And custom domains.
    let app = vmkit_core::CustomDomain::new("app.example.com", web.id, web.owner);
    store.put_domain(&app).await.unwrap();
    assert_eq!(
        store.get_domain("app.example.com").await.unwrap(),
        Some(app)
    );
}

/// Writes `records` (JSON) into the users table and stamps the file 3, dropping the
/// tables of versions 4 to 6.
fn make_version_3(path: &Path, records: &[(u64, &str)]) {
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    const HANDLES: TableDefinition<'static, &str, u64> = TableDefinition::new("user_handles");
    const INVITES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("invites");
    assert!(txn.delete_table(HANDLES).unwrap());
    assert!(txn.delete_table(INVITES).unwrap());
    assert!(txn.delete_table(WEB_TOKENS).unwrap());
    assert!(txn.delete_table(DOMAINS).unwrap());
    {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert("schema_version", 3).unwrap();
        meta.remove("next_user_id").unwrap();
        let mut users = txn.open_table(USERS).unwrap();
        for (id, json) in records {
            users.insert(*id, json.as_bytes()).unwrap();
        }
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn version_three_users_get_handles_from_their_names_and_keep_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(RedbStore::open(&path).unwrap());
    make_version_3(
        &path,
        &[
            (0, r#"{"id":0,"name":"local","email":null,"created_at":5}"#),
            (
                2,
                r#"{"id":2,"name":"ada","email":"ada@example.com","created_at":6}"#,
            ),
            (
                3,
                r#"{"id":3,"name":"Grace Hopper","email":null,"created_at":7}"#,
            ),
            (4, r#"{"id":4,"name":"ada","email":null,"created_at":8}"#),
            (9, r#"{"id":9,"name":"root","email":null,"created_at":9}"#),
        ],
    );

    let store = RedbStore::open(&path).unwrap();

    assert_eq!(store.schema_version().unwrap(), RedbStore::SCHEMA_VERSION);
    let users = store.list_users().await.unwrap();
    let handles: Vec<_> = users
        .iter()
        .map(|u| (u.id.0, u.handle.to_string()))
        .collect();
    assert_eq!(
        handles,
        [
            (0, "local".to_owned()),
            (2, "ada".to_owned()),
            (3, "u3".to_owned()),
            (4, "u4".to_owned()),
            (9, "u9".to_owned()),
        ],
        "a valid name is the handle; an invalid, reserved or second one becomes u<ID>"
    );
    let ada = &users[1];
    assert_eq!(ada.email.as_deref(), Some("ada@example.com"));
    assert_eq!((ada.role, ada.status), (Role::User, UserStatus::Active));
    assert_eq!(
        store.user_by_handle(&ada.handle).await.unwrap().as_ref(),
        Some(ada),
        "the handle index was built"
    );
    assert!(matches!(
        store
            .create_user(&User::new(UserId(0), Handle::new("ada").unwrap()), None)
            .await,
        Err(StoreError::HandleTaken(_))
    ));
    let new = store
        .create_user(&User::new(UserId(0), Handle::new("eve").unwrap()), None)
        .await
        .unwrap();
    assert_eq!(new.id, UserId(10), "new ids start above the old ones");
    assert!(store.list_invites().await.unwrap().is_empty());
}

#[test]
fn a_new_file_is_stamped_with_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");

    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), RedbStore::SCHEMA_VERSION);
    drop(store);

    assert_eq!(stored_version(&path), Some(RedbStore::SCHEMA_VERSION));
}

#[tokio::test]
async fn a_version_0_file_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v0.redb");
    let pool = IpPool::new("10.44.0.0/24".parse().unwrap()).unwrap();
    let old = vm("old-timer");
    let other = vm("other");
    let lease = IpLease::new(old.id, Ipv4Addr::new(10, 44, 0, 2), &pool);
    let user = User::new(UserId(1), Handle::new("ann").unwrap());
    {
        // Version 0 by hand: primary tables only, no indexes, no meta table.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut vms = txn.open_table(VMS).unwrap();
            for v in [&old, &other] {
                vms.insert(v.id.as_u64(), serde_json::to_vec(v).unwrap().as_slice())
                    .unwrap();
            }
            let mut leases = txn.open_table(LEASES).unwrap();
            leases
                .insert(
                    u32::from(lease.ip),
                    serde_json::to_vec(&lease).unwrap().as_slice(),
                )
                .unwrap();
            let mut users = txn.open_table(USERS).unwrap();
            users
                .insert(1, serde_json::to_vec(&user).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    assert_eq!(stored_version(&path), None);

    let store = RedbStore::open(&path).unwrap();

    assert_eq!(store.schema_version().unwrap(), RedbStore::SCHEMA_VERSION);
    assert_eq!(
        store.get_vm(&old.name).await.unwrap(),
        Some(old.clone()),
        "the name index was built"
    );
    let names: Vec<_> = store
        .list_vms(None)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    assert_eq!(names, ["old-timer", "other"]);
    assert!(matches!(
        store.create_vm(&vm("other"), &Quota::unlimited()).await,
        Err(StoreError::NameTaken(_))
    ));
    assert_eq!(
        store.allocate_lease(old.id, &pool).await.unwrap(),
        lease,
        "the lease index was built"
    );
    assert_eq!(
        store
            .allocate_lease(VmId::generate(), &pool)
            .await
            .unwrap()
            .ip,
        Ipv4Addr::new(10, 44, 0, 3),
        "the migrated lease stays taken"
    );
    assert_eq!(store.get_user(UserId(1)).await.unwrap(), Some(user));
    drop(store);
    assert_eq!(stored_version(&path), Some(RedbStore::SCHEMA_VERSION));
}

#[test]
fn a_file_from_a_newer_vmkit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(RedbStore::open(&path).unwrap());
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", RedbStore::SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }

    let err = RedbStore::open(&path).unwrap_err();

    assert!(
        matches!(
            err,
            StoreError::SchemaTooNew { found, supported }
                if found == RedbStore::SCHEMA_VERSION + 1 && supported == RedbStore::SCHEMA_VERSION
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade vmkit"), "{err}");
    assert_eq!(
        stored_version(&path),
        Some(RedbStore::SCHEMA_VERSION + 1),
        "the refused file is left as it was"
    );
}

#[tokio::test]
async fn a_record_that_does_not_decode_is_reported_corrupt_with_what_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(RedbStore::open(&path).unwrap());
    let id = VmId::generate();
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(VMS)
            .unwrap()
            .insert(id.as_u64(), b"{not json".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();

    let err = store.get_vm_by_id(id).await.unwrap_err();

    let StoreError::Corrupt(what) = &err else {
        panic!("expected Corrupt, got {err:?}");
    };
    assert!(what.contains(&id.to_string()), "{what}");
    assert!(what.contains("get_vm_by_id"), "{what}");
}

#[test]
fn a_file_that_is_not_a_database_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();

    let err = RedbStore::open(&path).unwrap_err();

    assert!(
        matches!(err, StoreError::Corrupt(_) | StoreError::Backend { .. }),
        "{err:?}"
    );
}

#[test]
fn a_file_in_a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope").join("s.redb");

    let err = RedbStore::open(&path).unwrap_err();

    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn the_state_file_is_private_to_its_owner_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(&path).unwrap();
    drop(RedbStore::open(&path).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the VMMs' uids must not read the state file");
}
