//! Per-user quotas and the usage they are checked against.

use serde::{Deserialize, Serialize};

use crate::spec::VmSpec;

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
    /// Data disk in GiB summed over the user's VMs.
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

    /// Sets the most data disk in GiB, summed over the user's VMs.
    pub fn max_disk_gib(mut self, max_disk_gib: u64) -> Self {
        self.max_disk_gib = max_disk_gib;
        self
    }

    /// Checks that `usage` plus one more VM of `spec` stays within the quota.
    pub fn check(&self, usage: &Usage, spec: &VmSpec) -> Result<(), QuotaExceeded> {
        let checks = [
            (
                QuotaResource::Vms,
                u64::from(usage.vms),
                1,
                u64::from(self.max_vms),
            ),
            (
                QuotaResource::Vcpus,
                u64::from(usage.vcpus),
                u64::from(spec.vcpus),
                u64::from(self.max_vcpus),
            ),
            (
                QuotaResource::MemoryMib,
                usage.memory_mib,
                spec.memory_mib,
                self.max_memory_mib,
            ),
            (
                QuotaResource::DiskGib,
                usage.disk_gib,
                spec.disk_gib,
                self.max_disk_gib,
            ),
        ];
        for (resource, used, requested, limit) in checks {
            if used.saturating_add(requested) > limit {
                return Err(QuotaExceeded {
                    resource,
                    used,
                    requested,
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
    /// Data disk in GiB.
    pub disk_gib: u64,
}

impl Usage {
    /// Adds one VM of `spec`.
    pub fn add(&mut self, spec: &VmSpec) {
        self.vms = self.vms.saturating_add(1);
        self.vcpus = self.vcpus.saturating_add(spec.vcpus);
        self.memory_mib = self.memory_mib.saturating_add(spec.memory_mib);
        self.disk_gib = self.disk_gib.saturating_add(spec.disk_gib);
    }

    /// The usage of a set of VM specs.
    pub fn of<'a>(specs: impl IntoIterator<Item = &'a VmSpec>) -> Self {
        let mut usage = Self::default();
        for spec in specs {
            usage.add(spec);
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
    /// Data disk (GiB).
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
    "quota exceeded: {used} {res} in use, {requested} more requested, limit {limit}; remove a VM or ask for a larger quota",
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
