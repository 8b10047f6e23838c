//! vmkit-hv: vmkit's Hypervisor backends.
//!
//! [`Qemu`] runs one `qemu-system-x86_64` per VM, driven over QMP, with KVM when the
//! host can run a stock guest under it and software emulation (TCG) otherwise; VMMs
//! outlive the process that started them and are re-attached after a restart.
//! [`CloudHypervisor`] drives cloud-hypervisor through its official REST API. It has
//! **not run against a real cloud-hypervisor yet**: it is tested against a stand-in
//! that follows the official spec (its docs say exactly what that covers).
//! [`probe`] looks at the host and picks a backend for `hypervisor = "auto"`.
//!
//! Both backends confine a VMM whose [`MachineConfig::confinement`] is set: it runs
//! as the VM's uid and gid from its first instruction, in a cgroup of its own (v2, or
//! v1 where the host has only that) with the limits of [`vmkit_core::CgroupLimits`],
//! owning only the VM's disks and TAP; QEMU under its seccomp sandbox,
//! cloud-hypervisor with its seccomp filters and landlock. That needs root; a
//! backend that cannot confine refuses the start and says why.
//! [`probe_confinement`] tells whether this host can.
//!
//! [`MachineConfig::confinement`]: vmkit_core::MachineConfig::confinement
//!
//! # Example
//!
//! Pick a backend the way `hypervisor = "auto"` does and build it; building starts
//! nothing. Hand it to [`vmkit_core::Backends::new`] to get a manager
//! (`examples/embed.rs` in the repository does it end to end).
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_core::{DiskFormat, Hypervisor};
//! use vmkit_hv::probe::{self, Backend, Preference, ProbeOptions};
//! use vmkit_hv::{ChConfig, CloudHypervisor, Qemu, QemuConfig};
//!
//! // `probe_host_with_boot` also boots a probe guest to prove that KVM runs a stock
//! // kernel; without that proof `auto` never takes cloud-hypervisor.
//! let report = probe::probe_host(&ProbeOptions::new(std::env::temp_dir()));
//! let choice = probe::choose_backend(Preference::Auto, &report);
//! let hypervisor: Arc<dyn Hypervisor> = match choice.backend {
//!     Backend::CloudHypervisor => Arc::new(CloudHypervisor::new(ChConfig::new())),
//!     _ => Arc::new(Qemu::new(QemuConfig::new())),
//! };
//! println!("{}: {}", hypervisor.kind(), choice.reason);
//! // The manager always states a disk's format, in one the backend takes.
//! assert!(hypervisor.capabilities().disk_formats.contains(&DiskFormat::Raw));
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cgroup;
mod ch;
mod confine;
pub mod probe;
mod process;
mod qemu;
mod spawn;

pub use ch::{ChConfig, CloudHypervisor};
pub use confine::{ConfinementReport, probe_confinement};
pub use qemu::{Accel, AccelChoice, Qemu, QemuConfig};
