//! An in-memory storage backend.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::faults::Faults;
use crate::image::Image;
use crate::storage::{
    BaseImage, CloneMethod, DiskFormat, Storage, StorageCapabilities, StorageError, Volume,
    VolumeKind,
};
use crate::vm::VmId;

/// A complete in-memory [`Storage`]: volumes are table entries with the real rules
/// (one root per VM, grow only, idempotent delete).
#[derive(Debug, Clone, Default)]
pub struct FakeStorage {
    state: Arc<Mutex<State>>,
    faults: Faults,
}

#[derive(Debug, Default)]
struct State {
    bases: BTreeMap<String, BaseImage>,
    volumes: BTreeMap<String, Volume>,
}

impl FakeStorage {
    /// A fake that fails nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake whose calls count towards `faults`.
    pub fn with_faults(faults: Faults) -> Self {
        Self {
            state: Arc::default(),
            faults,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, op: &'static str) -> Result<(), StorageError> {
        self.faults.check(op).map_err(|f| StorageError::Command {
            command: op.to_owned(),
            stderr: f.to_string(),
        })
    }
}

#[async_trait]
impl Storage for FakeStorage {
    fn capabilities(&self) -> StorageCapabilities {
        StorageCapabilities {
            clone_method: CloneMethod::Memory,
            data_volumes: true,
            resize: true,
        }
    }

    async fn import_image(&self, image: &Image) -> Result<BaseImage, StorageError> {
        self.check("storage.import_image")?;
        let mut s = self.lock();
        let base = s
            .bases
            .entry(image.digest.clone())
            .or_insert_with(|| BaseImage {
                name: image.name.clone(),
                digest: image.digest.clone(),
                path: PathBuf::from(format!("/fake/base/{}", image.digest)),
                size_bytes: 1 << 30,
            });
        Ok(base.clone())
    }

    async fn clone_root(
        &self,
        vm: VmId,
        base: &BaseImage,
        formats: &[DiskFormat],
    ) -> Result<Volume, StorageError> {
        self.check("storage.clone_root")?;
        let format = *formats
            .first()
            .ok_or_else(|| StorageError::NoFormat(formats.to_vec()))?;
        let mut s = self.lock();
        if !s.bases.contains_key(&base.digest) {
            return Err(StorageError::NoBaseImage(base.name.clone()));
        }
        let id = Volume::id_for(vm, VolumeKind::Root);
        if s.volumes.contains_key(&id) {
            return Err(StorageError::Exists(id));
        }
        let volume = Volume {
            path: PathBuf::from(format!("/fake/volumes/{id}")),
            id: id.clone(),
            vm,
            kind: VolumeKind::Root,
            format,
            size_bytes: base.size_bytes,
        };
        s.volumes.insert(id, volume.clone());
        Ok(volume)
    }

    async fn create_data(&self, vm: VmId, size_bytes: u64) -> Result<Volume, StorageError> {
        self.check("storage.create_data")?;
        let mut s = self.lock();
        let id = Volume::id_for(vm, VolumeKind::Data);
        if s.volumes.contains_key(&id) {
            return Err(StorageError::Exists(id));
        }
        let volume = Volume {
            path: PathBuf::from(format!("/fake/volumes/{id}")),
            id: id.clone(),
            vm,
            kind: VolumeKind::Data,
            format: DiskFormat::Raw,
            size_bytes,
        };
        s.volumes.insert(id, volume.clone());
        Ok(volume)
    }

    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StorageError> {
        self.check("storage.resize")?;
        let mut s = self.lock();
        let v = s
            .volumes
            .get_mut(&volume.id)
            .ok_or_else(|| StorageError::NotFound(volume.id.clone()))?;
        if size_bytes < v.size_bytes {
            return Err(StorageError::Shrink {
                id: v.id.clone(),
                current: v.size_bytes,
                requested: size_bytes,
            });
        }
        v.size_bytes = size_bytes;
        Ok(v.clone())
    }

    async fn delete(&self, volume: &Volume) -> Result<(), StorageError> {
        self.check("storage.delete")?;
        self.lock().volumes.remove(&volume.id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        Ok(self.lock().volumes.values().cloned().collect())
    }
}
