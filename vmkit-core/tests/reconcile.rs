#![allow(clippy::unwrap_used)]
//! Reconcile on the in-memory fakes: a crash (every backend call failing from one
//! step on, undo steps included) at every step of every operation, then a fresh
//! manager's reconcile, must leave store and host in agreement; a VMM that cannot be
//! attached is never killed; every VM is driven by the backend that created it; a
//! VM that cannot be settled is quarantined while the others carry on.

use std::collections::BTreeSet;
use std::sync::Arc;

use vmkit_core::guest::ExecRequest;
use vmkit_core::testing::{Breakage, FakeHost, FakeHypervisor, Holdings};
use vmkit_core::{
    CloneSource, CreateRequest, DeleteOptions, ErrorKind, EventKind, ExitPolicy, Health,
    Hypervisor, Manager, ManagerConfig, ManagerError, Network, StateStore, Storage, UserId, VmName,
    VmSpec, VmState,
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

async fn exec_stdout(manager: &Manager, vm: &str, argv: &[&str]) -> String {
    let mut stream = manager
        .exec(&name(vm), ExecRequest::new(argv.iter().copied()))
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(ev) = stream.next().await {
        if let vmkit_core::guest::ExecEvent::Stdout(b) = ev.unwrap() {
            out.extend_from_slice(&b);
        }
    }
    String::from_utf8(out).unwrap()
}

fn reconciled(events: &[vmkit_core::Event], vm: &str, needle: &str) -> bool {
    events.iter().any(|e| {
        e.vm_name.as_ref() == Some(&name(vm))
            && matches!(&e.kind, EventKind::Reconciled { action } if action.contains(needle))
    })
}

// Regression: any attach error (a QMP timeout, a console socket that does not
// connect) was taken for death, and reconcile killed the running VMM.
#[tokio::test(start_paused = true)]
async fn a_vmm_that_cannot_be_attached_is_left_running_unhealthy_and_reattached_later() {
    for how in [Breakage::Timeout, Breakage::Error] {
        let host = FakeHost::new().await;
        let web = host.manager.create(request("web")).await.unwrap();
        host.manager.create(request("db")).await.unwrap();
        let handle = web.resources.vmm.clone().unwrap();

        let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
        let id = web.id.to_string();
        host.faults.break_op("hypervisor.attach", Some(&id), how);
        let report = manager.reconcile().await.unwrap();
        let context = format!("attach broken as {how:?}");
        assert_eq!(report.unreachable, vec![name("web")], "{context}");
        assert_eq!(report.reattached, vec![name("db")], "{context}");
        assert!(
            report.stopped.is_empty() && report.failed.is_empty(),
            "{context}: {report:?}"
        );
        assert!(
            host.hypervisor.running().contains(&handle.pid),
            "{context}: the VMM was killed"
        );
        let vm = manager.get(&name("web")).await.unwrap();
        assert_eq!(vm.state, VmState::Running, "{context}");
        assert_eq!(vm.resources.vmm.as_ref(), Some(&handle), "{context}");
        assert!(
            matches!(&vm.health, Health::Unhealthy { reason } if reason.contains("cannot re-attach its VMM")),
            "{context}: {:?}",
            vm.health
        );
        assert_consistent(&host, &context).await;
        let events = manager.events(0, 1000).await.unwrap();
        assert!(reconciled(&events, "web", "left running"), "{context}");

        // While it stays unreachable: the agent check leaves its health alone, the
        // monitor's retry and an operation that drives the VMM fail without
        // touching it; the exec through its agent works.
        manager
            .check_agents(std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert!(manager.retry_unreachable().await.is_empty(), "{context}");
        let err = manager.pause(&name("web")).await.unwrap_err();
        assert!(
            matches!(err, ManagerError::VmmUnreachable { .. }),
            "{context}: {err}"
        );
        assert!(err.to_string().contains("left running"), "{context}: {err}");
        assert_eq!(exec_stdout(&manager, "web", &["echo", "hi"]).await, "hi\n");
        let vm = manager.get(&name("web")).await.unwrap();
        assert_eq!(vm.state, VmState::Running, "{context}");
        assert!(matches!(vm.health, Health::Unhealthy { .. }), "{context}");

        // Once it answers again it is re-attached: by the monitor's retry, or by
        // the next operation that drives it.
        host.faults.heal("hypervisor.attach");
        if how == Breakage::Timeout {
            assert_eq!(manager.retry_unreachable().await, vec![name("web")]);
        }
        let vm = manager.pause(&name("web")).await.unwrap();
        assert_eq!(vm.state, VmState::Paused, "{context}");
        assert_eq!(vm.health, Health::Unknown, "{context}");
        manager.resume(&name("web")).await.unwrap();
        assert!(manager.retry_unreachable().await.is_empty(), "{context}");
        let events = manager.events(0, 1000).await.unwrap();
        assert!(
            reconciled(&events, "web", "re-attached its VMM"),
            "{context}"
        );
        assert!(manager.reconcile().await.unwrap().is_clean(), "{context}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_vmm_that_then_dies_is_settled_by_the_vmm_check() {
    let host = FakeHost::new().await;
    let web = host.manager.create(request("web")).await.unwrap();
    let handle = web.resources.vmm.clone().unwrap();
    let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
    host.faults
        .break_op("hypervisor.attach", None, Breakage::Timeout);
    assert_eq!(
        manager.reconcile().await.unwrap().unreachable,
        vec![name("web")]
    );
    // Proof of death outweighs a broken control socket.
    host.hypervisor.crash(&handle);
    assert!(manager.retry_unreachable().await.is_empty());
    assert_eq!(manager.check_vmms().await.unwrap(), vec![name("web")]);
    let vm = manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert_consistent(&host, "after the unreachable VMM died").await;
    host.faults.heal("hypervisor.attach");
    manager.start(&name("web")).await.unwrap();
}

// Regression: a daemon whose default backend changed handed every VM's handle to
// the new backend, which took it for dead and stopped the VM.
#[tokio::test]
async fn a_manager_with_another_default_backend_drives_each_vm_with_the_one_that_created_it() {
    let host = FakeHost::new().await;
    let web = host.manager.create(request("web")).await.unwrap();
    assert_eq!(web.hypervisor.as_deref(), Some("fake"));
    host.manager.create(request("cold")).await.unwrap();
    host.manager.stop(&name("cold")).await.unwrap();
    host.manager
        .snapshot(&name("web"), name("snap"))
        .await
        .unwrap();

    // The restarted daemon's default is another backend; the old one is beside it.
    let other = FakeHypervisor::with_faults(host.faults.clone()).with_kind("fake-ch");
    let mut backends = host.manager.backends().clone();
    backends.hypervisor = Arc::new(other.clone());
    let backends = backends.with_other_hypervisor(Arc::new(host.hypervisor.clone()));
    host.faults.reset();
    let manager = Manager::new(ManagerConfig::new("/nonexistent/vmkit"), backends)
        .await
        .unwrap();
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.reattached, vec![name("web")], "{report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        exec_stdout(&manager, "web", &["hostname"]).await,
        "web\n",
        "driven by the backend that started it"
    );
    manager.pause(&name("web")).await.unwrap();
    manager.resume(&name("web")).await.unwrap();
    let cold = manager.start(&name("cold")).await.unwrap();
    let pid = cold.resources.vmm.as_ref().unwrap().pid;
    assert_eq!(cold.resources.vmm.as_ref().unwrap().backend, "fake");
    assert!(host.hypervisor.running().contains(&pid));

    // New VMs get the new default; clones keep their source's backend.
    let fresh = manager.create(request("fresh")).await.unwrap();
    assert_eq!(fresh.hypervisor.as_deref(), Some("fake-ch"));
    assert_eq!(fresh.resources.vmm.as_ref().unwrap().backend, "fake-ch");
    assert_eq!(other.running().len(), 1);
    for (clone, source) in [
        ("clone", CloneSource::Vm(name("web"))),
        ("from-snap", CloneSource::Snapshot(name("snap"))),
    ] {
        let vm = manager
            .clone_vm(source, Some(name(clone)), UserId::LOCAL)
            .await
            .unwrap();
        assert_eq!(vm.hypervisor.as_deref(), Some("fake"), "{clone}");
        assert_eq!(
            vm.resources.vmm.as_ref().unwrap().backend,
            "fake",
            "{clone}"
        );
    }
    manager.restore(&name("web"), &name("snap")).await.unwrap();
    assert_eq!(
        manager
            .get(&name("web"))
            .await
            .unwrap()
            .resources
            .vmm
            .unwrap()
            .backend,
        "fake"
    );
    for vm in ["web", "cold", "fresh", "clone", "from-snap"] {
        manager
            .delete(&name(vm), DeleteOptions::default())
            .await
            .unwrap();
    }
    assert!(host.hypervisor.running().is_empty() && other.running().is_empty());
}

#[tokio::test]
async fn a_vm_whose_backend_this_manager_lacks_is_kept_and_refused_clearly() {
    let host = FakeHost::new().await;
    let web = host.manager.create(request("web")).await.unwrap();
    let pid = web.resources.vmm.as_ref().unwrap().pid;
    let mut backends = host.manager.backends().clone();
    backends.hypervisor =
        Arc::new(FakeHypervisor::with_faults(host.faults.clone()).with_kind("fake-ch"));
    host.faults.reset();
    let manager = Manager::new(ManagerConfig::new("/nonexistent/vmkit"), backends)
        .await
        .unwrap();
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.unreachable, vec![name("web")], "{report:?}");
    assert!(host.hypervisor.running().contains(&pid), "never killed");
    let err = manager.pause(&name("web")).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("VM web was created with fake, which this daemon does not drive"),
        "{message}"
    );
    let err = manager
        .delete(&name("web"), DeleteOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ManagerError::BackendUnavailable { .. }),
        "{err}"
    );
    let vm = manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Running, "a refused rm changes nothing");
    assert!(
        matches!(&vm.health, Health::Unhealthy { reason } if reason.contains("does not drive")),
        "{:?}",
        vm.health
    );
    assert!(host.hypervisor.running().contains(&pid));
}

#[tokio::test]
async fn a_record_from_before_backends_were_recorded_is_pinned_to_its_vmms() {
    let host = FakeHost::new().await;
    for vm in ["web", "cold"] {
        host.manager.create(request(vm)).await.unwrap();
    }
    host.manager.stop(&name("cold")).await.unwrap();
    for vm in ["web", "cold"] {
        let mut record = host.store.get_vm(&name(vm)).await.unwrap().unwrap();
        record.hypervisor = None;
        host.store.update_vm(&record).await.unwrap();
    }
    let mut backends = host.manager.backends().clone();
    backends.hypervisor =
        Arc::new(FakeHypervisor::with_faults(host.faults.clone()).with_kind("fake-ch"));
    let backends = backends.with_other_hypervisor(Arc::new(host.hypervisor.clone()));
    host.faults.reset();
    let manager = Manager::new(ManagerConfig::new("/nonexistent/vmkit"), backends)
        .await
        .unwrap();
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.reattached, vec![name("web")], "{report:?}");
    let pinned = |vm: &str| {
        let manager = manager.clone();
        let vm = name(vm);
        async move { manager.get(&vm).await.unwrap().hypervisor }
    };
    assert_eq!(pinned("web").await.as_deref(), Some("fake"), "its VMM's");
    assert_eq!(
        pinned("cold").await.as_deref(),
        Some("fake-ch"),
        "the default"
    );
}

// Regression: one VM whose cleanup failed made the whole reconcile fail, and the
// daemon exit, before any other VM was settled.
#[tokio::test]
async fn a_vm_that_cannot_be_settled_is_quarantined_and_the_others_reconcile() {
    let host = FakeHost::new().await;
    let stuck = host.manager.create(request("stuck")).await.unwrap();
    let dead = host.manager.create(request("dead")).await.unwrap();
    host.manager.create(request("fine")).await.unwrap();
    // A delete of `stuck` cut short, whose volumes are busy; `dead`'s VMM died and
    // cannot be cleaned up.
    let mut record = host.store.get_vm(&name("stuck")).await.unwrap().unwrap();
    record.state = VmState::Deleting;
    host.store.update_vm(&record).await.unwrap();
    let dead_handle = dead.resources.vmm.clone().unwrap();
    host.hypervisor.crash(&dead_handle);

    let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
    let (stuck_id, dead_id) = (stuck.id.to_string(), dead.id.to_string());
    host.faults
        .break_op("storage.delete", Some(&stuck_id), Breakage::Error);
    host.faults
        .break_op("hypervisor.cleanup", Some(&dead_id), Breakage::Error);
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.reattached, vec![name("fine")], "{report:?}");
    let quarantined: BTreeSet<_> = report.quarantined().cloned().collect();
    assert_eq!(
        quarantined,
        BTreeSet::from([name("dead"), name("stuck")]),
        "{report:?}"
    );
    let failure = report
        .failed
        .iter()
        .find(|f| f.vm == Some(name("stuck")))
        .unwrap();
    assert!(
        failure.action.contains("finish the interrupted delete")
            && failure.error.contains("injected"),
        "{failure:?}"
    );
    let events = manager.events(0, 1000).await.unwrap();
    for vm in [&stuck, &dead] {
        assert!(
            events.iter().any(|e| e.vm == Some(vm.id)
                && matches!(e.kind, EventKind::ReconcileFailed { .. })),
            "the failure of {} is an event",
            vm.name
        );
    }

    // Only rm is accepted; the others work.
    for vm in ["stuck", "dead"] {
        let record = manager.get(&name(vm)).await.unwrap();
        assert!(record.quarantined.is_some(), "{vm}");
        let err = manager.start(&name(vm)).await.unwrap_err();
        assert!(
            matches!(err, ManagerError::Quarantined { .. }) && err.kind() == ErrorKind::Conflict,
            "{vm}: {err}"
        );
        assert!(
            err.to_string().contains(&format!("vmkit vm rm {vm}")),
            "{err}"
        );
    }
    assert_eq!(exec_stdout(&manager, "fine", &["echo", "ok"]).await, "ok\n");
    manager.create(request("fresh")).await.unwrap();
    // The VMM check leaves a quarantined VM to rm.
    assert!(manager.check_vmms().await.unwrap().is_empty());

    // While the cause stays, rm fails and says why; once it is gone, rm finishes.
    let err = manager
        .delete(&name("stuck"), DeleteOptions::default())
        .await
        .unwrap_err();
    assert!(
        vmkit_core::ErrorChain(&err)
            .to_string()
            .contains("injected"),
        "{err}"
    );
    host.faults.heal("storage.delete");
    host.faults.heal("hypervisor.cleanup");
    for vm in ["stuck", "dead"] {
        manager
            .delete(&name(vm), DeleteOptions::default())
            .await
            .unwrap();
    }
    assert_consistent(&host, "after removing the quarantined VMs").await;
    assert!(manager.reconcile().await.unwrap().is_clean());
}

#[tokio::test]
async fn a_later_reconcile_that_settles_a_quarantined_vm_lifts_the_quarantine() {
    let host = FakeHost::new().await;
    let web = host.manager.create(request("web")).await.unwrap();
    host.hypervisor.crash(web.resources.vmm.as_ref().unwrap());
    let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
    host.faults
        .break_op("hypervisor.cleanup", None, Breakage::Error);
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.quarantined().collect::<Vec<_>>(), [&name("web")]);
    host.faults.heal("hypervisor.cleanup");
    let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.stopped, vec![name("web")], "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    let vm = manager.get(&name("web")).await.unwrap();
    assert_eq!((vm.state, vm.quarantined), (VmState::Stopped, None));
    manager.start(&name("web")).await.unwrap();
}

#[tokio::test]
async fn an_orphan_that_cannot_be_removed_is_reported_and_the_sweep_goes_on() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let ghost = host.manager.create(request("ghost")).await.unwrap();
    host.hypervisor.crash(ghost.resources.vmm.as_ref().unwrap());
    host.store.delete_vm(ghost.id).await.unwrap();
    let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
    let id = ghost.id.to_string();
    host.faults
        .break_op("storage.delete", Some(&id), Breakage::Error);
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.failed.len(), 2, "two volumes: {report:?}");
    assert!(report.failed.iter().all(|f| f.vm.is_none()));
    assert_eq!(report.orphans.len(), 2, "its TAP and lease: {report:?}");
    assert_eq!(report.reattached, vec![name("web")]);
    host.faults.heal("storage.delete");
    let report = manager.reconcile().await.unwrap();
    assert_eq!(report.orphans.len(), 2, "the volumes, now: {report:?}");
    assert_consistent(&host, "after the second sweep").await;
}

// A VMM that does not answer costs its timeout once, not once per VM, before the
// daemon serves.
#[tokio::test(start_paused = true)]
async fn reconcile_waits_for_unanswering_vmms_all_at_once() {
    let host = FakeHost::new().await;
    for vm in ["a", "b", "c", "d"] {
        host.manager.create(request(vm)).await.unwrap();
    }
    let manager = restart(&host, ManagerConfig::new("/nonexistent/vmkit")).await;
    host.faults
        .break_op("hypervisor.attach", None, Breakage::Timeout);
    let started = tokio::time::Instant::now();
    let report = manager.reconcile().await.unwrap();
    let took = started.elapsed();
    assert_eq!(report.unreachable.len(), 4, "{report:?}");
    assert!(
        took < std::time::Duration::from_secs(20),
        "four VMMs that time out after 10 s each took {took:?}"
    );
}
