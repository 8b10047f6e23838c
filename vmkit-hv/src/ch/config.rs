//! How the cloud-hypervisor backend runs its VMMs.

use std::path::PathBuf;
use std::time::Duration;

/// Settings of the cloud-hypervisor backend, shared by every VM it starts.
///
/// ```
/// use std::time::Duration;
/// use vmkit_hv::ChConfig;
///
/// let config = ChConfig::new()
///     .binary("/usr/local/bin/cloud-hypervisor")
///     .api_timeout(Duration::from_secs(5))
///     .hotplug_memory_mib(4096);
/// assert_eq!(config.hotplug_memory_mib, 4096);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChConfig {
    /// The `cloud-hypervisor` program: a path, or a bare name looked up in `PATH`.
    pub binary: PathBuf,
    /// Longest wait for one API call, except snapshot and restore.
    pub api_timeout: Duration,
    /// Longest wait for a freshly spawned VMM's API socket to answer `vmm.ping`.
    pub start_timeout: Duration,
    /// Longest wait for `vm.snapshot` and `vm.restore`, which copy guest memory.
    pub snapshot_timeout: Duration,
    /// Longest wait for the hybrid-vsock handshake with the guest agent.
    pub agent_timeout: Duration,
    /// How long a forced stop (`vm.shutdown` + `vmm.shutdown`) may take before the
    /// process is killed.
    pub stop_timeout: Duration,
    /// Memory every VM may grow by at run time, in MiB (ACPI hotplug, in steps of
    /// 128 MiB). 0, the default, turns memory resize off: the backend then reports
    /// `resize_memory: false`.
    pub hotplug_memory_mib: u64,
    /// How often the console log of each running VM is checked against its cap.
    pub console_check_interval: Duration,
}

impl ChConfig {
    /// `cloud-hypervisor` from `PATH`, 10 s per API call, 10 s to start, 5 min for
    /// snapshot and restore, 2 s for the agent handshake, no memory hotplug.
    pub fn new() -> Self {
        Self {
            binary: PathBuf::from("cloud-hypervisor"),
            api_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(10),
            snapshot_timeout: Duration::from_secs(300),
            agent_timeout: Duration::from_secs(2),
            stop_timeout: Duration::from_secs(5),
            hotplug_memory_mib: 0,
            console_check_interval: Duration::from_secs(2),
        }
    }

    /// Sets the `cloud-hypervisor` program.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = binary.into();
        self
    }

    /// Sets the longest wait for one API call.
    pub fn api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = timeout;
        self
    }

    /// Sets the longest wait for a new VMM's API.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Sets the longest wait for snapshot and restore.
    pub fn snapshot_timeout(mut self, timeout: Duration) -> Self {
        self.snapshot_timeout = timeout;
        self
    }

    /// Sets the longest wait for the agent handshake.
    pub fn agent_timeout(mut self, timeout: Duration) -> Self {
        self.agent_timeout = timeout;
        self
    }

    /// Sets how long a forced stop may take before the process is killed.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Sets the memory every VM may grow by, in MiB (0 turns memory resize off).
    pub fn hotplug_memory_mib(mut self, mib: u64) -> Self {
        self.hotplug_memory_mib = mib;
        self
    }

    /// Sets how often console logs are checked against their cap.
    pub fn console_check_interval(mut self, interval: Duration) -> Self {
        self.console_check_interval = interval;
        self
    }
}

impl Default for ChConfig {
    fn default() -> Self {
        Self::new()
    }
}
