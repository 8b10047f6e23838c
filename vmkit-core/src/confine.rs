//! Confinement of VMMs: a host uid/gid per VM and the limits of its cgroup.
//!
//! The manager hands each VM a uid of a [`UidRange`] when the VM is created and keeps
//! it until the VM is deleted (a stopped VM's disks stay owned by it, so a uid is never
//! reused while its VM exists). Every VMM of that VM then runs as that uid, with the
//! same number as its gid, in a cgroup of its own whose limits follow from the VM's
//! vCPUs and memory and from [`CgroupLimits`]. The backends in `vmkit-hv` do the
//! confining; this module only describes it.

use serde::{Deserialize, Serialize};

/// A range of host uids for VMMs, one per VM; the gid of a VMM is its uid.
///
/// The default, 1 342 177 280 (`0x5000_0000`) and the 65 536 after it, lies far above
/// the uids of normal users (1000–60000), systemd's dynamic users (61184–65519) and
/// the 65 536-wide blocks `/etc/subuid` hands out from 100000 for user namespaces of
/// a few thousand users, and below 2³¹, which some tools still treat as signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UidRange {
    /// The first uid of the range.
    pub first: u32,
    /// How many uids it holds (at least 1).
    pub count: u32,
}

impl UidRange {
    /// The first uid of the default range.
    pub const DEFAULT_FIRST: u32 = 0x5000_0000;
    /// The size of the default range.
    pub const DEFAULT_COUNT: u32 = 65_536;

    /// The range of `count` uids from `first`; `None` when it is empty, includes root
    /// or runs past `u32::MAX - 1` (`-1` means "no uid" to the kernel).
    pub fn new(first: u32, count: u32) -> Option<Self> {
        let last = first.checked_add(count.checked_sub(1)?)?;
        (first > 0 && last < u32::MAX).then_some(Self { first, count })
    }

    /// The last uid of the range.
    pub fn last(&self) -> u32 {
        self.first + (self.count - 1)
    }

    /// Whether `uid` is in the range.
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last()).contains(&uid)
    }
}

impl Default for UidRange {
    fn default() -> Self {
        Self {
            first: Self::DEFAULT_FIRST,
            count: Self::DEFAULT_COUNT,
        }
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last())
    }
}

/// The limits of a VMM's cgroup beyond what its vCPUs and memory imply.
///
/// A backend sets, for a VM of `v` vCPUs and `m` MiB: CPU weight `100 · v` (cgroup
/// v2 `cpu.weight`; v1 `cpu.shares` `1024 · v`), CPU max `v` CPUs plus
/// [`vmm_cpu_millis`](Self::vmm_cpu_millis) (`cpu.max`; v1 `cpu.cfs_quota_us`), memory
/// max `m` plus [`memory_overhead_mib`](Self::memory_overhead_mib) (`memory.max`; v1
/// `memory.limit_in_bytes`), [`io_weight`](Self::io_weight) (`io.weight`; v1
/// `blkio.weight`) and [`pids_max`](Self::pids_max) (`pids.max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CgroupLimits {
    /// CPU time the VMM may use beyond one CPU per vCPU, in thousandths of a CPU: its
    /// main loop, device emulation and I/O threads.
    pub vmm_cpu_millis: u64,
    /// Memory the VMM may use beyond the guest's, in MiB: its own code and heap,
    /// device buffers and, under software emulation, the translated code.
    pub memory_overhead_mib: u64,
    /// I/O weight, 1 to 10000 (100 is the kernel's default).
    pub io_weight: u16,
    /// Most processes and threads in the cgroup.
    pub pids_max: u64,
}

impl Default for CgroupLimits {
    /// One CPU and 320 MiB beyond the guest, I/O weight 100, 512 tasks. The CPU is
    /// for QEMU's main loop and I/O threads, which read the disk beside the vCPUs
    /// during a boot (with half a CPU, boots were measured up to 7% slower). QEMU 7.2
    /// itself used about 140 MiB beyond its guest (measured under TCG, where the
    /// backend adds its bounded code cache on top; see the operator guide).
    fn default() -> Self {
        Self {
            vmm_cpu_millis: 1000,
            memory_overhead_mib: 320,
            io_weight: 100,
            pids_max: 512,
        }
    }
}

impl CgroupLimits {
    /// Sets the CPU time beyond one CPU per vCPU, in thousandths of a CPU.
    pub fn vmm_cpu_millis(mut self, millis: u64) -> Self {
        self.vmm_cpu_millis = millis;
        self
    }

    /// Sets the memory beyond the guest's, in MiB.
    pub fn memory_overhead_mib(mut self, mib: u64) -> Self {
        self.memory_overhead_mib = mib;
        self
    }

    /// Sets the I/O weight (clamped to 1..=10000).
    pub fn io_weight(mut self, weight: u16) -> Self {
        self.io_weight = weight.clamp(1, 10_000);
        self
    }

    /// Sets the most tasks.
    pub fn pids_max(mut self, max: u64) -> Self {
        self.pids_max = max;
        self
    }
}

/// How one VMM is confined: part of its [`MachineConfig`](crate::MachineConfig).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Confinement {
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as (vmkit uses the uid's number).
    pub gid: u32,
    /// The limits of its cgroup.
    pub limits: CgroupLimits,
}

impl Confinement {
    /// Confinement as `uid` with gid `uid` and `limits`.
    pub fn new(uid: u32, limits: CgroupLimits) -> Self {
        Self {
            uid,
            gid: uid,
            limits,
        }
    }
}

/// Whether and how a [`Manager`](crate::Manager) confines the VMMs it starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConfinementConfig {
    /// The uids handed to VMs.
    pub uids: UidRange,
    /// The limits of every VMM's cgroup.
    pub limits: CgroupLimits,
}

impl ConfinementConfig {
    /// Confinement with the default range and limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the uid range.
    pub fn uids(mut self, uids: UidRange) -> Self {
        self.uids = uids;
        self
    }

    /// Sets the cgroup limits.
    pub fn limits(mut self, limits: CgroupLimits) -> Self {
        self.limits = limits;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_never_holds_root_or_the_invalid_uid() {
        assert_eq!(UidRange::new(0, 10), None, "root is never a VMM's uid");
        assert_eq!(UidRange::new(u32::MAX - 1, 2), None, "-1 is not a uid");
        assert_eq!(UidRange::new(5, 0), None, "empty");
        let r = UidRange::new(100, 3).expect("valid");
        assert_eq!(r.last(), 102);
        assert!(r.contains(100) && r.contains(102) && !r.contains(103) && !r.contains(99));
        assert_eq!(r.to_string(), "100-102");
    }

    #[test]
    fn the_default_range_is_clear_of_users_and_below_two_to_the_31() {
        let r = UidRange::default();
        assert!(r.first > 65_535 + 100_000 * 100);
        assert!(r.last() < 1 << 31);
        assert_eq!(UidRange::new(r.first, r.count), Some(r));
    }
}
