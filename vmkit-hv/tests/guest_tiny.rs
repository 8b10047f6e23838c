//! The agent's management calls against a real tiny guest under QEMU (TCG on hosts
//! without a usable KVM): files, metrics, host name, logs and upgrades, everything that
//! needs no systemd. The network call needs a TAP and is tested where TAPs exist.
//!
//! Needs the tiny image from `scripts/test-assets.sh` (see
//! `vmkit_core::testing::test_image`), built with the current agent. Every VM gets a
//! fresh run dir and a qcow2 overlay in a temporary directory and is killed when the
//! test ends, passing or not.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use vmkit_core::guest::{
    Client, ClientConfig, ClientError, ExecEvent, ExecRequest, LogsRequest, SessionRequest,
    WriteFileRequest,
};
use vmkit_core::testing::suites::wait_for_agent;
use vmkit_core::testing::test_image;
use vmkit_core::{DiskConfig, DiskFormat, Hypervisor, MachineConfig, VmId, VmName, VmmHandle};
use vmkit_hv::{Qemu, QemuConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// One booted tiny guest; killed, and its console printed if the test failed, on drop.
struct Guest {
    _dir: tempfile::TempDir,
    qemu: Qemu,
    handle: VmmHandle,
    client: Client,
}

impl Guest {
    /// A fresh connection to the agent channel; a client whose stream is already
    /// closed (it fails every call) when the channel cannot be opened right now.
    async fn reconnect(&self) -> Client {
        match self.qemu.connect_agent(&self.handle).await {
            Ok(stream) => Client::new(stream, ClientConfig::default()),
            Err(_) => Client::new(tokio::io::duplex(1).0, ClientConfig::default()),
        }
    }

    async fn boot(name: &str) -> Guest {
        let image = test_image("tiny");
        let dir = tempfile::Builder::new()
            .prefix("vmkgt")
            .tempdir_in("/tmp")
            .unwrap();
        let overlay = dir.path().join("root.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image.rootfs)
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img create failed");
        let mut config = MachineConfig::new(
            VmId::generate(),
            VmName::new(name).unwrap(),
            dir.path().join("run"),
            image.kernel.clone(),
        );
        config.initramfs = image.initramfs.clone();
        config.cmdline = image.cmdline.clone();
        config.disks = vec![DiskConfig::new(overlay, DiskFormat::Qcow2)];
        config.memory_mib = 256;
        let qemu = Qemu::new(QemuConfig::new());
        let started = Instant::now();
        let handle = qemu.start(&config).await.unwrap();
        let client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;
        eprintln!("{name}: agent answered {:?} after start", started.elapsed());
        Guest {
            _dir: dir,
            qemu,
            handle,
            client,
        }
    }

    /// Runs a shell command in the guest and returns its stdout; it must succeed.
    async fn sh(&self, script: &str) -> String {
        let out = self
            .client
            .exec_collect(
                ExecRequest::new(["sh", "-c", script]).timeout(Duration::from_secs(120)),
                1 << 20,
            )
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "`{script}` failed: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Kills the VM and removes its run dir.
    async fn stop(self) {
        self.qemu.kill(&self.handle).await.unwrap();
        self.qemu.cleanup(&self.handle).await.unwrap();
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.handle.run_dir.join("console.log")).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest console ---\n{}", self.console());
        }
        // Our VMM only: its command line names our run dir (a pid can be recycled).
        let pid = self.handle.pid;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let marker = self.handle.run_dir.as_os_str().as_encoded_bytes();
        if cmdline.windows(marker.len()).any(|w| w == marker) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Bytes that differ at every offset, so that a misplaced chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

/// The hex SHA-256 of `data`, from the host's `sha256sum`.
fn sha256(data: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(file.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_guest_round_trips_files_and_reports_metrics_hostname_and_logs() {
    let guest = Guest::boot("gt-files").await;
    let client = &guest.client;

    // Metrics: sane values from a guest with 256 MiB and no Docker.
    let metrics = client.metrics(Duration::from_millis(500)).await.unwrap();
    assert!(
        metrics.mem_total_bytes > 100 << 20 && metrics.mem_total_bytes <= 256 << 20,
        "{metrics:?}"
    );
    assert!(
        metrics.mem_pct > 0.0 && metrics.mem_pct < 100.0,
        "{metrics:?}"
    );
    assert!(
        metrics.disk_pct > 0.0 && metrics.disk_pct < 100.0,
        "{metrics:?}"
    );
    assert!((0.0..=100.0).contains(&metrics.cpu_pct), "{metrics:?}");
    assert_eq!(metrics.data_disk_pct, None, "no data disk attached");
    assert_eq!(metrics.container_count, None, "no docker in tiny");

    // A file of several chunks, written atomically with a mode, then read back.
    let data = pattern(3 << 20);
    let written = client
        .write_file(WriteFileRequest::new("/root/blob").mode(0o600), &data)
        .await
        .unwrap();
    assert_eq!(written, data.len() as u64);
    assert_eq!(client.read_file("/root/blob", 4 << 20).await.unwrap(), data);
    assert_eq!(guest.sh("stat -c %a /root/blob").await, "600\n");
    assert_eq!(
        guest.sh("ls -a /root | grep -c vmkit || true").await,
        "0\n",
        "no temporary file is left beside it"
    );
    let too_small = client.read_file("/root/blob", 1024).await.unwrap_err();
    assert!(
        matches!(&too_small, ClientError::Remote(m) if m.contains("over the limit")),
        "{too_small:?}"
    );

    // Host name: the kernel's, /etc/hostname and /etc/hosts.
    client.set_hostname("gt-renamed").await.unwrap();
    assert_eq!(guest.sh("hostname").await, "gt-renamed\n");
    let hosts = client.read_file("/etc/hosts", 1 << 16).await.unwrap();
    assert!(
        String::from_utf8(hosts)
            .unwrap()
            .contains("127.0.1.1\tgt-renamed\n")
    );

    // The last lines of a file.
    guest
        .sh("for i in 1 2 3 4 5; do echo line $i; done > /var/log/test.log")
        .await;
    let lines = client
        .logs(LogsRequest::file("/var/log/test.log").lines(2))
        .await
        .unwrap();
    assert_eq!(lines, ["line 4", "line 5"]);
    guest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_guest_runs_a_pty_session_and_reports_no_sshd() {
    let guest = Guest::boot("gt-session").await;

    let req =
        SessionRequest::new(["sh", "-c", "tty; echo \"term=$TERM\""]).pty("xterm-256color", 80, 24);
    let mut session = guest.client.session(req).await.unwrap();
    let mut output = String::new();
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match session.next().await {
                Some(Ok(ExecEvent::Stdout(data))) => {
                    output.push_str(&String::from_utf8_lossy(&data))
                }
                Some(Ok(ExecEvent::Exit(status))) => return status,
                other => panic!("{other:?} in a session, after {output:?}"),
            }
        }
    })
    .await
    .unwrap();
    let info = guest.client.ssh_info().await.unwrap();

    assert!(status.success(), "{status:?}: {output:?}");
    assert!(output.contains("/dev/pts/"), "{output:?}");
    assert!(output.contains("term=xterm-256color\r\n"), "{output:?}");
    // The tiny image: busybox, root only, no sshd.
    assert!(!info.sshd);
    assert!(info.host_keys.is_empty());
    assert_eq!(info.default_user, None);
    guest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_guest_refuses_a_bad_upgrade_and_restarts_into_a_good_one() {
    let mut guest = Guest::boot("gt-upgrade").await;
    let client = &guest.client;
    let installed = client
        .read_file("/usr/bin/vmkit-agent", 64 << 20)
        .await
        .unwrap();
    let installed_sha = sha256(&installed);
    let agent_pid = guest.sh("echo $PPID").await;
    // The same program with bytes after its end: it runs the same, hashes differently.
    let mut upgraded = installed.clone();
    upgraded.extend_from_slice(b"\0vmkit upgrade test\0");
    let upgraded_sha = sha256(&upgraded);

    let refused = client.upgrade(&upgraded, &installed_sha).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Remote(m) if m.contains("SHA-256 mismatch") && m.contains("unchanged")),
        "{refused:?}"
    );
    assert_eq!(
        guest.sh("sha256sum /usr/bin/vmkit-agent").await[..64],
        installed_sha,
        "the old binary stays"
    );
    assert_eq!(
        guest.sh("echo $PPID").await,
        agent_pid,
        "the old agent runs on"
    );

    let report = client.upgrade(&upgraded, &upgraded_sha).await.unwrap();
    assert_eq!(report.sha256, upgraded_sha);
    assert_eq!(report.previous_sha256, installed_sha);
    assert!(report.restarting);
    // The old process exits half a second after its reply and init starts the new
    // binary. As the manager does at boot, wait for that, then send one long hello: it
    // waits in the channel until the new agent opens the port. Reconnect only when the
    // client closed (a frame the dying agent half read can break the stream).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let new_pid = loop {
        assert!(Instant::now() < deadline, "no new agent answered");
        if guest.client.is_closed() {
            // Closing our end first: the channel takes one client at a time.
            guest.client = Client::new(tokio::io::duplex(1).0, ClientConfig::default());
            guest.client = guest.reconnect().await;
        }
        if guest
            .client
            .hello_within(Duration::from_secs(30))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let Ok(out) = guest
            .client
            .exec_collect(
                ExecRequest::new(["sh", "-c", "echo $PPID"]).timeout(Duration::from_secs(60)),
                1024,
            )
            .await
        else {
            continue;
        };
        let pid = String::from_utf8(out.stdout).unwrap();
        if pid != agent_pid {
            break pid;
        }
    };
    assert_ne!(new_pid, agent_pid);
    assert_eq!(
        guest.sh("sha256sum /usr/bin/vmkit-agent").await[..64],
        upgraded_sha
    );
    assert_eq!(
        guest.sh("sha256sum /proc/$PPID/exe").await[..64],
        upgraded_sha,
        "the running agent is the new binary"
    );
    guest.stop().await;
}

impl Guest {
    /// Drops the agent connection (the guest's channel serves one client at a
    /// time) and waits for the agent of the guest's current boot.
    async fn reconnect_after_boot(&mut self) {
        self.client = Client::new(tokio::io::duplex(1).0, ClientConfig::default());
        self.client = wait_for_agent(&self.qemu, &self.handle, BOOT_TIMEOUT).await;
    }
}

/// Runs `argv` in the guest and ignores the outcome: the guest may go away with it.
async fn fire(client: &Client, argv: &[&str]) {
    let request = ExecRequest::new(argv.iter().copied()).timeout(Duration::from_secs(30));
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        client.exec_collect(request, 1 << 16),
    )
    .await;
}

/// Regression (issue 13): QEMU ran with `-no-reboot`, so a reboot inside the guest
/// ended the VMM. Now the guest resets in place (counted by the VMM's supervisor),
/// and a panic reported by pvpanic ends the VMM with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reboot_resets_in_place_and_a_panic_ends_the_vmm_as_a_panic() {
    let mut g = Guest::boot("reboots").await;
    let mut watch = g.qemu.watch(&g.handle).await.unwrap();
    let boot = g.sh("cat /proc/sys/kernel/random/boot_id").await;
    assert!(
        g.sh("cat /proc/modules").await.contains("pvpanic_pci"),
        "the image loads the pvpanic driver"
    );

    fire(&g.client, &["reboot"]).await;
    tokio::time::timeout(BOOT_TIMEOUT, async {
        while watch.current().resets == 0 {
            let events = watch.changed().await;
            assert!(
                events.is_some(),
                "the VMM ended ({:?}) instead of resetting",
                watch.current().exit
            );
        }
    })
    .await
    .expect("QEMU reported the reset");
    assert_eq!(
        g.qemu.info(&g.handle).await.unwrap().state,
        vmkit_core::VmmState::Running,
        "the same VMM runs the new boot"
    );
    g.reconnect_after_boot().await;
    let new_boot = g.sh("cat /proc/sys/kernel/random/boot_id").await;
    assert_ne!(new_boot, boot);

    fire(&g.client, &["sh", "-c", "echo c > /proc/sysrq-trigger"]).await;
    let exit = tokio::time::timeout(BOOT_TIMEOUT, watch.wait_exit())
        .await
        .expect("the VMM ended");
    assert_eq!(exit, Some(vmkit_core::VmmExit::Panic));
    let console = g.qemu.console_tail(&g.handle, 1 << 16).await.unwrap();
    assert!(console.contains("Kernel panic - not syncing"), "{console}");
    g.qemu.cleanup(&g.handle).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_power_off_ends_the_vmm_as_a_power_off() {
    let g = Guest::boot("powers-off").await;
    let mut watch = g.qemu.watch(&g.handle).await.unwrap();

    fire(&g.client, &["poweroff"]).await;

    let exit = tokio::time::timeout(BOOT_TIMEOUT, watch.wait_exit())
        .await
        .expect("the VMM ended");
    assert_eq!(exit, Some(vmkit_core::VmmExit::PowerOff));
    g.qemu.cleanup(&g.handle).await.unwrap();
}
