//! [`DnsResolver`] against a real name server (dnsmasq on 127.0.0.1): TXT records
//! (one string and several), a CNAME, names without records, and a server that does
//! not answer.
#![cfg(feature = "dns")]
#![allow(clippy::unwrap_used)]

#[path = "support/dnsmasq.rs"]
mod dnsmasq;

use std::time::{Duration, Instant};

use dnsmasq::Dnsmasq;
use vmkit_core::testing::FakeDns;
use vmkit_core::{CustomDomains, DnsLookup, ProvenBy, UserId, VmName};
use vmkit_net::dns::DnsResolver;

#[tokio::test]
async fn txt_and_cname_records_are_read_from_a_real_name_server() {
    let server = Dnsmasq::start(&[
        "--txt-record=_vmkit-challenge.app.example.test,vmkit-verify=0123abcd".into(),
        "--txt-record=_vmkit-challenge.app.example.test,other".into(),
        "--txt-record=split.example.test,vmkit-,verify=x".into(),
        // Authoritative for example.test and vm.test: other names and types there
        // are answered empty, not refused.
        "--local=/example.test/".into(),
        "--local=/vm.test/".into(),
        "--host-record=web.vm.test,127.0.0.1".into(),
        "--cname=www.example.test,web.vm.test".into(),
    ]);
    let resolver =
        DnsResolver::with_servers(&[format!("127.0.0.1:{}", server.port).parse().unwrap()])
            .unwrap();

    let mut txt = resolver
        .txt("_vmkit-challenge.App.Example.test.")
        .await
        .unwrap();
    txt.sort();
    assert_eq!(txt, ["other", "vmkit-verify=0123abcd"]);
    assert_eq!(
        resolver.txt("split.example.test").await.unwrap(),
        ["vmkit-verify=x"],
        "a record's strings are joined"
    );
    assert_eq!(
        resolver.cname("www.example.test").await.unwrap(),
        ["web.vm.test"]
    );
    // Names without such records: empty answers, not errors.
    assert!(
        resolver
            .txt("nothing.example.test")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(resolver.cname("web.vm.test").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_proof_published_in_a_real_name_server_is_found() {
    let web = VmName::new("web").unwrap();
    let domains = CustomDomains::new("vm.test", std::sync::Arc::new(FakeDns::new()));
    let proof = domains.proof(UserId(7), "app.example.test", &web);
    let server = Dnsmasq::start(&[
        format!("--txt-record={},{}", proof.txt_name, proof.txt_value),
        "--host-record=web.vm.test,127.0.0.1".into(),
        "--cname=www.example.test,web.vm.test".into(),
        "--local=/example.test/".into(),
    ]);
    let resolver =
        DnsResolver::with_servers(&[format!("127.0.0.1:{}", server.port).parse().unwrap()])
            .unwrap();
    let real = CustomDomains::new("vm.test", std::sync::Arc::new(resolver));
    assert_eq!(real.verify(&proof).await.unwrap(), Some(ProvenBy::Txt));
    let by_cname = real.proof(UserId(7), "www.example.test", &web);
    assert_eq!(real.verify(&by_cname).await.unwrap(), Some(ProvenBy::Cname));
    let other_user = real.proof(UserId(8), "app.example.test", &web);
    assert_eq!(real.verify(&other_user).await.unwrap(), None);
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_an_error_within_seconds() {
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = DnsResolver::with_servers(&[silent.local_addr().unwrap()]).unwrap();
    let started = Instant::now();
    let err = resolver.txt("app.example.test").await.unwrap_err();
    assert!(err.0.contains("app.example.test"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(DnsResolver::with_servers(&[]).is_err());
}
