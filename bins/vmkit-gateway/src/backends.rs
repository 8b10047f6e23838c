//! Picks and builds the backends the manager drives.

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
    let storage = storage(config)?;
    let images = DirImageCatalog::new(config.data_dir.join("images"));
    let hypervisor = hypervisor(config).await?;
    info!(
        hypervisor = hypervisor.kind(),
        data_dir = %config.data_dir.display(),
        "backends ready"
    );
    let backends = Backends::new(hypervisor, storage, store, Arc::new(images));
    Ok(match network(config)? {
        Some(network) => backends.with_network(network),
        None => backends,
    })
}

/// File volumes under the data directory, or LVM thin volumes.
fn storage(config: &Config) -> anyhow::Result<Arc<dyn vmkit_core::Storage>> {
    let s = &config.storage;
    match s.backend.as_str() {
        "file" => {
            let mut file = vmkit_store::FileStorageConfig::new(config.data_dir.join("volumes"));
            file = match s.clone_method.as_str() {
                "auto" => file,
                "reflink" => file.clone_method(vmkit_core::CloneMethod::Reflink),
                "qcow2" => file.clone_method(vmkit_core::CloneMethod::Qcow2Overlay),
                "copy" => file.clone_method(vmkit_core::CloneMethod::SparseCopy),
                other => {
                    bail!("storage.clone_method = {other:?}; use auto, reflink, qcow2 or copy")
                }
            };
            let storage = vmkit_store::FileStorage::with_config(file)
                .context("preparing the volume directory")?;
            info!(clone_method = %s.clone_method, "file volumes");
            Ok(Arc::new(storage))
        }
        "lvm" => {
            if s.volume_group.is_empty() || s.thin_pool.is_empty() {
                bail!(
                    "storage.backend = \"lvm\" needs storage.volume_group and storage.thin_pool \
                     (an LVM thin pool you created, e.g. `lvcreate --type thin-pool -L 100G -n \
                     vmkit vg0`)"
                );
            }
            let lvm = vmkit_store::LvmStorage::new(vmkit_store::LvmConfig::new(
                s.volume_group.clone(),
                s.thin_pool.clone(),
            ))
            .context("configuring LVM storage")?;
            info!(vg = %s.volume_group, pool = %s.thin_pool, "LVM thin volumes");
            Ok(Arc::new(lvm))
        }
        other => bail!("storage.backend = {other:?}; use file or lvm"),
    }
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
            vmkit_hv::ChConfig::new()
                .binary(config.cloud_hypervisor.binary.clone())
                .hotplug_memory_mib(config.cloud_hypervisor.hotplug_memory_mib),
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
#[cfg(feature = "fake-backends")]
pub fn fake(data_dir: &std::path::Path) -> Backends {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_storage(
        data_dir: &std::path::Path,
        edit: impl FnOnce(&mut crate::config::StorageSection),
    ) -> Config {
        let mut config = Config {
            data_dir: data_dir.to_owned(),
            ..Config::default()
        };
        edit(&mut config.storage);
        config
    }

    #[test]
    fn storage_backends_are_built_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = storage(&with_storage(dir.path(), |s| {
            s.clone_method = "copy".into()
        }))
        .unwrap();
        assert_eq!(
            file.capabilities().clone_method,
            vmkit_core::CloneMethod::SparseCopy
        );
        let lvm = storage(&with_storage(dir.path(), |s| {
            s.backend = "lvm".into();
            s.volume_group = "vg0".into();
            s.thin_pool = "vmkit".into();
        }))
        .unwrap();
        assert_eq!(
            lvm.capabilities().clone_method,
            vmkit_core::CloneMethod::LvmSnapshot
        );
    }

    #[test]
    fn bad_storage_settings_say_what_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let err = |edit: fn(&mut crate::config::StorageSection)| {
            format!(
                "{:#}",
                storage(&with_storage(dir.path(), edit)).err().unwrap()
            )
        };
        assert!(err(|s| s.backend = "zfs".into()).contains("use file or lvm"));
        assert!(err(|s| s.clone_method = "magic".into()).contains("auto, reflink, qcow2 or copy"));
        assert!(err(|s| s.backend = "lvm".into()).contains("storage.volume_group"));
        let bad_name = err(|s| {
            s.backend = "lvm".into();
            s.volume_group = "vg0; rm".into();
            s.thin_pool = "pool".into();
        });
        assert!(bad_name.contains("volume group"), "{bad_name}");
    }
}
