//! Snapshots, restore and clones.
//!
//! A snapshot copies a VM's volumes (consistent: a running VM is paused for the
//! copy) and, when the hypervisor can, saves its memory; the record is written last,
//! so a crash part-way leaves only volumes and a directory no record holds, which
//! reconcile removes. A restore marks the VM (`restoring`) before it replaces any
//! disk, so reconcile can finish it. A clone is a create whose disks are copies.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{CloneSource, CreateRequest, Manager, Undo};
use crate::error::ManagerError;
use crate::event::{EventKind, NewEvent};
use crate::hypervisor::VmmHandle;
use crate::name::VmName;
use crate::snapshot::Snapshot;
use crate::state::VmState;
use crate::storage::Volume;
use crate::time::Timestamp;
use crate::user::UserId;
use crate::vm::{Health, VmId, VmRecord};

const SNAPSHOTTABLE: &[VmState] = &[VmState::Running, VmState::Paused, VmState::Stopped];

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
    pub async fn snapshot(&self, vm: &VmName, name: VmName) -> Result<Snapshot, ManagerError> {
        let _guard = self.lock(vm).await;
        let b = &self.inner.backends;
        let mut record = self.get(vm).await?;
        self.require(&record, "snapshot", SNAPSHOTTABLE)?;
        self.reattach(&mut record).await?;
        let hv = self.hv(&record)?;
        if b.store.get_snapshot(&name).await?.is_some() {
            return Err(ManagerError::SnapshotTaken(name));
        }
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
            ManagerError::Store(crate::store::StoreError::Corrupt(format!(
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
        b.store.put_snapshot(&snapshot).await?;
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
    pub async fn get_snapshot(&self, name: &VmName) -> Result<Snapshot, ManagerError> {
        self.inner
            .backends
            .store
            .get_snapshot(name)
            .await?
            .ok_or_else(|| ManagerError::SnapshotNotFound(name.clone()))
    }

    /// Snapshots, by name; only `owner`'s when given.
    pub async fn list_snapshots(
        &self,
        owner: Option<UserId>,
    ) -> Result<Vec<Snapshot>, ManagerError> {
        Ok(self.inner.backends.store.list_snapshots(owner).await?)
    }

    /// Deletes a snapshot and its copies. Refused while a restore from it is
    /// unfinished.
    pub async fn delete_snapshot(&self, name: &VmName) -> Result<(), ManagerError> {
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
    pub async fn restore(&self, vm: &VmName, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(vm).await;
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
        if record.state != VmState::Stopped {
            self.stop_by_force(&mut record).await?;
        }
        record.restoring = Some(name.clone());
        self.save(&mut record).await?;
        self.replace_disks(&mut record, &snapshot).await?;

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
    /// `restoring` mark. Each step is recorded, so a crash part-way is finished by
    /// running it again.
    pub(super) async fn replace_disks(
        &self,
        vm: &mut VmRecord,
        snapshot: &Snapshot,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        for slot in [&mut vm.resources.root, &mut vm.resources.data] {
            if let Some(volume) = slot.take() {
                match b.storage.delete(&volume).await {
                    Ok(()) | Err(crate::storage::StorageError::NotFound(_)) => {}
                    Err(e) => {
                        *slot = Some(volume);
                        return Err(e.into());
                    }
                }
            }
        }
        self.save(vm).await?;
        // A copy a crash left half-way (under its final id) goes first.
        for stale in b
            .storage
            .list()
            .await?
            .into_iter()
            .filter(|v| v.vm == vm.id)
        {
            b.storage.delete(&stale).await?;
        }
        vm.resources.root = Some(b.storage.copy_volume(&snapshot.root, vm.id).await?);
        self.save(vm).await?;
        if let Some(data) = &snapshot.data {
            vm.resources.data = Some(b.storage.copy_volume(data, vm.id).await?);
        }
        vm.spec = snapshot.spec.clone();
        vm.restoring = None;
        self.save(vm).await
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
        undo: &mut Vec<Undo>,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        let volumes: Vec<Volume> = match source {
            CloneSource::Snapshot(name) => {
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
        self.save(vm).await
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
        let spec = match &source {
            CloneSource::Vm(vm) => self.get(vm).await?.spec,
            CloneSource::Snapshot(snapshot) => self.get_snapshot(snapshot).await?.spec,
        };
        let mut request = CreateRequest::new(owner, spec);
        request.name = name;
        request.from = Some(source);
        self.create(request).await
    }
}
