#![allow(clippy::unwrap_used)]
//! Custom domains on the command surface: proof by TXT or CNAME, the instructions
//! when it is missing, who may attach and detach, routing, and cleanup with the VM.

use vmkit_core::testing::FakeHost;
use vmkit_core::testing::policy::{Scene, Who};
use vmkit_core::{
    Access, DeleteOptions, EventKind, Gateway, ManagerError, ProvenBy, RouteTarget, ShareWith,
    StateStore, StoreGateway, VmName,
};

fn name(n: &str) -> VmName {
    VmName::new(n).unwrap()
}

#[tokio::test]
async fn a_domain_is_attached_once_a_txt_record_proves_it_and_routes_to_the_vm() {
    let scene = Scene::new().await;
    let host = &scene.host;
    let owner = host.manager.commands(scene.caller(Who::Owner));
    let web = name("web");

    // Without a record: refused, with what to publish.
    let err = owner
        .add_domain(&web, "App.Example.com.")
        .await
        .unwrap_err();
    let ManagerError::DomainUnproven(proof) = &err else {
        panic!("unproven: {err:?}");
    };
    assert_eq!(err.code(), "domain_unproven");
    assert_eq!(proof.host, "app.example.com");
    assert_eq!(proof.txt_name, "_vmkit-challenge.app.example.com");
    assert_eq!(proof.cname_target, "web.vm.test");
    let message = err.to_string();
    assert!(message.contains(&proof.txt_value), "{message}");
    assert!(message.contains("CNAME to web.vm.test"), "{message}");
    assert_eq!(
        owner.domain_proof(&web, "app.example.com").await.unwrap(),
        **proof
    );
    assert!(
        host.store
            .get_domain("app.example.com")
            .await
            .unwrap()
            .is_none()
    );

    // Another user's proof value does not count.
    let stranger_proof = vmkit_core::DomainProof::new(
        FakeHost::DOMAIN,
        vmkit_core::UserId(5),
        "app.example.com",
        &web,
    );
    host.dns.add_txt(&proof.txt_name, &stranger_proof.txt_value);
    assert_eq!(
        owner
            .add_domain(&web, "app.example.com")
            .await
            .unwrap_err()
            .code(),
        "domain_unproven"
    );

    host.dns.add_txt(&proof.txt_name, &proof.txt_value);
    let added = owner.add_domain(&web, "app.example.com").await.unwrap();
    assert_eq!((added.host.as_str(), &added.vm), ("app.example.com", &web));
    // Again: the same, without asking DNS.
    host.dns.fail_with(Some("SERVFAIL"));
    assert_eq!(
        owner.add_domain(&web, "app.example.com").await.unwrap(),
        added
    );
    host.dns.fail_with(None);
    assert_eq!(owner.domains(None).await.unwrap(), vec![added.clone()]);
    assert_eq!(owner.domains(Some(&web)).await.unwrap(), vec![added]);

    let events = owner.events(None, 100).await;
    // Events are an admin's; the owner sees the domain on the VM instead.
    assert!(events.is_err());
    let admin = host.manager.commands(scene.caller(Who::Admin));
    let events = admin.events(None, 1000).await.unwrap();
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        EventKind::DomainAdded { host, proven_by: ProvenBy::Txt } if host == "app.example.com"
    )));

    // The gateway routes the host to the VM's default web port, with its shares.
    let gateway = StoreGateway::new(host.store.clone(), FakeHost::DOMAIN);
    let routed = gateway
        .route(RouteTarget::Http {
            host: "APP.example.com.",
            port: Some(443),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(routed.upstream.name, web);
    assert_eq!(routed.upstream.port, 80);
    assert!(matches!(
        gateway
            .route(RouteTarget::Http {
                host: "other.example.com",
                port: None
            })
            .await,
        Err(vmkit_core::GatewayError::UnknownHost(_))
    ));
}

#[tokio::test]
async fn a_cname_to_the_vm_proves_a_domain_and_bad_names_are_refused() {
    let scene = Scene::new().await;
    let host = &scene.host;
    let owner = host.manager.commands(scene.caller(Who::Owner));
    let web = name("web");
    host.dns.set_cname("www.example.org", "web.vm.test.");
    let added = owner.add_domain(&web, "www.example.org").await.unwrap();
    assert_eq!(added.host, "www.example.org");
    // A CNAME to another VM proves nothing for this one.
    host.dns.set_cname("blog.example.org", "other.vm.test");
    assert_eq!(
        owner
            .add_domain(&web, "blog.example.org")
            .await
            .unwrap_err()
            .code(),
        "domain_unproven"
    );
    for bad in [
        "localhost",
        "10.1.2.3",
        "*.example.org",
        "web.vm.test",
        "a b.org",
    ] {
        let err = owner.add_domain(&web, bad).await.unwrap_err();
        assert_eq!(err.code(), "invalid_request", "{bad}: {err}");
    }
    // A failing lookup is said as such, and retrying is suggested.
    host.dns.fail_with(Some("connection refused"));
    let err = owner
        .add_domain(&web, "docs.example.org")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "dns_lookup_failed");
    assert!(err.to_string().contains("try again"), "{err}");
}

#[tokio::test]
async fn only_the_owner_attaches_and_detaches_and_others_learn_nothing() {
    let scene = Scene::new().await;
    let host = &scene.host;
    let web = name("web");
    let owner = host.manager.commands(scene.caller(Who::Owner));
    let proof = owner.domain_proof(&web, "app.example.com").await.unwrap();
    host.dns.add_txt(&proof.txt_name, &proof.txt_value);

    // Sharees (even to manage) and strangers cannot attach.
    for who in [
        Who::HttpSharee,
        Who::ManageSharee,
        Who::Stranger,
        Who::Anonymous,
    ] {
        let c = host.manager.commands(scene.caller(who));
        assert!(
            c.add_domain(&web, "app.example.com").await.is_err(),
            "{who:?}"
        );
    }
    owner.add_domain(&web, "app.example.com").await.unwrap();

    // Nor detach, nor list: the domain is as if it did not exist.
    for who in [Who::HttpSharee, Who::Stranger] {
        let c = host.manager.commands(scene.caller(who));
        assert_eq!(
            c.remove_domain("app.example.com").await.unwrap_err().code(),
            "domain_not_found",
            "{who:?}"
        );
        assert!(
            c.domains(None).await.unwrap_or_default().is_empty(),
            "{who:?}"
        );
    }
    // Another user's VM cannot take it, even with a proof of their own.
    let stranger = host.manager.commands(scene.caller(Who::Stranger));
    stranger
        .create(
            vmkit_core::CreateRequest::new(vmkit_core::UserId(5), vmkit_core::VmSpec::new("tiny"))
                .name(name("theirs")),
        )
        .await
        .unwrap();
    let theirs = stranger
        .domain_proof(&name("theirs"), "app.example.com")
        .await
        .unwrap();
    host.dns.add_txt(&theirs.txt_name, &theirs.txt_value);
    assert_eq!(
        stranger
            .add_domain(&name("theirs"), "app.example.com")
            .await
            .unwrap_err()
            .code(),
        "domain_taken"
    );
    // An admin sees and detaches any.
    let admin = host.manager.commands(scene.caller(Who::Admin));
    assert_eq!(admin.domains(None).await.unwrap().len(), 1);
    admin.remove_domain("app.example.com").await.unwrap();
    assert!(owner.domains(None).await.unwrap().is_empty());
    assert_eq!(
        owner
            .remove_domain("app.example.com")
            .await
            .unwrap_err()
            .code(),
        "domain_not_found"
    );
    // Now free, the stranger's proof attaches it to their VM.
    stranger
        .add_domain(&name("theirs"), "app.example.com")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_domain_follows_its_vm_through_a_rename_moves_between_own_vms_and_goes_with_it() {
    let scene = Scene::new().await;
    let host = &scene.host;
    let owner = host.manager.commands(scene.caller(Who::Owner));
    let web = name("web");
    let proof = owner.domain_proof(&web, "app.example.com").await.unwrap();
    host.dns.add_txt(&proof.txt_name, &proof.txt_value);
    owner.add_domain(&web, "app.example.com").await.unwrap();
    owner
        .share(&web, ShareWith::Public, Access::Http)
        .await
        .unwrap();

    owner.rename(&web, name("site")).await.unwrap();
    let listed = owner.domains(None).await.unwrap();
    assert_eq!(listed[0].vm, name("site"));

    // The TXT proof is the user's: it moves the domain to their other VM.
    owner
        .create(
            vmkit_core::CreateRequest::new(
                vmkit_core::testing::policy::OWNER,
                vmkit_core::VmSpec::new("tiny"),
            )
            .name(name("next")),
        )
        .await
        .unwrap();
    owner
        .add_domain(&name("next"), "app.example.com")
        .await
        .unwrap();
    assert!(owner.domains(Some(&name("site"))).await.unwrap().is_empty());

    owner
        .delete(&name("next"), DeleteOptions::default())
        .await
        .unwrap();
    assert!(
        host.store
            .get_domain("app.example.com")
            .await
            .unwrap()
            .is_none()
    );
}
