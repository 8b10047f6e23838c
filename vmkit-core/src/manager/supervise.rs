//! Reacting to what VMMs report: a guest that rebooted, powered off or panicked.
//!
//! [`Manager::supervise`] keeps one task per running VMM that follows the VMM's
//! events ([`Hypervisor::watch`](crate::Hypervisor::watch)) and reacts as soon as
//! one comes, under the VM's operation lock and only while the VM's record still
//! names that VMM (an operation that replaced or stopped it has the last word):
//!
//! - a guest reset (a reboot that keeps the VMM): the VM stays running; its agent
//!   connection is dropped, and once the new boot's agent says hello (with a boot id
//!   other than the last one) the guest is configured again (network, host name, SSH
//!   keys). A [`EventKind::GuestRebooted`] event records it. The wait for the agent
//!   happens outside the lock, so the VM can be stopped meanwhile.
//! - a power-off: the VM is stopped, its console kept ([`EventKind::GuestPoweredOff`]).
//! - a panic: the same, with [`EventKind::GuestPanicked`]; like a VMM that crashed
//!   ([`EventKind::VmmExited`]) it is reported to the caller, whose exit policy may
//!   start it again.
//! - a VMM that ended with the guest rebooting (a backend that does not reset in
//!   place): the VM is booted again at once.
//!
//! Backends that cannot watch their VMMs are covered by [`Manager::check_vmms`],
//! which polls them; it also stays as a safety net for the others.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Manager;
use crate::error::{ErrorChain, ManagerError};
use crate::event::{EventKind, NewEvent};
use crate::hypervisor::{HypervisorError, VmmExit, VmmHandle};
use crate::name::VmName;
use crate::vm::{Health, VmId};
use crate::vm_state::VmState;

/// How often [`Manager::supervise`] looks for VMMs it does not follow yet even when
/// no event told it of one.
const RESYNC: Duration = Duration::from_secs(10);

impl Manager {
    /// Follows every running VMM's events and reacts at once (see the module docs
    /// of `manager::supervise`). Runs until the future is dropped. The names of VMs
    /// whose VMM ended unexpectedly (a guest panic, a crash, a kill from outside)
    /// are sent to `died`, for the caller's [`ExitPolicy`](crate::ExitPolicy); a
    /// power-off is what the guest's user asked for and is not sent.
    pub async fn supervise(&self, died: mpsc::UnboundedSender<VmName>) {
        let mut feed = self.subscribe();
        let mut followed: HashMap<VmId, (VmmHandle, tokio::task::AbortHandle)> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.follow_new(&mut followed, &mut tasks, &died).await {
                warn!(error = %ErrorChain(&e), "cannot list the VMs to follow their VMMs");
            }
            // Until a VM may have got or lost a VMM: it started, stopped, was
            // restored or reconciled.
            loop {
                tokio::select! {
                    event = feed.recv() => match event {
                        Ok(event) if matches!(event.kind, EventKind::StateChanged { .. }
                            | EventKind::Restored { .. } | EventKind::Reconciled { .. }) => break,
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    },
                    _ = resync.tick() => break,
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
        }
    }

    /// Starts a follower for every running or paused VM whose VMM has none, and
    /// stops the followers of VMMs no record names any more.
    async fn follow_new(
        &self,
        followed: &mut HashMap<VmId, (VmmHandle, tokio::task::AbortHandle)>,
        tasks: &mut JoinSet<()>,
        died: &mpsc::UnboundedSender<VmName>,
    ) -> Result<(), ManagerError> {
        let vms = self.list(None).await?;
        let mut current: HashMap<VmId, VmmHandle> = HashMap::new();
        for vm in vms {
            // A quarantined VM waits for its rm; an unreachable one for its
            // re-attach (`retry_unreachable`), after which it is followed.
            if vm.quarantined.is_some() || self.is_unreachable(&vm) {
                continue;
            }
            if let (VmState::Running | VmState::Paused, Some(handle)) =
                (vm.state, vm.resources.vmm.clone())
            {
                current.insert(vm.id, handle);
            }
        }
        followed.retain(|id, (handle, task)| {
            let keep = current.get(id) == Some(handle);
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, handle) in current {
            if followed.contains_key(&id) {
                continue;
            }
            let manager = self.clone();
            let died = died.clone();
            let followed_handle = handle.clone();
            let task = tasks.spawn(async move {
                manager.follow(id, followed_handle, died).await;
            });
            followed.insert(id, (handle, task));
        }
        Ok(())
    }

    /// Follows the VMM `handle` of VM `id` until it ends or the backend stops
    /// reporting.
    async fn follow(&self, id: VmId, handle: VmmHandle, died: mpsc::UnboundedSender<VmName>) {
        // The backend that started the VMM; a VM whose backend is missing is left
        // to reconcile.
        let Some(hv) = self.inner.backends.hypervisor_of(&handle.backend) else {
            return;
        };
        let mut watch = match hv.watch(&handle).await {
            Ok(watch) => watch,
            Err(HypervisorError::Unsupported { .. }) => return,
            Err(e) => {
                debug!(%id, error = %e, "cannot follow the VMM's events; polling covers it");
                return;
            }
        };
        // Resets are counted from when the backend began watching the VMM (its
        // start, restore or attach); those before the boot whose agent said hello
        // last were part of reaching it.
        let mut handled = self.boot(id).and_then(|b| b.resets).unwrap_or(0);
        loop {
            let events = watch.current();
            if let Some(exit) = events.exit {
                match self.vmm_ended(id, &handle, exit).await {
                    Ok(Some(name)) => {
                        let _ = died.send(name);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(%id, error = %ErrorChain(&e), "cannot settle a VM whose VMM ended; polling retries")
                    }
                }
                return;
            }
            if events.resets > handled {
                handled = events.resets;
                self.guest_reset(id, &handle).await;
                continue;
            }
            if watch.changed().await.is_none() {
                return;
            }
        }
    }

    /// Records that the VMM `handle` of VM `id` ended for `exit`: the VM is stopped
    /// with its console kept, or for a reboot booted again. Returns the VM's name
    /// when the exit was unexpected (for the exit policy). Does nothing when the
    /// VM's record no longer names that VMM.
    pub(super) async fn vmm_ended(
        &self,
        id: VmId,
        handle: &VmmHandle,
        exit: VmmExit,
    ) -> Result<Option<VmName>, ManagerError> {
        let b = &self.inner.backends;
        let Some(listed) = b.store.get_vm_by_id(id).await? else {
            return Ok(None);
        };
        let _guard = self.lock(&listed.name).await;
        let Some(mut vm) = b.store.get_vm_by_id(id).await? else {
            return Ok(None);
        };
        if vm.resources.vmm.as_ref() != Some(handle)
            || !matches!(vm.state, VmState::Running | VmState::Paused)
        {
            return Ok(None);
        }
        let kind = match exit {
            VmmExit::PowerOff => EventKind::GuestPoweredOff,
            VmmExit::Panic => EventKind::GuestPanicked,
            VmmExit::Reboot => EventKind::GuestRebooted,
            _ => EventKind::VmmExited,
        };
        match exit {
            VmmExit::PowerOff | VmmExit::Reboot => info!(vm = %vm.name, "{exit}"),
            _ => warn!(vm = %vm.name, "{exit}; the VM is stopped"),
        }
        self.forget_agent(vm.id);
        self.keep_console(vm.id, handle).await;
        self.hv(&vm)?.cleanup(handle).await?;
        vm.resources.vmm = None;
        vm.health = Health::Unknown;
        self.emit(NewEvent::vm(vm.id, &vm.name, kind)).await;
        self.set_state(&mut vm, VmState::Stopped).await?;
        match exit {
            VmmExit::PowerOff => Ok(None),
            // This backend ends the VMM on a reboot: boot it again.
            VmmExit::Reboot => {
                self.start_locked(&mut vm).await?;
                Ok(None)
            }
            _ => Ok(Some(vm.name)),
        }
    }

    /// The guest of VM `id` reset (rebooted) in its VMM `handle`: forget its agent,
    /// wait for the new boot's agent, configure the guest again.
    async fn guest_reset(&self, id: VmId, handle: &VmmHandle) {
        let b = &self.inner.backends;
        let owned = async {
            let Some(listed) = b.store.get_vm_by_id(id).await? else {
                return Ok(None);
            };
            let _guard = self.lock(&listed.name).await;
            let Some(mut vm) = b.store.get_vm_by_id(id).await? else {
                return Ok(None);
            };
            if vm.resources.vmm.as_ref() != Some(handle) || vm.state != VmState::Running {
                return Ok(None);
            }
            info!(vm = %vm.name, "the guest rebooted; waiting for its agent");
            self.set_rebooting(vm.id, true);
            let last_boot = self.boot(vm.id).map(|b| b.id);
            // The old boot's agent is gone, though its connection may look open
            // (and hold a channel that serves one client): close it for everyone.
            if let Some(client) = self.cached_agent(vm.id) {
                client.close();
            }
            self.forget_agent(vm.id);
            vm.health = Health::Unknown;
            self.save_with_event(&mut vm, EventKind::GuestRebooted)
                .await?;
            Ok::<_, ManagerError>(Some((vm, last_boot)))
        }
        .await;
        let (vm, last_boot) = match owned {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                warn!(%id, error = %ErrorChain(&e), "cannot record a guest reboot");
                return;
            }
        };
        let gate = self.connect_gate(vm.id);
        let ready = {
            let _connecting = gate.lock().await;
            self.wait_ready_after(&vm, handle, last_boot.as_deref())
                .await
        };
        let outcome = async {
            ready?;
            let _guard = self.lock(&vm.name).await;
            let Some(mut current) = b.store.get_vm_by_id(id).await? else {
                return Ok(());
            };
            if current.resources.vmm.as_ref() != Some(handle) || current.state != VmState::Running {
                return Ok(());
            }
            let configured = self.configure_guest(&current).await;
            let health = match &configured {
                Ok(()) => Health::Healthy,
                Err(e) => Health::Unhealthy {
                    reason: format!(
                        "the guest rebooted and could not be configured again: {}",
                        ErrorChain(e)
                    ),
                },
            };
            current.health = health.clone();
            self.save_with_event(&mut current, EventKind::HealthChanged { health })
                .await?;
            match configured {
                Ok(()) => {
                    info!(vm = %current.name, "rebooted and configured again");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        .await;
        self.set_rebooting(vm.id, false);
        if let Err(e) = outcome {
            warn!(vm = %vm.name, error = %ErrorChain(&e), "the guest rebooted and is not back");
            self.reboot_failed(id, handle, &e).await;
        }
    }

    /// Marks VM `id`, whose guest rebooted and did not come back, unhealthy (unless
    /// its record moved on).
    async fn reboot_failed(&self, id: VmId, handle: &VmmHandle, error: &ManagerError) {
        let b = &self.inner.backends;
        let Ok(Some(listed)) = b.store.get_vm_by_id(id).await else {
            return;
        };
        let _guard = self.lock(&listed.name).await;
        let Ok(Some(mut vm)) = b.store.get_vm_by_id(id).await else {
            return;
        };
        if vm.resources.vmm.as_ref() != Some(handle)
            || vm.state != VmState::Running
            || matches!(vm.health, Health::Unhealthy { .. })
        {
            return;
        }
        let health = Health::Unhealthy {
            reason: format!("the guest rebooted and is not back: {}", ErrorChain(error)),
        };
        vm.health = health.clone();
        if let Err(e) = self
            .save_with_event(&mut vm, EventKind::HealthChanged { health })
            .await
        {
            warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot record that the guest is not back");
        }
    }
}
