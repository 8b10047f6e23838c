//! File volumes: base images and VM volumes are files under one directory.

pub(crate) mod common;
mod copy;
mod dir;

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use nix::fcntl::OFlag;
use vmkit_core::{
    BaseImage, CloneMethod, DiskFormat, Image, Storage, StorageCapabilities, StorageError, VmId,
    Volume, VolumeKind,
};

use self::common::{base_image, capabilities, check_digest, check_volume_id, parse_volume_id};
use self::dir::{Dir, EntryKind, TEMP_PREFIX};

/// Configuration of a [`FileStorage`]. Build with [`FileStorageConfig::new`] and
/// the setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FileStorageConfig {
    /// Directory holding base images and volumes (`<data_dir>/volumes`); created
    /// with mode 0700 if missing.
    pub root: PathBuf,
    /// Clone every root volume with this method instead of choosing (for tests and
    /// benches). `None` chooses as [`FileStorage`] explains.
    pub clone_method: Option<CloneMethod>,
    /// The `qemu-img` program (qcow2 overlays).
    pub qemu_img: PathBuf,
    /// The `mkfs.ext4` program (data volumes).
    pub mkfs_ext4: PathBuf,
}

impl FileStorageConfig {
    /// Defaults: the method is chosen per clone, programs are looked up in `PATH`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            clone_method: None,
            qemu_img: PathBuf::from("qemu-img"),
            mkfs_ext4: PathBuf::from("mkfs.ext4"),
        }
    }

    /// Forces `method` for every clone: [`CloneMethod::Reflink`],
    /// [`CloneMethod::Qcow2Overlay`] or [`CloneMethod::SparseCopy`].
    pub fn clone_method(mut self, method: CloneMethod) -> Self {
        self.clone_method = Some(method);
        self
    }

    /// Sets the `qemu-img` program.
    pub fn qemu_img(mut self, program: impl Into<PathBuf>) -> Self {
        self.qemu_img = program.into();
        self
    }

    /// Sets the `mkfs.ext4` program.
    pub fn mkfs_ext4(mut self, program: impl Into<PathBuf>) -> Self {
        self.mkfs_ext4 = program.into();
        self
    }
}

/// [`Storage`] on files: reflink, qcow2 overlay or sparse-copy clones of base
/// images, and sparse ext4 data volumes. Cheap to clone; clones share the open
/// directories.
///
/// # Layout
///
/// ```text
/// <root>/                      0711, usually <data_dir>/volumes
///   base/                      0711
///   base/<digest>.raw          imported base images, read-only (0444)
///   vm/                        0711
///   vm/root-<vm-id>.raw        a VM's root volume (reflink or sparse copy), or
///   vm/root-<vm-id>.qcow2      a qcow2 overlay whose backing file is the base
///   vm/data-<vm-id>.raw        a VM's data volume (ext4, label `vmkit-data`)
///   kept/<id>-<secs>.<ext>     volumes handed to the operator by `release` (0700)
/// ```
///
/// Volumes are created 0600 and owned by root; the hypervisor backend hands a
/// VM's volumes to its VMM's uid when it confines the VMM. The directories are
/// traverse-only (0711) so that such a VMM can open its own volumes and the base
/// image under its qcow2 overlay by name, but list nothing.
///
/// Files are written under a `.tmp-` name and renamed into place (without
/// replacing anything) when complete, so a crash leaves either nothing or a whole
/// file; leftover temporary files are removed when a [`FileStorage`] is opened.
/// Keep one `FileStorage` per root.
///
/// # Copies and released volumes
///
/// [`Storage::copy_volume`] copies a volume's file (root or data, raw or qcow2)
/// into a temporary file that is renamed into place: a reflink where the
/// filesystem supports it, else a sparse copy. A qcow2 overlay is copied as it
/// is, so the copy has the same backing file, the read-only base.
///
/// [`Storage::release`] moves a volume's file into `kept/` (created on first use,
/// mode 0700), named after its id and the Unix time in seconds (with `-<n>` added
/// when that name is taken), and syncs both directories. vmkit neither lists nor
/// deletes anything in `kept/`. A kept qcow2 overlay still reads its base from
/// `base/`; `qemu-img convert -O raw` makes it standalone.
///
/// # How a root volume is cloned
///
/// [`Storage::clone_root`] takes the formats the hypervisor accepts. Unless a
/// method is forced with [`FileStorageConfig::clone_method`]:
///
/// 1. a **reflink** (`ioctl(FICLONE)`, O(1), format raw) if the filesystem under the
///    root supports it (btrfs; XFS made with `reflink=1`) and raw is accepted;
/// 2. else a **qcow2 overlay** (O(1), format qcow2) if qcow2 is accepted, made with
///    `qemu-img create -f qcow2 -F raw -b <absolute base path>`. Only QEMU takes
///    qcow2. The backing file is always the base path vmkit chose, never a name
///    read from guest-written data;
/// 3. else a **sparse copy** (O(blocks in use), format raw): only the data ranges of
///    the base (`SEEK_DATA`/`SEEK_HOLE`) are read and blocks of zeros are skipped.
///
/// cloud-hypervisor accepts raw disks only, so with it clones are reflinks on
/// btrfs/XFS and sparse copies elsewhere (ext4). Reflink support is probed once,
/// when the storage is opened, by cloning a small temporary file.
/// [`StorageCapabilities::clone_method`] reports the method used when every format
/// is accepted.
///
/// # Data volumes and resizing
///
/// A data volume is a sparse file formatted with `mkfs.ext4 -q -F -L vmkit-data`.
/// [`Storage::resize`] only grows a volume (`set_len`, or `qemu-img resize` for a
/// qcow2 overlay). It never reads or changes the filesystem in it: that is written
/// by the guest, so parsing it on the host (as root, with `e2fsck` or `resize2fs`)
/// would hand the guest an attack on the host. The guest grows its filesystem to
/// the disk when it next boots (its agent, or `x-systemd.growfs`).
///
/// # Safety
///
/// Every path stays under the root: volume ids are checked (`root-`/`data-` and
/// sixteen hex digits), digests may hold only letters, digits, `_` and `-`, and a
/// volume handed back by a caller must carry the path this backend gives that id.
/// `base/` and `vm/` are opened once with `O_NOFOLLOW`, and every file in them is
/// opened relative to that descriptor with `O_NOFOLLOW`: a symbolic link planted
/// in place of a volume is refused (resize, clone, create) or ignored (list), and
/// [`Storage::delete`] removes the link itself, never its target.
#[derive(Clone)]
pub struct FileStorage {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    base: Dir,
    vm: Dir,
    config: FileStorageConfig,
    reflink: bool,
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage")
            .field("root", &self.inner.root)
            .field("reflink", &self.inner.reflink)
            .field("clone_method", &self.inner.config.clone_method)
            .finish()
    }
}

/// How one clone is made, and in which format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Reflink,
    Qcow2Overlay,
    SparseCopy,
}

impl Method {
    fn format(self) -> DiskFormat {
        match self {
            Method::Qcow2Overlay => DiskFormat::Qcow2,
            Method::Reflink | Method::SparseCopy => DiskFormat::Raw,
        }
    }

    fn public(self) -> CloneMethod {
        match self {
            Method::Reflink => CloneMethod::Reflink,
            Method::Qcow2Overlay => CloneMethod::Qcow2Overlay,
            Method::SparseCopy => CloneMethod::SparseCopy,
        }
    }
}

fn extension(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        _ => "raw",
    }
}

impl FileStorage {
    /// File storage under `root` (`<data_dir>/volumes`) with the default
    /// configuration.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        Self::with_config(FileStorageConfig::new(root))
    }

    /// File storage with `config`: creates the directories, removes leftover
    /// temporary files and probes reflink support. Fails with
    /// [`StorageError::Unsupported`] if the forced clone method cannot work here.
    pub fn with_config(config: FileStorageConfig) -> Result<Self, StorageError> {
        let wanted = &config.root;
        std::fs::create_dir_all(wanted).map_err(|e| {
            io_error(
                format!("cannot create the volume directory {}", wanted.display()),
                e,
            )
        })?;
        std::fs::set_permissions(wanted, std::fs::Permissions::from_mode(TRAVERSE_ONLY))
            .map_err(|e| io_error(format!("cannot set mode 0711 on {}", wanted.display()), e))?;
        let root = wanted.canonicalize().map_err(|e| {
            io_error(
                format!("cannot resolve the volume directory {}", wanted.display()),
                e,
            )
        })?;
        let base = open_dir(&root, "base", TRAVERSE_ONLY)?;
        let vm = open_dir(&root, "vm", TRAVERSE_ONLY)?;
        for dir in [&base, &vm] {
            dir.remove_stale_temps().map_err(|e| {
                io_error(
                    format!("cannot clean temporary files in {}", dir.path().display()),
                    e,
                )
            })?;
        }
        let reflink = copy::probe_reflink(&vm).map_err(|e| {
            io_error(
                format!("cannot probe reflink support in {}", vm.path().display()),
                e,
            )
        })?;
        tracing::debug!(root = %root.display(), reflink, "file storage opened");
        match config.clone_method {
            None | Some(CloneMethod::Qcow2Overlay | CloneMethod::SparseCopy) => {}
            Some(CloneMethod::Reflink) if reflink => {}
            Some(CloneMethod::Reflink) => {
                return Err(StorageError::Unsupported(
                    "reflink clones on this filesystem (use btrfs, or XFS made with `mkfs.xfs -m reflink=1`, or another clone method)",
                ));
            }
            Some(_) => {
                return Err(StorageError::Unsupported(
                    "this clone method for file volumes (use reflink, qcow2 overlay or sparse copy)",
                ));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                base,
                vm,
                config,
                reflink,
            }),
        })
    }

    /// The (canonical) root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Whether the filesystem under the root supports reflinks.
    pub fn reflink_supported(&self) -> bool {
        self.inner.reflink
    }
}

impl Inner {
    /// The clone method for a clone in one of `formats`.
    fn choose(&self, formats: &[DiskFormat]) -> Result<Method, StorageError> {
        let raw = formats.contains(&DiskFormat::Raw);
        let qcow2 = formats.contains(&DiskFormat::Qcow2);
        let method = match self.config.clone_method {
            Some(CloneMethod::Reflink) if raw => Some(Method::Reflink),
            Some(CloneMethod::Qcow2Overlay) if qcow2 => Some(Method::Qcow2Overlay),
            Some(CloneMethod::SparseCopy) if raw => Some(Method::SparseCopy),
            Some(_) => None,
            None if raw && self.reflink => Some(Method::Reflink),
            None if qcow2 => Some(Method::Qcow2Overlay),
            None if raw => Some(Method::SparseCopy),
            None => None,
        };
        method.ok_or_else(|| StorageError::NoFormat(formats.to_vec()))
    }

    /// The file name of a base image, after checking its digest.
    fn base_name(digest: &str) -> Result<String, StorageError> {
        check_digest(digest)?;
        Ok(format!("{digest}.raw"))
    }

    /// Fails with [`StorageError::Exists`] if `id` has a file in any format, or
    /// [`StorageError::Refused`] if a link or something else sits in its place.
    fn check_absent(&self, id: &str) -> Result<(), StorageError> {
        for format in [DiskFormat::Raw, DiskFormat::Qcow2] {
            let name = format!("{id}.{}", extension(format));
            match self
                .vm
                .entry(&name)
                .map_err(|e| self.vm_io("cannot look up", &name, e))?
            {
                None => {}
                Some(EntryKind::File(_)) => return Err(StorageError::Exists(id.to_owned())),
                Some(_) => return Err(self.refused_entry(&name)),
            }
        }
        Ok(())
    }

    fn refused_entry(&self, name: &str) -> StorageError {
        StorageError::Refused(format!(
            "{} is not a regular file (a symbolic link?); vmkit does not follow it — remove it by hand",
            self.vm.path_of(name).display()
        ))
    }

    fn vm_io(&self, what: &str, name: &str, e: io::Error) -> StorageError {
        io_error(format!("{what} {}", self.vm.path_of(name).display()), e)
    }

    /// The file name of `volume`, after checking that its id is vmkit's and that
    /// its path is the one this backend gives that id.
    fn volume_name(&self, volume: &Volume) -> Result<String, StorageError> {
        check_volume_id(volume)?;
        let name = format!("{}.{}", volume.id, extension(volume.format));
        let expected = self.vm.path_of(&name);
        if volume.path != expected {
            return Err(StorageError::Refused(format!(
                "volume {} has path {}, expected {}",
                volume.id,
                volume.path.display(),
                expected.display()
            )));
        }
        Ok(name)
    }

    fn volume(
        &self,
        id: String,
        vm: VmId,
        kind: VolumeKind,
        format: DiskFormat,
        size: u64,
    ) -> Volume {
        let path = self.vm.path_of(&format!("{id}.{}", extension(format)));
        common::volume(id, vm, kind, path, format, size)
    }

    fn import_blocking(&self, image: &Image) -> Result<BaseImage, StorageError> {
        let name = Self::base_name(&image.digest)?;
        let base = |size| {
            base_image(
                image.name.clone(),
                image.digest.clone(),
                self.base.path_of(&name),
                size,
            )
        };
        let existing = |name: &str| match self.base.entry(name) {
            Ok(Some(EntryKind::File(size))) => Ok(Some(size)),
            Ok(None) => Ok(None),
            Ok(Some(_)) => Err(StorageError::Refused(format!(
                "base image {} is not a regular file (a symbolic link?); remove it and import again",
                self.base.path_of(name).display()
            ))),
            Err(e) => Err(io_error(
                format!("cannot look up {}", self.base.path_of(name).display()),
                e,
            )),
        };
        if let Some(size) = existing(&name)? {
            return Ok(base(size));
        }

        let rootfs = &image.rootfs;
        let src = std::fs::File::open(rootfs).map_err(|e| {
            io_error(
                format!(
                    "cannot read the root filesystem {} of image {:?}; rebuild it with `vmkit image build {}`",
                    rootfs.display(),
                    image.name,
                    image.name
                ),
                e,
            )
        })?;
        let meta = src
            .metadata()
            .map_err(|e| io_error(format!("cannot stat {}", rootfs.display()), e))?;
        if !meta.is_file() {
            return Err(StorageError::Refused(format!(
                "the root filesystem {} of image {:?} is not a regular file",
                rootfs.display(),
                image.name
            )));
        }
        let tmp = self.base.create_temp(&image.digest, ".raw").map_err(|e| {
            io_error(
                format!("cannot create a file in {}", self.base.path().display()),
                e,
            )
        })?;
        let copy_err = |e| {
            io_error(
                format!(
                    "cannot copy {} to {}",
                    rootfs.display(),
                    tmp.path().display()
                ),
                e,
            )
        };
        match copy::reflink(&src, tmp.file()) {
            Ok(()) => tracing::debug!(image = %image.name, "base image imported with a reflink"),
            Err(e) if copy::reflink_unsupported(&e) => {
                copy::sparse_copy(&src, tmp.file()).map_err(copy_err)?;
                tracing::debug!(image = %image.name, "base image imported with a sparse copy");
            }
            Err(e) => return Err(copy_err(e)),
        }
        tmp.chmod(0o444).map_err(copy_err)?;
        match tmp.persist(&name) {
            Ok(()) => Ok(base(meta.len())),
            // Imported by someone else meanwhile: theirs is as good.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match existing(&name)? {
                Some(size) => Ok(base(size)),
                None => Err(io_error(
                    format!("cannot import {}", self.base.path_of(&name).display()),
                    e,
                )),
            },
            Err(e) => Err(io_error(
                format!("cannot import {}", self.base.path_of(&name).display()),
                e,
            )),
        }
    }

    /// Opens the base image `base` for reading, checking it is the one this
    /// backend imported. Returns its file name and the open file.
    fn open_base(&self, base: &BaseImage) -> Result<(String, std::fs::File), StorageError> {
        let name = Self::base_name(&base.digest)?;
        let expected = self.base.path_of(&name);
        if base.path != expected {
            return Err(StorageError::Refused(format!(
                "base image {} has path {}, expected {}",
                base.name,
                base.path.display(),
                expected.display()
            )));
        }
        match self.base.entry(&name) {
            Ok(Some(EntryKind::File(_))) => {}
            Ok(None) => return Err(StorageError::NoBaseImage(base.name.clone())),
            Ok(Some(_)) => {
                return Err(StorageError::Refused(format!(
                    "base image {} is not a regular file (a symbolic link?)",
                    expected.display()
                )));
            }
            Err(e) => {
                return Err(io_error(
                    format!("cannot look up {}", expected.display()),
                    e,
                ));
            }
        }
        let file = copy::open_read(&self.base, &name)
            .map_err(|e| io_error(format!("cannot open {}", expected.display()), e))?;
        Ok((name, file))
    }

    /// A raw clone (reflink or sparse copy) of `base` as `<id>.raw`.
    fn clone_raw_blocking(
        &self,
        method: Method,
        base: &BaseImage,
        id: &str,
    ) -> Result<u64, StorageError> {
        let (_, src) = self.open_base(base)?;
        let name = format!("{id}.raw");
        let tmp = self
            .vm
            .create_temp(id, ".raw")
            .map_err(|e| self.vm_io("cannot create a temporary file for", &name, e))?;
        let err = |e| {
            io_error(
                format!(
                    "cannot clone {} to {}",
                    base.path.display(),
                    tmp.path().display()
                ),
                e,
            )
        };
        match method {
            Method::Reflink => copy::reflink(&src, tmp.file()).map_err(err)?,
            Method::SparseCopy | Method::Qcow2Overlay => {
                copy::sparse_copy(&src, tmp.file()).map_err(err)?;
            }
        }
        let size = src.metadata().map_err(err)?.len();
        self.persist(tmp, id, &name)?;
        Ok(size)
    }

    /// Renames a finished temporary file to `name`, or reports that `id` exists.
    fn persist(&self, tmp: dir::TempFile<'_>, id: &str, name: &str) -> Result<(), StorageError> {
        tmp.persist(name).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                StorageError::Exists(id.to_owned())
            } else {
                self.vm_io("cannot write", name, e)
            }
        })
    }

    async fn clone_qcow2(&self, base: &BaseImage, id: &str) -> Result<u64, StorageError> {
        let (_, src) = self.open_base(base)?;
        let size = src
            .metadata()
            .map_err(|e| io_error(format!("cannot stat {}", base.path.display()), e))?
            .len();
        drop(src);
        let name = format!("{id}.qcow2");
        let tmp = self
            .vm
            .create_temp(id, ".qcow2")
            .map_err(|e| self.vm_io("cannot create a temporary file for", &name, e))?;
        let tmp_path = tmp.path();
        let mut args = ["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]
            .map(OsStr::new)
            .to_vec();
        args.extend([base.path.as_os_str(), tmp_path.as_os_str()]);
        run(&self.config.qemu_img, &args, QEMU_IMG_HINT).await?;
        tmp.chmod(0o600)
            .map_err(|e| self.vm_io("cannot set the mode of", &name, e))?;
        self.persist(tmp, id, &name)?;
        Ok(size)
    }

    async fn create_data(&self, vm: VmId, size: u64) -> Result<Volume, StorageError> {
        let id = Volume::id_for(vm, VolumeKind::Data);
        self.check_absent(&id)?;
        let name = format!("{id}.raw");
        let tmp = self
            .vm
            .create_temp(&id, ".raw")
            .map_err(|e| self.vm_io("cannot create a temporary file for", &name, e))?;
        tmp.file()
            .set_len(size)
            .map_err(|e| self.vm_io("cannot size", &name, e))?;
        let tmp_path = tmp.path();
        let mut args = ["-q", "-F", "-L", "vmkit-data"].map(OsStr::new).to_vec();
        args.push(tmp_path.as_os_str());
        run(&self.config.mkfs_ext4, &args, MKFS_HINT).await?;
        self.persist(tmp, &id, &name)?;
        Ok(self.volume(id, vm, VolumeKind::Data, DiskFormat::Raw, size))
    }

    /// Opens `volume`'s file with `flags` and returns it with its current size (the
    /// size the guest sees).
    fn open_volume(
        &self,
        volume: &Volume,
        name: &str,
        flags: OFlag,
    ) -> Result<(std::fs::File, u64), StorageError> {
        let file = self
            .vm
            .open(name, flags)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => StorageError::NotFound(volume.id.clone()),
                Some(libc::ELOOP) => self.refused_entry(name),
                _ => self.vm_io("cannot open", name, e),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| self.vm_io("cannot stat", name, e))?;
        if !meta.is_file() {
            return Err(self.refused_entry(name));
        }
        let size = match volume.format {
            DiskFormat::Qcow2 => qcow2_virtual_size(&file)
                .map_err(|e| self.vm_io("cannot read the qcow2 header of", name, e))?,
            _ => meta.len(),
        };
        Ok((file, size))
    }

    async fn resize(&self, volume: &Volume, size: u64) -> Result<Volume, StorageError> {
        let name = self.volume_name(volume)?;
        let (file, current) = self.open_volume(volume, &name, OFlag::O_RDWR)?;
        if size < current {
            return Err(StorageError::Shrink {
                id: volume.id.clone(),
                current,
                requested: size,
            });
        }
        if size > current {
            match volume.format {
                DiskFormat::Qcow2 => {
                    drop(file);
                    let path = self.vm.path_of(&name);
                    let size_arg = size.to_string();
                    let mut args = ["resize", "-f", "qcow2"].map(OsStr::new).to_vec();
                    args.extend([path.as_os_str(), OsStr::new(&size_arg)]);
                    run(&self.config.qemu_img, &args, QEMU_IMG_HINT).await?;
                }
                _ => {
                    file.set_len(size)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| self.vm_io("cannot grow", &name, e))?;
                }
            }
        }
        let mut grown = volume.clone();
        grown.size_bytes = size;
        Ok(grown)
    }

    /// An independent copy of `source` as `vm`'s volume of its kind: a reflink
    /// where the filesystem supports it, else a sparse copy; a qcow2 overlay is
    /// copied as a file and keeps its backing file, the immutable base.
    fn copy_blocking(&self, source: &Volume, vm: VmId) -> Result<Volume, StorageError> {
        let name = self.volume_name(source)?;
        let (src, size) = self.open_volume(source, &name, OFlag::O_RDONLY)?;
        let id = Volume::id_for(vm, source.kind);
        self.check_absent(&id)?;
        let ext = extension(source.format);
        let target = format!("{id}.{ext}");
        let tmp = self
            .vm
            .create_temp(&id, &format!(".{ext}"))
            .map_err(|e| self.vm_io("cannot create a temporary file for", &target, e))?;
        let err = |e| {
            io_error(
                format!(
                    "cannot copy {} to {}",
                    self.vm.path_of(&name).display(),
                    tmp.path().display()
                ),
                e,
            )
        };
        let reflinked = self.reflink
            && match copy::reflink(&src, tmp.file()) {
                Ok(()) => true,
                Err(e) if copy::reflink_unsupported(&e) => false,
                Err(e) => return Err(err(e)),
            };
        if !reflinked {
            copy::sparse_copy(&src, tmp.file()).map_err(err)?;
        }
        self.persist(tmp, &id, &target)?;
        tracing::debug!(source = %source.id, copy = %id, reflinked, "volume copied");
        Ok(self.volume(id, vm, source.kind, source.format, size))
    }

    /// Moves `volume`'s file to `kept/<id>-<unix seconds>[-<n>].<ext>`.
    fn release_blocking(&self, volume: &Volume) -> Result<PathBuf, StorageError> {
        let name = self.volume_name(volume)?;
        match self
            .vm
            .entry(&name)
            .map_err(|e| self.vm_io("cannot look up", &name, e))?
        {
            Some(EntryKind::File(_)) => {}
            None => return Err(StorageError::NotFound(volume.id.clone())),
            Some(_) => return Err(self.refused_entry(&name)),
        }
        let kept = open_dir(&self.root, KEPT_DIR, 0o700)?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ext = extension(volume.format);
        for n in 0..MAX_KEPT_TRIES {
            let kept_name = match n {
                0 => format!("{}-{secs}.{ext}", volume.id),
                n => format!("{}-{secs}-{n}.{ext}", volume.id),
            };
            match self.vm.move_noreplace(&name, &kept, &kept_name) {
                Ok(()) => {
                    let path = kept.path_of(&kept_name);
                    for dir in [&kept, &self.vm] {
                        dir.sync().map_err(|e| {
                            io_error(format!("cannot sync {}", dir.path().display()), e)
                        })?;
                    }
                    tracing::info!(volume = %volume.id, path = %path.display(), "volume handed over to the operator");
                    return Ok(path);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StorageError::NotFound(volume.id.clone()));
                }
                Err(e) => {
                    return Err(io_error(
                        format!(
                            "cannot move {} to {}",
                            self.vm.path_of(&name).display(),
                            kept.path_of(&kept_name).display()
                        ),
                        e,
                    ));
                }
            }
        }
        Err(StorageError::Refused(format!(
            "{MAX_KEPT_TRIES} kept copies of {} from this second already exist in {}; remove some",
            volume.id,
            kept.path().display()
        )))
    }

    fn delete_blocking(&self, volume: &Volume) -> Result<(), StorageError> {
        let name = self.volume_name(volume)?;
        if self
            .vm
            .entry(&name)
            .map_err(|e| self.vm_io("cannot look up", &name, e))?
            == Some(EntryKind::Symlink)
        {
            tracing::warn!(path = %self.vm.path_of(&name).display(), "removing a symbolic link found in place of a volume (its target is left alone)");
        }
        let existed = self
            .vm
            .unlink(&name)
            .map_err(|e| self.vm_io("cannot remove", &name, e))?;
        if existed {
            self.vm
                .sync()
                .map_err(|e| io_error(format!("cannot sync {}", self.vm.path().display()), e))?;
        }
        Ok(())
    }

    fn list_blocking(&self) -> Result<Vec<Volume>, StorageError> {
        let names = self
            .vm
            .names()
            .map_err(|e| io_error(format!("cannot list {}", self.vm.path().display()), e))?;
        let mut volumes = Vec::new();
        for name in names {
            let Some(name) = name.to_str() else {
                tracing::warn!(dir = %self.vm.path().display(), name = ?name, "ignoring a file that is not a vmkit volume");
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            match self.listed(name) {
                Ok(Some(v)) => volumes.push(v),
                Ok(None) => {
                    tracing::warn!(path = %self.vm.path_of(name).display(), "ignoring a file that is not a vmkit volume");
                }
                Err(e) => return Err(e),
            }
        }
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    /// The volume file `name` stands for, or `None` if it is not one of vmkit's.
    fn listed(&self, name: &str) -> Result<Option<Volume>, StorageError> {
        let Some((id, ext)) = name.rsplit_once('.') else {
            return Ok(None);
        };
        let format = match ext {
            "raw" => DiskFormat::Raw,
            "qcow2" => DiskFormat::Qcow2,
            _ => return Ok(None),
        };
        let Some((vm, kind)) = parse_volume_id(id) else {
            return Ok(None);
        };
        if kind == VolumeKind::Data && format == DiskFormat::Qcow2 {
            return Ok(None);
        }
        let size = match self
            .vm
            .entry(name)
            .map_err(|e| self.vm_io("cannot look up", name, e))?
        {
            Some(EntryKind::File(len)) if format == DiskFormat::Raw => len,
            Some(EntryKind::File(_)) => {
                let file = copy::open_read(&self.vm, name)
                    .map_err(|e| self.vm_io("cannot open", name, e))?;
                match qcow2_virtual_size(&file) {
                    Ok(size) => size,
                    Err(e) => {
                        tracing::warn!(path = %self.vm.path_of(name).display(), error = %e, "ignoring a qcow2 volume whose header does not read");
                        return Ok(None);
                    }
                }
            }
            // Vanished meanwhile, or a link / something else: not a volume.
            _ => return Ok(None),
        };
        Ok(Some(self.volume(id.to_owned(), vm, kind, format, size)))
    }
}

#[async_trait]
impl Storage for FileStorage {
    fn capabilities(&self) -> StorageCapabilities {
        let method = match self.inner.config.clone_method {
            Some(m) => m,
            None if self.inner.reflink => CloneMethod::Reflink,
            None => CloneMethod::Qcow2Overlay,
        };
        capabilities(method, true, true)
    }

    async fn import_image(&self, image: &Image) -> Result<BaseImage, StorageError> {
        let inner = self.inner.clone();
        let image = image.clone();
        blocking(move || inner.import_blocking(&image)).await
    }

    async fn clone_root(
        &self,
        vm: VmId,
        base: &BaseImage,
        formats: &[DiskFormat],
    ) -> Result<Volume, StorageError> {
        let method = self.inner.choose(formats)?;
        let id = Volume::id_for(vm, VolumeKind::Root);
        self.inner.check_absent(&id)?;
        let size = match method {
            Method::Qcow2Overlay => self.inner.clone_qcow2(base, &id).await?,
            Method::Reflink | Method::SparseCopy => {
                let inner = self.inner.clone();
                let (base, id) = (base.clone(), id.clone());
                blocking(move || inner.clone_raw_blocking(method, &base, &id)).await?
            }
        };
        tracing::debug!(vm = %vm, method = ?method.public(), "root volume cloned");
        Ok(self
            .inner
            .volume(id, vm, VolumeKind::Root, method.format(), size))
    }

    async fn create_data(&self, vm: VmId, size_bytes: u64) -> Result<Volume, StorageError> {
        self.inner.create_data(vm, size_bytes).await
    }

    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StorageError> {
        self.inner.resize(volume, size_bytes).await
    }

    async fn delete(&self, volume: &Volume) -> Result<(), StorageError> {
        let inner = self.inner.clone();
        let volume = volume.clone();
        blocking(move || inner.delete_blocking(&volume)).await
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        let inner = self.inner.clone();
        blocking(move || inner.list_blocking()).await
    }

    async fn copy_volume(&self, source: &Volume, vm: VmId) -> Result<Volume, StorageError> {
        let inner = self.inner.clone();
        let source = source.clone();
        blocking(move || inner.copy_blocking(&source, vm)).await
    }

    async fn release(&self, volume: &Volume) -> Result<PathBuf, StorageError> {
        let inner = self.inner.clone();
        let volume = volume.clone();
        blocking(move || inner.release_blocking(&volume)).await
    }
}

/// The directory of released volumes, beside `base/` and `vm/`.
const KEPT_DIR: &str = "kept";
/// How many names a release tries for one id within one second.
const MAX_KEPT_TRIES: u32 = 1000;

const QEMU_IMG_HINT: &str =
    "install qemu-img (Debian/Ubuntu: `apt-get install qemu-utils`), or use a raw clone method";
const MKFS_HINT: &str = "install mkfs.ext4 (Debian/Ubuntu: `apt-get install e2fsprogs`)";

/// Runs `program args`, turning a failure into [`StorageError::Command`]; a missing
/// program's error says how to install it (`hint`).
async fn run(program: &Path, args: &[&OsStr], hint: &str) -> Result<(), StorageError> {
    let command = std::iter::once(program.as_os_str())
        .chain(args.iter().copied())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| StorageError::Command {
            command: command.clone(),
            stderr: if e.kind() == io::ErrorKind::NotFound {
                format!("{} is not installed; {hint}", program.display())
            } else {
                format!("cannot start {}: {e}", program.display())
            },
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(StorageError::Command {
            command,
            stderr: format!(
                "{} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ),
        })
    }
}

/// The mode of the root, `base/` and `vm/`: only root lists them; anyone may open an
/// entry by name, which each file's own mode then decides. A confined VMM opens its
/// own volumes (owned by its uid, 0600) and the base image its qcow2 overlay reads
/// (0444), nothing else.
const TRAVERSE_ONLY: u32 = 0o711;

/// Opens (creating it if needed) the directory `name` of the storage root with `mode`.
fn open_dir(root: &Path, name: &str, mode: u32) -> Result<Dir, StorageError> {
    Dir::open_child(root, name, mode).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => StorageError::Refused(format!(
            "{} is not a directory (a symbolic link?); remove it and let vmkit recreate it",
            root.join(name).display()
        )),
        _ => io_error(format!("cannot open {}", root.join(name).display()), e),
    })
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        StorageError::io(
            "a storage worker thread failed",
            io::Error::other(e.to_string()),
        )
    })?
}

/// An I/O error with what was being done; a full disk becomes
/// [`StorageError::NoSpace`].
fn io_error(context: String, e: io::Error) -> StorageError {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => {
            StorageError::NoSpace(format!("this write ({context})"))
        }
        _ => StorageError::io(context, e),
    }
}

/// The virtual size in a qcow2 header (big-endian u64 at offset 24, after the
/// magic `QFI\xfb`).
fn qcow2_virtual_size(file: &std::fs::File) -> io::Result<u64> {
    let mut header = [0u8; 32];
    file.read_exact_at(&mut header, 0)?;
    if header[..4] != *b"QFI\xfb" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a qcow2 file",
        ));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[24..32]);
    Ok(u64::from_be_bytes(size))
}
