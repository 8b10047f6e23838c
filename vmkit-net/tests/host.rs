//! The bridge backend against the generic suite and its host-side contracts, run as
//! root inside network namespaces that each test makes and removes.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;

use common::{Lab, Netns, namespaces};
use vmkit_core::{IpLease, Network, NetworkError, VmId};
use vmkit_net::{BridgeConfig, BridgeNetwork, DnsForwarding};

fn backend_in(ns: &Netns) -> BridgeNetwork {
    BridgeNetwork::new(
        BridgeConfig::new()
            .netns(ns.path())
            .dns(DnsForwarding::Local),
    )
    .unwrap()
}

fn inet_rule_count(ns: &Netns) -> usize {
    let doc = ns.nft_json(&["list", "table", "inet", "vmkit"]);
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count()
}

#[tokio::test]
async fn generic_network_suite_passes_on_the_bridge_backend() {
    let host = Netns::new("suite");
    let net = backend_in(&host);

    vmkit_core::testing::suites::network_suite(&net).await;

    net.teardown_host().await.unwrap();
    assert_eq!(host.links(), vec!["lo".to_owned()]);
    assert!(host.nft_tables().is_empty(), "{:?}", host.nft_tables());
    let name = host.name.clone();
    drop(net);
    drop(host);
    assert!(!namespaces().contains(&name));
}

#[tokio::test]
async fn setup_is_idempotent_and_keeps_attached_vms_rules() {
    let host = Netns::new("idem");
    let net = backend_in(&host);
    net.setup_host().await.unwrap();
    let rules_after_first = inet_rule_count(&host);
    let vm = VmId::generate();
    let pool = net.pool();
    let lease = IpLease::new(vm, pool.guest_addresses().next().unwrap(), &pool);
    let att = net.attach(vm, &lease).await.unwrap();

    net.setup_host().await.unwrap();

    assert_eq!(
        inet_rule_count(&host),
        rules_after_first,
        "rules were duplicated"
    );
    let bridge = host.link("br-vmkit");
    let addrs_json: serde_json::Value =
        serde_json::from_str(&host.ip(&["-j", "addr", "show", "dev", "br-vmkit"])).unwrap();
    let addrs_shown: Vec<String> = addrs_json[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
        .collect();
    assert_eq!(
        addrs_shown,
        vec!["10.88.0.1/16".to_owned()],
        "only the gateway address, once"
    );
    assert!(
        bridge["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP")
    );
    assert_eq!(host.read_sysctl("ipv4/ip_forward"), "1");
    let postrouting = host.nft_text(&["list", "chain", "inet", "vmkit", "postrouting"]);
    assert!(
        postrouting.contains(r#"ip saddr 10.88.0.0/16 oifname != "br-vmkit" masquerade"#),
        "without a default route, egress is masqueraded out of any other interface: {postrouting}"
    );
    assert_eq!(host.read_sysctl("ipv6/conf/br-vmkit/disable_ipv6"), "1");
    let chains = host.nft_json(&["list", "chains", "netdev"]).to_string();
    assert!(
        chains.contains(&format!("vm_{vm}")),
        "setup removed the VM's chain"
    );
    assert!(host.links().contains(&att.tap));

    net.detach(vm).await.unwrap();
    net.teardown_host().await.unwrap();
    net.teardown_host().await.unwrap();
    assert_eq!(host.links(), vec!["lo".to_owned()]);
    assert!(host.nft_tables().is_empty());
}

#[tokio::test]
async fn setup_fails_on_a_subnet_collision_naming_the_route_and_changes_nothing() {
    let host = Netns::new("collide");
    host.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
    ]);
    host.ip(&["addr", "add", "10.88.3.1/24", "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    let net = backend_in(&host);

    let err = net.setup_host().await.unwrap_err();

    match &err {
        NetworkError::SubnetCollision { subnet, route } => {
            assert_eq!(subnet, "10.88.0.0/16");
            assert!(route.contains("10.88.3.0/24 dev lan0"), "{route}");
        }
        other => panic!("expected a subnet collision, got {other:?}"),
    }
    assert!(err.to_string().contains("10.88.3.0/24"), "{err}");
    assert!(!host.links().contains(&"br-vmkit".to_owned()));
    assert!(host.nft_tables().is_empty());
    let vm = VmId::generate();
    let lease = IpLease::new(vm, Ipv4Addr::new(10, 88, 0, 2), &net.pool());
    assert!(matches!(
        net.attach(vm, &lease).await,
        Err(NetworkError::NotSetUp)
    ));
}

#[tokio::test]
async fn a_subnet_elsewhere_does_not_collide() {
    let host = Netns::new("nocollide");
    host.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
    ]);
    host.ip(&["addr", "add", "10.89.0.1/16", "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    assert!(
        host.ip(&["route", "show"])
            .contains("10.89.0.0/16 dev lan0")
    );
    let net = backend_in(&host);

    net.setup_host().await.unwrap();

    assert!(host.links().contains(&"br-vmkit".to_owned()));
}

#[tokio::test]
async fn attach_makes_an_isolated_persistent_tap_owned_by_the_hypervisor_user() {
    let host = Netns::new("attach");
    let net = BridgeNetwork::new(
        BridgeConfig::new()
            .netns(host.path())
            .dns(DnsForwarding::Local)
            .tap_owner(4242),
    )
    .unwrap();
    net.setup_host().await.unwrap();
    let pool = net.pool();
    let vm = VmId::generate();
    let lease = IpLease::new(vm, pool.guest_addresses().nth(5).unwrap(), &pool);

    let att = net.attach(vm, &lease).await.unwrap();

    assert_eq!(att.tap, vmkit_net::tap_name(vm));
    assert_eq!(att.dns, vec![Ipv4Addr::new(10, 88, 0, 1)]);
    let tap = host.link(&att.tap);
    assert_eq!(tap["master"], "br-vmkit");
    assert_eq!(tap["linkinfo"]["info_kind"], "tun");
    let tun = &tap["linkinfo"]["info_data"];
    assert_eq!(tun["type"], "tap");
    assert_eq!(tun["persist"], true);
    assert_eq!(tun["vnet_hdr"], true);
    assert_eq!(tun["multi_queue"], false);
    assert_eq!(tun["user"].to_string().trim_matches('"'), "4242");
    assert_eq!(tap["linkinfo"]["info_slave_data"]["isolated"], true);
    assert!(tap["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert_eq!(tap["ifalias"], format!("vmkit vm {vm} {}", lease.ip));
    assert_eq!(
        host.read_sysctl(&format!("ipv6/conf/{}/disable_ipv6", att.tap)),
        "1"
    );
    assert_eq!(net.list().await.unwrap(), vec![vm]);

    net.detach(vm).await.unwrap();

    assert!(!host.links().contains(&att.tap));
    let chains = host.nft_json(&["list", "chains", "netdev"]).to_string();
    assert!(!chains.contains(&format!("vm_{vm}")), "{chains}");
    assert!(net.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn attach_refuses_a_lease_of_another_vm_and_links_that_are_not_taps() {
    let host = Netns::new("refuse");
    let net = backend_in(&host);
    net.setup_host().await.unwrap();
    let pool = net.pool();
    let (a, b) = (VmId::generate(), VmId::generate());
    let lease_of_b = IpLease::new(b, pool.guest_addresses().next().unwrap(), &pool);
    host.ip(&[
        "link",
        "add",
        &vmkit_net::tap_name(a),
        "type",
        "veth",
        "peer",
        "name",
        "peer0",
    ]);
    let lease_of_a = IpLease::new(a, pool.guest_addresses().nth(1).unwrap(), &pool);

    let wrong_owner = net.attach(a, &lease_of_b).await;
    let not_a_tap = net.attach(a, &lease_of_a).await;
    let gateway = IpLease::new(a, pool.host_address(), &pool);
    let on_gateway = net.attach(a, &gateway).await;

    assert!(
        wrong_owner
            .unwrap_err()
            .to_string()
            .contains("belongs to VM")
    );
    assert!(not_a_tap.unwrap_err().to_string().contains("is not a TAP"));
    assert!(matches!(on_gateway, Err(NetworkError::ForeignLease(_))));
    net.detach(a).await.unwrap();
    assert!(
        host.links().contains(&vmkit_net::tap_name(a)),
        "detach deleted a link that is not a TAP"
    );
}

#[tokio::test]
async fn setup_and_teardown_leave_other_tables_alone() {
    let host = Netns::new("others");
    host.nft_text(&["add", "table", "inet", "someone"]);
    host.nft_text(&[
        "add",
        "chain",
        "inet",
        "someone",
        "input",
        "{ type filter hook input priority 0; }",
    ]);
    host.nft_text(&[
        "add", "rule", "inet", "someone", "input", "tcp", "dport", "22", "accept",
    ]);
    let before = host.nft_text(&["list", "table", "inet", "someone"]);
    let net = backend_in(&host);

    net.setup_host().await.unwrap();
    net.setup_host().await.unwrap();
    let during = host.nft_text(&["list", "table", "inet", "someone"]);
    net.teardown_host().await.unwrap();

    assert_eq!(during, before);
    assert_eq!(host.nft_text(&["list", "table", "inet", "someone"]), before);
    assert_eq!(host.nft_tables(), vec!["inet someone".to_owned()]);
}

#[tokio::test]
async fn a_missing_namespace_is_an_io_error() {
    let err =
        BridgeNetwork::new(BridgeConfig::new().netns("/run/netns/vmkit-no-such-ns")).unwrap_err();

    assert!(matches!(err, NetworkError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/run/netns/vmkit-no-such-ns"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_config_is_refused_before_touching_the_host() {
    let too_long = BridgeNetwork::new(BridgeConfig::new().bridge("br-vmkit-too-long"));
    let bad_table = BridgeNetwork::new(BridgeConfig::new().table("vm kit"));

    assert!(
        too_long
            .unwrap_err()
            .to_string()
            .contains("not a valid interface name")
    );
    assert!(
        bad_table
            .unwrap_err()
            .to_string()
            .contains("not a valid nftables table name")
    );
}

#[tokio::test]
async fn lab_topology_cleans_up_after_itself() {
    let lab = Lab::new(DnsForwarding::Local).await;
    assert!(lab.host.links().contains(&lab.uplink));
    assert!(lab.host.links().contains(&lab.bridge));
    lab.finish();
}

/// A vmkit the operator runs on this host (its bridge and table in the root
/// namespace) does not confuse the lab's checks, and the lab does not touch it.
#[tokio::test]
async fn a_host_vmkit_in_the_root_namespace_leaves_the_lab_checks_alone() {
    let theirs = format!("br-vmkit{}", std::process::id() % 10_000);
    common::run("ip", &["link", "add", &theirs, "type", "bridge"]);
    let lab = Lab::new(DnsForwarding::Local).await;
    lab.finish();
    let still_there = common::run("ip", &["-j", "link", "show", "dev", &theirs]);
    common::run("ip", &["link", "del", &theirs]);
    assert!(still_there.contains(&theirs));
}
