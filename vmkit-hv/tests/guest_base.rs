//! The base image (Debian, systemd, sshd, apt) under QEMU (TCG on hosts without a usable
//! KVM), checked from inside through the agent: systemd brings up sshd and the agent,
//! the data disk is mounted, and every management call works on a real systemd guest,
//! up to an upgrade of the agent itself.
//!
//! Needs the base image from `scripts/test-assets.sh` (see
//! `vmkit_core::testing::test_image`). One boot for the whole file: a systemd guest
//! takes tens of seconds to boot under TCG.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use vmkit_core::guest::{
    Client, ClientConfig, ClientError, ExecEvent, ExecRequest, HardenRequest, LogsRequest,
    SessionRequest, WriteFileRequest,
};
use vmkit_core::testing::suites::wait_for_agent;
use vmkit_core::testing::test_image;
use vmkit_core::{DiskConfig, DiskFormat, Hypervisor, MachineConfig, VmId, VmName, VmmHandle};
use vmkit_hv::{Qemu, QemuConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long after the agent's hello sshd may take to listen (tens of seconds under TCG;
/// the image's boot is cut so that it is a few).
const SSHD_TIMEOUT: Duration = Duration::from_secs(120);
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb2bVr1Jqf3ZkJ8n0b0Q0m5sQ1vKx4zR9pUu7tY2cXw owner@vmkit";

/// One booted base guest; killed, and its console printed if the test failed, on drop.
struct Guest {
    _dir: tempfile::TempDir,
    qemu: Qemu,
    handle: VmmHandle,
    client: Client,
}

impl Guest {
    async fn boot(name: &str) -> Guest {
        let image = test_image("base");
        let dir = tempfile::Builder::new()
            .prefix("vmkgb")
            .tempdir_in("/tmp")
            .unwrap();
        let overlay = dir.path().join("root.qcow2");
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image.rootfs)
            .arg(&overlay));
        // A data disk as the storage backend makes it: ext4 labelled vmkit-data.
        let data = dir.path().join("data.ext4");
        run(std::process::Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", "vmkit-data"])
            .arg(&data)
            .arg("64M"));
        let mut config = MachineConfig::new(
            VmId::generate(),
            VmName::new(name).unwrap(),
            dir.path().join("run"),
            image.kernel.clone(),
        );
        config.initramfs = image.initramfs.clone();
        config.cmdline = image.cmdline.clone();
        config.disks = vec![
            DiskConfig::new(overlay, DiskFormat::Qcow2),
            DiskConfig::new(data, DiskFormat::Raw),
        ];
        config.memory_mib = 1024;
        config.vcpus = 2;
        config.max_vcpus = 2;
        let qemu = Qemu::new(QemuConfig::new());
        let started = Instant::now();
        let handle = qemu.start(&config).await.unwrap();
        let client = wait_for_agent(&qemu, &handle, BOOT_TIMEOUT).await;
        eprintln!(
            "{name}: agent answered {:?} after start ({})",
            started.elapsed(),
            qemu.accel_choice().await
        );
        Guest {
            _dir: dir,
            qemu,
            handle,
            client,
        }
    }

    /// Runs a shell command in the guest: its exit code and stdout.
    async fn try_sh(&self, script: &str) -> (Option<i32>, String) {
        let out = self
            .client
            .exec_collect(
                ExecRequest::new(["sh", "-c", script]).timeout(Duration::from_secs(120)),
                1 << 20,
            )
            .await
            .unwrap();
        (out.status.code, String::from_utf8(out.stdout).unwrap())
    }

    /// Runs a shell command in the guest and returns its stdout; it must succeed.
    async fn sh(&self, script: &str) -> String {
        let (code, stdout) = self.try_sh(script).await;
        assert_eq!(code, Some(0), "`{script}` failed; stdout: {stdout}");
        stdout
    }

    /// Waits until `systemctl is-system-running` settles (running or degraded).
    async fn wait_booted(&self) -> String {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let (_, state) = self
                .try_sh("systemctl is-system-running 2>/dev/null || true")
                .await;
            let state = state.trim().to_owned();
            if state == "running" || state == "degraded" || Instant::now() > deadline {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until something listens on TCP port 22; false if nothing did in time.
    async fn wait_sshd_listening(&self) -> bool {
        let deadline = Instant::now() + SSHD_TIMEOUT;
        loop {
            let (_, listeners) = self.try_sh("ss -Htln 'sport = :22'").await;
            if !listeners.trim().is_empty() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Kills the VM and removes its run dir.
    async fn stop(self) {
        self.qemu.kill(&self.handle).await.unwrap();
        self.qemu.cleanup(&self.handle).await.unwrap();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let console = std::fs::read_to_string(self.handle.run_dir.join("console.log"))
                .unwrap_or_default();
            eprintln!("--- guest console ---\n{console}");
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

fn run(command: &mut std::process::Command) {
    let status = command.status().unwrap();
    assert!(status.success(), "{command:?} failed");
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
async fn the_base_image_runs_systemd_sshd_and_an_agent_that_manages_it() {
    let started = Instant::now();
    let mut guest = Guest::boot("gb-base").await;
    let client = &guest.client;

    // systemd is PID 1; sshd soon accepts on port 22, and systemd settles.
    assert_eq!(guest.sh("cat /proc/1/comm").await, "systemd\n");
    let listening = guest.wait_sshd_listening().await;
    eprintln!(
        "gb-base: sshd listening {:?} after start",
        started.elapsed()
    );
    assert!(listening, "sshd does not listen on port 22");
    let state = guest.wait_booted().await;
    eprintln!(
        "gb-base: system {state} {:?} after start",
        started.elapsed()
    );
    let failed = guest.sh("systemctl --failed --no-legend --plain").await;
    assert_eq!(state, "running", "failed units: {failed}");
    assert_eq!(
        guest.sh("systemctl is-active ssh.service").await,
        "active\n"
    );
    assert_eq!(
        guest.sh("systemctl is-active vmkit-agent.service").await,
        "active\n"
    );
    assert_eq!(
        guest
            .sh("test -s /etc/ssh/ssh_host_ed25519_key && echo made")
            .await,
        "made\n"
    );
    // Only the host key that is quick to make (ed25519), the one sshd uses; the keygen
    // unit may be started again and leaves an existing key alone.
    assert_eq!(
        guest.sh("ls /etc/ssh | grep '^ssh_host_'").await,
        "ssh_host_ed25519_key\nssh_host_ed25519_key.pub\n"
    );
    assert_eq!(
        guest.sh("sshd -T | grep '^hostkey '").await,
        "hostkey /etc/ssh/ssh_host_ed25519_key\n"
    );
    let fingerprint = guest
        .sh("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
        .await;
    guest.sh("systemctl start vmkit-ssh-keygen.service").await;
    assert_eq!(
        guest
            .sh("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
            .await,
        fingerprint
    );

    // SSH facts for a gateway: sshd, the host key made at this boot, the default user.
    let info = client.ssh_info().await.unwrap();
    let ed25519 = guest.sh("cat /etc/ssh/ssh_host_ed25519_key.pub").await;
    assert!(info.sshd);
    assert!(
        info.host_keys.contains(&ed25519.trim().to_owned()),
        "{info:?} lacks {ed25519}"
    );
    assert_eq!(info.default_user.as_deref(), Some("vmkit"));

    // A session as the default user, through pipes.
    let req = SessionRequest::new(["sh", "-c", "echo \"$(id -un) $HOME $(pwd)\""]).user("vmkit");
    let mut session = client.session(req).await.unwrap();
    let mut stdout = Vec::new();
    let status = loop {
        match session.next().await {
            Some(Ok(ExecEvent::Stdout(data))) => stdout.extend_from_slice(&data),
            Some(Ok(ExecEvent::Exit(status))) => break status,
            other => panic!("{other:?} in a session"),
        }
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout, b"vmkit /home/vmkit /home/vmkit\n");

    assert_eq!(guest.sh("findmnt -n -o SOURCE /data").await, "/dev/vdb\n");
    assert_eq!(
        guest.sh("findmnt -n -o OPTIONS / | cut -d, -f1").await,
        "rw\n"
    );
    assert_eq!(guest.sh("swapon --show --noheadings | wc -l").await, "0\n");
    assert_eq!(
        guest
            .sh("ls /var/lib/apt/lists | grep -vc partial || true")
            .await,
        "0\n"
    );
    guest
        .sh("apt-get -qq check && dpkg -s openssh-server sudo curl ca-certificates >/dev/null")
        .await;
    guest.sh("runuser -u vmkit -- sudo -n true").await;

    // Metrics, with the data disk.
    let metrics = client.metrics(Duration::from_secs(1)).await.unwrap();
    eprintln!("gb-base: {metrics:?}");
    assert!(metrics.mem_pct > 0.0 && metrics.mem_pct < 100.0);
    assert!(metrics.disk_pct > 0.0 && metrics.disk_pct < 100.0);
    assert!(metrics.data_disk_pct.is_some_and(|pct| pct < 50.0));
    assert!(metrics.uptime_secs > 0);
    assert_eq!(metrics.container_count, None, "no docker in base");

    // A file written with an owner and mode, read back.
    let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 253) as u8).collect();
    client
        .write_file(
            WriteFileRequest::new("/home/vmkit/data.bin")
                .mode(0o640)
                .owner("vmkit"),
            &data,
        )
        .await
        .unwrap();
    assert_eq!(
        client
            .read_file("/home/vmkit/data.bin", 2 << 20)
            .await
            .unwrap(),
        data
    );
    assert_eq!(
        guest.sh("stat -c '%a %U %G' /home/vmkit/data.bin").await,
        "640 vmkit vmkit\n"
    );

    // Host name and the default user's SSH keys.
    client.set_hostname("gb-renamed").await.unwrap();
    assert_eq!(guest.sh("hostname").await, "gb-renamed\n");
    assert_eq!(guest.sh("cat /etc/hostname").await, "gb-renamed\n");
    client.install_ssh_keys(None, [KEY]).await.unwrap();
    assert_eq!(
        guest
            .sh("stat -c '%a %U' /home/vmkit/.ssh /home/vmkit/.ssh/authorized_keys")
            .await,
        "700 vmkit\n600 vmkit\n"
    );
    assert!(
        guest
            .sh("cat /home/vmkit/.ssh/authorized_keys")
            .await
            .contains(KEY)
    );

    // The journal of a unit.
    let lines = client
        .logs(LogsRequest::unit("ssh.service").lines(20))
        .await
        .unwrap();
    assert!(
        lines.iter().any(|l| l.contains("sshd")),
        "ssh.service's journal: {lines:?}"
    );

    // Harden: the deploy user with the default user's keys, sshd tightened and reloaded.
    let report = client.harden(HardenRequest::new()).await.unwrap();
    eprintln!("gb-base: {report:?}");
    assert_eq!(report.user, "deploy");
    assert!(report.sshd_reloaded);
    let sshd = guest.sh("sshd -T").await;
    for setting in [
        "permitrootlogin no",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
    ] {
        assert!(
            sshd.lines().any(|l| l == setting),
            "sshd -T lacks {setting}"
        );
    }
    assert!(
        guest
            .sh("cat /home/deploy/.ssh/authorized_keys")
            .await
            .contains(KEY)
    );
    assert_eq!(guest.sh("id -nG deploy").await, "deploy sudo\n");
    assert_eq!(
        guest.sh("systemctl is-active ssh.service").await,
        "active\n"
    );
    let again = client.harden(HardenRequest::new()).await.unwrap();
    assert!(again.changes.is_empty(), "harden twice: {again:?}");

    // Upgrade: a wrong hash keeps the old binary and agent; a right one restarts into
    // the new binary under systemd.
    let installed = client
        .read_file("/usr/local/bin/vmkit-agent", 64 << 20)
        .await
        .unwrap();
    let installed_sha = sha256(&installed);
    let agent_pid = guest
        .sh("systemctl show -p MainPID --value vmkit-agent")
        .await;
    let mut upgraded = installed;
    upgraded.extend_from_slice(b"\0vmkit base upgrade test\0");
    let upgraded_sha = sha256(&upgraded);
    let refused = client.upgrade(&upgraded, &installed_sha).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Remote(m) if m.contains("SHA-256 mismatch") && m.contains("unchanged")),
        "{refused:?}"
    );
    assert_eq!(
        guest.sh("sha256sum /usr/local/bin/vmkit-agent").await[..64],
        installed_sha
    );
    let report = client.upgrade(&upgraded, &upgraded_sha).await.unwrap();
    assert_eq!(report.path, "/usr/local/bin/vmkit-agent");
    // systemd restarts the agent after the old one exits. As the manager does at boot,
    // send one long hello on the same connection (it waits in the channel until the new
    // agent opens the port) and reconnect only when the client closed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "no new agent answered");
        if guest.client.is_closed() {
            // Closing our end first: the channel takes one client at a time.
            guest.client = Client::new(tokio::io::duplex(1).0, ClientConfig::default());
            guest.client = match guest.qemu.connect_agent(&guest.handle).await {
                Ok(stream) => Client::new(stream, ClientConfig::default()),
                Err(_) => continue,
            };
        }
        let client = &guest.client;
        if client.hello_within(Duration::from_secs(30)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let Ok(out) = client
            .exec_collect(
                ExecRequest::new([
                    "systemctl",
                    "show",
                    "-p",
                    "MainPID",
                    "--value",
                    "vmkit-agent",
                ]),
                1024,
            )
            .await
        else {
            continue;
        };
        let pid = String::from_utf8(out.stdout).unwrap();
        if out.status.success() && pid != agent_pid && pid.trim() != "0" {
            break;
        }
    }
    assert_eq!(
        guest
            .sh("sha256sum /proc/$(systemctl show -p MainPID --value vmkit-agent)/exe")
            .await[..64],
        upgraded_sha,
        "systemd runs the new binary"
    );
    eprintln!("gb-base: done {:?} after start", started.elapsed());
    guest.stop().await;
}
