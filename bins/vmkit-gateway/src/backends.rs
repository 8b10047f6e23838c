//! Picks and builds the backends the manager drives.

use std::sync::Arc;

use anyhow::{Context, bail};
use tracing::{info, warn};
use vmkit_core::{Backends, DirImageCatalog, Hypervisor, StateStore};

use vmkit_hv::probe::{self, Backend, Preference, ProbeOptions};

use crate::config::Config;

/// The real backends: the redb store, file volumes and the hypervisors: the chosen
/// one creates new VMs, and both drive the VMs they created (a VM keeps the
/// backend it was created with when the choice changes).
pub async fn real(config: &Config) -> anyhow::Result<Backends> {
    let store: Arc<dyn StateStore> = Arc::new(
        vmkit_store::RedbStore::open(config.data_dir.join("state.redb"))
            .context("opening the state store")?,
    );
    let storage = storage(config)?;
    let images = DirImageCatalog::new(config.data_dir.join("images"));
    let (hypervisor, other) = hypervisors(config).await?;
    info!(
        hypervisor = hypervisor.kind(),
        also_drives = other.kind(),
        data_dir = %config.data_dir.display(),
        "backends ready"
    );
    let backends =
        Backends::new(hypervisor, storage, store, Arc::new(images)).with_other_hypervisor(other);
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

/// Builds both hypervisor backends, the one new VMs get first: the configured
/// one, or for `auto` cloud-hypervisor when its program is installed and KVM boots
/// a standard guest, else QEMU. The other is built too, whether or not its program
/// is installed (building one starts nothing), to drive the VMs it created before
/// the choice changed; such a VM whose program is missing then fails at its
/// first use with the backend's own message.
async fn hypervisors(
    config: &Config,
) -> anyhow::Result<(Arc<dyn Hypervisor>, Arc<dyn Hypervisor>)> {
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
    let ch: Arc<dyn Hypervisor> = Arc::new(vmkit_hv::CloudHypervisor::new(
        vmkit_hv::ChConfig::new()
            .binary(config.cloud_hypervisor.binary.clone())
            .hotplug_memory_mib(config.cloud_hypervisor.hotplug_memory_mib),
    ));
    let qemu: Arc<dyn Hypervisor> = Arc::new(vmkit_hv::Qemu::new(
        vmkit_hv::QemuConfig::new()
            .binary(config.qemu.binary.clone())
            .accel(accel),
    ));
    Ok(match backend {
        Backend::CloudHypervisor => (ch, qemu),
        _ => (qemu, ch),
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
    // Simulated VMs get addresses on the loopback: what dials one (the HTTPS edge
    // probing a VM's port) is refused at once and never reaches a real network.
    let pool = vmkit_core::IpPool::new(
        "127.88.0.0/16"
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

    // Regression: only the chosen hypervisor was built, so a daemon whose choice
    // changed handed every existing VM to the other backend.
    #[tokio::test]
    async fn both_hypervisors_are_built_and_the_chosen_one_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        for (choice, first, second) in [
            (Preference::Qemu, "qemu", "cloud-hypervisor"),
            (Preference::CloudHypervisor, "cloud-hypervisor", "qemu"),
        ] {
            let mut config = Config {
                data_dir: dir.path().to_owned(),
                ..Config::default()
            };
            config.hypervisor = choice;
            // Built even when the program is not installed.
            config.cloud_hypervisor.binary = dir.path().join("no-such-program");
            let (default, other) = hypervisors(&config).await.unwrap();
            assert_eq!((default.kind(), other.kind()), (first, second));
        }
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
