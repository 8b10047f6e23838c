//! `SystemHandler`'s management calls on this machine, through a real client and `serve`
//! loop: files in temporary directories, the system's configuration under a temporary
//! root (`with_root`), upgrades of a stand-in binary, and the network and host name in
//! namespaces of their own. Needs root (owners, `useradd --root`, namespaces).
#![cfg(feature = "agent")]
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::{connected, hex_sha256};
use vmkit_guest::{
    Client, ClientConfig, ClientError, Handler, HardenRequest, LogsRequest, NetworkConfig,
    ServerConfig, SystemHandler, WriteFileRequest,
};

const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa a@host";
const KEY_B: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb b@host";

fn client_with(handler: SystemHandler) -> Client {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (file owners, useradd, namespaces)"
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

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

fn owner(path: &Path) -> (u32, u32) {
    let meta = fs::metadata(path).unwrap();
    (meta.uid(), meta.gid())
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

// --- files --------------------------------------------------------------------------

#[tokio::test]
async fn write_file_replaces_a_file_atomically_with_its_mode_and_owner() {
    let dir = tempdir();
    let target = dir.path().join("config");
    fs::write(&target, b"old").unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();

    let written = client()
        .write_file(
            WriteFileRequest::new(path_str(&target))
                .mode(0o640)
                .owner("65534:65534"),
            &data,
        )
        .await
        .unwrap();

    assert_eq!(written, data.len() as u64);
    assert_eq!(fs::read(&target).unwrap(), data);
    assert_eq!(mode(&target), 0o640);
    assert_eq!(owner(&target), (65534, 65534));
    assert_eq!(
        names_in(dir.path()),
        ["config"],
        "no temporary file is left"
    );
}

#[tokio::test]
async fn write_file_keeps_the_mode_and_owner_of_the_file_it_replaces() {
    let dir = tempdir();
    let target = dir.path().join("script");
    fs::write(&target, b"#!/bin/sh\n").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(&target, Some(65534), Some(0)).unwrap();

    client()
        .write_file(
            WriteFileRequest::new(path_str(&target)),
            b"#!/bin/sh\nexit 0\n",
        )
        .await
        .unwrap();

    assert_eq!(mode(&target), 0o750);
    assert_eq!(owner(&target), (65534, 0));
}

#[tokio::test]
async fn write_file_into_a_missing_directory_fails_and_leaves_nothing() {
    let dir = tempdir();
    let target = dir.path().join("missing/file");

    let err = client()
        .write_file(WriteFileRequest::new(path_str(&target)), b"x")
        .await
        .unwrap_err();

    assert!(matches!(err, ClientError::Remote(m) if m.contains("temporary file")));
    assert!(names_in(dir.path()).is_empty());
}

#[tokio::test]
async fn write_file_to_an_unknown_owner_fails_and_leaves_the_old_file() {
    let dir = tempdir();
    let target = dir.path().join("f");
    fs::write(&target, b"old").unwrap();

    let err = client()
        .write_file(
            WriteFileRequest::new(path_str(&target)).owner("no-such-user-here"),
            b"new",
        )
        .await
        .unwrap_err();

    assert!(matches!(err, ClientError::Remote(m) if m.contains("no user")));
    assert_eq!(fs::read(&target).unwrap(), b"old");
}

#[tokio::test]
async fn relative_paths_are_refused() {
    let client = client();

    let read = client.read_file("etc/passwd", 1 << 20).await.unwrap_err();
    let write = client
        .write_file(WriteFileRequest::new("tmp/x"), b"x")
        .await
        .unwrap_err();

    assert!(matches!(read, ClientError::Remote(m) if m.contains("absolute")));
    assert!(matches!(write, ClientError::Remote(m) if m.contains("absolute")));
}

#[tokio::test]
async fn read_file_streams_a_file_and_refuses_one_over_the_limit() {
    let dir = tempdir();
    let target = dir.path().join("big");
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 239) as u8).collect();
    fs::write(&target, &data).unwrap();
    let client = client();

    let read = client
        .read_file(path_str(&target), data.len() as u64)
        .await
        .unwrap();
    let over = client
        .read_file(path_str(&target), data.len() as u64 - 1)
        .await
        .unwrap_err();
    let directory = client
        .read_file(path_str(dir.path()), 1 << 20)
        .await
        .unwrap_err();

    assert_eq!(read, data);
    assert!(matches!(over, ClientError::Remote(m) if m.contains("over the limit")));
    assert!(matches!(directory, ClientError::Remote(m) if m.contains("directory")));
}

#[tokio::test]
async fn read_file_stops_an_endless_file_at_the_limit() {
    let err = client().read_file("/dev/zero", 1 << 20).await.unwrap_err();

    assert!(matches!(err, ClientError::Remote(m) if m.contains("grew past the limit")));
}

// --- metrics and logs ---------------------------------------------------------------

#[tokio::test]
async fn metrics_of_this_host_are_sane() {
    let metrics = client().metrics(Duration::from_millis(200)).await.unwrap();

    assert!(metrics.mem_total_bytes > 0);
    assert!(metrics.mem_pct > 0.0 && metrics.mem_pct < 100.0);
    assert!(metrics.disk_pct > 0.0 && metrics.disk_pct <= 100.0);
    assert!(metrics.uptime_secs > 0);
}

#[tokio::test]
async fn logs_of_a_file_are_its_last_lines_and_follow_its_growth() {
    let dir = tempdir();
    let path = dir.path().join("app.log");
    let mut file = fs::File::create(&path).unwrap();
    for i in 1..=10 {
        writeln!(file, "line {i}").unwrap();
    }
    let client = client();

    let last = client
        .logs(LogsRequest::file(path_str(&path)).lines(3))
        .await
        .unwrap();
    let mut follow = client
        .follow_logs(LogsRequest::file(path_str(&path)).lines(1))
        .await
        .unwrap();
    let first = follow.next().await.unwrap().unwrap();
    writeln!(file, "line 11").unwrap();
    write!(file, "line 1").unwrap();
    file.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    writeln!(file, "2").unwrap();
    let next = follow.next().await.unwrap().unwrap();
    let after = follow.next().await.unwrap().unwrap();

    assert_eq!(last, ["line 8", "line 9", "line 10"]);
    assert_eq!(first, "line 10");
    assert_eq!(next, "line 11");
    assert_eq!(after, "line 12", "a line written in two parts comes whole");
}

#[tokio::test]
async fn logs_of_a_missing_file_or_a_bad_unit_are_errors() {
    let client = client();

    let missing = client
        .logs(LogsRequest::file("/nonexistent/log"))
        .await
        .unwrap_err();
    let option = client
        .logs(LogsRequest::unit("--since=yesterday"))
        .await
        .unwrap_err();

    assert!(matches!(missing, ClientError::Remote(_)));
    assert!(matches!(option, ClientError::Remote(m) if m.contains("not a systemd unit")));
}

// --- users, keys, hardening under a temporary root -----------------------------------

/// A root with passwd, group and shadow files: root, and `vmkit` (uid 4242) with a home,
/// named the default user.
fn system_root() -> tempfile::TempDir {
    let root = tempdir();
    let etc = root.path().join("etc");
    fs::create_dir_all(etc.join("vmkit")).unwrap();
    fs::create_dir_all(etc.join("sudoers.d")).unwrap();
    fs::create_dir_all(etc.join("ssh/sshd_config.d")).unwrap();
    fs::create_dir_all(root.path().join("home/vmkit")).unwrap();
    std::os::unix::fs::chown(root.path().join("home/vmkit"), Some(4242), Some(4242)).unwrap();
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nvmkit:x:4242:4242::/home/vmkit:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        etc.join("group"),
        "root:x:0:\nsudo:x:27:vmkit\nvmkit:x:4242:\n",
    )
    .unwrap();
    fs::write(
        etc.join("shadow"),
        "root:*:19000:0:99999:7:::\nvmkit:!:19000::::::\n",
    )
    .unwrap();
    fs::write(etc.join("vmkit/default-user"), "vmkit\n").unwrap();
    fs::write(
        etc.join("hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\told-name\n",
    )
    .unwrap();
    root
}

#[tokio::test]
async fn ssh_keys_go_into_a_managed_block_that_keeps_other_lines() {
    let root = system_root();
    let ssh = root.path().join("home/vmkit/.ssh");
    fs::create_dir(&ssh).unwrap();
    fs::write(ssh.join("authorized_keys"), "ssh-rsa AAAA someone-elses\n").unwrap();
    let client = client_with(SystemHandler::new().with_root(root.path()));

    client.install_ssh_keys(None, [KEY_A]).await.unwrap();
    client.install_ssh_keys(None, [KEY_B]).await.unwrap();

    let keys = fs::read_to_string(ssh.join("authorized_keys")).unwrap();
    assert!(keys.starts_with("ssh-rsa AAAA someone-elses\n"));
    assert!(keys.contains(KEY_B) && !keys.contains(KEY_A), "{keys}");
    assert_eq!(mode(&ssh), 0o700);
    assert_eq!(mode(&ssh.join("authorized_keys")), 0o600);
    assert_eq!(owner(&ssh), (4242, 4242));
    assert_eq!(owner(&ssh.join("authorized_keys")), (4242, 4242));
}

#[tokio::test]
async fn ssh_keys_for_an_unknown_user_or_that_are_not_keys_are_refused() {
    let root = system_root();
    let client = client_with(SystemHandler::new().with_root(root.path()));

    let user = client
        .install_ssh_keys(Some("mallory"), [KEY_A])
        .await
        .unwrap_err();
    let key = client
        .install_ssh_keys(None, ["ssh-ed25519 AAAA\nevil"])
        .await
        .unwrap_err();

    assert!(matches!(user, ClientError::Remote(m) if m.contains("no user")));
    assert!(matches!(key, ClientError::Remote(m) if m.contains("single-line")));
    assert!(!root.path().join("home/vmkit/.ssh").exists());
}

#[tokio::test]
async fn harden_creates_the_deploy_user_with_the_keys_and_tightens_sshd_once() {
    let root = system_root();
    let client = client_with(SystemHandler::new().with_root(root.path()));
    client.install_ssh_keys(None, [KEY_A]).await.unwrap();

    let first = client
        .harden(HardenRequest::new().keys([KEY_B]))
        .await
        .unwrap();
    let second = client
        .harden(HardenRequest::new().keys([KEY_B]))
        .await
        .unwrap();

    let etc = root.path().join("etc");
    assert_eq!(first.user, "deploy");
    assert!(
        first.changes.iter().any(|c| c == "created user deploy"),
        "{first:?}"
    );
    assert!(second.changes.is_empty(), "{second:?}");
    assert!(
        !first.sshd_reloaded,
        "a root other than / leaves services alone"
    );
    let group = fs::read_to_string(etc.join("group")).unwrap();
    assert!(group.contains("sudo:x:27:vmkit,deploy"), "{group}");
    let keys = fs::read_to_string(root.path().join("home/deploy/.ssh/authorized_keys")).unwrap();
    assert!(keys.contains(KEY_A) && keys.contains(KEY_B), "{keys}");
    let sshd = fs::read_to_string(etc.join("ssh/sshd_config.d/50-vmkit.conf")).unwrap();
    for setting in [
        "PermitRootLogin no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
    ] {
        assert!(sshd.lines().any(|l| l == setting), "{sshd}");
    }
    let sudoers = etc.join("sudoers.d/50-vmkit-deploy");
    assert_eq!(
        fs::read_to_string(&sudoers).unwrap().lines().last(),
        Some("deploy ALL=(ALL) NOPASSWD:ALL")
    );
    assert_eq!(mode(&sudoers), 0o440);
}

#[tokio::test]
async fn harden_refuses_a_user_name_useradd_would_not_take() {
    let root = system_root();
    let client = client_with(SystemHandler::new().with_root(root.path()));

    let err = client
        .harden(HardenRequest::new().user("Root;rm"))
        .await
        .unwrap_err();

    assert!(matches!(err, ClientError::Remote(m) if m.contains("not a valid user name")));
}

/// Runs `f` on a thread of its own in new UTS and network namespaces, with a runtime
/// of its own: the host's name and network stay untouched.
fn in_namespaces<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(
            nix::sched::CloneFlags::CLONE_NEWUTS | nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .expect("unshare (needs root)");
        f()
    })
    .join()
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn set_hostname_sets_the_kernels_name_and_the_files() {
    let root = system_root();
    let handler = SystemHandler::new().with_root(root.path());

    let kernel = in_namespaces(move || {
        runtime()
            .block_on(handler.set_hostname("box.example.org".to_owned()))
            .unwrap();
        nix::unistd::gethostname().unwrap()
    });

    let etc = root.path().join("etc");
    assert_eq!(kernel, "box.example.org");
    assert_eq!(
        fs::read_to_string(etc.join("hostname")).unwrap(),
        "box.example.org\n"
    );
    assert_eq!(
        fs::read_to_string(etc.join("hosts")).unwrap(),
        "127.0.0.1\tlocalhost\n127.0.1.1\tbox.example.org box\n"
    );
}

#[test]
fn set_hostname_refuses_a_bad_name() {
    let root = system_root();
    let handler = SystemHandler::new().with_root(root.path());

    let result =
        in_namespaces(move || runtime().block_on(handler.set_hostname("-bad name".to_owned())));

    assert!(result.unwrap_err().contains("not a valid host name"));
}

/// `ip` with JSON output, in the calling thread's network namespace.
fn ip_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("ip")
        .arg("-json")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?} failed");
}

#[test]
fn configure_network_addresses_the_interface_by_mac_and_routes_through_the_gateway() {
    let root = system_root();
    let handler = SystemHandler::new().with_root(root.path());
    let first = NetworkConfig::new(
        "52:54:00:AB:CD:01",
        [10, 9, 0, 2].into(),
        24,
        [10, 9, 0, 1].into(),
    )
    .dns([[10, 9, 0, 1].into(), [1, 1, 1, 1].into()])
    .mtu(1400);
    let second = NetworkConfig::new(
        "52:54:00:ab:cd:01",
        [10, 8, 0, 7].into(),
        16,
        [10, 8, 0, 1].into(),
    );

    let (after_first, again, after_second, routes, missing) = in_namespaces(move || {
        ip(&[
            "link",
            "add",
            "eth7",
            "address",
            "52:54:00:ab:cd:01",
            "type",
            "veth",
            "peer",
            "name",
            "peer7",
        ]);
        ip(&["link", "set", "peer7", "up"]);
        let rt = runtime();
        rt.block_on(handler.configure_network(first.clone()))
            .unwrap();
        let after_first = ip_json(&["addr", "show", "dev", "eth7"]);
        // Applying the same config twice is fine.
        let again = rt.block_on(handler.configure_network(first));
        rt.block_on(handler.configure_network(second)).unwrap();
        let after_second = ip_json(&["addr", "show", "dev", "eth7"]);
        let routes = ip_json(&["route", "show", "default"]);
        let missing = rt.block_on(handler.configure_network(NetworkConfig::new(
            "52:54:00:00:00:99",
            [10, 0, 0, 2].into(),
            24,
            [10, 0, 0, 1].into(),
        )));
        (after_first, again, after_second, routes, missing)
    });

    let link = &after_first[0];
    assert_eq!(link["mtu"], 1400);
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let v4 = |link: &serde_json::Value| -> Vec<String> {
        link["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect()
    };
    assert_eq!(v4(link), ["10.9.0.2/24"]);
    assert!(again.is_ok(), "{again:?}");
    assert_eq!(
        v4(&after_second[0]),
        ["10.8.0.7/16"],
        "the new address replaced the old"
    );
    assert_eq!(routes[0]["gateway"], "10.8.0.1");
    assert_eq!(routes[0]["dev"], "eth7");
    assert!(
        missing
            .unwrap_err()
            .contains("no network interface has the MAC")
    );
    assert_eq!(
        fs::read_to_string(root.path().join("etc/resolv.conf")).unwrap(),
        "# Written by the vmkit agent.\nnameserver 10.9.0.1\nnameserver 1.1.1.1\n",
        "the second config named no servers and left the file alone"
    );
}

// --- upgrade ------------------------------------------------------------------------

/// A stand-in agent: a script that answers `--version` with `version`.
fn fake_agent(version: &str) -> Vec<u8> {
    format!("#!/bin/sh\necho vmkit-agent {version}\n").into_bytes()
}

fn installed(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("vmkit-agent");
    fs::write(&path, fake_agent("1.0.0")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn upgrader(path: &Path) -> Client {
    client_with(
        SystemHandler::new()
            .with_agent_path(path)
            .with_restart_after_upgrade(false),
    )
}

#[tokio::test]
async fn upgrade_with_the_right_hash_replaces_the_binary() {
    let dir = tempdir();
    let path = installed(dir.path());
    let old_sha = hex_sha256(&fs::read(&path).unwrap());
    let new = fake_agent("2.0.0");

    let report = upgrader(&path)
        .upgrade(&new, &hex_sha256(&new).to_uppercase())
        .await
        .unwrap();

    assert_eq!(fs::read(&path).unwrap(), new);
    assert_eq!(mode(&path), 0o755);
    assert_eq!(report.previous_sha256, old_sha);
    assert_eq!(report.sha256, hex_sha256(&new));
    assert_eq!(report.path, path_str(&path));
    assert!(!report.restarting);
    assert_eq!(names_in(dir.path()), ["vmkit-agent"]);
}

#[tokio::test]
async fn upgrade_with_a_wrong_hash_keeps_the_old_binary_and_says_so() {
    let dir = tempdir();
    let path = installed(dir.path());
    let before = fs::read(&path).unwrap();

    let err = upgrader(&path)
        .upgrade(&fake_agent("2.0.0"), &hex_sha256(b"something else"))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, ClientError::Remote(m) if m.contains("SHA-256 mismatch") && m.contains("unchanged")),
        "{err:?}"
    );
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(names_in(dir.path()), ["vmkit-agent"]);
}

#[tokio::test]
async fn upgrade_to_a_binary_that_does_not_run_keeps_the_old_one() {
    let dir = tempdir();
    let path = installed(dir.path());
    let broken = b"#!/bin/sh\nexit 3\n".to_vec();

    let err = upgrader(&path)
        .upgrade(&broken, &hex_sha256(&broken))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, ClientError::Remote(m) if m.contains("does not run") && m.contains("unchanged")),
        "{err:?}"
    );
    assert_eq!(fs::read(&path).unwrap(), fake_agent("1.0.0"));
}

#[tokio::test]
async fn upgrade_with_a_malformed_hash_is_refused() {
    let dir = tempdir();
    let path = installed(dir.path());

    let err = upgrader(&path)
        .upgrade(&fake_agent("2.0.0"), "abc")
        .await
        .unwrap_err();

    assert!(matches!(err, ClientError::Remote(m) if m.contains("not a SHA-256")));
}
