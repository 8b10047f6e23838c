//! RedbStore against the generic store suite, across reopen, and under concurrency.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use vmkit_core::testing::suites::{GatewayFixture, gateway_suite, store_suite};
use vmkit_core::{
    Access, ApiKey, EventKind, IpPool, NewEvent, Quota, Share, ShareTarget, SshPublicKey,
    StateStore, StoreError, User, UserId, VmId, VmName, VmRecord, VmSpec, VmState,
};
use vmkit_store::{RedbConfig, RedbStore};

fn key_line() -> SshPublicKey {
    // A real ed25519 public key.
    SshPublicKey::parse(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILCkWGIcqzUfwK2Ls1cyvWoL0Yu96sujsXIbpy6qXyQg alice@example",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    store_suite(|| {
        let path = dir
            .path()
            .join(format!("{}.redb", n.fetch_add(1, Ordering::SeqCst)));
        async move { Arc::new(RedbStore::open(path).unwrap()) as Arc<dyn StateStore> }
    })
    .await;
}

struct RedbGatewayFixture(Arc<RedbStore>);

#[async_trait::async_trait]
impl GatewayFixture for RedbGatewayFixture {
    fn domain(&self) -> &str {
        "vms.example.test"
    }
    async fn add_user(&self, user: &User, key: Option<&SshPublicKey>) {
        self.0.put_user(user).await.unwrap();
        if let Some(key) = key {
            self.0.add_ssh_key(user.id, key).await.unwrap();
        }
    }
    async fn add_api_key(&self, key: &ApiKey) {
        self.0.put_api_key(key).await.unwrap();
    }
    async fn add_vm(&self, vm: &VmRecord) {
        self.0.create_vm(vm, &Quota::unlimited()).await.unwrap();
    }
    async fn share(&self, vm: &VmRecord, target: ShareTarget, access: Access) {
        self.0
            .put_share(&Share::new(vm.id, target, access))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn store_gateway_on_redb_passes_the_gateway_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("g.redb")).unwrap());
    let gateway = vmkit_core::StoreGateway::new(store.clone(), "vms.example.test");
    gateway_suite(&gateway, &RedbGatewayFixture(store)).await;
}

#[tokio::test]
async fn redb_store_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    assert!(store.capabilities().durable);
}

#[tokio::test]
async fn everything_written_is_read_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let pool = IpPool::new("10.77.0.0/24".parse().unwrap()).unwrap();

    let user = User::new(UserId(3), vmkit_core::Handle::new("carol").unwrap());
    let quota = Quota::new(4, 8, 8192, 50);
    let mut vm = VmRecord::new(
        VmName::new("keeper").unwrap(),
        UserId(3),
        VmSpec::new("tiny"),
    );
    let share = Share::new(
        vm.id,
        ShareTarget::Link(vmkit_core::TokenHash::of("vms_tok")),
        Access::Http,
    );
    let api_key = ApiKey::new("k3", UserId(3), "vmk_abc");
    let (lease, first, second) = {
        let store = RedbStore::open(&path).unwrap();
        store.put_user(&user).await.unwrap();
        store.add_ssh_key(UserId(3), &key_line()).await.unwrap();
        store.set_quota(UserId(3), &quota).await.unwrap();
        store.create_vm(&vm, &quota).await.unwrap();
        vm.state = VmState::Running;
        store.update_vm(&vm).await.unwrap();
        store.put_share(&share).await.unwrap();
        let lease = store.allocate_lease(vm.id, &pool).await.unwrap();
        store.put_api_key(&api_key).await.unwrap();
        let first = store
            .append_event(
                NewEvent::vm(vm.id, &vm.name, EventKind::Creating),
                &vmkit_core::EventRetention::unlimited(),
            )
            .await
            .unwrap();
        let second = store
            .append_event(
                NewEvent::host(EventKind::Reconciled {
                    action: "nothing".into(),
                }),
                &vmkit_core::EventRetention::unlimited(),
            )
            .await
            .unwrap();
        (lease, first, second)
    };

    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.list_users().await.unwrap(), vec![user]);
    assert_eq!(store.ssh_keys(UserId(3)).await.unwrap(), vec![key_line()]);
    assert_eq!(
        store.user_by_key(&key_line().fingerprint()).await.unwrap(),
        Some(UserId(3))
    );
    assert_eq!(store.get_quota(UserId(3)).await.unwrap(), Some(quota));
    assert_eq!(store.get_vm(&vm.name).await.unwrap(), Some(vm.clone()));
    assert_eq!(store.get_vm_by_id(vm.id).await.unwrap(), Some(vm.clone()));
    assert_eq!(store.list_vms(None).await.unwrap(), vec![vm.clone()]);
    assert_eq!(store.shares(vm.id).await.unwrap(), vec![share]);
    assert_eq!(store.list_leases().await.unwrap(), vec![lease.clone()]);
    assert_eq!(
        store.allocate_lease(vm.id, &pool).await.unwrap(),
        lease,
        "the VM gets its lease back after a reopen"
    );
    assert_eq!(store.get_api_key("k3").await.unwrap(), Some(api_key));
    assert_eq!(
        store.events(0, 10).await.unwrap(),
        vec![first, second.clone()]
    );
    let third = store
        .append_event(
            NewEvent::host(EventKind::VmmExited),
            &vmkit_core::EventRetention::unlimited(),
        )
        .await
        .unwrap();
    assert_eq!(
        third.seq,
        second.seq + 1,
        "numbering continues after a reopen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_parallel_allocations_get_hundred_distinct_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
    let pool = IpPool::new("10.66.0.0/24".parse().unwrap()).unwrap();

    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.allocate_lease(VmId::generate(), &pool).await })
        })
        .collect();
    let mut ips = HashSet::new();
    for task in tasks {
        ips.insert(task.await.unwrap().unwrap().ip);
    }

    assert_eq!(ips.len(), 100);
    assert!(ips.iter().all(|ip| pool.subnet.contains(*ip)));
    assert_eq!(store.list_leases().await.unwrap().len(), 100);
}

#[tokio::test]
async fn lease_of_an_exhausted_pool_is_refused_and_a_held_one_returned() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    // A /30 holds one guest.
    let pool = IpPool::new("10.55.0.0/30".parse().unwrap()).unwrap();
    let holder = VmId::generate();
    let lease = store.allocate_lease(holder, &pool).await.unwrap();

    assert!(matches!(
        store.allocate_lease(VmId::generate(), &pool).await,
        Err(StoreError::PoolExhausted(_))
    ));
    assert_eq!(store.allocate_lease(holder, &pool).await.unwrap(), lease);
}

#[tokio::test]
async fn renaming_a_vm_moves_its_name_and_keeps_names_unique() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    let q = Quota::unlimited();
    let mut a = VmRecord::new(VmName::new("one").unwrap(), UserId(1), VmSpec::new("t"));
    let b = VmRecord::new(VmName::new("two").unwrap(), UserId(1), VmSpec::new("t"));
    store.create_vm(&a, &q).await.unwrap();
    store.create_vm(&b, &q).await.unwrap();

    a.name = VmName::new("two").unwrap();
    assert!(matches!(
        store.update_vm(&a).await,
        Err(StoreError::NameTaken(_))
    ));
    a.name = VmName::new("three").unwrap();
    store.update_vm(&a).await.unwrap();

    assert_eq!(
        store.get_vm(&VmName::new("one").unwrap()).await.unwrap(),
        None
    );
    assert_eq!(store.get_vm(&a.name).await.unwrap(), Some(a.clone()));
    store
        .create_vm(
            &VmRecord::new(VmName::new("one").unwrap(), UserId(1), VmSpec::new("t")),
            &q,
        )
        .await
        .expect("the old name is free again");
}

#[tokio::test]
async fn events_are_paged_after_a_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    for _ in 0..5 {
        store
            .append_event(
                NewEvent::host(EventKind::VmmExited),
                &vmkit_core::EventRetention::unlimited(),
            )
            .await
            .unwrap();
    }

    let seqs = |events: Vec<vmkit_core::Event>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.events(0, 2).await.unwrap()), [1, 2]);
    assert_eq!(seqs(store.events(2, 10).await.unwrap()), [3, 4, 5]);
    assert_eq!(seqs(store.events(5, 10).await.unwrap()), Vec::<u64>::new());
    assert_eq!(
        seqs(store.events(u64::MAX, 10).await.unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(seqs(store.events(0, 0).await.unwrap()), Vec::<u64>::new());
}

#[tokio::test]
async fn a_store_opened_with_integrity_check_on_open_reads_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let user = User::new(UserId(9), vmkit_core::Handle::new("ivy").unwrap());
    RedbStore::open(&path)
        .unwrap()
        .put_user(&user)
        .await
        .unwrap();

    let config = RedbConfig::new()
        .cache_size(1 << 20)
        .check_integrity_on_open(true);
    let store = RedbStore::open_with(&path, &config).unwrap();

    assert_eq!(store.get_user(UserId(9)).await.unwrap(), Some(user));
    assert_eq!(store.path(), path);
}
