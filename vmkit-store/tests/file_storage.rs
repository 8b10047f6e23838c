//! FileStorage on real filesystems: the generic storage suite on ext4 and on a
//! reflink-capable XFS (a loop-mounted file), per clone method, and the rules of
//! the file backend (layout, formats, links, cleanup).
//!
//! The XFS tests and an ext4 fallback mount loop filesystems, which needs root:
//! they fail with a message saying so when not run as root.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;
use vmkit_core::testing::suites::{StorageFixture, storage_suite};
use vmkit_core::{CloneMethod, DiskFormat, Image, Storage, StorageError, VmId, Volume, VolumeKind};
use vmkit_store::{FileStorage, FileStorageConfig};

// ------------------------------------------------------------------ fixtures

/// Runs a command and panics with its output if it fails.
fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root(why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root to {why}; run the vmkit-store tests as root"
    );
}

/// A filesystem made in a file and loop-mounted in a temporary directory;
/// unmounted (and the file removed) on drop, also when a test fails.
struct LoopMount {
    mnt: PathBuf,
    _dir: TempDir,
}

impl LoopMount {
    fn new(mkfs: &[&str], size: &str) -> Self {
        require_root("mount a loop filesystem");
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mount point");
        let image_s = image.to_str().expect("utf-8 temp path");
        sh("truncate", &["-s", size, image_s]);
        let mut args = mkfs[1..].to_vec();
        args.push(image_s);
        sh(mkfs[0], &args);
        sh(
            "mount",
            &[
                "-o",
                "loop",
                image_s,
                mnt.to_str().expect("utf-8 temp path"),
            ],
        );
        Self { mnt, _dir: dir }
    }

    fn xfs_reflink() -> Self {
        Self::new(&["mkfs.xfs", "-q", "-m", "reflink=1"], "512M")
    }

    fn ext4() -> Self {
        Self::new(&["mkfs.ext4", "-q", "-F"], "512M")
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A directory on ext4: the default temporary directory when it is ext4 (checked
/// with statfs), else a loop-mounted ext4.
enum Ext4 {
    Tmp(TempDir),
    Loop(LoopMount),
}

impl Ext4 {
    fn new() -> Self {
        let tmp = std::env::temp_dir();
        let fs = nix::sys::statfs::statfs(&tmp).expect("statfs of the temp dir");
        if fs.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC {
            Ext4::Tmp(tempfile::tempdir().expect("temp dir"))
        } else {
            Ext4::Loop(LoopMount::ext4())
        }
    }

    fn path(&self) -> &Path {
        match self {
            Ext4::Tmp(d) => d.path(),
            Ext4::Loop(m) => &m.mnt,
        }
    }
}

/// An image whose root filesystem is a real 32 MiB ext4 file in `dir`.
fn make_image(dir: &Path) -> Image {
    let images = dir.join("images");
    fs::create_dir_all(&images).expect("images dir");
    let rootfs = images.join("rootfs.ext4");
    let rootfs_s = rootfs.to_str().expect("utf-8 temp path");
    sh("truncate", &["-s", "32M", rootfs_s]);
    sh("mkfs.ext4", &["-q", "-F", "-L", "tiny-root", rootfs_s]);
    let mut image = Image::synthetic("tiny");
    image.digest = format!(
        "{:016x}{:016x}",
        VmId::generate().as_u64(),
        VmId::generate().as_u64()
    );
    image.rootfs = rootfs;
    image
}

struct Fixture {
    image: Image,
    formats: Vec<DiskFormat>,
}

#[async_trait::async_trait]
impl StorageFixture for Fixture {
    fn image(&self) -> Image {
        self.image.clone()
    }
    fn formats(&self) -> Vec<DiskFormat> {
        self.formats.clone()
    }
    async fn write(&self, volume: &Volume, offset: u64, data: &[u8]) {
        write_guest(volume, offset, data);
    }
    async fn read(&self, volume: &Volume, offset: u64, len: usize) -> Vec<u8> {
        read_guest(volume, offset, len)
    }
}

/// Writes `data` at `offset` of `volume` as its guest sees it: into the file of a
/// raw volume, through `qemu-io` into a qcow2 one.
fn write_guest(volume: &Volume, offset: u64, data: &[u8]) {
    match volume.format {
        DiskFormat::Qcow2 => {
            let pattern = tempfile::NamedTempFile::new().unwrap();
            fs::write(pattern.path(), data).unwrap();
            let command = format!(
                "write -q -s {} {offset} {}",
                pattern.path().display(),
                data.len()
            );
            sh(
                "qemu-io",
                &["-f", "qcow2", "-c", &command, volume.path.to_str().unwrap()],
            );
        }
        _ => fs::OpenOptions::new()
            .write(true)
            .open(&volume.path)
            .unwrap()
            .write_all_at(data, offset)
            .unwrap(),
    }
}

/// Reads `len` bytes at `offset` of `volume` as its guest sees them (a qcow2
/// volume through a raw conversion).
fn read_guest(volume: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    match volume.format {
        DiskFormat::Qcow2 => {
            let raw = tempfile::NamedTempFile::new().unwrap();
            sh(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    volume.path.to_str().unwrap(),
                    raw.path().to_str().unwrap(),
                ],
            );
            fs::File::open(raw.path())
                .unwrap()
                .read_exact_at(&mut buf, offset)
                .unwrap();
        }
        _ => fs::File::open(&volume.path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap(),
    }
    buf
}

/// Storage under `<dir>/volumes` and an image under `<dir>/images`.
fn storage_in(dir: &Path, method: Option<CloneMethod>) -> (FileStorage, Image) {
    let mut config = FileStorageConfig::new(dir.join("volumes"));
    if let Some(m) = method {
        config = config.clone_method(m);
    }
    let storage = FileStorage::with_config(config).expect("open file storage");
    (storage, make_image(dir))
}

fn vm_dir(storage: &FileStorage) -> PathBuf {
    storage.root().join("vm")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn run_suite(dir: &Path, method: Option<CloneMethod>, formats: &[DiskFormat]) -> FileStorage {
    let (storage, image) = storage_in(dir, method);
    let fx = Fixture {
        image,
        formats: formats.to_vec(),
    };
    storage_suite(&storage, &fx).await;
    assert_eq!(
        entries(&vm_dir(&storage)),
        Vec::<String>::new(),
        "the suite leaves no volume file"
    );
    storage
}

const RAW: &[DiskFormat] = &[DiskFormat::Raw];
const QCOW2_THEN_RAW: &[DiskFormat] = &[DiskFormat::Qcow2, DiskFormat::Raw];

// ------------------------------------------------------------------ suite on ext4

#[tokio::test]
async fn suite_passes_on_ext4_with_raw_only_clones() {
    let fs = Ext4::new();
    run_suite(fs.path(), None, RAW).await;
}

#[tokio::test]
async fn suite_passes_on_ext4_with_qcow2_overlays() {
    let fs = Ext4::new();
    run_suite(fs.path(), None, QCOW2_THEN_RAW).await;
}

#[tokio::test]
async fn suite_passes_on_ext4_with_forced_sparse_copy() {
    let fs = Ext4::new();
    run_suite(fs.path(), Some(CloneMethod::SparseCopy), QCOW2_THEN_RAW).await;
}

#[tokio::test]
async fn suite_passes_on_ext4_with_forced_qcow2_overlay() {
    let fs = Ext4::new();
    run_suite(fs.path(), Some(CloneMethod::Qcow2Overlay), QCOW2_THEN_RAW).await;
}

// ------------------------------------------------------------------ suite on XFS (reflink)

#[tokio::test]
async fn suite_passes_on_xfs_with_reflinks() {
    let fs = LoopMount::xfs_reflink();
    let storage = run_suite(&fs.mnt, None, RAW).await;
    assert!(storage.reflink_supported());
}

#[tokio::test]
async fn suite_passes_on_xfs_with_forced_reflink_when_qcow2_is_also_accepted() {
    let fs = LoopMount::xfs_reflink();
    run_suite(&fs.mnt, Some(CloneMethod::Reflink), QCOW2_THEN_RAW).await;
}

#[tokio::test]
async fn suite_passes_on_xfs_with_forced_sparse_copy() {
    let fs = LoopMount::xfs_reflink();
    run_suite(&fs.mnt, Some(CloneMethod::SparseCopy), RAW).await;
}

#[tokio::test]
async fn suite_passes_on_xfs_with_forced_qcow2_overlay() {
    let fs = LoopMount::xfs_reflink();
    run_suite(&fs.mnt, Some(CloneMethod::Qcow2Overlay), QCOW2_THEN_RAW).await;
}

// ------------------------------------------------------------------ clone method choice

#[tokio::test]
async fn xfs_prefers_a_reflink_even_when_qcow2_is_accepted() {
    let fs = LoopMount::xfs_reflink();
    let (storage, image) = storage_in(&fs.mnt, None);
    assert_eq!(storage.capabilities().clone_method, CloneMethod::Reflink);
    let base = storage.import_image(&image).await.unwrap();

    let root = storage
        .clone_root(VmId::generate(), &base, QCOW2_THEN_RAW)
        .await
        .unwrap();

    assert_eq!(root.format, DiskFormat::Raw);
    assert_eq!(root.path.extension().unwrap(), "raw");
}

#[tokio::test]
async fn reflink_clone_shares_the_base_extents() {
    let fs = LoopMount::xfs_reflink();
    let (storage, image) = storage_in(&fs.mnt, Some(CloneMethod::Reflink));
    let base = storage.import_image(&image).await.unwrap();

    let root = storage
        .clone_root(VmId::generate(), &base, RAW)
        .await
        .unwrap();

    let frag = sh("filefrag", &["-v", root.path.to_str().unwrap()]);
    assert!(
        frag.contains("shared"),
        "extents of a reflink clone are shared:\n{frag}"
    );
    assert_eq!(
        fs::read(&root.path).unwrap(),
        fs::read(&image.rootfs).unwrap()
    );
}

#[tokio::test]
async fn ext4_without_reflinks_overlays_with_qcow2_when_accepted() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), None);
    assert!(!storage.reflink_supported());
    assert_eq!(
        storage.capabilities().clone_method,
        CloneMethod::Qcow2Overlay
    );
    let base = storage.import_image(&image).await.unwrap();

    let root = storage
        .clone_root(VmId::generate(), &base, QCOW2_THEN_RAW)
        .await
        .unwrap();

    assert_eq!(root.format, DiskFormat::Qcow2);
    assert_eq!(
        root.path,
        vm_dir(&storage).join(format!("{}.qcow2", root.id))
    );
}

#[tokio::test]
async fn ext4_raw_only_clones_are_sparse_copies_with_the_base_content() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), None);
    let base = storage.import_image(&image).await.unwrap();

    let root = storage
        .clone_root(VmId::generate(), &base, RAW)
        .await
        .unwrap();

    let meta = fs::metadata(&root.path).unwrap();
    assert_eq!(root.format, DiskFormat::Raw);
    assert_eq!(meta.len(), fs::metadata(&image.rootfs).unwrap().len());
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "a sparse copy keeps holes ({} blocks)",
        meta.blocks()
    );
    assert_eq!(
        fs::read(&root.path).unwrap(),
        fs::read(&image.rootfs).unwrap()
    );
}

#[tokio::test]
async fn forced_reflink_on_ext4_is_unsupported() {
    let fs = Ext4::new();

    let err = FileStorage::with_config(
        FileStorageConfig::new(fs.path().join("volumes")).clone_method(CloneMethod::Reflink),
    )
    .unwrap_err();

    assert!(matches!(err, StorageError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("reflink=1"), "{err}");
}

#[tokio::test]
async fn forced_qcow2_overlay_with_a_raw_only_hypervisor_is_no_format() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), Some(CloneMethod::Qcow2Overlay));
    let base = storage.import_image(&image).await.unwrap();

    let err = storage
        .clone_root(VmId::generate(), &base, RAW)
        .await
        .unwrap_err();

    assert!(matches!(err, StorageError::NoFormat(_)), "{err}");
}

// ------------------------------------------------------------------ qcow2 overlays

#[tokio::test]
async fn qcow2_overlay_backing_file_is_exactly_the_base_path_in_raw_format() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), Some(CloneMethod::Qcow2Overlay));
    let base = storage.import_image(&image).await.unwrap();

    let root = storage
        .clone_root(VmId::generate(), &base, QCOW2_THEN_RAW)
        .await
        .unwrap();

    let info: serde_json::Value = serde_json::from_str(&sh(
        "qemu-img",
        &["info", "--output=json", root.path.to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"], base.path.to_str().unwrap());
    assert_eq!(info["full-backing-filename"], base.path.to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], base.size_bytes);
    assert!(base.path.is_absolute());
    assert_eq!(
        fs::metadata(&base.path).unwrap().permissions().mode() & 0o777,
        0o444
    );
}

#[tokio::test]
async fn copy_of_a_qcow2_root_is_an_overlay_on_the_same_base() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), Some(CloneMethod::Qcow2Overlay));
    let base = storage.import_image(&image).await.unwrap();
    let root = storage
        .clone_root(VmId::generate(), &base, QCOW2_THEN_RAW)
        .await
        .unwrap();

    let copy = storage.copy_volume(&root, VmId::generate()).await.unwrap();

    assert_eq!(
        copy.path,
        vm_dir(&storage).join(format!("{}.qcow2", copy.id))
    );
    let info: serde_json::Value = serde_json::from_str(&sh(
        "qemu-img",
        &["info", "--output=json", copy.path.to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["full-backing-filename"], base.path.to_str().unwrap());
    assert_eq!(info["virtual-size"], base.size_bytes);
}

#[tokio::test]
async fn copy_on_xfs_shares_the_source_extents() {
    let fs = LoopMount::xfs_reflink();
    let (storage, _image) = storage_in(&fs.mnt, None);
    let data = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap();

    let copy = storage.copy_volume(&data, VmId::generate()).await.unwrap();

    let frag = sh("filefrag", &["-v", copy.path.to_str().unwrap()]);
    assert!(
        frag.contains("shared"),
        "extents of a reflink copy are shared:\n{frag}"
    );
    assert_eq!(fs::read(&copy.path).unwrap(), fs::read(&data.path).unwrap());
}

/// The size of the ext4 filesystem in `path`, from its superblock (`dumpe2fs -h`).
fn ext4_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in dumpe2fs output: {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    field("Block count:") * field("Block size:")
}

/// The host grows the volume and never reads or writes the filesystem in it: the
/// guest wrote it, and the guest grows it.
#[tokio::test]
async fn a_grown_data_volume_is_enlarged_and_its_filesystem_left_to_the_guest() {
    let fs = Ext4::new();
    let (storage, _image) = storage_in(fs.path(), None);
    let data = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap();
    assert_eq!(ext4_bytes(&data.path), 64 << 20);
    let before = fs::read(&data.path).unwrap();

    let grown = storage.resize(&data, 192 << 20).await.unwrap();

    assert_eq!(fs::metadata(&grown.path).unwrap().len(), 192 << 20);
    let after = fs::read(&grown.path).unwrap();
    assert!(
        after[..before.len()] == before[..] && after[before.len()..].iter().all(|b| *b == 0),
        "the host changed no byte of the filesystem"
    );
    assert_eq!(ext4_bytes(&grown.path), 64 << 20, "the guest grows it");
}

#[tokio::test]
async fn copy_on_ext4_is_sparse() {
    let fs = Ext4::new();
    let (storage, _image) = storage_in(fs.path(), None);
    let data = storage
        .create_data(VmId::generate(), 256 << 20)
        .await
        .unwrap();

    let copy = storage.copy_volume(&data, VmId::generate()).await.unwrap();

    let meta = fs::metadata(&copy.path).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert!(
        meta.blocks() * 512 < meta.len() / 4,
        "a sparse copy keeps holes ({} blocks)",
        meta.blocks()
    );
    assert_eq!(fs::read(&copy.path).unwrap(), fs::read(&data.path).unwrap());
    let mut expected = vec![format!("{}.raw", copy.id), format!("{}.raw", data.id)];
    expected.sort();
    assert_eq!(
        entries(&vm_dir(&storage)),
        expected,
        "no temporary file is left"
    );
}

#[tokio::test]
async fn release_moves_the_file_into_a_private_kept_directory() {
    let fs = Ext4::new();
    let (storage, _image) = storage_in(fs.path(), None);
    let data = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap();
    let inode = fs::metadata(&data.path).unwrap().ino();

    let kept = storage.release(&data).await.unwrap();

    let kept_dir = storage.root().join("kept");
    assert_eq!(kept.parent(), Some(kept_dir.as_path()));
    let name = kept.file_name().unwrap().to_str().unwrap();
    let secs = name
        .strip_prefix(&format!("{}-", data.id))
        .and_then(|rest| rest.strip_suffix(".raw"))
        .unwrap_or_else(|| panic!("{name} is not <id>-<secs>.raw"));
    assert!(
        secs.parse::<u64>().is_ok(),
        "{name} names the time in seconds"
    );
    assert_eq!(
        fs::metadata(&kept).unwrap().ino(),
        inode,
        "the same file, moved"
    );
    assert_eq!(
        fs::metadata(&kept_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(entries(&vm_dir(&storage)), Vec::<String>::new());
}

#[tokio::test]
async fn release_through_a_symlinked_kept_directory_is_refused() {
    let fs = Ext4::new();
    let (storage, _image) = storage_in(fs.path(), None);
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), storage.root().join("kept")).unwrap();
    let data = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap();

    let err = storage.release(&data).await.unwrap_err();

    assert!(matches!(err, StorageError::Refused(_)), "{err}");
    assert!(data.path.exists(), "the volume stays where it was");
    assert_eq!(entries(elsewhere.path()), Vec::<String>::new());
}

#[tokio::test]
async fn qcow2_root_grows_and_lists_its_virtual_size() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), Some(CloneMethod::Qcow2Overlay));
    let base = storage.import_image(&image).await.unwrap();
    let root = storage
        .clone_root(VmId::generate(), &base, QCOW2_THEN_RAW)
        .await
        .unwrap();

    let grown = storage.resize(&root, 2 * root.size_bytes).await.unwrap();

    assert_eq!(grown.size_bytes, 2 * base.size_bytes);
    assert_eq!(storage.list().await.unwrap(), vec![grown.clone()]);
    assert!(matches!(
        storage.resize(&grown, base.size_bytes).await,
        Err(StorageError::Shrink { .. })
    ));
}

#[tokio::test]
async fn missing_qemu_img_error_says_to_install_qemu_utils() {
    let fs = Ext4::new();
    let storage = FileStorage::with_config(
        FileStorageConfig::new(fs.path().join("volumes")).qemu_img("/nonexistent/qemu-img"),
    )
    .unwrap();
    let base = storage.import_image(&make_image(fs.path())).await.unwrap();

    let err = storage
        .clone_root(VmId::generate(), &base, &[DiskFormat::Qcow2])
        .await
        .unwrap_err();

    assert!(err.to_string().contains("qemu-utils"), "{err}");
    assert_eq!(
        entries(&vm_dir(&storage)),
        Vec::<String>::new(),
        "no temporary file is left"
    );
}

// ------------------------------------------------------------------ base images and data volumes

#[tokio::test]
async fn base_image_is_imported_once_read_only() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), None);

    let base = storage.import_image(&image).await.unwrap();
    let inode = fs::metadata(&base.path).unwrap().ino();
    let again = storage.import_image(&image).await.unwrap();

    assert_eq!(base, again);
    assert_eq!(
        fs::metadata(&again.path).unwrap().ino(),
        inode,
        "not rewritten"
    );
    assert_eq!(
        base.path,
        storage
            .root()
            .join("base")
            .join(format!("{}.raw", image.digest))
    );
    assert_eq!(
        fs::read(&base.path).unwrap(),
        fs::read(&image.rootfs).unwrap()
    );
    assert_eq!(
        fs::metadata(&base.path).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert_eq!(
        storage.list().await.unwrap(),
        vec![],
        "bases are not listed"
    );
}

#[tokio::test]
async fn directories_are_traverse_only_so_no_vmm_uid_lists_them() {
    let fs = Ext4::new();
    let root = fs.path().join("data/volumes");
    fs::create_dir_all(root.join("vm")).unwrap();
    fs::set_permissions(root.join("vm"), fs::Permissions::from_mode(0o755)).unwrap();

    let storage = FileStorage::new(&root).unwrap();

    for dir in [
        storage.root().to_path_buf(),
        storage.root().join("base"),
        vm_dir(&storage),
    ] {
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o711,
            "{}",
            dir.display()
        );
    }
}

#[tokio::test]
async fn data_volume_is_a_sparse_ext4_labelled_vmkit_data() {
    let fs = Ext4::new();
    let (storage, _) = storage_in(fs.path(), None);
    let vm = VmId::generate();

    let data = storage.create_data(vm, 256 << 20).await.unwrap();

    assert_eq!(data.path, vm_dir(&storage).join(format!("data-{vm}.raw")));
    assert_eq!(data.format, DiskFormat::Raw);
    let bytes = fs::read(&data.path).unwrap();
    assert_eq!(bytes.len(), 256 << 20);
    assert_eq!(
        &bytes[1024 + 0x38..1024 + 0x3a],
        &[0x53, 0xef],
        "ext4 superblock magic"
    );
    assert_eq!(
        &bytes[1024 + 0x78..1024 + 0x78 + 10],
        b"vmkit-data",
        "volume label"
    );
    let meta = fs::metadata(&data.path).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() / 4,
        "the data volume is sparse"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn failed_mkfs_leaves_no_file_behind() {
    let fs = Ext4::new();
    let storage = FileStorage::with_config(
        FileStorageConfig::new(fs.path().join("volumes")).mkfs_ext4("false"),
    )
    .unwrap();

    let err = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap_err();

    assert!(matches!(err, StorageError::Command { .. }), "{err}");
    assert_eq!(entries(&vm_dir(&storage)), Vec::<String>::new());
}

#[tokio::test]
async fn delete_leaves_no_file_behind() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), None);
    let base = storage.import_image(&image).await.unwrap();
    let vm = VmId::generate();
    let raw = storage.clone_root(vm, &base, RAW).await.unwrap();
    let data = storage.create_data(vm, 64 << 20).await.unwrap();
    let other = storage
        .clone_root(VmId::generate(), &base, &[DiskFormat::Qcow2])
        .await
        .unwrap();

    for v in [&raw, &data, &other] {
        storage.delete(v).await.unwrap();
        storage.delete(v).await.unwrap();
    }

    assert_eq!(entries(&vm_dir(&storage)), Vec::<String>::new());
    assert!(base.path.exists(), "the base stays");
}

// ------------------------------------------------------------------ paths and links

#[tokio::test]
async fn symlink_planted_in_place_of_a_root_volume_is_refused() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), None);
    let base = storage.import_image(&image).await.unwrap();
    let outside = fs.path().join("outside.txt");
    fs::write(&outside, b"not a volume").unwrap();
    let vm = VmId::generate();
    let link = vm_dir(&storage).join(format!("root-{vm}.raw"));
    std::os::unix::fs::symlink(&outside, &link).unwrap();

    let err = storage.clone_root(vm, &base, RAW).await.unwrap_err();

    assert!(matches!(err, StorageError::Refused(_)), "{err}");
    assert_eq!(fs::read(&outside).unwrap(), b"not a volume");
    assert_eq!(
        storage.list().await.unwrap(),
        vec![],
        "a link is not listed"
    );
}

#[tokio::test]
async fn symlink_swapped_in_for_a_volume_is_not_followed() {
    let fs = Ext4::new();
    let (storage, _) = storage_in(fs.path(), None);
    let data = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap();
    let outside = fs.path().join("outside.txt");
    fs::write(&outside, b"not a volume").unwrap();
    fs::remove_file(&data.path).unwrap();
    std::os::unix::fs::symlink(&outside, &data.path).unwrap();

    let resized = storage.resize(&data, 128 << 20).await;
    let created = storage.create_data(data.vm, 64 << 20).await;
    let listed = storage.list().await.unwrap();
    storage.delete(&data).await.unwrap();

    assert!(
        matches!(resized, Err(StorageError::Refused(_))),
        "{resized:?}"
    );
    assert!(
        matches!(created, Err(StorageError::Refused(_))),
        "{created:?}"
    );
    assert_eq!(listed, vec![]);
    assert_eq!(
        fs::read(&outside).unwrap(),
        b"not a volume",
        "the target is untouched"
    );
    assert!(
        fs::symlink_metadata(&data.path).is_err(),
        "delete removed the link itself"
    );
}

#[tokio::test]
async fn symlinked_volume_directory_is_refused() {
    let fs = Ext4::new();
    let root = fs.path().join("volumes");
    let elsewhere = fs.path().join("elsewhere");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("vm")).unwrap();

    let err = FileStorage::new(&root).unwrap_err();

    assert!(matches!(err, StorageError::Refused(_)), "{err}");
}

#[tokio::test]
async fn volumes_outside_the_naming_scheme_are_refused() {
    let fs = Ext4::new();
    let (storage, _) = storage_in(fs.path(), None);
    let data = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap();
    let mut traversal = data.clone();
    traversal.id = "../../etc/passwd".into();
    let mut elsewhere = data.clone();
    elsewhere.path = fs.path().join("outside.raw");
    let mut wrong_kind = data.clone();
    wrong_kind.kind = VolumeKind::Root;

    for v in [&traversal, &elsewhere, &wrong_kind] {
        assert!(
            matches!(storage.delete(v).await, Err(StorageError::Refused(_))),
            "{v:?}"
        );
        assert!(
            matches!(
                storage.resize(v, 1 << 30).await,
                Err(StorageError::Refused(_))
            ),
            "{v:?}"
        );
    }
    assert!(data.path.exists());
}

#[tokio::test]
async fn digests_that_could_leave_the_base_directory_are_refused() {
    let fs = Ext4::new();
    let (storage, mut image) = storage_in(fs.path(), None);
    image.digest = "../../escape".into();

    let err = storage.import_image(&image).await.unwrap_err();

    assert!(matches!(err, StorageError::Refused(_)), "{err}");
}

#[tokio::test]
async fn list_parses_ids_back_and_ignores_unknown_files() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), None);
    let base = storage.import_image(&image).await.unwrap();
    let vm = VmId::generate();
    let root = storage.clone_root(vm, &base, RAW).await.unwrap();
    let data = storage.create_data(vm, 64 << 20).await.unwrap();
    let dir = vm_dir(&storage);
    for junk in [
        "notes.txt",
        "root-XYZ.raw",
        "root-0123.raw",
        "data-0123456789abcdef.qcow2",
        "root-0123456789ABCDEF.raw",
    ] {
        fs::write(dir.join(junk), b"junk").unwrap();
    }
    fs::create_dir(dir.join("root-0123456789abcdef.raw")).unwrap();

    let mut expected = vec![root, data];
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(storage.list().await.unwrap(), expected);
    assert_eq!(expected[0].vm, vm);
    assert_eq!(
        expected.iter().map(|v| v.id.clone()).collect::<Vec<_>>(),
        vec![
            Volume::id_for(vm, VolumeKind::Data),
            Volume::id_for(vm, VolumeKind::Root),
        ]
    );
}

#[tokio::test]
async fn clone_from_a_base_that_was_never_imported_is_no_base_image() {
    let fs = Ext4::new();
    let (storage, image) = storage_in(fs.path(), None);
    let base = storage.import_image(&image).await.unwrap();
    fs::remove_file(&base.path).unwrap();

    let err = storage
        .clone_root(VmId::generate(), &base, RAW)
        .await
        .unwrap_err();

    assert!(matches!(err, StorageError::NoBaseImage(_)), "{err}");
}

#[tokio::test]
async fn leftover_temporary_files_of_dead_processes_are_removed_on_open() {
    let fs = Ext4::new();
    let (storage, _) = storage_in(fs.path(), None);
    // Above the kernel's largest pid (4194304): no such process.
    let leftover = vm_dir(&storage).join(".tmp-root-0123456789abcdef-999999999-0.raw");
    let in_flight = vm_dir(&storage).join(format!(
        ".tmp-root-fedcba9876543210-{}-7.raw",
        std::process::id()
    ));
    fs::write(&leftover, b"half written").unwrap();
    fs::write(&in_flight, b"being written").unwrap();

    let reopened = FileStorage::new(storage.root()).unwrap();

    assert!(!leftover.exists(), "a dead writer's file is removed");
    assert!(in_flight.exists(), "a live writer's file is kept");
    assert_eq!(reopened.list().await.unwrap(), vec![]);
}
