#![allow(clippy::unwrap_used)]
//! Manager behaviour on the in-memory fakes.

use std::sync::Arc;
use std::time::Duration;

use vmkit_core::guest::ExecRequest;
use vmkit_core::testing::{AgentBehavior, FakeHost, Holdings};
use vmkit_core::{
    CreateRequest, DeleteOptions, ErrorKind, EventKind, ManagerConfig, ManagerError, Quota,
    QuotaResource, StateStore, UserId, VmName, VmSpec, VmState,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

fn request(n: &str) -> CreateRequest {
    CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").disk_gib(1).root_gib(2)).name(name(n))
}

async fn exec_stdout(host: &FakeHost, vm: &str, argv: &[&str]) -> (Vec<u8>, Option<i32>) {
    let mut stream = host
        .manager
        .exec(&name(vm), ExecRequest::new(argv.iter().copied()))
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut code = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            vmkit_core::guest::ExecEvent::Stdout(b) => out.extend_from_slice(&b),
            vmkit_core::guest::ExecEvent::Stderr(_) => {}
            vmkit_core::guest::ExecEvent::Exit(s) => code = s.code,
            _ => {}
        }
    }
    (out, code)
}

#[tokio::test]
async fn create_takes_every_resource_and_runs() {
    let host = FakeHost::new().await;
    let vm = host.manager.create(request("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert!(vm.resources.root.is_some() && vm.resources.data.is_some());
    assert!(vm.resources.lease.is_some() && vm.resources.net.is_some());
    assert!(vm.resources.vmm.is_some());
    assert_eq!(
        host.holdings().await,
        Holdings {
            vms: 1,
            volumes: 2,
            taps: 1,
            leases: 1,
            vmms: 1
        }
    );
    assert_eq!(host.manager.get(&name("web")).await.unwrap(), vm);
}

#[tokio::test]
async fn create_without_a_name_generates_a_valid_one() {
    let host = FakeHost::new().await;
    let vm = host
        .manager
        .create(CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny")))
        .await
        .unwrap();
    assert_eq!(VmName::new(vm.name.as_str()).unwrap(), vm.name);
}

#[tokio::test]
async fn failure_at_every_step_of_create_leaves_nothing_behind() {
    // Count the steps of one successful create.
    let probe = FakeHost::new().await;
    probe.faults.reset();
    probe.manager.create(request("probe")).await.unwrap();
    let steps = probe.faults.calls();
    assert!(
        steps >= 8,
        "create has at least 8 fallible steps, saw {steps}"
    );

    for step in 1..=steps {
        let host = FakeHost::new().await;
        host.faults.fail_at(step);
        let err = host.manager.create(request("web")).await;
        let log = host.faults.log();
        assert!(
            err.is_err(),
            "failure at step {step} ({:?}) must fail the create",
            log.get(step as usize - 1)
        );
        assert_eq!(
            host.holdings().await,
            Holdings::default(),
            "failure at step {step} ({:?}) leaked resources",
            log.get(step as usize - 1)
        );
        let events = host.manager.events(0, 100).await.unwrap();
        let failed = events
            .iter()
            .any(|e| matches!(e.kind, EventKind::CreateFailed { .. }));
        let refused_before_record = step == 1;
        assert!(
            failed || refused_before_record,
            "step {step}: a failed create is recorded as an event"
        );
        // The name is free again.
        host.faults.reset();
        host.manager.create(request("web")).await.unwrap();
    }
}

#[tokio::test]
async fn delete_removes_every_resource() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    host.manager
        .delete(&name("web"), DeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(host.holdings().await, Holdings::default());
    assert!(matches!(
        host.manager.get(&name("web")).await,
        Err(ManagerError::NotFound(_))
    ));
}

#[tokio::test]
async fn failed_delete_can_be_retried_to_completion() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    host.faults.fail_at(4);
    assert!(
        host.manager
            .delete(&name("web"), DeleteOptions::default())
            .await
            .is_err()
    );
    assert_eq!(
        host.manager.get(&name("web")).await.unwrap().state,
        VmState::Deleting
    );
    host.manager
        .delete(&name("web"), DeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(host.holdings().await, Holdings::default());
}

#[tokio::test]
async fn duplicate_name_is_rejected_and_changes_nothing() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let before = host.holdings().await;
    let err = host.manager.create(request("web")).await.unwrap_err();
    assert!(matches!(err, ManagerError::NameTaken(_)), "{err}");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(host.holdings().await, before);
}

#[tokio::test]
async fn quota_is_checked_before_any_resource_is_taken() {
    let host = FakeHost::with_config(
        ManagerConfig::new("/nonexistent").default_quota(Quota::new(1, 4, 4096, 10)),
    )
    .await;
    host.manager.create(request("one")).await.unwrap();
    host.faults.reset();
    let err = host.manager.create(request("two")).await.unwrap_err();
    match &err {
        ManagerError::QuotaExceeded(q) => assert_eq!(q.resource, QuotaResource::Vms),
        other => panic!("expected quota error, got {other}"),
    }
    assert_eq!(err.kind(), ErrorKind::QuotaExceeded);
    assert!(
        !host.faults.log().iter().any(|op| op.starts_with("storage")
            || op.starts_with("network")
            || op.starts_with("hypervisor")),
        "no backend was called: {:?}",
        host.faults.log()
    );
    assert_eq!(host.holdings().await.vms, 1);
}

#[tokio::test]
async fn per_user_quota_overrides_the_default() {
    let host = FakeHost::new().await;
    host.store
        .set_quota(UserId(9), &Quota::new(5, 1, 4096, 10))
        .await
        .unwrap();
    let err = host
        .manager
        .create(CreateRequest::new(UserId(9), VmSpec::new("tiny").vcpus(2)))
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::QuotaExceeded(q) if q.resource == QuotaResource::Vcpus));
}

#[tokio::test]
async fn oversize_spec_is_rejected_and_changes_nothing() {
    let host = FakeHost::new().await;
    let err = host
        .manager
        .create(CreateRequest::new(
            UserId::LOCAL,
            VmSpec::new("tiny").memory_mib(1 << 30),
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::InvalidSpec(_)), "{err}");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(host.holdings().await, Holdings::default());
}

#[tokio::test]
async fn unknown_image_is_rejected_with_how_to_build_it() {
    let host = FakeHost::new().await;
    let err = host
        .manager
        .create(CreateRequest::new(UserId::LOCAL, VmSpec::new("nosuch")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        err.to_string().contains("vmkit image build nosuch"),
        "{err}"
    );
    assert_eq!(host.holdings().await, Holdings::default());
}

#[tokio::test]
async fn operations_on_an_unknown_vm_say_it_does_not_exist() {
    let host = FakeHost::new().await;
    for err in [
        host.manager.start(&name("ghost")).await.unwrap_err(),
        host.manager.stop(&name("ghost")).await.unwrap_err(),
        host.manager.restart(&name("ghost")).await.unwrap_err(),
        host.manager
            .delete(&name("ghost"), DeleteOptions::default())
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(err, ManagerError::NotFound(_)), "{err}");
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
}

#[tokio::test]
async fn stop_then_start_keeps_disks_address_and_tap() {
    let host = FakeHost::new().await;
    let created = host.manager.create(request("web")).await.unwrap();
    let stopped = host.manager.stop(&name("web")).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(stopped.resources.vmm.is_none());
    assert_eq!(host.holdings().await.vmms, 0);
    assert_eq!(stopped.resources.root, created.resources.root);
    assert_eq!(stopped.resources.lease, created.resources.lease);

    let started = host.manager.start(&name("web")).await.unwrap();
    assert_eq!(started.state, VmState::Running);
    assert_eq!(started.resources.data, created.resources.data);
    assert_eq!(host.holdings().await.vmms, 1);
}

#[tokio::test]
async fn operations_in_the_wrong_state_are_refused_and_change_nothing() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let err = host.manager.start(&name("web")).await.unwrap_err();
    assert!(
        matches!(
            err,
            ManagerError::WrongState {
                state: VmState::Running,
                operation: "start",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(
        err.to_string().contains("stopped"),
        "says what state is needed: {err}"
    );

    host.manager.stop(&name("web")).await.unwrap();
    let err = host.manager.stop(&name("web")).await.unwrap_err();
    assert!(matches!(
        err,
        ManagerError::WrongState {
            operation: "stop",
            ..
        }
    ));
    let err = host
        .manager
        .exec(&name("web"), ExecRequest::new(["true"]))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ManagerError::WrongState {
            operation: "exec",
            ..
        }
    ));
    assert_eq!(
        host.manager.get(&name("web")).await.unwrap().state,
        VmState::Stopped
    );
}

#[tokio::test]
async fn restart_of_a_running_vm_gives_it_a_new_vmm() {
    let host = FakeHost::new().await;
    let before = host.manager.create(request("web")).await.unwrap();
    let after = host.manager.restart(&name("web")).await.unwrap();
    assert_eq!(after.state, VmState::Running);
    assert_ne!(
        before.resources.vmm.unwrap().pid,
        after.resources.vmm.unwrap().pid
    );
    assert_eq!(host.holdings().await.vmms, 1);
}

#[tokio::test]
async fn exec_streams_output_and_exit_code() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    assert_eq!(
        exec_stdout(&host, "web", &["echo", "hello"]).await,
        (b"hello\n".to_vec(), Some(0))
    );
    assert_eq!(exec_stdout(&host, "web", &["exit", "3"]).await.1, Some(3));
}

#[tokio::test]
async fn silent_agent_fails_create_with_the_console_and_cleans_up() {
    let host = FakeHost::with_config(
        ManagerConfig::new("/nonexistent").boot_timeout(Duration::from_millis(300)),
    )
    .await;
    host.hypervisor.set_agent_behavior(AgentBehavior::Silent);
    let err = host.manager.create(request("web")).await.unwrap_err();
    match &err {
        ManagerError::BootFailed { console, .. } => {
            assert!(
                console.contains("fake boot of web"),
                "console tail: {console}"
            )
        }
        other => panic!("expected BootFailed, got {other}"),
    }
    assert_eq!(host.holdings().await, Holdings::default());
}

#[tokio::test]
async fn absent_agent_fails_create_and_cleans_up() {
    let host = FakeHost::with_config(
        ManagerConfig::new("/nonexistent").boot_timeout(Duration::from_millis(300)),
    )
    .await;
    host.hypervisor.set_agent_behavior(AgentBehavior::Absent);
    let err = host.manager.create(request("web")).await.unwrap_err();
    assert!(matches!(err, ManagerError::BootFailed { .. }), "{err}");
    assert_eq!(host.holdings().await, Holdings::default());
}

#[tokio::test]
async fn a_vmm_that_dies_is_noticed_and_the_vm_marked_stopped() {
    let host = FakeHost::new().await;
    let vm = host.manager.create(request("web")).await.unwrap();
    host.hypervisor.crash(vm.resources.vmm.as_ref().unwrap());
    let marked = host.manager.check_vmms().await.unwrap();
    assert_eq!(marked, vec![name("web")]);
    let vm = host.manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(vm.resources.vmm.is_none());
    let events = host.manager.events(0, 100).await.unwrap();
    assert!(events.iter().any(|e| e.kind == EventKind::VmmExited));
    // It can be started again.
    host.manager.start(&name("web")).await.unwrap();
}

#[tokio::test]
async fn every_state_change_is_an_event() {
    let host = FakeHost::new().await;
    let mut live = host.manager.subscribe();
    host.manager.create(request("web")).await.unwrap();
    host.manager.stop(&name("web")).await.unwrap();
    host.manager
        .delete(&name("web"), DeleteOptions::default())
        .await
        .unwrap();
    let stored = host.manager.events(0, 100).await.unwrap();
    let kinds: Vec<_> = stored.iter().map(|e| e.kind.clone()).collect();
    use EventKind::*;
    assert_eq!(
        kinds,
        vec![
            Creating,
            StateChanged {
                from: VmState::Creating,
                to: VmState::Running
            },
            StateChanged {
                from: VmState::Running,
                to: VmState::Stopping
            },
            StateChanged {
                from: VmState::Stopping,
                to: VmState::Stopped
            },
            StateChanged {
                from: VmState::Stopped,
                to: VmState::Deleting
            },
            Deleted,
        ]
    );
    for expected in &stored {
        assert_eq!(
            &live.recv().await.unwrap(),
            expected,
            "live feed matches the store"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_different_vms_run_in_parallel_and_on_one_vm_serialise() {
    let host =
        FakeHost::with_config(ManagerConfig::new("/nonexistent").default_quota(Quota::unlimited()))
            .await;
    let names: Vec<String> = (0..50).map(|i| format!("vm-{i}")).collect();
    let creates = names.iter().map(|n| {
        let m = host.manager.clone();
        let r = request(n);
        tokio::spawn(async move { m.create(r).await })
    });
    for r in futures_join(creates).await {
        r.unwrap();
    }
    assert_eq!(host.holdings().await.vms, 50);

    // Racing stop/start/restart on one VM: every call sees a consistent state.
    let m = Arc::new(host.manager.clone());
    let ops = (0..20).map(|i| {
        let m = m.clone();
        tokio::spawn(async move {
            let n = name("vm-0");
            match i % 3 {
                0 => m.stop(&n).await.map(drop),
                1 => m.start(&n).await.map(drop),
                _ => m.restart(&n).await.map(drop),
            }
        })
    });
    for r in futures_join(ops).await {
        if let Err(e) = r {
            assert!(matches!(e, ManagerError::WrongState { .. }), "{e}");
        }
    }
    let vm = host.manager.get(&name("vm-0")).await.unwrap();
    assert!(matches!(vm.state, VmState::Running | VmState::Stopped));
    assert_eq!(vm.resources.vmm.is_some(), vm.state == VmState::Running);

    let deletes = names.iter().map(|n| {
        let m = host.manager.clone();
        let n = name(n);
        tokio::spawn(async move { m.delete(&n, DeleteOptions::default()).await })
    });
    for r in futures_join(deletes).await {
        r.unwrap();
    }
    assert_eq!(host.holdings().await, Holdings::default());
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_new_guest_is_told_its_address_hostname_and_owners_keys() {
    let host = FakeHost::new().await;
    let key = vmkit_core::SshPublicKey::parse(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILCkWGIcqzUfwK2Ls1cyvWoL0Yu96sujsXIbpy6qXyQg alice@example",
    )
    .unwrap();
    host.store.add_ssh_key(UserId::LOCAL, &key).await.unwrap();
    let vm = host.manager.create(request("web")).await.unwrap();
    let guest = host
        .hypervisor
        .guest(vm.resources.vmm.as_ref().unwrap().pid)
        .unwrap();
    assert_eq!(guest.hostname.as_deref(), Some("web"));
    let net = guest.network.unwrap();
    let lease = vm.resources.lease.unwrap();
    assert_eq!(
        (net.address, net.gateway, net.prefix),
        (lease.ip, lease.gateway, lease.prefix)
    );
    assert_eq!(net.mac, lease.mac.to_string());
    // The owner's keys, and the gateway's key for this VM.
    let gateway_key = host.manager.vm_key(vm.id).public_key().to_openssh();
    assert_eq!(guest.ssh_keys, vec![key.to_openssh(), gateway_key]);

    // A restart configures the new guest again.
    let vm = host.manager.restart(&name("web")).await.unwrap();
    let guest = host
        .hypervisor
        .guest(vm.resources.vmm.as_ref().unwrap().pid)
        .unwrap();
    assert_eq!(guest.hostname.as_deref(), Some("web"));
}

#[tokio::test]
async fn a_hostile_agent_marks_only_its_vm_unhealthy_and_the_manager_keeps_working() {
    let host = FakeHost::new().await;
    let bad = host.manager.create(request("bad")).await.unwrap();
    host.manager.create(request("good")).await.unwrap();
    assert_eq!(bad.health, vmkit_core::Health::Healthy);

    // Both answer a heartbeat: nothing changes.
    assert!(
        host.manager
            .check_agents(Duration::from_secs(2))
            .await
            .unwrap()
            .is_empty()
    );

    host.hypervisor
        .make_agent_hostile(bad.resources.vmm.as_ref().unwrap());
    let changed = host
        .manager
        .check_agents(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].0, name("bad"));
    let vm = host.manager.get(&name("bad")).await.unwrap();
    match &vm.health {
        vmkit_core::Health::Unhealthy { reason } => {
            assert!(
                reason.contains("frame") || reason.contains("large"),
                "{reason}"
            )
        }
        other => panic!("expected unhealthy, got {other:?}"),
    }
    let events = host.manager.events(0, 100).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::HealthChanged { .. }))
    );

    // The other VM and the manager are unaffected.
    assert_eq!(
        exec_stdout(&host, "good", &["echo", "fine"]).await,
        (b"fine\n".to_vec(), Some(0))
    );
    assert_eq!(
        host.manager.get(&name("good")).await.unwrap().health,
        vmkit_core::Health::Healthy
    );
    // The unhealthy VM can still be stopped and removed.
    host.manager
        .delete(&name("bad"), DeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn pause_and_resume_follow_the_state_machine() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let vm = host.manager.pause(&name("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Paused);
    let err = host.manager.pause(&name("web")).await.unwrap_err();
    assert!(
        matches!(
            err,
            ManagerError::WrongState {
                operation: "pause",
                ..
            }
        ),
        "{err}"
    );
    let err = host
        .manager
        .exec(&name("web"), ExecRequest::new(["true"]))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ManagerError::WrongState {
            operation: "exec",
            ..
        }
    ));
    let vm = host.manager.resume(&name("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(
        exec_stdout(&host, "web", &["echo", "back"]).await.1,
        Some(0)
    );
    let err = host.manager.resume(&name("web")).await.unwrap_err();
    assert!(matches!(
        err,
        ManagerError::WrongState {
            operation: "resume",
            ..
        }
    ));
    // A paused VM can be stopped.
    host.manager.pause(&name("web")).await.unwrap();
    assert_eq!(
        host.manager.stop(&name("web")).await.unwrap().state,
        VmState::Stopped
    );
}

#[tokio::test]
async fn the_root_disk_takes_the_asked_size_or_keeps_the_image_size() {
    let host = FakeHost::new().await;
    let big = host.manager.create(request("big")).await.unwrap();
    assert_eq!(big.resources.root.unwrap().size_bytes, 2 << 30);
    let plain = host
        .manager
        .create(CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny")).name(name("plain")))
        .await
        .unwrap();
    let image_size = plain.resources.root.unwrap().size_bytes;
    assert!(image_size < 2 << 30, "the image's size: {image_size}");
    let err = host
        .manager
        .create(
            CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").root_gib(1 << 20))
                .name(name("huge")),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("root_gib"), "{err}");
}

/// An ed25519 key made by ssh-keygen; its fingerprint holds a `/`.
const CAROL: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDEarYz70Byb4F3tObLPQOH7OcIbLkodxbuDcfZAAi+t carol@example";
const CAROL_FP: &str = "SHA256:KzM679Yuc/e1EFD2JStDlL8a8O5S280Jkl5hJDN5wfk";

#[tokio::test]
async fn ssh_keys_are_added_once_listed_and_removed_by_their_owner_only() {
    let host = FakeHost::new().await;
    let m = &host.manager;
    let key = vmkit_core::SshPublicKey::parse(CAROL).unwrap();
    m.add_ssh_key(UserId::LOCAL, &key).await.unwrap();
    assert_eq!(m.ssh_keys(UserId::LOCAL).await.unwrap(), vec![key.clone()]);

    let again = m.add_ssh_key(UserId::LOCAL, &key).await.unwrap_err();
    assert!(matches!(again, ManagerError::SshKeyExists(_)), "{again}");
    assert_eq!(again.kind(), ErrorKind::Conflict);
    let other = m.add_ssh_key(UserId(7), &key).await.unwrap_err();
    assert!(matches!(other, ManagerError::SshKeyTaken(_)), "{other}");
    assert_eq!(other.kind(), ErrorKind::Conflict);

    let not_theirs = m.remove_ssh_key(UserId(7), CAROL_FP).await.unwrap_err();
    assert_eq!(not_theirs.kind(), ErrorKind::NotFound, "{not_theirs}");
    let without_prefix = CAROL_FP.trim_start_matches("SHA256:");
    m.remove_ssh_key(UserId::LOCAL, without_prefix)
        .await
        .unwrap();
    assert!(m.ssh_keys(UserId::LOCAL).await.unwrap().is_empty());
    let gone = m.remove_ssh_key(UserId::LOCAL, CAROL_FP).await.unwrap_err();
    assert!(matches!(gone, ManagerError::SshKeyNotFound(_)), "{gone}");
}

#[tokio::test]
async fn a_removed_key_leaves_the_guest_at_its_next_start() {
    let host = FakeHost::new().await;
    let key = vmkit_core::SshPublicKey::parse(CAROL).unwrap();
    host.manager.add_ssh_key(UserId::LOCAL, &key).await.unwrap();
    let vm = host.manager.create(request("web")).await.unwrap();
    let guest = |vm: &vmkit_core::VmRecord| {
        host.hypervisor
            .guest(vm.resources.vmm.as_ref().unwrap().pid)
            .unwrap()
    };
    let gateway_key = host.manager.vm_key(vm.id).public_key().to_openssh();
    assert_eq!(
        guest(&vm).ssh_keys,
        vec![key.to_openssh(), gateway_key.clone()]
    );
    host.manager
        .remove_ssh_key(UserId::LOCAL, CAROL_FP)
        .await
        .unwrap();
    let vm = host.manager.restart(&name("web")).await.unwrap();
    // Only the gateway's key is left.
    assert_eq!(guest(&vm).ssh_keys, vec![gateway_key], "{:?}", guest(&vm));
}
