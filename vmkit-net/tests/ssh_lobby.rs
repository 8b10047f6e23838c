//! The SSH lobby end to end: the real OpenSSH client (`ssh`, `ssh-keygen`) against
//! [`SshGateway`] over a fake host's manager.
#![cfg(feature = "ssh")]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::oneshot;
use vmkit_core::testing::FakeHost;
use vmkit_core::{
    ManagerConfig, RegistrationPolicy, Role, SshPublicKey, StateStore, StoreGateway, User, UserId,
    VmName,
};
use vmkit_net::ssh::{SshConfig, SshGateway};

const DOMAIN: &str = "vm.test";

/// A lobby on 127.0.0.1 over a fake host, with its directory (host key, client
/// keys, known_hosts).
struct Lobby {
    host: FakeHost,
    dir: TempDir,
    port: u16,
    fingerprint: String,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

impl Lobby {
    async fn start() -> Self {
        Self::start_with(|config| config).await
    }

    /// A lobby over a fake host whose manager registers as `policy` says.
    async fn with_policy(policy: RegistrationPolicy) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host =
            FakeHost::with_config(ManagerConfig::new("/nonexistent/vmkit").registration(policy))
                .await;
        Self::start_in(host, dir, |config| config).await
    }

    async fn start_with(configure: impl FnOnce(SshConfig) -> SshConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(FakeHost::new().await, dir, configure).await
    }

    async fn start_in(
        host: FakeHost,
        dir: TempDir,
        configure: impl FnOnce(SshConfig) -> SshConfig,
    ) -> Self {
        let store: Arc<dyn StateStore> = host.store.clone();
        let gateway = Arc::new(StoreGateway::new(store, DOMAIN));
        let config = configure(SshConfig::new(dir.path().join("host_ed25519"), DOMAIN));
        let lobby = SshGateway::new(host.manager.clone(), gateway, config).unwrap();
        let fingerprint = lobby.host_key_fingerprint();
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
            fingerprint,
            stop: Some(stop),
            served,
        }
    }

    /// Stops the server and gives back the host and the directory.
    async fn stop(mut self) -> (FakeHost, TempDir) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.served).await.unwrap();
        (self.host, self.dir)
    }

    /// A new key pair made by `ssh-keygen`; the private key's path.
    fn keygen(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        path
    }

    /// A user `name` with one new key; the key's path.
    async fn user(&self, id: u64, name: &str) -> PathBuf {
        let key = self.keygen(name);
        let user = User::new(UserId(id), vmkit_core::Handle::new(name).unwrap());
        self.host.store.put_user(&user).await.unwrap();
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let public = SshPublicKey::parse(&public).unwrap();
        self.host
            .store
            .add_ssh_key(UserId(id), &public)
            .await
            .unwrap();
        key
    }

    /// Runs `ssh` with `key` and `args` (options, then the command).
    async fn ssh_with(&self, key: &Path, options: &[&str], command: &[&str]) -> Output {
        self.ssh_input(key, options, command, None).await
    }

    /// Runs `ssh` with `input` on its stdin.
    async fn ssh_input(
        &self,
        key: &Path,
        options: &[&str],
        command: &[&str],
        input: Option<&str>,
    ) -> Output {
        self.ssh_login(key, "user", options, command, input).await
    }

    /// Runs `ssh` as `login@127.0.0.1` (the SSH user name: an invite code).
    async fn ssh_as(&self, key: &Path, login: &str, command: &[&str]) -> Output {
        self.ssh_login(key, login, &[], command, None).await
    }

    /// Runs `ssh` as `login@127.0.0.1` with `input` on its stdin.
    async fn ssh_login(
        &self,
        key: &Path,
        login: &str,
        options: &[&str],
        command: &[&str],
        input: Option<&str>,
    ) -> Output {
        let known = self.dir.path().join("known_hosts");
        let mut ssh = tokio::process::Command::new("ssh");
        ssh.args(["-F", "/dev/null", "-p", &self.port.to_string(), "-i"])
            .arg(key)
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
            .args(options)
            .arg(format!("{login}@127.0.0.1"))
            .args(command)
            .stdin(match input {
                Some(_) => std::process::Stdio::piped(),
                None => std::process::Stdio::null(),
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = ssh.spawn().unwrap();
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(input.as_bytes()).await.unwrap();
            // With a pty, kept open: the session must end by `exit`, not by the
            // end of input.
            if options.contains(&"-tt") {
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    drop(stdin);
                });
            }
        }
        tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("ssh finishes")
            .unwrap()
    }

    async fn ssh(&self, key: &Path, command: &[&str]) -> Output {
        self.ssh_with(key, &[], command).await
    }

    /// Runs `ssh` until it succeeds (for up to 5 s); the last output.
    async fn ssh_until_ok(&self, key: &Path, command: &[&str]) -> Output {
        let mut output = self.ssh(key, command).await;
        for _ in 0..50 {
            if output.status.success() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            output = self.ssh(key, command).await;
        }
        output
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

fn name(raw: &str) -> VmName {
    VmName::new(raw).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_names_the_user_of_the_key() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby.ssh(&alice, &["whoami"]).await;

    assert_ok(&output);
    assert!(
        stdout(&output).contains("user: alice"),
        "{}",
        stdout(&output)
    );
    assert!(
        stdout(&output).contains("(this session)"),
        "{}",
        stdout(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_made_listed_stopped_started_and_removed() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let made = lobby.ssh(&alice, &["new", "--name", "web", "--json"]).await;
    assert_ok(&made);
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    assert_eq!(made["vm"]["name"], "web");
    let vm = lobby.host.manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.owner, UserId(1));

    let listed = lobby.ssh(&alice, &["ls", "--json"]).await;
    assert_ok(&listed);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "web");

    let text = lobby.ssh(&alice, &["ls"]).await;
    assert_ok(&text);
    assert!(stdout(&text).contains("web"), "{}", stdout(&text));

    let stopped = lobby.ssh(&alice, &["stop", "web.vm.test"]).await;
    assert_ok(&stopped);
    assert!(stdout(&stopped).contains("stopped"), "{}", stdout(&stopped));

    let started = lobby.ssh(&alice, &["start", "web"]).await;
    assert_ok(&started);
    assert!(stdout(&started).contains("running"), "{}", stdout(&started));

    let removed = lobby.ssh(&alice, &["rm", "web"]).await;
    assert_ok(&removed);
    assert!(lobby.host.manager.get(&name("web")).await.is_err());
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_command_fails_with_a_message() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby.ssh(&alice, &["frobnicate"]).await;
    let json = lobby.ssh(&alice, &["frobnicate", "--json"]).await;

    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("frobnicate"),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("help"), "{}", stderr(&output));
    assert!(!json.status.success());
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["code"], "invalid_command");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_vm_is_answered_as_a_missing_one() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    let bob = lobby.user(2, "bob").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let theirs = lobby.ssh(&bob, &["stop", "web", "--json"]).await;
    let missing = lobby.ssh(&bob, &["stop", "nothing", "--json"]).await;

    assert!(!theirs.status.success());
    assert!(!missing.status.success());
    let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
    let missing: serde_json::Value = serde_json::from_slice(&missing.stdout).unwrap();
    assert_eq!(theirs["code"], missing["code"]);
    assert_eq!(
        theirs["error"].as_str().unwrap().replace("web", "NAME"),
        missing["error"]
            .as_str()
            .unwrap()
            .replace("nothing", "NAME")
    );
    let listed = lobby.ssh(&bob, &["ls", "--json"]).await;
    assert_eq!(stdout(&listed).trim(), "[]");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_key_is_refused_with_how_to_get_access() {
    let lobby = Lobby::start().await;
    let stranger = lobby.keygen("stranger");

    let output = lobby.ssh(&stranger, &["whoami"]).await;

    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("vmkit user add"),
        "{}",
        stderr(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_offered_key_is_tried() {
    let lobby = Lobby::start().await;
    let stranger = lobby.keygen("stranger");
    let alice = lobby.user(1, "alice").await;

    // The unregistered key first, then alice's.
    let output = lobby
        .ssh_with(&stranger, &["-i", alice.to_str().unwrap()], &["whoami"])
        .await;

    assert_ok(&output);
    assert!(
        stdout(&output).contains("user: alice"),
        "{}",
        stdout(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_key_is_the_same_after_a_restart() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["whoami"]).await);
    let fingerprint = lobby.fingerprint.clone();
    let (host, dir) = lobby.stop().await;

    let lobby = Lobby::start_in(host, dir, |config| config).await;
    // known_hosts holds the key seen before the restart, under another port:
    // with strict checking, the same key is accepted only if it is unchanged.
    let known = std::fs::read_to_string(lobby.dir.path().join("known_hosts")).unwrap();
    let old_port_entry = known.lines().next().unwrap().to_owned();
    let entry = old_port_entry.replacen(
        &old_port_entry[..old_port_entry.find(' ').unwrap()],
        &format!("[127.0.0.1]:{}", lobby.port),
        1,
    );
    std::fs::write(lobby.dir.path().join("known_hosts"), entry + "\n").unwrap();
    let output = lobby
        .ssh_with(&alice, &["-o", "StrictHostKeyChecking=yes"], &["whoami"])
        .await;

    assert_eq!(lobby.fingerprint, fingerprint);
    assert_ok(&output);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_is_asked_for() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby
        .ssh_with(
            &alice,
            &[
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
            ],
            &["whoami"],
        )
        .await;

    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("Permission denied (publickey)"),
        "{}",
        stderr(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha1_key_exchange_is_refused() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby
        .ssh_with(
            &alice,
            &["-o", "KexAlgorithms=diffie-hellman-group14-sha1"],
            &["whoami"],
        )
        .await;

    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no matching key exchange method"),
        "{}",
        stderr(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cbc_cipher_is_refused() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby
        .ssh_with(&alice, &["-o", "Ciphers=aes128-cbc"], &["whoami"])
        .await;

    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no matching cipher"),
        "{}",
        stderr(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_keys_are_listed_added_and_a_private_key_refused() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    let second = lobby.keygen("second");
    let second_public = std::fs::read_to_string(second.with_extension("pub")).unwrap();
    let mut args = vec!["ssh-key", "add"];
    args.extend(second_public.split_whitespace());

    let added = lobby.ssh(&alice, &args).await;
    let private = std::fs::read_to_string(&second).unwrap();
    let quoted = format!("'{}'", private.trim());
    let refused = lobby.ssh(&alice, &["ssh-key", "add", &quoted]).await;
    let listed = lobby.ssh(&alice, &["ssh-key", "ls", "--json"]).await;
    let with_second = lobby.ssh(&second, &["whoami"]).await;

    assert_ok(&added);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("PRIVATE key"),
        "{}",
        stderr(&refused)
    );
    assert_ok(&listed);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_ok(&with_second);
    assert!(stdout(&with_second).contains("user: alice"));
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_runs_commands_until_exit() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby
        .ssh_input(&alice, &["-tt"], &[], Some("whoami\nexit\n"))
        .await;

    assert_ok(&output);
    let text = stdout(&output);
    assert!(text.contains("vmkit> "), "{text}");
    assert!(text.contains("user: alice"), "{text}");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_key_add_reads_the_key_from_stdin() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    let second = lobby.keygen("second");
    let second_public = std::fs::read_to_string(second.with_extension("pub")).unwrap();

    let added = lobby
        .ssh_input(&alice, &[], &["ssh-key", "add"], Some(&second_public))
        .await;
    let with_second = lobby.ssh(&second, &["whoami"]).await;

    assert_ok(&added);
    assert_ok(&with_second);
    lobby.stop().await;
}

/// What the server sends on a raw TCP connection within `wait`, until it closes
/// its side or the time is up; and whether it closed.
async fn read_raw(stream: &mut tokio::net::TcpStream, wait: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&received).into(), true),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&received).into(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_sign_in_in_time_is_disconnected() {
    let lobby = Lobby::start_with(|config| config.auth_timeout(Duration::from_secs(1))).await;

    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", lobby.port))
        .await
        .unwrap();
    let (greeting, closed) = read_raw(&mut idle, Duration::from_secs(10)).await;

    assert!(greeting.starts_with("SSH-2.0-vmkit"), "{greeting:?}");
    assert!(closed, "the connection is still open");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_per_address_are_closed() {
    let lobby = Lobby::start_with(|config| config.max_connections_per_ip(2)).await;
    let alice = lobby.user(1, "alice").await;

    let mut first = tokio::net::TcpStream::connect(("127.0.0.1", lobby.port))
        .await
        .unwrap();
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", lobby.port))
        .await
        .unwrap();
    let (first_greeting, _) = read_raw(&mut first, Duration::from_millis(500)).await;
    let (second_greeting, _) = read_raw(&mut second, Duration::from_millis(500)).await;
    let refused = lobby.ssh(&alice, &["whoami"]).await;
    drop((first, second));
    // The server frees the slots once it sees the connections closed.
    let admitted = lobby.ssh_until_ok(&alice, &["whoami"]).await;

    assert!(first_greeting.starts_with("SSH-2.0-"), "{first_greeting:?}");
    assert!(
        second_greeting.starts_with("SSH-2.0-"),
        "{second_greeting:?}"
    );
    assert!(!refused.status.success());
    assert_ok(&admitted);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_goes_on_past_a_failure_and_fails() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let output = lobby.ssh(&alice, &["rm", "nothing", "web"]).await;

    assert!(!output.status.success());
    assert!(
        stdout(&output).contains("deleted web"),
        "{}",
        stdout(&output)
    );
    assert!(stderr(&output).contains("nothing"), "{}", stderr(&output));
    assert!(lobby.host.manager.get(&name("web")).await.is_err());
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_client_negotiates_strict_kex_and_an_aead_cipher() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby.ssh_with(&alice, &["-vvv"], &["whoami"]).await;

    assert_ok(&output);
    let log = stderr(&output);
    assert!(log.contains("will use strict KEX ordering"), "{log}");
    assert!(log.contains("kex: algorithm: curve25519-sha256"), "{log}");
    assert!(
        log.contains("kex: host key algorithm: ssh-ed25519"),
        "{log}"
    );
    assert!(
        log.contains("kex: server->client cipher: chacha20-poly1305@openssh.com"),
        "{log}"
    );
    lobby.stop().await;
}

/// An invite code for a user, valid for `ttl`.
async fn invite(lobby: &Lobby, ttl: Duration) -> String {
    let (_, code) = lobby
        .host
        .manager
        .new_invite(UserId::LOCAL, ttl, Role::User)
        .await
        .unwrap();
    code
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_registration_refuses_an_unknown_key() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Closed).await;
    let stranger = lobby.keygen("stranger");

    let output = lobby.ssh(&stranger, &["register", "alice"]).await;

    assert_eq!(output.status.code(), Some(255), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("vmkit user add"),
        "{}",
        stderr(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_registration_registers_the_key_and_the_next_connection_is_in_the_lobby() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Open).await;
    let key = lobby.keygen("newcomer");

    let registered = lobby.ssh(&key, &["register", "alice"]).await;
    let listed = lobby.ssh(&key, &["ls", "--json"]).await;
    let whoami = lobby.ssh(&key, &["whoami"]).await;

    assert_ok(&registered);
    assert_eq!(
        stdout(&registered),
        "registered alice; connect again to use the lobby\n"
    );
    assert_ok(&listed);
    assert_eq!(stdout(&listed).trim(), "[]");
    assert!(
        stdout(&whoami).contains("user: alice"),
        "{}",
        stdout(&whoami)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_answers_the_user_in_json() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Open).await;
    let key = lobby.keygen("newcomer");

    let registered = lobby
        .ssh(
            &key,
            &["register", "alice", "--email", "a@example.com", "--json"],
        )
        .await;

    assert_ok(&registered);
    let body = json(&registered);
    assert_eq!(body["user"]["handle"], "alice", "{body}");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_session_runs_only_register_help_and_whoami() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Open).await;
    let key = lobby.keygen("newcomer");

    let new = lobby.ssh(&key, &["new", "--name", "web"]).await;
    let ls = lobby.ssh(&key, &["ls", "--json"]).await;
    let help = lobby.ssh(&key, &["help"]).await;
    let whoami = lobby.ssh(&key, &["whoami"]).await;

    assert_eq!(new.status.code(), Some(1));
    let hint = format!(
        "this key is not registered: run `ssh -p {} HOST register HANDLE`",
        lobby.port
    );
    assert!(stderr(&new).contains(&hint), "{}", stderr(&new));
    assert_eq!(ls.status.code(), Some(1));
    assert_eq!(json(&ls)["code"], "not_registered");
    assert_ok(&help);
    assert!(
        stdout(&help).contains("register HANDLE"),
        "{}",
        stdout(&help)
    );
    assert_ok(&whoami);
    assert!(
        stdout(&whoami).contains("not registered"),
        "{}",
        stdout(&whoami)
    );
    assert!(lobby.host.manager.list(None).await.unwrap().is_empty());
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_key_offered_after_an_unknown_one_signs_in_as_its_user() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Open).await;
    let stranger = lobby.keygen("stranger");
    let alice = lobby.user(1, "alice").await;

    let output = lobby
        .ssh_with(&stranger, &["-i", alice.to_str().unwrap()], &["whoami"])
        .await;

    assert_ok(&output);
    assert!(
        stdout(&output).contains("user: alice"),
        "{}",
        stdout(&output)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_registration_without_a_code_is_refused_with_how_to_give_one() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Invite).await;
    let key = lobby.keygen("newcomer");

    let output = lobby.ssh(&key, &["register", "alice", "--json"]).await;

    assert_eq!(output.status.code(), Some(1));
    let body = json(&output);
    assert_eq!(body["code"], "invite_required", "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "ssh -p {} vmi_CODE@HOST register HANDLE",
            lobby.port
        )),
        "{message}"
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_code_registers_once() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Invite).await;
    let code = invite(&lobby, Duration::from_secs(600)).await;
    let alice = lobby.keygen("alice");
    let bob = lobby.keygen("bob");

    let registered = lobby.ssh_as(&alice, &code, &["register", "alice"]).await;
    let again = lobby
        .ssh_as(&bob, &code, &["register", "bob", "--json"])
        .await;
    let listed = lobby.ssh(&alice, &["ls", "--json"]).await;

    assert_ok(&registered);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(json(&again)["code"], "invite_invalid");
    assert_ok(&listed);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_invite_code_is_refused() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Invite).await;
    let code = invite(&lobby, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let key = lobby.keygen("newcomer");

    let output = lobby
        .ssh_as(&key, &code, &["register", "alice", "--json"])
        .await;

    assert_eq!(output.status.code(), Some(1));
    assert_eq!(json(&output)["code"], "invite_invalid");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_handle_is_refused_without_using_the_invite() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Invite).await;
    lobby.user(1, "alice").await;
    let code = invite(&lobby, Duration::from_secs(600)).await;
    let key = lobby.keygen("newcomer");

    let taken = lobby
        .ssh_as(&key, &code, &["register", "alice", "--json"])
        .await;
    let other = lobby.ssh_as(&key, &code, &["register", "carol"]).await;

    assert_eq!(taken.status.code(), Some(1));
    assert_eq!(json(&taken)["code"], "handle_taken");
    assert_ok(&other);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_users_key_signs_in_but_only_whoami_works() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Open).await;
    let alice = lobby.user(1, "alice").await;
    lobby
        .host
        .manager
        .set_suspended(&vmkit_core::Handle::new("alice").unwrap(), true)
        .await
        .unwrap();

    let whoami = lobby.ssh(&alice, &["whoami"]).await;
    let ls = lobby.ssh(&alice, &["ls", "--json"]).await;

    assert_ok(&whoami);
    assert!(
        stdout(&whoami).contains("user: alice"),
        "{}",
        stdout(&whoami)
    );
    assert_eq!(ls.status.code(), Some(1));
    assert_eq!(json(&ls)["code"], "suspended");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_unknown_keys_the_first_registers() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Open).await;
    let first = lobby.keygen("first");
    let second = lobby.keygen("second");

    let registered = lobby
        .ssh_with(
            &first,
            &["-i", second.to_str().unwrap()],
            &["register", "alice"],
        )
        .await;
    let with_first = lobby.ssh(&first, &["whoami"]).await;
    let with_second = lobby.ssh(&second, &["whoami"]).await;

    assert_ok(&registered);
    assert!(
        stdout(&with_first).contains("user: alice"),
        "{}",
        stdout(&with_first)
    );
    assert!(
        stdout(&with_second).contains("not registered"),
        "{}",
        stdout(&with_second)
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banner_says_how_to_register_under_open() {
    let lobby = Lobby::with_policy(RegistrationPolicy::Open).await;
    let key = lobby.keygen("newcomer");

    let output = lobby
        .ssh_with(&key, &["-o", "LogLevel=INFO"], &["help"])
        .await;

    assert_ok(&output);
    assert!(
        stderr(&output).contains(&format!("ssh -p {} HOST register HANDLE", lobby.port)),
        "{}",
        stderr(&output)
    );
    lobby.stop().await;
}

/// The stdout of `output`, which must have succeeded, as JSON.
#[track_caller]
fn ok_json(output: &Output) -> serde_json::Value {
    assert_ok(output);
    json(output)
}

/// The stdout of `output`, which must have succeeded.
#[track_caller]
fn ok_text(output: &Output) -> String {
    assert_ok(output);
    stdout(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_copies_a_vm_and_a_snapshot() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let text = ok_text(&lobby.ssh(&alice, &["cp", "web.vm.test", "web2"]).await);
    let copied = ok_json(&lobby.ssh(&alice, &["cp", "web", "web3", "--json"]).await);
    assert_ok(&lobby.ssh(&alice, &["snapshot", "web", "snap"]).await);
    let from_snapshot = ok_json(
        &lobby
            .ssh(&alice, &["cp", "snap", "web4", "--from-snapshot", "--json"])
            .await,
    );

    assert!(text.contains("copied web to web2"), "{text}");
    assert_eq!(copied["vm"]["name"], "web3");
    assert_eq!(from_snapshot["vm"]["name"], "web4");
    for copy in ["web2", "web3", "web4"] {
        let vm = lobby.host.manager.get(&name(copy)).await.unwrap();
        assert_eq!(vm.owner, UserId(1), "{copy}");
    }
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_changes_the_spec_and_needs_something_to_change() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);
    assert_ok(&lobby.ssh(&alice, &["stop", "web"]).await);

    let text = ok_text(
        &lobby
            .ssh(
                &alice,
                &["resize", "web", "--cpus", "2", "--memory", "1024"],
            )
            .await,
    );
    let resized = ok_json(
        &lobby
            .ssh(&alice, &["resize", "web", "--cpus", "3", "--json"])
            .await,
    );
    let nothing = lobby.ssh(&alice, &["resize", "web", "--json"]).await;

    assert!(text.contains("2 vCPU, 1024 MiB"), "{text}");
    assert_eq!(resized["vm"]["spec"]["vcpus"], 3);
    assert_eq!(resized["vm"]["spec"]["memory_mib"], 1024);
    let vm = lobby.host.manager.get(&name("web")).await.unwrap();
    assert_eq!(vm.spec.vcpus, 3);
    assert!(!nothing.status.success());
    assert_eq!(json(&nothing)["code"], "invalid_command");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_taken_listed_restored_and_removed() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let none = ok_text(&lobby.ssh(&alice, &["snapshots"]).await);
    let taken = ok_text(&lobby.ssh(&alice, &["snapshot", "web", "one"]).await);
    let taken_json = ok_json(
        &lobby
            .ssh(&alice, &["snapshot", "web", "two", "--json"])
            .await,
    );
    let listed = ok_text(&lobby.ssh(&alice, &["snapshots"]).await);
    let listed_json = ok_json(&lobby.ssh(&alice, &["snapshots", "--json"]).await);
    let restored = ok_text(&lobby.ssh(&alice, &["restore", "web", "one"]).await);
    let restored_json = ok_json(
        &lobby
            .ssh(&alice, &["restore", "web.vm.test", "two", "--json"])
            .await,
    );
    let removed = ok_text(&lobby.ssh(&alice, &["rm-snapshot", "one"]).await);
    let removed_json = ok_json(&lobby.ssh(&alice, &["rm-snapshot", "two", "--json"]).await);
    let missing = lobby.ssh(&alice, &["rm-snapshot", "two"]).await;

    assert!(none.contains("no snapshots"), "{none}");
    assert!(taken.contains("snapshot one of web"), "{taken}");
    assert_eq!(taken_json["snapshot"]["name"], "two");
    assert_eq!(taken_json["snapshot"]["vm_name"], "web");
    assert!(listed.contains("one\tof web"), "{listed}");
    assert!(listed.contains("two\tof web"), "{listed}");
    assert_eq!(listed_json.as_array().unwrap().len(), 2);
    assert!(restored.contains("restored web from one"), "{restored}");
    assert_eq!(restored_json["vm"]["name"], "web");
    assert!(removed.contains("deleted snapshot one"), "{removed}");
    assert_eq!(removed_json["deleted"], "two");
    assert!(!missing.status.success());
    let left = ok_json(&lobby.ssh(&alice, &["snapshots", "--json"]).await);
    assert_eq!(left, serde_json::json!([]));
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_print_the_console_tail() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let text = ok_text(&lobby.ssh(&alice, &["logs", "web"]).await);
    let tail = ok_json(
        &lobby
            .ssh(&alice, &["logs", "web", "--bytes", "4", "--json"])
            .await,
    );

    assert!(text.contains("fake boot of"), "{text}");
    assert_eq!(tail["vm"], "web");
    assert_eq!(tail["console"].as_str().unwrap().len(), 4);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_escape_the_control_characters_a_guest_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let host = FakeHost::with_config(ManagerConfig::new(&data)).await;
    let lobby = Lobby::start_in(host, dir, |config| config).await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);
    assert_ok(&lobby.ssh(&alice, &["stop", "web"]).await);
    // A stopped VM's console is the tail kept on disk: put a hostile one there.
    let vm = lobby.host.manager.get(&name("web")).await.unwrap();
    let consoles = data.join("consoles");
    std::fs::create_dir_all(&consoles).unwrap();
    let hostile = "login:\x1b]0;pwned\x07\x1b[2J\tok\r\nbye\u{9b}\n";
    std::fs::write(consoles.join(format!("{}.log", vm.id)), hostile).unwrap();

    let text = ok_text(&lobby.ssh(&alice, &["logs", "web"]).await);
    let raw = ok_json(&lobby.ssh(&alice, &["logs", "web", "--json"]).await);

    assert_eq!(
        text, "login:\\x1b]0;pwned\\x07\\x1b[2J\tok\nbye\\u{9b}\n",
        "{text:?}"
    );
    assert!(!text.contains('\x1b'));
    assert_eq!(raw["console"], hostile);
    let raw_text = ok_text(&lobby.ssh(&alice, &["logs", "web", "--json"]).await);
    assert!(
        !raw_text.contains(['\x1b', '\x07', '\u{9b}']),
        "{raw_text:?}"
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_are_shown_made_and_taken_back() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    let _bob = lobby.user(2, "bob").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let none = ok_text(&lobby.ssh(&alice, &["share", "web"]).await);
    let public = ok_text(&lobby.ssh(&alice, &["share", "web", "public"]).await);
    let public_json = ok_json(
        &lobby
            .ssh(
                &alice,
                &["share", "web", "public", "--access", "ssh", "--json"],
            )
            .await,
    );
    let added = ok_text(
        &lobby
            .ssh(
                &alice,
                &["share", "web", "add", "bob", "--access", "manage"],
            )
            .await,
    );
    let added_json = ok_json(
        &lobby
            .ssh(&alice, &["share", "web.vm.test", "add", "bob", "--json"])
            .await,
    );
    let link = ok_text(&lobby.ssh(&alice, &["share", "web", "link"]).await);
    let link_json = ok_json(&lobby.ssh(&alice, &["share", "web", "link", "--json"]).await);
    let shown = ok_text(&lobby.ssh(&alice, &["share", "web"]).await);
    let shown_json = ok_json(&lobby.ssh(&alice, &["share", "web", "--json"]).await);
    let nobody = lobby
        .ssh(&alice, &["share", "web", "add", "carol", "--json"])
        .await;

    assert!(none.contains("not shared"), "{none}");
    assert!(public.contains("shared with everyone (http)"), "{public}");
    assert_eq!(public_json["access"], "ssh");
    assert_eq!(public_json["with"]["kind"], "public");
    assert!(added.contains("shared with bob (manage)"), "{added}");
    assert_eq!(added_json["with"]["value"], 2);
    assert_eq!(added_json["access"], "http");
    assert!(link.contains("vms_"), "{link}");
    assert!(link_json["secret"].as_str().unwrap().starts_with("vms_"));
    assert!(shown.contains("public\thttp"), "{shown}");
    assert!(shown.contains("public\tssh"), "{shown}");
    assert!(shown.contains("user bob\tmanage"), "{shown}");
    assert!(shown.contains("link "), "{shown}");
    assert!(!shown.contains("vms_"), "the secret is shown once: {shown}");
    assert_eq!(shown_json.as_array().unwrap().len(), 6);
    assert!(!nobody.status.success());
    assert_eq!(json(&nobody)["code"], "user_not_found");

    let private = ok_text(&lobby.ssh(&alice, &["share", "web", "private"]).await);
    let removed = ok_json(
        &lobby
            .ssh(&alice, &["share", "web", "rm", "bob", "--json"])
            .await,
    );
    let left = ok_json(&lobby.ssh(&alice, &["share", "web", "--json"]).await);

    assert!(private.contains("2 taken back"), "{private}");
    assert_eq!(removed["removed"], 2);
    let left = left.as_array().unwrap();
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|s| s["with"]["kind"] == "link"), "{left:?}");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ports_are_shared_one_by_one_and_browser_prints_a_sign_in_link() {
    let lobby = Lobby::start_with(|config| config.https_port(8443)).await;
    let alice = lobby.user(1, "alice").await;
    let made = ok_text(&lobby.ssh(&alice, &["new", "--name", "web"]).await);
    assert!(made.contains("https://web.vm.test:8443/"), "{made}");

    let default = ok_text(&lobby.ssh(&alice, &["share", "web", "port"]).await);
    assert!(default.contains("reaches port 80 of web"), "{default}");
    let set = ok_json(
        &lobby
            .ssh(&alice, &["share", "web", "port", "3000", "--json"])
            .await,
    );
    assert_eq!(set["port"], 3000);
    let public = ok_text(
        &lobby
            .ssh(&alice, &["share", "web", "public", "--port", "8080"])
            .await,
    );
    assert!(
        public.contains("port 8080: https://web--8080.vm.test:8443/"),
        "{public}"
    );
    let link = ok_text(
        &lobby
            .ssh(&alice, &["share", "web", "link", "--port", "8080"])
            .await,
    );
    assert!(
        link.contains("https://web--8080.vm.test:8443/?share=vms_"),
        "{link}"
    );
    let shown = ok_text(&lobby.ssh(&alice, &["share", "web"]).await);
    assert!(shown.contains("public\thttp\tport 8080"), "{shown}");
    let ssh_port = lobby
        .ssh(
            &alice,
            &[
                "share", "web", "public", "--access", "ssh", "--port", "22", "--json",
            ],
        )
        .await;
    assert!(!ssh_port.status.success());
    assert_eq!(json(&ssh_port)["code"], "invalid_request");
    let private = ok_text(
        &lobby
            .ssh(&alice, &["share", "web", "private", "--port", "8080"])
            .await,
    );
    assert!(private.contains("1 taken back"), "{private}");

    let browser = ok_text(&lobby.ssh(&alice, &["browser"]).await);
    let url = browser
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap();
    let token = url
        .strip_prefix("https://vm.test:8443/__vmkit/login?token=")
        .unwrap();
    let web = vmkit_core::WebSessions::new(lobby.host.store.clone());
    let (_session, user) = web.redeem_sign_in_link(token).await.unwrap().unwrap();
    assert_eq!(user.handle.as_str(), "alice");
    let out = ok_json(
        &lobby
            .ssh(&alice, &["browser", "--sign-out", "--json"])
            .await,
    );
    assert_eq!(out["signed_out"], 1);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_copy_snapshot_share_or_read_another_users_vm() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    let bob = lobby.user(2, "bob").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);
    assert_ok(&lobby.ssh(&alice, &["snapshot", "web", "snap"]).await);

    let tries: [(&[&str], &[&str]); 7] = [
        (&["cp", "web", "mine"], &["cp", "nothing", "mine"]),
        (&["snapshot", "web", "s2"], &["snapshot", "nothing", "s2"]),
        (&["share", "web", "public"], &["share", "nothing", "public"]),
        (
            &["share", "web", "add", "bob"],
            &["share", "nothing", "add", "bob"],
        ),
        (&["share", "web"], &["share", "nothing"]),
        (&["logs", "web"], &["logs", "nothing"]),
        (
            &["resize", "web", "--cpus", "4"],
            &["resize", "nothing", "--cpus", "4"],
        ),
    ];
    for (theirs, missing) in tries {
        let theirs_output = lobby.ssh(&bob, &[theirs, &["--json"]].concat()).await;
        let missing_output = lobby.ssh(&bob, &[missing, &["--json"]].concat()).await;
        assert!(!theirs_output.status.success(), "{theirs:?}");
        let theirs_json = json(&theirs_output);
        let missing_json = json(&missing_output);
        assert_eq!(theirs_json["code"], missing_json["code"], "{theirs:?}");
        assert_eq!(
            theirs_json["error"]
                .as_str()
                .unwrap()
                .replace("web", "NAME"),
            missing_json["error"]
                .as_str()
                .unwrap()
                .replace("nothing", "NAME"),
            "{theirs:?}"
        );
    }
    let snapshot = lobby
        .ssh(&bob, &["cp", "snap", "mine", "--from-snapshot"])
        .await;
    assert!(!snapshot.status.success());
    let restore = lobby.ssh(&bob, &["rm-snapshot", "snap"]).await;
    assert!(!restore.status.success());
    let shares = lobby.host.manager.commands(vmkit_core::Caller::operator());
    assert!(shares.shares(&name("web")).await.unwrap().is_empty());
    assert!(lobby.host.manager.get(&name("mine")).await.is_err());
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_prints_progress_then_the_ssh_line_and_the_https_url() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let text = lobby.ssh(&alice, &["new", "--name", "web"]).await;
    let json = ok_json(&lobby.ssh(&alice, &["new", "--name", "db", "--json"]).await);

    assert_ok(&text);
    assert!(stderr(&text).contains("making a VM"), "{}", stderr(&text));
    let ssh_line = format!("ssh -p {} web@vm.test", lobby.port);
    assert!(stdout(&text).contains(&ssh_line), "{}", stdout(&text));
    assert!(
        stdout(&text).contains("https://web.vm.test/"),
        "{}",
        stdout(&text)
    );
    assert_eq!(json["vm"]["name"], "db");
    assert_eq!(json["ssh"], format!("ssh -p {} db@vm.test", lobby.port));
    assert_eq!(json["https"], "https://db.vm.test/");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_commands_name_the_public_host_and_leave_out_port_22() {
    let lobby =
        Lobby::start_with(|config| config.public_host("gw.example.org").public_port(22)).await;
    let alice = lobby.user(1, "alice").await;

    let json = ok_json(&lobby.ssh(&alice, &["new", "--name", "web", "--json"]).await);
    let config = ok_text(&lobby.ssh(&alice, &["ssh-config"]).await);

    assert_eq!(json["ssh"], "ssh web@gw.example.org");
    assert!(config.contains("ProxyJump gw.example.org\n"), "{config}");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_moves_a_vm_to_its_new_name() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "db"]).await);

    let renamed = ok_text(&lobby.ssh(&alice, &["rename", "web.vm.test", "blog"]).await);
    let json = ok_json(
        &lobby
            .ssh(&alice, &["rename", "blog", "site", "--json"])
            .await,
    );
    let taken = lobby.ssh(&alice, &["rename", "site", "db", "--json"]).await;
    let invalid = lobby.ssh(&alice, &["rename", "site", "Not_Valid"]).await;

    assert!(renamed.contains("renamed web to blog"), "{renamed}");
    assert!(renamed.contains("https://blog.vm.test/"), "{renamed}");
    assert_eq!(json["vm"]["name"], "site");
    assert_eq!(json["https"], "https://site.vm.test/");
    assert!(!taken.status.success());
    assert_eq!(self::json(&taken)["code"], "name_taken");
    assert!(!invalid.status.success());
    assert!(
        stderr(&invalid).contains("error: VM name"),
        "{}",
        stderr(&invalid)
    );
    assert!(lobby.host.manager.get(&name("site")).await.is_ok());
    assert!(lobby.host.manager.get(&name("web")).await.is_err());
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_vm_cannot_be_renamed_and_is_answered_as_a_missing_one() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    let bob = lobby.user(2, "bob").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let theirs = json(&lobby.ssh(&bob, &["rename", "web", "mine", "--json"]).await);
    let missing = json(
        &lobby
            .ssh(&bob, &["rename", "nothing", "mine", "--json"])
            .await,
    );

    assert_eq!(theirs["code"], missing["code"]);
    assert!(lobby.host.manager.get(&name("web")).await.is_ok());
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_config_prints_a_jump_through_the_gateway_for_the_domain() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let text = ok_text(&lobby.ssh(&alice, &["ssh-config"]).await);
    let json = ok_json(&lobby.ssh(&alice, &["ssh-config", "--json"]).await);

    assert!(text.contains("Host *.vm.test\n"), "{text}");
    assert!(
        text.contains(&format!("    ProxyJump vm.test:{}\n", lobby.port)),
        "{text}"
    );
    assert!(text.contains("    User vmkit\n"), "{text}");
    assert_eq!(json["ssh_config"], text);
    assert_eq!(json["port"], lobby.port);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_is_short_and_ls_l_has_a_header_and_the_details() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(
        &lobby
            .ssh(
                &alice,
                &["new", "--name", "web", "--cpus", "2", "--memory", "1024"],
            )
            .await,
    );

    let short = ok_text(&lobby.ssh(&alice, &["ls"]).await);
    let long = ok_text(&lobby.ssh(&alice, &["ls", "-l"]).await);

    assert_eq!(short, "web\trunning\n");
    let lines: Vec<&str> = long.lines().collect();
    assert_eq!(lines.len(), 2, "{long}");
    for column in [
        "NAME", "STATE", "IMAGE", "CPUS", "MEMORY", "DISK", "IP", "CREATED",
    ] {
        assert!(lines[0].contains(column), "{long}");
    }
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["web", "running", "base", "2", "1024", "MiB"],
        "{long}"
    );
    assert!(row[row.len() - 1].ends_with('Z'), "created, in UTC: {long}");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_answers_json_and_its_errors_as_json() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    let succeed: [&[&str]; 12] = [
        &["help"],
        &["whoami"],
        &["ls"],
        &["ls", "-l"],
        &["snapshot", "web", "snap"],
        &["snapshots"],
        &["share", "web"],
        &["logs", "web"],
        &["ssh-key", "ls"],
        &["ssh-config"],
        &["restart", "web"],
        &["exit"],
    ];
    let fail: [&[&str]; 16] = [
        &["start", "ghost"],
        &["stop", "ghost"],
        &["restart", "ghost"],
        &["rm", "ghost"],
        &["cp", "ghost"],
        &["rename", "ghost", "spirit"],
        &["resize", "ghost", "--cpus", "2"],
        &["snapshot", "ghost", "s"],
        &["restore", "ghost", "s"],
        &["rm-snapshot", "ghost"],
        &["logs", "ghost"],
        &["share", "ghost"],
        &["ssh-key", "rm", "SHA256:nothing"],
        &["ssh-key", "add", "not a key"],
        &["new", "--image", "no-such-image"],
        &["frobnicate"],
    ];
    for command in succeed {
        let output = lobby.ssh(&alice, &[command, &["--json"]].concat()).await;
        assert_ok(&output);
        let value: Result<serde_json::Value, _> = serde_json::from_slice(&output.stdout);
        assert!(value.is_ok(), "{command:?}: {}", stdout(&output));
    }
    for command in fail {
        let output = lobby.ssh(&alice, &[command, &["--json"]].concat()).await;
        assert!(!output.status.success(), "{command:?}");
        let value: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{command:?}: {e}: {}", stdout(&output)));
        let error = value["error"].as_str().or_else(|| {
            // `rm` answers per name.
            value["failed"][0]["error"].as_str()
        });
        assert!(error.is_some(), "{command:?}: {value}");
    }
    lobby.stop().await;
}

/// Runs `ssh -tt` with `input` typed at the prompt; what the terminal got.
async fn at_the_prompt(lobby: &Lobby, key: &Path, input: &str) -> String {
    let output = lobby.ssh_input(key, &["-tt"], &[], Some(input)).await;
    assert_ok(&output);
    stdout(&output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_is_welcomed_with_how_to_make_a_vm() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let first = at_the_prompt(&lobby, &alice, "exit\r").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);
    let later = at_the_prompt(&lobby, &alice, "exit\r").await;

    assert!(first.contains("`new` makes one"), "{first}");
    assert!(!later.contains("`new` makes one"), "{later}");
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tab_completes_commands_and_vm_names_at_the_prompt() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "webserver"]).await);

    // "whoa<tab>" becomes "whoami "; "stop w<tab>" becomes "stop webserver ".
    let text = at_the_prompt(&lobby, &alice, "whoa\t\rstop w\t\rexit\r").await;

    assert!(text.contains("user: alice"), "{text}");
    assert!(text.contains("webserver is stopped"), "{text}");
    let vm = lobby.host.manager.get(&name("webserver")).await.unwrap();
    assert_eq!(vm.state, vmkit_core::VmState::Stopped);
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_edits_recalls_and_drops_lines() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    assert_ok(&lobby.ssh(&alice, &["new", "--name", "web"]).await);

    // "stxp web": left 5 times, backspace, "o" → "stop web". Then ^C drops "rm web";
    // up arrow recalls "stop web" and ^A / ^K / "start web" turn it into
    // "start web". ^D on the empty line leaves.
    let input =
        "stxp web\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x7fo\rrm web\x03\x1b[A\x01\x0bstart web\r\x04";
    let text = at_the_prompt(&lobby, &alice, input).await;

    assert!(text.contains("web is stopped"), "{text}");
    assert!(text.contains("^C"), "{text}");
    assert!(text.contains("web is running"), "{text}");
    assert!(
        lobby.host.manager.get(&name("web")).await.is_ok(),
        "rm was dropped"
    );
    lobby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_the_prompt_reads_plain_lines_without_echo() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;

    let output = lobby
        .ssh_input(&alice, &["-T"], &[], Some("whoami\nls --json\n"))
        .await;

    assert_ok(&output);
    let text = stdout(&output);
    assert!(text.contains("user: alice"), "{text}");
    assert!(text.contains("[]"), "{text}");
    assert!(!text.contains("whoami\n"), "no echo: {text}");
    lobby.stop().await;
}

/// A russh client that takes any host key (the test's own server).
struct RusshClient;

impl russh::client::Handler for RusshClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Reads the channel until what it sent since the call contains `wanted`.
async fn read_until(channel: &mut russh::Channel<russh::client::Msg>, wanted: &str) -> String {
    let mut got = Vec::new();
    let read = async {
        while let Some(message) = channel.wait().await {
            if let russh::ChannelMsg::Data { data } = message {
                got.extend_from_slice(&data);
                if String::from_utf8_lossy(&got).contains(wanted) {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_redraws_with_the_width_of_the_last_window_change() {
    let lobby = Lobby::start().await;
    let alice = lobby.user(1, "alice").await;
    let config = Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect(config, ("127.0.0.1", lobby.port), RusshClient)
        .await
        .unwrap();
    let key = russh::keys::load_secret_key(&alice, None).unwrap();
    let signed = session
        .authenticate_publickey(
            "alice",
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(signed.success());
    let mut channel = session.channel_open_session().await.unwrap();
    channel
        .request_pty(true, "xterm", 20, 24, 0, 0, &[])
        .await
        .unwrap();
    channel.request_shell(true).await.unwrap();
    read_until(&mut channel, "vmkit> ").await;

    // "vmkit> " and 25 characters: 32 columns, two rows at width 20.
    channel
        .data_bytes(&b"0123456789012345678901234\x01"[..])
        .await
        .unwrap();
    let narrow = read_until(&mut channel, "\r\x1b[7C").await;
    channel.window_change(100, 24, 0, 0).await.unwrap();
    channel.data_bytes(&b"\x05"[..]).await.unwrap();
    let wide = read_until(&mut channel, "\x1b[32C").await;

    // Home at width 20: up from the second row to redraw, then back up to the first.
    assert!(narrow.contains("\x1b[1A\r\x1b[J"), "{narrow:?}");
    // End at width 100: one row, column 32 (at width 20 it would be column 12).
    assert!(wide.ends_with("\r\x1b[32C"), "{wide:?}");
    channel.data_bytes(&b"\x15exit\r"[..]).await.unwrap();
    read_until(&mut channel, "bye").await;
    lobby.stop().await;
}
