#![allow(clippy::unwrap_used)]
//! Twenty concurrent creates, then twenty concurrent deletes, through the API
//! socket, on the real QEMU backend with the tiny image and the bridge network
//! (inside a network namespace this test creates): no request fails, every VM gets
//! its own address, and afterwards nothing is left on the host.

mod support;

use std::collections::BTreeSet;
use std::time::Instant;

use support::host::check_host;
use support::netns::Netns;
use support::{Daemon, http};

const VMS: usize = 20;

/// Runs `request(i)` for `i < VMS`, each on its own thread, all at once; every
/// answer must have status `expect`. Returns the bodies in order.
fn all_at_once(
    d: &Daemon,
    expect: u16,
    request: impl Fn(usize) -> (&'static str, String, String) + Sync,
) -> Vec<String> {
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..VMS)
            .map(|i| {
                let (method, uri, body) = request(i);
                let socket = d.socket.clone();
                scope.spawn(move || (method, uri.clone(), http(&socket, method, &uri, &body)))
            })
            .collect();
        calls
            .into_iter()
            .map(|call| {
                let (method, uri, (status, body)) = call.join().unwrap();
                assert_eq!(status, expect, "{method} {uri}: {body}\n{}", d.log());
                body
            })
            .collect()
    })
}

#[test]
fn twenty_concurrent_creates_and_deletes_on_qemu_succeed_and_leave_nothing() {
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    support::link_tiny_image(tmp.path());
    let ns = Netns::new();
    let d = support::netns::qemu_daemon(
        &ns,
        tmp.path(),
        "10.79.0.0/24",
        &[
            // Twenty software-emulated guests boot at once on two cores.
            ("VMKIT_TIMEOUTS_BOOT_SECS", "600"),
            ("VMKIT_QUOTA_MAX_VMS", "100"),
            ("VMKIT_QUOTA_MAX_VCPUS", "100"),
            ("VMKIT_QUOTA_MAX_MEMORY_MIB", "100000"),
            // Each root disk counts its 10 GiB.
            ("VMKIT_QUOTA_MAX_DISK_GIB", "1000"),
        ],
    );

    let started = Instant::now();
    let bodies = all_at_once(&d, 201, |i| {
        (
            "POST",
            "/v1/vms".into(),
            format!(r#"{{"name":"par-{i}","memory_mib":256}}"#),
        )
    });
    eprintln!("{VMS} concurrent creates took {:?}", started.elapsed());
    let ips: BTreeSet<String> = bodies
        .iter()
        .map(|b| {
            let vm: serde_json::Value = serde_json::from_str(b).unwrap();
            assert_eq!(vm["state"], "running", "{b}");
            vm["resources"]["lease"]["ip"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ips.len(), VMS, "every VM has its own address");

    let started = Instant::now();
    all_at_once(&d, 204, |i| {
        ("DELETE", format!("/v1/vms/par-{i}"), String::new())
    });
    eprintln!("{VMS} concurrent deletes took {:?}", started.elapsed());
    let status = d.terminate();
    assert!(status.success());
    assert!(
        check_host(tmp.path(), &ns, "after the deletes").is_empty(),
        "no VM is left"
    );
}
