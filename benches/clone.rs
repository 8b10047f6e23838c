//! Root volume clone time of `FileStorage`, per clone method, for a 1 GiB and an
//! 8 GiB sparse base image holding the same 16 MiB of data: if a method is O(1)
//! in the image size, the two times are about equal.
//!
//! - sparse copy and qcow2 overlay on the default temporary directory (ext4 on
//!   the development host);
//! - reflink on an XFS (`mkfs.xfs -m reflink=1`) made in a file and loop-mounted
//!   for the run, unmounted and removed afterwards. Mounting needs root.
//!
//! Each measured iteration is one `clone_root`; the clone is deleted outside the
//! measured time. Run with:
//!
//! ```text
//! cargo bench -p vmkit-benches --bench clone
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tempfile::TempDir;
use vmkit_core::{BaseImage, CloneMethod, DiskFormat, Image, Storage, VmId};
use vmkit_store::{FileStorage, FileStorageConfig};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Data written into each base image: 16 pieces of 1 MiB spread over the image.
const PIECES: u64 = 16;

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An XFS with reflinks in a loop-mounted file; unmounted on drop.
struct XfsMount {
    mnt: PathBuf,
    _dir: TempDir,
}

impl XfsMount {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the clone bench mounts an XFS loop filesystem for reflinks: run it as root"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("xfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let image_s = image.to_str().expect("utf-8 temp path");
        sh("truncate", &["-s", "4G", image_s]);
        sh("mkfs.xfs", &["-q", "-m", "reflink=1", image_s]);
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
}

impl Drop for XfsMount {
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

/// A sparse image of `size` bytes with [`PIECES`] MiB of data spread over it.
fn sparse_image(dir: &Path, size: u64) -> Image {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!("base-{}g.raw", size / GIB));
    let file = std::fs::File::create(&path).expect("create base image");
    file.set_len(size).expect("size base image");
    let piece: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    for i in 0..PIECES {
        file.write_all_at(&piece, i * (size / PIECES))
            .expect("write base image");
    }
    file.sync_all().expect("sync base image");
    let mut image = Image::synthetic(&format!("bench-{}g", size / GIB));
    image.digest = format!("bench{}g", size / GIB);
    image.rootfs = path;
    image
}

struct Case {
    label: &'static str,
    storage: FileStorage,
    formats: &'static [DiskFormat],
    bases: Vec<(u64, BaseImage)>,
}

fn case(
    rt: &tokio::runtime::Runtime,
    label: &'static str,
    dir: &Path,
    method: CloneMethod,
    formats: &'static [DiskFormat],
) -> Case {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let storage = FileStorage::with_config(
        FileStorageConfig::new(dir.join(format!("volumes-{label}"))).clone_method(method),
    )
    .expect("open file storage");
    let bases = [GIB, 8 * GIB]
        .into_iter()
        .map(|size| {
            let image = sparse_image(&images, size);
            let base = rt.block_on(storage.import_image(&image)).expect("import");
            (size, base)
        })
        .collect();
    Case {
        label,
        storage,
        formats,
        bases,
    }
}

fn clone_root(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let tmp = tempfile::tempdir().expect("temp dir");
    let xfs = XfsMount::new();
    let cases = [
        case(
            &rt,
            "ext4-sparse-copy",
            tmp.path(),
            CloneMethod::SparseCopy,
            &[DiskFormat::Raw],
        ),
        case(
            &rt,
            "ext4-qcow2-overlay",
            tmp.path(),
            CloneMethod::Qcow2Overlay,
            &[DiskFormat::Qcow2],
        ),
        case(
            &rt,
            "xfs-reflink",
            &xfs.mnt,
            CloneMethod::Reflink,
            &[DiskFormat::Raw],
        ),
    ];

    let mut group = c.benchmark_group("clone_root");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for case in &cases {
        for (size, base) in &case.bases {
            let id = BenchmarkId::new(case.label, format!("{}GiB", size / GIB));
            group.bench_function(id, |b| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut measured = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let volume = case
                            .storage
                            .clone_root(VmId::generate(), base, case.formats)
                            .await
                            .expect("clone");
                        measured += start.elapsed();
                        case.storage.delete(&volume).await.expect("delete");
                    }
                    measured
                });
            });
        }
    }
    group.finish();
    drop(cases);
    drop(xfs);
}

criterion_group!(benches, clone_root);
criterion_main!(benches);
