//! Complete in-memory fakes of every backend, failure injection, and the generic
//! trait suites that real backends must pass too. Enabled by the `testing` feature.
//!
//! ```
//! use vmkit_core::testing::FakeHost;
//! use vmkit_core::{CreateRequest, UserId, VmSpec};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), vmkit_core::ManagerError> {
//! let host = FakeHost::new().await;
//! let vm = host.manager.create(CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny"))).await?;
//! assert_eq!(vm.state, vmkit_core::VmState::Running);
//! assert_eq!(host.holdings().await.vmms, 1);
//! # Ok(())
//! # }
//! ```

mod assets;
mod dns;
mod faults;
mod gateway;
mod hypervisor;
mod images;
mod network;
pub mod policy;
mod storage;
mod store;
pub mod suites;

use std::sync::Arc;

pub use assets::{test_data_dir, test_image, test_images_dir};
pub use dns::FakeDns;
pub use faults::{Breakage, Faults, InjectedFault};
pub use gateway::LoopbackGateway;
pub use hypervisor::{AgentBehavior, FAKE_LOOPBACK_HTTP_PORT, FakeHypervisor, GuestState};
pub use images::FakeImages;
pub use network::FakeNetwork;
pub use storage::{FakeStorage, Hold};
pub use store::MemoryStore;

use crate::address::IpPool;
use crate::manager::{Backends, Manager, ManagerConfig};
use crate::network::Network;
use crate::state_store::StateStore;
use crate::storage::Storage;

/// A manager on fakes that share one [`Faults`], with handles to every fake so
/// tests can inspect what exists.
#[derive(Debug, Clone)]
pub struct FakeHost {
    /// The manager under test.
    pub manager: Manager,
    /// The shared failure injector.
    pub faults: Faults,
    /// The hypervisor.
    pub hypervisor: FakeHypervisor,
    /// The storage.
    pub storage: FakeStorage,
    /// The network.
    pub network: FakeNetwork,
    /// The state store.
    pub store: Arc<MemoryStore>,
    /// The DNS that custom domains are proven in ([`FakeHost::DOMAIN`] is the VM
    /// domain).
    pub dns: FakeDns,
}

/// What a [`FakeHost`] holds, for leak checks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// VM records.
    pub vms: usize,
    /// Volumes.
    pub volumes: usize,
    /// TAPs.
    pub taps: usize,
    /// IP leases.
    pub leases: usize,
    /// Running VMMs.
    pub vmms: usize,
}

impl FakeHost {
    /// The VM domain of a fake host's custom domains.
    pub const DOMAIN: &'static str = "vm.test";

    /// A fake host with the images `tiny` and `base`, a 10.88.0.0/16 pool and
    /// custom domains proven in [`FakeHost::dns`].
    pub async fn new() -> Self {
        Self::with_config(ManagerConfig::new("/nonexistent/vmkit")).await
    }

    /// A fake host with the given manager config.
    pub async fn with_config(config: ManagerConfig) -> Self {
        let faults = Faults::new();
        let hypervisor = FakeHypervisor::with_faults(faults.clone());
        let storage = FakeStorage::with_faults(faults.clone());
        let pool = IpPool::new("10.88.0.0/16".parse().expect("valid CIDR")).expect("valid pool");
        let network = FakeNetwork::with_faults(pool, faults.clone());
        let store = Arc::new(MemoryStore::with_faults(faults.clone()));
        let backends = Backends::new(
            Arc::new(hypervisor.clone()),
            Arc::new(storage.clone()),
            store.clone(),
            Arc::new(FakeImages::with(&["tiny", "base"])),
        )
        .with_network(Arc::new(network.clone()));
        let dns = FakeDns::new();
        let backends = backends.with_custom_domains(crate::domain::CustomDomains::new(
            Self::DOMAIN,
            Arc::new(dns.clone()),
        ));
        let manager = Manager::new(config, backends)
            .await
            .expect("fake network setup cannot fail");
        Self {
            manager,
            faults,
            hypervisor,
            storage,
            network,
            store,
            dns,
        }
    }

    /// Counts what exists on the fake host.
    pub async fn holdings(&self) -> Holdings {
        Holdings {
            vms: self.store.list_vms(None).await.map_or(0, |v| v.len()),
            volumes: self.storage.list().await.map_or(0, |v| v.len()),
            taps: self.network.list().await.map_or(0, |v| v.len()),
            leases: self.store.list_leases().await.map_or(0, |v| v.len()),
            vmms: self.hypervisor.running().len(),
        }
    }
}
