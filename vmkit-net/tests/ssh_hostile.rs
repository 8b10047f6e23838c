//! Hostile clients against the SSH lobby: junk before the banner, stalled
//! handshakes up to the per-address limit, thousands of channel opens on one
//! connection, a huge window. In each, the gateway stays up and a normal
//! `ssh HOST whoami` (the real OpenSSH client) works during and after.
#![cfg(feature = "ssh")]
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use vmkit_core::testing::FakeHost;
use vmkit_core::{SshPublicKey, StateStore, StoreGateway, User, UserId};
use vmkit_net::ssh::{SshConfig, SshGateway};

const DOMAIN: &str = "vm.test";

/// A lobby on 127.0.0.1 over a fake host, with user `alice` and her key.
struct Lobby {
    host: FakeHost,
    dir: TempDir,
    port: u16,
    key: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

impl Lobby {
    async fn start(configure: impl FnOnce(SshConfig) -> SshConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::new().await;
        let key = dir.path().join("alice");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(status.success());
        host.store
            .put_user(&User::new(
                UserId(1),
                vmkit_core::Handle::new("alice").unwrap(),
            ))
            .await
            .unwrap();
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        host.store
            .add_ssh_key(UserId(1), &SshPublicKey::parse(&public).unwrap())
            .await
            .unwrap();

        let store: Arc<dyn StateStore> = host.store.clone();
        let gateway = Arc::new(StoreGateway::new(store, DOMAIN));
        let config = configure(SshConfig::new(dir.path().join("host_ed25519"), DOMAIN));
        let lobby = SshGateway::new(host.manager.clone(), gateway, config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            lobby
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            host,
            dir,
            port,
            key,
            stop: Some(stop),
            served,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.served).await.unwrap();
    }

    /// `ssh HOST whoami` with the real client: it must answer alice.
    async fn assert_whoami_works(&self, when: &str) {
        let known = self.dir.path().join("known_hosts");
        let output = tokio::process::Command::new("ssh")
            .args(["-F", "/dev/null", "-p", &self.port.to_string(), "-i"])
            .arg(&self.key)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "IdentityAgent=none",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=20",
                "-o",
            ])
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["user@127.0.0.1", "whoami"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .unwrap_or_else(|_| panic!("{when}: ssh whoami hangs"))
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("user: alice"),
            "{when}: status {:?}\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn address(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }
}

/// A TCP connection to the lobby from `source` (another loopback address than
/// the OpenSSH client's, so that it has its own per-address limit).
async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closes `stream` within `wait` (reading what it sends).
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_before_the_banner_closes_that_connection_only() {
    let lobby = Lobby::start(|config| config).await;
    let mut junk = connect_from(Ipv4Addr::new(127, 0, 0, 2), lobby.address()).await;
    let mut endless = connect_from(Ipv4Addr::new(127, 0, 0, 2), lobby.address()).await;
    let mut after_banner = connect_from(Ipv4Addr::new(127, 0, 0, 2), lobby.address()).await;

    // Binary junk; a line that never ends; a good banner and then junk packets
    // (their first bytes say lengths of up to 4 GiB).
    let bytes: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = junk.write_all(&bytes).await;
    let line = vec![b'A'; 256 * 1024];
    let _ = endless.write_all(&line).await;
    let _ = after_banner.write_all(b"SSH-2.0-junk\r\n").await;
    let _ = after_banner.write_all(&[0xff; 4]).await;
    let _ = after_banner.write_all(&bytes).await;
    lobby.assert_whoami_works("while junk is sent").await;

    assert!(closed_within(&mut junk, Duration::from_secs(10)).await);
    assert!(closed_within(&mut endless, Duration::from_secs(10)).await);
    assert!(closed_within(&mut after_banner, Duration::from_secs(10)).await);
    lobby.assert_whoami_works("after the junk").await;
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_up_to_the_per_address_limit_leave_others_served() {
    let limit = 16;
    let lobby = Lobby::start(|config| {
        config
            .max_connections_per_ip(limit)
            .auth_timeout(Duration::from_secs(3))
    })
    .await;
    let stalled_from = Ipv4Addr::new(127, 0, 0, 3);

    let mut stalled = Vec::new();
    for _ in 0..limit {
        stalled.push(connect_from(stalled_from, lobby.address()).await);
    }
    // Give the server time to count them before the one too many.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut one_too_many = connect_from(stalled_from, lobby.address()).await;

    assert!(
        closed_within(&mut one_too_many, Duration::from_secs(2)).await,
        "a connection beyond the per-address limit is closed at once"
    );
    lobby
        .assert_whoami_works("while another address stalls its limit")
        .await;
    for (i, stream) in stalled.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(10)).await,
            "stalled connection {i} is closed at the sign-in deadline"
        );
    }
    let mut later = connect_from(stalled_from, lobby.address()).await;
    assert!(
        !closed_within(&mut later, Duration::from_millis(500)).await,
        "the address's slots were given back"
    );
    lobby.assert_whoami_works("after the stalled ones").await;
    lobby.stop().await;
}

/// A russh client that takes any host key (the test's own server).
struct Client;

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A russh client connection signed in as alice, with `window` as its channels'
/// initial window.
async fn signed_in(lobby: &Lobby, key: &Path, window: u32) -> russh::client::Handle<Client> {
    let config = russh::client::Config {
        window_size: window,
        ..Default::default()
    };
    let mut session = russh::client::connect(Arc::new(config), lobby.address(), Client)
        .await
        .unwrap();
    let key = russh::keys::load_secret_key(key, None).unwrap();
    let auth = session
        .authenticate_publickey(
            "alice",
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success(), "signed in");
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_channel_opens_are_refused_beyond_the_limit() {
    let lobby = Lobby::start(|config| config.max_channels(64)).await;
    let session = signed_in(&lobby, &lobby.key, 2 * 1024 * 1024).await;

    let mut opened = Vec::new();
    let mut refused = 0;
    for _ in 0..3000 {
        match session.channel_open_session().await {
            Ok(channel) => opened.push(channel),
            Err(russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ResourceShortage)) => {
                refused += 1
            }
            Err(e) => panic!("an open failed otherwise: {e:?}"),
        }
    }
    lobby
        .assert_whoami_works("while one connection holds its channels")
        .await;

    assert_eq!(opened.len(), 64);
    assert_eq!(refused, 3000 - 64);
    // A channel closed gives its slot back.
    let first = opened.remove(0);
    first.close().await.unwrap();
    drop(first);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(channel) = session.channel_open_session().await {
            again = Some(channel);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = again.expect("a slot came back after a close");
    again.exec(true, "whoami").await.unwrap();
    let mut answer = Vec::new();
    let mut again = again;
    while let Some(message) = again.wait().await {
        if let russh::ChannelMsg::Data { data } = message {
            answer.extend_from_slice(&data);
        }
    }
    assert!(
        String::from_utf8_lossy(&answer).contains("user: alice"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(opened);
    lobby.assert_whoami_works("after the channel flood").await;
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_window_changes_nothing() {
    let lobby = Lobby::start(|config| config).await;
    // The largest window SSH can say: the server may send without ever waiting.
    let session = signed_in(&lobby, &lobby.key, u32::MAX).await;

    let mut channel = session.channel_open_session().await.unwrap();
    channel.exec(true, "help").await.unwrap();
    let mut answer = Vec::new();
    let mut status = None;
    while let Some(message) = channel.wait().await {
        match message {
            russh::ChannelMsg::Data { data } => answer.extend_from_slice(&data),
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            _ => {}
        }
    }

    assert_eq!(status, Some(0));
    assert!(String::from_utf8_lossy(&answer).contains("Commands:"));
    lobby.assert_whoami_works("after a huge window").await;
    lobby.stop().await;
}

/// Everything a channel sends until it closes: stdout and the exit status.
async fn answer(channel: &mut russh::Channel<russh::client::Msg>) -> (String, Option<u32>) {
    let mut out = Vec::new();
    let mut status = None;
    let read = async {
        while let Some(message) = channel.wait().await {
            match message {
                russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
                russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the channel ends");
    (String::from_utf8_lossy(&out).into_owned(), status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_a_command_does_not_read_stalls_no_other_channel() {
    let lobby = Lobby::start(|config| config).await;
    let session = signed_in(&lobby, &lobby.key, 2 * 1024 * 1024).await;
    let flood = vec![b'x'; 8 * 1024 * 1024];

    // A create held at its data disk reads no input; 8 MiB of it arrive meanwhile.
    // Unread, they would fill the channel's queue and stall the whole connection
    // until the command ends: another channel on it must still be served.
    let hold = lobby.host.storage.hold("storage.create_data");
    let mut exec = session.channel_open_session().await.unwrap();
    exec.exec(true, "new --disk 1").await.unwrap();
    let sender = exec.make_writer();
    let sent = tokio::spawn({
        let flood = flood.clone();
        async move {
            let mut sender = sender;
            let _ = sender.write_all(&flood).await;
        }
    });
    hold.arrived().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let other = tokio::time::timeout(Duration::from_secs(10), async {
        let mut other = session.channel_open_session().await.unwrap();
        other.exec(true, "whoami").await.unwrap();
        answer(&mut other).await
    })
    .await;
    hold.release();
    let (out, status) = answer(&mut exec).await;
    sent.abort();

    let (other, _) = other.expect("another channel of the connection is served meanwhile");
    assert!(other.contains("user: alice"), "{other}");
    assert!(out.contains("made "), "{out}");
    assert_eq!(status, Some(0));
    lobby.assert_whoami_works("after an exec flood").await;
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_the_prompt_is_bounded_and_the_prompt_goes_on() {
    let lobby = Lobby::start(|config| config).await;
    let session = signed_in(&lobby, &lobby.key, 2 * 1024 * 1024).await;

    // No pty: plain lines. 8 MiB without a line end (the prompt keeps what it can,
    // drops the rest), then, once it caught up, a line end, `whoami` and `exit`.
    let mut shell = session.channel_open_session().await.unwrap();
    shell.request_shell(true).await.unwrap();
    let mut writer = shell.make_writer();
    writer
        .write_all(&vec![b'x'; 8 * 1024 * 1024])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    writer.write_all(b"\nwhoami\nexit\n").await.unwrap();
    let (out, status) = answer(&mut shell).await;

    assert!(out.contains("user: alice"), "{out}");
    assert!(out.contains("bye"), "{out}");
    assert_eq!(status, Some(0));
    lobby.assert_whoami_works("after a prompt flood").await;
    lobby.stop().await;
}
