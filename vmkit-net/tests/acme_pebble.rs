//! ACME end to end against the real Debian `pebble` (the ACME test CA), pointed
//! with `-dnsserver` at vmkit's own DNS server: the wildcard by DNS-01 and a custom
//! domain by HTTP-01, then TLS handshakes against a rustls server serving the
//! [`CertStore`], from a client that trusts only pebble's root and checks the name.
//!
//! The custom domain `app.custom.test` resolves to 127.0.0.1 because the DNS
//! server is told to answer it ([`DnsConfig::extra_host`]): pebble resolves every
//! name through its `-dnsserver`. Its HTTP-01 request reaches a tiny HTTP server of
//! this test that answers from [`AcmeChallenges::http01`], as the HTTPS edge's
//! plain-HTTP listener does. Everything listens on 127.0.0.1.
#![cfg(all(feature = "https", feature = "dns"))]
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use vmkit_core::SecretBox;
use vmkit_core::testing::MemoryStore;
use vmkit_net::challenges::AcmeChallenges;
use vmkit_net::dns::{DnsConfig, DnsServer};
use vmkit_net::https::acme::{AcmeConfig, AcmeEvent, AcmeIssuer};
use vmkit_net::https::tls::CertStore;

#[path = "support/pebble.rs"]
mod pebble;

use pebble::Pebble;

const DOMAIN: &str = "vm.test";
const CUSTOM: &str = "app.custom.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// vmkit's DNS server on 127.0.0.1 (UDP and TCP on one port); its port.
async fn start_dns(challenges: Arc<AcmeChallenges>) -> (u16, oneshot::Sender<()>) {
    let config = DnsConfig::new(DOMAIN)
        .address(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .extra_host(CUSTOM);
    let server = DnsServer::new(config, Arc::new(MemoryStore::new()), challenges).unwrap();
    let (udp, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let port = udp.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(udp, tcp, async {
        let _ = stopped.await;
    }));
    (port, stop)
}

/// The plain-HTTP answers to HTTP-01 challenges, as the HTTPS edge gives them.
async fn start_http01(challenges: Arc<AcmeChallenges>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let challenges = challenges.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let answer = path
                    .strip_prefix("/.well-known/acme-challenge/")
                    .and_then(|token| challenges.http01(token));
                let response = match answer {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .into()
                    }
                };
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

/// The root pebble signs with, from its management interface.
async fn issuing_root(pebble: &Pebble) -> Vec<u8> {
    let pem = std::fs::read(&pebble.tls_root).unwrap();
    let body = https_get(&pem, pebble.management_port, "/roots/0").await;
    assert!(body.contains("BEGIN CERTIFICATE"), "{body}");
    body.into_bytes()
}

/// A TLS client that trusts only the certificates in `root_pem`.
fn connector(root_pem: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// GET `path` from 127.0.0.1:`port` over HTTPS trusting `root_pem`; the body.
async fn https_get(root_pem: &[u8], port: u16, path: &str) -> String {
    let connector = connector(root_pem);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// A rustls server on 127.0.0.1 choosing certificates from `store`; its port.
async fn start_tls_server(store: Arc<CertStore>) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(store);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let _ = tls.write_all(b"hello").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    port
}

/// A TLS handshake with `127.0.0.1:port` for `name`, trusting only `root_pem`;
/// what the server said, or the handshake's error.
async fn handshake(port: u16, name: &str, root_pem: &[u8]) -> Result<String, String> {
    let connector = connector(root_pem);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut said = String::new();
    tls.read_to_string(&mut said)
        .await
        .map_err(|e| e.to_string())?;
    Ok(said)
}

fn issuer(
    state: &Path,
    pebble: &Pebble,
    store: Arc<CertStore>,
    challenges: Arc<AcmeChallenges>,
    secrets: Arc<SecretBox>,
    renew_before: Duration,
) -> Arc<AcmeIssuer> {
    let config = AcmeConfig::new(state)
        .directory_url(&pebble.directory())
        .contact("admin@vm.test")
        .ca_root_pem(&pebble.tls_root)
        .renew_before(renew_before)
        .retry_backoff(Duration::from_millis(200), Duration::from_secs(2))
        .order_timeout(Duration::from_secs(60));
    AcmeIssuer::new(config, DOMAIN, store, challenges, secrets).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_the_wildcard_by_dns01_and_a_custom_domain_by_http01() {
    let dir = tempfile::tempdir().unwrap();
    let challenges = Arc::new(AcmeChallenges::new());
    let (dns_port, _stop_dns) = start_dns(challenges.clone()).await;
    let http_port = start_http01(challenges.clone()).await;
    let pebble = Pebble::start(dir.path(), dns_port, http_port).await;
    let secrets = Arc::new(SecretBox::from_key_file(&dir.path().join("secret.key")).unwrap());
    let state = dir.path().join("data/acme");

    // Certificates, issued and installed.
    let store = CertStore::new(DOMAIN, None).unwrap();
    let acme = issuer(
        &state,
        &pebble,
        store.clone(),
        challenges.clone(),
        secrets.clone(),
        Duration::from_secs(30 * 24 * 3600),
    );
    let wildcard = acme.issue_wildcard().await.unwrap_or_else(|e| {
        panic!(
            "{e}\npebble's log:\n{}",
            std::fs::read_to_string(dir.path().join("pebble.log")).unwrap()
        )
    });
    let custom = acme.issue_custom(CUSTOM).await.unwrap();
    assert!(wildcard.not_after > std::time::SystemTime::now());
    assert_eq!(store.default_expiry(), Some(wildcard.not_after));
    assert_eq!(store.expiry_for(CUSTOM), Some(custom.not_after));
    // The challenge answers are gone once the orders are done.
    assert!(challenges.dns01("_acme-challenge.vm.test").is_empty());

    // TLS, validated against pebble's root only.
    let root = issuing_root(&pebble).await;
    let tls_port = start_tls_server(store.clone()).await;
    for name in ["web.vm.test", "vm.test", "web--8080.vm.test", CUSTOM] {
        assert_eq!(
            handshake(tls_port, name, &root).await.as_deref(),
            Ok("hello"),
            "{name}"
        );
    }
    let other = handshake(tls_port, "other.example", &root)
        .await
        .unwrap_err();
    assert!(
        other.contains("NotValidForName") || other.contains("not valid"),
        "{other}"
    );
    let pebble_tls_root = std::fs::read(&pebble.tls_root).unwrap();
    assert!(
        handshake(tls_port, "web.vm.test", &pebble_tls_root)
            .await
            .is_err()
    );

    // Stored: the account sealed, the keys private; a restart serves without an order.
    let sealed = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "sealed"))
        .unwrap();
    let sealed = std::fs::read(sealed).unwrap();
    assert_eq!(sealed[0], 1);
    assert!(!String::from_utf8_lossy(&sealed).contains("key_pkcs8"));
    let restarted = CertStore::new(DOMAIN, None).unwrap();
    let again = issuer(
        &state,
        &pebble,
        restarted.clone(),
        challenges.clone(),
        secrets.clone(),
        Duration::from_secs(30 * 24 * 3600),
    );
    assert_eq!(again.load_stored().unwrap(), 2);
    assert_eq!(restarted.default_expiry(), Some(wildcard.not_after));
    let restarted_port = start_tls_server(restarted).await;
    assert_eq!(
        handshake(restarted_port, CUSTOM, &root).await.as_deref(),
        Ok("hello")
    );

    // The renewal task: everything is due (renew a century early), a name nobody
    // answers for fails and is retried, and the task goes on.
    let renewing = CertStore::new(DOMAIN, None).unwrap();
    let renewer = issuer(
        &state,
        &pebble,
        renewing.clone(),
        challenges.clone(),
        secrets,
        Duration::from_secs(100 * 365 * 24 * 3600),
    );
    renewer.add_custom_domain(CUSTOM).unwrap();
    renewer.add_custom_domain("nowhere.custom.test").unwrap();
    let (events, mut received) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(renewer.clone().run(
        move |event| {
            let _ = events.send(event);
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut issued = Vec::new();
    let mut failures = Vec::new();
    while issued.len() < 2 || failures.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(60), received.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the renewal task reported only {issued:?} {failures:?} within a minute; pebble's log:\n{}",
                    std::fs::read_to_string(dir.path().join("pebble.log")).unwrap()
                )
            })
            .unwrap();
        match event {
            AcmeEvent::Issued { names, .. } => issued.push(names),
            AcmeEvent::Failed {
                names, retry_in, ..
            } => {
                assert!(retry_in <= Duration::from_secs(2), "{retry_in:?}");
                failures.push(names);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    issued.sort();
    assert_eq!(
        issued,
        [
            vec![CUSTOM.to_owned()],
            vec![DOMAIN.to_owned(), format!("*.{DOMAIN}")]
        ]
    );
    assert!(
        failures
            .iter()
            .all(|n| n == &["nowhere.custom.test".to_owned()])
    );
    assert!(renewing.default_expiry().is_some());
    let _ = stop.send(());
    task.await.unwrap();
    drop(pebble);
}
