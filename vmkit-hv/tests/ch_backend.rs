//! The cloud-hypervisor backend, spawning the spec-following stand-in as its
//! `cloud-hypervisor`: the generic Hypervisor suite, then faults, snapshot and
//! restore, re-attach, resize, shutdown and the console cap.

#[path = "support/ch_standin/mod.rs"]
mod ch_standin;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use ch_standin::schema::Spec;
use ch_standin::{Behaviour, TestHost};
use serde_json::Value;
use vmkit_core::guest::ExecRequest;
use vmkit_core::testing::suites::{self, wait_for_agent};
use vmkit_core::{Hypervisor, HypervisorError, Resize, VmmHandle, VmmState};
use vmkit_hv::{ChConfig, CloudHypervisor};

#[test]
#[ignore = "the cloud-hypervisor stand-in's entry point; the backend runs it"]
fn ch_standin_entry() {
    ch_standin::entry();
}

const BOOT: Duration = Duration::from_secs(20);

/// The requests the stand-in of `run_dir` received: (method, path, body).
fn requests(run_dir: &Path) -> Vec<(String, String, Value)> {
    let text = std::fs::read_to_string(run_dir.join("standin-requests.jsonl"))
        .expect("the stand-in's request log");
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            (
                v["method"].as_str().unwrap_or_default().to_owned(),
                v["path"].as_str().unwrap_or_default().to_owned(),
                v["body"].clone(),
            )
        })
        .collect()
}

fn paths(run_dir: &Path) -> Vec<String> {
    requests(run_dir).into_iter().map(|(_, p, _)| p).collect()
}

fn signal(handle: &VmmHandle, sig: libc::c_int) {
    assert_eq!(
        ch_standin::proc_start(handle.pid),
        Some(handle.pid_start),
        "the VMM is still the process we started"
    );
    let pid = libc::pid_t::try_from(handle.pid).expect("pid");
    // SAFETY: kill takes a pid and a signal; the check above makes sure the pid is
    // the stand-in this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

async fn echo(hv: &CloudHypervisor, handle: &VmmHandle, word: &str) -> Vec<u8> {
    let client = wait_for_agent(hv, handle, BOOT).await;
    client
        .exec_collect(ExecRequest::new(["echo", word]), 1 << 16)
        .await
        .expect("exec echo")
        .stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_passes_the_generic_hypervisor_suite() {
    let host = TestHost::new(Behaviour::default());
    suites::hypervisor_suite(&host.backend(), &host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_sends_create_then_boot_with_the_exact_config() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let config = host.machine("exact");
    let handle = hv.start(&config).await.expect("start");

    let log = requests(&config.run_dir);
    let calls: Vec<&str> = log.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        calls
            .iter()
            .copied()
            .filter(|p| *p != "/vmm.ping")
            .collect::<Vec<_>>(),
        ["/vm.create", "/vm.boot"]
    );
    let sent = &log
        .iter()
        .find(|(_, p, _)| p == "/vm.create")
        .expect("create")
        .2;
    let expected: Value =
        serde_json::from_str(&hv.vm_create_json(&config).expect("json")).expect("parse");
    assert_eq!(sent, &expected, "vm.create carries vm_create_json");
    let spec = Spec::load().expect("spec");
    let report = spec.validate_component("VmConfig", sent);
    assert!(report.is_strictly_valid(), "{report:?}");

    hv.kill(&handle).await.expect("kill");
    hv.cleanup(&handle).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cloud_hypervisor_refuses_is_refused_with_its_message() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let handle = hv.start(&host.machine("refused")).await.expect("start");

    hv.pause(&handle).await.expect("pause");
    let err = hv.pause(&handle).await.expect_err("a second pause");
    let HypervisorError::Refused { operation, message } = err else {
        panic!("expected Refused, got {err:?}");
    };
    assert_eq!(operation, "vm.pause");
    assert_eq!(
        message,
        "Error from API: The VM could not be paused: Cannot pause VM: Failed to pause \
         migratable component: Invalid transition: InvalidStateTransition(Paused, Paused)"
    );
    hv.resume(&handle).await.expect("resume");

    let err = hv
        .resize(&handle, Resize::new(Some(3), None))
        .await
        .expect_err("more vCPUs than max");
    assert!(
        matches!(&err, HypervisorError::Refused { operation: "vm.resize", message }
            if message.ends_with("Requested vCPUs exceed maximum")),
        "{err:?}"
    );
    hv.kill(&handle).await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_failure_is_refused_and_leaves_no_vmm() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let mut config = host.machine("nokernel");
    config.kernel = host.dir.path().join("no-such-kernel");

    let err = hv.start(&config).await.expect_err("start without a kernel");
    assert!(
        matches!(&err, HypervisorError::Refused { operation: "vm.boot", message }
            if message.contains("Cannot open kernel file")),
        "{err:?}"
    );
    let conn = std::os::unix::net::UnixStream::connect(config.run_dir.join("api.sock"));
    assert!(
        conn.is_err(),
        "the VMM that refused is gone: {:?} {:?}",
        std::fs::read_dir(&config.run_dir)
            .map(|d| d.map(|e| e.map(|e| e.file_name())).collect::<Vec<_>>()),
        std::fs::read_to_string(config.run_dir.join("vmm.stderr.log"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_binary_is_a_spawn_error() {
    let host = TestHost::new(Behaviour::default());
    for binary in [
        "/nonexistent/cloud-hypervisor",
        "vmkit-no-such-cloud-hypervisor",
    ] {
        let hv = CloudHypervisor::new(host.ch_config().binary(binary));
        let err = hv
            .start(&host.machine("nobinary"))
            .await
            .expect_err("start without the program");
        assert!(
            matches!(&err, HypervisorError::Spawn { binary: b, source }
                if b == Path::new(binary) && source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_vmm_is_detected_by_its_pid_and_socket() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let handle = hv.start(&host.machine("crash")).await.expect("start");
    assert_eq!(echo(&hv, &handle, "alive").await, b"alive\n");

    signal(&handle, libc::SIGKILL);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ch_standin::proc_start(handle.pid).is_some() {
        assert!(std::time::Instant::now() < deadline, "the VMM did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Exited
    );
    assert!(matches!(
        hv.attach(&handle).await,
        Err(HypervisorError::NotRunning { pid }) if pid == handle.pid
    ));
    assert!(matches!(
        hv.connect_agent(&handle).await,
        Err(HypervisorError::NotRunning { .. })
    ));
    assert!(matches!(
        hv.pause(&handle).await,
        Err(HypervisorError::NotRunning { .. })
    ));
    hv.shutdown(&handle, Duration::from_secs(1))
        .await
        .expect("shutting down a dead VMM is a no-op");
    hv.cleanup(&handle).await.expect("cleanup");
    assert!(!handle.run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_vmm_times_out_instead_of_blocking() {
    let host = TestHost::new(Behaviour::default());
    let hv = CloudHypervisor::new(host.ch_config().api_timeout(Duration::from_millis(500)));
    let handle = hv.start(&host.machine("hung")).await.expect("start");

    signal(&handle, libc::SIGSTOP);
    // kill() returns before the stop takes effect: wait until the kernel says it is
    // stopped (state T), or a request may still be answered on a loaded machine.
    let stat = format!("/proc/{}/stat", handle.pid);
    let stopped = || {
        std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(false)
    };
    for _ in 0..500 {
        if stopped() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped(), "the stand-in did not stop");
    let err = hv.info(&handle).await.expect_err("info of a stopped VMM");
    assert!(
        matches!(
            err,
            HypervisorError::Timeout {
                operation: "vm.info",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        hv.pause(&handle).await,
        Err(HypervisorError::Timeout {
            operation: "vm.pause",
            ..
        })
    ));
    hv.kill(&handle)
        .await
        .expect("SIGKILL ends even a stopped VMM");
    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Exited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_sockets_of_a_crashed_vmm_are_removed_before_reuse() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let config = host.machine("stale");
    std::fs::create_dir_all(&config.run_dir).expect("run dir");
    for name in ["api.sock", "vsock.sock"] {
        // A socket file nobody listens on, as a killed VMM leaves it.
        drop(std::os::unix::net::UnixListener::bind(config.run_dir.join(name)).expect("bind"));
        assert!(config.run_dir.join(name).exists());
    }

    let first = hv.start(&config).await.expect("start over stale sockets");
    assert_eq!(echo(&hv, &first, "first").await, b"first\n");

    // Crash it: its sockets stay behind, and the same run directory is used again.
    signal(&first, libc::SIGKILL);
    hv.kill(&first).await.expect("wait for the end");
    assert!(
        config.run_dir.join("api.sock").exists(),
        "a crash leaves the socket"
    );
    let second = hv.start(&config).await.expect("start after a crash");
    assert_ne!(second.pid, first.pid);
    assert_eq!(echo(&hv, &second, "second").await, b"second\n");
    hv.kill(&second).await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_dir_whose_vmm_still_listens_is_not_taken_over() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let config = host.machine("busy");
    let running = hv.start(&config).await.expect("start");

    let err = hv
        .start(&config)
        .await
        .expect_err("a second VMM in the same run dir");
    assert!(matches!(err, HypervisorError::InvalidConfig(_)), "{err:?}");
    assert_eq!(
        hv.attach(&running).await.expect("attach"),
        VmmState::Running
    );
    hv.kill(&running).await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_refused_unless_paused() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let handle = hv.start(&host.machine("snap")).await.expect("start");
    let dir = host.dir.path().join("snap-dir");

    let err = hv
        .snapshot(&handle, &dir)
        .await
        .expect_err("snapshot while running");
    assert!(
        matches!(&err, HypervisorError::Refused { operation: "vm.snapshot", message }
            if message.ends_with("Trying to snapshot while VM is running")),
        "{err:?}"
    );

    hv.pause(&handle).await.expect("pause");
    hv.snapshot(&handle, &dir)
        .await
        .expect("snapshot while paused");
    for file in ["config.json", "state.json", "memory-ranges"] {
        assert!(dir.join(file).exists(), "{file} written");
    }
    let err = hv
        .snapshot(&handle, &dir)
        .await
        .expect_err("over an earlier snapshot");
    assert!(
        matches!(&err, HypervisorError::Refused { message, .. }
            if message.contains("Error creating VM config snapshot file")),
        "{err:?}"
    );
    hv.kill(&handle).await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_goes_into_a_fresh_vmm_in_another_run_dir() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let original = host.machine("orig");
    let handle = hv.start(&original).await.expect("start");
    assert_eq!(echo(&hv, &handle, "before").await, b"before\n");
    hv.pause(&handle).await.expect("pause");
    let dir = host.dir.path().join("orig-snapshot");
    hv.snapshot(&handle, &dir).await.expect("snapshot");
    hv.shutdown(&handle, Duration::from_secs(2))
        .await
        .expect("shutdown");

    let mut target = host.machine("copy");
    target.disks.clone_from(&original.disks);
    let restored = hv.restore(&target, &dir).await.expect("restore");
    assert_ne!(restored.pid, handle.pid, "a new VMM process");
    assert_eq!(restored.run_dir, target.run_dir);
    assert_eq!(
        paths(&target.run_dir)
            .into_iter()
            .filter(|p| p != "/vmm.ping")
            .collect::<Vec<_>>(),
        ["/vm.restore"],
        "a restoring VMM is never sent vm.create"
    );
    let spec = Spec::load().expect("spec");
    for (_, path, body) in requests(&target.run_dir) {
        if path == "/vm.restore" {
            let report = spec.validate_component("RestoreConfig", &body);
            assert!(report.is_strictly_valid(), "{report:?}");
            assert_eq!(body["resume"], false);
        }
    }
    let info = hv.info(&restored).await.expect("info");
    assert_eq!((info.state, info.vcpus), (VmmState::Paused, 1));

    hv.resume(&restored).await.expect("resume");
    let client = wait_for_agent(&hv, &restored, BOOT).await;
    assert_eq!(
        client.hello().await.expect("hello").boot_id,
        "standin-restored",
        "the agent answers through the restored VM's own vsock socket"
    );
    assert_eq!(echo(&hv, &restored, "after").await, b"after\n");
    hv.shutdown(&restored, Duration::from_secs(5))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_without_a_snapshot_is_refused() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let err = hv
        .restore(&host.machine("nosnap"), &host.dir.path().join("empty"))
        .await
        .expect_err("restore from nothing");
    assert!(
        matches!(
            err,
            HypervisorError::Refused {
                operation: "restore",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backend_instance_reattaches_after_a_daemon_restart() {
    let host = TestHost::new(Behaviour::default());
    let first = host.backend();
    let handle = first.start(&host.machine("reattach")).await.expect("start");
    drop(first);

    let second = host.backend();
    assert_eq!(
        second.attach(&handle).await.expect("attach"),
        VmmState::Running
    );
    assert_eq!(echo(&second, &handle, "again").await, b"again\n");
    let stored: VmmHandle =
        serde_json::from_str(&serde_json::to_string(&handle).expect("store")).expect("load");
    assert_eq!(
        second.attach(&stored).await.expect("attach"),
        VmmState::Running
    );
    second
        .shutdown(&handle, Duration::from_secs(5))
        .await
        .expect("shutdown");
    assert_eq!(
        second.info(&handle).await.expect("info").state,
        VmmState::Exited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_whose_pid_was_recycled_is_not_attached_or_killed() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let handle = hv.start(&host.machine("recycled")).await.expect("start");
    let mut stranger = handle.clone();
    stranger.pid_start += 1;

    assert!(matches!(
        hv.attach(&stranger).await,
        Err(HypervisorError::NotRunning { .. })
    ));
    hv.kill(&stranger).await.expect("nothing to kill");
    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Running,
        "the real VMM was not hit"
    );
    hv.kill(&handle).await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_forces_a_guest_that_ignores_the_power_button() {
    let host = TestHost::new(Behaviour {
        ignore_power_button: true,
        ..Behaviour::default()
    });
    let hv = host.backend();
    let config = host.machine("stubborn");
    let handle = hv.start(&config).await.expect("start");

    hv.shutdown(&handle, Duration::from_millis(300))
        .await
        .expect("shutdown");
    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Exited
    );
    let calls = paths(&config.run_dir);
    let tail: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|p| *p != "/vm.info" && *p != "/vmm.ping")
        .skip(2)
        .collect();
    assert_eq!(tail, ["/vm.power-button", "/vm.shutdown", "/vmm.shutdown"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_a_cooperative_guest_uses_only_the_power_button() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let config = host.machine("polite");
    let handle = hv.start(&config).await.expect("start");
    hv.shutdown(&handle, Duration::from_secs(10))
        .await
        .expect("shutdown");
    let calls = paths(&config.run_dir);
    assert_eq!(calls.last().map(String::as_str), Some("/vm.power-button"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_changes_vcpus_and_grows_memory_in_hotplug_steps() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let handle = hv.start(&host.machine("resize")).await.expect("start");

    hv.resize(&handle, Resize::new(Some(2), Some(384)))
        .await
        .expect("grow");
    let info = hv.info(&handle).await.expect("info");
    assert_eq!((info.vcpus, info.memory_mib), (2, 384));

    assert!(matches!(
        hv.resize(&handle, Resize::new(None, Some(256))).await,
        Err(HypervisorError::Unsupported { .. })
    ));
    assert!(matches!(
        hv.resize(&handle, Resize::new(None, Some(400))).await,
        Err(HypervisorError::InvalidConfig(_))
    ));
    let err = hv
        .resize(&handle, Resize::new(None, Some(384 + 2048)))
        .await
        .expect_err("beyond the hotplug region");
    assert!(
        matches!(&err, HypervisorError::Refused { message, .. }
            if message.ends_with("Not enough space in the hotplug RAM region")),
        "{err:?}"
    );

    let no_hotplug = CloudHypervisor::new(host.ch_config().hotplug_memory_mib(0));
    assert!(!no_hotplug.capabilities().resize_memory);
    assert!(matches!(
        no_hotplug
            .resize(&handle, Resize::new(None, Some(512)))
            .await,
        Err(HypervisorError::Unsupported { .. })
    ));
    hv.kill(&handle).await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_log_is_kept_within_its_cap() {
    let host = TestHost::new(Behaviour {
        console_bytes: 1 << 20,
        ..Behaviour::default()
    });
    let hv = host.backend();
    let config = host.machine("noisy");
    let limit = config.console_limit;
    let handle = hv.start(&config).await.expect("start");
    let log = config.run_dir.join("console.log");

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let meta = std::fs::metadata(&log).expect("console log");
        if meta.len() > 1 << 20 && meta.blocks() * 512 <= limit + 8192 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the log still uses {} bytes on disk",
            meta.blocks() * 512
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tail = hv.console_tail(&handle, 1 << 30).await.expect("tail");
    assert!(tail.len() as u64 <= limit, "{} bytes", tail.len());
    assert!(tail.ends_with("stand-in: login prompt\n"), "{tail:?}");
    assert_eq!(
        hv.console_tail(&handle, 23).await.expect("tail"),
        "stand-in: login prompt\n"
    );
    hv.kill(&handle).await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_refused_until_it_listens_and_found_after() {
    let host = TestHost::new(Behaviour {
        agent_delay_ms: 1500,
        ..Behaviour::default()
    });
    let hv = host.backend();
    let handle = hv.start(&host.machine("slowboot")).await.expect("start");
    let early = hv.connect_agent(&handle).await;
    assert!(
        matches!(early, Err(HypervisorError::Io { .. })),
        "nothing listens on port 1024 yet"
    );
    assert_eq!(echo(&hv, &handle, "late").await, b"late\n");
    hv.kill(&handle).await.expect("kill");
}

#[test]
fn the_backend_reports_its_kind_and_capabilities() {
    let hv = CloudHypervisor::new(ChConfig::new());
    assert_eq!(hv.kind(), "cloud-hypervisor");
    let caps = hv.capabilities();
    assert!(caps.pause && caps.snapshot && caps.resize_vcpus);
    assert!(!caps.resize_memory, "no hotplug memory by default");
}

/// The event monitor (`--event-monitor`), as the stand-in writes it: a guest reboot
/// is a reset of the same VMM, a panic reported by pvpanic ends the VMM as a panic
/// (cloud-hypervisor itself goes on, so the backend stops it), a guest power-off is
/// a power-off and the backend's own shutdown a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_monitor_tells_a_reboot_a_panic_a_power_off_and_a_host_stop_apart() {
    let host = TestHost::new(Behaviour::default());
    let hv = host.backend();
    let handle = hv.start(&host.machine("reboots")).await.expect("start");
    let mut watch = hv.watch(&handle).await.expect("watch");
    let client = wait_for_agent(&hv, &handle, BOOT).await;

    client.shutdown(true).await.expect("reboot");
    tokio::time::timeout(BOOT, async {
        while watch.current().resets == 0 {
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("the reset was reported");
    assert_eq!(hv.info(&handle).await.unwrap().state, VmmState::Running);

    let _ = client.exec_collect(ExecRequest::new(["panic"]), 1024).await;
    let exit = tokio::time::timeout(BOOT, watch.wait_exit()).await.unwrap();
    assert_eq!(exit, Some(vmkit_core::VmmExit::Panic));
    assert_eq!(hv.info(&handle).await.unwrap().state, VmmState::Exited);
    hv.cleanup(&handle).await.unwrap();

    let handle = hv.start(&host.machine("powers-off")).await.expect("start");
    let mut watch = hv.watch(&handle).await.expect("watch");
    let client = wait_for_agent(&hv, &handle, BOOT).await;
    client.shutdown(false).await.expect("power off");
    let exit = tokio::time::timeout(BOOT, watch.wait_exit()).await.unwrap();
    assert_eq!(exit, Some(vmkit_core::VmmExit::PowerOff));
    hv.cleanup(&handle).await.unwrap();

    let handle = hv.start(&host.machine("stopped")).await.expect("start");
    let mut watch = hv.watch(&handle).await.expect("watch");
    hv.shutdown(&handle, Duration::from_secs(10))
        .await
        .expect("shutdown");
    let exit = tokio::time::timeout(BOOT, watch.wait_exit()).await.unwrap();
    assert_eq!(exit, Some(vmkit_core::VmmExit::Killed));
}

/// A confined VMM (the stand-in, spawned as cloud-hypervisor would be): it runs as
/// the VM's uid in the VM's cgroup, with `--seccomp true` on its command line and
/// landlock asked for in `vm.create`; its disk is its uid's, its run directory root's
/// with its group (1770); cleanup removes its cgroup. Needs root and cgroups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_vmm_runs_as_its_uid_in_its_cgroup_with_seccomp_and_landlock() {
    use std::os::unix::fs::PermissionsExt;
    let host = TestHost::new(Behaviour::default());
    std::fs::set_permissions(host.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("traversable");
    let uid = vmkit_core::UidRange::DEFAULT_FIRST + 6000 + std::process::id() % 1000;
    let mut config = host.machine("jailed");
    // No TAP: tests touch no host network.
    config.nic = None;
    config.confinement = Some(vmkit_core::Confinement::new(
        uid,
        vmkit_core::CgroupLimits::default(),
    ));
    let hv = host.backend();
    let handle = hv.start(&config).await.expect("start");

    let status = std::fs::read_to_string(format!("/proc/{}/status", handle.pid)).expect("status");
    assert!(
        status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
        "{status}"
    );
    // The stand-in gets cloud-hypervisor's arguments through its environment.
    let environ = std::fs::read(format!("/proc/{}/environ", handle.pid)).expect("environ");
    let args = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|v| v.strip_prefix("VMKIT_CH_STANDIN_ARGS=").map(str::to_owned))
        .expect("the stand-in's arguments")
        .replace('\u{1f}', " ");
    assert!(args.contains("--seccomp true"), "{args}");
    let create = requests(&config.run_dir)
        .into_iter()
        .find(|(_, p, _)| p == "/vm.create")
        .expect("vm.create")
        .2;
    assert_eq!(create["landlock_enable"], true);
    assert_eq!(
        create["landlock_rules"][0]["path"],
        config.run_dir.to_str().expect("utf-8")
    );
    let disk = std::fs::metadata(&config.disks[0].path).expect("disk");
    assert_eq!((disk.uid(), disk.mode() & 0o777), (uid, 0o600));
    let run_dir = std::fs::metadata(&config.run_dir).expect("run dir");
    assert_eq!(
        (run_dir.uid(), run_dir.gid(), run_dir.mode() & 0o7777),
        (0, uid, 0o1770)
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", handle.pid)).expect("cgroup");
    assert!(
        cgroup.contains(&format!("/vmkit/{}", config.vm)),
        "{cgroup}"
    );

    hv.kill(&handle).await.expect("kill");
    hv.cleanup(&handle).await.expect("cleanup");
    assert!(
        !Path::new("/sys/fs/cgroup/memory/vmkit")
            .join(config.vm.to_string())
            .exists(),
        "the cgroup is gone"
    );
}
