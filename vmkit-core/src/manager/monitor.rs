//! Checks of running VMs: their VMMs (the safety net under `supervise`) and their
//! agents (health).

use super::*;

impl Manager {
    /// Checks every VM that should have a running VMM (all at once, each bounded by
    /// [`ManagerConfig::vmm_check_timeout`]) and settles those whose VMM has gone as
    /// [`Manager::supervise`] does: stopped, console kept, an event saying why.
    /// The safety net under `supervise`, and the only check for backends that
    /// cannot report events. A VMM that does not answer, or any other failure,
    /// concerns its VM only: it is logged and the others are checked. Returns the
    /// VMs whose VMM ended unexpectedly (crash, panic, kill), for the exit policy.
    pub async fn check_vmms(&self) -> Result<Vec<VmName>, ManagerError> {
        let timeout = self.inner.config.vmm_check_timeout;
        let mut checks = tokio::task::JoinSet::new();
        for vm in self.list(None).await? {
            // A quarantined VM waits for its rm; an unreachable one for its re-attach
            // (`retry_unreachable`, which also finds out if it died).
            if !matches!(vm.state, VmState::Running | VmState::Paused)
                || vm.quarantined.is_some()
                || self.is_unreachable(&vm)
            {
                continue;
            }
            let Some(handle) = vm.resources.vmm.clone() else {
                continue;
            };
            let manager = self.clone();
            checks.spawn(async move {
                // A VM whose backend is missing is left to reconcile and rm.
                let Ok(hv) = manager.hv(&vm) else {
                    return (vm.name.clone(), Ok(None));
                };
                let outcome = match tokio::time::timeout(timeout, hv.info(&handle)).await {
                    Err(_) => Err(format!("its VMM did not answer within {timeout:?}")),
                    Ok(Err(e)) => Err(ErrorChain(&e).to_string()),
                    Ok(Ok(info)) if info.state == VmmState::Exited => {
                        // The reason, if the backend saw it.
                        let exit = match hv.watch(&handle).await {
                            Ok(watch) => watch.current().exit,
                            Err(_) => None,
                        };
                        manager
                            .vmm_ended(vm.id, &handle, exit.unwrap_or(VmmExit::Crashed))
                            .await
                            .map_err(|e| ErrorChain(&e).to_string())
                    }
                    Ok(Ok(_)) => Ok(None),
                };
                (vm.name, outcome)
            });
        }
        let mut died = Vec::new();
        while let Some(joined) = checks.join_next().await {
            match joined {
                Ok((_, Ok(Some(name)))) => died.push(name),
                Ok((_, Ok(None))) => {}
                Ok((name, Err(reason))) => {
                    warn!(vm = %name, %reason, "cannot check the VMM; checking the others")
                }
                Err(e) => warn!(error = %e, "a VMM check failed"),
            }
        }
        died.sort();
        Ok(died)
    }

    /// Pings the agent of every running VM (all at once, each bounded by `timeout`)
    /// and records a change of health as an event. A guest that stalls or breaks the
    /// protocol is marked unhealthy; nothing else is affected. Returns the VMs whose
    /// health changed.
    pub async fn check_agents(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(VmName, Health)>, ManagerError> {
        let mut pings = tokio::task::JoinSet::new();
        for vm in self.list(None).await? {
            // A rebooting guest's agent is away; the reboot brings it back.
            if vm.state != VmState::Running
                || vm.resources.vmm.is_none()
                || self.is_rebooting(vm.id)
                || self.is_unreachable(&vm)
            {
                continue;
            }
            let manager = self.clone();
            pings.spawn(async move {
                let outcome = tokio::time::timeout(timeout, async {
                    let client = manager.agent(&vm).await?;
                    client
                        .ping()
                        .await
                        .map_err(|e| ManagerError::agent(&vm.name, &e))
                })
                .await;
                let health = match outcome {
                    Ok(Ok(_)) => Health::Healthy,
                    Ok(Err(e)) => {
                        manager.forget_agent(vm.id);
                        Health::Unhealthy {
                            reason: ErrorChain(&e).to_string(),
                        }
                    }
                    Err(_) => Health::Unhealthy {
                        reason: format!("the agent did not answer a ping within {timeout:?}"),
                    },
                };
                (vm, health)
            });
        }
        let mut changed = Vec::new();
        while let Some(joined) = pings.join_next().await {
            let Ok((vm, health)) = joined else { continue };
            if vm.health == health {
                continue;
            }
            match self.record_health(&vm, &health).await {
                Ok(true) => changed.push((vm.name, health)),
                Ok(false) => {}
                Err(e) => {
                    warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot record the agent's health; checking the others")
                }
            }
        }
        Ok(changed)
    }

    /// Records the `health` of the agent of `vm` as checked, if the VM still runs
    /// the VMM that was checked and is not rebooting. Returns whether it did.
    pub(super) async fn record_health(
        &self,
        vm: &VmRecord,
        health: &Health,
    ) -> Result<bool, ManagerError> {
        let _guard = self.lock(&vm.name).await;
        let Some(mut current) = self.inner.backends.store.get_vm(&vm.name).await? else {
            return Ok(false);
        };
        // Only the VMM that was checked, still running, gets the verdict.
        if current.state != VmState::Running
            || current.resources.vmm != vm.resources.vmm
            || self.is_rebooting(current.id)
        {
            return Ok(false);
        }
        match health {
            Health::Unhealthy { reason } => {
                warn!(vm = %current.name, %reason, "agent unhealthy")
            }
            _ => info!(vm = %current.name, "agent healthy"),
        }
        current.health = health.clone();
        self.save_with_event(
            &mut current,
            EventKind::HealthChanged {
                health: health.clone(),
            },
        )
        .await?;
        Ok(true)
    }
}
