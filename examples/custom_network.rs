//! Run with: `cargo run -p vmkit-examples --example custom_network` (needs no root,
//! no KVM and no image).
//!
//! A backend of your own: a [`Network`] that creates nothing on the host. It logs
//! every call and hands out the addresses of a small fixed list (the five guest
//! addresses of `10.99.0.0/29`), as a network managed elsewhere would. The example
//! first runs vmkit's generic network suite against it (the same checks the bridge
//! backend passes), then plugs it into a manager and checks what VMs get.
//!
//! The manager runs on the **fake hypervisor** (and the other in-memory fakes of
//! `vmkit_core::testing`), not on QEMU: the manager hands the hypervisor the TAP name
//! of every attachment, and QEMU creates a TAP it is given if none exists, which
//! would change the host's network. The fake guests speak the real agent protocol,
//! so the check that each guest was told its address is real.
//!
//! How addresses flow: the manager leases one from the state store over the
//! backend's [`Network::pool`] (the store never hands out an address twice), then
//! asks the backend to [`attach`](Network::attach) the VM with that lease.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure};
use vmkit_core::testing::{FakeHypervisor, FakeImages, FakeStorage, MemoryStore, suites};
use vmkit_core::{
    Backends, CreateRequest, DeleteOptions, IpLease, IpPool, Manager, ManagerConfig, ManagerError,
    NetAttachment, Network, NetworkCapabilities, NetworkError, StoreError, UserId, VmId, VmSpec,
    async_trait,
};

/// A [`Network`] that only logs and hands out addresses from a fixed list.
#[derive(Debug)]
struct StaticNetwork {
    pool: IpPool,
    /// The addresses guests may have; the pool's guest addresses.
    addresses: Vec<Ipv4Addr>,
    attached: Mutex<BTreeMap<VmId, NetAttachment>>,
}

impl StaticNetwork {
    fn new(pool: IpPool) -> Self {
        let addresses = pool.guest_addresses().collect();
        tracing::info!(?addresses, gateway = %pool.host_address(), "static network");
        Self {
            pool,
            addresses,
            attached: Mutex::default(),
        }
    }

    fn attached(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, NetAttachment>> {
        // A panic elsewhere cannot leave the map half-written: take it anyway.
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Network for StaticNetwork {
    fn capabilities(&self) -> NetworkCapabilities {
        // No isolation, NAT or anti-spoofing: this backend enforces nothing.
        NetworkCapabilities::default()
    }

    fn pool(&self) -> IpPool {
        self.pool
    }

    async fn setup_host(&self) -> Result<(), NetworkError> {
        tracing::info!("setup_host: nothing to set up");
        Ok(())
    }

    async fn attach(&self, vm: VmId, lease: &IpLease) -> Result<NetAttachment, NetworkError> {
        if !self.addresses.contains(&lease.ip) {
            tracing::warn!(%vm, ip = %lease.ip, "attach refused: not one of our addresses");
            return Err(NetworkError::ForeignLease(lease.ip));
        }
        let mut attached = self.attached();
        let attachment = attached.entry(vm).or_insert_with(|| {
            // The name a TAP would have; none is created.
            let tap = format!("static{}", u32::from(lease.ip) & 0xff);
            NetAttachment::new(lease, tap, vec![lease.gateway])
        });
        tracing::info!(%vm, ip = %attachment.ip, mac = %attachment.mac, "attach");
        Ok(attachment.clone())
    }

    async fn detach(&self, vm: VmId) -> Result<(), NetworkError> {
        let gone = self.attached().remove(&vm);
        tracing::info!(%vm, ip = ?gone.map(|a| a.ip), "detach");
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VmId>, NetworkError> {
        Ok(self.attached().keys().copied().collect())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vmkit_examples::init_logging(env!("CARGO_CRATE_NAME"));
    let pool = IpPool::new("10.99.0.0/29".parse()?)?;

    // 1. The generic suite: every Network backend must pass it. It panics, naming
    //    the broken rule, when the backend does something wrong.
    suites::network_suite(&StaticNetwork::new(pool)).await;
    println!("StaticNetwork passes vmkit's network suite");

    // 2. The backend in a manager (on the fake hypervisor: see the header).
    let network = Arc::new(StaticNetwork::new(pool));
    let hypervisor = FakeHypervisor::new();
    let backends = Backends::new(
        Arc::new(hypervisor.clone()),
        Arc::new(FakeStorage::new()),
        Arc::new(MemoryStore::new()),
        Arc::new(FakeImages::with(&["tiny"])),
    )
    .with_network(network.clone());
    let manager = Manager::new(ManagerConfig::new("/nonexistent/vmkit"), backends).await?;
    // Nothing here outlives the process (the fakes live in memory), but a real
    // program would still remove what it made on every path out.
    vmkit_examples::run_then_remove_all(&manager, move |manager| {
        use_the_network(manager, network, hypervisor)
    })
    .await
}

async fn use_the_network(
    manager: Manager,
    network: Arc<StaticNetwork>,
    hypervisor: FakeHypervisor,
) -> anyhow::Result<()> {
    let create = || manager.create(CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny")));

    // Every address of the list, once each, and each guest is told its own.
    let mut vms = Vec::new();
    for _ in 0..network.addresses.len() {
        let vm = create().await?;
        let net = vm
            .resources
            .net
            .clone()
            .ok_or_else(|| anyhow!("{} has no network", vm.name))?;
        let pid = vm.resources.vmm.as_ref().map(|h| h.pid).unwrap_or_default();
        let told = hypervisor
            .guest(pid)
            .and_then(|g| g.network)
            .map(|n| n.address);
        ensure!(
            told == Some(net.ip),
            "{} was told {told:?}, not {}",
            vm.name,
            net.ip
        );
        println!("{:<20} {:<12} {} on {}", vm.name, net.ip, net.mac, net.tap);
        vms.push(vm);
    }
    let mut given: Vec<Ipv4Addr> = vms
        .iter()
        .filter_map(|v| v.resources.net.as_ref().map(|n| n.ip))
        .collect();
    given.sort();
    ensure!(
        given == network.addresses,
        "the VMs got {given:?}, not the list"
    );

    // The list is used up: the next create is refused, and leaves nothing behind.
    match create().await {
        Err(ManagerError::Store(StoreError::PoolExhausted(pool))) => {
            println!("a sixth VM is refused: no free address in {pool}")
        }
        other => bail!("a VM beyond the list was not refused: {other:?}"),
    }
    ensure!(
        network.list().await?.len() == vms.len(),
        "the refused VM left an attachment"
    );

    // Deleting a VM gives its address back for the next one.
    let freed = vms.remove(0);
    manager
        .delete(&freed.name, DeleteOptions::default())
        .await?;
    let again = create().await?;
    ensure!(
        again.resources.net.as_ref().map(|n| n.ip) == freed.resources.net.as_ref().map(|n| n.ip),
        "the freed address was not handed out again"
    );
    println!("{} got the address {} left", again.name, freed.name);
    Ok(())
}
