//! vmkit's DNS server end to end: the real `dig` (Debian `dnsutils`) against
//! [`DnsServer`] on 127.0.0.1, over UDP and TCP, answering from an in-memory state
//! store.
#![cfg(feature = "dns")]
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use vmkit_core::testing::MemoryStore;
use vmkit_core::{Handle, Quota, StateStore, User, UserId, VmName, VmRecord, VmSpec};
use vmkit_net::challenges::AcmeChallenges;
use vmkit_net::dns::{DnsConfig, DnsServer};

/// A DNS server for `vm.test` on 127.0.0.1 (UDP and TCP on one port), with the VM
/// `web`.
struct Served {
    port: u16,
    store: Arc<MemoryStore>,
    challenges: Arc<AcmeChallenges>,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start() -> Self {
        Self::start_with(|config| config).await
    }

    /// A server whose configuration `configure` changes.
    async fn start_with(configure: impl FnOnce(DnsConfig) -> DnsConfig) -> Self {
        let store = Arc::new(MemoryStore::new());
        let user = User::new(UserId(1), Handle::new("alice").unwrap());
        store.put_user(&user).await.unwrap();
        create_vm(&store, "web").await;
        let challenges = Arc::new(AcmeChallenges::new());
        let config = DnsConfig::new("vm.test")
            .address(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)))
            .address(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)))
            .caa_issuer("letsencrypt.org");
        let server = DnsServer::new(configure(config), store.clone(), challenges.clone()).unwrap();
        let (udp, tcp) = bind_pair().await;
        let port = udp.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            server
                .serve(udp, tcp, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            port,
            store,
            challenges,
            stop: Some(stop),
            served,
        }
    }

    /// `dig @127.0.0.1 -p PORT ARGS...`'s output; fails the test if dig is missing
    /// or fails.
    async fn dig(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let out = tokio::process::Command::new("dig")
            .args(["@127.0.0.1", "-p", &port, "+time=2", "+tries=1"])
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| {
                panic!("running dig failed ({e}); run scripts/install-deps.sh (package dnsutils)")
            });
        assert!(out.status.success(), "dig {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.served.await.unwrap();
    }
}

async fn create_vm(store: &MemoryStore, name: &str) {
    let vm = VmRecord::new(VmName::new(name).unwrap(), UserId(1), VmSpec::default());
    store.create_vm(&vm, &Quota::default()).await.unwrap();
}

/// A UDP socket and a TCP listener on the same ephemeral port of 127.0.0.1.
async fn bind_pair() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    for _ in 0..50 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return (udp, tcp);
        }
    }
    panic!("no port of 127.0.0.1 was free for both UDP and TCP");
}

/// The `status:` of dig's header line.
fn status(out: &str) -> &str {
    let (_, rest) = out.split_once("status: ").unwrap();
    rest.split(',').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_resolves_over_udp_and_tcp_in_any_case() {
    let dns = Served::start().await;
    assert_eq!(
        dns.dig(&["web.vm.test", "A", "+short"]).await,
        "192.0.2.7\n"
    );
    assert_eq!(
        dns.dig(&["WEB.Vm.Test", "A", "+short", "+tcp"]).await,
        "192.0.2.7\n"
    );
    assert_eq!(
        dns.dig(&["web.vm.test", "AAAA", "+short"]).await,
        "2001:db8::7\n"
    );
    assert_eq!(
        dns.dig(&["web--8080.vm.test", "A", "+short", "+tcp"]).await,
        "192.0.2.7\n"
    );
    let full = dns.dig(&["web.vm.test", "A"]).await;
    assert!(full.contains(" aa"), "not authoritative: {full}");
    dns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apex_answers_soa_ns_and_caa() {
    let dns = Served::start().await;
    let soa = dns.dig(&["vm.test", "SOA", "+short"]).await;
    assert!(soa.starts_with("ns.vm.test. hostmaster.vm.test. "), "{soa}");
    assert_eq!(dns.dig(&["vm.test", "NS", "+short"]).await, "ns.vm.test.\n");
    assert_eq!(
        dns.dig(&["vm.test", "CAA", "+short", "+tcp"]).await,
        "0 issue \"letsencrypt.org\"\n"
    );
    assert_eq!(dns.dig(&["vm.test", "A", "+short"]).await, "192.0.2.7\n");
    dns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_nxdomain_and_foreign_ones_refused() {
    let dns = Served::start().await;
    let nx = dns.dig(&["nothing.vm.test", "A"]).await;
    assert_eq!(status(&nx), "NXDOMAIN");
    assert!(nx.contains("AUTHORITY SECTION"), "no SOA: {nx}");
    let nx_tcp = dns.dig(&["web--0.vm.test", "A", "+tcp"]).await;
    assert_eq!(status(&nx_tcp), "NXDOMAIN");
    assert_eq!(status(&dns.dig(&["example.com", "A"]).await), "REFUSED");
    let nodata = dns.dig(&["web.vm.test", "TXT"]).await;
    assert_eq!(status(&nodata), "NOERROR");
    assert!(nodata.contains("ANSWER: 0"), "{nodata}");
    dns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_created_after_the_start_resolves_and_a_deleted_one_stops() {
    let dns = Served::start().await;
    assert_eq!(status(&dns.dig(&["db.vm.test", "A"]).await), "NXDOMAIN");
    create_vm(&dns.store, "db").await;
    assert_eq!(dns.dig(&["db.vm.test", "A", "+short"]).await, "192.0.2.7\n");
    let db = dns
        .store
        .get_vm(&VmName::new("db").unwrap())
        .await
        .unwrap()
        .unwrap();
    dns.store.delete_vm(db.id).await.unwrap();
    assert_eq!(
        status(&dns.dig(&["db.vm.test", "A", "+tcp"]).await),
        "NXDOMAIN"
    );
    dns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_challenge_values_are_served_as_txt() {
    let dns = Served::start().await;
    dns.challenges
        .add_dns01("_acme-challenge.vm.test", "value-one");
    dns.challenges
        .add_dns01("_acme-challenge.vm.test", "value-two");
    let txt = dns
        .dig(&["_acme-challenge.vm.test", "TXT", "+short", "+tcp"])
        .await;
    let mut lines: Vec<&str> = txt.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["\"value-one\"", "\"value-two\""]);
    dns.challenges
        .remove_dns01("_acme-challenge.vm.test", "value-one");
    dns.challenges
        .remove_dns01("_acme-challenge.vm.test", "value-two");
    assert_eq!(
        status(&dns.dig(&["_acme-challenge.vm.test", "TXT"]).await),
        "NXDOMAIN"
    );
    dns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_queries_is_answered_and_the_server_stays_up() {
    let dns = Served::start().await;
    // 2000 queries from one socket as fast as it can send, without waiting for answers.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let query = dns_query(7, "web.vm.test");
    for _ in 0..2000 {
        let _ = socket.send_to(&query, ("127.0.0.1", dns.port));
    }
    assert_eq!(
        dns.dig(&["web.vm.test", "A", "+short"]).await,
        "192.0.2.7\n"
    );
    dns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_past_the_limit_are_closed_and_udp_still_answers() {
    let dns = Served::start_with(|config| config.max_tcp_connections(2)).await;
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", dns.port)).unwrap())
        .collect();
    // Let the server take both before the third comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = std::net::TcpStream::connect(("127.0.0.1", dns.port)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let read = tokio::task::spawn_blocking(move || third.read(&mut [0u8; 1]).unwrap())
        .await
        .unwrap();
    assert_eq!(read, 0, "the third connection stays open");
    assert_eq!(
        dns.dig(&["web.vm.test", "A", "+short"]).await,
        "192.0.2.7\n"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        dns.dig(&["web.vm.test", "A", "+short", "+tcp"]).await,
        "192.0.2.7\n"
    );
    dns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_connection_is_closed() {
    let dns =
        Served::start_with(|config| config.tcp_idle_timeout(Duration::from_millis(300))).await;
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", dns.port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::task::spawn_blocking(move || idle.read(&mut byte).unwrap())
        .await
        .unwrap();
    assert_eq!(read, 0);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    dns.stop().await;
}

/// A DNS query for `name` A, built by hand (12-byte header, one question).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}
