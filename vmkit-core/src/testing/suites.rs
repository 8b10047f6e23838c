//! Generic test suites, one per trait. Every backend, fake or real, must pass its
//! trait's suite; each check panics with a message that names the broken rule.

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use vmkit_guest::{Client, ClientConfig, ExecRequest};

use crate::address::{IpLease, IpPool};
use crate::confine::UidRange;
use crate::event::{EventKind, EventRetention, NewEvent};
use crate::gateway::Gateway;
use crate::hypervisor::{Hypervisor, HypervisorError, MachineConfig, Resize, VmmHandle, VmmState};
use crate::image::Image;
use crate::invite::Invite;
use crate::name::VmName;
use crate::network::{Network, NetworkError};
use crate::quota::Quota;
use crate::share::{Access, Share, ShareTarget};
use crate::spec::VmSpec;
use crate::state_store::{StateStore, StoreError};
use crate::storage::{DiskFormat, Storage, StorageError, Volume, VolumeKind};
use crate::time::Timestamp;
use crate::user::{ApiKey, Handle, Role, SshPublicKey, User, UserId, UserStatus};
use crate::vm::{VmId, VmRecord};

// ---------------------------------------------------------------- hypervisor

/// What the hypervisor suite needs from a backend's test setup.
pub trait HypervisorFixture: Send + Sync {
    /// A bootable machine config (real kernel, image and fresh root disk for real
    /// backends) for a VM called `name`, in a fresh run directory.
    fn machine(&self, name: &str) -> MachineConfig;
    /// How long a boot may take on this host.
    fn boot_timeout(&self) -> Duration {
        Duration::from_secs(120)
    }
}

/// Connects to the agent of `handle` and waits for its hello.
pub async fn wait_for_agent(hv: &dyn Hypervisor, handle: &VmmHandle, timeout: Duration) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(
            !remaining.is_zero(),
            "agent did not answer within {timeout:?}"
        );
        let info = hv.info(handle).await.expect("info");
        assert_ne!(info.state, VmmState::Exited, "VMM exited while booting");
        match hv.connect_agent(handle).await {
            Ok(stream) => {
                let client = Client::new(stream, ClientConfig::default());
                if client.hello_within(remaining).await.is_ok() {
                    return client;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Boot, agent, exec, pause/resume per capabilities, attach, console, graceful
/// shutdown and idempotent teardown, on one VM.
pub async fn hypervisor_lifecycle(hv: &dyn Hypervisor, fx: &dyn HypervisorFixture) {
    let mut config = fx.machine("suite-life");
    if hv.capabilities().resize_vcpus {
        let vcpus = config.vcpus;
        config = config.max_vcpus(vcpus + 1);
    }
    let handle = hv.start(&config).await.expect("start");
    assert_eq!(handle.backend, hv.kind(), "handle names its backend");
    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Running,
        "a started VM runs"
    );

    let client = wait_for_agent(hv, &handle, fx.boot_timeout()).await;
    let out = client
        .exec_collect(ExecRequest::new(["echo", "suite"]), 1 << 16)
        .await
        .expect("exec echo");
    assert_eq!(out.stdout, b"suite\n", "exec output reaches the host");
    assert_eq!(out.status.code, Some(0));

    if hv.capabilities().pause {
        hv.pause(&handle).await.expect("pause");
        assert_eq!(
            hv.info(&handle).await.expect("info").state,
            VmmState::Paused
        );
        assert!(
            hv.pause(&handle).await.is_err(),
            "pausing a paused VM is refused"
        );
        hv.resume(&handle).await.expect("resume");
        assert_eq!(
            hv.info(&handle).await.expect("info").state,
            VmmState::Running
        );
        client.ping().await.expect("agent answers after resume");
    } else {
        assert!(matches!(
            hv.pause(&handle).await,
            Err(HypervisorError::Unsupported { .. })
        ));
    }

    hypervisor_live_vcpus(hv, &config, &handle).await;

    assert_eq!(
        hv.attach(&handle).await.expect("attach to a running VMM"),
        VmmState::Running
    );
    // Only proof of death is `NotRunning`: reconcile kills on it.
    let mut foreign = handle.clone();
    foreign.backend = "another-backend".into();
    match hv.attach(&foreign).await {
        Err(HypervisorError::NotRunning { .. }) | Ok(_) => {
            panic!("another backend's handle is refused, and not as a dead VMM")
        }
        Err(_) => {}
    }
    hv.console_tail(&handle, 4096).await.expect("console tail");

    hv.shutdown(&handle, Duration::from_secs(30))
        .await
        .expect("shutdown");
    assert_eq!(
        hv.info(&handle).await.expect("info after shutdown").state,
        VmmState::Exited,
        "shutdown returns once the VMM is gone"
    );
    assert!(
        matches!(
            hv.attach(&handle).await,
            Err(HypervisorError::NotRunning { .. })
        ),
        "attach to a dead VMM fails with NotRunning"
    );
    hv.shutdown(&handle, Duration::from_secs(1))
        .await
        .expect("shutdown is idempotent");
    hv.kill(&handle).await.expect("kill is idempotent");
    hv.cleanup(&handle).await.expect("cleanup");
    hv.cleanup(&handle).await.expect("cleanup is idempotent");
}

/// On a booted guest: a hypervisor that resizes vCPUs live grows to the config's
/// most vCPUs and shrinks back, and refuses more than that; one that cannot says
/// so.
async fn hypervisor_live_vcpus(hv: &dyn Hypervisor, config: &MachineConfig, handle: &VmmHandle) {
    if !hv.capabilities().resize_vcpus {
        assert!(
            matches!(
                hv.resize(handle, Resize::new(Some(config.vcpus + 1), None))
                    .await,
                Err(HypervisorError::Unsupported { .. })
            ),
            "a backend without live vCPU resize says so"
        );
        return;
    }
    for target in [config.max_vcpus, config.vcpus] {
        hv.resize(handle, Resize::new(Some(target), None))
            .await
            .unwrap_or_else(|e| panic!("resize to {target} vCPUs: {e}"));
        assert_eq!(
            hv.info(handle).await.expect("info").vcpus,
            target,
            "the VMM runs {target} vCPUs after the resize"
        );
    }
    assert!(
        hv.resize(handle, Resize::new(Some(config.max_vcpus + 1), None))
            .await
            .is_err(),
        "more vCPUs than the VMM has slots for is refused"
    );
    assert_eq!(hv.info(handle).await.expect("info").vcpus, config.vcpus);
}

/// A forced stop ends the VMM at once, without waiting for the guest, and its
/// events say the host stopped it.
pub async fn hypervisor_kill(hv: &dyn Hypervisor, fx: &dyn HypervisorFixture) {
    let handle = hv.start(&fx.machine("suite-kill")).await.expect("start");
    let mut watch = hv.watch(&handle).await.expect("watch");
    hv.kill(&handle).await.expect("kill");
    let exit = tokio::time::timeout(Duration::from_secs(30), watch.wait_exit())
        .await
        .expect("the end is reported");
    assert_eq!(exit, Some(crate::VmmExit::Killed));
    assert_eq!(watch.current().resets, 0, "no guest reset");
    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Exited,
        "kill returns once the VMM is gone"
    );
    assert!(
        hv.connect_agent(&handle).await.is_err(),
        "no agent on a dead VM"
    );
    hv.cleanup(&handle).await.expect("cleanup");
}

/// Discarding a run directory stops the VMM started there without its handle (as
/// after a crash lost the handle) and removes the directory; it is idempotent.
pub async fn hypervisor_discard(hv: &dyn Hypervisor, fx: &dyn HypervisorFixture) {
    let config = fx.machine("suite-discard");
    let handle = hv.start(&config).await.expect("start");
    hv.discard(&config.run_dir).await.expect("discard");
    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Exited,
        "discard stops the VMM started in the run directory"
    );
    assert!(
        !config.run_dir.exists(),
        "discard removes the run directory {}",
        config.run_dir.display()
    );
    hv.discard(&config.run_dir)
        .await
        .expect("discard is idempotent");
}

/// A config the backend cannot run is refused and leaves nothing running.
pub async fn hypervisor_invalid_config(hv: &dyn Hypervisor, fx: &dyn HypervisorFixture) {
    let mut config = fx.machine("suite-bad");
    config.disks.clear();
    assert!(
        hv.start(&config).await.is_err(),
        "a VM without disks is refused"
    );
}

/// Snapshot and restore, where the backend can: a running guest is refused; a paused
/// one is saved and stays paused; a fresh VMM restored from the snapshot (same machine
/// and disks, another run dir) comes back paused, resumes, and its agent answers.
/// Restoring from a directory without a snapshot fails and leaves no run dir. A
/// backend without the capability says `Unsupported`.
pub async fn hypervisor_snapshot(hv: &dyn Hypervisor, fx: &dyn HypervisorFixture) {
    let config = fx.machine("suite-snap");
    let snapshot_dir = config.run_dir.with_file_name("suite-snap-snapshot");
    if !hv.capabilities().snapshot {
        assert!(
            matches!(
                hv.restore(&config, &snapshot_dir).await,
                Err(HypervisorError::Unsupported { .. })
            ),
            "restore without the snapshot capability is Unsupported"
        );
        return;
    }
    let handle = hv.start(&config).await.expect("start");
    let client = wait_for_agent(hv, &handle, fx.boot_timeout()).await;
    drop(client);
    assert!(
        hv.snapshot(&handle, &snapshot_dir).await.is_err(),
        "a snapshot of a running guest is refused"
    );
    hv.pause(&handle).await.expect("pause");
    hv.snapshot(&handle, &snapshot_dir)
        .await
        .expect("snapshot of a paused guest");
    assert_eq!(
        hv.info(&handle).await.expect("info").state,
        VmmState::Paused,
        "the guest stays paused after a snapshot"
    );
    hv.kill(&handle).await.expect("kill");
    hv.cleanup(&handle).await.expect("cleanup");

    let mut target = config.clone();
    target.run_dir = fx.machine("suite-restored").run_dir;
    let restored = hv.restore(&target, &snapshot_dir).await.expect("restore");
    assert_eq!(
        restored.run_dir, target.run_dir,
        "restored in the new run dir"
    );
    assert_eq!(
        hv.info(&restored).await.expect("info").state,
        VmmState::Paused,
        "a restored guest is paused"
    );
    hv.resume(&restored).await.expect("resume a restored guest");
    let client = wait_for_agent(hv, &restored, fx.boot_timeout()).await;
    let out = client
        .exec_collect(ExecRequest::new(["echo", "restored"]), 1 << 16)
        .await
        .expect("exec after restore");
    assert_eq!(
        out.stdout, b"restored\n",
        "the restored agent runs commands"
    );
    drop(client);
    hv.kill(&restored).await.expect("kill the restored VMM");
    hv.cleanup(&restored).await.expect("cleanup");

    let nowhere = fx.machine("suite-nosnap");
    let empty = nowhere.run_dir.with_file_name("suite-no-snapshot-here");
    assert!(
        hv.restore(&nowhere, &empty).await.is_err(),
        "restore from a directory without a snapshot fails"
    );
    assert!(
        !nowhere.run_dir.exists(),
        "a failed restore leaves no run dir"
    );
}

/// Every hypervisor check.
pub async fn hypervisor_suite(hv: &dyn Hypervisor, fx: &dyn HypervisorFixture) {
    hypervisor_invalid_config(hv, fx).await;
    hypervisor_kill(hv, fx).await;
    hypervisor_discard(hv, fx).await;
    hypervisor_lifecycle(hv, fx).await;
    hypervisor_snapshot(hv, fx).await;
}

// ---------------------------------------------------------------- storage

/// What the storage suite needs.
#[async_trait]
pub trait StorageFixture: Send + Sync {
    /// An image whose root filesystem exists (synthetic for fakes).
    fn image(&self) -> Image;
    /// The formats to ask for, best first.
    fn formats(&self) -> Vec<DiskFormat> {
        vec![DiskFormat::Raw]
    }
    /// Writes `data` at `offset` of the disk at `volume.path` as a guest would see
    /// it (through `volume.format`). Panics if it cannot.
    async fn write(&self, volume: &Volume, offset: u64, data: &[u8]);
    /// Reads `len` bytes at `offset` of the disk at `volume.path` as a guest would
    /// see them. Panics if it cannot.
    async fn read(&self, volume: &Volume, offset: u64, len: usize) -> Vec<u8>;
}

/// Where the storage checks write into volumes: past the first MiB, inside every
/// volume the suite makes (the smallest is a root of the fixture's image).
const AT: u64 = 1 << 20;
/// A second place, for writes made after a copy.
const LATER_AT: u64 = (1 << 20) + (64 << 10);

/// Import is idempotent; each VM gets its own root; a second root is refused.
pub async fn storage_roots(storage: &dyn Storage, fx: &dyn StorageFixture) {
    let image = fx.image();
    let base = storage.import_image(&image).await.expect("import");
    let again = storage.import_image(&image).await.expect("re-import");
    assert_eq!(base, again, "import is idempotent");

    let (a, b) = (VmId::generate(), VmId::generate());
    let ra = storage
        .clone_root(a, &base, &fx.formats())
        .await
        .expect("clone a");
    let rb = storage
        .clone_root(b, &base, &fx.formats())
        .await
        .expect("clone b");
    assert_ne!(ra.path, rb.path, "each VM has its own root");
    assert_eq!(ra.kind, VolumeKind::Root);
    assert!(
        fx.formats().contains(&ra.format),
        "root is in an accepted format"
    );
    assert!(
        matches!(
            storage.clone_root(a, &base, &fx.formats()).await,
            Err(StorageError::Exists(_))
        ),
        "a second root for one VM is refused"
    );
    assert!(
        matches!(
            storage.clone_root(VmId::generate(), &base, &[]).await,
            Err(StorageError::NoFormat(_))
        ),
        "no acceptable format is an error"
    );
    let listed = storage.list().await.expect("list");
    assert!(
        listed.contains(&ra) && listed.contains(&rb),
        "list shows roots"
    );
    storage.delete(&ra).await.expect("delete a");
    storage.delete(&rb).await.expect("delete b");
}

/// Data volumes are sized as asked, grow, never shrink, and go away on delete.
pub async fn storage_data_volumes(storage: &dyn Storage, _fx: &dyn StorageFixture) {
    let vm = VmId::generate();
    let size = 64 << 20;
    let data = storage.create_data(vm, size).await.expect("create data");
    assert_eq!(data.kind, VolumeKind::Data);
    assert_eq!(data.size_bytes, size);
    let grown = storage.resize(&data, 2 * size).await.expect("grow");
    assert_eq!(grown.size_bytes, 2 * size);
    assert!(
        matches!(
            storage.resize(&grown, size).await,
            Err(StorageError::Shrink { .. })
        ),
        "shrinking is refused"
    );
    storage.delete(&grown).await.expect("delete");
    storage.delete(&grown).await.expect("delete is idempotent");
    assert!(
        !is_listed(storage, &grown.id).await,
        "a deleted volume is not listed"
    );
}

/// Whether `list` shows a volume with this id.
async fn is_listed(storage: &dyn Storage, id: &str) -> bool {
    storage
        .list()
        .await
        .expect("list")
        .iter()
        .any(|v| v.id == id)
}

/// A new VM with a root volume of the fixture's image and a 64 MiB data volume.
async fn root_and_data(storage: &dyn Storage, fx: &dyn StorageFixture) -> (VmId, Volume, Volume) {
    let base = storage.import_image(&fx.image()).await.expect("import");
    let vm = VmId::generate();
    let root = storage
        .clone_root(vm, &base, &fx.formats())
        .await
        .expect("clone root");
    let data = storage
        .create_data(vm, 64 << 20)
        .await
        .expect("create data");
    (vm, root, data)
}

/// A copy of a root or data volume is a volume of its own: same kind, format and
/// size, the source's contents, and no write to either shows in the other; a copy
/// onto an existing volume is refused and leaves that volume alone; a copy of a
/// missing volume is `NotFound`.
pub async fn storage_copies(storage: &dyn Storage, fx: &dyn StorageFixture) {
    let (_, root, data) = root_and_data(storage, fx).await;
    for source in [&root, &data] {
        let what = format!("{:?} volume", source.kind);
        fx.write(source, AT, b"source, before the copy").await;
        let target = VmId::generate();
        let copy = storage
            .copy_volume(source, target)
            .await
            .unwrap_or_else(|e| panic!("copy of a {what}: {e}"));
        assert_eq!(
            (&copy.id, copy.vm, copy.kind, copy.format, copy.size_bytes),
            (
                &Volume::id_for(target, source.kind),
                target,
                source.kind,
                source.format,
                source.size_bytes
            ),
            "a copy of a {what} has the target's id and the source's kind, format and size"
        );
        assert_ne!(copy.path, source.path, "a copy has a disk of its own");
        assert_eq!(
            fx.read(&copy, AT, 23).await,
            b"source, before the copy",
            "a copy of a {what} starts with the source's contents"
        );
        let untouched = fx.read(&copy, LATER_AT, 22).await;
        fx.write(&copy, AT, b"the copy, written later").await;
        fx.write(source, LATER_AT, b"source, after the copy").await;
        assert_eq!(
            fx.read(source, AT, 23).await,
            b"source, before the copy",
            "a write to the copy of a {what} does not show in the source"
        );
        assert_eq!(
            fx.read(&copy, LATER_AT, 22).await,
            untouched,
            "a write to a {what} after the copy does not show in the copy"
        );
        assert!(
            matches!(
                storage.copy_volume(source, target).await,
                Err(StorageError::Exists(_))
            ),
            "a copy onto an existing {what} is refused"
        );
        assert_eq!(
            fx.read(&copy, AT, 23).await,
            b"the copy, written later",
            "a refused copy leaves the existing volume alone"
        );
        assert!(
            storage.list().await.expect("list").contains(&copy),
            "a copy is listed"
        );
        storage.delete(&copy).await.expect("delete the copy");
    }
    storage.delete(&data).await.expect("delete data");
    assert!(
        matches!(
            storage.copy_volume(&data, VmId::generate()).await,
            Err(StorageError::NotFound(_))
        ),
        "a copy of a missing volume is NotFound"
    );
    storage.delete(&root).await.expect("delete root");
}

/// A released volume leaves the list but keeps its contents where `release` says;
/// the id can be used again and a second release of it goes elsewhere; releasing
/// a missing volume is `NotFound`.
pub async fn storage_release(storage: &dyn Storage, fx: &dyn StorageFixture) {
    let (vm, root, data) = root_and_data(storage, fx).await;
    let mut kept_paths = Vec::new();
    for volume in [&root, &data] {
        let what = format!("{:?} volume", volume.kind);
        fx.write(volume, AT, b"kept for the operator").await;
        let kept = storage
            .release(volume)
            .await
            .unwrap_or_else(|e| panic!("release of a {what}: {e}"));
        assert!(
            !is_listed(storage, &volume.id).await,
            "a released {what} is no longer listed"
        );
        let at_kept = Volume {
            path: kept.clone(),
            ..volume.clone()
        };
        assert_eq!(
            fx.read(&at_kept, AT, 21).await,
            b"kept for the operator",
            "a released {what} keeps its contents at {}",
            kept.display()
        );
        storage
            .delete(volume)
            .await
            .expect("delete of a released volume is a no-op");
        assert_eq!(
            fx.read(&at_kept, AT, 21).await,
            b"kept for the operator",
            "deleting the released id leaves the kept {what} alone"
        );
        kept_paths.push((kept, at_kept));
    }

    let again = storage
        .create_data(vm, 64 << 20)
        .await
        .expect("the id of a released volume is free again");
    fx.write(&again, AT, b"released second time").await;
    let kept_again = storage.release(&again).await.expect("release again");
    let (first_kept, first_at_kept) = &kept_paths[1];
    assert_ne!(
        &kept_again, first_kept,
        "a second release of one id does not take the first one's place"
    );
    assert_eq!(
        fx.read(first_at_kept, AT, 21).await,
        b"kept for the operator",
        "the first release is untouched by the second"
    );
    assert!(
        matches!(
            storage.release(&again).await,
            Err(StorageError::NotFound(_))
        ),
        "releasing a missing volume is NotFound"
    );
}

/// Every storage check.
pub async fn storage_suite(storage: &dyn Storage, fx: &dyn StorageFixture) {
    storage_roots(storage, fx).await;
    storage_data_volumes(storage, fx).await;
    storage_copies(storage, fx).await;
    storage_release(storage, fx).await;
}

// ---------------------------------------------------------------- network

/// Setup is idempotent; attach creates a listed TAP with the lease's addresses;
/// detach removes it and is idempotent; a lease from elsewhere is refused.
pub async fn network_suite(network: &dyn Network) {
    network.setup_host().await.expect("setup");
    network.setup_host().await.expect("setup is idempotent");
    let pool = network.pool();
    let vm = VmId::generate();
    let ip = pool.guest_addresses().next().expect("pool has an address");
    let lease = IpLease::new(vm, ip, &pool);
    let att = network.attach(vm, &lease).await.expect("attach");
    assert_eq!((att.ip, att.mac, att.vm), (lease.ip, lease.mac, vm));
    assert_eq!(att.gateway, pool.host_address());
    assert!(att.tap.len() <= 15, "TAP names fit IFNAMSIZ");
    let again = network
        .attach(vm, &lease)
        .await
        .expect("attach is idempotent");
    assert_eq!(again.tap, att.tap);
    assert!(network.list().await.expect("list").contains(&vm));

    network.detach(vm).await.expect("detach");
    network.detach(vm).await.expect("detach is idempotent");
    assert!(!network.list().await.expect("list").contains(&vm));

    let foreign = IpLease::new(
        VmId::generate(),
        Ipv4Addr::new(203, 0, 113, 7),
        &IpPool::new("203.0.113.0/24".parse().expect("cidr")).expect("pool"),
    );
    assert!(matches!(
        network.attach(foreign.vm, &foreign).await,
        Err(NetworkError::ForeignLease(_))
    ));
}

// ---------------------------------------------------------------- state store

/// A valid ed25519 key, the `n`th of its kind.
pub fn key(n: u8) -> SshPublicKey {
    use base64::Engine as _;
    let mut blob = b"\0\0\0\x0bssh-ed25519\0\0\0\x20".to_vec();
    // A real point: the public key of the secret key [n; 32].
    blob.extend(
        ed25519_dalek::SigningKey::from_bytes(&[n; 32])
            .verifying_key()
            .to_bytes(),
    );
    let line = format!(
        "ssh-ed25519 {} k{n}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    );
    SshPublicKey::parse(&line).expect("valid key")
}

fn record(name: &str, owner: UserId, spec: VmSpec) -> VmRecord {
    VmRecord::new(VmName::new(name).expect("name"), owner, spec)
}

/// Users, keys and quotas.
pub async fn store_users(store: &dyn StateStore) {
    let alice = User::new(UserId(1), handle("alice"));
    store.put_user(&alice).await.expect("put user");
    assert_eq!(store.get_user(UserId(1)).await.expect("get"), Some(alice));
    store
        .add_ssh_key(UserId(1), &key(1))
        .await
        .expect("add key");
    store
        .add_ssh_key(UserId(1), &key(1))
        .await
        .expect("same key twice for the same user");
    assert!(matches!(
        store.add_ssh_key(UserId(2), &key(1)).await,
        Err(StoreError::KeyTaken(_))
    ));
    assert_eq!(
        store
            .user_by_key(&key(1).fingerprint())
            .await
            .expect("lookup"),
        Some(UserId(1))
    );
    assert_eq!(store.ssh_keys(UserId(1)).await.expect("keys"), vec![key(1)]);
    assert!(
        store
            .remove_ssh_key(&key(1).fingerprint())
            .await
            .expect("rm")
    );
    assert!(
        !store
            .remove_ssh_key(&key(1).fingerprint())
            .await
            .expect("rm twice"),
        "a key removed is gone"
    );
    assert!(store.ssh_keys(UserId(1)).await.expect("keys").is_empty());
    assert_eq!(
        store
            .user_by_key(&key(1).fingerprint())
            .await
            .expect("lookup"),
        None
    );

    assert_eq!(store.get_quota(UserId(1)).await.expect("quota"), None);
    let q = Quota::new(1, 2, 1024, 5);
    store.set_quota(UserId(1), &q).await.expect("set quota");
    assert_eq!(store.get_quota(UserId(1)).await.expect("quota"), Some(q));
}

/// VM records: unique names, quota checked at insert, update, list, delete.
pub async fn store_vms(store: &dyn StateStore) {
    let owner = UserId(5);
    let quota = Quota::new(2, 4, 4096, 10);
    let mut a = record("alpha", owner, VmSpec::new("tiny"));
    store.create_vm(&a, &quota).await.expect("create a");
    assert!(matches!(
        store
            .create_vm(&record("alpha", owner, VmSpec::new("tiny")), &quota)
            .await,
        Err(StoreError::NameTaken(_))
    ));
    let b = record("beta", owner, VmSpec::new("tiny"));
    store.create_vm(&b, &quota).await.expect("create b");
    assert!(
        matches!(
            store
                .create_vm(&record("gamma", owner, VmSpec::new("tiny")), &quota)
                .await,
            Err(StoreError::QuotaExceeded(_))
        ),
        "the third VM exceeds a quota of two"
    );
    store
        .create_vm(&record("delta", UserId(6), VmSpec::new("tiny")), &quota)
        .await
        .expect("quotas are per user");

    a.state = crate::vm_state::VmState::Running;
    store.update_vm(&a).await.expect("update");
    assert_eq!(store.get_vm(&a.name).await.expect("get"), Some(a.clone()));
    assert_eq!(
        store.get_vm_by_id(a.id).await.expect("get"),
        Some(a.clone())
    );
    let names: Vec<_> = store
        .list_vms(Some(owner))
        .await
        .expect("list")
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(store.list_vms(None).await.expect("list").len(), 3);

    assert!(store.delete_vm(a.id).await.expect("delete"));
    assert!(!store.delete_vm(a.id).await.expect("delete twice"));
    assert!(matches!(
        store.update_vm(&a).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.get_vm(&a.name).await.expect("get"), None);
}

/// A rename through [`StateStore::update_vm`] moves the name: the new name finds
/// the VM, the old one nothing and is free again; a taken name is refused and
/// changes nothing.
pub async fn store_vm_rename(store: &dyn StateStore) {
    let owner = UserId(5);
    let quota = Quota::unlimited();
    let mut a = record("alpha", owner, VmSpec::new("tiny"));
    store.create_vm(&a, &quota).await.expect("create alpha");
    let b = record("beta", owner, VmSpec::new("tiny"));
    store.create_vm(&b, &quota).await.expect("create beta");

    a.name = VmName::new("gamma").expect("name");
    store.update_vm(&a).await.expect("rename alpha to gamma");
    assert_eq!(
        store.get_vm(&a.name).await.expect("get"),
        Some(a.clone()),
        "the new name finds the VM"
    );
    assert_eq!(
        store
            .get_vm(&VmName::new("alpha").expect("name"))
            .await
            .expect("get"),
        None,
        "the old name finds nothing"
    );

    let mut clash = a.clone();
    clash.name = b.name.clone();
    assert!(matches!(
        store.update_vm(&clash).await,
        Err(StoreError::NameTaken(_))
    ));
    assert_eq!(store.get_vm(&a.name).await.expect("get"), Some(a.clone()));
    assert_eq!(
        store.get_vm(&b.name).await.expect("get").map(|v| v.id),
        Some(b.id)
    );

    store
        .create_vm(&record("alpha", owner, VmSpec::new("tiny")), &quota)
        .await
        .expect("the old name is free again");
}

/// Leases: lowest free first, stable per VM, never twice, released and reused.
pub async fn store_leases(store: &dyn StateStore) {
    let pool = IpPool::new("10.99.0.0/29".parse().expect("cidr")).expect("pool");
    let vms: Vec<VmId> = (0..5).map(|_| VmId::generate()).collect();
    let mut ips = Vec::new();
    for vm in &vms {
        ips.push(store.allocate_lease(*vm, &pool).await.expect("lease").ip);
    }
    let unique: std::collections::HashSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), 5, "no address is handed out twice");
    assert_eq!(ips[0], Ipv4Addr::new(10, 99, 0, 2), "lowest free first");
    assert_eq!(
        store.allocate_lease(vms[0], &pool).await.expect("again").ip,
        ips[0],
        "a VM keeps its lease"
    );
    assert!(matches!(
        store.allocate_lease(VmId::generate(), &pool).await,
        Err(StoreError::PoolExhausted(_))
    ));
    assert!(store.release_lease(vms[2]).await.expect("release"));
    assert!(!store.release_lease(vms[2]).await.expect("release twice"));
    let reused = store
        .allocate_lease(VmId::generate(), &pool)
        .await
        .expect("reuse");
    assert_eq!(reused.ip, ips[2], "a released address is reused");
    assert_eq!(store.list_leases().await.expect("list").len(), 5);
}

/// VMM uids: lowest free first, stable per VM, never twice, released and reused,
/// and the range's end is respected.
pub async fn store_uids(store: &dyn StateStore) {
    let range = UidRange::new(7000, 4).expect("range");
    let vms: Vec<VmId> = (0..4).map(|_| VmId::generate()).collect();
    let mut uids = Vec::new();
    for vm in &vms {
        uids.push(store.allocate_uid(*vm, &range).await.expect("uid"));
    }
    assert_eq!(
        uids,
        [7000, 7001, 7002, 7003],
        "lowest free first, never twice"
    );
    assert_eq!(
        store.allocate_uid(vms[1], &range).await.expect("again"),
        7001,
        "a VM keeps its uid"
    );
    assert!(matches!(
        store.allocate_uid(VmId::generate(), &range).await,
        Err(StoreError::UidsExhausted(r)) if r == range
    ));
    assert!(store.release_uid(vms[1]).await.expect("release"));
    assert!(!store.release_uid(vms[1]).await.expect("release twice"));
    let other = VmId::generate();
    assert_eq!(
        store.allocate_uid(other, &range).await.expect("reuse"),
        7001,
        "a released uid is reused"
    );
    let mut listed = store.list_uids().await.expect("list");
    listed.sort_by_key(|(_, uid)| *uid);
    assert_eq!(
        listed,
        [
            (vms[0], 7000),
            (other, 7001),
            (vms[2], 7002),
            (vms[3], 7003)
        ]
    );
    let wider = UidRange::new(6990, 20).expect("range");
    assert_eq!(
        store.allocate_uid(vms[3], &wider).await.expect("kept"),
        7003,
        "a VM keeps its uid when the range changes"
    );
    assert_eq!(
        store
            .allocate_uid(VmId::generate(), &wider)
            .await
            .expect("new"),
        6990
    );
}

/// Shares, API keys and the event log.
pub async fn store_shares_keys_events(store: &dyn StateStore) {
    let vm = record("shared", UserId(1), VmSpec::new("tiny"));
    store
        .create_vm(&vm, &Quota::unlimited())
        .await
        .expect("create");
    let share = Share::new(vm.id, ShareTarget::User(UserId(2)), Access::Http);
    store.put_share(&share).await.expect("share");
    store.put_share(&share).await.expect("share twice");
    assert_eq!(store.shares(vm.id).await.expect("shares").len(), 1);
    assert!(store.remove_share(&share).await.expect("unshare"));
    store.put_share(&share).await.expect("share");
    store.delete_vm(vm.id).await.expect("delete");
    assert!(
        store.shares(vm.id).await.expect("shares").is_empty(),
        "deleting a VM drops its shares"
    );

    let k = ApiKey::new("key1", UserId(1), "vmk_s3cret")
        .label("ci")
        .scope(crate::user::ApiKeyScope::ReadOnly)
        .expires_at(Timestamp(1_000))
        .vm(vm.id);
    store.put_api_key(&k).await.expect("put key");
    assert_eq!(
        store.get_api_key("key1").await.expect("get"),
        Some(k.clone())
    );
    let other = ApiKey::new("key2", UserId(2), "vmk_other");
    store.put_api_key(&other).await.expect("put key");
    let mut used = k.clone();
    used.last_used_at = Some(Timestamp(500));
    assert!(
        store
            .record_api_key_use("key1", Timestamp(500))
            .await
            .expect("record use")
    );
    assert!(
        !store
            .record_api_key_use("nokey", Timestamp(500))
            .await
            .expect("record use"),
        "no key is made by recording its use"
    );
    assert_eq!(
        store.list_api_keys(UserId(1)).await.expect("list keys"),
        vec![used],
        "a user's keys, and only theirs, as last written"
    );
    assert!(store.delete_api_key("key1").await.expect("delete"));
    assert_eq!(store.get_api_key("key1").await.expect("get"), None);
    assert!(
        store
            .list_api_keys(UserId(1))
            .await
            .expect("list")
            .is_empty()
    );
    assert!(
        !store
            .record_api_key_use("key1", Timestamp(600))
            .await
            .expect("use")
    );
    assert_eq!(
        store.get_api_key("key1").await.expect("get"),
        None,
        "still revoked"
    );
    assert_eq!(store.list_api_keys(UserId(2)).await.expect("list").len(), 1);

    assert_eq!(
        store.last_event_seq().await.expect("last event"),
        0,
        "an empty log's last event is numbered 0"
    );
    assert_eq!(
        store.first_event_seq().await.expect("first event"),
        1,
        "an empty log's history starts at 1"
    );
    let keep = EventRetention::unlimited();
    let first = store
        .append_event(
            NewEvent::host(EventKind::Reconciled { action: "a".into() }),
            &keep,
        )
        .await
        .expect("event");
    let second = store
        .append_event(NewEvent::vm(vm.id, &vm.name, EventKind::Deleted), &keep)
        .await
        .expect("event");
    assert_eq!(second.seq, first.seq + 1, "events are numbered in order");
    assert_eq!(
        store.last_event_seq().await.expect("last event"),
        second.seq
    );
    let after = store.events(first.seq, 10).await.expect("events");
    assert_eq!(after, vec![second]);
}

/// A VM's change and its event are one transaction: when the change is refused,
/// no event is stored; when it is made, both are.
pub async fn store_state_with_event(store: &dyn StateStore) {
    let keep = EventRetention::unlimited();
    let mut a = record("first", UserId(1), VmSpec::new("tiny"));
    let b = record("second", UserId(1), VmSpec::new("tiny"));
    for vm in [&a, &b] {
        store
            .create_vm(vm, &Quota::unlimited())
            .await
            .expect("create");
    }
    let changed = |vm: &VmRecord| {
        NewEvent::vm(
            vm.id,
            &vm.name,
            EventKind::StateChanged {
                from: crate::vm_state::VmState::Creating,
                to: crate::vm_state::VmState::Running,
            },
        )
    };

    a.state = crate::vm_state::VmState::Running;
    let event = store
        .update_vm_with_event(&a, changed(&a), &keep)
        .await
        .expect("change with its event");
    assert_eq!(store.get_vm(&a.name).await.expect("get"), Some(a.clone()));
    assert_eq!(
        store.events(0, 10).await.expect("events"),
        vec![event.clone()],
        "the event is stored with the change"
    );

    let mut clash = a.clone();
    clash.name = b.name.clone();
    clash.state = crate::vm_state::VmState::Stopping;
    assert!(matches!(
        store
            .update_vm_with_event(&clash, changed(&clash), &keep)
            .await,
        Err(StoreError::NameTaken(_))
    ));
    let gone = record("gone", UserId(1), VmSpec::new("tiny"));
    assert!(matches!(
        store
            .update_vm_with_event(&gone, changed(&gone), &keep)
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.last_event_seq().await.expect("last"),
        event.seq,
        "a refused change stores no event"
    );
    assert_eq!(
        store.get_vm(&a.name).await.expect("get"),
        Some(a.clone()),
        "nor any part of the change"
    );

    let deleted = store
        .delete_vm_with_event(a.id, NewEvent::vm(a.id, &a.name, EventKind::Deleted), &keep)
        .await
        .expect("delete with its event");
    assert_eq!(store.get_vm(&a.name).await.expect("get"), None);
    assert_eq!(
        store.events(event.seq, 10).await.expect("events"),
        vec![deleted],
        "the deletion's event is stored with it"
    );
}

/// The retention rule: by count and by age, the newest always kept, numbering
/// consecutive, and where the history starts reported.
pub async fn store_event_retention(store: &dyn StateStore) {
    let at = |secs: u64| {
        let mut e = NewEvent::host(EventKind::Reconciled {
            action: format!("at {secs}"),
        });
        e.at = crate::time::Timestamp(secs * 1000);
        e
    };
    let three = EventRetention::new(3);
    for t in 1..=10 {
        store.append_event(at(t), &three).await.expect("append");
    }
    let kept: Vec<u64> = store
        .events(0, 100)
        .await
        .expect("events")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(kept, [8, 9, 10], "the newest three are kept");
    assert_eq!(store.first_event_seq().await.expect("first"), 8);
    assert_eq!(store.last_event_seq().await.expect("last"), 10);

    // Older than a minute before the newest goes; so does all but the newest when
    // the next one comes much later. Numbering carries on.
    let minute = EventRetention::unlimited().max_age(Duration::from_secs(60));
    store.append_event(at(50), &minute).await.expect("append");
    assert_eq!(store.first_event_seq().await.expect("first"), 8);
    let late = store.append_event(at(1000), &minute).await.expect("append");
    assert_eq!(late.seq, 12, "numbers are never reused");
    assert_eq!(
        store.events(0, 100).await.expect("events"),
        vec![late.clone()],
        "only the newest is left"
    );
    assert_eq!(store.first_event_seq().await.expect("first"), 12);

    // A log over a tightened limit shrinks by a bounded amount per append.
    let unlimited = EventRetention::unlimited();
    for t in 0..(EventRetention::TRIM_PER_APPEND as u64 * 2) {
        store
            .append_event(at(1000 + t), &unlimited)
            .await
            .expect("append");
    }
    let before = store.events(0, 1000).await.expect("events").len();
    store
        .append_event(at(2000), &EventRetention::new(1))
        .await
        .expect("append");
    let after = store.events(0, 1000).await.expect("events").len();
    assert_eq!(
        before + 1 - after,
        EventRetention::TRIM_PER_APPEND,
        "one append removes at most TRIM_PER_APPEND events"
    );
}

/// Quotas count everything a user holds: root and data disks, snapshots' disks and
/// memory; a resize is checked in the transaction that writes it.
pub async fn store_quota_holdings(store: &dyn StateStore) {
    let owner = UserId(7);
    let quota = Quota::unlimited().max_disk_gib(10);
    let mut web = record("web", owner, VmSpec::new("tiny").root_gib(4).disk_gib(2));
    store.create_vm(&web, &quota).await.expect("6 GiB of 10");
    assert!(
        matches!(
            store
                .create_vm(
                    &record("db", owner, VmSpec::new("tiny").root_gib(5)),
                    &quota
                )
                .await,
            Err(StoreError::QuotaExceeded(e)) if e.resource == crate::quota::QuotaResource::DiskGib
        ),
        "root disks count: 6 + 5 > 10"
    );

    // A root volume larger than the spec (the image's size) counts at its size.
    web.resources.root = Some(Volume::new(
        web.id,
        VolumeKind::Root,
        "/v/root".into(),
        DiskFormat::Raw,
        5 << 30,
    ));
    store.update_vm(&web).await.expect("update");
    let snapshot = store_snapshot("s1", owner, 5 << 30, VmSpec::new("tiny").memory_mib(1024));
    assert!(
        matches!(
            store.put_snapshot(&snapshot, &quota).await,
            Err(StoreError::QuotaExceeded(_))
        ),
        "a snapshot of 5 GiB of disk and 1 GiB of memory does not fit in the 3 GiB left"
    );
    let small = store_snapshot("s2", owner, 1 << 30, VmSpec::new("tiny").memory_mib(1024));
    store
        .put_snapshot(&small, &quota)
        .await
        .expect("1 GiB of disk and 1 GiB of memory fit");
    assert!(
        matches!(
            store
                .create_vm(
                    &record("db", owner, VmSpec::new("tiny").root_gib(2)),
                    &quota
                )
                .await,
            Err(StoreError::QuotaExceeded(_))
        ),
        "snapshots count: 7 + 2 + 2 > 10"
    );

    let mut grown = web.clone();
    grown.spec.disk_gib = 4;
    assert!(
        matches!(
            store.update_vm_within_quota(&grown, &quota).await,
            Err(StoreError::QuotaExceeded(_))
        ),
        "a data disk grown from 2 to 4 GiB takes 11 GiB"
    );
    assert_eq!(
        store.get_vm(&web.name).await.expect("get"),
        Some(web.clone()),
        "a refused resize writes nothing"
    );
    grown.spec.disk_gib = 3;
    store
        .update_vm_within_quota(&grown, &quota)
        .await
        .expect("to 3 GiB fits exactly");
    assert_eq!(
        store.get_vm(&web.name).await.expect("get"),
        Some(grown.clone())
    );

    // Over quota (it was lowered): what does not grow still passes.
    let lowered = Quota::unlimited().max_disk_gib(5);
    let mut more_cpus = grown.clone();
    more_cpus.spec.vcpus = 2;
    store
        .update_vm_within_quota(&more_cpus, &lowered)
        .await
        .expect("disk does not grow");
}

/// Two resizes at once that together exceed the quota: one is refused.
pub async fn store_concurrent_resizes(store: &dyn StateStore) {
    let owner = UserId(8);
    let quota = Quota::unlimited().max_disk_gib(10);
    let a = record("a", owner, VmSpec::new("tiny").disk_gib(2));
    let b = record("b", owner, VmSpec::new("tiny").disk_gib(2));
    for vm in [&a, &b] {
        store.create_vm(vm, &quota).await.expect("create");
    }
    let grow = |vm: &VmRecord| {
        let mut vm = vm.clone();
        vm.spec.disk_gib = 6;
        vm
    };
    let (ga, gb) = (grow(&a), grow(&b));
    let (ra, rb) = tokio::join!(
        store.update_vm_within_quota(&ga, &quota),
        store.update_vm_within_quota(&gb, &quota)
    );
    let refused = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(StoreError::QuotaExceeded(_))))
        .count();
    assert_eq!(
        (ra.is_ok() as usize + rb.is_ok() as usize, refused),
        (1, 1),
        "6 + 2 fit in 10, 6 + 6 do not: {ra:?} {rb:?}"
    );
    let total: u64 = store
        .list_vms(Some(owner))
        .await
        .expect("list")
        .iter()
        .map(|vm| vm.spec.disk_gib)
        .sum();
    assert_eq!(total, 8);
}

/// A snapshot of `disk_bytes` of root disk taken of a VM of `spec` with its memory.
fn store_snapshot(
    name: &str,
    owner: UserId,
    disk_bytes: u64,
    spec: VmSpec,
) -> crate::snapshot::Snapshot {
    let id = VmId::generate();
    crate::snapshot::Snapshot {
        name: VmName::new(name).expect("valid name"),
        id,
        vm: VmId::generate(),
        vm_name: VmName::new("web").expect("valid name"),
        owner,
        spec,
        root: Volume::new(
            id,
            VolumeKind::Root,
            format!("/v/root-{id}.raw").into(),
            DiskFormat::Raw,
            disk_bytes,
        ),
        data: None,
        memory: Some(format!("/s/{id}").into()),
        hypervisor: None,
        mac: None,
        created_at: crate::time::Timestamp::now(),
    }
}

/// Every state store check, each on a fresh store from `make`.
pub async fn store_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn StateStore>>,
{
    store_users(&*make().await).await;
    store_vms(&*make().await).await;
    store_vm_rename(&*make().await).await;
    store_leases(&*make().await).await;
    store_uids(&*make().await).await;
    store_shares_keys_events(&*make().await).await;
    store_snapshots(&*make().await).await;
    store_state_with_event(&*make().await).await;
    store_event_retention(&*make().await).await;
    store_quota_holdings(&*make().await).await;
    store_concurrent_resizes(&*make().await).await;
    store_user_records(&*make().await).await;
    store_user_delete(&*make().await).await;
    store_invites(&*make().await).await;
    store_concurrent_invite_use(make().await).await;
    store_web_sessions(make().await).await;
    store_custom_domains(&*make().await).await;
}

/// Custom domains: put, get, list by VM, replace (a host moves), remove, and
/// deleting a VM takes its domains with it.
pub async fn store_custom_domains(store: &dyn StateStore) {
    use crate::domain::CustomDomain;
    let quota = Quota::unlimited();
    let web = record("web", UserId(1), VmSpec::new("tiny"));
    let blog = record("blog", UserId(1), VmSpec::new("tiny"));
    store.create_vm(&web, &quota).await.expect("create web");
    store.create_vm(&blog, &quota).await.expect("create blog");
    assert_eq!(
        store.get_domain("app.example.com").await.expect("get"),
        None
    );

    let app = CustomDomain::new("app.example.com", web.id, UserId(1));
    let www = CustomDomain::new("www.example.com", web.id, UserId(1));
    let docs = CustomDomain::new("docs.example.org", blog.id, UserId(1));
    for d in [&app, &www, &docs] {
        store.put_domain(d).await.expect("put domain");
    }
    assert_eq!(
        store.get_domain("app.example.com").await.expect("get"),
        Some(app.clone())
    );
    let hosts = |v: Vec<CustomDomain>| v.into_iter().map(|d| d.host).collect::<Vec<_>>();
    assert_eq!(
        hosts(store.list_domains(None).await.expect("list")),
        ["app.example.com", "docs.example.org", "www.example.com"],
        "every domain, by host"
    );
    assert_eq!(
        hosts(store.list_domains(Some(web.id)).await.expect("list")),
        ["app.example.com", "www.example.com"]
    );

    // Putting a host again moves it.
    let moved = CustomDomain::new("www.example.com", blog.id, UserId(1));
    store.put_domain(&moved).await.expect("move");
    assert_eq!(
        hosts(store.list_domains(Some(blog.id)).await.expect("list")),
        ["docs.example.org", "www.example.com"]
    );

    assert!(store.remove_domain("docs.example.org").await.expect("rm"));
    assert!(!store.remove_domain("docs.example.org").await.expect("rm"));

    // A deleted VM keeps no domain; the other VM's stay.
    assert!(store.delete_vm(blog.id).await.expect("delete"));
    assert_eq!(
        store.get_domain("www.example.com").await.expect("get"),
        None
    );
    assert_eq!(
        hosts(store.list_domains(None).await.expect("list")),
        ["app.example.com"]
    );
}

fn handle(h: &str) -> Handle {
    Handle::new(h).expect("valid handle")
}

/// User records: fresh ids never reused, unique handles, lookup by handle, updates.
pub async fn store_user_records(store: &dyn StateStore) {
    let ada = store
        .create_user(&User::new(UserId(77), handle("ada")), Some(&key(1)))
        .await
        .expect("create ada");
    assert_ne!(ada.id, UserId(77), "the store allocates the id");
    assert_ne!(ada.id, UserId::LOCAL, "0 is the local operator's");
    assert_eq!(
        store.get_user(ada.id).await.expect("get"),
        Some(ada.clone())
    );
    assert_eq!(
        store.user_by_key(&key(1).fingerprint()).await.expect("key"),
        Some(ada.id),
        "the first key is registered with the user"
    );
    assert!(
        matches!(
            store
                .create_user(&User::new(UserId(0), handle("ada")), None)
                .await,
            Err(StoreError::HandleTaken(h)) if h == handle("ada")
        ),
        "handles are unique"
    );
    assert!(
        matches!(
            store
                .create_user(&User::new(UserId(0), handle("bob")), Some(&key(1)))
                .await,
            Err(StoreError::KeyTaken(_))
        ),
        "a key belongs to one user"
    );
    assert_eq!(
        store.user_by_handle(&handle("bob")).await.expect("lookup"),
        None,
        "a refused create stores nothing"
    );
    let bob = store
        .create_user(&User::new(UserId(0), handle("bob")), Some(&key(2)))
        .await
        .expect("create bob");
    assert!(bob.id > ada.id, "ids grow");
    assert_eq!(
        store.user_by_handle(&handle("bob")).await.expect("lookup"),
        Some(bob.clone())
    );

    // A rename moves the handle; the old one is free again.
    let mut renamed = bob.clone();
    renamed.handle = handle("robert");
    renamed.status = UserStatus::Suspended;
    renamed.role = Role::Admin;
    store.update_user(&renamed).await.expect("update");
    assert_eq!(
        store
            .user_by_handle(&handle("robert"))
            .await
            .expect("lookup"),
        Some(renamed.clone())
    );
    assert_eq!(
        store.user_by_handle(&handle("bob")).await.expect("lookup"),
        None
    );
    let mut clash = renamed.clone();
    clash.handle = handle("ada");
    assert!(matches!(
        store.update_user(&clash).await,
        Err(StoreError::HandleTaken(_))
    ));
    assert!(matches!(
        store.put_user(&User::new(UserId(500), handle("ada"))).await,
        Err(StoreError::HandleTaken(_))
    ));
    assert!(matches!(
        store
            .update_user(&User::new(UserId(999), handle("zed")))
            .await,
        Err(StoreError::NotFound(_))
    ));

    // Deleting the newest user does not free their id.
    assert!(store.delete_user(renamed.id).await.expect("delete"));
    let carol = store
        .create_user(&User::new(UserId(0), handle("carol")), None)
        .await
        .expect("create carol");
    assert!(carol.id > renamed.id, "an id is never reused");
    // An id put explicitly is not handed out again either.
    store
        .put_user(&User::new(UserId(carol.id.0 + 10), handle("dave")))
        .await
        .expect("put dave");
    let erin = store
        .create_user(&User::new(UserId(0), handle("erin")), None)
        .await
        .expect("create erin");
    assert!(erin.id.0 > carol.id.0 + 10);
    let handles: Vec<_> = store
        .list_users()
        .await
        .expect("list")
        .into_iter()
        .map(|u| u.handle.to_string())
        .collect();
    assert_eq!(handles, ["ada", "carol", "dave", "erin"]);
}

/// Deleting a user takes their keys, API keys, quota and the shares made to them,
/// and is refused while they own a VM or a snapshot.
pub async fn store_user_delete(store: &dyn StateStore) {
    let ada = store
        .create_user(&User::new(UserId(0), handle("ada")), Some(&key(1)))
        .await
        .expect("create");
    let other = store
        .create_user(&User::new(UserId(0), handle("bea")), Some(&key(2)))
        .await
        .expect("create");
    store.add_ssh_key(ada.id, &key(3)).await.expect("key");
    store
        .put_api_key(&ApiKey::new("k1", ada.id, "vmk_1"))
        .await
        .expect("api key");
    store
        .put_api_key(&ApiKey::new("k2", other.id, "vmk_2"))
        .await
        .expect("api key");
    store
        .set_quota(ada.id, &Quota::new(1, 1, 1024, 1))
        .await
        .expect("quota");
    let vm = record("web", ada.id, VmSpec::new("tiny"));
    store.create_vm(&vm, &Quota::unlimited()).await.expect("vm");
    let bea_vm = record("bea-vm", other.id, VmSpec::new("tiny"));
    store
        .create_vm(&bea_vm, &Quota::unlimited())
        .await
        .expect("vm");
    let to_ada = Share::new(bea_vm.id, ShareTarget::User(ada.id), Access::Ssh);
    let public = Share::new(bea_vm.id, ShareTarget::Public, Access::Http);
    store.put_share(&to_ada).await.expect("share");
    store.put_share(&public).await.expect("share");
    let snap = store_snapshot("snap", ada.id, 1 << 30, VmSpec::new("tiny"));
    store
        .put_snapshot(&snap, &Quota::unlimited())
        .await
        .expect("snapshot");

    match store.delete_user(ada.id).await {
        Err(StoreError::UserHoldsResources { user, holdings }) => {
            assert_eq!(user, ada.id);
            assert_eq!(holdings, ["VM web", "snapshot snap"]);
        }
        other => panic!("a user with a VM and a snapshot cannot go: {other:?}"),
    }
    assert!(
        store.get_user(ada.id).await.expect("get").is_some(),
        "a refused delete changes nothing"
    );

    // Hand the snapshot over, delete the VM: now the user can go.
    let mut moved = snap.clone();
    moved.owner = other.id;
    store
        .update_snapshot(&moved)
        .await
        .expect("update snapshot");
    assert_eq!(
        store.get_snapshot(&snap.name).await.expect("get"),
        Some(moved.clone())
    );
    assert_eq!(
        store.list_snapshots(Some(ada.id)).await.expect("list"),
        vec![]
    );
    let mut missing = moved.clone();
    missing.name = VmName::new("nope").expect("name");
    assert!(matches!(
        store.update_snapshot(&missing).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.delete_vm(vm.id).await.expect("delete vm"));
    assert!(store.delete_user(ada.id).await.expect("delete user"));
    assert!(!store.delete_user(ada.id).await.expect("again"), "gone");

    assert_eq!(store.get_user(ada.id).await.expect("get"), None);
    assert_eq!(
        store.user_by_handle(&handle("ada")).await.expect("get"),
        None
    );
    assert!(store.ssh_keys(ada.id).await.expect("keys").is_empty());
    for k in [key(1), key(3)] {
        assert_eq!(
            store.user_by_key(&k.fingerprint()).await.expect("key"),
            None,
            "their keys are gone"
        );
    }
    assert_eq!(store.get_api_key("k1").await.expect("api key"), None);
    assert_eq!(store.get_quota(ada.id).await.expect("quota"), None);
    assert_eq!(
        store.shares(bea_vm.id).await.expect("shares"),
        vec![public],
        "shares made to the user are gone, others stay"
    );
    // Nothing of the other user went.
    assert!(store.get_api_key("k2").await.expect("api key").is_some());
    assert_eq!(
        store.user_by_key(&key(2).fingerprint()).await.expect("key"),
        Some(other.id)
    );
    // The handle is free for someone new.
    store
        .create_user(&User::new(UserId(0), handle("ada")), None)
        .await
        .expect("the handle is free again");
}

/// Invites: stored by id with the code's hash only, consumed once, refused when
/// expired.
pub async fn store_invites(store: &dyn StateStore) {
    let (a, code_a) = Invite::new(UserId::LOCAL, Duration::from_secs(3600), Role::User);
    let (b, code_b) = Invite::new(UserId(3), Duration::from_secs(3600), Role::Admin);
    store.put_invite(&a).await.expect("put");
    store.put_invite(&b).await.expect("put");
    let mut listed = store.list_invites().await.expect("list");
    listed.sort_by(|x, y| x.id.cmp(&y.id));
    let mut both = vec![a.clone(), b.clone()];
    both.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(listed, both);

    let now = Timestamp::now();
    assert_eq!(
        store
            .consume_invite("vmi_wrong", now)
            .await
            .expect("consume"),
        None
    );
    assert_eq!(
        store.consume_invite(&code_b, now).await.expect("consume"),
        Some(b.clone())
    );
    assert_eq!(
        store.consume_invite(&code_b, now).await.expect("consume"),
        None,
        "an invite counts once"
    );
    // Past its expiry an invite is refused, and removed.
    let late = Timestamp(a.expires_at.0 + 1);
    assert_eq!(
        store.consume_invite(&code_a, late).await.expect("consume"),
        None
    );
    assert_eq!(store.list_invites().await.expect("list"), vec![]);

    let (c, _) = Invite::new(UserId::LOCAL, Duration::from_secs(60), Role::User);
    store.put_invite(&c).await.expect("put");
    assert!(store.delete_invite(&c.id).await.expect("delete"));
    assert!(!store.delete_invite(&c.id).await.expect("delete"));
}

/// Twenty concurrent uses of one invite code: exactly one gets it.
pub async fn store_concurrent_invite_use(store: Arc<dyn StateStore>) {
    let (invite, code) = Invite::new(UserId::LOCAL, Duration::from_secs(3600), Role::User);
    store.put_invite(&invite).await.expect("put");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = Arc::clone(&store);
            let code = code.clone();
            tokio::spawn(async move { store.consume_invite(&code, Timestamp::now()).await })
        })
        .collect();
    let mut got = 0;
    for task in tasks {
        if task.await.expect("task").expect("consume").is_some() {
            got += 1;
        }
    }
    assert_eq!(got, 1, "exactly one of 20 concurrent uses gets the invite");
}

/// Browser sign-in over the store: a link signs in once, a ticket is bound to its
/// host and used once, host sessions end with the session they came from, and a
/// suspended user's cookies stop working.
pub async fn store_web_sessions(store: Arc<dyn StateStore>) {
    use crate::web::{WebSessions, WebTokenKind};
    let alice = User::new(UserId(1), handle("alice"));
    store.put_user(&alice).await.expect("put user");
    let web = WebSessions::new(Arc::clone(&store));

    let link = web.sign_in_link(alice.id).await.expect("link");
    assert!(link.starts_with(WebTokenKind::SignInLink.prefix()));
    let (session, user) = web
        .redeem_sign_in_link(&link)
        .await
        .expect("redeem")
        .expect("a fresh link signs in");
    assert_eq!(user.id, alice.id);
    assert!(
        web.redeem_sign_in_link(&link)
            .await
            .expect("redeem")
            .is_none(),
        "a link signs in once"
    );
    assert_eq!(
        web.user(&session, None).await.expect("user").map(|u| u.id),
        Some(alice.id)
    );
    // A session is not a host session, and the reverse.
    assert!(
        web.user(&session, Some("web.vm.test"))
            .await
            .expect("user")
            .is_none()
    );

    let ticket = web
        .host_ticket(&session, "WEB.vm.test.")
        .await
        .expect("ticket")
        .expect("a session gets tickets");
    assert!(
        web.redeem_host_ticket(&ticket, "other.vm.test")
            .await
            .expect("redeem")
            .is_none(),
        "a ticket is bound to its host"
    );
    // A try on another host used it up: tickets are single-use whatever happens.
    assert!(
        web.redeem_host_ticket(&ticket, "web.vm.test")
            .await
            .expect("redeem")
            .is_none()
    );
    let ticket = web
        .host_ticket(&session, "web.vm.test")
        .await
        .expect("ticket")
        .expect("ticket");
    let host_session = web
        .redeem_host_ticket(&ticket, "web.vm.test")
        .await
        .expect("redeem")
        .expect("a ticket on its host makes a host session");
    assert!(
        web.redeem_host_ticket(&ticket, "web.vm.test")
            .await
            .expect("redeem")
            .is_none()
    );
    assert_eq!(
        web.user(&host_session, Some("web.vm.test"))
            .await
            .expect("user")
            .map(|u| u.id),
        Some(alice.id)
    );
    assert!(
        web.user(&host_session, Some("other.vm.test"))
            .await
            .expect("user")
            .is_none()
    );
    assert!(web.user(&host_session, None).await.expect("user").is_none());
    assert!(
        web.host_ticket(&host_session, "x.vm.test")
            .await
            .expect("ticket")
            .is_none()
    );

    // Suspended: every cookie stops working; resumed: they work again.
    let mut suspended = alice.clone();
    suspended.status = UserStatus::Suspended;
    store.put_user(&suspended).await.expect("suspend");
    assert!(web.user(&session, None).await.expect("user").is_none());
    assert!(
        web.user(&host_session, Some("web.vm.test"))
            .await
            .expect("user")
            .is_none()
    );
    store.put_user(&alice).await.expect("resume");

    // Signing out of the apex session ends the host sessions handed from it.
    assert!(web.sign_out(&session).await.expect("sign out"));
    assert!(web.user(&session, None).await.expect("user").is_none());
    assert!(
        web.user(&host_session, Some("web.vm.test"))
            .await
            .expect("user")
            .is_none()
    );
    assert!(!web.sign_out(&session).await.expect("sign out"));

    // Everywhere: every token of the user, and only theirs.
    let bob = User::new(UserId(2), handle("bob"));
    store.put_user(&bob).await.expect("put user");
    let a1 = web.sign_in_link(alice.id).await.expect("link");
    let (a1, _) = web
        .redeem_sign_in_link(&a1)
        .await
        .expect("redeem")
        .expect("session");
    let b1 = web.sign_in_link(bob.id).await.expect("link");
    let (b1, _) = web
        .redeem_sign_in_link(&b1)
        .await
        .expect("redeem")
        .expect("session");
    assert!(web.sign_out_everywhere(alice.id).await.expect("everywhere") >= 1);
    assert!(web.user(&a1, None).await.expect("user").is_none());
    assert!(web.user(&b1, None).await.expect("user").is_some());

    // Expired tokens are refused and purged.
    let short = WebSessions::new(Arc::clone(&store)).with_ttls(crate::web::WebTtls {
        sign_in_link: Duration::ZERO,
        ..Default::default()
    });
    let stale = short.sign_in_link(bob.id).await.expect("link");
    assert!(
        short
            .redeem_sign_in_link(&stale)
            .await
            .expect("redeem")
            .is_none()
    );
    let stale = short.sign_in_link(bob.id).await.expect("link");
    assert!(
        store
            .purge_web_tokens(Timestamp::now())
            .await
            .expect("purge")
            >= 1
    );
    assert!(
        store
            .get_web_token(&crate::token::TokenHash::of(&stale))
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        web.user(&b1, None).await.expect("user").is_some(),
        "live sessions stay"
    );

    // Twenty concurrent uses of one link: exactly one signs in.
    let link = web.sign_in_link(bob.id).await.expect("link");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let web = web.clone();
            let link = link.clone();
            tokio::spawn(async move { web.redeem_sign_in_link(&link).await })
        })
        .collect();
    let mut got = 0;
    for task in tasks {
        if task.await.expect("task").expect("redeem").is_some() {
            got += 1;
        }
    }
    assert_eq!(
        got, 1,
        "exactly one of 20 concurrent uses of a link signs in"
    );

    // By email: the active user with that address (in any case), nobody else.
    let carol = User::new(UserId(9), handle("carol")).email(Some("Carol@Example.com".into()));
    store.put_user(&carol).await.expect("put carol");
    let (link, who) = web
        .sign_in_link_for_email(" carol@example.COM ")
        .await
        .expect("by email")
        .expect("carol's address");
    assert_eq!(who.id, carol.id);
    let (_, signed_in) = web
        .redeem_sign_in_link(&link)
        .await
        .expect("redeem")
        .expect("the mailed link signs in");
    assert_eq!(signed_in.id, carol.id);
    for nobody in ["", "dave@example.com", "carol"] {
        assert!(
            web.sign_in_link_for_email(nobody)
                .await
                .expect("by email")
                .is_none(),
            "{nobody:?}"
        );
    }
    let mut suspended = carol.clone();
    suspended.status = crate::user::UserStatus::Suspended;
    store.put_user(&suspended).await.expect("suspend carol");
    assert!(
        web.sign_in_link_for_email("carol@example.com")
            .await
            .expect("by email")
            .is_none(),
        "a suspended user gets no link"
    );
}

/// Snapshot records: unique names, lookup, listing by owner, delete.
pub async fn store_snapshots(store: &dyn StateStore) {
    use crate::snapshot::Snapshot;
    use crate::storage::Volume;
    let snapshot = |name: &str, owner: UserId| {
        let id = VmId::generate();
        Snapshot {
            name: VmName::new(name).expect("valid name"),
            id,
            vm: VmId::generate(),
            vm_name: VmName::new("web").expect("valid name"),
            owner,
            spec: VmSpec::new("tiny"),
            root: Volume::new(
                id,
                VolumeKind::Root,
                format!("/v/root-{id}.raw").into(),
                DiskFormat::Raw,
                1 << 30,
            ),
            data: None,
            memory: Some(format!("/s/{id}").into()),
            mac: None,
            hypervisor: None,
            created_at: crate::time::Timestamp::now(),
        }
    };
    let quota = Quota::unlimited();
    let a = snapshot("a", UserId(1));
    store.put_snapshot(&a, &quota).await.expect("put");
    assert!(
        matches!(
            store.put_snapshot(&snapshot("a", UserId(2)), &quota).await,
            Err(StoreError::SnapshotTaken(_))
        ),
        "snapshot names are unique"
    );
    store
        .put_snapshot(&snapshot("b", UserId(2)), &quota)
        .await
        .expect("put");
    assert_eq!(
        store.get_snapshot(&a.name).await.expect("get"),
        Some(a.clone())
    );
    assert_eq!(store.list_snapshots(None).await.expect("list").len(), 2);
    assert_eq!(
        store.list_snapshots(Some(UserId(1))).await.expect("list"),
        vec![a.clone()]
    );
    assert!(store.delete_snapshot(&a.name).await.expect("delete"));
    assert!(!store.delete_snapshot(&a.name).await.expect("delete"));
    assert_eq!(store.get_snapshot(&a.name).await.expect("get"), None);
}

// ---------------------------------------------------------------- gateway

/// What the gateway suite needs: a way to make users, keys, VMs and shares known
/// to the gateway under test.
#[async_trait]
pub trait GatewayFixture: Send + Sync {
    /// The domain the gateway serves (`NAME.domain`).
    fn domain(&self) -> &str;
    /// Makes `user` known, with `key` when given.
    async fn add_user(&self, user: &User, key: Option<&SshPublicKey>);
    /// Makes `key` an API key the gateway identifies.
    async fn add_api_key(&self, key: &ApiKey);
    /// Makes `vm` routable.
    async fn add_vm(&self, vm: &VmRecord);
    /// Shares `vm` with `target`, granting `access`.
    async fn share(&self, vm: &VmRecord, target: ShareTarget, access: Access);
}

/// Two real ed25519 keys made by ssh-keygen.
const ALICE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILCkWGIcqzUfwK2Ls1cyvWoL0Yu96sujsXIbpy6qXyQg alice@example";
const CAROL_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDEarYz70Byb4F3tObLPQOH7OcIbLkodxbuDcfZAAi+t carol@example";

/// Identity, routing and access decisions of a [`Gateway`].
pub async fn gateway_suite(gateway: &dyn Gateway, fx: &dyn GatewayFixture) {
    use crate::access::{Action, Caller, Denied, Door};
    use crate::gateway::{Credential, RouteTarget};
    use crate::token::TokenHash;
    use crate::user::{Role, UserStatus};

    let domain = fx.domain().to_owned();
    let mut alice = User::new(
        UserId(1),
        crate::user::Handle::new("alice").expect("handle"),
    );
    alice.role = Role::User;
    let alice_key = SshPublicKey::parse(ALICE_KEY).expect("key");
    fx.add_user(&alice, Some(&alice_key)).await;
    let mut bob = User::new(UserId(2), crate::user::Handle::new("bob").expect("handle"));
    bob.status = UserStatus::Suspended;
    fx.add_user(&bob, None).await;
    let (api_key, api_secret) = ApiKey::generate(alice.id);
    fx.add_api_key(&api_key).await;

    // Identity.
    let by_key = gateway
        .identify(Credential::SshKey(&alice_key), Door::Ssh)
        .await
        .expect("identify")
        .expect("alice's key identifies her");
    assert_eq!(by_key, Caller::user(&alice, Door::Ssh));
    let unknown = SshPublicKey::parse(CAROL_KEY).expect("key");
    assert_eq!(
        gateway
            .identify(Credential::SshKey(&unknown), Door::Ssh)
            .await
            .expect("identify"),
        None,
        "a key nobody registered is first contact"
    );
    let by_api = gateway
        .identify(Credential::ApiKey(&api_secret), Door::Https)
        .await
        .expect("identify");
    assert_eq!(
        by_api,
        Some(Caller::user(&alice, Door::Https).with_api_key(&api_key)),
        "a key's caller carries its limits"
    );
    let (expired, expired_secret) = ApiKey::generate(alice.id);
    fx.add_api_key(&expired.expires_at(Timestamp(1))).await;
    assert_eq!(
        gateway
            .identify(Credential::ApiKey(&expired_secret), Door::Https)
            .await
            .expect("identify"),
        None,
        "an expired key identifies nobody"
    );
    let mut forged = api_secret.clone();
    forged.pop();
    forged.push(if api_secret.ends_with('A') { 'B' } else { 'A' });
    for wrong in [forged.as_str(), "vmk_", "vmk_nope_x", "not-a-key", ""] {
        assert_eq!(
            gateway
                .identify(Credential::ApiKey(wrong), Door::Https)
                .await
                .expect("identify"),
            None,
            "{wrong:?} identifies nobody"
        );
    }

    // Routing.
    let web = record("web", alice.id, VmSpec::new("tiny"));
    fx.add_vm(&web).await;
    let by_user = gateway
        .route(RouteTarget::SshUser("WEB"))
        .await
        .expect("route")
        .expect("the VM's name routes");
    assert_eq!(
        (
            by_user.upstream.vm,
            &by_user.upstream.name,
            by_user.upstream.port
        ),
        (web.id, &web.name, crate::gateway::GUEST_SSH_PORT)
    );
    assert_eq!(by_user.vm.id, web.id, "the record comes with the route");
    let as_root = gateway
        .route(RouteTarget::SshUser("web+root"))
        .await
        .expect("route")
        .expect("routes");
    assert_eq!(as_root.upstream.guest_user.as_deref(), Some("root"));
    for lobby in ["alice", "Not_A_Name", ""] {
        assert!(
            gateway
                .route(RouteTarget::SshUser(lobby))
                .await
                .expect("route")
                .is_none(),
            "{lobby:?} names no VM: the lobby's"
        );
    }
    let host = format!("web.{domain}");
    let http = gateway
        .route(RouteTarget::Http {
            host: &host,
            port: None,
        })
        .await
        .expect("route")
        .expect("NAME.domain routes");
    assert_eq!(http.upstream.port, crate::gateway::DEFAULT_HTTP_PORT);
    // The URL's own port is the edge's, not the guest's.
    let upper = format!("WEB.{}.", domain.to_ascii_uppercase());
    let any_port = gateway
        .route(RouteTarget::Http {
            host: &upper,
            port: Some(8443),
        })
        .await
        .expect("route")
        .expect("routes whatever the case, with a final dot");
    assert_eq!(
        (any_port.upstream.vm, any_port.upstream.port),
        (web.id, crate::gateway::DEFAULT_HTTP_PORT)
    );
    // Another guest port: NAME--PORT.domain.
    let upper = format!("WEB--8080.{}.", domain.to_ascii_uppercase());
    let port = gateway
        .route(RouteTarget::Http {
            host: &upper,
            port: Some(8443),
        })
        .await
        .expect("route")
        .expect("NAME--PORT.domain routes");
    assert_eq!((port.upstream.vm, port.upstream.port), (web.id, 8080));
    let jump = gateway
        .route(RouteTarget::SshJump {
            host: &host,
            port: 22,
        })
        .await
        .expect("route")
        .expect("a jump to NAME.domain routes");
    assert_eq!(jump.upstream.vm, web.id);
    let ghost = format!("ghost.{domain}");
    assert!(
        gateway
            .route(RouteTarget::Http {
                host: &ghost,
                port: None
            })
            .await
            .expect("route")
            .is_none()
    );
    for outside in ["web.elsewhere.test".to_owned(), format!("a.web.{domain}")] {
        assert!(
            gateway
                .route(RouteTarget::Http {
                    host: &outside,
                    port: None
                })
                .await
                .is_err(),
            "{outside} is not served"
        );
    }

    // Policy, decided on what the route read.
    let carol = User::new(
        UserId(3),
        crate::user::Handle::new("carol").expect("handle"),
    );
    fx.add_user(&carol, None).await;
    let carol_caller = Caller::user(&carol, Door::Https);
    let anonymous = Caller::anonymous(Door::Https);
    assert_eq!(gateway.authorize(&by_key, Action::UseSsh, &by_user), Ok(()));
    assert_eq!(
        gateway.authorize(&carol_caller, Action::UseHttp, &http),
        Err(Denied::NotFound),
        "a VM one may not see is not found"
    );
    assert_eq!(
        gateway.authorize(&anonymous, Action::UseHttp, &http),
        Err(Denied::NotFound)
    );
    let suspended = Caller::user(&bob, Door::Ssh);
    assert_eq!(
        gateway.authorize(&suspended, Action::UseSsh, &by_user),
        Err(Denied::Suspended)
    );
    fx.share(&web, ShareTarget::User(carol.id), Access::Http)
        .await;
    let link = "vms_the-link-secret";
    fx.share(&web, ShareTarget::Link(TokenHash::of(link)), Access::Ssh)
        .await;
    let http = gateway
        .route(RouteTarget::Http {
            host: &host,
            port: None,
        })
        .await
        .expect("route")
        .expect("routes");
    assert_eq!(
        gateway.authorize(&carol_caller, Action::UseHttp, &http),
        Ok(())
    );
    assert!(
        matches!(
            gateway.authorize(&carol_caller, Action::UseSsh, &http),
            Err(Denied::Forbidden { .. })
        ),
        "a share grants only what it names"
    );
    let holder = gateway
        .identify(Credential::ShareLink(link), Door::Ssh)
        .await
        .expect("identify")
        .expect("a link identifies its holder");
    assert_eq!(gateway.authorize(&holder, Action::UseSsh, &http), Ok(()));
    let guesser = Caller::link("vms_a-guess", Door::Ssh);
    assert_eq!(
        gateway.authorize(&guesser, Action::UseSsh, &http),
        Err(Denied::NotFound)
    );
    fx.share(&web, ShareTarget::Public, Access::Http).await;
    let http = gateway
        .route(RouteTarget::Http {
            host: &host,
            port: None,
        })
        .await
        .expect("route")
        .expect("routes");
    assert_eq!(
        gateway.authorize(&anonymous, Action::UseHttp, &http),
        Ok(())
    );
    let mut admin = User::new(
        UserId(4),
        crate::user::Handle::new("root-admin").expect("handle"),
    );
    admin.role = Role::Admin;
    assert_eq!(
        gateway.authorize(&Caller::user(&admin, Door::Https), Action::UseSsh, &http),
        Ok(())
    );
}
