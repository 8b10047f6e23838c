//! `vmkit-proxy` as a process of its own against a real `vmkit-gateway` (on fake
//! backends, its own HTTPS edge off), checked with real `curl` and `ssh`.
//!
//! Needs the workspace's binaries built (`cargo build --workspace`): the daemon is
//! found beside this crate's binary.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "../../../vmkit-net/tests/support/dnsmasq.rs"]
mod dnsmasq;

const DOMAIN: &str = "vm.test";

/// A binary of the workspace, built beside `vmkit-proxy`.
fn sibling(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_vmkit-proxy")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace`)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed and reaped on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut command: Command, log: PathBuf) -> Running {
    let file = std::fs::File::create(&log).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    Running { child, log }
}

fn wait_until(what: &str, process: &mut Running, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if let Some(status) = process.child.try_wait().unwrap() {
            panic!("{what} exited with {status}:\n{}", process.log());
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not come up:\n{}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon on fake backends: the SSH lobby on `ssh`, no HTTPS edge of its own,
/// links for the proxy's port `https`; custom domains' proofs read from the name
/// server at `dns`.
fn daemon(dir: &Path, ssh: u16, https: u16, dns: u16) -> Running {
    let mut command = Command::new(sibling("vmkit-gateway"));
    command
        .arg("--fake-backends")
        .arg("--data-dir")
        .arg(dir)
        .env_remove("VMKIT_DATA_DIR")
        .env_remove("VMKIT_SOCKET")
        .env("VMKIT_LOG", "info")
        .env("VMKIT_NETWORK_ENABLED", "false")
        .env("VMKIT_DEFAULT_IMAGE", "tiny")
        .env("VMKIT_SSH_LISTEN", format!("127.0.0.1:{ssh}"))
        .env("VMKIT_SSH_DOMAIN", DOMAIN)
        .env("VMKIT_USERS_REGISTRATION", "open")
        .env("VMKIT_HTTPS_LISTEN", "")
        .env("VMKIT_HTTPS_PUBLIC_PORT", https.to_string())
        .env("VMKIT_HTTPS_DOMAIN_RESOLVERS", format!("127.0.0.1:{dns}"));
    let mut d = spawn(command, dir.join("daemon.log"));
    let socket = dir.join("vmkit.sock");
    wait_until("the daemon", &mut d, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    d
}

fn proxy(dir: &Path, https: u16, ssh: u16) -> Running {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmkit-proxy"));
    command
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{https}")])
        .args(["--domain", DOMAIN])
        .args(["--ssh", &format!("127.0.0.1:{ssh}")])
        .env("VMKIT_LOG", "info,vmkit_net=debug");
    let mut p = spawn(command, dir.join("proxy.log"));
    wait_until("vmkit-proxy", &mut p, || {
        std::net::TcpStream::connect(("127.0.0.1", https)).is_ok()
    });
    p
}

/// An SSH client of the lobby with a key of its own.
struct Ssh {
    key: PathBuf,
    port: u16,
}

impl Ssh {
    fn new(dir: &Path, handle: &str, port: u16) -> Ssh {
        let key = dir.join(format!("{handle}_ed25519"));
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", handle, "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(made.success());
        Ssh { key, port }
    }

    fn run(&self, user: &str, args: &[&str]) -> Output {
        Command::new("ssh")
            .arg("-i")
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=error",
                "-o",
                "ConnectTimeout=30",
            ])
            .arg(format!("{user}@127.0.0.1"))
            .args(args)
            .output()
            .unwrap()
    }
}

fn output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `curl` against the proxy, trusting `ca`, with cookies in `jar`; `-i` so that
/// the status and headers come first.
fn curl(ca: &Path, jar: &Path, https: u16, args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "-i", "--max-time", "30", "--cacert"])
        .arg(ca)
        .arg("-b")
        .arg(jar)
        .arg("-c")
        .arg(jar)
        .args(["--resolve", &format!("{DOMAIN}:{https}:127.0.0.1")])
        .args([
            "--resolve",
            &format!("web--8000.{DOMAIN}:{https}:127.0.0.1"),
        ])
        .args(args)
        .output()
        .unwrap()
}

fn status(out: &Output) -> u16 {
    stdout(out)
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_proxy_serves_vms_as_the_daemon_decides() {
    let tmp = tempfile::Builder::new()
        .prefix("vmkp")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let (ssh_port, https) = (free_port(), free_port());
    // Alice's own DNS makes app.example.test a CNAME to her VM.
    let dns = dnsmasq::Dnsmasq::start(&[
        "--local=/example.test/".into(),
        format!("--host-record=web.{DOMAIN},127.0.0.1"),
        format!("--cname=app.example.test,web.{DOMAIN}"),
    ]);
    let d = daemon(dir, ssh_port, https, dns.port);
    let p = proxy(dir, https, ssh_port);
    let logs = || format!("--- daemon\n{}\n--- proxy\n{}", d.log(), p.log());
    let ca = dir.join(vmkit_net::https::tls::CA_CERT_FILE);
    let url = format!("https://web--8000.{DOMAIN}:{https}/");

    // Alice arrives by SSH and makes a VM; its web app listens on the guest's
    // loopback (the fake agent's, port 8000).
    let alice = Ssh::new(dir, "alice", ssh_port);
    let out = alice.run("alice", &["register", "alice"]);
    assert!(out.status.success(), "register: {}{}", output(&out), logs());
    let out = alice.run("alice", &["new", "--name", "web"]);
    assert!(out.status.success(), "new: {}{}", output(&out), logs());

    // Private: a stranger is sent to sign in on the apex.
    let stranger = dir.join("stranger.jar");
    let out = curl(&ca, &stranger, https, &[&url]);
    assert_eq!(status(&out), 303, "{}{}", stdout(&out), logs());
    let location = format!("location: https://{DOMAIN}:{https}/__vmkit/auth?host=web--8000");
    assert!(
        stdout(&out).to_ascii_lowercase().contains(&location),
        "{}",
        stdout(&out)
    );
    // A forged identity header changes nothing.
    let out = curl(
        &ca,
        &stranger,
        https,
        &[
            "-H",
            "X-Vmkit-User-Id: 1",
            "-H",
            "X-Vmkit-User: alice",
            &url,
        ],
    );
    assert_eq!(status(&out), 303, "{}", stdout(&out));
    // Nor does a forged session cookie.
    let out = curl(
        &ca,
        &stranger,
        https,
        &["-H", "Cookie: __Host-vmkit=vmw_forged", &url],
    );
    assert_eq!(status(&out), 303, "{}", stdout(&out));

    // Alice signs in with the link the lobby prints, and reaches her VM: the app
    // sees who she is (the fake app echoes the identity headers).
    let out = alice.run("alice", &["browser"]);
    assert!(out.status.success(), "browser: {}{}", output(&out), logs());
    let link = stdout(&out)
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap()
        .to_owned();
    assert!(
        link.starts_with(&format!("https://{DOMAIN}:{https}/__vmkit/login?token=")),
        "{link}"
    );
    let jar = dir.join("alice.jar");
    let out = curl(&ca, &jar, https, &[&link]);
    assert_eq!(status(&out), 303, "{}{}", stdout(&out), logs());
    let out = curl(&ca, &jar, https, &["-L", "-H", "X-Vmkit-User-Id: 99", &url]);
    assert_eq!(status(&out), 200, "{}{}", stdout(&out), logs());
    let page = stdout(&out);
    assert!(page.contains("x-vmkit-user: alice\n"), "{page}");
    assert!(page.contains("x-vmkit-user-id: 1\n"), "{page}");
    assert!(!page.contains("x-vmkit-user-id: 99"), "{page}");
    assert!(page.ends_with("loopback app on port 8000"), "{page}");

    // Shared with everyone: the stranger gets the page, and no identity.
    let out = alice.run("alice", &["share", "web", "public", "--port", "8000"]);
    assert!(out.status.success(), "share: {}{}", output(&out), logs());
    let out = curl(
        &ca,
        &stranger,
        https,
        &[
            "-H",
            "X-Vmkit-User-Id: 1",
            "-H",
            "X-Vmkit-User: alice",
            &url,
        ],
    );
    assert_eq!(status(&out), 200, "{}{}", stdout(&out), logs());
    let page = stdout(&out);
    assert!(
        page.ends_with("\r\n\r\nloopback app on port 8000"),
        "{page}"
    );

    // A custom domain, proven by the CNAME, reaches the VM's default web port
    // through the proxy, with a certificate naming it (once the proxy has asked
    // the daemon: every few seconds).
    let out = alice.run("alice", &["share", "web", "port", "8000"]);
    assert!(
        out.status.success(),
        "share port: {}{}",
        output(&out),
        logs()
    );
    let out = alice.run("alice", &["domain", "add", "web", "app.example.test"]);
    assert!(
        out.status.success(),
        "domain add: {}{}",
        output(&out),
        logs()
    );
    let custom = format!("https://app.example.test:{https}/");
    let fetch = || {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &format!("app.example.test:{https}:127.0.0.1")])
            .arg(&custom)
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = fetch();
    while !out.status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        out = fetch();
    }
    assert!(out.status.success(), "{}{}", output(&out), logs());
    assert_eq!(stdout(&out), "loopback app on port 8000");
}

#[test]
fn without_the_daemon_the_proxy_names_the_socket_it_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmkit-proxy"))
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--listen", "127.0.0.1:0", "--wait-secs", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let socket = tmp.path().join("vmkit.sock");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(err.contains("absent"), "{err}");
}
