//! Operations on an existing VM beyond its lifecycle: resize, console logs and
//! metrics.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Manager, RUNNING, RUNNING_OR_PAUSED};
use crate::error::ManagerError;
use crate::event::EventKind;
use crate::hypervisor::{Resize, VmmInfo};
use crate::name::VmName;
use crate::vm::VmRecord;
use crate::vm_state::VmState;

/// A resize request; `None` leaves a dimension as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResizeRequest {
    /// New vCPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// New memory size, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// New data disk size, GiB; disks only grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
}

impl ResizeRequest {
    /// A request that changes nothing; set the fields to change.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = Some(vcpus);
        self
    }

    /// Sets the memory size.
    pub fn memory_mib(mut self, memory_mib: u64) -> Self {
        self.memory_mib = Some(memory_mib);
        self
    }

    /// Sets the data disk size.
    pub fn disk_gib(mut self, disk_gib: u64) -> Self {
        self.disk_gib = Some(disk_gib);
        self
    }
}

/// What a VM uses, from its VMM and, when it runs, its agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmMetrics {
    /// The VM.
    pub name: VmName,
    /// Its state.
    pub state: VmState,
    /// What its VMM reports (vCPUs online, memory assigned).
    pub vmm: VmmInfo,
    /// The guest's own view (CPU, memory and disk use, load, uptime); `None` when
    /// the VM is paused or its agent did not answer.
    pub guest: Option<vmkit_guest::Metrics>,
}

/// How much of a stopped VM's console is kept for [`Manager::logs`].
pub(crate) const KEPT_CONSOLE_BYTES: usize = 64 << 10;

/// How long the guest samples CPU use for a metrics call.
const CPU_SAMPLE: Duration = Duration::from_millis(500);

impl Manager {
    /// Changes a VM's vCPUs, memory and data disk size. A stopped VM takes any
    /// change at its next start; a running one only what the hypervisor can change
    /// live ([`crate::HypervisorCapabilities`]). Disks only grow, and only while the
    /// VM is stopped; the host grows the volume only, and the guest grows its
    /// filesystem when it next boots. Limits apply as at create, and the owner's
    /// quota is checked in the store transaction that records the new size, before
    /// anything grows, so two resizes at once cannot both take the same headroom.
    pub async fn resize(
        &self,
        name: &VmName,
        request: ResizeRequest,
    ) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let b = &self.inner.backends;
        let mut vm = self.get(name).await?;
        self.require(&vm, "resize", crate::access::SETTLED)?;

        let mut spec = vm.spec.clone();
        spec.vcpus = request.vcpus.unwrap_or(spec.vcpus);
        spec.memory_mib = request.memory_mib.unwrap_or(spec.memory_mib);
        spec.disk_gib = request.disk_gib.unwrap_or(spec.disk_gib);
        // Against the volume, not the recorded spec: a resize cut short after it
        // recorded the size grows the volume when asked again.
        let disk_bytes = spec.disk_gib << 30;
        let grow_disk = spec.disk_gib > 0
            && vm
                .resources
                .data
                .as_ref()
                .is_none_or(|d| d.size_bytes < disk_bytes);
        if spec == vm.spec && !grow_disk {
            return Ok(vm);
        }
        spec.validate(&self.inner.config.spec_limits)?;
        if spec.disk_gib < vm.spec.disk_gib {
            return Err(ManagerError::InvalidSpec(
                crate::spec::SpecError::DiskShrink {
                    from: vm.spec.disk_gib,
                    to: spec.disk_gib,
                },
            ));
        }
        if grow_disk && vm.state != VmState::Stopped {
            return Err(ManagerError::WrongState {
                name: vm.name.clone(),
                state: vm.state,
                operation: "grow the data disk of",
                allowed: super::STOPPED,
            });
        }
        let live = if vm.state != VmState::Stopped {
            self.reattach(&mut vm).await?;
            let caps = self.hv(&vm)?.capabilities();
            let vcpus = (spec.vcpus != vm.spec.vcpus).then_some(spec.vcpus);
            let memory = (spec.memory_mib != vm.spec.memory_mib).then_some(spec.memory_mib);
            if (vcpus.is_some() && !caps.resize_vcpus) || (memory.is_some() && !caps.resize_memory)
            {
                return Err(ManagerError::Unsupported(
                    "resizing a running VM on this hypervisor (stop it, resize, start it)",
                ));
            }
            Some((self.hv(&vm)?, self.vmm_of(&vm)?, Resize::new(vcpus, memory)))
        } else {
            None
        };

        // Reserve: the new size is recorded, within quota, before anything changes.
        let quota = self.quota_of(vm.owner).await?;
        let from = vm.spec.clone();
        vm.spec = spec;
        vm.updated_at = crate::time::Timestamp::now();
        if let Err(e) = b.store.update_vm_within_quota(&vm, &quota).await {
            return Err(e.into());
        }
        let applied = async {
            if let Some((hv, handle, resize)) = live {
                hv.resize(&handle, resize).await?;
            }
            if grow_disk {
                let data = match vm.resources.data.clone() {
                    Some(volume) => b.storage.resize(&volume, disk_bytes).await?,
                    None => b.storage.create_data(vm.id, disk_bytes).await?,
                };
                vm.resources.data = Some(data);
            }
            Ok::<(), ManagerError>(())
        }
        .await;
        if let Err(error) = applied {
            // Give the reservation back; the volume (if it grew) stays as it is.
            vm.spec = from;
            if let Err(e) = self.save(&mut vm).await {
                warn!(vm = %vm.name, error = %e, "cannot give back the size a failed resize reserved");
            }
            return Err(error);
        }
        info!(vm = %vm.name, ?from, to = ?vm.spec, "resized");
        let spec = vm.spec.clone();
        self.save_with_event(&mut vm, EventKind::Resized { spec })
            .await?;
        Ok(vm)
    }

    /// The last `max_bytes` of a VM's console output: live while it runs or is
    /// paused; once it has stopped (or its VMM died), what its console showed last
    /// (its last 64 KiB), kept until it stops again or is deleted.
    pub async fn logs(&self, name: &VmName, max_bytes: usize) -> Result<String, ManagerError> {
        let vm = self.get(name).await?;
        if vm.state == VmState::Stopped {
            let path = self.kept_console_path(vm.id);
            return match tokio::fs::read(&path).await {
                Ok(bytes) => {
                    let from = bytes.len().saturating_sub(max_bytes);
                    Ok(String::from_utf8_lossy(&bytes[from..]).into_owned())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) => Err(ManagerError::Io {
                    context: format!("cannot read {}", path.display()),
                    source: e,
                }),
            };
        }
        self.require(&vm, "read the console of", RUNNING_OR_PAUSED)?;
        let handle = self.vmm_of(&vm)?;
        Ok(self.hv(&vm)?.console_tail(&handle, max_bytes).await?)
    }

    /// The last lines of a unit's journal or of a file in a running VM, read by its
    /// agent (`req.follow` is ignored; see [`Manager::follow_guest_logs`]).
    pub async fn guest_logs(
        &self,
        name: &VmName,
        req: vmkit_guest::LogsRequest,
    ) -> Result<Vec<String>, ManagerError> {
        let (vm, client) = self.running_agent(name, "read the logs of").await?;
        client
            .logs(req)
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))
    }

    /// The last lines of a unit's journal or of a file in a running VM, then every
    /// new line, until the returned stream is dropped.
    pub async fn follow_guest_logs(
        &self,
        name: &VmName,
        req: vmkit_guest::LogsRequest,
    ) -> Result<vmkit_guest::LogStream, ManagerError> {
        let (vm, client) = self.running_agent(name, "follow the logs of").await?;
        client
            .follow_logs(req)
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))
    }

    /// VM `name`, which must be running for `operation`, and its agent.
    pub(super) async fn running_agent(
        &self,
        name: &VmName,
        operation: &'static str,
    ) -> Result<(VmRecord, vmkit_guest::Client), ManagerError> {
        let vm = self.get(name).await?;
        self.require(&vm, operation, RUNNING)?;
        let client = self.agent(&vm).await?;
        Ok((vm, client))
    }

    /// Where the last console output of stopped VM `vm` is kept.
    pub(super) fn kept_console_path(&self, vm: crate::vm::VmId) -> std::path::PathBuf {
        self.inner
            .config
            .data_dir
            .join("consoles")
            .join(format!("{vm}.log"))
    }

    /// Keeps the end of the console of `vm`, whose VMM has exited or is about to be
    /// cleaned up, so that `logs` still shows why it stopped. Best effort: a
    /// failure is logged, never fails the stop.
    pub(super) async fn keep_console(
        &self,
        vm: crate::vm::VmId,
        handle: &crate::hypervisor::VmmHandle,
    ) {
        let Some(hv) = self.inner.backends.hypervisor_of(&handle.backend) else {
            tracing::warn!(%vm, backend = %handle.backend, "cannot keep the console: no such backend");
            return;
        };
        let text = match hv.console_tail(handle, KEPT_CONSOLE_BYTES).await {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(%vm, error = %e, "cannot read the console to keep it");
                return;
            }
        };
        let path = self.kept_console_path(vm);
        let written = async {
            // Only inside an existing data directory: the manager never creates that.
            let dir = path.parent().unwrap_or(&path);
            match tokio::fs::create_dir(dir).await {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            let tmp = path.with_extension("log.tmp");
            tokio::fs::write(&tmp, text.as_bytes()).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(%vm, path = %path.display(), error = %e, "cannot keep the console");
        }
    }

    /// Removes the kept console of `vm` (when it is deleted).
    pub(super) async fn drop_console(&self, vm: crate::vm::VmId) -> Result<(), ManagerError> {
        let path = self.kept_console_path(vm);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ManagerError::Io {
                context: format!("cannot remove {}", path.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// What a running or paused VM uses.
    pub async fn metrics(&self, name: &VmName) -> Result<VmMetrics, ManagerError> {
        let mut vm = self.get(name).await?;
        self.require(&vm, "read the metrics of", RUNNING_OR_PAUSED)?;
        self.reattach(&mut vm).await?;
        let handle = self.vmm_of(&vm)?;
        let vmm = self.hv(&vm)?.info(&handle).await?;
        let guest = if RUNNING.contains(&vm.state) {
            let client = self.agent(&vm).await?;
            Some(
                client
                    .metrics(CPU_SAMPLE)
                    .await
                    .map_err(|e| ManagerError::agent(&vm.name, &e))?,
            )
        } else {
            None
        };
        Ok(VmMetrics {
            name: vm.name,
            state: vm.state,
            vmm,
            guest,
        })
    }
}
