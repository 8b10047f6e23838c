//! The create saga and its undo, and delete: the reverse.
//!
//! Each step of a create is written to the VM's record as soon as what it made
//! exists, and pushed on an undo list; a failure runs the list in reverse and removes
//! the record, so that a failed create leaves nothing. A crash mid-way is finished or
//! undone by reconcile from what the record holds.

use super::*;

impl Manager {
    /// Creates a VM and returns once its agent answered. Quotas are checked before
    /// anything is taken; on failure every step taken is undone in reverse order and
    /// no record remains.
    ///
    /// With an [idempotency key](CreateRequest::idempotency_key), a create asked
    /// again with the same key and request by the same owner returns the VM the
    /// first made (waiting for it if that create still runs) instead of making
    /// another or failing with `name_taken`; the same key with another request is
    /// refused ([`ManagerError::IdempotencyKeyReused`]). The key is kept in the VM's
    /// record, so this holds across a restart of the daemon, for the VM's life.
    pub async fn create(&self, request: CreateRequest) -> Result<VmRecord, ManagerError> {
        let Some(key) = request.idempotency_key.clone() else {
            return self.create_once(request).await;
        };
        let fingerprint = request.fingerprint();
        let _key = self
            .inner
            .idempotency_locks
            .lock(&(request.owner, key.clone()))
            .await;
        let store = &self.inner.backends.store;
        let earlier = store
            .list_vms(Some(request.owner))
            .await?
            .into_iter()
            .find(|vm| vm.idempotency.as_ref().is_some_and(|i| i.key == key));
        if let Some(earlier) = earlier {
            if earlier.idempotency.as_ref().map(|i| &i.request) != Some(&fingerprint) {
                return Err(ManagerError::IdempotencyKeyReused { key });
            }
            // Its create is over (it held the key's lock); what it left is the answer.
            let _guard = self.lock(&earlier.name).await;
            if let Some(vm) = store.get_vm_by_id(earlier.id).await? {
                return Ok(vm);
            }
        }
        self.create_once(request).await
    }

    pub(super) async fn create_once(
        &self,
        request: CreateRequest,
    ) -> Result<VmRecord, ManagerError> {
        let b = &self.inner.backends;
        request.spec.validate(&self.inner.config.spec_limits)?;
        let idempotency = request.idempotency_key.clone().map(|key| Idempotency {
            key,
            request: request.fingerprint(),
        });
        let image = b.images.resolve(&request.spec.image).await?;
        let quota = self.quota_of(request.owner).await?;
        let name = match request.name {
            Some(name) => name,
            None => self.free_name().await?,
        };
        let _guard = self.lock(&name).await;
        let mut vm = VmRecord::new(name, request.owner, request.spec);
        vm.idempotency = idempotency;
        // A clone runs on its source's backend (its disk formats and saved memory
        // are that backend's); a fresh VM on the default.
        vm.hypervisor = Some(match &request.from {
            Some(source) => self.backend_of_source(source).await?,
            None => b.hypervisor.kind().to_owned(),
        });
        b.store.create_vm(&vm, &quota).await?;
        info!(vm = %vm.name, id = %vm.id, "creating VM");
        self.emit(NewEvent::vm(vm.id, &vm.name, EventKind::Creating))
            .await;

        let mut undo = Vec::new();
        let created = match self
            .create_steps(&mut vm, &image, request.from.as_ref(), &quota, &mut undo)
            .await
        {
            Ok(()) => {
                vm.health = Health::Healthy;
                self.set_state(&mut vm, VmState::Running).await
            }
            Err(error) => Err(error),
        };
        match created {
            Ok(()) => Ok(vm),
            Err(error) => {
                warn!(vm = %vm.name, error = %ErrorChain(&error), "create failed; rolling back");
                self.rollback(&vm, undo).await;
                if let Err(e) = b.store.delete_vm(vm.id).await {
                    warn!(vm = %vm.name, error = %e, "cannot remove the record of a failed create");
                }
                self.emit(NewEvent::vm(
                    vm.id,
                    &vm.name,
                    EventKind::CreateFailed {
                        error: ErrorChain(&error).to_string(),
                    },
                ))
                .await;
                Err(error)
            }
        }
    }

    pub(super) async fn create_steps(
        &self,
        vm: &mut VmRecord,
        image: &crate::image::Image,
        from: Option<&CloneSource>,
        quota: &Quota,
        undo: &mut Vec<Undo>,
    ) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        // The VMM's uid first: the disks are handed to it at every start, and it is
        // released last.
        if self.inner.config.confinement.is_some() {
            undo.push(Undo::Uid(vm.id));
            self.ensure_uid(vm).await?;
        }
        match from {
            None => {
                let formats = self.hv(vm)?.capabilities().disk_formats;
                let base = b.storage.import_image(image).await?;
                let mut root = b.storage.clone_root(vm.id, &base, &formats).await?;
                undo.push(Undo::Volume(root.clone()));
                vm.resources.root = Some(root.clone());
                // The root disk counts at its size, which is the image's when the
                // spec asks for less: checked again now that it is known.
                self.save_within_quota(vm, quota).await?;
                let root_bytes = vm.spec.root_gib << 30;
                if root_bytes > root.size_bytes {
                    root = b.storage.resize(&root, root_bytes).await?;
                    vm.resources.root = Some(root);
                    self.save(vm).await?;
                }
                if vm.spec.disk_gib > 0 {
                    let data = b.storage.create_data(vm.id, vm.spec.disk_gib << 30).await?;
                    undo.push(Undo::Volume(data.clone()));
                    vm.resources.data = Some(data);
                    self.save(vm).await?;
                }
            }
            Some(source) => self.copy_disks_from(vm, source, quota, undo).await?,
        }

        if let Some(network) = &b.network {
            let lease = b.store.allocate_lease(vm.id, &network.pool()).await?;
            undo.push(Undo::Lease(vm.id));
            vm.resources.lease = Some(lease.clone());
            self.save(vm).await?;
            // Record the intent before the TAP exists, so a crash in between still
            // leaves a record pointing at it.
            undo.push(Undo::Tap(vm.id));
            let mut attachment = network.attach(vm.id, &lease).await?;
            if attachment.dns.is_empty() {
                attachment.dns = self.inner.config.dns.clone();
            }
            vm.resources.net = Some(attachment);
            self.save(vm).await?;
        }

        let config = self.machine_config(vm, image)?;
        let handle = self.hv(vm)?.start(&config).await?;
        undo.push(Undo::Vmm(handle.clone()));
        vm.resources.vmm = Some(handle.clone());
        self.save(vm).await?;

        self.wait_ready(vm, &handle).await?;
        self.configure_guest(vm).await?;
        Ok(())
    }

    pub(super) async fn rollback(&self, vm: &VmRecord, undo: Vec<Undo>) {
        let b = &self.inner.backends;
        self.forget_vm(vm.id);
        for step in undo.into_iter().rev() {
            let result = match step {
                Undo::Vmm(handle) => match self.hv(vm) {
                    Ok(hv) => {
                        let killed = hv.kill(&handle).await;
                        let cleaned = hv.cleanup(&handle).await;
                        killed.and(cleaned).map_err(ManagerError::from)
                    }
                    Err(e) => Err(e),
                },
                Undo::Tap(id) => match &b.network {
                    Some(n) => n.detach(id).await.map_err(ManagerError::from),
                    None => Ok(()),
                },
                Undo::Lease(id) => b
                    .store
                    .release_lease(id)
                    .await
                    .map(drop)
                    .map_err(ManagerError::from),
                Undo::Volume(v) => b.storage.delete(&v).await.map_err(ManagerError::from),
                Undo::Uid(id) => self.release_uid_of(id).await,
            };
            if let Err(error) = result {
                warn!(vm = %vm.name, error = %ErrorChain(&error), "rollback step failed; reconcile will retry");
            }
        }
    }

    /// Deletes a VM and everything it holds, except its data volume when
    /// `options` keep it: then it says where that went. Allowed in every state; a VM
    /// left half-deleted by an earlier failure is finished off.
    pub async fn delete(
        &self,
        name: &VmName,
        options: DeleteOptions,
    ) -> Result<Deleted, ManagerError> {
        let _guard = self.lock(name).await;
        let b = &self.inner.backends;
        let mut vm = self.get(name).await?;
        if vm.resources.vmm.is_some() {
            // Refused before anything changes: its VMM cannot be stopped.
            self.hv(&vm)?;
        }
        if vm.state != VmState::Deleting {
            vm.keep_data = options.keep_data;
            self.set_state(&mut vm, VmState::Deleting).await?;
        } else if options.keep_data && !vm.keep_data {
            // Finishing an interrupted delete: asking to keep the data still counts.
            vm.keep_data = true;
            self.save(&mut vm).await?;
        }
        let options = DeleteOptions {
            keep_data: vm.keep_data,
        };
        self.forget_vm(vm.id);
        if let Some(handle) = vm.resources.vmm.clone() {
            if options.keep_data {
                self.graceful_stop(&vm, &handle).await?;
            } else {
                self.hv(&vm)?.kill(&handle).await?;
            }
            self.hv(&vm)?.cleanup(&handle).await?;
            vm.resources.vmm = None;
            self.save(&mut vm).await?;
        }
        if let Some(net) = vm.resources.net.take() {
            if let Some(network) = &b.network {
                network.detach(net.vm).await?;
            }
            self.save(&mut vm).await?;
        }
        if vm.resources.lease.take().is_some() {
            b.store.release_lease(vm.id).await?;
            self.save(&mut vm).await?;
        }
        if let Some(root) = vm.resources.root.take() {
            b.storage.delete(&root).await?;
            self.save(&mut vm).await?;
        }
        let mut kept_data = None;
        if let Some(data) = vm.resources.data.take() {
            if options.keep_data {
                let kept = b.storage.release(&data).await?;
                self.disown(&vm, &kept);
                self.data_kept(&vm, &kept).await;
                kept_data = Some(kept);
            } else {
                b.storage.delete(&data).await?;
            }
            self.save(&mut vm).await?;
        }
        self.drop_console(vm.id).await?;
        // Last: the uid still owned the disks until they went.
        if vm.resources.uid.take().is_some() {
            self.release_uid_of(vm.id).await?;
            self.save(&mut vm).await?;
        }
        let deleted = b
            .store
            .delete_vm_with_event(
                vm.id,
                NewEvent::vm(vm.id, &vm.name, EventKind::Deleted),
                &self.inner.config.event_retention,
            )
            .await?;
        info!(vm = %vm.name, "deleted VM");
        // No subscriber is not an error.
        let _ = self.inner.events.send(deleted);
        Ok(Deleted {
            name: vm.name,
            kept_data,
        })
    }

    /// Records where the data volume of `vm`, handed over to the operator, went.
    pub(super) async fn data_kept(&self, vm: &VmRecord, path: &std::path::Path) {
        info!(vm = %vm.name, path = %path.display(), "kept the data volume");
        self.emit(NewEvent::vm(
            vm.id,
            &vm.name,
            EventKind::DataKept {
                path: path.to_owned(),
            },
        ))
        .await;
    }

    pub(super) async fn free_name(&self) -> Result<VmName, ManagerError> {
        for _ in 0..16 {
            let name = VmName::generate();
            if self.inner.backends.store.get_vm(&name).await?.is_none() {
                return Ok(name);
            }
        }
        // 34 * 34 * 9000 names: sixteen collisions in a row means the store is lying.
        Err(ManagerError::Store(
            crate::state_store::StoreError::Corrupt("no free generated name after 16 tries".into()),
        ))
    }
}
