#![allow(clippy::unwrap_used)]
//! Two real VMs on the bridge network, with the daemon (and so its QEMUs, TAPs,
//! bridge and nftables rules) inside a network namespace this test creates, which
//! stands in for the host. Every check is made from inside the guests through the
//! agent. Traffic stays inside the namespace.

mod support;

use std::path::Path;

use support::netns::Netns;
use support::{Daemon, json, stderr, stdout};

const SUBNET: &str = "10.77.0.0/24";
const GATEWAY: &str = "10.77.0.1";

fn start(ns: &Netns, dir: &Path) -> Daemon {
    support::netns::qemu_daemon(ns, dir, SUBNET, &[])
}

/// Runs `sh -c script` in `vm` and returns its exit code.
fn sh(d: &Daemon, vm: &str, script: &str) -> i32 {
    let out = d.cli(&[
        "vm",
        "exec",
        vm,
        "--timeout",
        "20",
        "--",
        "sh",
        "-c",
        script,
    ]);
    out.status.code().unwrap()
}

#[test]
fn guests_reach_their_gateway_but_not_each_other_nor_host_ports_and_leases_survive_a_restart() {
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    support::link_tiny_image(tmp.path());
    let mut ns = Netns::new();
    // DNS on the gateway is allowed (the control); any other host port is not.
    ns.listen(53);
    ns.listen(18080);

    let d = start(&ns, tmp.path());
    let a = d.cli(&["--json", "vm", "create", "net-a", "--memory", "256"]);
    assert!(a.status.success(), "{}\n{}", stderr(&a), d.log());
    let b = d.cli(&["--json", "vm", "create", "net-b", "--memory", "256"]);
    assert!(b.status.success(), "{}\n{}", stderr(&b), d.log());
    let a_ip = json(&a)["resources"]["lease"]["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    let b_ip = json(&b)["resources"]["lease"]["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(a_ip, b_ip);

    // The agent configured the guest's side: its address is on its interface.
    let out = d.cli(&["vm", "exec", "net-a", "--", "ip", "-4", "addr"]);
    assert!(
        stdout(&out).contains(&format!("{a_ip}/24")),
        "{}",
        stdout(&out)
    );

    for vm in ["net-a", "net-b"] {
        assert_eq!(
            sh(&d, vm, &format!("ping -c 1 -W 5 {GATEWAY}")),
            0,
            "{vm} pings its gateway"
        );
        assert_eq!(
            sh(&d, vm, &format!("nc -w 5 {GATEWAY} 53 </dev/null")),
            0,
            "{vm} reaches DNS on its gateway"
        );
        assert_ne!(
            sh(&d, vm, &format!("nc -w 3 {GATEWAY} 18080 </dev/null")),
            0,
            "{vm} must not reach another host port"
        );
        assert_ne!(
            sh(&d, vm, "nc -w 3 169.254.169.254 80 </dev/null"),
            0,
            "{vm} must not reach the metadata address"
        );
    }
    assert_ne!(
        sh(&d, "net-a", &format!("ping -c 1 -W 3 {b_ip}")),
        0,
        "a must not reach b"
    );
    assert_ne!(
        sh(&d, "net-b", &format!("ping -c 1 -W 3 {a_ip}")),
        0,
        "b must not reach a"
    );

    // Leases are in the state file: a restarted daemon keeps them and never hands one
    // out twice.
    assert!(d.terminate().success());
    let d = start(&ns, tmp.path());
    let out = d.cli(&["--json", "vm", "show", "net-a"]);
    assert_eq!(json(&out)["resources"]["lease"]["ip"], a_ip.as_str());
    assert_eq!(sh(&d, "net-a", &format!("ping -c 1 -W 5 {GATEWAY}")), 0);
    let c = d.cli(&["--json", "vm", "create", "net-c", "--memory", "256"]);
    assert!(c.status.success(), "{}\n{}", stderr(&c), d.log());
    let c_ip = json(&c)["resources"]["lease"]["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(c_ip != a_ip && c_ip != b_ip, "{c_ip} was handed out twice");

    for vm in ["net-a", "net-b", "net-c"] {
        let out = d.cli(&["vm", "rm", vm]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let links = ns.ip(&["-o", "link", "show"]);
    assert!(
        !links.lines().any(|l| l.contains(": vm")),
        "no TAP is left: {links}"
    );
    drop(d);
}
