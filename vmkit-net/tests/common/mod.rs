//! Test harness: network namespaces standing in for the host, the upstream and
//! guests, made with `ip` and removed by `Drop`.
//!
//! A guest is a namespace with its own kernel network stack whose `eth0` is a TAP;
//! the test copies frames between that TAP and the host TAP the backend made, in
//! both directions — what QEMU does between a guest's virtio-net and the host TAP.
//! So the traffic crosses the real TAP, the real bridge port and the real rules;
//! frames a malicious guest would send are written straight into the host TAP.
//!
//! [`https`] (feature `https`) is the HTTPS edge's harness, over a fake host.
#![allow(clippy::unwrap_used, dead_code)]

#[cfg(feature = "https")]
pub mod https;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmkit_core::{IpLease, NetAttachment, Network, VmId};
use vmkit_net::{BridgeConfig, BridgeNetwork, DnsForwarding};

/// How long a connection that should work may take; blocked ones take this long to fail.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// The host's address towards the upstream.
pub const HOST_UP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The upstream router.
pub const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// An "internet" address behind the upstream.
pub const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A resolver behind the upstream.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// A metadata service behind the upstream.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// A private network behind the upstream.
pub const PRIVATE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

/// Runs a command and returns its stdout; panics with its stderr on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that is deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("vmkt-{}-{n}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME nft ARGS`, as text.
    pub fn nft_text(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, "nft"];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME nft -j ARGS`, parsed.
    pub fn nft_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["netns", "exec", &self.name, "nft", "-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&run("ip", &all)).unwrap()
    }

    /// The tables in this namespace, as "family name".
    pub fn nft_tables(&self) -> Vec<String> {
        let doc = self.nft_json(&["list", "tables"]);
        doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("table"))
            .map(|t| {
                format!(
                    "{} {}",
                    t["family"].as_str().unwrap(),
                    t["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        let doc: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show"])).unwrap();
        doc.as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }

    /// `ip -d -j link show NAME`, parsed.
    pub fn link(&self, name: &str) -> serde_json::Value {
        let doc: serde_json::Value =
            serde_json::from_str(&self.ip(&["-d", "-j", "link", "show", name])).unwrap();
        doc[0].clone()
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = File::open(&path).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// Writes a `/proc/sys/net` value in this namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/net/{key}");
        let value = value.to_owned();
        self.enter(move || std::fs::write(&path, value).unwrap());
    }

    /// Reads a `/proc/sys/net` value in this namespace.
    pub fn read_sysctl(&self, key: &str) -> String {
        let path = format!("/proc/sys/net/{key}");
        self.enter(move || std::fs::read_to_string(&path).unwrap().trim().to_owned())
    }

    /// Whether a TCP connection to `addr` from this namespace succeeds in time.
    pub fn tcp_connects(&self, addr: SocketAddrV4) -> bool {
        self.enter(move || {
            TcpStream::connect_timeout(&SocketAddr::V4(addr), CONNECT_TIMEOUT).is_ok()
        })
    }

    /// A TCP listener on `addr`, made in this namespace.
    pub fn listen_tcp(&self, addr: SocketAddrV4) -> TcpListener {
        let l = self.enter(move || TcpListener::bind(addr).unwrap());
        l.set_nonblocking(true).unwrap();
        l
    }

    /// A UDP socket on `addr`, made in this namespace.
    pub fn bind_udp(&self, addr: SocketAddrV4) -> UdpSocket {
        let s = self.enter(move || UdpSocket::bind(addr).unwrap());
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s
    }

    /// Whether an ICMP echo to `dst` from this namespace is answered in time.
    pub fn pings(&self, dst: Ipv4Addr) -> bool {
        self.enter(move || ping(dst))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Namespaces that exist.
pub fn namespaces() -> Vec<String> {
    run("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The peer address of the first connection `listener` accepts within a timeout.
pub fn accepted_peer(listener: &TcpListener) -> Option<SocketAddr> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok((_, peer)) = listener.accept() {
            return Some(peer);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Datagrams that arrive on `socket` within `window`, as (payload, sender).
pub fn received(socket: &UdpSocket, window: Duration) -> Vec<(String, SocketAddr)> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            out.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
        }
    }
    out
}

fn ping(dst: Ipv4Addr) -> bool {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "ping socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a socket we own; File closes it on drop.
    let sock: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let echo = [8u8, 0, 0, 0, 0, 0, 0, 1, b'v', b'm', b'k'];
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `echo` and `addr` are valid for the given lengths.
    let sent = unsafe {
        libc::sendto(
            fd,
            echo.as_ptr() as *const libc::c_void,
            echo.len(),
            0,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = (&sock).read(&mut buf).unwrap_or(0);
    n >= 8 && buf[0] == 0
}

/// Opens the TAP `name` in the calling thread's namespace (creating it if missing,
/// not persistent), without packet info or virtio-net header.
fn open_tap(name: &str) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq on an open tun file.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut ifr as *mut libc::ifreq,
        )
    };
    assert!(
        rc >= 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Copies frames from `from` to `to` until `stop`.
fn pump(from: Arc<File>, to: Arc<File>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, bounded timeout.
        let ready = unsafe { libc::poll(&mut pfd, 1, 50) };
        if ready <= 0 {
            continue;
        }
        match (&*from).read(&mut buf) {
            Ok(n) if n > 0 => {
                let _ = (&*to).write(&buf[..n]);
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A host namespace with the backend set up in it, and an upstream namespace
/// behind a veth pair with "internet", resolver, metadata and private addresses.
///
/// Its bridge and uplink have names of their own (not the defaults `br-vmkit`,
/// `up0`), so a vmkit the operator runs on the same host neither confuses the
/// checks nor is touched by them.
pub struct Lab {
    pub net: BridgeNetwork,
    pub host: Netns,
    pub up: Netns,
    /// The bridge's name.
    pub bridge: String,
    /// The host end of the veth to the upstream namespace.
    pub uplink: String,
}

impl Lab {
    pub async fn new(dns: DnsForwarding) -> Self {
        let host = Netns::new("host");
        let up = Netns::new("up");
        // Interface names hold 15 bytes.
        let unique = format!(
            "{:05}{:03}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst) % 1000
        );
        let (bridge, uplink) = (format!("vkb{unique}"), format!("vku{unique}"));
        run(
            "ip",
            &[
                "link", "add", &uplink, "netns", &host.name, "type", "veth", "peer", "name",
                "eth0", "netns", &up.name,
            ],
        );
        host.ip(&["addr", "add", &format!("{HOST_UP}/24"), "dev", &uplink]);
        host.ip(&["link", "set", &uplink, "up"]);
        host.ip(&["route", "add", "default", "via", &UPSTREAM.to_string()]);
        up.ip(&["addr", "add", &format!("{UPSTREAM}/24"), "dev", "eth0"]);
        up.ip(&["link", "set", "eth0", "up"]);
        for a in [INTERNET, RESOLVER, METADATA, PRIVATE] {
            up.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        let net = BridgeNetwork::new(
            BridgeConfig::new()
                .netns(host.path())
                .bridge(bridge.clone())
                .dns(dns),
        )
        .unwrap();
        net.setup_host().await.unwrap();
        Self {
            net,
            host,
            up,
            bridge,
            uplink,
        }
    }

    /// A guest on the `n`th address of the pool, attached and wired up.
    pub async fn guest(&self, n: usize) -> Guest {
        let pool = self.net.pool();
        let vm = VmId::generate();
        let ip = pool.guest_addresses().nth(n).unwrap();
        let lease = IpLease::new(vm, ip, &pool);
        let att = self.net.attach(vm, &lease).await.unwrap();
        let tap_name = att.tap.clone();
        let host_tap = Arc::new(self.host.enter(move || open_tap(&tap_name)));

        let ns = Netns::new("guest");
        ns.sysctl("ipv6/conf/all/disable_ipv6", "1");
        ns.sysctl("ipv6/conf/default/disable_ipv6", "1");
        ns.sysctl("ipv4/ping_group_range", "0 0");
        let guest_tap = Arc::new(ns.enter(|| open_tap("eth0")));
        ns.ip(&["link", "set", "eth0", "address", &att.mac.to_string(), "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/{}", att.ip, att.prefix),
            "dev",
            "eth0",
        ]);
        ns.ip(&["route", "add", "default", "via", &att.gateway.to_string()]);

        let stop = Arc::new(AtomicBool::new(false));
        let pumps = vec![
            {
                let (f, t, s) = (host_tap.clone(), guest_tap.clone(), stop.clone());
                std::thread::spawn(move || pump(f, t, s))
            },
            {
                let (f, t, s) = (guest_tap.clone(), host_tap.clone(), stop.clone());
                std::thread::spawn(move || pump(f, t, s))
            },
        ];
        Guest {
            vm,
            att,
            host_tap,
            stop,
            pumps,
            ns,
        }
    }

    /// Stops bridged IPv4 from passing through the `inet` hooks (`br_netfilter`, if
    /// the kernel has it loaded), as on a host without that module, so that a
    /// bridge-level check tests the bridge alone.
    pub fn without_br_netfilter(&self) {
        let present = self
            .host
            .enter(|| std::path::Path::new("/proc/sys/net/bridge").exists());
        if present {
            self.host.sysctl("bridge/bridge-nf-call-iptables", "0");
        }
    }

    /// The bridge's MAC.
    pub fn bridge_mac(&self) -> [u8; 6] {
        let mac = self.host.link(&self.bridge)["address"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut out = [0u8; 6];
        for (o, part) in out.iter_mut().zip(mac.split(':')) {
            *o = u8::from_str_radix(part, 16).unwrap();
        }
        out
    }

    /// Drops everything and checks that nothing it made is left: its namespaces,
    /// and its bridge and uplink in the root namespace. Only this lab's names are
    /// looked for, so links of a vmkit the host runs do not count.
    pub fn finish(self) {
        let names = [self.host.name.clone(), self.up.name.clone()];
        let (bridge, uplink) = (self.bridge.clone(), self.uplink.clone());
        drop(self);
        let left = namespaces();
        for n in &names {
            assert!(!left.contains(n), "namespace {n} was left behind");
        }
        let root_links: Vec<String> =
            serde_json::from_str::<Vec<serde_json::Value>>(&run("ip", &["-j", "link", "show"]))
                .unwrap()
                .iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                .collect();
        assert!(
            !root_links.contains(&bridge),
            "bridge {bridge} leaked into the root namespace"
        );
        assert!(
            !root_links.contains(&uplink),
            "veth {uplink} leaked into the root namespace"
        );
    }
}

/// A guest: a namespace wired to its VM's host TAP.
pub struct Guest {
    pub vm: VmId,
    pub att: NetAttachment,
    host_tap: Arc<File>,
    stop: Arc<AtomicBool>,
    pumps: Vec<JoinHandle<()>>,
    pub ns: Netns,
}

impl Guest {
    /// Writes a raw frame into the host TAP, as a guest's NIC would.
    pub fn inject(&self, frame: &[u8]) {
        (&*self.host_tap).write_all(frame).unwrap();
    }

    /// Stops the wire and detaches the VM.
    pub async fn remove(mut self, net: &BridgeNetwork) {
        self.stop_pumps();
        net.detach(self.vm).await.unwrap();
    }

    fn stop_pumps(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop_pumps();
    }
}

/// An Ethernet frame carrying an IPv4/UDP datagram (UDP checksum left 0).
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The packet count of the rule with `comment` in `chain` of `family table`.
pub fn counter(ns: &Netns, family: &str, table: &str, chain: &str, comment: &str) -> u64 {
    let doc = ns.nft_json(&["list", "chain", family, table, chain]);
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["comment"].as_str() == Some(comment))
        .flat_map(|r| r["expr"].as_array().unwrap().iter())
        .filter_map(|e| e.get("counter"))
        .map(|c| c["packets"].as_u64().unwrap())
        .sum()
}
