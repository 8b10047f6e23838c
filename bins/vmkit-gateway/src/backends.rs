//! Picks and builds the backends the manager drives.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tracing::{info, warn};
use vmkit_core::{Backends, DirImageCatalog, Hypervisor, StateStore};

use vmkit_hv::probe::{self, Backend, Preference, ProbeOptions};

use crate::config::Config;

/// The real backends: the redb store, file volumes and the chosen hypervisor.
pub async fn real(config: &Config) -> anyhow::Result<Backends> {
    let store: Arc<dyn StateStore> = Arc::new(
        vmkit_store::RedbStore::open(config.data_dir.join("state.redb"))
            .context("opening the state store")?,
    );
    let storage = vmkit_store::FileStorage::new(config.data_dir.join("volumes"))
        .context("preparing the volume directory")?;
    let images = DirImageCatalog::new(config.data_dir.join("images"));
    let hypervisor = hypervisor(config).await?;
    info!(
        hypervisor = hypervisor.kind(),
        data_dir = %config.data_dir.display(),
        "backends ready"
    );
    let backends = Backends::new(hypervisor, Arc::new(storage), store, Arc::new(images));
    Ok(match network(config)? {
        Some(network) => backends.with_network(network),
        None => backends,
    })
}

/// The bridge network, when enabled.
fn network(config: &Config) -> anyhow::Result<Option<Arc<dyn vmkit_core::Network>>> {
    let n = &config.network;
    if !n.enabled {
        warn!("guest networking is off (network.enabled = false): VMs get no NIC");
        return Ok(None);
    }
    let subnet: vmkit_core::Ipv4Net = n
        .subnet
        .parse()
        .with_context(|| format!("network.subnet = {:?}", n.subnet))?;
    let dns = match n.dns.as_str() {
        "auto" => vmkit_net::DnsForwarding::Auto,
        "local" => vmkit_net::DnsForwarding::Local,
        ip => vmkit_net::DnsForwarding::To(ip.parse().with_context(|| {
            format!("network.dns = {ip:?}; use auto, local or an IPv4 address")
        })?),
    };
    let bridge = vmkit_net::BridgeNetwork::new(
        vmkit_net::BridgeConfig::new()
            .bridge(n.bridge.clone())
            .subnet(subnet)
            .dns(dns),
    )
    .context("configuring the bridge network")?;
    Ok(Some(Arc::new(bridge)))
}

/// Picks the hypervisor: the configured one, or for `auto` cloud-hypervisor when
/// its program is installed and KVM boots a standard guest, else QEMU.
async fn hypervisor(config: &Config) -> anyhow::Result<Arc<dyn Hypervisor>> {
    let accel = match config.qemu.accel.as_str() {
        "auto" => vmkit_hv::Accel::Auto,
        "kvm" => vmkit_hv::Accel::Kvm,
        "tcg" => vmkit_hv::Accel::Tcg,
        other => bail!("qemu.accel = {other:?}; use auto, kvm or tcg"),
    };
    let backend = match config.hypervisor {
        Preference::Qemu => Backend::Qemu,
        Preference::CloudHypervisor => Backend::CloudHypervisor,
        _ => {
            let options = ProbeOptions::new(&config.data_dir)
                .cloud_hypervisor(config.cloud_hypervisor.binary.clone())
                .qemu(config.qemu.binary.clone());
            let report = probe::probe_host_with_boot(&options).await;
            let choice = probe::choose_backend(Preference::Auto, &report);
            info!(backend = ?choice.backend, reason = %choice.reason, "hypervisor = auto");
            for problem in &choice.problems {
                warn!(%problem, "host problem");
            }
            choice.backend
        }
    };
    Ok(match backend {
        Backend::CloudHypervisor => Arc::new(vmkit_hv::CloudHypervisor::new(
            vmkit_hv::ChConfig::new().binary(config.cloud_hypervisor.binary.clone()),
        )),
        _ => Arc::new(vmkit_hv::Qemu::new(
            vmkit_hv::QemuConfig::new()
                .binary(config.qemu.binary.clone())
                .accel(accel),
        )),
    })
}

/// In-memory fakes of every backend, for trying the API without a KVM host. Nothing
/// is persisted and no VM is real.
pub fn fake(data_dir: &Path) -> Backends {
    use vmkit_core::testing::{FakeHypervisor, FakeImages, FakeNetwork, FakeStorage, MemoryStore};
    warn!(
        data_dir = %data_dir.display(),
        "running on FAKE backends: VMs are simulated in memory and nothing is persisted"
    );
    let pool = vmkit_core::IpPool::new(
        "10.88.0.0/16"
            .parse()
            .expect("the literal is a valid network"),
    )
    .expect("a /16 is a valid pool");
    Backends::new(
        Arc::new(FakeHypervisor::new()),
        Arc::new(FakeStorage::new()),
        Arc::new(MemoryStore::new()),
        Arc::new(FakeImages::with(&["tiny", "base"])),
    )
    .with_network(Arc::new(FakeNetwork::new(pool)))
}
