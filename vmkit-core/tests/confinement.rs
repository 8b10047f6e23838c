#![allow(clippy::unwrap_used)]
//! The manager's side of VMM confinement, on the in-memory fakes: a uid per VM from
//! create to delete, handed to every VMM of the VM, never leaked by a failed or
//! interrupted create.

use std::collections::BTreeSet;

use vmkit_core::testing::FakeHost;
use vmkit_core::{
    ConfinementConfig, CreateRequest, DeleteOptions, ManagerConfig, ManagerError, StateStore,
    StoreError, UidRange, UserId, VmName, VmSpec,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

fn request(n: &str) -> CreateRequest {
    CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").disk_gib(1)).name(name(n))
}

fn confined(first: u32, count: u32) -> ManagerConfig {
    ManagerConfig::new("/nonexistent/vmkit").confinement(Some(
        ConfinementConfig::new().uids(UidRange::new(first, count).unwrap()),
    ))
}

/// The uids the store holds, with their VMs.
async fn held(host: &FakeHost) -> BTreeSet<(String, u32)> {
    let mut names = std::collections::HashMap::new();
    for vm in host.store.list_vms(None).await.unwrap() {
        names.insert(vm.id, vm.name.to_string());
    }
    host.store
        .list_uids()
        .await
        .unwrap()
        .into_iter()
        .map(|(vm, uid)| (names.get(&vm).cloned().unwrap_or(vm.to_string()), uid))
        .collect()
}

#[tokio::test]
async fn a_vm_holds_its_uid_from_create_to_delete_and_every_vmm_runs_as_it() {
    let host = FakeHost::with_config(confined(70_000, 4)).await;
    let web = host.manager.create(request("web")).await.unwrap();
    let db = host.manager.create(request("db")).await.unwrap();
    assert_eq!(web.resources.uid, Some(70_000));
    assert_eq!(db.resources.uid, Some(70_001));
    let vmm = web.resources.vmm.as_ref().unwrap();
    let confinement = host
        .hypervisor
        .machine_config(vmm.pid)
        .unwrap()
        .confinement
        .expect("the VMM is confined");
    assert_eq!((confinement.uid, confinement.gid), (70_000, 70_000));

    host.manager.stop(&name("web")).await.unwrap();
    let started = host.manager.start(&name("web")).await.unwrap();
    let vmm = started.resources.vmm.as_ref().unwrap();
    assert_eq!(
        host.hypervisor
            .machine_config(vmm.pid)
            .unwrap()
            .confinement
            .unwrap()
            .uid,
        70_000,
        "a stopped VM keeps its uid: its disks stay owned by it"
    );

    host.manager
        .delete(&name("web"), DeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        held(&host).await,
        BTreeSet::from([("db".to_owned(), 70_001)])
    );
    let next = host.manager.create(request("next")).await.unwrap();
    assert_eq!(
        next.resources.uid,
        Some(70_000),
        "a deleted VM's uid is reused"
    );
}

#[tokio::test]
async fn an_exhausted_range_refuses_the_create_and_leaves_nothing() {
    let host = FakeHost::with_config(confined(70_000, 1)).await;
    host.manager.create(request("one")).await.unwrap();
    let before = host.holdings().await;

    let err = host.manager.create(request("two")).await.unwrap_err();

    assert!(
        matches!(err, ManagerError::Store(StoreError::UidsExhausted(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("widen the range"), "{err}");
    assert_eq!(host.holdings().await, before);
    assert_eq!(
        held(&host).await,
        BTreeSet::from([("one".to_owned(), 70_000)])
    );
}

#[tokio::test]
async fn unconfined_vms_hold_no_uid() {
    let host = FakeHost::new().await;
    let vm = host.manager.create(request("free")).await.unwrap();
    assert_eq!(vm.resources.uid, None);
    let vmm = vm.resources.vmm.as_ref().unwrap();
    assert_eq!(
        host.hypervisor.machine_config(vmm.pid).unwrap().confinement,
        None
    );
    assert!(host.store.list_uids().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_confined_create_leaks_no_uid() {
    let probe = FakeHost::with_config(confined(70_000, 8)).await;
    probe.faults.reset();
    probe.manager.create(request("web")).await.unwrap();
    let steps = probe.faults.calls();
    for step in 1..=steps {
        let host = FakeHost::with_config(confined(70_000, 8)).await;
        host.manager.create(request("keep")).await.unwrap();
        host.faults.crash_at(step);
        let _ = host.manager.create(request("web")).await;
        host.faults.reset();

        let manager =
            vmkit_core::Manager::new(confined(70_000, 8), host.manager.backends().clone())
                .await
                .unwrap();
        manager.reconcile().await.unwrap();

        assert_eq!(
            held(&host).await,
            BTreeSet::from([("keep".to_owned(), 70_000)]),
            "crash at create step {step}: only the VM that exists holds a uid"
        );
    }
}

#[tokio::test]
async fn reconcile_gives_a_uid_to_a_vm_made_before_confinement_and_frees_orphans() {
    let host = FakeHost::new().await;
    host.manager.create(request("old")).await.unwrap();
    let orphan = vmkit_core::VmId::generate();
    host.store
        .allocate_uid(orphan, &UidRange::new(70_000, 8).unwrap())
        .await
        .unwrap();

    let manager = vmkit_core::Manager::new(confined(70_000, 8), host.manager.backends().clone())
        .await
        .unwrap();
    let report = manager.reconcile().await.unwrap();

    assert!(
        report.orphans.iter().any(|o| o.contains("uid 70000")),
        "{report:?}"
    );
    let old = manager.get(&name("old")).await.unwrap();
    assert_eq!(old.resources.uid, Some(70_000));
    assert_eq!(
        held(&host).await,
        BTreeSet::from([("old".to_owned(), 70_000)])
    );
}
