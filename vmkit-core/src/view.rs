//! What the command surface answers: views of VMs and snapshots made for the caller,
//! never the internal records.
//!
//! A view holds what a user of the VM needs (name, state, size, address, health).
//! The host's side of a VM — its volumes and their paths, the VMM's pid and sockets,
//! its run directory and uid — is in [`VmView::host`] only for an admin (the local
//! operator on the root socket, whose `vmkit` CLI shows it), and absent otherwise.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::access::Caller;
use crate::address::MacAddr;
use crate::hypervisor::VmmState;
use crate::manager::VmMetrics;
use crate::name::VmName;
use crate::snapshot::Snapshot;
use crate::spec::VmSpec;
use crate::storage::Volume;
use crate::time::Timestamp;
use crate::user::UserId;
use crate::vm::{Health, VmId, VmRecord, VmResources};
use crate::vm_state::VmState;

/// A VM as a caller sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmView {
    /// Stable identity.
    pub id: VmId,
    /// Unique name.
    pub name: VmName,
    /// Owner.
    pub owner: UserId,
    /// What was asked for.
    pub spec: VmSpec,
    /// Lifecycle state.
    pub state: VmState,
    /// Whether its agent answers.
    pub health: Health,
    /// The guest's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The root disk's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_bytes: Option<u64>,
    /// The hypervisor backend that drives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// Set when reconcile could not settle it: only a delete is accepted. An admin
    /// reads what went wrong; others read that it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// The port `https://NAME.domain` reaches in the guest.
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// The host resources it holds (volumes, address lease, TAP, VMM process, uid):
    /// for admins only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<VmResources>,
}

fn default_http_port() -> u16 {
    crate::gateway::DEFAULT_HTTP_PORT
}

impl VmView {
    /// `vm` as `caller` sees it.
    pub fn of(vm: &VmRecord, caller: &Caller) -> Self {
        let admin = caller.is_admin();
        Self {
            id: vm.id,
            name: vm.name.clone(),
            owner: vm.owner,
            spec: vm.spec.clone(),
            state: vm.state,
            health: match (&vm.health, admin) {
                (Health::Unhealthy { .. }, false) => Health::Unhealthy {
                    reason: "its agent does not answer as it should".into(),
                },
                (health, _) => health.clone(),
            },
            ip: vm.ip(),
            mac: vm.resources.lease.as_ref().map(|l| l.mac),
            root_bytes: vm.resources.root.as_ref().map(|v| v.size_bytes),
            hypervisor: vm.hypervisor.clone(),
            quarantined: vm.quarantined.as_ref().map(|reason| match admin {
                true => reason.clone(),
                false => "the host could not settle it; only a delete is accepted".into(),
            }),
            http_port: vm.default_http_port(),
            created_at: vm.created_at,
            updated_at: vm.updated_at,
            resources: admin.then(|| vm.resources.clone()),
        }
    }
}

/// A snapshot as a caller sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SnapshotView {
    /// Unique name.
    pub name: VmName,
    /// Its id.
    pub id: VmId,
    /// The VM it was taken of.
    pub vm: VmId,
    /// That VM's name at the time.
    pub vm_name: VmName,
    /// Owner.
    pub owner: UserId,
    /// The VM's spec at the time.
    pub spec: VmSpec,
    /// Whether it holds the VM's memory (a restore resumes) or only its disks.
    pub memory: bool,
    /// The hypervisor backend of the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// When it was taken.
    pub created_at: Timestamp,
    /// Its volumes: for admins only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
}

impl SnapshotView {
    /// `snapshot` as `caller` sees it.
    pub fn of(snapshot: &Snapshot, caller: &Caller) -> Self {
        let volumes = match caller.is_admin() {
            true => std::iter::once(snapshot.root.clone())
                .chain(snapshot.data.clone())
                .collect(),
            false => Vec::new(),
        };
        Self {
            name: snapshot.name.clone(),
            id: snapshot.id,
            vm: snapshot.vm,
            vm_name: snapshot.vm_name.clone(),
            owner: snapshot.owner,
            spec: snapshot.spec.clone(),
            memory: snapshot.has_memory(),
            hypervisor: snapshot.hypervisor.clone(),
            created_at: snapshot.created_at,
            volumes,
        }
    }
}

/// What a VM uses, as a caller sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MetricsView {
    /// The VM.
    pub name: VmName,
    /// Its state.
    pub state: VmState,
    /// What its VMM reports.
    pub vmm: VmmView,
    /// The guest's own view; `None` when paused or its agent did not answer.
    pub guest: Option<vmkit_guest::Metrics>,
}

/// What a VMM reports, as a caller sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmmView {
    /// Guest state.
    pub state: VmmState,
    /// vCPUs online.
    pub vcpus: u32,
    /// Memory assigned, in MiB.
    pub memory_mib: u64,
    /// The VMM's process id: for admins only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl MetricsView {
    /// `metrics` as `caller` sees them.
    pub fn of(metrics: VmMetrics, caller: &Caller) -> Self {
        Self {
            name: metrics.name,
            state: metrics.state,
            vmm: VmmView {
                state: metrics.vmm.state,
                vcpus: metrics.vmm.vcpus,
                memory_mib: metrics.vmm.memory_mib,
                pid: caller.is_admin().then_some(metrics.vmm.pid),
            },
            guest: metrics.guest,
        }
    }
}
