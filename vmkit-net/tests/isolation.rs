//! What a guest can and cannot reach, with real traffic between network namespaces:
//! a host namespace running the backend, an upstream namespace standing in for the
//! internet, and guest namespaces wired to the backend's TAPs (see `common`).
//! Every negative check has a positive control, so a check cannot pass only because
//! nothing was listening.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::{
    HOST_UP, INTERNET, Lab, METADATA, PRIVATE, RESOLVER, accepted_peer, counter, received,
    udp_frame,
};
use vmkit_core::Network;
use vmkit_net::DnsForwarding;

fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[tokio::test]
async fn guest_pings_its_gateway_and_reaches_dns_there_but_no_other_gateway_port() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let guest = lab.guest(0).await;
    let gw = guest.att.gateway;
    let _dns = lab.host.listen_tcp(at(gw, 53));
    let _api = lab.host.listen_tcp(at(gw, 8080));
    let dns_udp = lab.host.bind_udp(at(gw, 53));

    let pings = guest.ns.pings(gw);
    let dns_tcp = guest.ns.tcp_connects(at(gw, 53));
    guest.ns.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"query", at(gw, 53)).unwrap();
    });
    let dns_datagrams = received(&dns_udp, Duration::from_millis(500));
    let other_port = guest.ns.tcp_connects(at(gw, 8080));

    assert!(pings, "the gateway does not answer ping");
    assert!(dns_tcp, "TCP 53 on the gateway is unreachable");
    assert_eq!(
        dns_datagrams.len(),
        1,
        "UDP 53 on the gateway is unreachable"
    );
    assert_eq!(dns_datagrams[0].0, "query");
    assert!(!other_port, "a guest reached port 8080 on its gateway");
    assert!(
        lab.host.tcp_connects(at(gw, 8080)),
        "control: the host reaches its own port"
    );
    guest.remove(&lab.net).await;
    lab.finish();
}

#[tokio::test]
async fn guest_reaches_the_internet_masqueraded_behind_the_host_address() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let guest = lab.guest(0).await;
    let web = lab.up.listen_tcp(at(INTERNET, 80));

    let connected = guest.ns.tcp_connects(at(INTERNET, 80));
    let peer = accepted_peer(&web);

    assert!(connected, "a guest cannot reach the internet");
    assert_eq!(
        peer.map(|p| p.ip()),
        Some(HOST_UP.into()),
        "not masqueraded"
    );
    guest.remove(&lab.net).await;
    lab.finish();
}

#[tokio::test]
async fn dns_to_the_gateway_is_forwarded_to_the_configured_resolver() {
    let lab = Lab::new(DnsForwarding::To(RESOLVER)).await;
    let guest = lab.guest(0).await;
    let gw = guest.att.gateway;
    let resolver_tcp = lab.up.listen_tcp(at(RESOLVER, 53));
    let resolver_udp = lab.up.bind_udp(at(RESOLVER, 53));
    resolver_udp
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let answer = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = resolver_udp.recv_from(&mut buf).ok()?;
        resolver_udp.send_to(b"answer", from).unwrap();
        Some((buf[..n].to_vec(), from))
    });

    let tcp = guest.ns.tcp_connects(at(gw, 53));
    let reply = guest.ns.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s.connect(at(gw, 53)).unwrap();
        s.send(b"query").unwrap();
        let mut buf = [0u8; 64];
        s.recv(&mut buf)
            .map(|n| buf[..n].to_vec())
            .unwrap_or_default()
    });
    let queries = answer.join().unwrap();

    assert!(tcp, "TCP DNS to the gateway was not forwarded");
    assert_eq!(
        accepted_peer(&resolver_tcp).map(|p| p.ip()),
        Some(HOST_UP.into())
    );
    let (query, from) = queries.expect("UDP DNS to the gateway was not forwarded");
    assert_eq!(
        (query.as_slice(), from.ip()),
        (&b"query"[..], HOST_UP.into())
    );
    assert_eq!(
        reply, b"answer",
        "the answer did not come back from the gateway"
    );
    guest.remove(&lab.net).await;
    lab.finish();
}

#[tokio::test]
async fn guest_cannot_reach_another_guest_directly_or_through_the_gateway() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let a = lab.guest(0).await;
    let b = lab.guest(1).await;
    let _service = a.ns.listen_tcp(at(a.att.ip, 8080));
    // On the bridge, only port isolation stands between guests (br_netfilter
    // would add the forward rules as a second wall); test it alone.
    lab.without_br_netfilter();

    let direct = b.ns.tcp_connects(at(a.att.ip, 8080));
    b.ns.ip(&[
        "route",
        "add",
        &format!("{}/32", a.att.ip),
        "via",
        &b.att.gateway.to_string(),
    ]);
    let routed = b.ns.tcp_connects(at(a.att.ip, 8080));

    assert!(!direct, "a guest reached another guest on the bridge");
    assert!(!routed, "a guest reached another guest through the gateway");
    assert!(
        lab.host.tcp_connects(at(a.att.ip, 8080)),
        "control: the host reaches the guest"
    );
    assert!(
        counter(
            &lab.host,
            "inet",
            "vmkit",
            "guest_out",
            "another guest through the gateway"
        ) > 0,
        "the routed attempt was not dropped by the rule meant for it"
    );
    a.remove(&lab.net).await;
    b.remove(&lab.net).await;
    lab.finish();
}

#[tokio::test]
async fn guest_cannot_reach_the_hosts_other_addresses() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let guest = lab.guest(0).await;
    let _api = lab.host.listen_tcp(at(HOST_UP, 8080));
    let _ssh = lab.host.listen_tcp(at(HOST_UP, 22));

    let api = guest.ns.tcp_connects(at(HOST_UP, 8080));
    let ssh = guest.ns.tcp_connects(at(HOST_UP, 22));
    let ping = guest.ns.pings(HOST_UP);

    assert!(
        !api && !ssh,
        "a guest reached a port on the host's other address"
    );
    assert!(!ping, "a guest pinged the host's other address");
    assert!(
        lab.up.tcp_connects(at(HOST_UP, 8080)),
        "control: the listener is reachable"
    );
    guest.remove(&lab.net).await;
    lab.finish();
}

#[tokio::test]
async fn guest_cannot_reach_metadata_or_private_networks_beyond_the_host() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let guest = lab.guest(0).await;
    let _metadata = lab.up.listen_tcp(at(METADATA, 80));
    let _private = lab.up.listen_tcp(at(PRIVATE, 80));

    let metadata = guest.ns.tcp_connects(at(METADATA, 80));
    let private = guest.ns.tcp_connects(at(PRIVATE, 80));

    assert!(!metadata, "a guest reached 169.254.169.254");
    assert!(!private, "a guest reached a private network");
    assert!(
        lab.host.tcp_connects(at(METADATA, 80)),
        "control: the host reaches metadata"
    );
    assert!(
        lab.host.tcp_connects(at(PRIVATE, 80)),
        "control: the host reaches the private net"
    );
    assert!(
        counter(
            &lab.host,
            "inet",
            "vmkit",
            "guest_out",
            "link-local and metadata addresses"
        ) > 0
    );
    assert!(
        counter(
            &lab.host,
            "inet",
            "vmkit",
            "guest_out",
            "blocked destinations"
        ) > 0
    );
    guest.remove(&lab.net).await;
    lab.finish();
}

#[tokio::test]
async fn frames_with_a_spoofed_source_mac_or_ip_are_dropped_at_the_tap() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let guest = lab.guest(0).await;
    let gw = guest.att.gateway;
    let receiver = lab.host.bind_udp(at(gw, 53));
    let bridge = lab.bridge_mac();
    let mac = guest.att.mac.0;
    let own = at(guest.att.ip, 40000);
    let other_ip = at(Ipv4Addr::new(10, 88, 0, 99), 40000);
    let other_mac = [0x52, 0x54, 0x00, 0x99, 0x99, 0x99];
    let chain = format!("vm_{}", guest.vm);

    guest.inject(&udp_frame(bridge, mac, own, at(gw, 53), b"genuine"));
    guest.inject(&udp_frame(bridge, mac, other_ip, at(gw, 53), b"spoofed-ip"));
    guest.inject(&udp_frame(
        bridge,
        other_mac,
        own,
        at(gw, 53),
        b"spoofed-mac",
    ));
    let got: Vec<String> = received(&receiver, Duration::from_millis(700))
        .into_iter()
        .map(|(payload, _)| payload)
        .collect();

    assert_eq!(
        got,
        vec!["genuine".to_owned()],
        "spoofed frames got through"
    );
    assert!(counter(&lab.host, "netdev", "vmkit", &chain, "spoofed source MAC") >= 1);
    assert!(
        counter(
            &lab.host,
            "netdev",
            "vmkit",
            &chain,
            "spoofed source IP or another protocol"
        ) >= 1
    );
    guest.remove(&lab.net).await;
    lab.finish();
}

#[tokio::test]
async fn detach_removes_the_tap_and_its_rules_and_the_guest_goes_offline() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let guest = lab.guest(0).await;
    let gw = guest.att.gateway;
    let tap = guest.att.tap.clone();
    let vm = guest.vm;
    assert!(guest.ns.pings(gw), "control: the guest is online");

    lab.net.detach(vm).await.unwrap();

    assert!(!lab.host.links().contains(&tap));
    assert!(
        !lab.host
            .nft_json(&["list", "chains", "netdev"])
            .to_string()
            .contains(&format!("vm_{vm}"))
    );
    assert!(
        !guest.ns.pings(gw),
        "the guest is still online after detach"
    );
    assert!(lab.net.list().await.unwrap().is_empty());
    lab.net.detach(vm).await.unwrap();
    drop(guest);
    lab.finish();
}

#[tokio::test]
async fn nothing_from_upstream_reaches_a_guest_unsolicited() {
    let lab = Lab::new(DnsForwarding::Local).await;
    let guest = lab.guest(0).await;
    let _service = guest.ns.listen_tcp(at(guest.att.ip, 8080));
    lab.up
        .ip(&["route", "add", "10.88.0.0/16", "via", &HOST_UP.to_string()]);

    let from_upstream = lab.up.tcp_connects(at(guest.att.ip, 8080));

    assert!(!from_upstream, "the upstream reached a guest directly");
    assert!(counter(&lab.host, "inet", "vmkit", "guest_in", "unsolicited") > 0);
    assert!(
        lab.host.tcp_connects(at(guest.att.ip, 8080)),
        "control: the host reaches it"
    );
    guest.remove(&lab.net).await;
    lab.finish();
}
