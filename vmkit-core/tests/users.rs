#![allow(clippy::unwrap_used)]
//! Users, registration and invites on the in-memory fakes.

use std::time::Duration;

use vmkit_core::testing::suites::key;
use vmkit_core::testing::{Breakage, FakeHost, Holdings};
use vmkit_core::{
    CreateRequest, ErrorKind, EventKind, Handle, Invite, ManagerConfig, ManagerError, NewUser,
    Quota, Registration, RegistrationPolicy, Role, StateStore, User, UserId, UserStatus,
    VmDisposition, VmName, VmSpec,
};

fn handle(h: &str) -> Handle {
    Handle::new(h).unwrap()
}

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

async fn host_with(policy: RegistrationPolicy) -> FakeHost {
    FakeHost::with_config(
        ManagerConfig::new("/nonexistent/vmkit")
            .registration(policy)
            .default_quota(Quota::unlimited()),
    )
    .await
}

async fn event_kinds(host: &FakeHost) -> Vec<EventKind> {
    let events = host.manager.events(0, 10_000).await.unwrap();
    events.into_iter().map(|e| e.kind).collect()
}

/// Adds `h` with SSH key number `n`.
async fn add(host: &FakeHost, h: &str, n: u8) -> User {
    host.manager
        .add_user(NewUser::new(handle(h)).ssh_key(key(n)))
        .await
        .unwrap()
}

async fn create_vm(host: &FakeHost, owner: UserId, vm: &str) {
    host.manager
        .create(CreateRequest::new(owner, VmSpec::new("tiny").disk_gib(1)).name(name(vm)))
        .await
        .unwrap();
}

#[tokio::test]
async fn closed_registration_is_refused_with_an_error_that_says_to_ask_the_operator() {
    let host = FakeHost::new().await;
    assert_eq!(
        host.manager.config().registration,
        RegistrationPolicy::Closed,
        "the library's default"
    );

    let err = host
        .manager
        .register(Registration::new(handle("ada"), key(1)))
        .await
        .unwrap_err();

    assert!(matches!(err, ManagerError::RegistrationClosed));
    assert_eq!(
        (err.kind(), err.code()),
        (ErrorKind::Forbidden, "registration_closed")
    );
    assert!(err.to_string().contains("ask its operator"), "{err}");
    assert!(host.manager.users().await.unwrap().is_empty());
}

#[tokio::test]
async fn open_registration_lets_anyone_in_as_a_user_with_their_key() {
    let host = host_with(RegistrationPolicy::Open).await;

    let ada = host
        .manager
        .register(Registration::new(handle("ada"), key(1)).email("ada@example.com"))
        .await
        .unwrap();

    assert_eq!(ada.handle, handle("ada"));
    assert_eq!((ada.role, ada.status), (Role::User, UserStatus::Active));
    assert_eq!(ada.email.as_deref(), Some("ada@example.com"));
    assert_eq!(host.manager.ssh_keys(ada.id).await.unwrap(), vec![key(1)]);
    assert_eq!(host.manager.users().await.unwrap(), vec![ada.clone()]);
    assert!(event_kinds(&host).await.contains(&EventKind::UserAdded {
        user: handle("ada"),
        role: Role::User
    }));
}

#[tokio::test]
async fn a_taken_handle_or_key_or_a_bad_email_is_refused_and_stores_nothing() {
    let host = host_with(RegistrationPolicy::Open).await;
    add(&host, "ada", 1).await;

    let taken = host
        .manager
        .register(Registration::new(handle("ada"), key(2)))
        .await
        .unwrap_err();
    assert!(matches!(&taken, ManagerError::HandleTaken(h) if *h == handle("ada")));
    assert_eq!(
        (taken.kind(), taken.code()),
        (ErrorKind::Conflict, "handle_taken")
    );
    assert!(matches!(
        host.manager
            .register(Registration::new(handle("bea"), key(1)))
            .await,
        Err(ManagerError::SshKeyTaken(_))
    ));
    let bad_email = host
        .manager
        .register(Registration::new(handle("bea"), key(2)).email("not an address"))
        .await
        .unwrap_err();
    assert_eq!(bad_email.code(), "invalid_email");
    assert_eq!(host.manager.users().await.unwrap().len(), 1);
}

#[tokio::test]
async fn invite_registration_needs_a_valid_code_and_uses_it_up() {
    let host = host_with(RegistrationPolicy::Invite).await;
    let (invite, code) = host
        .manager
        .new_invite(UserId::LOCAL, Duration::from_secs(3600), Role::Admin)
        .await
        .unwrap();

    let none = host
        .manager
        .register(Registration::new(handle("ada"), key(1)))
        .await
        .unwrap_err();
    assert_eq!(
        (none.kind(), none.code()),
        (ErrorKind::Forbidden, "invite_required")
    );
    let wrong = host
        .manager
        .register(Registration::new(handle("ada"), key(1)).invite("vmi_nope"))
        .await
        .unwrap_err();
    assert_eq!(
        (wrong.kind(), wrong.code()),
        (ErrorKind::Forbidden, "invite_invalid")
    );

    let ada = host
        .manager
        .register(Registration::new(handle("ada"), key(1)).invite(&code))
        .await
        .unwrap();
    assert_eq!(ada.role, Role::Admin, "the user gets the invite's role");
    assert_eq!(invite.role, Role::Admin);
    assert!(host.manager.invites().await.unwrap().is_empty(), "used up");
    let again = host
        .manager
        .register(Registration::new(handle("bea"), key(2)).invite(&code))
        .await
        .unwrap_err();
    assert!(matches!(again, ManagerError::InviteInvalid));
}

#[tokio::test]
async fn an_expired_invite_is_refused_like_an_unknown_one() {
    let host = host_with(RegistrationPolicy::Invite).await;
    let (expired, code) = Invite::new(UserId::LOCAL, Duration::ZERO, Role::User);
    host.store.put_invite(&expired).await.unwrap();

    let err = host
        .manager
        .register(Registration::new(handle("ada"), key(1)).invite(&code))
        .await
        .unwrap_err();

    assert!(matches!(err, ManagerError::InviteInvalid));
    assert!(
        err.to_string().contains("mistyped, used or expired"),
        "{err}"
    );
    assert!(host.manager.users().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_registration_refused_for_its_handle_does_not_use_up_the_invite() {
    let host = host_with(RegistrationPolicy::Invite).await;
    add(&host, "ada", 1).await;
    let (_, code) = host
        .manager
        .new_invite(UserId::LOCAL, Duration::from_secs(60), Role::User)
        .await
        .unwrap();

    assert!(matches!(
        host.manager
            .register(Registration::new(handle("ada"), key(2)).invite(&code))
            .await,
        Err(ManagerError::HandleTaken(_))
    ));

    let bea = host
        .manager
        .register(Registration::new(handle("bea"), key(2)).invite(&code))
        .await
        .unwrap();
    assert_eq!(bea.handle, handle("bea"));
}

#[tokio::test]
async fn twenty_concurrent_registrations_with_one_invite_let_exactly_one_in() {
    let host = host_with(RegistrationPolicy::Invite).await;
    let (_, code) = host
        .manager
        .new_invite(UserId::LOCAL, Duration::from_secs(60), Role::User)
        .await
        .unwrap();

    let tasks: Vec<_> = (0..20u8)
        .map(|n| {
            let manager = host.manager.clone();
            let code = code.clone();
            tokio::spawn(async move {
                manager
                    .register(
                        Registration::new(handle(&format!("user-{n}")), key(n + 1)).invite(code),
                    )
                    .await
            })
        })
        .collect();
    let mut admitted = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(ManagerError::InviteInvalid) => refused += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    assert_eq!((admitted, refused), (1, 19));
    assert_eq!(host.manager.users().await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_operator_adds_users_whatever_the_policy_and_the_local_record_is_not_one() {
    let host = FakeHost::new().await;
    host.store.put_user(&User::local()).await.unwrap();

    let admin = host
        .manager
        .add_user(NewUser::new(handle("boss")).role(Role::Admin))
        .await
        .unwrap();

    assert_ne!(admin.id, UserId::LOCAL);
    assert_eq!(admin.role, Role::Admin);
    assert_eq!(host.manager.users().await.unwrap(), vec![admin.clone()]);
    assert_eq!(host.manager.user(&handle("boss")).await.unwrap(), admin);
    let missing = host.manager.user(&handle("nobody-here")).await.unwrap_err();
    assert_eq!(
        (missing.kind(), missing.code()),
        (ErrorKind::NotFound, "user_not_found")
    );
    assert!(matches!(
        host.manager.user(&Handle::local()).await,
        Err(ManagerError::UserNotFound(_))
    ));
}

#[tokio::test]
async fn suspend_and_resume_round_trip_with_one_event_each() {
    let host = FakeHost::new().await;
    add(&host, "ada", 1).await;

    let suspended = host
        .manager
        .set_suspended(&handle("ada"), true)
        .await
        .unwrap();
    assert_eq!(suspended.status, UserStatus::Suspended);
    assert!(
        host.manager
            .user(&handle("ada"))
            .await
            .unwrap()
            .is_suspended()
    );
    let resumed = host
        .manager
        .set_suspended(&handle("ada"), false)
        .await
        .unwrap();
    assert_eq!(resumed.status, UserStatus::Active);
    host.manager
        .set_suspended(&handle("ada"), false)
        .await
        .unwrap();
    let promoted = host
        .manager
        .set_role(&handle("ada"), Role::Admin)
        .await
        .unwrap();
    assert_eq!(promoted.role, Role::Admin);

    let kinds: Vec<_> = event_kinds(&host)
        .await
        .into_iter()
        .filter(|k| !matches!(k, EventKind::UserAdded { .. }))
        .collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::UserSuspended {
                user: handle("ada")
            },
            EventKind::UserResumed {
                user: handle("ada")
            },
            EventKind::UserRoleChanged {
                user: handle("ada"),
                role: Role::Admin
            },
        ],
        "resuming an active user records nothing"
    );
}

#[tokio::test]
async fn removing_a_user_with_delete_leaves_nothing_of_theirs() {
    let host = host_with(RegistrationPolicy::Closed).await;
    let ada = add(&host, "ada", 1).await;
    let bea = add(&host, "bea", 2).await;
    create_vm(&host, ada.id, "ada-web").await;
    create_vm(&host, ada.id, "ada-db").await;
    create_vm(&host, bea.id, "bea-web").await;
    host.manager
        .snapshot(&name("ada-web"), name("ada-snap"))
        .await
        .unwrap();
    let before_ada = host.holdings().await;

    host.manager
        .remove_user(&handle("ada"), VmDisposition::Delete)
        .await
        .unwrap();

    // Only bea's VM is left: one record, root + data volumes, a TAP, a lease, a VMM.
    assert_eq!(
        host.holdings().await,
        Holdings {
            vms: 1,
            volumes: 2,
            taps: 1,
            leases: 1,
            vmms: 1,
        },
        "before: {before_ada:?}"
    );
    assert!(host.manager.list_snapshots(None).await.unwrap().is_empty());
    assert!(matches!(
        host.manager.user(&handle("ada")).await,
        Err(ManagerError::UserNotFound(_))
    ));
    assert_eq!(
        host.store.user_by_key(&key(1).fingerprint()).await.unwrap(),
        None
    );
    assert_eq!(host.manager.users().await.unwrap(), vec![bea]);
    assert!(event_kinds(&host).await.contains(&EventKind::UserRemoved {
        user: handle("ada")
    }));

    host.manager
        .remove_user(&handle("bea"), VmDisposition::Delete)
        .await
        .unwrap();
    assert_eq!(host.holdings().await, Holdings::default());
}

#[tokio::test]
async fn removing_a_user_with_a_hand_over_moves_their_vms_and_snapshots_even_past_a_quota() {
    let host = host_with(RegistrationPolicy::Closed).await;
    let ada = add(&host, "ada", 1).await;
    let bea = add(&host, "bea", 2).await;
    host.store
        .set_quota(bea.id, &Quota::default().max_vms(1))
        .await
        .unwrap();
    create_vm(&host, ada.id, "web").await;
    create_vm(&host, ada.id, "db").await;
    host.manager
        .snapshot(&name("web"), name("snap"))
        .await
        .unwrap();
    let before = host.holdings().await;

    host.manager
        .remove_user(&handle("ada"), VmDisposition::HandOver(handle("bea")))
        .await
        .unwrap();

    assert_eq!(host.holdings().await, before, "nothing was deleted");
    let owners: Vec<_> = host
        .manager
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|vm| (vm.name.to_string(), vm.owner))
        .collect();
    assert_eq!(
        owners,
        [("db".to_owned(), bea.id), ("web".to_owned(), bea.id)],
        "an operator's hand-over may take the receiver past their quota"
    );
    assert_eq!(
        host.manager
            .get_snapshot(&name("snap"))
            .await
            .unwrap()
            .owner,
        bea.id
    );
    assert!(matches!(
        host.manager.user(&handle("ada")).await,
        Err(ManagerError::UserNotFound(_))
    ));
    // The receiver's VMs work as theirs: bea can restart the handed-over VM.
    host.manager.restart(&name("web")).await.unwrap();
}

#[tokio::test]
async fn a_hand_over_to_oneself_or_to_no_one_is_refused_before_anything_changes() {
    let host = FakeHost::new().await;
    let ada = add(&host, "ada", 1).await;
    create_vm(&host, ada.id, "web").await;

    let to_self = host
        .manager
        .remove_user(&handle("ada"), VmDisposition::HandOver(handle("ada")))
        .await
        .unwrap_err();
    assert_eq!(
        (to_self.kind(), to_self.code()),
        (ErrorKind::InvalidInput, "invalid_hand_over")
    );
    assert!(matches!(
        host.manager
            .remove_user(&handle("ada"), VmDisposition::HandOver(handle("ghost")))
            .await,
        Err(ManagerError::UserNotFound(h)) if h == "ghost"
    ));

    let ada_now = host.manager.user(&handle("ada")).await.unwrap();
    assert_eq!(ada_now.status, UserStatus::Active, "not even suspended");
    assert_eq!(host.manager.list(Some(ada.id)).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_remove_that_fails_half_way_keeps_the_user_says_what_is_left_and_can_be_retried() {
    let host = host_with(RegistrationPolicy::Closed).await;
    let ada = add(&host, "ada", 1).await;
    create_vm(&host, ada.id, "web").await;
    create_vm(&host, ada.id, "stuck").await;
    let stuck = host.manager.get(&name("stuck")).await.unwrap();
    let stuck_id = stuck.id.to_string();
    host.faults
        .break_op("storage.delete", Some(&stuck_id), Breakage::Error);

    let err = host
        .manager
        .remove_user(&handle("ada"), VmDisposition::Delete)
        .await
        .unwrap_err();

    match &err {
        ManagerError::UserRemovalIncomplete {
            handle: h, left, ..
        } => {
            assert_eq!(*h, handle("ada"));
            assert_eq!(left, &["VM stuck"]);
        }
        other => panic!("expected an incomplete removal, got {other}"),
    }
    assert_eq!(err.code(), "user_removal_incomplete");
    assert!(err.to_string().contains("remove the user again"), "{err}");
    let kept = host.manager.user(&handle("ada")).await.unwrap();
    assert_eq!(kept.status, UserStatus::Suspended, "left suspended");
    let left: Vec<_> = host
        .manager
        .list(Some(ada.id))
        .await
        .unwrap()
        .into_iter()
        .map(|vm| vm.name.to_string())
        .collect();
    assert_eq!(left, ["stuck"], "the other VM went");

    host.faults.heal("storage.delete");
    host.manager
        .remove_user(&handle("ada"), VmDisposition::Delete)
        .await
        .unwrap();
    assert_eq!(host.holdings().await, Holdings::default());
    assert!(host.manager.users().await.unwrap().is_empty());
}

#[tokio::test]
async fn invites_are_listed_deleted_by_id_and_expired_ones_pruned() {
    let host = host_with(RegistrationPolicy::Invite).await;
    let (expired, _) = Invite::new(UserId::LOCAL, Duration::ZERO, Role::User);
    host.store.put_invite(&expired).await.unwrap();
    let (invite, code) = host
        .manager
        .new_invite(UserId::LOCAL, Duration::from_secs(7 * 86_400), Role::User)
        .await
        .unwrap();

    assert_eq!(
        host.manager.invites().await.unwrap(),
        vec![invite.clone()],
        "making an invite removed the expired one"
    );
    assert!(invite.hash.matches(&code));
    assert_eq!(invite.expires_at.0 - invite.created_at.0, 7 * 86_400 * 1000);
    host.manager.delete_invite(&invite.id).await.unwrap();
    let gone = host.manager.delete_invite(&invite.id).await.unwrap_err();
    assert_eq!(
        (gone.kind(), gone.code()),
        (ErrorKind::NotFound, "invite_not_found")
    );
    assert!(matches!(
        host.manager
            .register(Registration::new(handle("ada"), key(1)).invite(&code))
            .await,
        Err(ManagerError::InviteInvalid)
    ));
}
