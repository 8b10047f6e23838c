//! vmkit-store: vmkit's state store on redb, and its Storage backends.
//!
//! - [`RedbStore`] implements [`vmkit_core::StateStore`] on one redb file.
//! - [`FileStorage`] implements [`vmkit_core::Storage`] with files in the data
//!   directory (reflink, qcow2 overlay or sparse copy).
//! - [`LvmStorage`] implements it on an LVM thin pool.
#![deny(missing_docs)]

mod file;
mod lvm;
mod state;

pub use file::*;
pub use lvm::*;
pub use state::*;
