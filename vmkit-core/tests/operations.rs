#![allow(clippy::unwrap_used)]
//! Resize, logs, metrics, snapshots, restore and clones on the in-memory fakes,
//! including a crash at every step of each, then reconcile.

use vmkit_core::testing::{FakeHost, Holdings};
use vmkit_core::{
    CloneSource, CreateRequest, EventKind, Manager, ManagerConfig, ManagerError, Quota,
    QuotaResource, ResizeRequest, SpecError, StateStore, Storage, UserId, VmName, VmSpec, VmState,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

fn request(n: &str) -> CreateRequest {
    CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").disk_gib(1)).name(name(n))
}

#[tokio::test]
async fn resize_changes_a_stopped_vm_at_next_start_and_a_running_one_live() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let vm = host
        .manager
        .resize(&name("web"), ResizeRequest::new().vcpus(2).memory_mib(1024))
        .await
        .unwrap();
    assert_eq!((vm.spec.vcpus, vm.spec.memory_mib), (2, 1024));
    let metrics = host.manager.metrics(&name("web")).await.unwrap();
    assert_eq!(
        (metrics.vmm.vcpus, metrics.vmm.memory_mib),
        (2, 1024),
        "the running VMM was resized"
    );

    let err = host
        .manager
        .resize(&name("web"), ResizeRequest::new().disk_gib(4))
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::WrongState { .. }), "{err}");
    host.manager.stop(&name("web")).await.unwrap();
    let vm = host
        .manager
        .resize(&name("web"), ResizeRequest::new().disk_gib(4))
        .await
        .unwrap();
    assert_eq!(vm.resources.data.as_ref().unwrap().size_bytes, 4 << 30);
    let err = host
        .manager
        .resize(&name("web"), ResizeRequest::new().disk_gib(2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ManagerError::InvalidSpec(SpecError::DiskShrink { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("only grow"), "{err}");
    let vm = host.manager.start(&name("web")).await.unwrap();
    assert_eq!(vm.spec.disk_gib, 4);
    let events = host.manager.events(0, 1000).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Resized { .. }))
            .count(),
        2
    );
}

#[tokio::test]
async fn logs_and_metrics_come_from_the_vmm_and_the_agent() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let logs = host.manager.logs(&name("web"), 4096).await.unwrap();
    assert!(!logs.is_empty(), "the console has the boot");
    let metrics = host.manager.metrics(&name("web")).await.unwrap();
    assert_eq!(metrics.state, VmState::Running);
    assert!(metrics.guest.is_some(), "the agent answered");
    host.manager.pause(&name("web")).await.unwrap();
    let metrics = host.manager.metrics(&name("web")).await.unwrap();
    assert!(metrics.guest.is_none(), "a paused guest is not asked");
    host.manager.resume(&name("web")).await.unwrap();
    host.manager.stop(&name("web")).await.unwrap();
    assert_eq!(
        host.manager.logs(&name("web"), 4096).await.unwrap(),
        "",
        "without a data directory nothing is kept (and nothing is created)"
    );
    assert!(!std::path::Path::new("/nonexistent/vmkit").exists());
}

#[tokio::test]
async fn a_stopped_or_crashed_vm_keeps_its_last_console_until_it_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let host = FakeHost::with_config(ManagerConfig::new(dir.path())).await;
    let web = host.manager.create(request("web")).await.unwrap();
    let live = host.manager.logs(&name("web"), 4096).await.unwrap();
    assert!(live.contains("fake boot of web"), "{live}");

    host.manager.stop(&name("web")).await.unwrap();
    assert_eq!(host.manager.logs(&name("web"), 4096).await.unwrap(), live);
    assert_eq!(
        host.manager.logs(&name("web"), 5).await.unwrap(),
        live[live.len() - 5..],
        "the newest bytes"
    );

    host.manager.start(&name("web")).await.unwrap();
    let handle = host
        .manager
        .get(&name("web"))
        .await
        .unwrap()
        .resources
        .vmm
        .unwrap();
    host.hypervisor.crash(&handle);
    assert_eq!(host.manager.check_vmms().await.unwrap(), [name("web")]);
    assert!(
        host.manager
            .logs(&name("web"), 4096)
            .await
            .unwrap()
            .contains("fake boot of web"),
        "a crashed VM's console is kept too"
    );

    let kept = dir.path().join("consoles").join(format!("{}.log", web.id));
    assert!(kept.exists());
    host.manager
        .delete(&name("web"), vmkit_core::DeleteOptions::default())
        .await
        .unwrap();
    assert!(!kept.exists(), "deleting the VM removes its console");
}

#[tokio::test]
async fn snapshot_restore_keeps_identity_and_clones_get_their_own() {
    let host = FakeHost::new().await;
    let web = host.manager.create(request("web")).await.unwrap();
    let snap = host
        .manager
        .snapshot(&name("web"), name("before"))
        .await
        .unwrap();
    assert!(snap.has_memory(), "the fake hypervisor saves memory");
    assert_eq!(snap.vm, web.id);
    assert_eq!(
        host.manager.get(&name("web")).await.unwrap().state,
        VmState::Running,
        "a running VM runs on after its snapshot"
    );
    assert!(matches!(
        host.manager.snapshot(&name("web"), name("before")).await,
        Err(ManagerError::SnapshotTaken(_))
    ));

    let restored = host
        .manager
        .restore(&name("web"), &name("before"))
        .await
        .unwrap();
    assert_eq!(restored.state, VmState::Running);
    assert_eq!(restored.id, web.id);
    assert_eq!(restored.ip(), web.ip(), "a restored VM keeps its address");
    assert_eq!(
        restored.resources.net.as_ref().unwrap().mac,
        web.resources.net.as_ref().unwrap().mac
    );
    assert_ne!(
        restored.resources.vmm.as_ref().unwrap().pid,
        web.resources.vmm.as_ref().unwrap().pid,
        "it runs in a new VMM"
    );

    for (source, copy) in [
        (CloneSource::Vm(name("web")), "copy"),
        (CloneSource::Snapshot(name("before")), "from-snap"),
    ] {
        let vm = host
            .manager
            .clone_vm(source, Some(name(copy)), UserId::LOCAL)
            .await
            .unwrap();
        assert_eq!(vm.state, VmState::Running);
        assert_ne!(vm.id, web.id);
        assert_ne!(vm.ip(), web.ip(), "a clone gets its own address");
        let guest = host
            .hypervisor
            .guest(vm.resources.vmm.as_ref().unwrap().pid)
            .unwrap();
        assert_eq!(guest.hostname.as_deref(), Some(copy), "its own host name");
        let net = guest.network.unwrap();
        assert_eq!(
            net.address,
            vm.ip().unwrap(),
            "the agent re-addressed the guest"
        );
        assert_eq!(vm.spec, web.spec);
    }
    // Two VMs' volumes plus the snapshot's, and the two clones'.
    assert_eq!(host.holdings().await.volumes, 8);

    // Only a snapshot of the VM itself restores into it.
    assert!(matches!(
        host.manager.restore(&name("copy"), &name("before")).await,
        Err(ManagerError::WrongState { .. })
    ));
    host.manager.delete_snapshot(&name("before")).await.unwrap();
    assert_eq!(host.holdings().await.volumes, 6);
    assert!(host.manager.list_snapshots(None).await.unwrap().is_empty());
}

/// A crash (every backend call failing from `step` on) during `op`, then a fresh
/// manager's reconcile: what is left is consistent, and a second reconcile is clean.
async fn crash_then_reconcile(
    op: &str,
    prepare: impl AsyncFn(&FakeHost),
    run: impl AsyncFn(&Manager) -> Result<(), ManagerError>,
) {
    let probe = FakeHost::new().await;
    prepare(&probe).await;
    probe.faults.reset();
    run(&probe.manager).await.unwrap();
    let steps = probe.faults.calls();
    for step in 1..=steps {
        let host = FakeHost::new().await;
        prepare(&host).await;
        host.faults.crash_at(step);
        let _ = run(&host.manager).await;
        host.faults.reset();
        let manager = Manager::new(
            ManagerConfig::new("/nonexistent/vmkit"),
            host.manager.backends().clone(),
        )
        .await
        .unwrap();
        manager.reconcile().await.unwrap();
        let context = format!("crash at {op} step {step}");
        let vms = host.store.list_vms(None).await.unwrap();
        let snapshots = host.store.list_snapshots(None).await.unwrap();
        let mut held: Vec<String> = vms
            .iter()
            .flat_map(|vm| [&vm.resources.root, &vm.resources.data])
            .flatten()
            .chain(
                snapshots
                    .iter()
                    .flat_map(|s| [Some(&s.root), s.data.as_ref()])
                    .flatten(),
            )
            .map(|v| v.id.clone())
            .collect();
        held.sort();
        let mut volumes: Vec<String> = host
            .storage
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.id)
            .collect();
        volumes.sort();
        assert_eq!(volumes, held, "{context}: volumes and records disagree");
        for vm in &vms {
            assert!(
                !vm.state.is_transient(),
                "{context}: {} is {}",
                vm.name,
                vm.state
            );
            assert!(vm.restoring.is_none(), "{context}: restore left unfinished");
            assert!(
                vm.resources.root.is_some(),
                "{context}: {} has no root",
                vm.name
            );
        }
        let again = manager.reconcile().await.unwrap();
        assert!(again.is_clean(), "{context}: second reconcile {again:?}");
        // The host still works.
        manager.create(request("after")).await.unwrap();
    }
}

#[tokio::test]
async fn a_crash_at_any_step_of_snapshot_restore_or_clone_is_reconciled() {
    let with_vm = async |h: &FakeHost| {
        h.manager.create(request("web")).await.unwrap();
    };
    let with_snapshot = async |h: &FakeHost| {
        h.manager.create(request("web")).await.unwrap();
        h.manager
            .snapshot(&name("web"), name("snap"))
            .await
            .unwrap();
    };
    crash_then_reconcile("snapshot", with_vm, async |m: &Manager| {
        m.snapshot(&name("web"), name("snap")).await.map(drop)
    })
    .await;
    crash_then_reconcile("restore", with_snapshot, async |m: &Manager| {
        m.restore(&name("web"), &name("snap")).await.map(drop)
    })
    .await;
    crash_then_reconcile("clone", with_snapshot, async |m: &Manager| {
        m.clone_vm(
            CloneSource::Vm(name("web")),
            Some(name("copy")),
            UserId::LOCAL,
        )
        .await
        .map(drop)
    })
    .await;
    crash_then_reconcile(
        "clone from a snapshot",
        with_snapshot,
        async |m: &Manager| {
            m.clone_vm(
                CloneSource::Snapshot(name("snap")),
                Some(name("copy")),
                UserId::LOCAL,
            )
            .await
            .map(drop)
        },
    )
    .await;
}

#[tokio::test]
async fn rm_keep_data_hands_the_data_volume_over_and_reconcile_leaves_it() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let options = vmkit_core::DeleteOptions::default().keep_data(true);
    host.manager.delete(&name("web"), options).await.unwrap();
    assert_eq!(host.holdings().await, Holdings::default());
    let report = host.manager.reconcile().await.unwrap();
    assert!(report.orphans.is_empty(), "{report:?}");
}

#[tokio::test]
async fn guest_logs_come_from_the_agent_and_can_be_followed() {
    use vmkit_guest::LogsRequest;
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    let mut last_two = LogsRequest::unit("ssh");
    last_two.lines = 2;
    assert_eq!(
        host.manager
            .guest_logs(&name("web"), last_two)
            .await
            .unwrap(),
        ["ssh: fake line 2", "ssh: fake line 3"]
    );
    assert_eq!(
        host.manager
            .guest_logs(&name("web"), LogsRequest::file("/etc/hostname"))
            .await
            .unwrap(),
        ["web"],
        "the guest's files"
    );
    let err = host
        .manager
        .guest_logs(&name("web"), LogsRequest::file("/nope"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");

    let mut stream = host
        .manager
        .follow_guest_logs(&name("web"), LogsRequest::unit("ssh"))
        .await
        .unwrap();
    for i in 1..=3 {
        let line = stream.next().await.unwrap().unwrap();
        assert_eq!(line, format!("ssh: fake line {i}"));
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), stream.next())
            .await
            .is_err(),
        "a followed log stays open for new lines"
    );
    drop(stream);

    host.manager.stop(&name("web")).await.unwrap();
    assert!(matches!(
        host.manager
            .guest_logs(&name("web"), LogsRequest::unit("ssh"))
            .await,
        Err(ManagerError::WrongState { .. })
    ));
}

#[tokio::test]
async fn rm_keep_data_says_and_records_where_the_data_volume_went() {
    let host = FakeHost::new().await;
    let vm = host.manager.create(request("web")).await.unwrap();
    let data = vm.resources.data.unwrap();
    host.storage.write(&data.path, 0, b"proof").unwrap();
    let options = vmkit_core::DeleteOptions::default().keep_data(true);
    let deleted = host.manager.delete(&name("web"), options).await.unwrap();
    assert_eq!(deleted.name, name("web"));
    let kept = deleted.kept_data.expect("the data volume was kept");
    assert_eq!(
        host.storage.read(&kept, 0, 5).unwrap(),
        b"proof",
        "{} holds the data volume",
        kept.display()
    );
    let events = host.manager.events(0, 100).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == EventKind::DataKept { path: kept.clone() }),
        "{events:?}"
    );

    host.manager.create(request("plain")).await.unwrap();
    let deleted = host
        .manager
        .delete(&name("plain"), vmkit_core::DeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(deleted.kept_data, None, "a plain delete keeps nothing");
}

/// `web` with a data disk, each disk starting with `snap!`, snapshot `snap` of it,
/// then both disks overwritten with `new!`.
async fn web_with_snapshot(host: &FakeHost) {
    host.manager.create(request("web")).await.unwrap();
    mark_disks(host, b"snap!").await;
    host.manager
        .snapshot(&name("web"), name("snap"))
        .await
        .unwrap();
    mark_disks(host, b"new!!").await;
}

async fn mark_disks(host: &FakeHost, mark: &[u8]) {
    let vm = host.manager.get(&name("web")).await.unwrap();
    for disk in [&vm.resources.root, &vm.resources.data] {
        host.storage
            .write(&disk.as_ref().unwrap().path, 0, mark)
            .unwrap();
    }
}

/// What the first bytes of `web`'s root and data disks say.
async fn disk_marks(host: &FakeHost) -> (Vec<u8>, Vec<u8>) {
    let vm = host.store.get_vm(&name("web")).await.unwrap().unwrap();
    let read = |disk: &Option<vmkit_core::Volume>| {
        let disk = disk.as_ref().expect("web has the disk");
        host.storage
            .read(&disk.path, 0, 5)
            .expect("the recorded disk exists")
    };
    (read(&vm.resources.root), read(&vm.resources.data))
}

/// The race of issue 13: a snapshot deleted while a restore from it stops the VM
/// and copies its disks. The delete waits for the restore, which completes.
#[tokio::test]
async fn a_snapshot_delete_waits_for_a_restore_from_it_and_the_vm_keeps_disks() {
    let host = FakeHost::new().await;
    web_with_snapshot(&host).await;
    let copying = host.storage.hold("storage.copy_volume");
    let manager = host.manager.clone();
    let restore = tokio::spawn(async move { manager.restore(&name("web"), &name("snap")).await });
    copying.arrived().await;

    let manager = host.manager.clone();
    let delete = tokio::spawn(async move { manager.delete_snapshot(&name("snap")).await });
    // On this single-threaded runtime each yield lets the delete take its next
    // step; the fakes never wait, so without the lock it would be done by now.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !delete.is_finished(),
        "the delete waits for the restore from its snapshot"
    );
    copying.release();
    let restored = restore.await.unwrap().unwrap();
    delete.await.unwrap().unwrap();

    assert_eq!(restored.state, VmState::Running);
    assert_eq!(
        disk_marks(&host).await,
        (b"snap!".to_vec(), b"snap!".to_vec()),
        "the VM runs on the snapshot's disks"
    );
    assert!(host.manager.list_snapshots(None).await.unwrap().is_empty());
    assert_eq!(host.holdings().await.volumes, 2, "the VM's two disks");
}

/// The step (1-based, counted by the fakes from a reset) at which a restore of
/// `web` to `snap` first copies a disk.
async fn first_copy_step_of_a_restore() -> u64 {
    let probe = FakeHost::new().await;
    web_with_snapshot(&probe).await;
    probe.faults.reset();
    probe
        .manager
        .restore(&name("web"), &name("snap"))
        .await
        .unwrap();
    let log = probe.faults.log();
    log.iter()
        .position(|op| *op == "storage.copy_volume")
        .expect("a restore copies disks") as u64
        + 1
}

#[tokio::test]
async fn a_restore_whose_copy_fails_leaves_the_vm_its_own_disks() {
    let step = first_copy_step_of_a_restore().await;
    let host = FakeHost::new().await;
    web_with_snapshot(&host).await;
    host.faults.fail_at(step);

    let err = host
        .manager
        .restore(&name("web"), &name("snap"))
        .await
        .unwrap_err();

    assert!(matches!(err, ManagerError::Storage(_)), "{err}");
    let vm = host.manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(vm.restoring, None, "the failed restore is given up");
    assert_eq!(
        disk_marks(&host).await,
        (b"new!!".to_vec(), b"new!!".to_vec()),
        "its own disks, untouched"
    );
    assert_eq!(host.holdings().await.volumes, 4, "no copy is left");
    host.manager.start(&name("web")).await.unwrap();
    host.manager.delete_snapshot(&name("snap")).await.unwrap();
}

/// A crash at every step of a restore, then reconcile: the VM has both disks,
/// both its own or both the snapshot's (never one of each, never none), and
/// nothing else is left.
#[tokio::test]
async fn a_restore_cut_short_anywhere_ends_with_all_old_or_all_restored_disks() {
    let probe = FakeHost::new().await;
    web_with_snapshot(&probe).await;
    probe.faults.reset();
    probe
        .manager
        .restore(&name("web"), &name("snap"))
        .await
        .unwrap();
    let steps = probe.faults.calls();
    let mut outcomes = std::collections::BTreeSet::new();
    for step in 1..=steps {
        let host = FakeHost::new().await;
        web_with_snapshot(&host).await;
        host.faults.crash_at(step);
        let _ = host.manager.restore(&name("web"), &name("snap")).await;
        let marked = host
            .store
            .get_vm(&name("web"))
            .await
            .unwrap()
            .unwrap()
            .restoring
            .is_some();
        host.faults.reset();
        let manager = Manager::new(
            ManagerConfig::new("/nonexistent/vmkit"),
            host.manager.backends().clone(),
        )
        .await
        .unwrap();
        manager.reconcile().await.unwrap();

        let context = format!("crash at restore step {step}");
        let (root, data) = disk_marks(&host).await;
        assert_eq!(root, data, "{context}: one disk of each");
        if marked {
            assert_eq!(root, b"snap!", "{context}: a marked restore is finished");
        }
        outcomes.insert(root);
        let vm = host.store.get_vm(&name("web")).await.unwrap().unwrap();
        assert_eq!((vm.restoring, vm.restore_into), (None, None), "{context}");
        assert_eq!(
            host.holdings().await.volumes,
            4,
            "{context}: the VM's two disks and the snapshot's"
        );
        manager.delete_snapshot(&name("snap")).await.unwrap();
        assert_eq!(host.holdings().await.volumes, 2, "{context}");
        assert!(manager.reconcile().await.unwrap().is_clean(), "{context}");
    }
    assert_eq!(
        outcomes.len(),
        2,
        "early crashes keep the old disks, late ones finish the restore"
    );
}

#[tokio::test]
async fn root_disks_and_snapshots_count_against_the_disk_quota() {
    // The fake image is 1 GiB: `web` holds a 1 GiB root and a 1 GiB data disk.
    let quota = Quota::unlimited().max_disk_gib(4);
    let host =
        FakeHost::with_config(ManagerConfig::new("/nonexistent/vmkit").default_quota(quota)).await;
    host.manager.create(request("web")).await.unwrap();

    let err = host
        .manager
        .snapshot(&name("web"), name("snap"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ManagerError::QuotaExceeded(e) if e.resource == QuotaResource::DiskGib),
        "2 GiB of disks and 512 MiB of memory do not fit in the 2 GiB left: {err}"
    );
    assert_eq!(host.holdings().await.volumes, 2, "nothing was copied");

    host.manager.stop(&name("web")).await.unwrap();
    host.manager
        .snapshot(&name("web"), name("snap"))
        .await
        .expect("a stopped VM's snapshot holds its 2 GiB of disks, no memory");
    let err = host
        .manager
        .create(CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny")).name(name("db")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ManagerError::QuotaExceeded(_)),
        "the snapshot's disks count: {err}"
    );
    host.manager.delete_snapshot(&name("snap")).await.unwrap();
    host.manager
        .create(CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").root_gib(2)).name(name("db")))
        .await
        .expect("a 2 GiB root disk fits once the snapshot is gone");
    let err = host
        .manager
        .resize(&name("web"), ResizeRequest::new().disk_gib(2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ManagerError::QuotaExceeded(_)),
        "root disks count: {err}"
    );
}

/// Two resizes at once whose sum exceeds the quota: the second is refused at once,
/// while the first still grows its disk, instead of both passing the same check.
#[tokio::test]
async fn concurrent_resizes_cannot_both_take_the_same_quota() {
    let quota = Quota::unlimited().max_disk_gib(6);
    let host =
        FakeHost::with_config(ManagerConfig::new("/nonexistent/vmkit").default_quota(quota)).await;
    for vm in ["a", "b"] {
        host.manager.create(request(vm)).await.unwrap();
        host.manager.stop(&name(vm)).await.unwrap();
    }
    let growing = host.storage.hold("storage.resize");
    let manager = host.manager.clone();
    let first = tokio::spawn(async move {
        manager
            .resize(&name("a"), ResizeRequest::new().disk_gib(3))
            .await
    });
    growing.arrived().await;

    let b = name("b");
    let second = host.manager.resize(&b, ResizeRequest::new().disk_gib(3));
    let second = tokio::select! {
        r = second => r,
        () = growing.arrived() => panic!("the second resize went on to grow its disk"),
    };
    assert!(
        matches!(&second, Err(ManagerError::QuotaExceeded(_))),
        "a: 1 + 3 GiB, b: 1 + 3 GiB is 8 > 6: {second:?}"
    );
    growing.release();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.spec.disk_gib, 3);
    assert_eq!(host.manager.get(&name("b")).await.unwrap().spec.disk_gib, 1);
}

#[tokio::test]
async fn the_guest_is_asked_to_grow_its_filesystems_after_every_start() {
    let host = FakeHost::new().await;
    let vm = host.manager.create(request("web")).await.unwrap();
    let guest = |vm: &vmkit_core::VmRecord| {
        host.hypervisor
            .guest(vm.resources.vmm.as_ref().unwrap().pid)
            .unwrap()
    };
    assert_eq!(guest(&vm).grow_requests, 1);
    host.manager.stop(&name("web")).await.unwrap();
    host.manager
        .resize(&name("web"), ResizeRequest::new().disk_gib(2))
        .await
        .unwrap();
    let vm = host.manager.start(&name("web")).await.unwrap();
    assert_eq!(guest(&vm).grow_requests, 1, "the new VMM's guest was asked");
}

/// A resize records the new size before the disk grows; cut short in between (the
/// process died), asking for the same size again grows the disk.
#[tokio::test]
async fn a_resize_cut_short_before_the_disk_grew_grows_it_when_asked_again() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    host.manager.stop(&name("web")).await.unwrap();
    let growing = host.storage.hold("storage.resize");
    let manager = host.manager.clone();
    let cut = tokio::spawn(async move {
        manager
            .resize(&name("web"), ResizeRequest::new().disk_gib(3))
            .await
    });
    growing.arrived().await;
    cut.abort();
    let _ = cut.await;
    growing.release();
    let vm = host.manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.spec.disk_gib, 3, "the size was recorded first");
    assert_eq!(vm.resources.data.as_ref().unwrap().size_bytes, 1 << 30);

    let vm = host
        .manager
        .resize(&name("web"), ResizeRequest::new().disk_gib(3))
        .await
        .unwrap();

    assert_eq!(vm.resources.data.as_ref().unwrap().size_bytes, 3 << 30);
}
