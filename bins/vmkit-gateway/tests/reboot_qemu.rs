#![allow(clippy::unwrap_used)]
//! What a guest does to its own VM, end to end on the daemon with real QEMU: a
//! reboot reboots it (same VM, running, new boot id, configured again), a power-off
//! stops it, a panic stops it with its console kept and a panic event; and a QEMU
//! that stops answering does not keep the daemon from noticing another one's death.
//! Needs the test assets (`scripts/test-assets.sh`).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{Daemon, json, stderr, stdout};

/// A data directory whose `images/` links the test images `tiny` and `base`.
fn data_dir() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for image in ["tiny", "base"] {
        std::os::unix::fs::symlink(support::test_images().join(image), images.join(image)).unwrap();
    }
    tmp
}

fn daemon(dir: &Path) -> Daemon {
    Daemon::start_in(
        dir,
        &[],
        &[
            ("VMKIT_HYPERVISOR", "qemu"),
            ("VMKIT_TIMEOUTS_BOOT_SECS", "240"),
            ("VMKIT_TIMEOUTS_SHUTDOWN_GRACE_SECS", "20"),
        ],
    )
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Runs `script` in `vm` and returns its stdout; it must succeed.
fn sh(d: &Daemon, vm: &str, script: &str) -> String {
    let out = d.cli(&["vm", "exec", vm, "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "`{script}`: {}", stderr(&out));
    stdout(&out)
}

fn show(d: &Daemon, vm: &str) -> serde_json::Value {
    json(&d.cli(&["--json", "vm", "show", vm]))
}

/// The event types recorded about `vm`, oldest first.
fn events(d: &Daemon, vm: &str) -> Vec<serde_json::Value> {
    let out = d.cli(&["--json", "events", "--limit", "10000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .filter(|e| e["vm_name"] == vm)
        .map(|e| e["kind"].clone())
        .collect()
}

/// Waits up to `within` until `done` holds, failing with `what` and the daemon log.
fn wait_until(d: &Daemon, within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn reboot_in_a_base_guest_boots_it_again_and_poweroff_stops_it() {
    let tmp = data_dir();
    let d = daemon(tmp.path());
    let out = d.cli(&[
        "--json", "vm", "create", "home", "--image", "base", "--memory", "512",
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let pid = json(&out)["resources"]["vmm"]["pid"].as_u64().unwrap();
    let boot = sh(&d, "home", "cat /proc/sys/kernel/random/boot_id");
    // Booted far enough that systemd carries out a reboot.
    sh(&d, "home", "systemctl is-system-running --wait || true");

    // The exec may end with the guest; only the reboot matters.
    let _ = d.cli(&["vm", "exec", "home", "--", "systemctl", "reboot"]);

    wait_until(&d, Duration::from_secs(300), "no reboot recorded", || {
        let kinds = events(&d, "home");
        let rebooted = kinds.iter().position(|k| k["type"] == "guest_rebooted");
        rebooted.is_some_and(|at| {
            kinds[at..]
                .iter()
                .any(|k| k["type"] == "health_changed" && k["health"]["state"] == "healthy")
        })
    });
    let vm = show(&d, "home");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(
        vm["resources"]["vmm"]["pid"].as_u64(),
        Some(pid),
        "the same QEMU"
    );
    let new_boot = sh(&d, "home", "cat /proc/sys/kernel/random/boot_id");
    assert_ne!(new_boot, boot, "a new boot");
    assert_eq!(sh(&d, "home", "hostname"), "home\n", "configured again");

    let _ = d.cli(&["vm", "exec", "home", "--", "systemctl", "poweroff"]);

    wait_until(&d, Duration::from_secs(180), "not stopped", || {
        show(&d, "home")["state"] == "stopped"
    });
    let vm = show(&d, "home");
    assert!(vm["resources"]["vmm"].is_null(), "{vm}");
    assert!(!pid_alive(pid), "QEMU is gone");
    let kinds = events(&d, "home");
    assert!(
        kinds.iter().any(|k| k["type"] == "guest_powered_off"),
        "{kinds:?}"
    );
    assert!(
        !kinds.iter().any(|k| k["type"] == "vmm_exited"),
        "{kinds:?}"
    );
    assert!(d.cli(&["vm", "rm", "home"]).status.success());
}

#[test]
fn a_panic_in_the_guest_stops_the_vm_keeps_its_console_and_says_so() {
    let tmp = data_dir();
    let d = daemon(tmp.path());
    let out = d.cli(&["--json", "vm", "create", "crash", "--memory", "256"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let pid = json(&out)["resources"]["vmm"]["pid"].as_u64().unwrap();

    let _ = d.cli(&[
        "vm",
        "exec",
        "crash",
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);

    wait_until(&d, Duration::from_secs(120), "not stopped", || {
        show(&d, "crash")["state"] == "stopped"
    });
    assert!(!pid_alive(pid), "QEMU is gone");
    let kinds = events(&d, "crash");
    assert!(
        kinds.iter().any(|k| k["type"] == "guest_panicked"),
        "{kinds:?}"
    );
    let out = d.cli(&["vm", "logs", "crash"]);
    assert!(
        stdout(&out).contains("Kernel panic - not syncing"),
        "the console shows the panic: {}",
        stdout(&out)
    );
    // It starts again.
    let out = d.cli(&["--json", "vm", "start", "crash"]);
    assert_eq!(json(&out)["state"], "running", "{}", stderr(&out));
    assert!(d.cli(&["vm", "rm", "crash"]).status.success());
}

#[test]
fn a_qemu_that_stops_answering_does_not_hide_the_death_of_another() {
    let tmp = data_dir();
    let d = daemon(tmp.path());
    let mut pids = Vec::new();
    // Listed (and checked) in name order: the hung one first.
    for vm in ["a-hung", "b-dead"] {
        let out = d.cli(&["--json", "vm", "create", vm, "--memory", "256"]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
        pids.push(json(&out)["resources"]["vmm"]["pid"].as_u64().unwrap() as i32);
    }

    // SAFETY: signalling the QEMU processes this test created.
    unsafe {
        libc::kill(pids[0], libc::SIGSTOP);
        libc::kill(pids[1], libc::SIGKILL);
    }

    wait_until(&d, Duration::from_secs(60), "b-dead not stopped", || {
        show(&d, "b-dead")["state"] == "stopped"
    });
    assert_eq!(
        show(&d, "a-hung")["state"],
        "running",
        "a VMM that does not answer is not dead"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pids[0], libc::SIGCONT) };
    assert_eq!(sh(&d, "a-hung", "echo back"), "back\n");
    for vm in ["a-hung", "b-dead"] {
        assert!(d.cli(&["vm", "rm", vm]).status.success());
    }
}
