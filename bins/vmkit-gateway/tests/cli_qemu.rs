#![allow(clippy::unwrap_used)]
//! Real VMs end to end: the daemon on the QEMU backend with the tiny image, driven
//! by the CLI over the Unix socket. Needs the test assets (`scripts/test-assets.sh`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Daemon, json, stderr, stdout};

/// A data directory whose `images/` holds the test images: `tiny`, and `broken` —
/// the same files with a command line whose init does not exist, so the guest
/// panics before any agent runs.
fn data_dir() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(images.join("broken")).unwrap();
    let tiny_dir = support::test_images().join("tiny");
    std::os::unix::fs::symlink(&tiny_dir, images.join("tiny")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny_dir.join("manifest.json")).unwrap()).unwrap();
    for key in ["kernel", "initramfs", "rootfs"] {
        let file = manifest[key].as_str().unwrap();
        std::os::unix::fs::symlink(tiny_dir.join(file), images.join("broken").join(file)).unwrap();
    }
    let mut broken = manifest.clone();
    broken["name"] = "broken".into();
    broken["digest"] = format!("{}-broken", manifest["digest"].as_str().unwrap()).into();
    broken["cmdline"] = format!(
        "{} init=/nonexistent",
        manifest["cmdline"].as_str().unwrap()
    )
    .into();
    std::fs::write(
        images.join("broken/manifest.json"),
        serde_json::to_vec(&broken).unwrap(),
    )
    .unwrap();
    tmp
}

fn real_daemon(dir: &Path) -> Daemon {
    real_daemon_with(dir, &[])
}

fn real_daemon_with(dir: &Path, env: &[(&str, &str)]) -> Daemon {
    let mut all = vec![
        ("VMKIT_HYPERVISOR", "qemu"),
        ("VMKIT_TIMEOUTS_BOOT_SECS", "120"),
        ("VMKIT_TIMEOUTS_SHUTDOWN_GRACE_SECS", "20"),
    ];
    all.extend_from_slice(env);
    Daemon::start_in(dir, &[], &all)
}

/// A `PATH` for the daemon in which `e2fsck` and `resize2fs` are tripwires: each
/// run is written to the returned log (which then exists) and fails. The host must
/// never run them on a guest's filesystem.
fn fsck_tripwire(dir: &Path) -> (String, std::path::PathBuf) {
    let bin = dir.join("tripwire");
    let log = dir.join("tripwire.log");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["e2fsck", "resize2fs"] {
        let path = bin.join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"$0 $*\" >> '{}'\nexit 8\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, log)
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn real_vm_boots_runs_commands_survives_a_daemon_restart_and_is_removed() {
    let tmp = data_dir();
    let d = real_daemon(tmp.path());

    let out = d.cli(&["--json", "vm", "create", "e2e", "--memory", "256"]);
    assert!(
        out.status.success(),
        "create failed: {}\n{}",
        stderr(&out),
        d.log()
    );
    let vm = json(&out);
    assert_eq!(vm["state"], "running");
    let pid = vm["resources"]["vmm"]["pid"].as_u64().unwrap();
    assert!(pid_alive(pid));

    // uname runs in the guest: the guest kernel, not the host's.
    let out = d.cli(&["vm", "exec", "e2e", "--", "uname", "-r"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("cloud-amd64"), "{}", stdout(&out));

    // Exit codes, stderr, stdin.
    let out = d.cli(&[
        "vm",
        "exec",
        "e2e",
        "--",
        "sh",
        "-c",
        "echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stderr(&out), "oops\n");
    let out = d.cli_with_stdin(
        &["vm", "exec", "-i", "e2e", "--", "wc", "-c"],
        &[b'x'; 100_000],
    );
    assert_eq!(stdout(&out).trim(), "100000");

    // Large output streams through intact.
    let out = d.cli(&[
        "vm",
        "exec",
        "e2e",
        "--",
        "sh",
        "-c",
        "yes 0123456789abcdef | head -c 4000000",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout.len(), 4_000_000);
    assert!(out.stdout.starts_with(b"0123456789abcdef\n0123"));

    // A command over its timeout is killed and reported.
    let started = Instant::now();
    let out = d.cli(&["vm", "exec", "e2e", "--timeout", "1", "--", "sleep", "60"]);
    assert_eq!(out.status.code(), Some(124));
    assert!(started.elapsed() < Duration::from_secs(30));

    // Pause and resume: a paused guest refuses exec, a resumed one answers.
    assert_eq!(
        json(&d.cli(&["--json", "vm", "pause", "e2e"]))["state"],
        "paused"
    );
    let out = d.cli(&["vm", "exec", "e2e", "--", "true"]);
    assert!(stderr(&out).contains("it is paused"), "{}", stderr(&out));
    assert_eq!(
        json(&d.cli(&["--json", "vm", "resume", "e2e"]))["state"],
        "running"
    );
    assert_eq!(
        d.cli(&["vm", "exec", "e2e", "--", "true"]).status.code(),
        Some(0)
    );

    // The VM outlives the daemon and is re-attached by the next one.
    assert!(d.terminate().success());
    assert!(pid_alive(pid), "QEMU survives a daemon shutdown");
    let d = real_daemon(tmp.path());
    let out = d.cli(&["--json", "vm", "show", "e2e"]);
    assert_eq!(json(&out)["state"], "running");
    let out = d.cli(&[
        "vm",
        "exec",
        "e2e",
        "--",
        "cat",
        "/proc/sys/kernel/hostname",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exec after restart: {}",
        stderr(&out)
    );

    // Removal leaves nothing behind.
    let out = d.cli(&["vm", "rm", "e2e"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!pid_alive(pid), "QEMU is gone after rm");
    assert_eq!(files_under(&tmp.path().join("run")), Vec::<String>::new());
    assert_eq!(
        files_under(&tmp.path().join("volumes/vm")),
        Vec::<String>::new()
    );
    assert_eq!(
        json(&d.cli(&["--json", "vm", "ls"]))
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn a_qemu_that_dies_marks_the_vm_stopped_and_it_starts_again() {
    let tmp = data_dir();
    let d = real_daemon(tmp.path());
    let out = d.cli(&["--json", "vm", "create", "crashy", "--memory", "256"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let pid = json(&out)["resources"]["vmm"]["pid"].as_u64().unwrap();

    // SAFETY: signalling the QEMU process this test created.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = json(&d.cli(&["--json", "vm", "show", "crashy"]))["state"].clone();
        if state == "stopped" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VM still {state} after its QEMU died"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the console showed before the crash is kept.
    let out = d.cli(&["vm", "logs", "crashy"]);
    assert!(
        out.status.success() && stdout(&out).contains("Linux version"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = d.cli(&["--json", "vm", "start", "crashy"]);
    assert_eq!(json(&out)["state"], "running", "{}", stderr(&out));
    let out = d.cli(&["vm", "exec", "crashy", "--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(d.cli(&["vm", "rm", "crashy"]).status.success());
}

#[test]
fn with_on_vmm_exit_restart_a_vm_whose_qemu_dies_boots_again() {
    let tmp = data_dir();
    let d = Daemon::start_in(
        tmp.path(),
        &[],
        &[
            ("VMKIT_HYPERVISOR", "qemu"),
            ("VMKIT_TIMEOUTS_BOOT_SECS", "120"),
            ("VMKIT_ON_VMM_EXIT", "restart"),
        ],
    );
    let out = d.cli(&["--json", "vm", "create", "phoenix", "--memory", "256"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let pid = json(&out)["resources"]["vmm"]["pid"].as_u64().unwrap();

    // SAFETY: signalling the QEMU process this test created.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = json(&d.cli(&["--json", "vm", "show", "phoenix"]));
        let new_pid = vm["resources"]["vmm"]["pid"].as_u64();
        if vm["state"] == "running" && new_pid.is_some_and(|p| p != pid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VM not restarted: {vm}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = d.cli(&["vm", "exec", "phoenix", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(d.log().contains("restarted after its VMM died"));
    assert!(d.cli(&["vm", "rm", "phoenix"]).status.success());
}

#[test]
fn a_guest_that_never_says_hello_fails_create_with_its_console_and_is_cleaned_up() {
    let tmp = data_dir();
    let d = Daemon::start_in(
        tmp.path(),
        &[],
        &[
            ("VMKIT_HYPERVISOR", "qemu"),
            ("VMKIT_TIMEOUTS_BOOT_SECS", "60"),
        ],
    );
    let out = d.cli(&[
        "--json", "vm", "create", "bad", "--image", "broken", "--memory", "256",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = json(&out);
    assert_eq!(err["error"]["code"], "boot_failed", "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("last console output") && message.contains("nonexistent"),
        "the error carries the console tail: {message}"
    );
    assert_eq!(
        json(&d.cli(&["--json", "vm", "ls"]))
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(files_under(&tmp.path().join("run")), Vec::<String>::new());
    assert_eq!(
        files_under(&tmp.path().join("volumes/vm")),
        Vec::<String>::new()
    );
}

#[test]
fn data_disk_keeps_its_data_across_a_restart_and_rm_keep_data_keeps_only_it() {
    let tmp = data_dir();
    let d = real_daemon(tmp.path());
    let out = d.cli(&[
        "--json", "vm", "create", "store", "--memory", "256", "--disk", "1",
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let vm = json(&out);
    let data_path = vm["resources"]["data"]["path"].as_str().unwrap().to_owned();
    assert_eq!(vm["resources"]["data"]["size_bytes"], 1u64 << 30);

    let write = "mkdir -p /mnt/data && mount -t ext4 /dev/vdb /mnt/data \
                 && echo persisted-42 > /mnt/data/proof && sync && umount /mnt/data";
    let out = d.cli(&["vm", "exec", "store", "--", "sh", "-c", write]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = d.cli(&["--json", "vm", "restart", "store"]);
    assert_eq!(json(&out)["state"], "running", "{}", stderr(&out));
    let read = "mkdir -p /mnt/data && mount -t ext4 /dev/vdb /mnt/data && cat /mnt/data/proof";
    let out = d.cli(&["vm", "exec", "store", "--", "sh", "-c", read]);
    assert_eq!(stdout(&out), "persisted-42\n", "{}", stderr(&out));

    let out = d.cli(&["vm", "rm", "--keep-data", "store"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        files_under(&tmp.path().join("volumes/vm")),
        Vec::<String>::new(),
        "the VM's volumes are gone from vmkit's set"
    );
    let kept = files_under(&tmp.path().join("volumes/kept"));
    assert_eq!(kept.len(), 1, "only the data volume is kept: {kept:?}");
    assert!(
        kept[0].contains(&*Path::new(&data_path).file_stem().unwrap().to_string_lossy()),
        "{kept:?} is the data volume {data_path}"
    );
    assert_eq!(files_under(&tmp.path().join("run")), Vec::<String>::new());
}

/// Runs `sh -c script` in `vm` and returns its stdout, asserting success.
fn sh(d: &Daemon, vm: &str, script: &str) -> String {
    let out = d.cli(&["vm", "exec", vm, "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{script}: {}", stderr(&out));
    stdout(&out)
}

const MOUNT: &str = "mkdir -p /mnt/data && mount -t ext4 /dev/vdb /mnt/data";

#[test]
fn snapshot_restore_cp_resize_logs_and_metrics_on_real_vms() {
    let tmp = data_dir();
    let (path, tripwire) = fsck_tripwire(tmp.path());
    let d = real_daemon_with(tmp.path(), &[("PATH", &path)]);
    let out = d.cli(&[
        "--json", "vm", "create", "ops", "--memory", "256", "--disk", "1",
    ]);
    assert!(
        out.status.success(),
        "{}
{}",
        stderr(&out),
        d.log()
    );
    sh(
        &d,
        "ops",
        &format!(
            "{MOUNT} && echo one > /mnt/data/f && sync && umount /mnt/data && echo mem-token > /tmp/m"
        ),
    );

    let out = d.cli(&["vm", "logs", "ops"]);
    assert!(
        stdout(&out).contains("Linux version"),
        "the console has the boot: {}",
        stdout(&out)
    );
    let out = d.cli(&["--json", "vm", "metrics", "ops"]);
    let m = json(&out);
    assert_eq!(m["vmm"]["vcpus"], 1, "{m}");
    assert!(
        m["guest"]["mem_total_bytes"].as_u64().unwrap() > 100 << 20,
        "{m}"
    );

    let out = d.cli(&["--json", "vm", "snapshot", "ops", "s1"]);
    assert!(
        out.status.success(),
        "{}
{}",
        stderr(&out),
        d.log()
    );
    assert!(
        json(&out)["memory"] == true,
        "QEMU saves memory: {}",
        stdout(&out)
    );
    assert_eq!(
        json(&d.cli(&["--json", "vm", "show", "ops"]))["state"],
        "running"
    );
    sh(
        &d,
        "ops",
        &format!("{MOUNT} && echo two > /mnt/data/f && sync && umount /mnt/data && rm /tmp/m"),
    );

    let out = d.cli(&["--json", "vm", "restore", "ops", "s1"]);
    assert!(
        out.status.success(),
        "{}
{}",
        stderr(&out),
        d.log()
    );
    assert_eq!(json(&out)["state"], "running");
    assert_eq!(
        sh(&d, "ops", "cat /tmp/m"),
        "mem-token\n",
        "memory is restored"
    );
    assert_eq!(
        sh(
            &d,
            "ops",
            &format!("{MOUNT} && cat /mnt/data/f && umount /mnt/data")
        ),
        "one\n",
        "disks are restored"
    );

    for (args, copy) in [
        (vec!["ops", "copy"], "copy"),
        (vec!["--from-snapshot", "s1", "fromsnap"], "fromsnap"),
    ] {
        let mut cmd = vec!["--json", "vm", "cp"];
        cmd.extend(args);
        let out = d.cli(&cmd);
        assert!(
            out.status.success(),
            "{}
{}",
            stderr(&out),
            d.log()
        );
        assert_eq!(
            sh(&d, copy, "hostname"),
            format!("{copy}\n"),
            "a copy has its own host name"
        );
        assert_eq!(
            sh(
                &d,
                copy,
                &format!("{MOUNT} && cat /mnt/data/f && umount /mnt/data")
            ),
            "one\n"
        );
        assert_ne!(
            sh(&d, copy, "cat /tmp/m 2>/dev/null; true"),
            "mem-token\n",
            "a copy boots fresh"
        );
    }

    let out = d.cli(&["vm", "stop", "ops"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&[
        "--json", "vm", "resize", "ops", "--cpus", "2", "--memory", "384", "--disk", "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["resources"]["data"]["size_bytes"], 2u64 << 30);
    let out = d.cli(&["vm", "start", "ops"]);
    assert!(
        out.status.success(),
        "{}
{}",
        stderr(&out),
        d.log()
    );
    assert_eq!(sh(&d, "ops", "nproc"), "2\n");
    // The data disk's filesystem grew with it, in the guest (the tiny image mounts
    // it at /data and its agent grew it when asked after the start); the host ran
    // neither e2fsck nor resize2fs.
    let kib: u64 = sh(&d, "ops", "df -k /data | awk 'NR==2 {print $2}'")
        .trim()
        .parse()
        .unwrap();
    assert!(kib > 1900 * 1024, "a 2 GiB filesystem, not {kib} KiB");
    assert!(
        !tripwire.exists(),
        "the host ran {}",
        std::fs::read_to_string(&tripwire).unwrap_or_default()
    );

    // Live: QEMU plugs a vCPU and the agent brings it online; a snapshot taken then
    // restores into a VMM with the same vCPUs; unplugging waits for the guest.
    let out = d.cli(&["--json", "vm", "resize", "ops", "--cpus", "3"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(json(&out)["spec"]["vcpus"], 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sh(&d, "ops", "nproc") != "3\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the plugged vCPU never came online: {}",
            sh(&d, "ops", "cat /sys/devices/system/cpu/online")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let m = json(&d.cli(&["--json", "vm", "metrics", "ops"]));
    assert_eq!(m["vmm"]["vcpus"], 3, "{m}");
    let out = d.cli(&["vm", "snapshot", "ops", "s2"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let out = d.cli(&["vm", "restore", "ops", "s2"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(sh(&d, "ops", "nproc"), "3\n", "restored with 3 vCPUs");
    let out = d.cli(&["vm", "resize", "ops", "--cpus", "1"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(sh(&d, "ops", "nproc"), "1\n");
    let m = json(&d.cli(&["--json", "vm", "metrics", "ops"]));
    assert_eq!(m["vmm"]["vcpus"], 1, "{m}");
    // Beyond the slots QEMU started with, and memory, need a stop.
    let out = d.cli(&["vm", "resize", "ops", "--cpus", "5"]);
    assert!(
        !out.status.success() && stderr(&out).contains("1 to 4"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["vm", "resize", "ops", "--memory", "512"]);
    assert!(
        !out.status.success() && stderr(&out).contains("stop"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        json(&d.cli(&["--json", "vm", "show", "ops"]))["spec"]["vcpus"],
        1,
        "refused resizes change nothing"
    );
    assert!(d.cli(&["snapshot", "rm", "s2"]).status.success());

    let out = d.cli(&["vm", "resize", "ops", "--disk", "1"]);
    assert!(
        !out.status.success() && stderr(&out).contains("only grow"),
        "{}",
        stderr(&out)
    );

    let out = d.cli(&["--json", "snapshot", "ls"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 1);
    assert!(d.cli(&["snapshot", "rm", "s1"]).status.success());
    for vm in ["ops", "copy", "fromsnap"] {
        assert!(d.cli(&["vm", "rm", vm]).status.success());
    }
    for dir in ["volumes/vm", "run", "snapshots"] {
        assert_eq!(
            files_under(&tmp.path().join(dir)),
            Vec::<String>::new(),
            "{dir} is empty"
        );
    }
}

/// The base image, as a daemon configured with its default (`default_image = "base"`)
/// boots it: the manager gives the guest its host name and data disk through the
/// agent, systemd runs sshd, and the default user exists. A grown data disk has its
/// filesystem grown by the guest at the next boot, never by the host.
#[test]
fn the_base_image_boots_by_default_with_sshd_its_name_and_its_data_disk() {
    let tmp = data_dir();
    std::os::unix::fs::symlink(
        support::test_images().join("base"),
        tmp.path().join("images/base"),
    )
    .unwrap();
    let (path, tripwire) = fsck_tripwire(tmp.path());
    let d = Daemon::start_in(
        tmp.path(),
        &[],
        &[
            ("VMKIT_HYPERVISOR", "qemu"),
            ("VMKIT_TIMEOUTS_BOOT_SECS", "180"),
            ("VMKIT_DEFAULT_IMAGE", "base"),
            ("PATH", &path),
        ],
    );
    let out = d.cli(&[
        "--json", "vm", "create", "home", "--memory", "512", "--disk", "1",
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(json(&out)["spec"]["image"], "base");
    assert_eq!(sh(&d, "home", "hostname"), "home\n");
    // The agent answers before systemd has finished booting.
    assert_eq!(
        sh(
            &d,
            "home",
            "systemctl is-system-running --wait; systemctl is-active ssh"
        ),
        "running\nactive\n"
    );
    // The root disk has the daemon's default size, and systemd grew / to fill it.
    let root_kib: u64 = sh(&d, "home", "df -k / | awk 'NR==2 {print $2}'")
        .trim()
        .parse()
        .unwrap();
    assert!(
        root_kib > 9 << 20,
        "a 10 GiB root filesystem, not {root_kib} KiB"
    );
    assert_eq!(
        sh(&d, "home", "findmnt -n -o SOURCE /data"),
        "/dev/vdb\n",
        "the data disk is mounted at /data"
    );
    assert_eq!(
        sh(
            &d,
            "home",
            "cat /etc/vmkit/default-user; id -u \"$(cat /etc/vmkit/default-user)\" >/dev/null && echo exists"
        ),
        "vmkit\nexists\n"
    );
    // The guest's journal, through the agent.
    let out = d.cli(&["vm", "logs", "home", "--unit", "ssh", "-n", "20"]);
    assert!(
        out.status.success() && stdout(&out).contains("Server listening"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    // Grown while stopped: the host enlarges the volume, the guest its filesystem.
    assert!(d.cli(&["vm", "stop", "home"]).status.success());
    let out = d.cli(&["vm", "resize", "home", "--disk", "2"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let out = d.cli(&["vm", "start", "home"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let grown = sh(
        &d,
        "home",
        "systemctl is-system-running --wait >/dev/null; df -k /data | awk 'NR==2 {print $2}'; \
         dmesg | grep -c 'EXT4-fs (vdb): resized filesystem to' || true",
    );
    let mut lines = grown.lines();
    let kib: u64 = lines.next().unwrap().parse().unwrap();
    assert!(kib > 1900 * 1024, "a 2 GiB /data, not {kib} KiB");
    assert_ne!(
        lines.next(),
        Some("0"),
        "the guest's kernel grew /data online"
    );
    assert!(
        !tripwire.exists(),
        "the host ran {}",
        std::fs::read_to_string(&tripwire).unwrap_or_default()
    );
    assert!(d.cli(&["vm", "rm", "home"]).status.success());
}

/// `vmkit doctor` on this host: root, QEMU and nftables are there (the test script
/// installs them), the KVM verdict is given with its reason, and auto picks a backend.
#[test]
fn doctor_reports_what_this_host_has() {
    let tmp = data_dir();
    let out = Command::new(support::cli_bin())
        .args(["--json", "--data-dir"])
        .arg(tmp.path())
        .arg("doctor")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let doc = json(&out);
    let report = &doc["report"];
    assert_eq!(report["network"]["root"], true, "{doc}");
    for program in ["qemu", "nft"] {
        assert!(
            report[program]["path"].is_string() && report[program]["version"].is_string(),
            "{program} found with its version: {doc}"
        );
    }
    assert!(report["disk"]["free_bytes"].as_u64().unwrap() > 0, "{doc}");
    // Every other program vmkit runs (scripts/install-deps.sh installs them all).
    let tools = report["tools"].as_array().unwrap();
    for program in [
        "qemu-img",
        "mkfs.ext4",
        "debugfs",
        "cpio",
        "busybox",
        "mmdebstrap",
    ] {
        let tool = tools
            .iter()
            .find(|t| t["program"]["requested"] == program)
            .unwrap_or_else(|| panic!("{program} is checked: {doc}"));
        assert!(
            tool["program"]["version"].is_string() && tool["program"]["problem"].is_null(),
            "{program} runs and reports a version: {doc}"
        );
    }
    assert!(
        report["kvm"]["api_version"].is_number() || report["kvm"]["problem"].is_string(),
        "KVM is usable or says why not: {doc}"
    );
    let picked = doc["auto"]["backend"].as_str().unwrap();
    assert!(["qemu", "cloud-hypervisor"].contains(&picked), "{doc}");
    assert!(!doc["auto"]["reason"].as_str().unwrap().is_empty());
    // This machine kind: root, cgroup v1 controllers, a QEMU with seccomp.
    let confinement = &doc["confinement"];
    assert!(
        confinement["cgroups"]
            .as_str()
            .unwrap()
            .starts_with("cgroup v1"),
        "{doc}"
    );
    assert_eq!(confinement["qemu_sandbox"], true, "{doc}");
    assert_eq!(confinement["qemu_ready"], true, "{doc}");

    let text = Command::new(support::cli_bin())
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("doctor")
        .output()
        .unwrap();
    let text = stdout(&text);
    for line in [
        "KVM device:",
        "QEMU:",
        "nftables:",
        "qemu-img:",
        "mmdebstrap:",
        "cgroups:",
        "QEMU sandbox:",
        "confinement:",
        "auto picks:",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
}
