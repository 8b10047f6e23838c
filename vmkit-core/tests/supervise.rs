#![allow(clippy::unwrap_used)]
//! The manager's reactions to what VMMs report (`Manager::supervise`), on the fakes:
//! a guest reboot, power-off and panic, and checks that one hung VMM cannot stop.

use std::time::Duration;

use tokio::sync::mpsc;
use vmkit_core::guest::{ExecEvent, ExecRequest};
use vmkit_core::testing::FakeHost;
use vmkit_core::{
    CreateRequest, EventFeed, EventKind, Health, ManagerConfig, UserId, VmName, VmSpec, VmState,
    VmmHandle,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

fn request(n: &str) -> CreateRequest {
    CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny")).name(name(n))
}

/// A host whose manager supervises its VMMs; VMs that died come out of `died`.
struct Supervised {
    host: FakeHost,
    _data: tempfile::TempDir,
    died: mpsc::UnboundedReceiver<VmName>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn supervised() -> Supervised {
    // A real data directory: the consoles of stopped VMs are kept there.
    let data = tempfile::tempdir().unwrap();
    let host = FakeHost::with_config(ManagerConfig::new(data.path())).await;
    let (tx, died) = mpsc::unbounded_channel();
    let manager = host.manager.clone();
    let task = tokio::spawn(async move { manager.supervise(tx).await });
    Supervised {
        host,
        _data: data,
        died,
        task,
    }
}

/// Reads `feed` until an event about `vm` matches `wanted`; fails after 10 s.
async fn wait_for(feed: &mut EventFeed, vm: &str, wanted: impl Fn(&EventKind) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = feed.next().await.unwrap().unwrap();
            if event.vm_name.as_ref() == Some(&name(vm)) && wanted(&event.kind) {
                return;
            }
        }
    })
    .await
    .expect("the event came");
}

async fn exec_stdout(host: &FakeHost, vm: &str, argv: &[&str]) -> String {
    let mut stream = host
        .manager
        .exec(&name(vm), ExecRequest::new(argv.iter().copied()))
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(event) = stream.next().await {
        if let ExecEvent::Stdout(bytes) = event.unwrap() {
            out.extend_from_slice(&bytes);
        }
    }
    String::from_utf8(out).unwrap()
}

fn vmm(vm: &vmkit_core::VmRecord) -> VmmHandle {
    vm.resources.vmm.clone().unwrap()
}

#[tokio::test]
async fn reboot_in_the_guest_keeps_the_vm_running_and_configures_the_new_boot() {
    let s = supervised().await;
    let vm = s.host.manager.create(request("web")).await.unwrap();
    let handle = vmm(&vm);
    let boot = exec_stdout(&s.host, "web", &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    let mut feed = s
        .host
        .manager
        .follow_events(s.host.manager.last_event_seq().await.unwrap());

    s.host.hypervisor.guest_reboot(&handle);

    wait_for(&mut feed, "web", |k| *k == EventKind::GuestRebooted).await;
    wait_for(&mut feed, "web", |k| {
        *k == EventKind::HealthChanged {
            health: Health::Healthy,
        }
    })
    .await;
    let vm = s.host.manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.resources.vmm, Some(handle.clone()), "the same VMM");
    let guest = s.host.hypervisor.guest(handle.pid).unwrap();
    assert_eq!(
        guest.hostname.as_deref(),
        Some("web"),
        "the new boot was configured again"
    );
    assert!(guest.network.is_some());
    let new_boot = exec_stdout(&s.host, "web", &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_ne!(new_boot, boot, "a new boot");
}

#[tokio::test]
async fn power_off_in_the_guest_stops_the_vm_and_keeps_its_console() {
    let mut s = supervised().await;
    let vm = s.host.manager.create(request("web")).await.unwrap();
    let mut feed = s
        .host
        .manager
        .follow_events(s.host.manager.last_event_seq().await.unwrap());

    s.host.hypervisor.guest_poweroff(&vmm(&vm));

    wait_for(&mut feed, "web", |k| *k == EventKind::GuestPoweredOff).await;
    wait_for(
        &mut feed,
        "web",
        |k| matches!(k, EventKind::StateChanged { to, .. } if *to == VmState::Stopped),
    )
    .await;
    let vm = s.host.manager.get(&name("web")).await.unwrap();
    assert_eq!((vm.state, vm.resources.vmm), (VmState::Stopped, None));
    assert_eq!(s.host.hypervisor.running(), Vec::<u32>::new());
    let logs = s.host.manager.logs(&name("web"), 4096).await.unwrap();
    assert!(logs.contains("reboot: Power down"), "{logs}");
    assert!(
        s.died.try_recv().is_err(),
        "a power-off is what the guest asked for: no restart"
    );
}

#[tokio::test]
async fn a_panic_in_the_guest_stops_the_vm_with_a_panic_event_and_the_console_kept() {
    let mut s = supervised().await;
    let vm = s.host.manager.create(request("web")).await.unwrap();
    s.host.manager.create(request("db")).await.unwrap();
    let mut feed = s
        .host
        .manager
        .follow_events(s.host.manager.last_event_seq().await.unwrap());

    s.host.hypervisor.guest_panic(&vmm(&vm));

    wait_for(&mut feed, "web", |k| *k == EventKind::GuestPanicked).await;
    let died = tokio::time::timeout(Duration::from_secs(10), s.died.recv())
        .await
        .unwrap();
    assert_eq!(died, Some(name("web")), "for the exit policy");
    let vm = s.host.manager.get(&name("web")).await.unwrap();
    assert_eq!((vm.state, vm.resources.vmm), (VmState::Stopped, None));
    let logs = s.host.manager.logs(&name("web"), 4096).await.unwrap();
    assert!(logs.contains("Kernel panic - not syncing"), "{logs}");
    let db = s.host.manager.get(&name("db")).await.unwrap();
    assert_eq!(db.state, VmState::Running, "the other VM is untouched");
    s.host.manager.start(&name("web")).await.unwrap();
}

#[tokio::test]
async fn a_vm_stopped_by_its_owner_gets_no_exit_event() {
    let s = supervised().await;
    s.host.manager.create(request("web")).await.unwrap();
    s.host.manager.stop(&name("web")).await.unwrap();
    // The stopped VMM's exit reaches the follower; the crash of the next one
    // comes after it, and the events in between tell.
    let vm = s.host.manager.start(&name("web")).await.unwrap();
    let mut feed = s
        .host
        .manager
        .follow_events(s.host.manager.last_event_seq().await.unwrap());
    s.host.hypervisor.guest_poweroff(&vmm(&vm));
    wait_for(&mut feed, "web", |k| *k == EventKind::GuestPoweredOff).await;
    let events = s.host.manager.events(0, 1000).await.unwrap();
    let exits: Vec<&EventKind> = events
        .iter()
        .map(|e| &e.kind)
        .filter(|k| {
            matches!(
                k,
                EventKind::VmmExited | EventKind::GuestPoweredOff | EventKind::GuestPanicked
            )
        })
        .collect();
    assert_eq!(exits, [&EventKind::GuestPoweredOff], "only the guest's own");
}

#[tokio::test]
async fn one_hung_vmm_does_not_stop_the_checks_of_the_others() {
    let host = FakeHost::with_config(
        ManagerConfig::new("/nonexistent/vmkit").vmm_check_timeout(Duration::from_millis(300)),
    )
    .await;
    let hung = host.manager.create(request("hung")).await.unwrap();
    let gone = host.manager.create(request("gone")).await.unwrap();
    host.hypervisor.hang(&vmm(&hung));
    host.hypervisor.crash(&vmm(&gone));

    let died = tokio::time::timeout(Duration::from_secs(5), host.manager.check_vmms())
        .await
        .expect("the check ends though one VMM does not answer")
        .unwrap();

    assert_eq!(died, [name("gone")]);
    let gone = host.manager.get(&name("gone")).await.unwrap();
    assert_eq!(gone.state, VmState::Stopped);
    let hung = host.manager.get(&name("hung")).await.unwrap();
    assert_eq!(
        hung.state,
        VmState::Running,
        "a VMM that does not answer is not dead"
    );
}

#[tokio::test]
async fn the_poll_names_the_reason_the_backend_saw() {
    let host = FakeHost::new().await;
    let vm = host.manager.create(request("web")).await.unwrap();
    host.hypervisor.guest_panic(&vmm(&vm));

    let died = host.manager.check_vmms().await.unwrap();

    assert_eq!(died, [name("web")]);
    let events = host.manager.events(0, 1000).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == EventKind::GuestPanicked),
        "{events:?}"
    );
}
