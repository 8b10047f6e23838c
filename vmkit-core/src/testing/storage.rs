//! An in-memory storage backend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::faults::Faults;
use crate::image::Image;
use crate::storage::{
    BaseImage, CloneMethod, DiskFormat, Storage, StorageCapabilities, StorageError, Volume,
    VolumeKind,
};
use crate::vm::VmId;

/// Size of the blocks in which the fake keeps what was written to a disk.
const BLOCK: u64 = 4096;

/// A complete in-memory [`Storage`]: volumes are table entries with the real rules
/// (one root per VM, grow only, idempotent delete), and their contents are kept so
/// that tests can check copies ([`FakeStorage::write`], [`FakeStorage::read`]).
/// Released volumes move to `/fake/kept/<id>-<n>`, where they stay readable.
#[derive(Debug, Clone, Default)]
pub struct FakeStorage {
    state: Arc<Mutex<State>>,
    faults: Faults,
}

#[derive(Debug, Default)]
struct State {
    bases: BTreeMap<String, BaseImage>,
    volumes: BTreeMap<String, Volume>,
    /// The contents of every disk, volumes and released ones, by path.
    disks: BTreeMap<PathBuf, Disk>,
    /// Releases so far, which number the released disks' paths.
    releases: u64,
}

impl State {
    /// Adds `vm`'s volume of `kind`, holding `disk`; fails if it exists.
    fn add(
        &mut self,
        vm: VmId,
        kind: VolumeKind,
        format: DiskFormat,
        disk: Disk,
    ) -> Result<Volume, StorageError> {
        let id = Volume::id_for(vm, kind);
        if self.volumes.contains_key(&id) {
            return Err(StorageError::Exists(id));
        }
        let volume = Volume {
            path: PathBuf::from(format!("/fake/volumes/{id}")),
            id: id.clone(),
            vm,
            kind,
            format,
            size_bytes: disk.size,
        };
        self.disks.insert(volume.path.clone(), disk);
        self.volumes.insert(id, volume.clone());
        Ok(volume)
    }
}

/// What was written to one disk; bytes never written read as zero.
#[derive(Clone, Debug, Default)]
struct Disk {
    size: u64,
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl Disk {
    fn new(size: u64) -> Self {
        Self {
            size,
            blocks: BTreeMap::new(),
        }
    }

    fn check_range(&self, path: &Path, offset: u64, len: usize) -> Result<(), StorageError> {
        let end = offset.checked_add(len as u64);
        if end.is_some_and(|end| end <= self.size) {
            Ok(())
        } else {
            Err(StorageError::Refused(format!(
                "{len} bytes at offset {offset} do not fit in {} ({} bytes)",
                path.display(),
                self.size
            )))
        }
    }

    fn write(&mut self, mut offset: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let (block, within) = (offset / BLOCK, (offset % BLOCK) as usize);
            let n = data.len().min(BLOCK as usize - within);
            let bytes = self
                .blocks
                .entry(block)
                .or_insert_with(|| vec![0; BLOCK as usize]);
            bytes[within..within + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            offset += n as u64;
        }
    }

    fn read(&self, mut offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let (block, within) = (offset / BLOCK, (offset % BLOCK) as usize);
            let n = (len - out.len()).min(BLOCK as usize - within);
            match self.blocks.get(&block) {
                Some(bytes) => out.extend_from_slice(&bytes[within..within + n]),
                None => out.resize(out.len() + n, 0),
            }
            offset += n as u64;
        }
        out
    }
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

    /// Writes `data` at `offset` into the disk at `path` (a volume's, or one that
    /// [`Storage::release`] handed over), as a guest would. Fails with
    /// [`StorageError::NotFound`] if there is no such disk and
    /// [`StorageError::Refused`] past its end.
    pub fn write(&self, path: &Path, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let mut s = self.lock();
        let disk = s
            .disks
            .get_mut(path)
            .ok_or_else(|| StorageError::NotFound(path.display().to_string()))?;
        disk.check_range(path, offset, data.len())?;
        disk.write(offset, data);
        Ok(())
    }

    /// Reads `len` bytes at `offset` from the disk at `path`, failing like
    /// [`FakeStorage::write`].
    pub fn read(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        let s = self.lock();
        let disk = s
            .disks
            .get(path)
            .ok_or_else(|| StorageError::NotFound(path.display().to_string()))?;
        disk.check_range(path, offset, len)?;
        Ok(disk.read(offset, len))
    }

    /// Fails `op` on `volume` as [`Faults::break_op`] broke it for its VM, if it did.
    fn broken(&self, op: &'static str, volume: &Volume) -> Result<(), StorageError> {
        match self.faults.broken(op, &volume.vm.to_string()) {
            None => Ok(()),
            Some(_) => Err(StorageError::Io {
                context: format!("cannot {op} volume {} (injected)", volume.id),
                source: std::io::Error::from(std::io::ErrorKind::ResourceBusy),
            }),
        }
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
        s.add(vm, VolumeKind::Root, format, Disk::new(base.size_bytes))
    }

    async fn create_data(&self, vm: VmId, size_bytes: u64) -> Result<Volume, StorageError> {
        self.check("storage.create_data")?;
        self.lock()
            .add(vm, VolumeKind::Data, DiskFormat::Raw, Disk::new(size_bytes))
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
        let grown = v.clone();
        if let Some(disk) = s.disks.get_mut(&grown.path) {
            disk.size = size_bytes;
        }
        Ok(grown)
    }

    async fn delete(&self, volume: &Volume) -> Result<(), StorageError> {
        self.check("storage.delete")?;
        self.broken("storage.delete", volume)?;
        let mut s = self.lock();
        if let Some(v) = s.volumes.remove(&volume.id) {
            s.disks.remove(&v.path);
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        Ok(self.lock().volumes.values().cloned().collect())
    }

    async fn copy_volume(&self, source: &Volume, vm: VmId) -> Result<Volume, StorageError> {
        self.check("storage.copy_volume")?;
        let mut s = self.lock();
        let source = s
            .volumes
            .get(&source.id)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(source.id.clone()))?;
        let contents = s
            .disks
            .get(&source.path)
            .cloned()
            .unwrap_or_else(|| Disk::new(source.size_bytes));
        s.add(vm, source.kind, source.format, contents)
    }

    async fn release(&self, volume: &Volume) -> Result<PathBuf, StorageError> {
        self.check("storage.release")?;
        self.broken("storage.release", volume)?;
        let mut s = self.lock();
        let v = s
            .volumes
            .remove(&volume.id)
            .ok_or_else(|| StorageError::NotFound(volume.id.clone()))?;
        s.releases += 1;
        let kept = PathBuf::from(format!("/fake/kept/{}-{}", v.id, s.releases));
        let contents = s
            .disks
            .remove(&v.path)
            .unwrap_or_else(|| Disk::new(v.size_bytes));
        s.disks.insert(kept.clone(), contents);
        Ok(kept)
    }
}
