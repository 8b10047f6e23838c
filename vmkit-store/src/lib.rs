//! vmkit-store: vmkit's state store on redb, and its Storage backends.
//!
//! - [`RedbStore`] implements [`vmkit_core::StateStore`] on one redb file.
//! - [`FileStorage`] implements [`vmkit_core::Storage`] with files in the data
//!   directory (reflink, qcow2 overlay or sparse copy).
//! - [`LvmStorage`] implements it on an LVM thin pool. It has only run through its
//!   command seam (recorded `lvm` output), never against real LVM.
//!
//! # Example
//!
//! ```
//! use vmkit_core::{Handle, Quota, StateStore, Storage, User, UserId};
//! use vmkit_store::{FileStorage, RedbStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = RedbStore::open(dir.path().join("state.redb"))?;
//! let ada = store.create_user(&User::new(UserId(0), Handle::new("ada")?), None).await?;
//! store.set_quota(ada.id, &Quota::default().max_vms(2)).await?;
//! assert_eq!(store.get_quota(ada.id).await?.map(|q| q.max_vms), Some(2));
//! // Every write has committed to disk when it returns.
//! assert!(store.capabilities().durable);
//!
//! let volumes = FileStorage::new(dir.path().join("volumes"))?;
//! println!("root disks are reflinks here: {}", volumes.reflink_supported());
//! assert!(volumes.list().await?.is_empty());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod file;
mod lvm;
mod state;

pub use file::{FileStorage, FileStorageConfig};
pub use lvm::{CommandOutput, LvmConfig, LvmRunner, LvmStorage, SystemLvmRunner};
pub use state::{RedbConfig, RedbStore};
