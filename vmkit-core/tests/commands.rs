#![allow(clippy::unwrap_used)]
//! The command surface: the access-policy matrix run through the manager, views
//! without host detail for non-admins, and idempotent creates.

use vmkit_core::guest::ExecRequest;
use vmkit_core::testing::policy::{Op, Outcome, Scene, Who, expected};
use vmkit_core::{
    Access, Commands, CreateRequest, DeleteOptions, Denied, ErrorKind, ManagerError, ResizeRequest,
    ShareWith, UserId, VmName, VmSpec,
};

fn name(n: &str) -> VmName {
    VmName::new(n).unwrap()
}

/// What `op` answers when `c` asks, reduced to its outcome.
async fn run(c: &Commands, op: Op) -> Result<Outcome, ManagerError> {
    let web = name("web");
    let snap = name("snap");
    match op {
        Op::Whoami => c.whoami().await.map(done),
        Op::List => c
            .list()
            .await
            .map(|vms| Outcome::Listed(vms.iter().any(|v| v.name == web))),
        Op::Create => c
            .create(CreateRequest::new(UserId(0), VmSpec::new("tiny")).name(name("fresh")))
            .await
            .map(done),
        Op::Get => c.get(&web).await.map(done),
        Op::Metrics => c.metrics(&web).await.map(done),
        Op::Logs => c.console(&web, 1024).await.map(done),
        Op::Exec => c
            .exec(&web, ExecRequest::new(["echo", "hi"]))
            .await
            .map(done),
        Op::Start => c.start(&web).await.map(done),
        Op::Stop => c.stop(&web).await.map(done),
        Op::Restart => c.restart(&web).await.map(done),
        Op::Pause => c.pause(&web).await.map(done),
        Op::Resume => c.resume(&web).await.map(done),
        Op::Resize => c
            .resize(&web, ResizeRequest::new().vcpus(2))
            .await
            .map(done),
        Op::Snapshot => c.snapshot(&web, name("snap2")).await.map(done),
        Op::Restore => c.restore(&web, &snap, None).await.map(done),
        Op::Clone | Op::CloneSnapshot => c
            .clone_vm(Scene::clone_source(op), Some(name("copy")), None)
            .await
            .map(done),
        Op::Delete => c.delete(&web, DeleteOptions::default()).await.map(done),
        Op::Rename => c.rename(&web, name("web2")).await.map(done),
        Op::Share => c
            .share(&web, ShareWith::Public, Access::Http)
            .await
            .map(done),
        Op::Shares => c.shares(&web).await.map(done),
        Op::ListSnapshots => c
            .snapshots()
            .await
            .map(|all| Outcome::Listed(all.iter().any(|s| s.name == snap))),
        Op::DeleteSnapshot => c.delete_snapshot(&snap).await.map(done),
        Op::Events => c.events(None, 10).await.map(done),
        Op::Keys => c.ssh_keys().await.map(done),
        Op::Images => c.images().await.map(done),
        _ => unreachable!("an op this test does not know: {op:?}"),
    }
}

fn done<T>(_: T) -> Outcome {
    Outcome::Done
}

fn outcome(result: Result<Outcome, ManagerError>) -> Result<Outcome, String> {
    match result {
        Ok(outcome) => Ok(outcome),
        Err(ManagerError::NotFound(_) | ManagerError::SnapshotNotFound(_)) => Ok(Outcome::NotFound),
        Err(ManagerError::Denied(Denied::Forbidden { .. })) => Ok(Outcome::Forbidden),
        Err(ManagerError::Denied(Denied::SignInRequired { .. })) => Ok(Outcome::SignIn),
        Err(ManagerError::Denied(Denied::Suspended)) => Ok(Outcome::Suspended),
        Err(ManagerError::Denied(Denied::AdminOnly { .. })) => Ok(Outcome::AdminOnly),
        Err(other) => Err(format!("{other} ({})", other.code())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_the_answer_the_policy_matrix_gives_for_every_operation() {
    let mut wrong = Vec::new();
    for who in Who::ALL {
        for op in Op::ALL {
            let scene = Scene::new().await;
            scene.prepare(op).await;
            let commands = scene.host.manager.commands(scene.caller(who));
            let got = outcome(run(&commands, op).await);
            let want = expected(who, op);
            if got != Ok(want) {
                wrong.push(format!("{who:?} {op:?}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The gateway's ways into a VM (its SSH server's address and keys, a session
/// through its agent) answer every caller as `exec` does: they take SSH access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ways_into_a_vm_take_ssh_access_as_exec_does() {
    let web = name("web");
    let mut wrong = Vec::new();
    for who in Who::ALL {
        let scene = Scene::new().await;
        let c = scene.host.manager.commands(scene.caller(who));
        let want = Ok(expected(who, Op::Exec));
        let target = outcome(c.ssh_target(&web).await.map(|t| {
            // The fake guest has no SSH server; the target says so, with the
            // gateway's key for this VM and no host keys.
            assert!(!t.sshd && t.host_keys.is_empty() && t.vm.name == web);
            Outcome::Done
        }));
        if target != want {
            wrong.push(format!("{who:?} ssh_target: got {target:?}, want {want:?}"));
        }
        let session = c
            .session(&web, vmkit_core::guest::SessionRequest::new(["echo", "hi"]))
            .await;
        let session = outcome(match session {
            Ok(mut session) => {
                let mut output = Vec::new();
                while let Some(event) = session.next().await {
                    match event.unwrap() {
                        vmkit_core::guest::ExecEvent::Stdout(data) => {
                            output.extend_from_slice(&data)
                        }
                        vmkit_core::guest::ExecEvent::Exit(status) => assert!(status.success()),
                        _ => {}
                    }
                }
                assert_eq!(output, b"hi\n");
                Ok(Outcome::Done)
            }
            Err(e) => Err(e),
        });
        if session != want {
            wrong.push(format!("{who:?} session: got {session:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn a_session_through_the_agent_streams_input_and_ends_by_signal() {
    let scene = Scene::new().await;
    let c = scene.host.manager.commands(scene.caller(Who::Owner));
    let session = c
        .session(
            &name("web"),
            vmkit_core::guest::SessionRequest::new(["cat"]),
        )
        .await
        .unwrap();
    let (input, mut events) = session.split();
    input.send(b"one ").await.unwrap();
    input.send(b"two").await.unwrap();
    let mut output = Vec::new();
    while output.len() < 7 {
        match events.next().await.unwrap().unwrap() {
            vmkit_core::guest::ExecEvent::Stdout(data) => output.extend_from_slice(&data),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(output, b"one two");
    input.signal("INT").await.unwrap();
    match events.next().await.unwrap().unwrap() {
        vmkit_core::guest::ExecEvent::Exit(status) => {
            assert_eq!(status.signal, Some(libc::SIGINT));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_vm_one_may_not_see_answers_exactly_as_one_that_does_not_exist() {
    let scene = Scene::new().await;
    let stranger = scene.host.manager.commands(scene.caller(Who::Stranger));
    let hidden = stranger.stop(&name("web")).await.unwrap_err();
    let missing = stranger.stop(&name("ghost")).await.unwrap_err();
    assert_eq!(hidden.code(), missing.code());
    assert_eq!(hidden.kind(), ErrorKind::NotFound);
    assert_eq!(
        hidden.public_message().replace("web", "NAME"),
        missing.public_message().replace("ghost", "NAME")
    );
}

/// Every string in a JSON value, with where it is.
fn strings(value: &serde_json::Value, at: String, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::String(s) => out.push((at, s.clone())),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{at}[{i}]"), out);
            }
        }
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                strings(v, format!("{at}.{k}"), out);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn views_for_users_hold_no_host_path_pid_or_socket() {
    let scene = Scene::new().await;
    let web = name("web");
    for who in [Who::Owner, Who::ManageSharee] {
        let c = scene.host.manager.commands(scene.caller(who));
        let answers = [
            serde_json::to_value(c.get(&web).await.unwrap()).unwrap(),
            serde_json::to_value(c.list().await.unwrap()).unwrap(),
            serde_json::to_value(c.metrics(&web).await.unwrap()).unwrap(),
            serde_json::to_value(c.snapshots().await.unwrap()).unwrap(),
            serde_json::to_value(c.whoami().await.unwrap()).unwrap(),
        ];
        for answer in answers {
            let mut all = Vec::new();
            strings(&answer, String::new(), &mut all);
            for (at, s) in all {
                assert!(!s.contains('/'), "{who:?}: {at} holds a path: {s}");
            }
            assert!(
                answer.to_string().find("pid").is_none(),
                "{who:?}: {answer}"
            );
            assert!(
                answer.to_string().find("resources").is_none(),
                "{who:?}: {answer}"
            );
        }
    }
    let operator = scene.host.manager.commands(vmkit_core::Caller::operator());
    let seen = operator.get(&web).await.unwrap();
    assert!(
        seen.resources.and_then(|r| r.vmm).is_some(),
        "the operator sees the host side"
    );
}

#[tokio::test]
async fn a_create_retried_with_its_idempotency_key_returns_the_first_vm() {
    let scene = Scene::new().await;
    let c = scene.host.manager.commands(scene.caller(Who::Owner));
    let request = || {
        CreateRequest::new(UserId(0), VmSpec::new("tiny"))
            .name(name("once"))
            .idempotency_key("key-1")
    };
    // The first attempt's client gives up: the create goes on without it.
    let first = tokio::spawn({
        let c = c.clone();
        let request = request();
        async move { c.create(request).await }
    });
    let retried = c.create(request()).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(retried.id, first.id);
    assert_eq!(scene.host.holdings().await.vms, 2, "web and once, no third");
    let again = c.create(request()).await.unwrap();
    assert_eq!(again.id, first.id, "also once the first is long done");

    let other = c
        .create(
            CreateRequest::new(UserId(0), VmSpec::new("tiny").vcpus(2))
                .name(name("twice"))
                .idempotency_key("key-1"),
        )
        .await
        .unwrap_err();
    assert_eq!(other.code(), "idempotency_key_reused");
    // Another user's key is theirs alone.
    let admin = scene.host.manager.commands(scene.caller(Who::Admin));
    let theirs = admin
        .create(
            CreateRequest::new(UserId(0), VmSpec::new("tiny"))
                .name(name("theirs"))
                .idempotency_key("key-1"),
        )
        .await
        .unwrap();
    assert_ne!(theirs.id, first.id);
}

#[tokio::test]
async fn a_restore_retried_with_its_idempotency_key_does_not_restore_twice() {
    let scene = Scene::new().await;
    let c = scene.host.manager.commands(scene.caller(Who::Owner));
    let (web, snap) = (name("web"), name("snap"));
    let first = c.restore(&web, &snap, Some("r-1".into())).await.unwrap();
    let retried = c.restore(&web, &snap, Some("r-1".into())).await.unwrap();
    assert_eq!(retried.updated_at, first.updated_at, "not restored again");
    c.snapshot(&web, name("snap2")).await.unwrap();
    let reused = c
        .restore(&web, &name("snap2"), Some("r-1".into()))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), "idempotency_key_reused");
}

#[tokio::test]
async fn a_link_share_answers_its_secret_once_and_lists_only_a_short_name() {
    let scene = Scene::new().await;
    let c = scene.host.manager.commands(scene.caller(Who::Owner));
    let web = name("web");
    let made = c.share(&web, ShareWith::Link, Access::Ssh).await.unwrap();
    let secret = made.secret.clone().unwrap();
    assert!(secret.starts_with("vms_") && secret.len() > 40, "{secret}");
    let listed = serde_json::to_string(&c.shares(&web).await.unwrap()).unwrap();
    assert!(!listed.contains(&secret[4..]), "{listed}");
    let holder = scene
        .host
        .manager
        .commands(vmkit_core::Caller::link(&secret, vmkit_core::Door::Ssh));
    holder.exec(&web, ExecRequest::new(["echo"])).await.unwrap();
    let vmkit_core::ShareWithView::Link(short) = &made.with else {
        panic!("a link share: {made:?}");
    };
    let removed = c
        .unshare(&web, &vmkit_core::ShareWithView::Link(short.clone()), None)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let gone = holder
        .exec(&web, ExecRequest::new(["echo"]))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), "not_found");
}

#[tokio::test]
async fn a_user_suspended_mid_session_is_refused_at_their_next_operation() {
    use vmkit_core::StateStore;
    let scene = Scene::new().await;
    // Identified while active, as an open SSH session or API client would be.
    let owner = scene.host.manager.commands(scene.caller(Who::Owner));
    owner.get(&name("web")).await.unwrap();
    let mut record = scene.host.store.get_user(UserId(1)).await.unwrap().unwrap();
    record.status = vmkit_core::UserStatus::Suspended;
    scene.host.store.put_user(&record).await.unwrap();
    let refused = owner.get(&name("web")).await.unwrap_err();
    assert_eq!(refused.code(), "suspended");
    assert!(owner.list().await.is_err());
    let me = owner.whoami().await.unwrap();
    assert!(
        matches!(
            me.principal,
            vmkit_core::Principal::User {
                suspended: true,
                ..
            }
        ),
        "{me:?}"
    );
}
