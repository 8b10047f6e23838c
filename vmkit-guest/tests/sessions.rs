//! `SystemHandler`'s interactive sessions and SSH facts on this machine, through a real
//! client and `serve` loop: shells on a pty, pipes, resizes, signals, hang-ups, and the
//! SSH facts of a temporary root (`with_root`). Needs root (sessions switch users).
#![cfg(feature = "agent")]
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{connected, server_with_raw_host};
use serde_json::json;
use sha2::{Digest, Sha256};
use vmkit_guest::{
    Client, ClientConfig, ClientError, ExecEvent, ExitStatus, GuestSession, SESSION_WINDOW,
    ServerConfig, SessionRequest, SystemHandler,
};

/// How long a test waits for output it expects.
const WAIT: Duration = Duration::from_secs(20);

const KEY_ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa root@guest";
const KEY_RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCbbbbbbbbbbbbbbbbbbbbbbbb root@guest";

fn client_with(handler: SystemHandler) -> Client {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (sessions switch users)"
    );
    connected(handler, ClientConfig::default(), ServerConfig::default()).0
}

fn client() -> Client {
    client_with(SystemHandler::new())
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmkit-guest-test")
        .tempdir()
        .unwrap()
}

fn write(root: &Path, path: &str, text: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// Reads output until it contains `needle`; returns all of it.
async fn read_until(session: &mut GuestSession, needle: &str) -> String {
    let mut seen = String::new();
    let reading = async {
        while !seen.contains(needle) {
            match session.next().await {
                Some(Ok(ExecEvent::Stdout(data) | ExecEvent::Stderr(data))) => {
                    seen.push_str(&String::from_utf8_lossy(&data));
                }
                other => panic!("{other:?} while waiting for {needle:?} after {seen:?}"),
            }
        }
    };
    if tokio::time::timeout(WAIT, reading).await.is_err() {
        panic!("no {needle:?} in {seen:?}");
    }
    seen
}

/// Reads to the exit status, dropping output.
async fn exit_of(session: &mut GuestSession) -> ExitStatus {
    let reading = async {
        loop {
            match session.next().await {
                Some(Ok(ExecEvent::Exit(status))) => return status,
                Some(Ok(_)) => {}
                other => panic!("{other:?} before the exit status"),
            }
        }
    };
    tokio::time::timeout(WAIT, reading).await.unwrap()
}

fn pty_sh() -> SessionRequest {
    SessionRequest::new(["sh"]).pty("xterm-vmkit", 80, 24)
}

#[tokio::test]
async fn a_pty_session_runs_on_a_pts_with_its_term() {
    let mut session = client().session(pty_sh()).await.unwrap();

    session
        .writer()
        .send(b"tty; echo \"term=$TERM\"\n")
        .await
        .unwrap();
    let output = read_until(&mut session, "term=xterm-vmkit\r\n").await;

    assert!(output.contains("/dev/pts/"), "{output:?}");
}

#[tokio::test]
async fn a_pty_session_propagates_its_exit_status() {
    let mut session = client().session(pty_sh()).await.unwrap();

    session.writer().send(b"exit 7\n").await.unwrap();

    assert_eq!(exit_of(&mut session).await, ExitStatus::exited(7));
}

#[tokio::test]
async fn stty_size_follows_a_resize() {
    let mut session = client().session(pty_sh()).await.unwrap();
    session
        .writer()
        .send(b"echo \"before $(stty size)\"\n")
        .await
        .unwrap();
    read_until(&mut session, "before 24 80").await;

    session.writer().resize(132, 50).await.unwrap();
    session
        .writer()
        .send(b"echo \"after $(stty size)\"\n")
        .await
        .unwrap();

    read_until(&mut session, "after 50 132").await;
}

#[tokio::test]
async fn cat_on_a_pty_echoes_a_line_and_ends_at_control_d() {
    let req = SessionRequest::new(["cat"]).pty("dumb", 80, 24);
    let mut session = client().session(req).await.unwrap();

    session.writer().send(b"round-trip\n").await.unwrap();
    // Once echoed by the terminal, once written by cat.
    let output = read_until(&mut session, "round-trip\r\nround-trip\r\n").await;
    session.writer().send(b"\x04").await.unwrap();

    assert_eq!(output, "round-trip\r\nround-trip\r\n");
    assert_eq!(exit_of(&mut session).await, ExitStatus::exited(0));
}

#[tokio::test]
async fn an_empty_argv_starts_the_users_login_shell() {
    let req = SessionRequest::shell().pty("dumb", 80, 24);
    let mut session = client().session(req).await.unwrap();

    session
        .writer()
        .send(b"echo \"zero=$0 user=$USER home=$HOME pwd=$(pwd)\"\n")
        .await
        .unwrap();
    let output = read_until(&mut session, "pwd=/root").await;

    assert!(output.contains("zero=-"), "not a login shell: {output:?}");
    assert!(output.contains("user=root home=/root"), "{output:?}");
}

#[tokio::test]
async fn a_session_runs_as_its_user() {
    let req =
        SessionRequest::new(["sh", "-c", "echo \"$(id -u):$(id -g) $USER $(pwd)\""]).user("nobody");
    let mut session = client().session(req).await.unwrap();

    // nobody's home, /nonexistent, does not exist: the session starts in /.
    read_until(&mut session, "65534:65534 nobody /\n").await;

    assert!(exit_of(&mut session).await.success());
}

#[tokio::test]
async fn an_unknown_user_is_refused() {
    let req = SessionRequest::new(["true"]).user("no-such-vmkit-user");
    let mut session = client().session(req).await.unwrap();

    let first = session.next().await;

    let Some(Err(ClientError::Remote(message))) = first else {
        panic!("not refused: {first:?}");
    };
    assert!(message.contains("no-such-vmkit-user"), "{message}");
}

/// Whether a process is gone (or a zombie nobody reaps: it runs no more).
fn is_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The number after `label=` in `text`.
fn number_after(text: &str, label: &str) -> i32 {
    let start = text.find(label).unwrap() + label.len();
    text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn hanging_up_kills_the_whole_session() {
    let mut session = client().session(pty_sh()).await.unwrap();
    session
        .writer()
        .send(b"p=pids; sleep 1000 & echo \"$p shell=$$ child=$! end\"; wait\n")
        .await
        .unwrap();
    // The terminal echoes the command line, and the shell may print its prompt before
    // the answer.
    let output = read_until(&mut session, " end\r\n").await;
    let line = output.lines().find(|l| l.contains("pids shell=")).unwrap();
    let (shell, child) = (number_after(line, "shell="), number_after(line, "child="));
    assert!(!is_gone(shell) && !is_gone(child));

    session.writer().hang_up().await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(is_gone(shell) && is_gone(child)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(is_gone(shell), "the shell {shell} outlived the hang-up");
    assert!(is_gone(child), "its child {child} outlived the hang-up");
    assert!(session.next().await.is_none());
    assert!(matches!(
        session.writer().send(b"x").await,
        Err(ClientError::SessionEnded)
    ));
}

#[tokio::test]
async fn a_pipe_session_streams_10_mb_through_sha256sum() {
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = format!("{:x}", Sha256::digest(&data));
    let session = client()
        .session(SessionRequest::new(["sha256sum"]))
        .await
        .unwrap();
    let (writer, mut events) = session.split();

    let feeding = tokio::spawn(async move {
        for piece in data.chunks(100_000) {
            writer.send(piece).await.unwrap();
        }
        writer.close_stdin().await.unwrap();
    });
    let mut stdout = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .unwrap()
        {
            Some(Ok(ExecEvent::Stdout(data))) => stdout.extend_from_slice(&data),
            Some(Ok(ExecEvent::Exit(status))) => break status,
            other => panic!("{other:?}"),
        }
    };
    feeding.await.unwrap();

    assert!(status.success(), "{status:?}");
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        format!("{expected}  -\n")
    );
}

#[tokio::test]
async fn stderr_of_a_pipe_session_comes_apart() {
    let req = SessionRequest::new(["sh", "-c", "echo out; echo err >&2"]);
    let mut session = client().session(req).await.unwrap();

    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = loop {
        match session.next().await {
            Some(Ok(ExecEvent::Stdout(data))) => stdout.extend_from_slice(&data),
            Some(Ok(ExecEvent::Stderr(data))) => stderr.extend_from_slice(&data),
            Some(Ok(ExecEvent::Exit(status))) => break status,
            other => panic!("{other:?}"),
        }
    };

    assert!(status.success());
    assert_eq!((&stdout[..], &stderr[..]), (&b"out\n"[..], &b"err\n"[..]));
}

#[tokio::test]
async fn signal_int_ends_sleep_with_a_signal_exit() {
    let mut session = client()
        .session(SessionRequest::new(["sleep", "100"]))
        .await
        .unwrap();
    // The session has started once its input is acknowledged.
    session.writer().send(b"x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    session.writer().signal("INT").await.unwrap();

    assert_eq!(exit_of(&mut session).await, ExitStatus::killed(2));
}

#[tokio::test]
async fn input_beyond_the_window_ends_the_session_with_an_error() {
    let (mut host, _server) = server_with_raw_host(SystemHandler::new(), ServerConfig::default());
    host.write_json(&json!({"id": 1, "request": {"type": "session", "argv": ["sleep", "100"]}}))
        .await;

    // The host ignores the window: far more than it, with sleep reading none.
    let chunk = STANDARD.encode(vec![b'y'; 64 << 10]);
    for _ in 0..(2 * SESSION_WINDOW / (64 << 10)) {
        host.write_json(&json!({"id": 1, "request": {"type": "chunk", "data": chunk}}))
            .await;
    }

    let reply = loop {
        let frame = tokio::time::timeout(WAIT, host.read_json()).await.unwrap();
        assert_eq!(frame["id"], 1);
        if frame["reply"]["type"] != "stdin_ack" {
            break frame["reply"].clone();
        }
    };
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("ahead of the process"),
        "{reply}"
    );
}

#[tokio::test]
async fn ssh_info_reports_host_keys_and_the_default_user() {
    let root = tempdir();
    write(root.path(), "usr/sbin/sshd", "");
    write(
        root.path(),
        "etc/ssh/ssh_host_ed25519_key.pub",
        &format!("{KEY_ED25519}\n"),
    );
    write(
        root.path(),
        "etc/ssh/ssh_host_rsa_key.pub",
        &format!("{KEY_RSA}\n"),
    );
    write(root.path(), "etc/ssh/ssh_host_rsa_key", "not a public key");
    write(root.path(), "etc/vmkit/default-user", "vmkit\n");

    let info = client_with(SystemHandler::new().with_root(root.path()))
        .ssh_info()
        .await
        .unwrap();

    assert!(info.sshd);
    assert_eq!(info.host_keys, [KEY_ED25519, KEY_RSA]);
    assert_eq!(info.default_user.as_deref(), Some("vmkit"));
}

#[tokio::test]
async fn ssh_info_without_sshd_has_no_keys_and_no_default_user() {
    let root = tempdir();
    write(
        root.path(),
        "etc/ssh/ssh_host_ed25519_key.pub",
        &format!("{KEY_ED25519}\n"),
    );

    let info = client_with(SystemHandler::new().with_root(root.path()))
        .ssh_info()
        .await
        .unwrap();

    assert!(!info.sshd);
    assert!(info.host_keys.is_empty());
    assert_eq!(info.default_user, None);
}

#[tokio::test]
async fn ssh_info_makes_missing_host_keys_first() {
    let root = tempdir();
    write(root.path(), "usr/sbin/sshd", "");

    let info = client_with(SystemHandler::new().with_root(root.path()))
        .ssh_info()
        .await
        .unwrap();

    let written = fs::read_to_string(root.path().join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
    assert!(info.host_keys.contains(&written.trim().to_owned()));
    assert!(written.starts_with("ssh-ed25519 "));
    assert!(root.path().join("etc/ssh/ssh_host_ed25519_key").exists());
}

#[tokio::test]
async fn sessions_past_the_limit_are_refused() {
    let (client, _server) = connected(
        SystemHandler::new(),
        ClientConfig::default(),
        ServerConfig::default().max_sessions(1),
    );
    let first = client
        .session(SessionRequest::new(["sleep", "100"]))
        .await
        .unwrap();

    let mut second = client.session(SessionRequest::new(["true"])).await.unwrap();
    let refused = second.next().await;
    first.writer().hang_up().await.unwrap();

    assert!(
        matches!(&refused, Some(Err(ClientError::Remote(m))) if m.contains("too many sessions")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_connect_session_is_a_tcp_connection_to_the_guests_loopback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // An app that answers each line with its length, and closes after "bye".
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            while let Some(end) = seen.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = seen.drain(..=end).collect();
                if line == b"bye\n" {
                    stream.write_all(b"closing\n").await.unwrap();
                    return;
                }
                stream
                    .write_all(format!("{}\n", line.len() - 1).as_bytes())
                    .await
                    .unwrap();
            }
        }
    });
    let client = client();
    let mut session = client.session(SessionRequest::connect(port)).await.unwrap();
    session.writer().send(b"hello\n").await.unwrap();
    read_until(&mut session, "5\n").await;
    session.writer().send(b"bye\n").await.unwrap();
    read_until(&mut session, "closing\n").await;
    // The app closed its side: the session ends with status 0.
    assert_eq!(exit_of(&mut session).await.code, Some(0));

    // A port nothing listens on is the request's error, saying so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut refused = client
        .session(SessionRequest::connect(closed))
        .await
        .unwrap();
    let outcome = tokio::time::timeout(WAIT, refused.next()).await.unwrap();
    match outcome {
        Some(Err(e)) => assert!(e.to_string().contains("nothing answers"), "{e}"),
        other => panic!("{other:?}"),
    }
}
