//! Per-user quotas and the usage they are checked against.
//!
//! A user's disk usage is everything they hold on the host's disks: every VM's root
//! disk (its spec's size, or its volume's when that is larger: an image bigger than
//! the spec) and data disk, and every snapshot's copies of them plus its saved
//! memory. Stores check it in the transaction that writes the change, so two
//! requests at once cannot both pass on the same headroom.

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;
use crate::spec::VmSpec;
use crate::vm::VmRecord;

/// The most a user may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Quota {
    /// VMs.
    pub max_vms: u32,
    /// vCPUs summed over the user's VMs.
    pub max_vcpus: u32,
    /// Memory in MiB summed over the user's VMs.
    pub max_memory_mib: u64,
    /// Disk in GiB summed over everything the user holds: root and data disks of
    /// their VMs, and their snapshots' disks and memory.
    pub max_disk_gib: u64,
}

impl Quota {
    /// A quota with the given limits.
    pub fn new(max_vms: u32, max_vcpus: u32, max_memory_mib: u64, max_disk_gib: u64) -> Self {
        Self {
            max_vms,
            max_vcpus,
            max_memory_mib,
            max_disk_gib,
        }
    }

    /// A quota that never refuses.
    pub fn unlimited() -> Self {
        Self::new(u32::MAX, u32::MAX, u64::MAX, u64::MAX)
    }

    /// Sets the most VMs.
    pub fn max_vms(mut self, max_vms: u32) -> Self {
        self.max_vms = max_vms;
        self
    }

    /// Sets the most vCPUs, summed over the user's VMs.
    pub fn max_vcpus(mut self, max_vcpus: u32) -> Self {
        self.max_vcpus = max_vcpus;
        self
    }

    /// Sets the most memory in MiB, summed over the user's VMs.
    pub fn max_memory_mib(mut self, max_memory_mib: u64) -> Self {
        self.max_memory_mib = max_memory_mib;
        self
    }

    /// Sets the most disk in GiB, summed over the user's VMs and snapshots.
    pub fn max_disk_gib(mut self, max_disk_gib: u64) -> Self {
        self.max_disk_gib = max_disk_gib;
        self
    }

    /// Checks that `usage` plus one more VM of `spec` stays within the quota.
    pub fn check(&self, usage: &Usage, spec: &VmSpec) -> Result<(), QuotaExceeded> {
        let mut after = *usage;
        after.add(spec);
        self.check_change(usage, &after)
    }

    /// Checks a change of holdings from `before` to `after`: refused when a resource
    /// grows past its limit. A resource that does not grow passes even over its limit
    /// (the quota was lowered since), so a user over quota can still shrink.
    pub fn check_change(&self, before: &Usage, after: &Usage) -> Result<(), QuotaExceeded> {
        let checks = [
            (
                QuotaResource::Vms,
                u64::from(before.vms),
                u64::from(after.vms),
                u64::from(self.max_vms),
            ),
            (
                QuotaResource::Vcpus,
                u64::from(before.vcpus),
                u64::from(after.vcpus),
                u64::from(self.max_vcpus),
            ),
            (
                QuotaResource::MemoryMib,
                before.memory_mib,
                after.memory_mib,
                self.max_memory_mib,
            ),
            (
                QuotaResource::DiskGib,
                before.disk_gib(),
                after.disk_gib(),
                self.max_disk_gib,
            ),
        ];
        for (resource, used, wanted, limit) in checks {
            if wanted > used && wanted > limit {
                return Err(QuotaExceeded {
                    resource,
                    used,
                    requested: wanted - used,
                    limit,
                });
            }
        }
        Ok(())
    }
}

impl Default for Quota {
    /// A modest default for a new user: 10 VMs, 16 vCPUs, 32 GiB memory, 200 GiB disk.
    fn default() -> Self {
        Self::new(10, 16, 32 * 1024, 200)
    }
}

/// What a user holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// VMs.
    pub vms: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in bytes: root and data disks, snapshots' disks and memory.
    pub disk_bytes: u64,
}

/// Bytes in a GiB.
const GIB: u64 = 1 << 30;
/// Bytes in a MiB.
const MIB: u64 = 1 << 20;

impl Usage {
    /// Disk in GiB, rounded up.
    pub fn disk_gib(&self) -> u64 {
        self.disk_bytes.div_ceil(GIB)
    }

    /// Adds one VM of `spec` before it holds any volume: its data disk and its root
    /// disk at the spec's sizes.
    pub fn add(&mut self, spec: &VmSpec) {
        self.vms = self.vms.saturating_add(1);
        self.vcpus = self.vcpus.saturating_add(spec.vcpus);
        self.memory_mib = self.memory_mib.saturating_add(spec.memory_mib);
        let disks = spec
            .disk_gib
            .saturating_add(spec.root_gib)
            .saturating_mul(GIB);
        self.disk_bytes = self.disk_bytes.saturating_add(disks);
    }

    /// Adds a VM: its spec, and its volumes where they are larger than the spec
    /// says (a root disk the size of an image larger than `root_gib`).
    pub fn add_vm(&mut self, vm: &VmRecord) {
        self.vms = self.vms.saturating_add(1);
        self.vcpus = self.vcpus.saturating_add(vm.spec.vcpus);
        self.memory_mib = self.memory_mib.saturating_add(vm.spec.memory_mib);
        let size = |spec_gib: u64, volume: &Option<crate::storage::Volume>| {
            spec_gib
                .saturating_mul(GIB)
                .max(volume.as_ref().map_or(0, |v| v.size_bytes))
        };
        let disks = size(vm.spec.root_gib, &vm.resources.root)
            .saturating_add(size(vm.spec.disk_gib, &vm.resources.data));
        self.disk_bytes = self.disk_bytes.saturating_add(disks);
    }

    /// Adds a snapshot: its copies of the disks and, when it has it, the memory it
    /// saved.
    pub fn add_snapshot(&mut self, snapshot: &Snapshot) {
        let disks = snapshot
            .root
            .size_bytes
            .saturating_add(snapshot.data.as_ref().map_or(0, |d| d.size_bytes));
        let memory = if snapshot.has_memory() {
            snapshot.spec.memory_mib.saturating_mul(MIB)
        } else {
            0
        };
        self.disk_bytes = self.disk_bytes.saturating_add(disks).saturating_add(memory);
    }

    /// The usage of a set of VM specs, before they hold volumes.
    pub fn of<'a>(specs: impl IntoIterator<Item = &'a VmSpec>) -> Self {
        let mut usage = Self::default();
        for spec in specs {
            usage.add(spec);
        }
        usage
    }

    /// What a user holds: `vms` and `snapshots` (the caller picks the user's).
    pub fn of_holdings<'a>(
        vms: impl IntoIterator<Item = &'a VmRecord>,
        snapshots: impl IntoIterator<Item = &'a Snapshot>,
    ) -> Self {
        let mut usage = Self::default();
        for vm in vms {
            usage.add_vm(vm);
        }
        for snapshot in snapshots {
            usage.add_snapshot(snapshot);
        }
        usage
    }
}

/// Which quota limit was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum QuotaResource {
    /// Number of VMs.
    Vms,
    /// vCPUs.
    Vcpus,
    /// Memory (MiB).
    MemoryMib,
    /// Disk (GiB): root and data disks, snapshots.
    DiskGib,
}

impl QuotaResource {
    fn as_str(self) -> &'static str {
        match self {
            QuotaResource::Vms => "VMs",
            QuotaResource::Vcpus => "vCPUs",
            QuotaResource::MemoryMib => "MiB of memory",
            QuotaResource::DiskGib => "GiB of disk",
        }
    }
}

/// A request that would take a user past their quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error(
    "quota exceeded: {used} {res} in use, {requested} more requested, limit {limit}; remove a VM or a snapshot, or ask for a larger quota",
    res = resource.as_str()
)]
#[non_exhaustive]
pub struct QuotaExceeded {
    /// The limit that was hit.
    pub resource: QuotaResource,
    /// Already in use.
    pub used: u64,
    /// Requested on top.
    pub requested: u64,
    /// The limit.
    pub limit: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_within_quota_is_accepted() {
        let q = Quota::new(2, 4, 2048, 10);
        let usage = Usage::of([&VmSpec::new("tiny")]);
        assert_eq!(q.check(&usage, &VmSpec::new("tiny").vcpus(3)), Ok(()));
    }

    #[test]
    fn request_over_quota_names_the_resource() {
        let q = Quota::new(2, 4, 2048, 10);
        let usage = Usage::of([&VmSpec::new("tiny"), &VmSpec::new("tiny")]);
        let err = q.check(&usage, &VmSpec::new("tiny")).unwrap_err();
        assert_eq!(err.resource, QuotaResource::Vms);
        let err = q
            .check(&Usage::default(), &VmSpec::new("tiny").memory_mib(4096))
            .unwrap_err();
        assert_eq!(err.resource, QuotaResource::MemoryMib);
        assert_eq!((err.used, err.requested, err.limit), (0, 4096, 2048));
    }
}
