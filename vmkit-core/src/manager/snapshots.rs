//! Snapshots, restore and clones.
//!
//! A snapshot copies a VM's volumes (consistent: a running VM is paused for the
//! copy) and, when the hypervisor can, saves its memory; the record is written last,
//! with the owner's quota checked in the same transaction, so a crash part-way
//! leaves only volumes and a directory no record holds, which reconcile removes.
//!
//! A restore holds the snapshot's lock (a delete of the snapshot waits for it) and
//! marks the VM (`restoring`, and `restore_into`: the id its copies are made under)
//! before it stops the VM. It copies the snapshot's disks first, records the copies
//! as the VM's disks, and only then deletes the old ones: a failed copy leaves the
//! VM its own disks, and reconcile finishes a restore cut short at any point. A
//! clone is a create whose disks are copies.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{CloneSource, CreateRequest, Manager, Undo};
use crate::error::{ErrorChain, ManagerError};
use crate::event::{EventKind, NewEvent};
use crate::hypervisor::VmmHandle;
use crate::name::VmName;
use crate::snapshot::Snapshot;
use crate::storage::Volume;
use crate::time::Timestamp;
use crate::user::UserId;
use crate::vm::{Health, VmId, VmRecord};
use crate::vm_state::VmState;

use crate::access::SETTLED as SNAPSHOTTABLE;

impl Manager {
    /// The directory holding the saved VMM state of snapshot `id`.
    pub(super) fn snapshot_dir(&self, id: VmId) -> PathBuf {
        self.inner
            .config
            .data_dir
            .join("snapshots")
            .join(id.to_string())
    }

    /// Takes snapshot `name` of VM `vm`. A running VM is paused while its disks
    /// are copied (and its memory saved, where the hypervisor can), then resumed.
    /// The copies and the saved memory count against the owner's disk quota: a
    /// snapshot that would not fit is refused before anything is copied.
    pub async fn snapshot(&self, vm: &VmName, name: VmName) -> Result<Snapshot, ManagerError> {
        let _guard = self.lock(vm).await;
        let _snapshot_guard = self.lock_snapshot(&name).await;
        let b = &self.inner.backends;
        let mut record = self.get(vm).await?;
        self.require(&record, "snapshot", SNAPSHOTTABLE)?;
        self.reattach(&mut record).await?;
        let hv = self.hv(&record)?;
        if b.store.get_snapshot(&name).await?.is_some() {
            return Err(ManagerError::SnapshotTaken(name));
        }
        // Refuse before copying what would not fit; the store checks again when it
        // writes the record.
        let quota = self.quota_of(record.owner).await?;
        let memory_mib = if record.state != VmState::Stopped && hv.capabilities().snapshot {
            record.spec.memory_mib
        } else {
            0
        };
        let before = self.usage_of(record.owner).await?;
        let mut after = before;
        after.disk_bytes = after
            .disk_bytes
            .saturating_add(
                [&record.resources.root, &record.resources.data]
                    .into_iter()
                    .flatten()
                    .map(|v| v.size_bytes)
                    .sum(),
            )
            .saturating_add(memory_mib << 20);
        quota
            .check_change(&before, &after)
            .map_err(ManagerError::QuotaExceeded)?;
        let id = VmId::generate();
        let dir = self.snapshot_dir(id);
        let mut copies = Vec::new();
        let taken = self
            .quiesced(&record, async |handle: Option<&VmmHandle>| {
                let mut memory = None;
                if let Some(handle) = handle
                    && hv.capabilities().snapshot
                {
                    hv.snapshot(handle, &dir).await?;
                    memory = Some(dir.clone());
                }
                for volume in [&record.resources.root, &record.resources.data]
                    .into_iter()
                    .flatten()
                {
                    copies.push(b.storage.copy_volume(volume, id).await?);
                }
                Ok(memory)
            })
            .await;
        let memory = match taken {
            Ok(memory) => memory,
            Err(e) => {
                for copy in &copies {
                    let _ = b.storage.delete(copy).await;
                }
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        let mut volumes = copies.into_iter();
        let root = volumes.next().ok_or_else(|| {
            ManagerError::Store(crate::state_store::StoreError::Corrupt(format!(
                "VM {} has no root volume",
                record.name
            )))
        })?;
        let snapshot = Snapshot {
            name,
            id,
            vm: record.id,
            vm_name: record.name.clone(),
            owner: record.owner,
            spec: record.spec.clone(),
            root,
            data: volumes.next(),
            memory,
            mac: record.resources.net.as_ref().map(|n| n.mac),
            hypervisor: Some(hv.kind().to_owned()),
            created_at: Timestamp::now(),
        };
        if let Err(e) = b.store.put_snapshot(&snapshot, &quota).await {
            for copy in [Some(&snapshot.root), snapshot.data.as_ref()]
                .into_iter()
                .flatten()
            {
                let _ = b.storage.delete(copy).await;
            }
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e.into());
        }
        info!(vm = %record.name, snapshot = %snapshot.name, memory = snapshot.has_memory(), "snapshot taken");
        self.emit(NewEvent::vm(
            record.id,
            &record.name,
            EventKind::SnapshotTaken {
                snapshot: snapshot.name.clone(),
            },
        ))
        .await;
        Ok(snapshot)
    }

    /// Runs `f` with the VM's disks quiet: a running VM is paused for it (and
    /// resumed after, whatever `f` returns); `f` gets the VMM when there is one.
    async fn quiesced<T>(
        &self,
        vm: &VmRecord,
        f: impl AsyncFnOnce(Option<&VmmHandle>) -> Result<T, ManagerError>,
    ) -> Result<T, ManagerError> {
        let hv = self.hv(vm)?;
        let handle = vm.resources.vmm.clone();
        let pause = vm.state == VmState::Running;
        if pause {
            if !hv.capabilities().pause {
                return Err(ManagerError::Unsupported(
                    "copying the disks of a running VM on a hypervisor that cannot pause (stop the VM first)",
                ));
            }
            hv.pause(&self.vmm_of(vm)?).await?;
        }
        let out = f(handle.as_ref()).await;
        if pause
            && let Some(handle) = &handle
            && let Err(e) = hv.resume(handle).await
        {
            warn!(vm = %vm.name, error = %e, "cannot resume after copying its disks");
            return Err(e.into());
        }
        out
    }

    /// A snapshot by name.
    /// Within an operation of the command surface, the name answers only for the
    /// snapshot whose access was checked (as [`Manager::get`] does for VMs).
    pub async fn get_snapshot(&self, name: &VmName) -> Result<Snapshot, ManagerError> {
        let snapshot = self
            .inner
            .backends
            .store
            .get_snapshot(name)
            .await?
            .ok_or_else(|| ManagerError::SnapshotNotFound(name.clone()))?;
        if !super::commands::pinned_snapshot(name, snapshot.id) {
            return Err(ManagerError::SnapshotNotFound(name.clone()));
        }
        Ok(snapshot)
    }

    /// Snapshots, by name; only `owner`'s when given.
    pub async fn list_snapshots(
        &self,
        owner: Option<UserId>,
    ) -> Result<Vec<Snapshot>, ManagerError> {
        Ok(self.inner.backends.store.list_snapshots(owner).await?)
    }

    /// Deletes a snapshot and its copies. Waits for a restore or a clone from it
    /// that is under way; refused while a restore from it is unfinished (cut short
    /// by a crash, until reconcile finishes it).
    pub async fn delete_snapshot(&self, name: &VmName) -> Result<(), ManagerError> {
        let _guard = self.lock_snapshot(name).await;
        let b = &self.inner.backends;
        let snapshot = self.get_snapshot(name).await?;
        if let Some(vm) = self
            .list(None)
            .await?
            .into_iter()
            .find(|vm| vm.restoring.as_ref() == Some(name))
        {
            return Err(ManagerError::WrongState {
                name: vm.name,
                state: vm.state,
                operation: "delete a snapshot being restored into",
                allowed: &[VmState::Running, VmState::Stopped],
            });
        }
        // The record goes first: volumes and a directory without it are orphans
        // that reconcile removes if this is cut short.
        b.store.delete_snapshot(name).await?;
        for volume in [Some(&snapshot.root), snapshot.data.as_ref()]
            .into_iter()
            .flatten()
        {
            b.storage.delete(volume).await?;
        }
        if let Some(dir) = &snapshot.memory {
            match tokio::fs::remove_dir_all(dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ManagerError::Io {
                        context: format!("cannot remove {}", dir.display()),
                        source: e,
                    });
                }
            }
        }
        self.emit(NewEvent::host(EventKind::SnapshotDeleted {
            snapshot: name.clone(),
        }))
        .await;
        Ok(())
    }

    /// Restores VM `vm` to snapshot `name`, which must have been taken of it: its
    /// VMM is stopped, its disks replaced by copies of the snapshot's, and it runs
    /// again in a new VMM — from the saved memory when the snapshot has it (the
    /// guest carries on where it was), else booted from the restored disks. The VM
    /// keeps its identity: name, id, address, MAC.
    ///
    /// The snapshot cannot be deleted meanwhile. If its disks cannot be copied, the
    /// VM keeps its own and is left stopped.
    pub async fn restore(&self, vm: &VmName, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(vm).await;
        let _snapshot_guard = self.lock_snapshot(name).await;
        let mut record = self.get(vm).await?;
        self.require(&record, "restore", SNAPSHOTTABLE)?;
        let snapshot = self.get_snapshot(name).await?;
        if snapshot.vm != record.id {
            return Err(ManagerError::WrongState {
                name: record.name.clone(),
                state: record.state,
                operation: "restore a snapshot of another VM into",
                allowed: &[],
            });
        }
        // Marked before anything changes, so that a crash from here on is finished
        // by reconcile, and a delete of the snapshot is refused until then.
        record.restoring = Some(name.clone());
        record.restore_into = Some(VmId::generate());
        self.save(&mut record).await?;
        let replaced = async {
            if record.state != VmState::Stopped {
                self.stop_by_force(&mut record).await?;
            }
            self.replace_disks(&mut record, &snapshot).await
        }
        .await;
        if let Err(error) = replaced {
            self.abandon_restore(&mut record).await;
            return Err(error);
        }

        let memory = snapshot
            .memory
            .clone()
            .filter(|_| self.hv(&record).is_ok_and(|hv| hv.capabilities().snapshot));
        match memory {
            Some(dir) => self.resume_from(&mut record, &dir).await?,
            None => self.start_locked(&mut record).await?,
        }
        info!(vm = %record.name, snapshot = %name, "restored");
        self.emit(NewEvent::vm(
            record.id,
            &record.name,
            EventKind::Restored {
                snapshot: name.clone(),
            },
        ))
        .await;
        Ok(record)
    }

    /// Stops a running or paused VM at once (its state is about to be replaced).
    async fn stop_by_force(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        let hv = self.hv(vm)?;
        self.set_state(vm, VmState::Stopping).await?;
        self.forget_agent(vm.id);
        if let Some(handle) = vm.resources.vmm.take() {
            hv.kill(&handle).await?;
            hv.cleanup(&handle).await?;
        }
        vm.health = Health::Unknown;
        self.set_state(vm, VmState::Stopped).await
    }

    /// Replaces a stopped VM's disks by copies of the snapshot's and clears its
    /// `restoring` mark: copies first (under `restore_into`), then one save that
    /// makes them the VM's disks, then the old disks go. Run again after a crash at
    /// any point, it finishes the job.
    pub(super) async fn replace_disks(
        &self,
        vm: &mut VmRecord,
        snapshot: &Snapshot,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        let into = match vm.restore_into {
            Some(id) => id,
            // Marked by a vmkit that replaced disks in place: copy under a new id.
            None => {
                let id = VmId::generate();
                vm.restore_into = Some(id);
                self.save(vm).await?;
                id
            }
        };
        let swapped = vm.resources.root.as_ref().is_some_and(|v| v.vm == into);
        if !swapped {
            // Copies a crash left (whole or half-way) under that id go first.
            for stale in b.storage.list().await?.into_iter().filter(|v| v.vm == into) {
                b.storage.delete(&stale).await?;
            }
            let root = b.storage.copy_volume(&snapshot.root, into).await?;
            let data = match &snapshot.data {
                Some(data) => match b.storage.copy_volume(data, into).await {
                    Ok(copy) => Some(copy),
                    Err(e) => {
                        let _ = b.storage.delete(&root).await;
                        return Err(e.into());
                    }
                },
                None => None,
            };
            // The swap: one write makes the copies the VM's disks.
            let old = [vm.resources.root.take(), vm.resources.data.take()];
            vm.resources.root = Some(root);
            vm.resources.data = data;
            vm.spec = snapshot.spec.clone();
            if let Err(e) = self.save(vm).await {
                [vm.resources.root, vm.resources.data] = old;
                return Err(e);
            }
            for volume in old.into_iter().flatten() {
                match b.storage.delete(&volume).await {
                    Ok(()) | Err(crate::storage::StorageError::NotFound(_)) => {}
                    // Held by no record now: reconcile removes it as an orphan.
                    Err(e) => {
                        warn!(vm = %vm.name, volume = %volume.id, error = %e, "cannot delete a disk replaced by a restore; reconcile will")
                    }
                }
            }
        }
        vm.restoring = None;
        vm.restore_into = None;
        self.save(vm).await
    }

    /// Gives up a restore that could not stop the VM or copy the snapshot's disks:
    /// the VM keeps its disks (they were never touched) and its mark is cleared. Best effort: if this
    /// fails too, the mark stays and reconcile finishes the restore.
    async fn abandon_restore(&self, vm: &mut VmRecord) {
        let b = &self.inner.backends;
        let Some(into) = vm.restore_into else { return };
        if vm.resources.root.as_ref().is_some_and(|v| v.vm == into) {
            // Swapped already: the restore is all but done, and reconcile finishes it.
            return;
        }
        let cleared = async {
            for copy in b.storage.list().await?.into_iter().filter(|v| v.vm == into) {
                b.storage.delete(&copy).await?;
            }
            vm.restoring = None;
            vm.restore_into = None;
            self.save(vm).await
        }
        .await;
        if let Err(e) = cleared {
            warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot give up a failed restore; reconcile will finish it");
        }
    }

    /// Starts a stopped VM from saved VMM state in `dir`, then waits for its agent.
    async fn resume_from(
        &self,
        vm: &mut VmRecord,
        dir: &std::path::Path,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        let image = b.images.resolve(&vm.spec.image).await?;
        self.set_state(vm, VmState::Starting).await?;
        let config = self.machine_config(vm, &image)?;
        let started = async {
            let handle = self.hv(vm)?.restore(&config, dir).await?;
            vm.resources.vmm = Some(handle.clone());
            self.save(vm).await?;
            self.hv(vm)?.resume(&handle).await?;
            self.wait_ready(vm, &handle).await?;
            self.configure_guest(vm).await
        }
        .await;
        self.finish_start(vm, started).await
    }

    /// Copies the disks of `source` as `vm`'s (the first steps of a clone).
    pub(super) async fn copy_disks_from(
        &self,
        vm: &mut VmRecord,
        source: &CloneSource,
        quota: &crate::quota::Quota,
        undo: &mut Vec<Undo>,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        let volumes: Vec<Volume> = match source {
            CloneSource::Snapshot(name) => {
                let _snapshot_guard = self.lock_snapshot(name).await;
                let snapshot = self.get_snapshot(name).await?;
                let mut copies = Vec::new();
                for volume in [Some(&snapshot.root), snapshot.data.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    let copy = b.storage.copy_volume(volume, vm.id).await?;
                    undo.push(Undo::Volume(copy.clone()));
                    copies.push(copy);
                }
                copies
            }
            CloneSource::Vm(name) => {
                let _source_guard = self.lock(name).await;
                let source = self.get(name).await?;
                self.require(&source, "clone", SNAPSHOTTABLE)?;
                let id = vm.id;
                let mut copies = Vec::new();
                self.quiesced(&source, async |_| {
                    for volume in [&source.resources.root, &source.resources.data]
                        .into_iter()
                        .flatten()
                    {
                        let copy = b.storage.copy_volume(volume, id).await?;
                        undo.push(Undo::Volume(copy.clone()));
                        copies.push(copy);
                    }
                    Ok(())
                })
                .await?;
                copies
            }
        };
        for volume in volumes {
            match volume.kind {
                crate::storage::VolumeKind::Root => vm.resources.root = Some(volume),
                _ => vm.resources.data = Some(volume),
            }
        }
        // The copies count at their sizes, which may exceed the spec's.
        self.save_within_quota(vm, quota).await
    }

    /// Records on `vm` (just restored) the idempotency key of its restore.
    pub(super) async fn mark_restored(
        &self,
        vm: &VmRecord,
        mark: crate::vm::Idempotency,
    ) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(&vm.name).await;
        let mut current = self.get(&vm.name).await?;
        if current.id != vm.id {
            return Err(ManagerError::NotFound(vm.name.clone()));
        }
        current.restored_with = Some(mark);
        self.inner.backends.store.update_vm(&current).await?;
        Ok(current)
    }

    /// Creates VM `name` (generated when `None`) for `owner` from the disks of
    /// `source`, with the source's spec and a fresh identity: its own name, id, MAC,
    /// address and host name, which the agent applies at boot.
    pub async fn clone_vm(
        &self,
        source: CloneSource,
        name: Option<VmName>,
        owner: UserId,
    ) -> Result<VmRecord, ManagerError> {
        self.clone_keyed(source, name, owner, None).await
    }

    /// [`Manager::clone_vm`] with an idempotency key (see [`Manager::create`]).
    pub async fn clone_keyed(
        &self,
        source: CloneSource,
        name: Option<VmName>,
        owner: UserId,
        idempotency_key: Option<String>,
    ) -> Result<VmRecord, ManagerError> {
        let spec = match &source {
            CloneSource::Vm(vm) => self.get(vm).await?.spec,
            CloneSource::Snapshot(snapshot) => self.get_snapshot(snapshot).await?.spec,
        };
        let mut request = CreateRequest::new(owner, spec);
        request.name = name;
        request.from = Some(source);
        request.idempotency_key = idempotency_key;
        self.create(request).await
    }
}
