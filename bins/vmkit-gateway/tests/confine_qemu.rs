#![allow(clippy::unwrap_used)]
//! Confined VMMs end to end: the daemon runs as root, so it confines by default.
//! Each VM's QEMU runs as the VM's own uid, under seccomp, in the VM's cgroup; it
//! cannot open another VM's disk or the state file; it survives a daemon restart;
//! deleting the VM removes its cgroup and frees its uid. Needs root, cgroup
//! controllers and the test assets (`scripts/test-assets.sh`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Daemon, json, stderr};

fn real_daemon(dir: &Path) -> Daemon {
    Daemon::start_in(
        dir,
        &[],
        &[
            ("VMKIT_HYPERVISOR", "qemu"),
            ("VMKIT_TIMEOUTS_BOOT_SECS", "120"),
        ],
    )
}

fn status_field(pid: u64, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap()
}

/// The v1 cgroup directory of `pid` for `controller` (this machine kind has v1).
fn cgroup_dir(pid: u64, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = text
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == controller))
        })
        .and_then(|l| l.splitn(3, ':').nth(2))
        .unwrap()
        .to_owned();
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

/// The error of opening `path` for reading as `uid`:`uid`, or `None` if it opened.
fn open_as(uid: u64, path: &Path) -> Option<String> {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "head", "-c1"])
        .arg(path)
        .output()
        .unwrap();
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
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

#[test]
fn a_vm_runs_confined_survives_a_restart_and_its_delete_frees_its_uid_and_cgroup() {
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    support::link_tiny_image(tmp.path());
    let d = real_daemon(tmp.path());

    let jail = create(&d, "jail");
    let other = create(&d, "other");
    let pid = jail["resources"]["vmm"]["pid"].as_u64().unwrap();
    let uid = jail["resources"]["uid"]
        .as_u64()
        .expect("a confined VM holds a uid");
    let id = jail["id"].as_str().unwrap().to_owned();
    assert_eq!(uid, 0x5000_0000, "the lowest uid of the default range");
    assert_eq!(other["resources"]["uid"].as_u64(), Some(uid + 1));

    assert_eq!(
        status_field(pid, "Uid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}")
    );
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let memory = cgroup_dir(pid, "memory");
    let cpu = cgroup_dir(pid, "cpu");
    assert!(
        memory.ends_with(format!("vmkit/{id}")),
        "{}",
        memory.display()
    );
    // Guest, the VMM's overhead, and TCG's code cache (this machine has no KVM).
    assert_eq!(
        read(&memory.join("memory.limit_in_bytes")),
        ((256u64 + 320 + 512) << 20).to_string()
    );
    let vcpus = jail["spec"]["vcpus"].as_u64().unwrap();
    assert_eq!(
        read(&cpu.join("cpu.cfs_quota_us")),
        (vcpus * 100_000 + 100_000).to_string()
    );
    assert_eq!(read(&cpu.join("cpu.shares")), (vcpus * 1024).to_string());
    assert_eq!(read(&cgroup_dir(pid, "pids").join("pids.max")), "512");

    let own_disk = PathBuf::from(jail["resources"]["root"]["path"].as_str().unwrap());
    let other_disk = PathBuf::from(other["resources"]["root"]["path"].as_str().unwrap());
    assert_eq!(open_as(uid, &own_disk), None, "its own disk");
    for forbidden in [other_disk, tmp.path().join("state.redb")] {
        let error = open_as(uid, &forbidden).expect("must not open");
        assert!(
            error.contains("Permission denied"),
            "{}: {error}",
            forbidden.display()
        );
    }

    // A live vCPU resize (QEMU under seccomp plugs it) raises the CPU limits with it.
    let out = d.cli(&[
        "--json",
        "vm",
        "resize",
        "jail",
        "--cpus",
        &(vcpus + 1).to_string(),
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(
        read(&cpu.join("cpu.cfs_quota_us")),
        ((vcpus + 1) * 100_000 + 100_000).to_string()
    );
    assert_eq!(
        read(&cpu.join("cpu.shares")),
        ((vcpus + 1) * 1024).to_string()
    );
    assert_eq!(status_field(pid, "Seccomp"), "2", "the same VMM runs on");

    // A restarted daemon re-attaches the confined VMM.
    assert!(d.terminate().success());
    let d = real_daemon(tmp.path());
    let out = d.cli(&["--json", "vm", "show", "jail"]);
    let shown = json(&out);
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["resources"]["vmm"]["pid"].as_u64(), Some(pid));
    let out = d.cli(&["vm", "exec", "jail", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = d.cli(&["vm", "rm", "jail"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!memory.exists() && !cpu.exists(), "the cgroup is gone");
    let next = create(&d, "next");
    assert_eq!(
        next["resources"]["uid"].as_u64(),
        Some(uid),
        "its uid is free again"
    );
    for name in ["other", "next"] {
        assert!(d.cli(&["vm", "rm", name]).status.success());
    }
}
