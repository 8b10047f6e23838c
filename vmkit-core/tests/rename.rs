#![allow(clippy::unwrap_used)]
//! Renaming a VM: the record under its new name, the guest's host name, the event,
//! a taken or invalid name refused, and who may rename.

use vmkit_core::testing::FakeHost;
use vmkit_core::testing::policy::{Scene, Who};
use vmkit_core::{
    CreateRequest, Denied, EventKind, ManagerError, StateStore, UserId, VmName, VmSpec, VmState,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

fn request(n: &str) -> CreateRequest {
    CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny")).name(name(n))
}

#[tokio::test]
async fn a_running_vm_renamed_answers_to_its_new_name_and_its_guest_is_told() {
    let host = FakeHost::new().await;
    let before = host.manager.create(request("web")).await.unwrap();

    let vm = host
        .manager
        .rename(&name("web"), name("site"))
        .await
        .unwrap();

    assert_eq!(vm.name, name("site"));
    assert_eq!(vm.id, before.id, "the same VM");
    assert_eq!(vm.state, VmState::Running);
    assert!(matches!(
        host.manager.get(&name("web")).await,
        Err(ManagerError::NotFound(_))
    ));
    assert_eq!(host.manager.get(&name("site")).await.unwrap().id, before.id);
    let guest = host
        .hypervisor
        .guest(vm.resources.vmm.as_ref().unwrap().pid)
        .unwrap();
    assert_eq!(guest.hostname.as_deref(), Some("site"));
    let renamed: Vec<_> = host
        .manager
        .events(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| matches!(&e.kind, EventKind::Renamed { from } if *from == name("web")))
        .collect();
    assert_eq!(renamed.len(), 1);
    assert_eq!(renamed[0].vm_name, Some(name("site")));
    assert_eq!(renamed[0].vm, Some(before.id));
}

#[tokio::test]
async fn a_stopped_vm_renamed_boots_with_its_new_host_name() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    host.manager.stop(&name("web")).await.unwrap();

    host.manager
        .rename(&name("web"), name("site"))
        .await
        .unwrap();
    let vm = host.manager.start(&name("site")).await.unwrap();

    let guest = host
        .hypervisor
        .guest(vm.resources.vmm.as_ref().unwrap().pid)
        .unwrap();
    assert_eq!(guest.hostname.as_deref(), Some("site"));
}

#[tokio::test]
async fn rename_to_a_taken_name_is_refused_and_changes_nothing() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();
    host.manager.create(request("db")).await.unwrap();

    let err = host
        .manager
        .rename(&name("web"), name("db"))
        .await
        .unwrap_err();

    assert!(
        matches!(err, ManagerError::NameTaken(ref n) if *n == name("db")),
        "{err}"
    );
    assert_eq!(host.store.list_vms(None).await.unwrap().len(), 2);
    assert!(host.manager.get(&name("web")).await.is_ok());
}

#[tokio::test]
async fn rename_of_a_missing_vm_is_not_found_and_to_its_own_name_changes_nothing() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();

    let missing = host
        .manager
        .rename(&name("ghost"), name("spirit"))
        .await
        .unwrap_err();
    let same = host
        .manager
        .rename(&name("web"), name("web"))
        .await
        .unwrap();

    assert!(matches!(missing, ManagerError::NotFound(_)), "{missing}");
    assert_eq!(same.name, name("web"));
}

#[tokio::test]
async fn a_freed_name_can_be_taken_by_a_new_vm() {
    let host = FakeHost::new().await;
    host.manager.create(request("web")).await.unwrap();

    host.manager
        .rename(&name("web"), name("site"))
        .await
        .unwrap();
    let fresh = host.manager.create(request("web")).await.unwrap();

    assert_eq!(fresh.name, name("web"));
    assert_eq!(host.store.list_vms(None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn only_the_owner_and_admins_rename_and_a_stranger_is_answered_as_for_a_missing_vm() {
    let scene = Scene::new().await;
    let rename = |who| {
        let commands = scene.host.manager.commands(scene.caller(who));
        async move { commands.rename(&name("web"), name("web2")).await }
    };

    let manager = rename(Who::ManageSharee).await.unwrap_err();
    let stranger = rename(Who::Stranger).await.unwrap_err();
    let owner = rename(Who::Owner).await.unwrap();

    assert!(
        matches!(manager, ManagerError::Denied(Denied::Forbidden { .. })),
        "{manager}"
    );
    assert!(matches!(stranger, ManagerError::NotFound(_)), "{stranger}");
    assert_eq!(owner.name, name("web2"));
}
