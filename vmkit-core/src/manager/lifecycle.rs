//! Start, stop, restart, pause and resume, and the boot: a VMM started, its agent's
//! hello awaited, the guest configured.

use super::*;

impl Manager {
    /// Starts a stopped VM and returns once its agent answered.
    pub async fn start(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "start", STOPPED)?;
        self.start_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Stops a running or paused VM: asks the guest to power off, then stops the
    /// VMM by force after the grace period. Disks, address and TAP are kept.
    pub async fn stop(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "stop", RUNNING_OR_PAUSED)?;
        self.stop_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Stops the VM if it runs, then starts it.
    pub async fn restart(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "restart", SETTLED)?;
        if vm.state != VmState::Stopped {
            self.stop_locked(&mut vm).await?;
        }
        self.start_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Pauses a running VM's vCPUs (running → paused). Memory, disks and network stay.
    pub async fn pause(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "pause", RUNNING)?;
        self.reattach(&mut vm).await?;
        let hv = self.hv(&vm)?;
        if !hv.capabilities().pause {
            return Err(ManagerError::Unsupported("pause"));
        }
        let handle = self.vmm_of(&vm)?;
        hv.pause(&handle).await?;
        self.set_state(&mut vm, VmState::Paused).await?;
        Ok(vm)
    }

    /// Resumes a paused VM (paused → running).
    pub async fn resume(&self, name: &VmName) -> Result<VmRecord, ManagerError> {
        let _guard = self.lock(name).await;
        let mut vm = self.get(name).await?;
        self.require(&vm, "resume", PAUSED)?;
        self.reattach(&mut vm).await?;
        let handle = self.vmm_of(&vm)?;
        self.hv(&vm)?.resume(&handle).await?;
        self.set_state(&mut vm, VmState::Running).await?;
        Ok(vm)
    }

    pub(super) async fn start_locked(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        let b = &self.inner.backends;
        let image = b.images.resolve(&vm.spec.image).await?;
        self.ensure_uid(vm).await?;
        self.set_state(vm, VmState::Starting).await?;
        let config = self.machine_config(vm, &image)?;
        let started = async {
            let handle = self.hv(vm)?.start(&config).await?;
            vm.resources.vmm = Some(handle.clone());
            self.save(vm).await?;
            self.wait_ready(vm, &handle).await?;
            self.configure_guest(vm).await
        }
        .await;
        self.finish_start(vm, started).await
    }

    /// Records the outcome of a start: running, or stopped with nothing left
    /// running and the failure as an event.
    pub(super) async fn finish_start(
        &self,
        vm: &mut VmRecord,
        started: Result<(), ManagerError>,
    ) -> Result<(), ManagerError> {
        match started {
            Ok(()) => {
                vm.health = Health::Healthy;
                self.set_state(vm, VmState::Running).await
            }
            Err(error) => {
                let hv = self.hv(vm);
                if let Some(handle) = vm.resources.vmm.take()
                    && let Ok(hv) = hv
                {
                    let _ = hv.kill(&handle).await;
                    self.keep_console(vm.id, &handle).await;
                    let _ = hv.cleanup(&handle).await;
                }
                self.set_state(vm, VmState::Stopped).await?;
                self.emit(NewEvent::vm(
                    vm.id,
                    &vm.name,
                    EventKind::OperationFailed {
                        operation: "start".into(),
                        error: ErrorChain(&error).to_string(),
                    },
                ))
                .await;
                Err(error)
            }
        }
    }

    pub(super) async fn stop_locked(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        self.set_state(vm, VmState::Stopping).await?;
        if let Some(handle) = vm.resources.vmm.clone() {
            self.graceful_stop(vm, &handle).await?;
            self.keep_console(vm.id, &handle).await;
            self.hv(vm)?.cleanup(&handle).await?;
        }
        vm.resources.vmm = None;
        vm.health = Health::Unknown;
        self.set_state(vm, VmState::Stopped).await
    }

    pub(super) async fn graceful_stop(
        &self,
        vm: &VmRecord,
        handle: &VmmHandle,
    ) -> Result<(), ManagerError> {
        // The agent powers the guest off cleanly even where ACPI is not handled
        // (tiny images); the hypervisor's ACPI request and forced stop follow.
        if let Some(client) = self.cached_agent(vm.id) {
            let asked =
                tokio::time::timeout(self.inner.config.agent_timeout, client.shutdown(false));
            if let Err(e) = asked
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                debug!(vm = %vm.name, error = %e, "agent shutdown request failed");
            }
        }
        self.forget_agent(vm.id);
        self.hv(vm)?
            .shutdown(handle, self.inner.config.shutdown_grace)
            .await?;
        Ok(())
    }

    /// Waits until the guest agent answers hello, the VMM dies, or the boot timeout
    /// passes. On failure the error carries the tail of the guest console.
    pub(super) async fn wait_ready(
        &self,
        vm: &VmRecord,
        handle: &VmmHandle,
    ) -> Result<HelloInfo, ManagerError> {
        self.wait_ready_after(vm, handle, None).await
    }

    /// [`Manager::wait_ready`] for a boot after the one whose boot id was
    /// `last_boot`: a hello with that id (an agent of the old boot) does not count.
    pub(super) async fn wait_ready_after(
        &self,
        vm: &VmRecord,
        handle: &VmmHandle,
        last_boot: Option<&str>,
    ) -> Result<HelloInfo, ManagerError> {
        let hv = self.hv(vm)?;
        let deadline = Instant::now() + self.inner.config.boot_timeout;
        let failure = |reason: String| async move {
            let console = hv.console_tail(handle, 4096).await.unwrap_or_default();
            ManagerError::BootFailed {
                name: vm.name.clone(),
                reason,
                console,
            }
        };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(failure(format!(
                    "the agent did not answer within {:?}",
                    self.inner.config.boot_timeout
                ))
                .await);
            }
            if hv.info(handle).await?.state == VmmState::Exited {
                return Err(failure("the VMM exited during boot".to_owned()).await);
            }
            let stream = match hv.connect_agent(handle).await {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(vm = %vm.name, error = %e, "agent not reachable yet");
                    tokio::time::sleep(Duration::from_millis(100).min(remaining)).await;
                    continue;
                }
            };
            // One hello per connection, bounded by the time left: the request waits
            // in the channel until the agent opens it, so it is never sent twice.
            let client = Client::new(stream, self.agent_client_config());
            let waiter = client.clone();
            let hello = waiter.hello_within(remaining);
            tokio::pin!(hello);
            let outcome = loop {
                tokio::select! {
                    r = &mut hello => break Some(r),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if hv.info(handle).await?.state == VmmState::Exited {
                            break None;
                        }
                    }
                }
            };
            match outcome {
                None => return Err(failure("the VMM exited during boot".to_owned()).await),
                Some(Ok(hello)) if last_boot == Some(hello.boot_id.as_str()) => {
                    debug!(vm = %vm.name, "the agent of the previous boot answered; reconnecting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(Ok(hello)) => {
                    // Guest text: logged with Debug, which quotes and escapes it.
                    info!(vm = %vm.name, agent = ?hello.agent_version, kernel = ?hello.kernel, "agent ready");
                    self.remember_agent(vm.id, client, &hello, handle).await;
                    return Ok(hello);
                }
                Some(Err(e)) => {
                    debug!(vm = %vm.name, error = %e, "agent hello failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
