//! The QEMU backend against real QEMU (TCG on hosts without a usable KVM), booting the
//! tiny test image: the generic hypervisor suite, then what is specific to QEMU.
//!
//! Needs the image from `scripts/test-assets.sh` (see `vmkit_core::testing::test_image`).
//! Every VM gets a fresh run dir and a qcow2 overlay of the image's rootfs in a
//! temporary directory; the fixture kills any QEMU it started when it is dropped, so a
//! failing test leaves no process or directory behind.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmkit_core::guest::ExecRequest;
use vmkit_core::testing::suites::{HypervisorFixture, hypervisor_suite, wait_for_agent};
use vmkit_core::testing::test_image;
use vmkit_core::{
    DiskConfig, DiskFormat, Hypervisor, HypervisorError, Image, MachineConfig, Resize, VmId,
    VmName, VmmState,
};
use vmkit_hv::{Qemu, QemuConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Run dirs and root overlays in a short temporary directory (socket paths must stay
/// under 108 bytes).
struct Fixture {
    dir: tempfile::TempDir,
    image: Image,
    issued: Mutex<Vec<PathBuf>>,
    counter: AtomicU32,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmkq")
            .tempdir_in("/tmp")
            .unwrap();
        Self {
            dir,
            image: test_image("tiny"),
            issued: Mutex::new(Vec::new()),
            counter: AtomicU32::new(0),
        }
    }

    /// A fresh qcow2 overlay over the image's rootfs, which stays pristine.
    fn overlay(&self, name: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("{name}-{n}.qcow2"));
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&self.image.rootfs)
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img create failed");
        path
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.path().join(format!("{name}-{n}"));
        self.issued.lock().unwrap().push(dir.clone());
        dir
    }
}

impl HypervisorFixture for Fixture {
    fn machine(&self, name: &str) -> MachineConfig {
        let mut config = MachineConfig::new(
            VmId::generate(),
            VmName::new(name).unwrap(),
            self.run_dir(name),
            self.image.kernel.clone(),
        );
        config.initramfs = self.image.initramfs.clone();
        config.cmdline = self.image.cmdline.clone();
        config.disks = vec![DiskConfig::new(self.overlay(name), DiskFormat::Qcow2)];
        config.memory_mib = 256;
        config
    }

    fn boot_timeout(&self) -> Duration {
        BOOT_TIMEOUT
    }
}

impl Drop for Fixture {
    /// Kills every QEMU still running from a run dir this fixture handed out, and
    /// removes the cgroups of confined ones (the run dirs go with the fixture).
    fn drop(&mut self) {
        let issued = self.issued.lock().unwrap().clone();
        for dir in &issued {
            self.kill_vmm_of(dir);
        }
        for dir in &issued {
            let Ok(text) = std::fs::read(dir.join("vmkit-qemu.json")) else {
                continue;
            };
            let state: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
            for cgroup in state["cgroup"].as_array().into_iter().flatten() {
                let Some(cgroup) = cgroup.as_str() else {
                    continue;
                };
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(cgroup).exists() && std::fs::remove_dir(cgroup).is_err() {
                    if Instant::now() > deadline {
                        eprintln!("fixture: cannot remove the cgroup {cgroup}");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

impl Fixture {
    /// Kills the QEMU recorded in `dir`, if it still runs there.
    fn kill_vmm_of(&self, dir: &Path) {
        let Ok(text) = std::fs::read_to_string(dir.join("vmkit-vmm.id")) else {
            return;
        };
        let Some(Ok(pid)) = text.split_whitespace().next().map(str::parse::<i32>) else {
            return;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let marker = dir.join("qemu");
        let marker = marker.as_os_str().as_encoded_bytes();
        if cmdline.windows(marker.len()).any(|w| w == marker) {
            eprintln!(
                "fixture: killing leftover QEMU pid {pid} of {}",
                dir.display()
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Polls `info` until the VMM reports `Exited`.
async fn wait_exited(qemu: &Qemu, handle: &vmkit_core::VmmHandle, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while qemu.info(handle).await.unwrap().state != VmmState::Exited {
        assert!(
            Instant::now() < deadline,
            "the VMM did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_gone(dir: &Path) {
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_passes_the_generic_hypervisor_suite() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let started = Instant::now();
    hypervisor_suite(&qemu, &fx).await;
    eprintln!(
        "suite took {:?} with {}",
        started.elapsed(),
        qemu.accel_choice().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_killed_from_outside_is_reported_exited() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let handle = qemu.start(&fx.machine("doomed")).await.unwrap();
    assert_eq!(qemu.info(&handle).await.unwrap().state, VmmState::Running);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(handle.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    wait_exited(&qemu, &handle, Duration::from_secs(10)).await;
    assert!(matches!(
        qemu.attach(&handle).await,
        Err(HypervisorError::NotRunning { .. })
    ));
    assert!(qemu.connect_agent(&handle).await.is_err());
    qemu.shutdown(&handle, Duration::from_secs(1))
        .await
        .unwrap();
    qemu.cleanup(&handle).await.unwrap();
    assert_gone(&handle.run_dir);
}

/// Set by `a_vm_outlives_the_process_that_started_it_and_is_reattached` for the helper.
const HELPER_ENV: &str = "VMKIT_QEMU_TEST_HELPER_CONFIG";

/// Not a test: the "daemon" that starts a VM and exits, run by the test below in a
/// process of its own. Does nothing unless that test set its environment variable.
#[tokio::test]
#[ignore = "helper process of a_vm_outlives_the_process_that_started_it_and_is_reattached"]
async fn helper_start_a_vm_and_exit() {
    let Ok(json) = std::env::var(HELPER_ENV) else {
        return;
    };
    let config: MachineConfig = serde_json::from_str(&json).unwrap();
    let handle = Qemu::new(QemuConfig::new()).start(&config).await.unwrap();
    println!("HANDLE={}", serde_json::to_string(&handle).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_outlives_the_process_that_started_it_and_is_reattached() {
    let fx = Fixture::new();
    let config = fx.machine("survivor");
    // The first daemon: a process that starts the VM and exits. Its stdout reaches end
    // of file only if QEMU kept no copy of it.
    let helper = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_start_a_vm_and_exit",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, serde_json::to_string(&config).unwrap())
        .stdin(std::process::Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), helper)
        .await
        .expect("the helper and its stdout end although the VM keeps running")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "helper failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let handle: vmkit_core::VmmHandle = stdout
        .lines()
        .find_map(|l| l.strip_prefix("HANDLE="))
        .map(|json| serde_json::from_str(json).unwrap())
        .expect("the helper printed the handle");

    // The second daemon.
    let qemu = Qemu::new(QemuConfig::new());
    assert_eq!(qemu.attach(&handle).await.unwrap(), VmmState::Running);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", handle.pid)).unwrap();
    let ppid: u32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        ppid,
        std::process::id(),
        "QEMU is not a child of the daemon"
    );
    let client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;
    qemu.pause(&handle).await.unwrap();
    assert_eq!(qemu.info(&handle).await.unwrap().state, VmmState::Paused);
    qemu.resume(&handle).await.unwrap();
    let info = qemu.info(&handle).await.unwrap();
    assert_eq!(
        (info.state, info.vcpus, info.memory_mib),
        (VmmState::Running, 1, 256)
    );
    let out = client
        .exec_collect(
            ExecRequest::new(["sh", "-c", "echo console-after-reattach > /dev/console"]),
            1 << 16,
        )
        .await
        .unwrap();
    assert_eq!(out.status.code, Some(0), "the agent answers after resume");
    drop(client);

    qemu.shutdown(&handle, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(qemu.info(&handle).await.unwrap().state, VmmState::Exited);
    let tail = qemu.console_tail(&handle, 64 * 1024).await.unwrap();
    assert!(
        tail.contains("console-after-reattach"),
        "the re-attached console pump records new output; tail:\n{tail}"
    );
    qemu.cleanup(&handle).await.unwrap();
    assert_gone(&handle.run_dir);
}

/// Within one process too: a dropped `Qemu` (its pumps stop) and a new one, whose
/// shutdown falls back to `quit` when the booting guest does not act on ACPI in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_in_the_same_process_attaches_and_shuts_down() {
    let fx = Fixture::new();
    let first = Qemu::new(QemuConfig::new());
    let handle = first.start(&fx.machine("twice")).await.unwrap();
    drop(first);

    let second = Qemu::new(QemuConfig::new());
    assert_eq!(second.attach(&handle).await.unwrap(), VmmState::Running);
    second
        .shutdown(&handle, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(second.info(&handle).await.unwrap().state, VmmState::Exited);
    second.cleanup(&handle).await.unwrap();
    assert_gone(&handle.run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_without_init_exits_and_its_console_tail_says_why() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let mut config = fx.machine("no-init");
    config.cmdline.push_str(" init=/nonexistent");
    let handle = qemu.start(&config).await.unwrap();

    wait_exited(&qemu, &handle, BOOT_TIMEOUT).await;
    let tail = qemu.console_tail(&handle, 4096).await.unwrap();
    assert!(
        tail.contains("no /nonexistent on /dev/vda"),
        "the console shows the initramfs' reason; tail:\n{tail}"
    );
    assert!(
        tail.contains("Kernel panic"),
        "the console shows the panic; tail:\n{tail}"
    );
    qemu.cleanup(&handle).await.unwrap();
    assert_gone(&handle.run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_log_never_exceeds_its_cap() {
    const CAP: u64 = 4096;
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let mut config = fx.machine("chatty");
    config.console_limit = CAP;
    let log = config.run_dir.join("console.log");
    let handle = qemu.start(&config).await.unwrap();

    // Sample the log's size all through the boot (the kernel alone prints ~20 KiB).
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (log, stop) = (log.clone(), stop.clone());
        async move {
            let mut largest = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = std::fs::metadata(&log) {
                    largest = largest.max(m.len());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            largest
        }
    });
    let client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;
    let out = client
        .exec_collect(ExecRequest::new(["dmesg"]), 1 << 20)
        .await
        .unwrap();
    assert!(
        out.stdout.len() as u64 > 2 * CAP,
        "the guest printed more than the cap"
    );
    stop.store(true, Ordering::Relaxed);
    let largest = sampler.await.unwrap();
    assert!(
        largest <= CAP,
        "console.log reached {largest} bytes during boot, over {CAP}"
    );
    drop(client);
    qemu.kill(&handle).await.unwrap();

    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        size <= CAP,
        "console.log is {size} bytes, over its cap of {CAP}"
    );
    assert!(
        size >= CAP / 2,
        "the newest half of the cap is kept (got {size} bytes)"
    );
    let tail = qemu.console_tail(&handle, 1 << 20).await.unwrap();
    assert!(tail.len() as u64 <= CAP);
    assert!(
        tail.contains("vmkit-agent") || tail.contains("vmkit_agent"),
        "the kept part is the newest output (the agent's start); tail:\n{tail}"
    );
    qemu.cleanup(&handle).await.unwrap();
    assert_gone(&handle.run_dir);
}

/// Live processes (not zombies) whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'));
            !zombie && cmdline.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cancelled_half_way_leaves_nothing_running() {
    let fx = Fixture::new();
    // A launcher that waits before it becomes QEMU: the start is dropped while the
    // VMM runs and has not greeted yet.
    let launcher = fx.dir.path().join("slow-qemu");
    std::fs::write(
        &launcher,
        "#!/bin/sh\nsleep 2\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &launcher,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let qemu = Qemu::new(
        QemuConfig::new()
            .binary(&launcher)
            .accel(vmkit_hv::Accel::Tcg),
    );
    let config = fx.machine("cancelled");
    let identity = config.run_dir.join("vmkit-vmm.id");
    let mut start = Box::pin(qemu.start(&config));
    let deadline = Instant::now() + Duration::from_secs(30);
    // Written once the VMM is spawned, in one write.
    let vmm: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&identity)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the VMM was never recorded");
        tokio::select! {
            result = &mut start => panic!("the start finished early: {result:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    drop(start);

    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(&config.run_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU {vmm} of the cancelled start still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_gone(&config.run_dir);
}

#[tokio::test]
async fn a_missing_binary_is_a_spawn_error_and_leaves_no_run_dir() {
    let fx = Fixture::new();
    let qemu = Qemu::new(
        QemuConfig::new()
            .binary("/nonexistent/qemu-system-x86_64")
            .accel(vmkit_hv::Accel::Tcg),
    );
    let config = fx.machine("nobin");
    let err = qemu.start(&config).await.unwrap_err();
    assert!(matches!(err, HypervisorError::Spawn { .. }), "{err:?}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        source.contains("qemu-system-x86"),
        "the error says what to install: {source}"
    );
    assert_gone(&config.run_dir);
}

#[tokio::test]
async fn qemu_failing_at_startup_reports_its_stderr_and_leaves_nothing_behind() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new().accel(vmkit_hv::Accel::Tcg));
    let mut config = fx.machine("badisk");
    // A raw file declared as qcow2: QEMU refuses to open it.
    config.disks = vec![DiskConfig::new(fx.image.rootfs.clone(), DiskFormat::Qcow2)];
    config.disks[0].read_only = true;
    let err = qemu.start(&config).await.unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Refused { operation: "start", message } if message.contains("qcow2")),
        "QEMU's own message comes back: {err:?}"
    );
    assert_gone(&config.run_dir);
}

#[tokio::test]
async fn the_accelerator_is_probed_once_and_explained() {
    let qemu = Qemu::new(QemuConfig::new());
    let first = qemu.accel_choice().await.clone();
    let again = qemu.accel_choice().await.clone();
    eprintln!("accelerator on this host: {first}");
    assert_eq!(first, again, "the probe result is cached");
    assert_ne!(first.accel, vmkit_hv::Accel::Auto, "the choice is resolved");
    assert!(!first.reason.is_empty(), "the choice says why");
}

// ------------------------------------------------------------------ snapshots

/// Runs `command` in the guest and returns its standard output.
async fn guest_output(client: &vmkit_core::guest::Client, command: &str) -> String {
    let out = client
        .exec_collect(ExecRequest::new(["sh", "-c", command]), 1 << 16)
        .await
        .unwrap();
    assert_eq!(out.status.code, Some(0), "{command} failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `qemu-img info` can open `disk`, which it cannot while a QEMU holds it.
fn disk_is_free(disk: &Path) -> bool {
    std::process::Command::new("qemu-img")
        .arg("info")
        .arg(disk)
        .output()
        .unwrap()
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_guest_keeps_its_memory_and_answers_its_agent() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let config = fx.machine("keeper");
    let handle = qemu.start(&config).await.unwrap();
    let client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;
    let token = format!("token-{}", VmId::generate());
    guest_output(&client, &format!("echo {token} > /tmp/kept")).await;
    let boot_id = client.hello().await.unwrap().boot_id;
    drop(client);

    qemu.pause(&handle).await.unwrap();
    let snapshot = fx.dir.path().join("keeper-snapshot");
    let saving = Instant::now();
    qemu.snapshot(&handle, &snapshot).await.unwrap();
    let saved_in = saving.elapsed();
    qemu.kill(&handle).await.unwrap();
    qemu.cleanup(&handle).await.unwrap();

    let mut target = config.clone();
    target.run_dir = fx.run_dir("keeper-restored");
    let loading = Instant::now();
    let restored = qemu.restore(&target, &snapshot).await.unwrap();
    let loaded_in = loading.elapsed();
    assert_eq!(qemu.info(&restored).await.unwrap().state, VmmState::Paused);
    qemu.resume(&restored).await.unwrap();
    let client = wait_for_agent(&qemu, &restored, BOOT_TIMEOUT).await;

    assert_eq!(
        client.hello().await.unwrap().boot_id,
        boot_id,
        "the guest did not boot again"
    );
    assert_eq!(
        guest_output(&client, "cat /tmp/kept").await,
        format!("{token}\n"),
        "the guest's tmpfs survives the snapshot"
    );
    let size = std::fs::metadata(snapshot.join("memory")).unwrap().len();
    eprintln!(
        "snapshot of a {} MiB guest: saved in {saved_in:?} ({} MiB of state), restored in {loaded_in:?}, with {}",
        config.memory_mib,
        size >> 20,
        qemu.accel_choice().await
    );
    drop(client);
    qemu.kill(&restored).await.unwrap();
    qemu.cleanup(&restored).await.unwrap();
    assert_gone(&restored.run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshotted_vmm_releases_its_disks_until_it_resumes_and_runs_on() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let config = fx.machine("runs-on");
    let disk = config.disks[0].path.clone();
    let handle = qemu.start(&config).await.unwrap();
    let client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;

    let err = qemu
        .snapshot(&handle, &fx.dir.path().join("running-snapshot"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Refused { operation: "snapshot", message } if message.contains("pause it first")),
        "{err:?}"
    );
    qemu.pause(&handle).await.unwrap();
    assert!(!disk_is_free(&disk), "a paused QEMU holds its disk");
    qemu.snapshot(&handle, &fx.dir.path().join("first"))
        .await
        .unwrap();
    assert_eq!(qemu.info(&handle).await.unwrap().state, VmmState::Paused);
    assert!(
        disk_is_free(&disk),
        "after a snapshot QEMU lets go of the disk, to be copied"
    );
    let again = qemu
        .snapshot(&handle, &fx.dir.path().join("second"))
        .await
        .unwrap_err();
    assert!(
        matches!(&again, HypervisorError::Refused { message, .. } if message.contains("resume it")),
        "{again:?}"
    );

    qemu.resume(&handle).await.unwrap();
    assert_eq!(qemu.info(&handle).await.unwrap().state, VmmState::Running);
    assert!(!disk_is_free(&disk), "a resumed QEMU holds its disk again");
    assert_eq!(
        guest_output(&client, "echo still here").await,
        "still here\n",
        "the agent's connection survives the snapshot"
    );
    qemu.pause(&handle).await.unwrap();
    qemu.snapshot(&handle, &fx.dir.path().join("second"))
        .await
        .unwrap();
    drop(client);
    qemu.shutdown(&handle, Duration::from_secs(30))
        .await
        .unwrap();
    qemu.cleanup(&handle).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_be_loaded_fails_clearly_and_leaves_nothing_running() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let config = fx.machine("broken");
    let handle = qemu.start(&config).await.unwrap();
    qemu.pause(&handle).await.unwrap();
    let snapshot = fx.dir.path().join("broken-snapshot");
    qemu.snapshot(&handle, &snapshot).await.unwrap();
    qemu.kill(&handle).await.unwrap();
    qemu.cleanup(&handle).await.unwrap();

    let mut bigger = config.clone();
    bigger.run_dir = fx.run_dir("bigger");
    bigger.memory_mib = 512;
    let err = qemu.restore(&bigger, &snapshot).await.unwrap_err();
    assert!(
        matches!(&err, HypervisorError::InvalidConfig(m) if m.contains("256 MiB, the config 1 vCPUs and 512 MiB")),
        "a restore into another machine is refused before QEMU starts: {err:?}"
    );
    assert_gone(&bigger.run_dir);

    let memory = snapshot.join("memory");
    let len = std::fs::metadata(&memory).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut target = config.clone();
    target.run_dir = fx.run_dir("truncated");
    let err = qemu.restore(&target, &snapshot).await.unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Refused { operation: "restore", message } if message.contains("could not load the snapshot")),
        "{err:?}"
    );
    assert!(
        processes_mentioning(&target.run_dir).is_empty(),
        "no QEMU of the failed restore runs"
    );
    assert_gone(&target.run_dir);
}

#[tokio::test]
async fn restore_from_an_empty_directory_fails_clearly_and_leaves_nothing_running() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new().accel(vmkit_hv::Accel::Tcg));
    let config = fx.machine("nosnap");
    let empty = fx.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();

    let err = qemu.restore(&config, &empty).await.unwrap_err();

    assert!(
        matches!(&err, HypervisorError::Refused { operation: "restore", message } if message.contains("no QEMU snapshot")),
        "{err:?}"
    );
    assert!(processes_mentioning(&config.run_dir).is_empty());
    assert_gone(&config.run_dir);
}

/// Plug, then unplug right away (a guest still bringing the vCPU up may refuse
/// the first eject request, which is then asked again), then plug again: under TCG
/// QEMU 7.2 crashes on that plug, so it is refused and the VM runs on; under KVM it
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpus_unplug_right_after_a_plug_and_tcg_refuses_a_plug_that_would_crash_qemu() {
    let fx = Fixture::new();
    let qemu = Qemu::new(QemuConfig::new());
    let config = fx.machine("hotplug").max_vcpus(2);
    let handle = qemu.start(&config).await.unwrap();
    let _client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;

    qemu.resize(&handle, Resize::new(Some(2), None))
        .await
        .unwrap();
    qemu.resize(&handle, Resize::new(Some(1), None))
        .await
        .expect("the unplug completes although the guest was busy with the plug");
    assert_eq!(qemu.info(&handle).await.unwrap().vcpus, 1);

    let again = qemu.resize(&handle, Resize::new(Some(2), None)).await;
    if qemu.accel().await == vmkit_hv::Accel::Tcg {
        assert!(
            matches!(&again, Err(HypervisorError::Refused { message, .. }) if message.contains("software emulation")),
            "{again:?}"
        );
        assert_eq!(qemu.info(&handle).await.unwrap().state, VmmState::Running);
        assert_eq!(qemu.info(&handle).await.unwrap().vcpus, 1);
    } else {
        again.unwrap();
        assert_eq!(qemu.info(&handle).await.unwrap().vcpus, 2);
    }
    qemu.kill(&handle).await.unwrap();
    qemu.cleanup(&handle).await.unwrap();
}

/// A field of `/proc/<pid>/status`, such as `Uid` or `Seccomp`.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The cgroup v1 directory of `pid` in the hierarchy of `controller`.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == controller))
        })
        .unwrap_or_else(|| panic!("{pid} is in no {controller} cgroup: {text}"));
    let path = line.splitn(3, ':').nth(2).unwrap();
    // `cpu` is a directory or a link to `cpu,cpuacct`, depending on the host.
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'))
}

fn cgroup_value(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_owned()
}

/// Opens `path` for reading as `uid`:`uid` with no supplementary groups; the error
/// `cat` printed, or `None` when it could.
fn open_as(uid: u32, path: &Path) -> Option<String> {
    let out = std::process::Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
            "head".to_owned(),
            "-c1".to_owned(),
        ])
        .arg(path)
        .output()
        .unwrap();
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A VMM confined as its VM's uid: seccomp on, in its VM's cgroup with the limits of
/// its size, its own disk open to it and nothing else of the host's (another VM's
/// disk, the state file); a snapshot restores into a VMM confined the same way, and
/// cleanup removes the cgroup. Needs root and cgroup v1 or v2 controllers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_vmm_runs_as_its_uid_under_seccomp_in_its_cgroup_and_reaches_only_its_disks() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    // Traverse-only, as vmkit's data directory: each uid opens its own files by name.
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let other_disk = fx.overlay("other");
    let state = fx.dir.path().join("state.redb");
    std::fs::write(&state, b"secret").unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&other_disk, std::fs::Permissions::from_mode(0o600)).unwrap();

    let uid = vmkit_core::UidRange::DEFAULT_FIRST + 4000 + std::process::id() % 1000;
    let limits = vmkit_core::CgroupLimits::default();
    let mut config = fx.machine("jailed");
    config.confinement = Some(vmkit_core::Confinement::new(uid, limits));
    let qemu = Qemu::new(QemuConfig::new().accel(vmkit_hv::Accel::Tcg));
    let handle = qemu.start(&config).await.unwrap();
    let pid = handle.pid;

    let uids = status_field(pid, "Uid");
    assert_eq!(
        uids,
        format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "real, effective, saved, fs"
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}")
    );
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "QEMU's -sandbox filter is on"
    );
    let memory = cgroup_dir(pid, "memory");
    let cpu = cgroup_dir(pid, "cpu");
    let pids = cgroup_dir(pid, "pids");
    assert!(
        memory.ends_with(format!("vmkit/{}", config.vm)),
        "in its VM's cgroup: {}",
        memory.display()
    );
    // Under TCG the limit also allows for the translated-code cache (tb-size=512).
    assert_eq!(
        cgroup_value(&memory, "memory.limit_in_bytes"),
        ((config.memory_mib + limits.memory_overhead_mib + 512) << 20).to_string()
    );
    assert_eq!(cgroup_value(&cpu, "cpu.shares"), "1024");
    assert_eq!(cgroup_value(&cpu, "cpu.cfs_period_us"), "100000");
    assert_eq!(
        cgroup_value(&cpu, "cpu.cfs_quota_us"),
        "200000",
        "one CPU for the vCPU, one for QEMU's own threads"
    );
    assert_eq!(cgroup_value(&pids, "pids.max"), limits.pids_max.to_string());
    eprintln!(
        "confined QEMU pid {pid}: Uid {uids}, Seccomp {}, memory.limit_in_bytes {}, \
         cpu.cfs_quota_us {}/{}, cpu.shares {}, pids.max {}",
        status_field(pid, "Seccomp"),
        cgroup_value(&memory, "memory.limit_in_bytes"),
        cgroup_value(&cpu, "cpu.cfs_quota_us"),
        cgroup_value(&cpu, "cpu.cfs_period_us"),
        cgroup_value(&cpu, "cpu.shares"),
        cgroup_value(&pids, "pids.max"),
    );

    assert_eq!(
        open_as(uid, &config.disks[0].path),
        None,
        "its own disk opens"
    );
    for forbidden in [&other_disk, &state] {
        let error = open_as(uid, forbidden).expect("must not open");
        assert!(
            error.contains("Permission denied"),
            "{}: {error}",
            forbidden.display()
        );
    }
    let run_dir_file = config.run_dir.join("vmkit-qemu.json");
    assert!(
        open_as(uid, &run_dir_file)
            .expect("must not open")
            .contains("Permission denied")
    );

    let client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;
    let token = format!("token-{}", VmId::generate());
    guest_output(&client, &format!("echo {token} > /tmp/kept")).await;
    drop(client);
    qemu.pause(&handle).await.unwrap();
    let snapshot = fx.dir.path().join("jailed-snapshot");
    qemu.snapshot(&handle, &snapshot).await.unwrap();
    qemu.kill(&handle).await.unwrap();
    qemu.cleanup(&handle).await.unwrap();
    assert!(!memory.exists(), "cleanup removes the cgroup");
    assert!(!cpu.exists() && !pids.exists());

    let mut target = config.clone();
    target.run_dir = fx.run_dir("jailed-restored");
    let restored = qemu.restore(&target, &snapshot).await.unwrap();
    assert_eq!(status_field(restored.pid, "Seccomp"), "2");
    assert!(status_field(restored.pid, "Uid").starts_with(&uid.to_string()));
    qemu.resume(&restored).await.unwrap();
    let client = wait_for_agent(&qemu, &restored, BOOT_TIMEOUT).await;
    assert_eq!(
        guest_output(&client, "cat /tmp/kept").await,
        format!("{token}\n")
    );
    drop(client);
    let restored_cgroup = cgroup_dir(restored.pid, "memory");
    qemu.kill(&restored).await.unwrap();
    qemu.cleanup(&restored).await.unwrap();
    assert!(!restored_cgroup.exists());
    assert_gone(&restored.run_dir);
}

/// A run dir left by a crash with its confined VMM still running: discard kills the
/// VMM through its cgroup and removes the cgroup before the run dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_an_orphaned_confined_vmm_removes_its_cgroup() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let uid = vmkit_core::UidRange::DEFAULT_FIRST + 5000 + std::process::id() % 1000;
    let mut config = fx.machine("orphan");
    config.confinement = Some(vmkit_core::Confinement::new(
        uid,
        vmkit_core::CgroupLimits::default(),
    ));
    let qemu = Qemu::new(QemuConfig::new().accel(vmkit_hv::Accel::Tcg));
    let handle = qemu.start(&config).await.unwrap();
    let memory = cgroup_dir(handle.pid, "memory");
    drop(qemu);

    let later = Qemu::new(QemuConfig::new().accel(vmkit_hv::Accel::Tcg));
    later.discard(&config.run_dir).await.unwrap();

    assert!(!memory.exists(), "the cgroup is gone");
    assert!(
        !Path::new(&format!("/proc/{}/cgroup", handle.pid)).exists() || {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", handle.pid)).unwrap_or_default();
            stat.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        }
    );
    assert_gone(&config.run_dir);
}
