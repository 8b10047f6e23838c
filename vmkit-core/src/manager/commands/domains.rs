//! Custom domains on the command surface: `domain add NAME HOST`, `domain ls`,
//! `domain rm HOST`. Attaching and detaching are the VM owner's, as sharing is
//! ([`Action::Share`]), listing them a read ([`Action::ListShares`]); attaching needs the DNS
//! proof [`CustomDomains`] reads.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Commands;
use crate::access::Action;
use crate::domain::{CustomDomain, CustomDomains, DomainProof, ProvenBy};
use crate::error::ManagerError;
use crate::event::{EventKind, NewEvent};
use crate::name::VmName;
use crate::time::Timestamp;

/// A custom domain as the command surface shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DomainView {
    /// The host name.
    pub host: String,
    /// The VM it reaches.
    pub vm: VmName,
    /// When it was attached.
    pub created_at: Timestamp,
}

impl DomainView {
    fn of(domain: &CustomDomain, vm: &VmName) -> Self {
        Self {
            host: domain.host.clone(),
            vm: vm.clone(),
            created_at: domain.created_at,
        }
    }
}

impl Commands {
    fn custom_domains(&self) -> Result<&CustomDomains, ManagerError> {
        self.manager
            .inner
            .backends
            .domains
            .as_ref()
            .ok_or(ManagerError::Unsupported("custom domains"))
    }

    /// The DNS records that would prove `host` the owner's, for attaching it to
    /// `name` (what `domain add` asks for when they are missing).
    pub async fn domain_proof(
        &self,
        name: &VmName,
        host: &str,
    ) -> Result<DomainProof, ManagerError> {
        let domains = self.custom_domains()?;
        let vm = self.vm(Action::Share, name).await?;
        let host = domains
            .check(host)
            .map_err(|e| ManagerError::InvalidRequest(e.to_string()))?;
        Ok(domains.proof(vm.owner, &host, &vm.name))
    }

    /// Attaches the custom domain `host` to `name`, once DNS proves it the VM
    /// owner's ([`ManagerError::DomainUnproven`] says what to publish); attaching it
    /// again is a no-op, and one of the owner's domains moves from their other VM.
    /// `https://HOST/` then reaches the VM's default web port, private or shared as
    /// that port is.
    pub async fn add_domain(&self, name: &VmName, host: &str) -> Result<DomainView, ManagerError> {
        let domains = self.custom_domains()?;
        let vm = self.vm(Action::Share, name).await?;
        let host = domains
            .check(host)
            .map_err(|e| ManagerError::InvalidRequest(e.to_string()))?;
        let store = &self.manager.inner.backends.store;
        if let Some(existing) = store.get_domain(&host).await? {
            if existing.vm == vm.id {
                return Ok(DomainView::of(&existing, &vm.name));
            }
            if existing.owner != vm.owner {
                return Err(ManagerError::DomainTaken(host));
            }
        }
        let proof = domains.proof(vm.owner, &host, &vm.name);
        let proven_by: ProvenBy = domains
            .verify(&proof)
            .await
            .map_err(|e| ManagerError::DomainLookup {
                host: host.clone(),
                message: e.0,
            })?
            .ok_or_else(|| ManagerError::DomainUnproven(Box::new(proof)))?;
        // Held across the write: a VM deleted meanwhile keeps no domain.
        let _guard = self.manager.lock(name).await;
        match store.get_vm(name).await? {
            Some(current) if current.id == vm.id => {}
            _ => return Err(ManagerError::NotFound(name.clone())),
        }
        if let Some(existing) = store.get_domain(&host).await?
            && existing.owner != vm.owner
        {
            return Err(ManagerError::DomainTaken(host));
        }
        let domain = CustomDomain::new(host.clone(), vm.id, vm.owner);
        store.put_domain(&domain).await?;
        self.manager
            .emit(NewEvent::vm(
                vm.id,
                &vm.name,
                EventKind::DomainAdded { host, proven_by },
            ))
            .await;
        Ok(DomainView::of(&domain, &vm.name))
    }

    /// Detaches the custom domain `host` from its VM (the VM's owner, or an admin).
    pub async fn remove_domain(&self, host: &str) -> Result<(), ManagerError> {
        let domains = self.custom_domains()?;
        let host = domains
            .check(host)
            .map_err(|e| ManagerError::InvalidRequest(e.to_string()))?;
        let store = &self.manager.inner.backends.store;
        let not_found = || ManagerError::DomainNotFound(host.clone());
        let domain = store.get_domain(&host).await?.ok_or_else(not_found)?;
        let vm = store.get_vm_by_id(domain.vm).await?.ok_or_else(not_found)?;
        // One who may not share the VM learns nothing of it.
        self.vm(Action::Share, &vm.name)
            .await
            .map_err(|_| not_found())?;
        let _guard = self.manager.lock(&vm.name).await;
        if !store.remove_domain(&host).await? {
            return Err(not_found());
        }
        self.manager
            .emit(NewEvent::vm(
                vm.id,
                &vm.name,
                EventKind::DomainRemoved { host },
            ))
            .await;
        Ok(())
    }

    /// The custom domains of `name`, or of every VM the caller may share (all, for
    /// an admin), by host.
    pub async fn domains(&self, name: Option<&VmName>) -> Result<Vec<DomainView>, ManagerError> {
        self.custom_domains()?;
        let store = &self.manager.inner.backends.store;
        if let Some(name) = name {
            let vm = self.vm(Action::ListShares, name).await?;
            let domains = store.list_domains(Some(vm.id)).await?;
            return Ok(domains
                .iter()
                .map(|d| DomainView::of(d, &vm.name))
                .collect());
        }
        let caller = self.caller_now().await?;
        let owner = match caller.is_admin() {
            true => None,
            false => Some(self.owner(Action::ListVms).await?),
        };
        let names: HashMap<_, _> = store
            .list_vms(owner)
            .await?
            .into_iter()
            // The policy decides (a key limited to one VM lists that VM's only).
            .filter(|v| self.policy.lists(&caller, v, &[]))
            .map(|v| (v.id, v.name))
            .collect();
        Ok(store
            .list_domains(None)
            .await?
            .iter()
            .filter_map(|d| names.get(&d.vm).map(|n| DomainView::of(d, n)))
            .collect())
    }
}
