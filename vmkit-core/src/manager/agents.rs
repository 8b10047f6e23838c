//! The agent pool: one cached connection per running VM's agent, one connection
//! attempt at a time per VM, each guest boot as its agent said hello; exec, and the
//! guest's configuration (network, host name, SSH keys).

use super::*;

impl Manager {
    /// Runs a command in a running VM; output streams as it is produced.
    pub async fn exec(
        &self,
        name: &VmName,
        request: ExecRequest,
    ) -> Result<ExecStream, ManagerError> {
        let (vm, client) = self.running_agent(name, "exec").await?;
        client
            .exec(request)
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))
    }

    /// Tells a freshly booted guest who it is: its address (when it has a NIC), its
    /// host name (the VM's name) and its owner's SSH keys. Every call is idempotent,
    /// so it runs again on every start.
    pub(super) async fn configure_guest(&self, vm: &VmRecord) -> Result<(), ManagerError> {
        let client = self.agent(vm).await?;
        let agent_error = |e: vmkit_guest::ClientError| ManagerError::agent(&vm.name, &e);
        if let Some(net) = &vm.resources.net {
            let config = NetworkConfig::new(net.mac.to_string(), net.ip, net.prefix, net.gateway)
                .dns(net.dns.iter().copied());
            client
                .configure_network(&config)
                .await
                .map_err(agent_error)?;
        }
        client
            .set_hostname(vm.name.as_str())
            .await
            .map_err(agent_error)?;
        self.configure_ssh(vm, &client).await?;
        // The host grows only disks; the guest grows its filesystems to them.
        // Best effort: an agent too old for it, or a filesystem that cannot grow,
        // leaves a working VM.
        match client.grow_filesystems().await {
            Ok(report) => {
                for fs in report.filesystems.iter().filter(|fs| fs.grew()) {
                    info!(vm = %vm.name, mount = ?fs.mount, from = fs.before_bytes, to = fs.after_bytes, "the guest grew a filesystem to its disk");
                }
                for failure in &report.failures {
                    warn!(vm = %vm.name, failure = ?failure, "the guest could not grow a filesystem");
                }
            }
            Err(e) => {
                warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot ask the guest to grow its filesystems")
            }
        }
        Ok(())
    }

    pub(super) fn agent_client_config(&self) -> ClientConfig {
        ClientConfig::default().call_timeout(self.inner.config.agent_timeout)
    }

    /// The agent client of a running VM, connecting if needed.
    pub(super) async fn agent(&self, vm: &VmRecord) -> Result<Client, ManagerError> {
        if let Some(client) = self.cached_agent(vm.id) {
            return Ok(client);
        }
        let gate = self.connect_gate(vm.id);
        let _connecting = gate.lock().await;
        if let Some(client) = self.cached_agent(vm.id) {
            return Ok(client);
        }
        let handle = vm
            .resources
            .vmm
            .as_ref()
            .ok_or_else(|| ManagerError::Agent {
                name: vm.name.clone(),
                message: "the VM has no VMM".into(),
            })?;
        let stream = self.hv(vm)?.connect_agent(handle).await?;
        let client = Client::new(stream, self.agent_client_config());
        let hello = client
            .hello()
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))?;
        self.remember_agent(vm.id, client.clone(), &hello, handle)
            .await;
        Ok(client)
    }

    /// The gate of connection attempts to the agent of `vm`.
    pub(super) fn connect_gate(&self, vm: VmId) -> Arc<Mutex<()>> {
        let mut connecting = self
            .inner
            .connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        connecting.entry(vm).or_default().clone()
    }

    /// The boot the agent of `vm` last said hello from.
    pub(super) fn boot(&self, vm: VmId) -> Option<Boot> {
        let boots = self.inner.boots.lock().unwrap_or_else(|p| p.into_inner());
        boots.get(&vm).cloned()
    }

    pub(super) fn set_rebooting(&self, vm: VmId, rebooting: bool) {
        let mut set = self
            .inner
            .rebooting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if rebooting {
            set.insert(vm);
        } else {
            set.remove(&vm);
        }
    }

    pub(super) fn is_rebooting(&self, vm: VmId) -> bool {
        let set = self
            .inner
            .rebooting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.contains(&vm)
    }

    pub(super) fn cached_agent(&self, vm: VmId) -> Option<Client> {
        let agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.get(&vm).filter(|c| !c.is_closed()).cloned()
    }

    /// Keeps `client`, connected to the agent of `vm` (whose VMM is `handle`),
    /// which said `hello`.
    pub(super) async fn remember_agent(
        &self,
        vm: VmId,
        client: Client,
        hello: &HelloInfo,
        handle: &VmmHandle,
    ) {
        let resets = match self.inner.backends.hypervisor_of(&handle.backend) {
            Some(hv) => hv.watch(handle).await.ok().map(|w| w.current().resets),
            None => None,
        };
        let mut agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.insert(vm, client);
        drop(agents);
        let mut boots = self.inner.boots.lock().unwrap_or_else(|p| p.into_inner());
        boots.insert(
            vm,
            Boot {
                id: hello.boot_id.clone(),
                resets,
                ssh: None,
            },
        );
    }

    /// Drops the agent client of `vm` and what its hello said.
    pub(super) fn forget_agent(&self, vm: VmId) {
        let mut agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.remove(&vm);
        drop(agents);
        let mut boots = self.inner.boots.lock().unwrap_or_else(|p| p.into_inner());
        boots.remove(&vm);
    }

    /// Drops every per-VM table entry of a VM that is gone.
    pub(super) fn forget_vm(&self, vm: VmId) {
        self.forget_agent(vm);
        self.set_rebooting(vm, false);
        self.forget_unreachable(vm);
        let mut connecting = self
            .inner
            .connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        connecting.remove(&vm);
    }
}
