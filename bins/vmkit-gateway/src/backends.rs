//! Picks and builds the backends the manager drives.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tracing::{info, warn};
use vmkit_core::{Backends, DirImageCatalog, Hypervisor, StateStore};

use crate::config::{Config, HypervisorChoice};

/// The real backends: the redb store, file volumes and the chosen hypervisor.
pub fn real(config: &Config) -> anyhow::Result<Backends> {
    let store: Arc<dyn StateStore> = Arc::new(
        vmkit_store::RedbStore::open(config.data_dir.join("state.redb"))
            .context("opening the state store")?,
    );
    let storage = vmkit_store::FileStorage::new(config.data_dir.join("volumes"))
        .context("preparing the volume directory")?;
    let images = DirImageCatalog::new(config.data_dir.join("images"));
    let hypervisor = hypervisor(config)?;
    info!(
        hypervisor = hypervisor.kind(),
        data_dir = %config.data_dir.display(),
        "backends ready"
    );
    Ok(Backends::new(
        hypervisor,
        Arc::new(storage),
        store,
        Arc::new(images),
    ))
}

fn hypervisor(config: &Config) -> anyhow::Result<Arc<dyn Hypervisor>> {
    let qemu = || -> anyhow::Result<Arc<dyn Hypervisor>> {
        let accel = match config.qemu.accel.as_str() {
            "auto" => vmkit_hv::Accel::Auto,
            "kvm" => vmkit_hv::Accel::Kvm,
            "tcg" => vmkit_hv::Accel::Tcg,
            other => bail!("qemu.accel = {other:?}; use auto, kvm or tcg"),
        };
        let qemu_config = vmkit_hv::QemuConfig::new()
            .with_binary(config.qemu.binary.clone())
            .with_accel(accel);
        Ok(Arc::new(vmkit_hv::Qemu::new(qemu_config)))
    };
    match config.hypervisor {
        HypervisorChoice::Qemu => qemu(),
        HypervisorChoice::Auto => {
            // cloud-hypervisor is picked by auto once its backend lands; until then
            // auto means QEMU.
            qemu()
        }
        HypervisorChoice::CloudHypervisor => bail!(
            "hypervisor = \"cloud-hypervisor\" is not available in this build yet; use \"qemu\" or \"auto\""
        ),
    }
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
