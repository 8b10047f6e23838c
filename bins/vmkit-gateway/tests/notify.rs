#![allow(clippy::unwrap_used)]
//! systemd readiness: the daemon sends `READY=1` to `$NOTIFY_SOCKET` only once its API
//! socket accepts connections and its state store is open, and `STOPPING=1` when it
//! shuts down. Runs the real daemon on the real store (no VM is started, so it needs
//! neither root nor KVM).

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the daemon if the test fails half-way.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn receive(socket: &UnixDatagram, log: &dyn Fn() -> String) -> String {
    let mut buf = [0u8; 256];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification ({e}); daemon log:\n{}", log()),
    }
}

#[test]
fn ready_is_sent_once_the_api_socket_accepts_and_the_store_is_open() {
    let dir = tempfile::Builder::new()
        .prefix("vmk-notify")
        .tempdir_in("/tmp")
        .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notifications = UnixDatagram::bind(&notify_path).unwrap();
    notifications
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let data = dir.path().join("data");
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_vmkit-gateway"))
        .arg("--data-dir")
        .arg(&data)
        .env_remove("VMKIT_DATA_DIR")
        .env_remove("VMKIT_SOCKET")
        .env("NOTIFY_SOCKET", &notify_path)
        // The real backends, without the host probe (which may boot a guest) and
        // without guest networking (which would change the host's network).
        .env("VMKIT_HYPERVISOR", "qemu")
        .env("VMKIT_QEMU_ACCEL", "tcg")
        .env("VMKIT_NETWORK_ENABLED", "false")
        // The SSH lobby is on by default at 0.0.0.0:2222: off, as other tests run
        // daemons at the same time.
        .env("VMKIT_SSH_LISTEN", "")
        .env("VMKIT_HTTPS_LISTEN", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut daemon = Reap(daemon);
    let daemon_log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();

    let first = receive(&notifications, &daemon_log);

    assert_eq!(
        first,
        "READY=1",
        "the first notification; log:\n{}",
        daemon_log()
    );
    assert!(
        UnixStream::connect(data.join("vmkit.sock")).is_ok(),
        "READY=1 arrived before the API socket accepted connections; log:\n{}",
        daemon_log()
    );
    assert!(
        data.join("state.redb").is_file(),
        "READY=1 arrived before the state store existed"
    );

    // At once: a stop right after readiness must still be graceful.
    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    let signalled = unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert_eq!(signalled, 0);
    assert_eq!(receive(&notifications, &daemon_log), "STOPPING=1");
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status}; log:\n{}", daemon_log());
}
