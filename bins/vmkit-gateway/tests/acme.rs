#![allow(clippy::unwrap_used)]
//! The daemon with `[https] tls = "acme"`: its wildcard certificate comes from the
//! real pebble (the ACME test CA) by DNS-01, answered by the daemon's own DNS server
//! (`[dns]`), and `curl` trusting only pebble's root reaches the apex and a VM's
//! port host; after a restart the stored certificate is served without a new order.
//! A custom domain attached in the lobby gets its own certificate by HTTP-01, with
//! pebble asking a real recursive name server (dnsmasq) that delegates the VM domain
//! to the daemon's. Everything listens on 127.0.0.1.

#[path = "../../../vmkit-net/tests/support/dnsmasq.rs"]
mod dnsmasq;
#[path = "../../../vmkit-net/tests/support/pebble.rs"]
mod pebble;
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pebble::{Pebble, free_port};
use support::{Daemon, json, ssh, ssh_key, stderr};

const DOMAIN: &str = "vm.test";

/// `curl` of `https://HOST:port/` trusting only `root`, HOST resolved to 127.0.0.1.
fn curl(root: &Path, host: &str, port: u16) -> Output {
    Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .arg("--cacert")
        .arg(root)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .unwrap()
}

/// The root pebble signs certificates with, written into `dir`: its path.
fn pebble_root(pebble: &Pebble, dir: &Path) -> std::path::PathBuf {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&pebble.tls_root)
        .arg(format!(
            "https://127.0.0.1:{}/roots/0",
            pebble.management_port
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let root = dir.join("pebble-root.pem");
    std::fs::write(&root, &out.stdout).unwrap();
    root
}

/// The certificate events in the daemon's log.
fn certificate_events(d: &Daemon) -> Vec<serde_json::Value> {
    let out = d.cli(&["--json", "events", "--after", "0", "--limit", "10000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|v| match v {
            serde_json::Value::Array(items) => items,
            other => vec![other],
        })
        .filter(|e| e["kind"].to_string().contains("certificate_"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_gets_its_wildcard_from_pebble_through_its_own_dns_server() {
    let dir = tempfile::tempdir().unwrap();
    let (dns, http, https) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(dir.path(), dns, http).await;
    let data = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    let (dns_listen, http_listen, https_listen) = (
        format!("127.0.0.1:{dns}"),
        format!("127.0.0.1:{http}"),
        format!("127.0.0.1:{https}"),
    );
    let directory = pebble.directory();
    let ca_root = pebble.tls_root.display().to_string();
    // The key that seals the account lives outside the data directory.
    let key_file = dir.path().join("secret.key").display().to_string();
    let env = [
        ("VMKIT_SSH_DOMAIN", DOMAIN),
        ("VMKIT_DNS_LISTEN", dns_listen.as_str()),
        ("VMKIT_DNS_ADDRESSES", "127.0.0.1"),
        ("VMKIT_HTTPS_LISTEN", https_listen.as_str()),
        ("VMKIT_HTTPS_HTTP_LISTEN", http_listen.as_str()),
        ("VMKIT_HTTPS_TLS", "acme"),
        ("VMKIT_HTTPS_ACME_DIRECTORY_URL", directory.as_str()),
        ("VMKIT_HTTPS_ACME_CA_ROOT", ca_root.as_str()),
        ("VMKIT_HTTPS_ACME_SECRET_KEY_FILE", key_file.as_str()),
    ];
    let d = Daemon::start_in(data.path(), &["--fake-backends"], &env);

    // The wildcard is ordered at start and recorded as an event.
    issued_for(&d, "*.vm.test").await;

    // curl trusting only the root pebble signs with reaches the apex and a port
    // host of a VM (the wildcard covers it).
    let root = pebble_root(&pebble, dir.path());
    for host in [DOMAIN, "web--8080.vm.test"] {
        let out = curl(&root, host, https);
        assert!(
            out.status.success(),
            "{host}: {}\n{}",
            stderr(&out),
            d.log()
        );
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(code == "200" || code == "303", "{host}: {code}");
    }
    // The account is sealed: no private key in the clear in the data directory.
    let acme_dir = data.path().join("acme");
    for entry in std::fs::read_dir(&acme_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
                "{} holds a key in the clear",
                path.display()
            );
        }
    }

    // After a restart the stored certificate is served at once, without a new order
    // (the fake backends keep no state, so the daemon's log tells: its first run
    // issued once, the second loaded what was stored).
    assert!(d.terminate().success());
    let before = std::fs::read_to_string(data.path().join("daemon.log")).unwrap();
    let d = Daemon::start_in(data.path(), &["--fake-backends"], &env);
    let out = curl(&root, DOMAIN, https);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = d.log();
    let second_run = &after[before.len()..];
    assert!(second_run.contains("stored=1"), "{second_run}");
    assert!(!second_run.contains("certificate issued"), "{second_run}");
    let shown = json(&d.cli(&["--json", "vm", "ls"]));
    assert!(shown.is_array());
}

/// Waits (two minutes at most) for a certificate event naming `name`.
async fn issued_for(d: &Daemon, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let events = certificate_events(d);
        if let Some(e) = events.iter().find(|e| {
            let text = e.to_string();
            text.contains("certificate_issued") && text.contains(name)
        }) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no certificate for {name} within 2 minutes: {events:?}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_domain_attached_in_the_lobby_gets_its_certificate_by_http01() {
    let dir = tempfile::tempdir().unwrap();
    let (vm_dns, http, https, ssh_port) = (free_port(), free_port(), free_port(), free_port());
    // The world's DNS, as pebble and the daemon's proof lookups see it: the VM
    // domain delegated to the daemon's own server, and the owner's zone where
    // app.example.test is a CNAME to the VM.
    let world = dnsmasq::Dnsmasq::start(&[
        format!("--server=/{DOMAIN}/127.0.0.1#{vm_dns}"),
        "--local=/example.test/".into(),
        format!("--host-record=web.{DOMAIN},127.0.0.1"),
        format!("--cname=app.example.test,web.{DOMAIN}"),
    ]);
    let pebble = Pebble::start(dir.path(), world.port, http).await;
    let data = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    let directory = pebble.directory();
    let ca_root = pebble.tls_root.display().to_string();
    let key_file = dir.path().join("secret.key").display().to_string();
    let (dns_listen, http_listen, https_listen, ssh_listen, resolvers) = (
        format!("127.0.0.1:{vm_dns}"),
        format!("127.0.0.1:{http}"),
        format!("127.0.0.1:{https}"),
        format!("127.0.0.1:{ssh_port}"),
        format!("127.0.0.1:{}", world.port),
    );
    let env = [
        ("VMKIT_SSH_DOMAIN", DOMAIN),
        ("VMKIT_SSH_LISTEN", ssh_listen.as_str()),
        ("VMKIT_DNS_LISTEN", dns_listen.as_str()),
        ("VMKIT_DNS_ADDRESSES", "127.0.0.1"),
        ("VMKIT_HTTPS_LISTEN", https_listen.as_str()),
        ("VMKIT_HTTPS_HTTP_LISTEN", http_listen.as_str()),
        ("VMKIT_HTTPS_TLS", "acme"),
        ("VMKIT_HTTPS_ACME_DIRECTORY_URL", directory.as_str()),
        ("VMKIT_HTTPS_ACME_CA_ROOT", ca_root.as_str()),
        ("VMKIT_HTTPS_ACME_SECRET_KEY_FILE", key_file.as_str()),
        ("VMKIT_HTTPS_DOMAIN_RESOLVERS", resolvers.as_str()),
    ];
    let d = Daemon::start_in(data.path(), &["--fake-backends"], &env);
    // The wildcard first, through the delegation.
    issued_for(&d, "*.vm.test").await;

    let key = data.path().join("carol_id");
    let public = ssh_key(&key, "carol");
    let out = d.cli(&["user", "add", "carol", "--key", public.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for command in [
        &["new", "--name", "web"][..],
        &["domain", "add", "web", "app.example.test"],
    ] {
        let out = ssh(data.path(), ssh_port, &key, command);
        assert!(
            out.status.success(),
            "{command:?}: {}\n{}",
            stderr(&out),
            d.log()
        );
    }

    let issued = issued_for(&d, "app.example.test").await;
    assert!(!issued.to_string().contains("*.vm.test"), "{issued}");
    // curl trusting only pebble's root validates the custom domain's certificate.
    let root = pebble_root(&pebble, dir.path());
    let out = curl(&root, "app.example.test", https);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(code, "303", "private: sent to sign in");
}
