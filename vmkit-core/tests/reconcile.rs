#![allow(clippy::unwrap_used)]
//! Reconcile on the in-memory fakes: a crash (every backend call failing from one
//! step on, undo steps included) at every step of every operation, then a fresh
//! manager's reconcile, must leave store and host in agreement.

use std::collections::BTreeSet;

use vmkit_core::testing::{FakeHost, Holdings};
use vmkit_core::{
    CreateRequest, DeleteOptions, EventKind, ExitPolicy, Hypervisor, Manager, ManagerConfig,
    Network, StateStore, Storage, UserId, VmName, VmSpec, VmState,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

fn request(n: &str) -> CreateRequest {
    CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").disk_gib(1)).name(name(n))
}

/// A new manager over the same backends: what a restarted daemon builds.
async fn restart(host: &FakeHost, config: ManagerConfig) -> Manager {
    host.faults.reset();
    Manager::new(config, host.manager.backends().clone())
        .await
        .unwrap()
}

/// Every resource is held by a record, and every record's resources exist.
async fn assert_consistent(host: &FakeHost, context: &str) {
    let vms = host.store.list_vms(None).await.unwrap();
    let volumes: BTreeSet<String> = host
        .storage
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    let taps: BTreeSet<_> = host.network.list().await.unwrap().into_iter().collect();
    let leases: BTreeSet<_> = host
        .store
        .list_leases()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.vm)
        .collect();
    let vmms: BTreeSet<u32> = host.hypervisor.running().into_iter().collect();

    let mut held_volumes = BTreeSet::new();
    let mut held_taps = BTreeSet::new();
    let mut held_leases = BTreeSet::new();
    let mut held_vmms = BTreeSet::new();
    for vm in &vms {
        assert!(
            !vm.state.is_transient(),
            "{context}: {} is left {}",
            vm.name,
            vm.state
        );
        for v in [&vm.resources.root, &vm.resources.data]
            .into_iter()
            .flatten()
        {
            assert!(
                volumes.contains(&v.id),
                "{context}: {} holds missing volume {}",
                vm.name,
                v.id
            );
            held_volumes.insert(v.id.clone());
        }
        if vm.resources.net.is_some() {
            assert!(taps.contains(&vm.id), "{context}: {} lost its TAP", vm.name);
            held_taps.insert(vm.id);
        }
        if vm.resources.lease.is_some() {
            assert!(
                leases.contains(&vm.id),
                "{context}: {} lost its lease",
                vm.name
            );
            held_leases.insert(vm.id);
        }
        match (&vm.resources.vmm, vm.state) {
            (Some(h), VmState::Running | VmState::Paused) => {
                assert!(
                    vmms.contains(&h.pid),
                    "{context}: {} is {} without its VMM",
                    vm.name,
                    vm.state
                );
                held_vmms.insert(h.pid);
            }
            (None, VmState::Stopped) => {}
            (vmm, state) => panic!("{context}: {} is {state} with VMM {vmm:?}", vm.name),
        }
    }
    assert_eq!(volumes, held_volumes, "{context}: orphaned volumes");
    assert_eq!(taps, held_taps, "{context}: orphaned TAPs");
    assert_eq!(leases, held_leases, "{context}: orphaned leases");
    assert_eq!(vmms, held_vmms, "{context}: orphaned VMMs");
}

async fn steps_of(op: impl AsyncFnOnce(&FakeHost)) -> u64 {
    let probe = FakeHost::new().await;
    probe.manager.create(request("keep")).await.unwrap();
    probe.faults.reset();
    op(&probe).await;
    let steps = probe.faults.calls();
    assert!(steps > 3, "an operation makes several backend calls");
    steps
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_create_is_rolled_back_by_reconcile() {
    let steps = steps_of(async |h| {
        h.manager.create(request("web")).await.unwrap();
    })
    .await;
    for step in 1..=steps {
        let host = FakeHost::new().await;
        host.manager.create(request("keep")).await.unwrap();
        host.faults.crash_at(step);
        let _ = host.manager.create(request("web")).await;

        let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
        let report = manager.reconcile().await.unwrap();
        let context = format!("crash at create step {step}");
        assert_consistent(&host, &context).await;
        assert_eq!(
            host.holdings().await,
            Holdings {
                vms: 1,
                volumes: 2,
                taps: 1,
                leases: 1,
                vmms: 1
            },
            "{context}: only the untouched VM remains ({report:?})"
        );
        assert_eq!(report.reattached, vec![name("keep")], "{context}");
        assert!(
            manager.get(&name("web")).await.is_err(),
            "{context}: the interrupted create is gone"
        );
        // The name is free and the host works.
        manager.create(request("web")).await.unwrap();
        let again = manager.reconcile().await.unwrap();
        assert!(again.is_clean(), "{context}: a second reconcile: {again:?}");
    }
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_delete_is_finished_by_reconcile() {
    let steps = steps_of(async |h| {
        h.manager
            .delete(&name("keep"), DeleteOptions::default())
            .await
            .unwrap();
    })
    .await;
    for step in 1..=steps {
        let host = FakeHost::new().await;
        host.manager.create(request("web")).await.unwrap();
        host.manager.create(request("other")).await.unwrap();
        host.faults.crash_at(step);
        let _ = host
            .manager
            .delete(&name("web"), DeleteOptions::default())
            .await;

        let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
        let report = manager.reconcile().await.unwrap();
        let context = format!("crash at delete step {step}");
        assert_consistent(&host, &context).await;
        // A crash before the delete recorded anything leaves the VM as it was;
        // once it is recorded, reconcile finishes it.
        match manager.get(&name("web")).await {
            Ok(vm) => assert_eq!(vm.state, VmState::Running, "{context}"),
            Err(_) => assert!(
                report.deleted.contains(&name("web")) || report.orphans.is_empty(),
                "{context}: {report:?}"
            ),
        }
        assert_eq!(
            manager.get(&name("other")).await.unwrap().state,
            VmState::Running,
            "{context}"
        );
    }
}

#[tokio::test]
async fn a_crash_during_stop_and_start_ends_with_the_vm_stopped() {
    for (op, steps) in [
        (
            "stop",
            steps_of(async |h| {
                h.manager.stop(&name("keep")).await.unwrap();
            })
            .await,
        ),
        (
            "start",
            steps_of(async |h| {
                h.manager.stop(&name("keep")).await.unwrap();
                h.manager.start(&name("keep")).await.unwrap();
            })
            .await,
        ),
    ] {
        for step in 1..=steps {
            let host = FakeHost::new().await;
            host.manager.create(request("web")).await.unwrap();
            if op == "start" {
                host.manager.stop(&name("web")).await.unwrap();
            }
            host.faults.crash_at(step);
            let _ = match op {
                "stop" => host.manager.stop(&name("web")).await,
                _ => host.manager.start(&name("web")).await,
            };
            let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
            manager.reconcile().await.unwrap();
            let context = format!("crash at {op} step {step}");
            assert_consistent(&host, &context).await;
            let state = manager.get(&name("web")).await.unwrap().state;
            assert!(
                matches!(state, VmState::Running | VmState::Stopped),
                "{context}: {state}"
            );
        }
    }
}

#[tokio::test]
async fn a_dead_vmm_is_stopped_or_listed_for_restart_per_policy() {
    for policy in [ExitPolicy::Stop, ExitPolicy::Restart] {
        let host = FakeHost::new().await;
        let vm = host.manager.create(request("web")).await.unwrap();
        let handle = vm.resources.vmm.clone().unwrap();
        host.hypervisor.kill(&handle).await.unwrap();

        let config = ManagerConfig::new("/nonexistent/vmkit").on_vmm_exit(policy);
        let manager = restart(&host, config).await;
        let report = manager.reconcile().await.unwrap();
        assert_eq!(report.stopped, vec![name("web")]);
        assert_eq!(
            report.to_restart,
            if policy == ExitPolicy::Restart {
                vec![name("web")]
            } else {
                vec![]
            }
        );
        let vm = manager.get(&name("web")).await.unwrap();
        assert_eq!(vm.state, VmState::Stopped);
        assert!(vm.resources.vmm.is_none());
        assert_consistent(&host, "after a VMM died").await;
        let events = manager.events(0, 1000).await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e.kind, EventKind::VmmExited) && e.vm == Some(vm.id)),
            "the death is an event"
        );
        manager.start(&name("web")).await.unwrap();
    }
}

#[tokio::test]
async fn orphans_without_a_record_are_removed_and_each_removal_is_an_event() {
    let data = tempfile::tempdir().unwrap();
    let config = ManagerConfig::new(data.path());
    let host = FakeHost::with_config(config.clone()).await;
    host.manager.create(request("web")).await.unwrap();
    // Resources of a VM whose record is gone, as a crash between a backend call
    // and the store write leaves them; a real backend's VMM has its run directory
    // (the fake makes none, so the test does).
    let ghost = host.manager.create(request("ghost")).await.unwrap();
    std::fs::create_dir_all(config.run_dir(ghost.id)).unwrap();
    host.store.delete_vm(ghost.id).await.unwrap();
    // Not vmkit's: left alone.
    std::fs::create_dir_all(config.run_root().join("lost+found")).unwrap();
    assert_eq!(host.holdings().await.volumes, 4);

    let manager = restart(&host, config.clone()).await;
    let report = manager.reconcile().await.unwrap();
    assert_consistent(&host, "after orphan sweep").await;
    assert_eq!(
        report.orphans.len(),
        5,
        "two volumes, a TAP, a lease and a run directory: {:?}",
        report.orphans
    );
    assert!(!config.run_dir(ghost.id).exists());
    assert!(config.run_root().join("lost+found").exists());
    let events = manager.events(0, 1000).await.unwrap();
    let reconciled = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Reconciled { .. }) && e.vm == Some(ghost.id))
        .count();
    assert_eq!(reconciled, 5, "one event per removed orphan");
    assert!(manager.reconcile().await.unwrap().orphans.is_empty());
}
