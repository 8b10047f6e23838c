//! Reconcile: make the store and the host agree again after the daemon died.
//!
//! A command records every resource it takes as soon as it exists, and host
//! resources are named after the VM's id. So after a crash:
//!
//! - a VM record in a transient state names the operation that was cut short:
//!   an interrupted create is rolled back, an interrupted delete finished, an
//!   interrupted start or stop ends with the VM stopped;
//! - a VM record in a stable state is checked against its VMM: a live VMM is
//!   re-attached, a dead one cleaned up and the VM stopped (and restarted, if
//!   [`ExitPolicy::Restart`] says so);
//! - a host resource (volume, TAP, lease, run directory) whose VM id has no record,
//!   or whose record does not hold it, is an orphan and removed. Only resources
//!   the backends report as vmkit's are considered, so nothing else is touched.
//!
//! Every action is stored as an [`EventKind::Reconciled`] event.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Manager;
use crate::error::ManagerError;
use crate::event::{EventKind, NewEvent};
use crate::hypervisor::VmmState;
use crate::name::VmName;
use crate::snapshot::Snapshot;
use crate::state::VmState;
use crate::storage::{Volume, VolumeKind};
use crate::vm::{Health, VmId, VmRecord};

/// What reconcile does with a VM whose VMM died while no daemon watched it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExitPolicy {
    /// Mark it stopped; its owner starts it again.
    #[default]
    Stop,
    /// Mark it stopped and list it in [`ReconcileReport::to_restart`], for the
    /// caller to start once it serves requests.
    Restart,
}

/// What a [`Manager::reconcile`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Running or paused VMs whose VMM was found alive.
    pub reattached: Vec<VmName>,
    /// VMs marked stopped: their VMM had died, or a start or stop was cut short.
    pub stopped: Vec<VmName>,
    /// Stopped VMs the [`ExitPolicy`] wants started again.
    pub to_restart: Vec<VmName>,
    /// Interrupted creates, rolled back (the VMs no longer exist).
    pub rolled_back: Vec<VmName>,
    /// Interrupted deletes, finished.
    pub deleted: Vec<VmName>,
    /// Orphaned host resources removed, described.
    pub orphans: Vec<String>,
}

impl ReconcileReport {
    /// Whether reconcile found nothing to do but re-attach.
    pub fn is_clean(&self) -> bool {
        self.stopped.is_empty()
            && self.to_restart.is_empty()
            && self.rolled_back.is_empty()
            && self.deleted.is_empty()
            && self.orphans.is_empty()
    }
}

impl Manager {
    /// Converges the store and the host after a crash (see the module docs of
    /// `manager::reconcile`): finishes or rolls back interrupted operations,
    /// re-attaches live VMMs, stops VMs whose VMM died and removes orphaned
    /// resources. Run it when the daemon starts, before serving requests; it is
    /// idempotent, and a second run finds nothing to do.
    pub async fn reconcile(&self) -> Result<ReconcileReport, ManagerError> {
        let b = &self.inner.backends;
        let mut report = ReconcileReport::default();
        // Listed once here, not once per VM: a host with many VMs starts faster.
        let taps: HashSet<VmId> = match &b.network {
            Some(network) => network.list().await?.into_iter().collect(),
            None => HashSet::new(),
        };
        let mut volumes: HashMap<VmId, Vec<Volume>> = HashMap::new();
        for volume in b.storage.list().await? {
            volumes.entry(volume.vm).or_default().push(volume);
        }

        for listed in self.list(None).await? {
            let _guard = self.lock(&listed.name).await;
            let Some(vm) = b.store.get_vm_by_id(listed.id).await? else {
                continue;
            };
            let held = volumes.remove(&vm.id).unwrap_or_default();
            let has_tap = taps.contains(&vm.id);
            self.reconcile_vm(vm, &held, has_tap, &mut report).await?;
        }
        self.sweep_orphans(&mut report).await?;
        if report.is_clean() {
            info!(
                reattached = report.reattached.len(),
                "reconcile: store and host agree"
            );
        } else {
            warn!(?report, "reconcile: converged after an unclean stop");
        }
        Ok(report)
    }

    async fn reconcile_vm(
        &self,
        mut vm: VmRecord,
        volumes: &[Volume],
        has_tap: bool,
        report: &mut ReconcileReport,
    ) -> Result<(), ManagerError> {
        if let Some(name) = vm.restoring.clone()
            && !matches!(vm.state, VmState::Creating | VmState::Deleting)
        {
            self.settle_stopped(&mut vm, "a restore was cut short; finishing it")
                .await?;
            match self.inner.backends.store.get_snapshot(&name).await? {
                Some(snapshot) => {
                    self.replace_disks(&mut vm, &snapshot).await?;
                    self.reconciled(&vm, &format!("restored the disks of snapshot {name}"))
                        .await;
                }
                None => {
                    vm.restoring = None;
                    self.save(&mut vm).await?;
                    self.reconciled(&vm, &format!("snapshot {name} of an interrupted restore is gone; the VM keeps its disks"))
                        .await;
                }
            }
            report.stopped.push(vm.name);
            return Ok(());
        }
        match vm.state {
            VmState::Creating => {
                self.purge(&vm, volumes, false).await?;
                self.inner.backends.store.delete_vm(vm.id).await?;
                self.reconciled(&vm, "rolled back a create that was cut short")
                    .await;
                self.emit(NewEvent::vm(
                    vm.id,
                    &vm.name,
                    EventKind::CreateFailed {
                        error: "the daemon stopped during the create".into(),
                    },
                ))
                .await;
                report.rolled_back.push(vm.name);
            }
            VmState::Deleting => {
                self.purge(&vm, volumes, vm.keep_data).await?;
                self.inner.backends.store.delete_vm(vm.id).await?;
                self.reconciled(&vm, "finished a delete that was cut short")
                    .await;
                self.emit(NewEvent::vm(vm.id, &vm.name, EventKind::Deleted))
                    .await;
                report.deleted.push(vm.name);
            }
            VmState::Starting | VmState::Stopping => {
                let was = vm.state;
                self.settle_stopped(&mut vm, &format!("{was} was cut short; the VM is stopped"))
                    .await?;
                if was == VmState::Starting && self.inner.config.on_vmm_exit == ExitPolicy::Restart
                {
                    report.to_restart.push(vm.name.clone());
                }
                report.stopped.push(vm.name);
            }
            VmState::Running | VmState::Paused => {
                let alive = match &vm.resources.vmm {
                    Some(handle) => match self.inner.backends.hypervisor.attach(handle).await {
                        Ok(state) => Some(state),
                        Err(e) => {
                            warn!(vm = %vm.name, error = %e, "cannot re-attach the VMM");
                            None
                        }
                    },
                    None => None,
                };
                match alive {
                    Some(state @ (VmmState::Running | VmmState::Paused)) => {
                        let actual = if state == VmmState::Running {
                            VmState::Running
                        } else {
                            VmState::Paused
                        };
                        if actual != vm.state {
                            self.set_state(&mut vm, actual).await?;
                        }
                        self.repair_network(&vm, has_tap).await?;
                        self.reconciled(&vm, "re-attached its running VMM").await;
                        report.reattached.push(vm.name);
                    }
                    _ => {
                        self.emit(NewEvent::vm(vm.id, &vm.name, EventKind::VmmExited))
                            .await;
                        self.settle_stopped(&mut vm, "its VMM had died; the VM is stopped")
                            .await?;
                        if self.inner.config.on_vmm_exit == ExitPolicy::Restart {
                            report.to_restart.push(vm.name.clone());
                        }
                        report.stopped.push(vm.name);
                    }
                }
            }
            VmState::Stopped => {
                if vm.resources.vmm.is_some() {
                    self.settle_stopped(&mut vm, "a stopped VM still had a VMM; stopped it")
                        .await?;
                    report.stopped.push(vm.name.clone());
                }
                self.repair_network(&vm, has_tap).await?;
            }
        }
        Ok(())
    }

    /// Removes everything `vm` may hold, found by its id rather than its record
    /// (a crash can come between taking a resource and recording it). The data
    /// volume is handed over to the operator instead when `keep_data` is set.
    async fn purge(
        &self,
        vm: &VmRecord,
        volumes: &[Volume],
        keep_data: bool,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        self.forget_vm(vm.id);
        if let Some(handle) = &vm.resources.vmm {
            b.hypervisor.kill(handle).await?;
            b.hypervisor.cleanup(handle).await?;
        }
        self.drop_console(vm.id).await?;
        b.hypervisor
            .discard(&self.inner.config.run_dir(vm.id))
            .await?;
        if let Some(network) = &b.network {
            network.detach(vm.id).await?;
        }
        b.store.release_lease(vm.id).await?;
        let mut all: Vec<&Volume> = volumes.iter().collect();
        for recorded in [&vm.resources.root, &vm.resources.data]
            .into_iter()
            .flatten()
        {
            if !all.iter().any(|v| v.id == recorded.id) {
                all.push(recorded);
            }
        }
        for volume in all {
            if keep_data && volume.kind == VolumeKind::Data {
                match b.storage.release(volume).await {
                    Ok(kept) => self.data_kept(vm, &kept).await,
                    // Released before the crash.
                    Err(crate::storage::StorageError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            match b.storage.delete(volume).await {
                Ok(()) => {}
                // Recorded but never created, or already gone.
                Err(crate::storage::StorageError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Last: the uid owned the disks until they went.
        self.release_uid_of(vm.id).await?;
        Ok(())
    }

    /// Stops whatever VMM `vm` has (by handle and by run directory) and records the
    /// VM as stopped.
    async fn settle_stopped(&self, vm: &mut VmRecord, action: &str) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        self.forget_agent(vm.id);
        if let Some(handle) = vm.resources.vmm.take() {
            b.hypervisor.kill(&handle).await?;
            self.keep_console(vm.id, &handle).await;
            b.hypervisor.cleanup(&handle).await?;
        }
        b.hypervisor
            .discard(&self.inner.config.run_dir(vm.id))
            .await?;
        vm.health = Health::Unknown;
        if vm.state == VmState::Stopped {
            self.save(vm).await?;
        } else {
            self.set_state(vm, VmState::Stopped).await?;
        }
        self.reconciled(vm, action).await;
        Ok(())
    }

    /// Re-creates the TAP of a VM that should have one and lost it (`has_tap` is
    /// whether the network backend listed one).
    async fn repair_network(&self, vm: &VmRecord, has_tap: bool) -> Result<(), ManagerError> {
        let (Some(network), Some(lease), Some(_)) = (
            &self.inner.backends.network,
            &vm.resources.lease,
            &vm.resources.net,
        ) else {
            return Ok(());
        };
        if has_tap {
            return Ok(());
        }
        network.attach(vm.id, lease).await?;
        self.reconciled(vm, "re-created its missing TAP").await;
        Ok(())
    }

    /// Removes host resources that no settled record holds. Records in a
    /// transient state belong to an operation under way (reconcile settled every
    /// interrupted one first), so their resources are left to it.
    async fn sweep_orphans(&self, report: &mut ReconcileReport) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        let records: HashMap<VmId, VmRecord> = self
            .list(None)
            .await?
            .into_iter()
            .map(|vm| (vm.id, vm))
            .collect();
        let snapshots: HashMap<VmId, Snapshot> = b
            .store
            .list_snapshots(None)
            .await?
            .into_iter()
            .map(|s| (s.id, s))
            .collect();
        // Whether the record of `id` (if any) is settled and `holds` the resource.
        let owned = |id: VmId, holds: &dyn Fn(&VmRecord) -> bool| {
            records
                .get(&id)
                .is_some_and(|vm| vm.state.is_transient() || holds(vm))
        };

        for volume in b.storage.list().await? {
            let holds = |vm: &VmRecord| {
                [&vm.resources.root, &vm.resources.data]
                    .into_iter()
                    .flatten()
                    .any(|v| v.id == volume.id)
            };
            let in_snapshot = snapshots.get(&volume.vm).is_some_and(|s| {
                [Some(&s.root), s.data.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|v| v.id == volume.id)
            });
            if !in_snapshot && !owned(volume.vm, &holds) {
                b.storage.delete(&volume).await?;
                self.orphan(
                    report,
                    volume.vm,
                    format!("removed orphaned volume {}", volume.id),
                )
                .await;
            }
        }
        if let Some(network) = &b.network {
            for vm in network.list().await? {
                if !owned(vm, &|r| r.resources.net.is_some()) {
                    network.detach(vm).await?;
                    self.orphan(report, vm, format!("removed orphaned TAP of VM {vm}"))
                        .await;
                }
            }
        }
        for lease in b.store.list_leases().await? {
            if !owned(lease.vm, &|r| r.resources.lease.is_some()) {
                b.store.release_lease(lease.vm).await?;
                self.orphan(
                    report,
                    lease.vm,
                    format!("released orphaned lease {} of VM {}", lease.ip, lease.vm),
                )
                .await;
            }
        }
        self.sweep_uids(&records, report).await?;
        let snapshot_root = self.inner.config.data_dir.join("snapshots");
        for (id, dir) in run_dirs(&snapshot_root)? {
            let held = snapshots
                .get(&id)
                .is_some_and(|s| s.memory.as_ref() == Some(&dir));
            if !held {
                tokio::fs::remove_dir_all(&dir)
                    .await
                    .map_err(|e| ManagerError::Io {
                        context: format!("cannot remove {}", dir.display()),
                        source: e,
                    })?;
                self.orphan(
                    report,
                    id,
                    format!("removed orphaned snapshot state {}", dir.display()),
                )
                .await;
            }
        }
        let consoles = self.inner.config.data_dir.join("consoles");
        if let Ok(entries) = std::fs::read_dir(&consoles) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let id = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.parse::<VmId>().ok());
                if let Some(id) = id
                    && !records.contains_key(&id)
                {
                    self.drop_console(id).await?;
                    self.orphan(report, id, "removed an orphaned console log".to_owned())
                        .await;
                }
            }
        }
        for (vm, dir) in run_dirs(&self.inner.config.run_root())? {
            let holds = |r: &VmRecord| r.resources.vmm.as_ref().is_some_and(|h| h.run_dir == dir);
            if !owned(vm, &holds) {
                b.hypervisor.discard(&dir).await?;
                self.orphan(
                    report,
                    vm,
                    format!("removed orphaned run directory {}", dir.display()),
                )
                .await;
            }
        }
        Ok(())
    }

    pub(super) async fn orphan(&self, report: &mut ReconcileReport, vm: VmId, action: String) {
        warn!(%vm, "{action}");
        let mut event = NewEvent::host(EventKind::Reconciled {
            action: action.clone(),
        });
        event.vm = Some(vm);
        self.emit(event).await;
        report.orphans.push(action);
    }

    async fn reconciled(&self, vm: &VmRecord, action: &str) {
        info!(vm = %vm.name, "reconcile: {action}");
        self.emit(NewEvent::vm(
            vm.id,
            &vm.name,
            EventKind::Reconciled {
                action: action.to_owned(),
            },
        ))
        .await;
    }
}

/// The directories under `root` named after a VM (or snapshot) id; anything else
/// there is not vmkit's and left alone.
fn run_dirs(root: &Path) -> Result<Vec<(VmId, PathBuf)>, ManagerError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ManagerError::Io {
                context: format!("cannot list run directories in {}", root.display()),
                source: e,
            });
        }
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ManagerError::Io {
            context: format!("cannot list run directories in {}", root.display()),
            source: e,
        })?;
        if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            dirs.push((id, entry.path()));
        }
    }
    Ok(dirs)
}
