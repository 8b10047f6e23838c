//! vmkit-hv: vmkit's Hypervisor backends.
//!
//! [`CloudHypervisor`] drives cloud-hypervisor through its official REST API. It has
//! **not run against a real cloud-hypervisor yet**: it is tested against a stand-in
//! that follows the official spec (its docs say exactly what that covers).
//! [`probe`] looks at the host and picks a backend for `hypervisor = "auto"`.
#![deny(missing_docs)]

mod ch;
pub mod probe;
mod process;
mod qemu;

pub use ch::*;
pub use qemu::*;
