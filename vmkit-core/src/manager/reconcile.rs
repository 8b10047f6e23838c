//! Reconcile: make the store and the host agree again after the daemon died.
//!
//! A command records every resource it takes as soon as it exists, and host
//! resources are named after the VM's id. So after a crash:
//!
//! - a VM record in a transient state names the operation that was cut short:
//!   an interrupted create is rolled back, an interrupted delete finished, an
//!   interrupted start or stop ends with the VM stopped;
//! - a VM record in a stable state is checked against its VMM, with the backend
//!   that created it: a live VMM is re-attached, a dead one cleaned up and the VM
//!   stopped (and restarted, if [`ExitPolicy::Restart`] says so). Only proof of
//!   death counts as dead (the backend's [`HypervisorError::NotRunning`]: the
//!   process with the handle's pid and start time is gone). A VMM that runs but
//!   cannot be driven — its control socket times out, its backend is not one this
//!   manager has — is never killed: the VM is left running, marked unhealthy, and
//!   re-attached later ([`Manager::retry_unreachable`], or the next operation that
//!   drives its VMM);
//! - a host resource (volume, TAP, lease, run directory) whose VM id has no record,
//!   or whose record does not hold it, is an orphan and removed. Only resources
//!   the backends report as vmkit's are considered, so nothing else is touched.
//!
//! Each VM is reconciled on its own: one that cannot be settled (a cleanup that
//! fails, say) is listed in [`ReconcileReport::failed`] and quarantined
//! ([`VmRecord::quarantined`]: every operation but a delete is refused), and the
//! others carry on; an orphan that cannot be removed is listed there too and tried
//! again by the next reconcile. Reconcile fails as a whole only when it cannot list
//! what there is (the state store or a backend does not answer).
//!
//! Every action is stored as an [`EventKind::Reconciled`] event, every failure as
//! an [`EventKind::ReconcileFailed`] one.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::Manager;
use crate::error::{ErrorChain, ManagerError};
use crate::event::{EventKind, NewEvent};
use crate::hypervisor::{HypervisorError, VmmHandle, VmmState};
use crate::name::VmName;
use crate::snapshot::Snapshot;
use crate::storage::{Volume, VolumeKind};
use crate::vm::{Health, VmId, VmRecord};
use crate::vm_state::VmState;

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
    /// Running or paused VMs whose VMM runs but could not be re-attached (its
    /// control socket did not answer, its backend is not available): left running,
    /// marked unhealthy, and re-attached later ([`Manager::retry_unreachable`]).
    #[serde(default)]
    pub unreachable: Vec<VmName>,
    /// What reconcile could not do: VMs it could not settle (quarantined) and
    /// orphans it could not remove (tried again by the next reconcile).
    #[serde(default)]
    pub failed: Vec<ReconcileFailure>,
}

/// Something a [`Manager::reconcile`] could not do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReconcileFailure {
    /// The VM it could not settle, now quarantined; `None` for an orphaned
    /// resource it could not remove.
    pub vm: Option<VmName>,
    /// What it tried.
    pub action: String,
    /// Why that failed, with its causes.
    pub error: String,
}

impl ReconcileReport {
    /// Whether reconcile found nothing to do but re-attach.
    pub fn is_clean(&self) -> bool {
        self.stopped.is_empty()
            && self.to_restart.is_empty()
            && self.rolled_back.is_empty()
            && self.deleted.is_empty()
            && self.orphans.is_empty()
            && self.unreachable.is_empty()
            && self.failed.is_empty()
    }

    /// The VMs this reconcile quarantined.
    pub fn quarantined(&self) -> impl Iterator<Item = &VmName> {
        self.failed.iter().filter_map(|f| f.vm.as_ref())
    }
}

/// What a renewed attempt to attach an unreachable VMM found.
enum Reattach {
    /// The VMM answers and is driven again.
    Attached,
    /// The VMM is gone (proof of death); the VMM check settles the VM.
    Gone,
    /// Still not reachable, for this reason.
    Unreachable(String),
}

/// The health of a VM whose VMM runs but cannot be driven.
fn unreachable_health(reason: &str) -> Health {
    Health::Unhealthy {
        reason: format!(
            "vmkit cannot re-attach its VMM ({reason}); it is left running and retried"
        ),
    }
}

/// What reconciling `vm` is about to do, for a failure's message.
fn settling(vm: &VmRecord) -> String {
    let name = &vm.name;
    if vm.restoring.is_some() && !matches!(vm.state, VmState::Creating | VmState::Deleting) {
        return format!("finish the interrupted restore of VM {name}");
    }
    match vm.state {
        VmState::Creating => format!("roll back the interrupted create of VM {name}"),
        VmState::Deleting => format!("finish the interrupted delete of VM {name}"),
        VmState::Starting | VmState::Stopping => {
            format!("stop VM {name}, whose {} was cut short", vm.state)
        }
        _ => format!("settle VM {name} with its VMM and network"),
    }
}

impl Manager {
    /// Converges the store and the host after a crash (see the module docs of
    /// `manager::reconcile`): finishes or rolls back interrupted operations,
    /// re-attaches live VMMs, stops VMs whose VMM died and removes orphaned
    /// resources. Run it when the daemon starts, before serving requests; it is
    /// idempotent, and a second run finds nothing to do.
    ///
    /// What it cannot do for one VM or one orphan is in the report's
    /// [`ReconcileReport::failed`] (such a VM is quarantined) and does not stop it.
    /// It fails as a whole only when it cannot list what there is (VMs, volumes,
    /// TAPs, leases, snapshots, run directories); a caller that serves requests
    /// should serve them anyway, and say so.
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

        let listed = self.list(None).await?;
        let mut attached = self.attach_all(&listed).await;
        for listed in listed {
            let _guard = self.lock(&listed.name).await;
            let vm = match b.store.get_vm_by_id(listed.id).await {
                Ok(Some(vm)) => vm,
                Ok(None) => continue,
                Err(e) => {
                    let action = format!("read the record of VM {}", listed.name);
                    self.quarantine(&listed, action, &e.into(), &mut report)
                        .await;
                    continue;
                }
            };
            let held = volumes.remove(&vm.id).unwrap_or_default();
            let has_tap = taps.contains(&vm.id);
            let action = settling(&vm);
            let was_quarantined = vm.quarantined.is_some();
            let attached = attached
                .remove(&vm.id)
                .filter(|(handle, _)| vm.resources.vmm.as_ref() == Some(handle))
                .map(|(_, outcome)| outcome);
            match self
                .reconcile_vm(vm, &held, has_tap, attached, &mut report)
                .await
            {
                Ok(()) if was_quarantined => self.lift_quarantine(&listed).await,
                Ok(()) => {}
                Err(e) => self.quarantine(&listed, action, &e, &mut report).await,
            }
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

    /// Attaches the VMMs of the running and paused VMs in `vms`, all at once: a VMM
    /// that does not answer costs its backend's timeout once, not once per VM
    /// before the daemon serves. By VM, with the handle attached.
    async fn attach_all(
        &self,
        vms: &[VmRecord],
    ) -> HashMap<VmId, (VmmHandle, Result<VmmState, HypervisorError>)> {
        let mut attaches = tokio::task::JoinSet::new();
        for vm in vms {
            let (VmState::Running | VmState::Paused, None, Some(handle)) =
                (vm.state, &vm.restoring, &vm.resources.vmm)
            else {
                continue;
            };
            let Some(hv) = self.inner.backends.hypervisor_of(self.backend_kind(vm)) else {
                continue;
            };
            let (hv, handle, id) = (hv.clone(), handle.clone(), vm.id);
            attaches.spawn(async move {
                let outcome = hv.attach(&handle).await;
                (id, (handle, outcome))
            });
        }
        let mut attached = HashMap::new();
        while let Some(joined) = attaches.join_next().await {
            // A panicked attach is left to the VM's own reconcile, which tries again.
            if let Ok((id, outcome)) = joined {
                attached.insert(id, outcome);
            }
        }
        attached
    }

    /// Reconciles one VM; `attached` is the outcome of attaching its VMM, when
    /// [`Manager::attach_all`] did.
    async fn reconcile_vm(
        &self,
        mut vm: VmRecord,
        volumes: &[Volume],
        has_tap: bool,
        attached: Option<Result<VmmState, HypervisorError>>,
        report: &mut ReconcileReport,
    ) -> Result<(), ManagerError> {
        if vm.hypervisor.is_none() && !matches!(vm.state, VmState::Creating | VmState::Deleting) {
            // A record from before backends were recorded: pinned now, to the
            // backend of its VMM, else the default.
            vm.hypervisor = Some(self.backend_kind(&vm).to_owned());
            self.save(&mut vm).await?;
        }
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
                    // Copies not yet recorded as its disks are orphans, removed below.
                    vm.restoring = None;
                    vm.restore_into = None;
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
                // Ok(None): proven dead (or never recorded); Err: alive, or not
                // known to be dead, but not drivable.
                let alive: Result<Option<VmmState>, String> = match &vm.resources.vmm {
                    None => Ok(None),
                    Some(handle) => match self.hv(&vm) {
                        Err(e) => Err(ErrorChain(&e).to_string()),
                        Ok(hv) => {
                            let outcome = match attached {
                                Some(outcome) => outcome,
                                None => hv.attach(handle).await,
                            };
                            match outcome {
                                Ok(state) => Ok(Some(state)),
                                Err(HypervisorError::NotRunning { .. }) => Ok(None),
                                Err(e) => Err(ErrorChain(&e).to_string()),
                            }
                        }
                    },
                };
                match alive {
                    Err(reason) => {
                        warn!(vm = %vm.name, %reason, "cannot re-attach the VMM; leaving the VM running");
                        self.mark_unreachable(&vm);
                        self.set_health(&mut vm, unreachable_health(&reason))
                            .await?;
                        self.repair_network(&vm, has_tap).await?;
                        self.reconciled(
                            &vm,
                            &format!(
                                "could not re-attach its VMM ({reason}); left running, to be \
                                 re-attached later"
                            ),
                        )
                        .await;
                        report.unreachable.push(vm.name);
                    }
                    Ok(Some(state @ (VmmState::Running | VmmState::Paused))) => {
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
                    // Gone, or a VMM whose guest is not running (shut down, never
                    // booted): nothing runs that a kill could cut.
                    Ok(_) => {
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
            let hv = self.hv(vm)?;
            hv.kill(handle).await?;
            hv.cleanup(handle).await?;
        }
        self.drop_console(vm.id).await?;
        self.discard(&self.inner.config.run_dir(vm.id)).await?;
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
        self.forget_agent(vm.id);
        if let Some(handle) = vm.resources.vmm.clone() {
            let hv = self.hv(vm)?;
            hv.kill(&handle).await?;
            self.keep_console(vm.id, &handle).await;
            hv.cleanup(&handle).await?;
            vm.resources.vmm = None;
        }
        self.discard(&self.inner.config.run_dir(vm.id)).await?;
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

        // A restored VM's disks are held under the id its restore copied them to.
        let recorded: HashSet<&str> = records
            .values()
            .flat_map(|vm| [&vm.resources.root, &vm.resources.data])
            .flatten()
            .map(|v| v.id.as_str())
            .collect();
        for volume in b.storage.list().await? {
            let holds = |vm: &VmRecord| {
                [&vm.resources.root, &vm.resources.data]
                    .into_iter()
                    .flatten()
                    .any(|v| v.id == volume.id)
            };
            if recorded.contains(volume.id.as_str()) {
                continue;
            }
            let in_snapshot = snapshots.get(&volume.vm).is_some_and(|s| {
                [Some(&s.root), s.data.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|v| v.id == volume.id)
            });
            if !in_snapshot && !owned(volume.vm, &holds) {
                let removed = b.storage.delete(&volume).await.map_err(Into::into);
                self.swept(
                    report,
                    volume.vm,
                    format!("remove orphaned volume {}", volume.id),
                    removed,
                )
                .await;
            }
        }
        if let Some(network) = &b.network {
            for vm in network.list().await? {
                if !owned(vm, &|r| r.resources.net.is_some()) {
                    let removed = network.detach(vm).await.map_err(Into::into);
                    self.swept(
                        report,
                        vm,
                        format!("remove orphaned TAP of VM {vm}"),
                        removed,
                    )
                    .await;
                }
            }
        }
        for lease in b.store.list_leases().await? {
            if !owned(lease.vm, &|r| r.resources.lease.is_some()) {
                let released = b.store.release_lease(lease.vm).await;
                self.swept(
                    report,
                    lease.vm,
                    format!("release orphaned lease {} of VM {}", lease.ip, lease.vm),
                    released.map(drop).map_err(Into::into),
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
                let removed = tokio::fs::remove_dir_all(&dir)
                    .await
                    .map_err(|e| ManagerError::Io {
                        context: format!("cannot remove {}", dir.display()),
                        source: e,
                    });
                self.swept(
                    report,
                    id,
                    format!("remove orphaned snapshot state {}", dir.display()),
                    removed,
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
                    let removed = self.drop_console(id).await;
                    self.swept(
                        report,
                        id,
                        "remove an orphaned console log".to_owned(),
                        removed,
                    )
                    .await;
                }
            }
        }
        for (vm, dir) in run_dirs(&self.inner.config.run_root())? {
            let holds = |r: &VmRecord| r.resources.vmm.as_ref().is_some_and(|h| h.run_dir == dir);
            if !owned(vm, &holds) {
                let removed = self.discard(&dir).await;
                self.swept(
                    report,
                    vm,
                    format!("remove orphaned run directory {}", dir.display()),
                    removed,
                )
                .await;
            }
        }
        Ok(())
    }

    /// Records the outcome of removing an orphan of VM id `vm`: done (`action`, in
    /// the past tense, in the report's orphans) or failed (in its failures, for the
    /// next reconcile to try again). Each is an event.
    pub(super) async fn swept(
        &self,
        report: &mut ReconcileReport,
        vm: VmId,
        action: String,
        outcome: Result<(), ManagerError>,
    ) {
        let kind = match outcome {
            Ok(()) => {
                let done = past_tense(&action);
                warn!(%vm, "{done}");
                report.orphans.push(done.clone());
                EventKind::Reconciled { action: done }
            }
            Err(e) => {
                let error = ErrorChain(&e).to_string();
                warn!(%vm, %error, "reconcile could not {action}; the next reconcile tries again");
                report.failed.push(ReconcileFailure {
                    vm: None,
                    action: action.clone(),
                    error: error.clone(),
                });
                EventKind::ReconcileFailed { action, error }
            }
        };
        let mut event = NewEvent::host(kind);
        event.vm = Some(vm);
        self.emit(event).await;
    }

    /// Stops every VMM any backend started in `run_dir` and removes it. Used where
    /// no handle says which backend it was: a VMM a crash left behind.
    async fn discard(&self, run_dir: &Path) -> Result<(), ManagerError> {
        for hv in self.inner.backends.hypervisors() {
            hv.discard(run_dir).await?;
        }
        Ok(())
    }

    /// Quarantines VM `vm`, which reconcile could not settle: its record (as the
    /// failed step left it) is marked, so that only a delete is accepted, and the
    /// failure is reported and stored as an event.
    async fn quarantine(
        &self,
        vm: &VmRecord,
        action: String,
        error: &ManagerError,
        report: &mut ReconcileReport,
    ) {
        let error = ErrorChain(error).to_string();
        warn!(vm = %vm.name, %error, "reconcile could not {action}; the VM is quarantined (only `vmkit vm rm` is accepted)");
        let marked = async {
            let b = &self.inner.backends;
            // The record as the failed step left it, which may be ahead of `vm`.
            if let Some(mut current) = b.store.get_vm_by_id(vm.id).await? {
                current.quarantined = Some(format!("could not {action}: {error}"));
                self.save(&mut current).await?;
            }
            Ok::<_, ManagerError>(())
        }
        .await;
        if let Err(e) = marked {
            warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot record the quarantine");
        }
        self.emit(NewEvent::vm(
            vm.id,
            &vm.name,
            EventKind::ReconcileFailed {
                action: action.clone(),
                error: error.clone(),
            },
        ))
        .await;
        report.failed.push(ReconcileFailure {
            vm: Some(vm.name.clone()),
            action,
            error,
        });
    }

    /// Lifts the quarantine of `vm`, which this reconcile settled.
    async fn lift_quarantine(&self, vm: &VmRecord) {
        let lifted = async {
            let b = &self.inner.backends;
            if let Some(mut current) = b.store.get_vm_by_id(vm.id).await?
                && current.quarantined.take().is_some()
            {
                self.save(&mut current).await?;
                self.reconciled(&current, "settled it; the quarantine is lifted")
                    .await;
            }
            Ok::<_, ManagerError>(())
        }
        .await;
        if let Err(e) = lifted {
            warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot lift the quarantine");
        }
    }

    /// Tries again to re-attach the VMMs that reconcile found running but could not
    /// drive (their control socket did not answer, say). Returns the VMs re-attached
    /// now; a VM whose VMM turned out gone is left to [`Manager::check_vmms`]. The
    /// daemon's monitor calls it periodically; an operation that drives the VMM of
    /// such a VM (pause, resume, resize, snapshot, metrics) tries first too.
    pub async fn retry_unreachable(&self) -> Vec<VmName> {
        let marked: Vec<(VmId, VmmHandle)> = {
            let unreachable = self.unreachable_marks();
            unreachable.iter().map(|(id, h)| (*id, h.clone())).collect()
        };
        let mut attached = Vec::new();
        for (id, handle) in marked {
            let b = &self.inner.backends;
            let name = match b.store.get_vm_by_id(id).await {
                Ok(Some(vm)) => vm.name,
                Ok(None) => {
                    self.forget_unreachable(id);
                    continue;
                }
                Err(e) => {
                    warn!(vm = %id, error = %ErrorChain(&e), "cannot read the VM to re-attach it");
                    continue;
                }
            };
            let _guard = self.lock(&name).await;
            let outcome = async {
                let Some(mut vm) = b.store.get_vm_by_id(id).await? else {
                    return Ok(None);
                };
                if !self.is_unreachable(&vm) || vm.quarantined.is_some() {
                    return Ok(None);
                }
                self.try_reattach(&mut vm).await.map(Some)
            }
            .await;
            match outcome {
                Ok(Some(Reattach::Attached)) => attached.push(name),
                Ok(Some(Reattach::Unreachable(reason))) => {
                    debug!(vm = %name, %reason, "VMM still unreachable");
                }
                Ok(Some(Reattach::Gone)) => {}
                Ok(None) => {
                    // The VM moved on (stopped, deleted, another VMM): the mark is stale.
                    if self.unreachable_marks().get(&id) == Some(&handle) {
                        self.forget_unreachable(id);
                    }
                }
                Err(e) => warn!(vm = %name, error = %ErrorChain(&e), "cannot re-attach the VMM"),
            }
        }
        attached
    }

    /// Re-attaches the VMM of `vm` first if reconcile could not: for operations that
    /// drive the VMM. Fails, leaving the VM as it is, while it stays unreachable.
    pub(super) async fn reattach(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        if !self.is_unreachable(vm) {
            return Ok(());
        }
        match self.try_reattach(vm).await? {
            Reattach::Attached => Ok(()),
            Reattach::Gone => Err(ManagerError::Hypervisor(HypervisorError::NotRunning {
                pid: vm.resources.vmm.as_ref().map_or(0, |h| h.pid),
            })),
            Reattach::Unreachable(reason) => Err(ManagerError::VmmUnreachable {
                name: vm.name.clone(),
                reason,
            }),
        }
    }

    /// One attempt to attach the VMM of `vm`, marked unreachable.
    async fn try_reattach(&self, vm: &mut VmRecord) -> Result<Reattach, ManagerError> {
        let Some(handle) = vm.resources.vmm.clone() else {
            self.forget_unreachable(vm.id);
            return Ok(Reattach::Gone);
        };
        let attached = match self.hv(vm) {
            Ok(hv) => hv.attach(&handle).await.map_err(ManagerError::from),
            Err(e) => Err(e),
        };
        match attached {
            Ok(state) => {
                self.forget_unreachable(vm.id);
                let actual = match state {
                    VmmState::Running => Some(VmState::Running),
                    VmmState::Paused => Some(VmState::Paused),
                    _ => None,
                };
                if let Some(actual) = actual
                    && actual != vm.state
                    && vm.state.can_transition_to(actual)
                {
                    self.set_state(vm, actual).await?;
                }
                // The agent check says how the guest is.
                self.set_health(vm, Health::Unknown).await?;
                self.reconciled(vm, "re-attached its VMM").await;
                Ok(Reattach::Attached)
            }
            Err(ManagerError::Hypervisor(HypervisorError::NotRunning { .. })) => {
                self.forget_unreachable(vm.id);
                Ok(Reattach::Gone)
            }
            Err(e) => {
                let reason = ErrorChain(&e).to_string();
                self.set_health(vm, unreachable_health(&reason)).await?;
                Ok(Reattach::Unreachable(reason))
            }
        }
    }

    /// Whether `vm`'s VMM is marked unreachable (its current VMM, not an earlier one).
    pub(super) fn is_unreachable(&self, vm: &VmRecord) -> bool {
        vm.resources
            .vmm
            .as_ref()
            .is_some_and(|h| self.unreachable_marks().get(&vm.id) == Some(h))
    }

    fn mark_unreachable(&self, vm: &VmRecord) {
        if let Some(handle) = &vm.resources.vmm {
            self.unreachable_marks().insert(vm.id, handle.clone());
        }
    }

    pub(super) fn forget_unreachable(&self, vm: VmId) {
        self.unreachable_marks().remove(&vm);
    }

    fn unreachable_marks(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, VmmHandle>> {
        self.inner
            .unreachable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records a change of `vm`'s health, as an event too.
    async fn set_health(&self, vm: &mut VmRecord, health: Health) -> Result<(), ManagerError> {
        if vm.health == health {
            return Ok(());
        }
        vm.health = health.clone();
        self.save(vm).await?;
        self.emit(NewEvent::vm(
            vm.id,
            &vm.name,
            EventKind::HealthChanged { health },
        ))
        .await;
        Ok(())
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

/// "remove X" → "removed X", "release X" → "released X".
fn past_tense(action: &str) -> String {
    match action.split_once(' ') {
        Some((verb, rest)) if verb.ends_with('e') => format!("{verb}d {rest}"),
        Some((verb, rest)) => format!("{verb}ed {rest}"),
        None => action.to_owned(),
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
