#![allow(clippy::unwrap_used)]
//! The generic trait suites on the in-memory fakes.

use std::sync::Arc;

use vmkit_core::testing::suites::{self, GatewayFixture, HypervisorFixture, StorageFixture};
use vmkit_core::testing::{FakeHypervisor, FakeNetwork, FakeStorage, MemoryStore};
use vmkit_core::{
    Access, ApiKey, DiskConfig, DiskFormat, Image, IpPool, MachineConfig, Quota, Share,
    ShareTarget, SshPublicKey, StateStore, StoreGateway, User, VmId, VmName, VmRecord, Volume,
};

struct Fixture;

impl HypervisorFixture for Fixture {
    fn machine(&self, name: &str) -> MachineConfig {
        let mut config = MachineConfig::new(
            VmId::generate(),
            VmName::new(name).unwrap(),
            "/nonexistent/run".into(),
            "/nonexistent/vmlinuz".into(),
        );
        config
            .disks
            .push(DiskConfig::new("/nonexistent/root", DiskFormat::Raw));
        config
    }
}

/// Reads and writes volumes through the fake's own contents.
struct FakeStorageFixture(FakeStorage);

#[async_trait::async_trait]
impl StorageFixture for FakeStorageFixture {
    fn image(&self) -> Image {
        Image::synthetic("tiny")
    }
    async fn write(&self, volume: &Volume, offset: u64, data: &[u8]) {
        self.0.write(&volume.path, offset, data).unwrap();
    }
    async fn read(&self, volume: &Volume, offset: u64, len: usize) -> Vec<u8> {
        self.0.read(&volume.path, offset, len).unwrap()
    }
}

#[tokio::test]
async fn fake_hypervisor_passes_the_hypervisor_suite() {
    suites::hypervisor_suite(&FakeHypervisor::new(), &Fixture).await;
}

#[tokio::test]
async fn fake_storage_passes_the_storage_suite() {
    let storage = FakeStorage::new();
    suites::storage_suite(&storage, &FakeStorageFixture(storage.clone())).await;
}

#[tokio::test]
async fn fake_network_passes_the_network_suite() {
    let pool = IpPool::new("10.88.0.0/16".parse().unwrap()).unwrap();
    suites::network_suite(&FakeNetwork::new(pool)).await;
}

#[tokio::test]
async fn memory_store_passes_the_store_suite() {
    suites::store_suite(|| async { Arc::new(MemoryStore::new()) as Arc<dyn StateStore> }).await;
}

struct StoreGatewayFixture(Arc<MemoryStore>);

#[async_trait::async_trait]
impl GatewayFixture for StoreGatewayFixture {
    fn domain(&self) -> &str {
        "example.test"
    }
    async fn add_user(&self, user: &User, key: Option<&SshPublicKey>) {
        self.0.put_user(user).await.unwrap();
        if let Some(key) = key {
            self.0.add_ssh_key(user.id, key).await.unwrap();
        }
    }
    async fn add_api_key(&self, key: &ApiKey) {
        self.0.put_api_key(key).await.unwrap();
    }
    async fn add_vm(&self, vm: &VmRecord) {
        self.0.create_vm(vm, &Quota::unlimited()).await.unwrap();
    }
    async fn share(&self, vm: &VmRecord, target: ShareTarget, access: Access) {
        self.0
            .put_share(&Share::new(vm.id, target, access))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn store_gateway_passes_the_gateway_suite() {
    let store = Arc::new(MemoryStore::new());
    let gw = StoreGateway::new(store.clone(), "example.test");
    suites::gateway_suite(&gw, &StoreGatewayFixture(store)).await;
}
