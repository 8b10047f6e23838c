#![allow(clippy::unwrap_used)]
//! Reconcile at daemon start on real QEMU: it never kills a VMM it cannot prove
//! dead, it drives every VM with the backend that created it whatever the daemon's
//! default is now, and a VM it cannot settle is quarantined while the other VMs and
//! the API carry on. Needs the test assets (`scripts/test-assets.sh`).

mod support;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Daemon, json, stderr};

fn data_dir() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    support::link_tiny_image(tmp.path());
    tmp
}

fn daemon(dir: &Path, hypervisor: &str) -> Daemon {
    Daemon::start_in(
        dir,
        &[],
        &[
            ("VMKIT_HYPERVISOR", hypervisor),
            ("VMKIT_TIMEOUTS_BOOT_SECS", "120"),
            ("VMKIT_TIMEOUTS_VMM_CHECK_SECS", "1"),
        ],
    )
}

fn create(d: &Daemon, name: &str) -> serde_json::Value {
    let out = d.cli(&["--json", "vm", "create", name, "--memory", "256"]);
    assert!(
        out.status.success(),
        "create {name}: {}\n{}",
        stderr(&out),
        d.log()
    );
    json(&out)
}

fn show(d: &Daemon, name: &str) -> serde_json::Value {
    let out = d.cli(&["--json", "vm", "show", name]);
    assert!(out.status.success(), "show {name}: {}", stderr(&out));
    json(&out)
}

fn exec_works(d: &Daemon, name: &str) {
    let out = d.cli(&["vm", "exec", name, "--", "cat", "/proc/sys/kernel/hostname"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exec in {name}: {}\n{}",
        stderr(&out),
        d.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Polls `vm show NAME` until `done` holds, for at most a minute.
fn wait_for(d: &Daemon, name: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = show(d, name);
        if done(&vm) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {what} did not happen: {vm}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

// Regression: a QMP that did not answer at daemon start was taken for a dead VMM,
// and reconcile killed the running guest.
#[test]
fn a_vmm_whose_qmp_does_not_answer_at_restart_is_kept_and_reattached_later() {
    let tmp = data_dir();
    let d = daemon(tmp.path(), "qemu");
    let vm = create(&d, "held");
    let pid = vm["resources"]["vmm"]["pid"].as_u64().unwrap();
    let qmp = PathBuf::from(vm["resources"]["vmm"]["control_socket"].as_str().unwrap());
    assert!(d.terminate().success());

    // QEMU's monitor serves one client at a time: while this one holds it, the
    // restarted daemon's attach waits for a greeting that never comes.
    let holder = UnixStream::connect(&qmp).unwrap();
    let d = daemon(tmp.path(), "qemu");
    assert!(pid_alive(pid), "the VMM was killed:\n{}", d.log());
    let vm = show(&d, "held");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["health"]["state"], "unhealthy", "{vm}");
    assert!(
        vm["health"]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot re-attach its VMM"),
        "{vm}"
    );
    // An operation that drives the VMM says so, and leaves the VM alone.
    let out = d.cli(&["vm", "pause", "held"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("left running"), "{}", stderr(&out));
    assert!(pid_alive(pid));

    // Once QMP answers again, the daemon's monitor re-attaches it.
    drop(holder);
    wait_for(&d, "held", "re-attach", |vm| {
        vm["health"]["state"] == "healthy"
    });
    exec_works(&d, "held");
    assert_eq!(
        json(&d.cli(&["--json", "vm", "pause", "held"]))["state"],
        "paused"
    );
    assert_eq!(
        json(&d.cli(&["--json", "vm", "resume", "held"]))["state"],
        "running"
    );
    let out = d.cli(&["vm", "rm", "held"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!pid_alive(pid));
}

// Regression: restarting the daemon with `VMKIT_HYPERVISOR=cloud-hypervisor` handed
// the QEMU VMs to cloud-hypervisor, which took them for dead: they were killed.
#[test]
fn a_daemon_restarted_with_another_default_hypervisor_keeps_driving_its_qemu_vms() {
    let tmp = data_dir();
    let d = daemon(tmp.path(), "qemu");
    let vm = create(&d, "pinned");
    assert_eq!(vm["hypervisor"], "qemu", "{vm}");
    let pid = vm["resources"]["vmm"]["pid"].as_u64().unwrap();
    assert!(d.terminate().success());

    // cloud-hypervisor need not be installed for the daemon to start with it.
    let d = daemon(tmp.path(), "cloud-hypervisor");
    assert!(pid_alive(pid), "the QEMU VM was killed:\n{}", d.log());
    let vm = show(&d, "pinned");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_ne!(vm["health"]["state"], "unhealthy", "{vm}");
    exec_works(&d, "pinned");
    let out = d.cli(&["vm", "stop", "pinned"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["--json", "vm", "start", "pinned"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let vm = json(&out);
    assert_eq!(vm["resources"]["vmm"]["backend"], "qemu", "{vm}");
    exec_works(&d, "pinned");

    let out = d.cli(&["vm", "rm", "pinned"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A bind mount over a file in a VM's run directory: removing the directory then
/// fails with EBUSY, as a busy resource does, until it is unmounted (on drop too).
struct Busy(PathBuf);

impl Busy {
    fn new(run_dir: &Path) -> Self {
        let file = run_dir.join("busy");
        std::fs::write(&file, b"").unwrap();
        let ok = Command::new("mount")
            .args(["--bind", "/dev/null"])
            .arg(&file)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot bind-mount over {}", file.display());
        Self(file)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

// Regression: one VM whose cleanup failed made reconcile fail, and the daemon exit
// at every start (a crash loop under systemd with no API to fix it).
#[test]
fn a_vm_whose_cleanup_fails_at_restart_is_quarantined_while_the_others_and_the_api_serve() {
    let tmp = data_dir();
    let d = daemon(tmp.path(), "qemu");
    let stuck = create(&d, "stuck");
    create(&d, "fine");
    assert!(d.terminate().success());

    // While no daemon runs, the VMM of `stuck` dies, and its run directory cannot
    // be removed.
    let pid = stuck["resources"]["vmm"]["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the QEMU this test created.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "QEMU survived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    let run_dir = PathBuf::from(stuck["resources"]["vmm"]["run_dir"].as_str().unwrap());
    let busy = Busy::new(&run_dir);

    let d = daemon(tmp.path(), "qemu");
    let log = d.log();
    assert!(log.contains("quarantined"), "{log}");
    let (status, body) = support::http(&d.socket, "GET", "/readyz", "");
    assert_eq!(
        status, 200,
        "a quarantined VM does not make the daemon unready: {body}"
    );
    exec_works(&d, "fine");

    let vm = show(&d, "stuck");
    let reason = vm["quarantined"].as_str().unwrap();
    assert!(reason.contains("Device or resource busy"), "{vm}");
    let out = d.cli(&["vm", "ls"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("stuck") && l.contains("quarantined")),
        "{table}"
    );
    let out = d.cli(&["vm", "show", "stuck"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("QUARANTINED"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = d.cli(&["vm", "start", "stuck"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("quarantined") && stderr(&out).contains("vmkit vm rm stuck"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["events"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reconcile could not"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // rm fails while the cause stays, and finishes once it is gone.
    let out = d.cli(&["vm", "rm", "stuck"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("busy"), "{}", stderr(&out));
    drop(busy);
    let out = d.cli(&["vm", "rm", "stuck"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!run_dir.exists());
    exec_works(&d, "fine");
    let out = d.cli(&["vm", "rm", "fine"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
