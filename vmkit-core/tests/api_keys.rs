#![allow(clippy::unwrap_used)]
//! API keys on the in-memory fakes: made by a person, shown once, identified by the
//! gateway, and held to their limits (read-only, one VM, expiry, revocation) by the
//! policy every door shares.

use std::time::Duration;

use vmkit_core::testing::FakeHost;
use vmkit_core::testing::suites::key;
use vmkit_core::{
    Action, ApiKeyScope, Caller, CreateRequest, Credential, Denied, Door, Gateway, Handle,
    ManagerError, NewUser, Role, StateStore, StoreGateway, Timestamp, TokenHash, User, VmName,
    VmSpec,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

struct Fixture {
    host: FakeHost,
    gateway: StoreGateway,
    alice: User,
}

/// A host where alice (SSH key 1) owns the running VMs `web` and `db`, and bob
/// (key 2, an admin) owns `other`.
async fn fixture() -> Fixture {
    let host = FakeHost::new().await;
    let alice = host
        .manager
        .add_user(NewUser::new(Handle::new("alice").unwrap()).ssh_key(key(1)))
        .await
        .unwrap();
    let bob = host
        .manager
        .add_user(
            NewUser::new(Handle::new("bob").unwrap())
                .ssh_key(key(2))
                .role(Role::Admin),
        )
        .await
        .unwrap();
    for (owner, vm) in [(alice.id, "web"), (alice.id, "db"), (bob.id, "other")] {
        host.manager
            .create(CreateRequest::new(owner, VmSpec::new("tiny").disk_gib(1)).name(name(vm)))
            .await
            .unwrap();
    }
    let gateway = StoreGateway::new(host.store.clone(), FakeHost::DOMAIN);
    Fixture {
        host,
        gateway,
        alice,
    }
}

impl Fixture {
    /// Alice as a person at the SSH door.
    fn person(&self) -> Caller {
        Caller::user(&self.alice, Door::Ssh)
    }

    /// A key alice makes; its secret.
    async fn new_key(&self, scope: ApiKeyScope, vm: Option<&str>) -> String {
        let vm = vm.map(name);
        let view = self
            .host
            .manager
            .commands(self.person())
            .create_api_key("ci", None, scope, vm.as_ref())
            .await
            .unwrap();
        view.secret.unwrap()
    }

    async fn identify(&self, secret: &str) -> Option<Caller> {
        self.gateway
            .identify(Credential::ApiKey(secret), Door::Https)
            .await
            .unwrap()
    }

    async fn key_caller(&self, secret: &str) -> Caller {
        self.identify(secret).await.expect("the key identifies")
    }
}

fn key_limited(result: Result<impl std::fmt::Debug, ManagerError>) -> &'static str {
    match result {
        Err(ManagerError::Denied(Denied::KeyLimited { why, .. })) => why,
        other => panic!("expected a key's limit, got {other:?}"),
    }
}

fn not_found(result: Result<impl std::fmt::Debug, ManagerError>) {
    assert!(
        matches!(result, Err(ManagerError::NotFound(_))),
        "expected not found, got {result:?}"
    );
}

#[tokio::test]
async fn a_key_is_shown_once_stored_salted_and_never_listed_with_its_secret() {
    let fx = fixture().await;
    let commands = fx.host.manager.commands(fx.person());

    let made = commands
        .create_api_key(
            "deploy",
            Some(Duration::from_secs(3600)),
            ApiKeyScope::ReadOnly,
            Some(&name("web")),
        )
        .await
        .unwrap();

    let secret = made.secret.clone().unwrap();
    assert!(secret.starts_with(&format!("vmk_{}_", made.id)), "{secret}");
    assert_eq!(made.label, "deploy");
    assert_eq!(made.scope, ApiKeyScope::ReadOnly);
    assert_eq!(made.vm.as_deref(), Some("web"));
    assert!(made.expires_at.is_some() && !made.expired);
    let listed = commands.api_keys().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].secret, None, "the secret is shown once");
    assert_eq!(listed[0].id, made.id);
    let stored = fx.host.store.get_api_key(&made.id).await.unwrap().unwrap();
    assert_ne!(stored.hash, TokenHash::of(&secret), "the hash is salted");
    assert!(stored.verify(&secret));
}

#[tokio::test]
async fn a_revoked_key_stops_identifying_at_once_even_for_a_caller_already_identified() {
    let fx = fixture().await;
    let secret = fx.new_key(ApiKeyScope::Full, None).await;
    let caller = fx.key_caller(&secret).await;
    let already = fx.host.manager.commands(caller);
    assert_eq!(already.list().await.unwrap().len(), 2);
    let id = fx
        .host
        .manager
        .commands(fx.person())
        .api_keys()
        .await
        .unwrap()[0]
        .id
        .clone();

    fx.host
        .manager
        .commands(fx.person())
        .revoke_api_key(&id)
        .await
        .unwrap();

    assert!(fx.identify(&secret).await.is_none());
    assert!(matches!(
        already.list().await,
        Err(ManagerError::Denied(Denied::SignInRequired { .. }))
    ));
    assert!(matches!(
        fx.host
            .manager
            .commands(fx.person())
            .revoke_api_key(&id)
            .await,
        Err(ManagerError::ApiKeyNotFound(_))
    ));
}

#[tokio::test]
async fn an_expired_key_identifies_nobody() {
    let fx = fixture().await;
    let made = fx
        .host
        .manager
        .commands(fx.person())
        .create_api_key("old", Some(Duration::ZERO), ApiKeyScope::Full, None)
        .await
        .unwrap();

    assert!(made.expired);
    assert!(fx.identify(&made.secret.unwrap()).await.is_none());
}

#[tokio::test]
async fn a_keys_use_is_recorded_at_most_once_a_minute_and_a_failed_record_fails_nothing() {
    let fx = fixture().await;
    let secret = fx.new_key(ApiKeyScope::Full, None).await;
    let id = fx
        .host
        .manager
        .commands(fx.person())
        .api_keys()
        .await
        .unwrap()[0]
        .id
        .clone();
    let last_used = async || {
        fx.host
            .store
            .get_api_key(&id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at
    };
    assert_eq!(last_used().await, None);

    fx.key_caller(&secret).await;
    let first = last_used().await.expect("the first use is recorded");
    fx.host
        .store
        .record_api_key_use(&id, Timestamp(first.0 - 1_000))
        .await
        .unwrap();
    fx.key_caller(&secret).await;
    assert_eq!(
        last_used().await,
        Some(Timestamp(first.0 - 1_000)),
        "a use within the minute is not written"
    );

    fx.host
        .store
        .record_api_key_use(&id, Timestamp(first.0 - 120_000))
        .await
        .unwrap();
    fx.host.faults.fail_at(fx.host.faults.calls() + 1);
    assert!(
        fx.identify(&secret).await.is_some(),
        "the key identifies though its use could not be written"
    );
}

#[tokio::test]
async fn a_read_only_key_reads_but_does_not_act() {
    let fx = fixture().await;
    let secret = fx.new_key(ApiKeyScope::ReadOnly, None).await;
    let keyed = fx.host.manager.commands(fx.key_caller(&secret).await);

    assert_eq!(keyed.list().await.unwrap().len(), 2);
    keyed.get(&name("web")).await.unwrap();
    keyed.shares(&name("web")).await.unwrap();
    keyed.images().await.unwrap();
    keyed.ssh_keys().await.unwrap();
    let whoami = keyed.whoami().await.unwrap();
    assert_eq!(whoami.api_key.unwrap().scope, ApiKeyScope::ReadOnly);

    assert_eq!(
        key_limited(keyed.stop(&name("web")).await),
        "it is read-only"
    );
    assert_eq!(
        key_limited(keyed.delete(&name("web"), Default::default()).await),
        "it is read-only"
    );
    assert_eq!(
        key_limited(
            keyed
                .create(CreateRequest::new(fx.alice.id, VmSpec::new("tiny")).name(name("fresh")))
                .await
        ),
        "it is read-only"
    );
    assert_eq!(
        key_limited(keyed.add_ssh_key(&key(9)).await),
        "it is read-only"
    );
    not_found(keyed.stop(&name("other")).await);
}

#[tokio::test]
async fn a_key_limited_to_one_vm_sees_and_acts_on_that_vm_only() {
    let fx = fixture().await;
    let secret = fx.new_key(ApiKeyScope::Full, Some("web")).await;
    let keyed = fx.host.manager.commands(fx.key_caller(&secret).await);

    let listed: Vec<String> = keyed
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    assert_eq!(listed, ["web"]);
    keyed.stop(&name("web")).await.unwrap();
    not_found(keyed.get(&name("db")).await);
    not_found(keyed.stop(&name("db")).await);
    not_found(keyed.shares(&name("db")).await);
    let why = key_limited(
        keyed
            .create(CreateRequest::new(fx.alice.id, VmSpec::new("tiny")).name(name("fresh")))
            .await,
    );
    assert_eq!(why, "it is limited to one VM");
    key_limited(keyed.snapshots().await);
    key_limited(keyed.add_ssh_key(&key(9)).await);
}

#[tokio::test]
async fn a_key_limited_to_one_vm_lists_that_vms_custom_domains_only() {
    let fx = fixture().await;
    let person = fx.host.manager.commands(fx.person());
    for (vm, host) in [("web", "web.example.com"), ("db", "db.example.com")] {
        let proof = person.domain_proof(&name(vm), host).await.unwrap();
        fx.host.dns.add_txt(&proof.txt_name, &proof.txt_value);
        person.add_domain(&name(vm), host).await.unwrap();
    }
    let secret = fx.new_key(ApiKeyScope::ReadOnly, Some("web")).await;
    let keyed = fx.host.manager.commands(fx.key_caller(&secret).await);

    let hosts: Vec<String> = keyed
        .domains(None)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.host)
        .collect();

    assert_eq!(hosts, ["web.example.com"]);
    assert_eq!(keyed.domains(Some(&name("web"))).await.unwrap().len(), 1);
    not_found(keyed.domains(Some(&name("db"))).await);
    assert_eq!(person.domains(None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_admins_key_limited_to_one_vm_does_not_see_the_others_vms() {
    let fx = fixture().await;
    let bob = fx
        .host
        .manager
        .user(&Handle::new("bob").unwrap())
        .await
        .unwrap();
    let made = fx
        .host
        .manager
        .commands(Caller::user(&bob, Door::Ssh))
        .create_api_key("", None, ApiKeyScope::Full, Some(&name("other")))
        .await
        .unwrap();
    let keyed = fx
        .host
        .manager
        .commands(fx.key_caller(&made.secret.unwrap()).await);

    assert_eq!(keyed.list().await.unwrap().len(), 1);
    not_found(keyed.get(&name("web")).await);
    key_limited(keyed.users().await);
}

#[tokio::test]
async fn a_key_cannot_make_or_revoke_keys_nor_sign_a_browser_in() {
    let fx = fixture().await;
    let secret = fx.new_key(ApiKeyScope::Full, None).await;
    let keyed = fx.host.manager.commands(fx.key_caller(&secret).await);

    let refused = keyed
        .create_api_key("more", None, ApiKeyScope::Full, None)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("by a person signed in"),
        "{refused}"
    );
    key_limited(keyed.api_keys().await);
    key_limited(keyed.revoke_api_key("x").await);
    key_limited(keyed.sign_in_link().await);
}

#[tokio::test]
async fn a_key_for_a_vm_the_person_cannot_see_is_refused_as_not_found() {
    let fx = fixture().await;

    let refused = fx
        .host
        .manager
        .commands(fx.person())
        .create_api_key("x", None, ApiKeyScope::Full, Some(&name("other")))
        .await;

    not_found(refused);
    assert!(
        fx.host
            .manager
            .commands(fx.person())
            .api_keys()
            .await
            .unwrap()
            .is_empty()
    );
}

#[test]
fn only_reading_actions_are_read_and_key_management_is_not() {
    for action in [Action::Create, Action::Stop, Action::Share, Action::AddKey] {
        assert!(!action.is_read(), "{action:?}");
    }
    assert!(!Action::ManageApiKeys.is_read());
    for action in [
        Action::ListVms,
        Action::Get,
        Action::Logs,
        Action::ListShares,
    ] {
        assert!(action.is_read(), "{action:?}");
    }
}
