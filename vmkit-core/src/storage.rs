//! The Storage seam: base images, copy-on-write root volumes and data volumes.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::image::Image;
use crate::vm::VmId;

/// On-disk format of a volume, always stated to the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DiskFormat {
    /// A raw image or block device.
    Raw,
    /// A qcow2 overlay whose backing file vmkit set (QEMU only).
    Qcow2,
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

/// What a volume is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VolumeKind {
    /// A VM's root disk, cloned from a base image.
    Root,
    /// A VM's persistent data disk.
    Data,
}

/// A volume that exists on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Volume {
    /// Backend-unique id, derived from the VM id and the kind.
    pub id: String,
    /// Owning VM.
    pub vm: VmId,
    /// Root or data.
    pub kind: VolumeKind,
    /// Path handed to the VMM.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Size the guest sees, in bytes.
    pub size_bytes: u64,
}

impl Volume {
    /// A volume of `vm` with the conventional id for `kind`.
    pub fn new(
        vm: VmId,
        kind: VolumeKind,
        path: PathBuf,
        format: DiskFormat,
        size_bytes: u64,
    ) -> Self {
        Self {
            id: Self::id_for(vm, kind),
            vm,
            kind,
            path,
            format,
            size_bytes,
        }
    }

    /// The conventional id of `vm`'s volume of `kind`: `root-<id>` or `data-<id>`.
    pub fn id_for(vm: VmId, kind: VolumeKind) -> String {
        match kind {
            VolumeKind::Root => format!("root-{vm}"),
            VolumeKind::Data => format!("data-{vm}"),
        }
    }
}

/// A base image imported into the backend, from which root volumes are cloned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BaseImage {
    /// Image name.
    pub name: String,
    /// Build digest it was imported from.
    pub digest: String,
    /// Where the backend keeps it.
    pub path: PathBuf,
    /// Size in bytes.
    pub size_bytes: u64,
}

impl BaseImage {
    /// A base image record.
    pub fn new(
        name: impl Into<String>,
        digest: impl Into<String>,
        path: PathBuf,
        size_bytes: u64,
    ) -> Self {
        Self {
            name: name.into(),
            digest: digest.into(),
            path,
            size_bytes,
        }
    }
}

/// How a backend clones root volumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CloneMethod {
    /// A reflink (FICLONE), O(1) on btrfs and XFS.
    Reflink,
    /// A qcow2 overlay on the base, O(1), QEMU only.
    Qcow2Overlay,
    /// An LVM thin snapshot, O(1).
    LvmSnapshot,
    /// A sparse copy, O(used blocks).
    SparseCopy,
    /// In memory (fakes).
    Memory,
}

/// What a Storage backend can do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StorageCapabilities {
    /// How root volumes are cloned when the hypervisor takes every format.
    pub clone_method: CloneMethod,
    /// Whether persistent data volumes can be created.
    pub data_volumes: bool,
    /// Whether volumes can be grown.
    pub resize: bool,
}

impl StorageCapabilities {
    /// Capabilities of a storage backend.
    pub fn new(clone_method: CloneMethod, data_volumes: bool, resize: bool) -> Self {
        Self {
            clone_method,
            data_volumes,
            resize,
        }
    }
}

/// Errors from a Storage backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// No such volume or base image.
    #[error("volume {0} does not exist")]
    NotFound(String),
    /// The base image has not been imported.
    #[error("base image {0} has not been imported")]
    NoBaseImage(String),
    /// The volume exists already.
    #[error("volume {0} already exists")]
    Exists(String),
    /// Shrinking was asked for.
    #[error("volume {id} is {current} bytes; volumes only grow (asked for {requested})")]
    Shrink {
        /// Volume.
        id: String,
        /// Its size.
        current: u64,
        /// Requested size.
        requested: u64,
    },
    /// None of the formats the hypervisor accepts can be produced.
    #[error("cannot produce a volume in any of the formats {0:?}")]
    NoFormat(Vec<DiskFormat>),
    /// Not enough space.
    #[error("not enough space for {0}")]
    NoSpace(String),
    /// A name or path was refused (traversal, symlink out of the data directory).
    #[error("refused path: {0}")]
    Refused(String),
    /// The backend cannot do this (see its capabilities).
    #[error("the storage backend does not support {0}")]
    Unsupported(&'static str),
    /// A helper command failed.
    #[error("{command} failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// An I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A volume backend. Every method is idempotent where its doc says so, so that an
/// interrupted manager can repeat a step after a crash.
#[async_trait]
pub trait Storage: Send + Sync {
    /// What this backend can do.
    fn capabilities(&self) -> StorageCapabilities;

    /// Imports `image`'s root filesystem once; later calls with the same digest
    /// return the existing base. Idempotent.
    async fn import_image(&self, image: &Image) -> Result<BaseImage, StorageError>;

    /// Clones a root volume for `vm` from `base`, in one of `formats` (the
    /// hypervisor's, best first). Fails with [`StorageError::Exists`] if the VM
    /// already has one.
    async fn clone_root(
        &self,
        vm: VmId,
        base: &BaseImage,
        formats: &[DiskFormat],
    ) -> Result<Volume, StorageError>;

    /// Creates an empty, formatted data volume of `size_bytes` for `vm`.
    async fn create_data(&self, vm: VmId, size_bytes: u64) -> Result<Volume, StorageError>;

    /// Grows `volume` to `size_bytes`; never shrinks.
    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StorageError>;

    /// Deletes `volume`. Idempotent: a missing volume is not an error.
    async fn delete(&self, volume: &Volume) -> Result<(), StorageError>;

    /// Every VM volume the backend holds (not base images), for reconcile.
    async fn list(&self) -> Result<Vec<Volume>, StorageError>;

    /// Makes an independent copy of `source` as `vm`'s volume of the same kind
    /// (id [`Volume::id_for`]`(vm, source.kind)`), in the same format and of the
    /// same size. Independent: writes to either volume afterwards never show in the
    /// other. Used to clone a VM and to keep a snapshot's disks (a snapshot holds
    /// them as ordinary volumes under an id of its own from the [`VmId`] space).
    ///
    /// The source should not be written while it is copied (pause the VM, or take
    /// the copy right after a hypervisor snapshot). A crash during the copy never
    /// leaves a partial volume under the new id. Fails with
    /// [`StorageError::Exists`] if `vm` already has a volume of that kind, and
    /// [`StorageError::NotFound`] if `source` does not exist.
    async fn copy_volume(&self, source: &Volume, vm: VmId) -> Result<Volume, StorageError>;

    /// Hands `volume` over to the operator: afterwards it is no longer in
    /// [`Storage::list`] and vmkit never deletes it (so a reconcile cannot either).
    /// Returns where it now lives (a file or a device node), under a name that a
    /// later release of the same id does not reuse. Fails with
    /// [`StorageError::NotFound`] if the volume does not exist.
    async fn release(&self, volume: &Volume) -> Result<PathBuf, StorageError>;
}
