//! LvmStorage through its command seam: the generic storage suite on a fake that
//! simulates lvm2 (state, rounding to extents, exit codes and messages, and the
//! JSON report in lvm2's own layout), the exact command lines of each operation,
//! and parsing of real lvm2 output (`tests/data/lvm/`, see its README).
//!
//! Nothing here runs lvm2: the machine these tests were written on has no
//! device-mapper.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tempfile::TempDir;
use vmkit_core::testing::suites::{StorageFixture, storage_suite};
use vmkit_core::{
    BaseImage, CloneMethod, DiskFormat, Image, Storage, StorageError, VmId, Volume, VolumeKind,
};
use vmkit_store::{CommandOutput, LvmConfig, LvmRunner, LvmStorage};

const EXTENT: u64 = 4 << 20;
const LVS: &str = "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,pool_lv,origin,lv_attr vg0";

// ------------------------------------------------------------------ simulated lvm2

#[derive(Clone, Debug)]
struct Lv {
    size: u64,
    pool: String,
    origin: String,
    thin_pool: bool,
    writable: bool,
    active: bool,
    skip: bool,
    /// Bytes written to the volume's device, by offset; the rest reads as zero.
    data: BTreeMap<u64, u8>,
}

#[derive(Debug, Default)]
struct Sim {
    vg: String,
    lvs: BTreeMap<String, Lv>,
    log: Vec<String>,
    /// Programs whose next run fails, with the message it prints.
    fail: BTreeMap<String, String>,
}

/// A complete fake of the lvm2 tools for one volume group with 4 MiB extents:
/// it keeps the volumes, answers `lvs` in lvm2's JSON layout, rounds sizes up to
/// whole extents, and fails the way lvm2 does (exit 5 and lvm2's messages).
/// Every command line is recorded.
#[derive(Clone, Default)]
struct FakeLvm(Arc<Mutex<Sim>>);

impl fmt::Debug for FakeLvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FakeLvm")
    }
}

fn ok() -> CommandOutput {
    CommandOutput::ok("")
}

fn lvm_err(msg: String) -> CommandOutput {
    CommandOutput::new(Some(5), "", format!("  {msg}\n"))
}

fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(EXTENT) * EXTENT
}

/// `<n>b` to bytes.
fn bytes(arg: &str) -> u64 {
    arg.strip_suffix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("size {arg:?} is not <bytes>b"))
}

impl FakeLvm {
    /// A volume group `vg0` with a 100 GiB thin pool `pool0`.
    fn new() -> Self {
        let fake = Self::default();
        {
            let mut s = fake.lock();
            s.vg = "vg0".into();
            s.lvs.insert(
                "pool0".into(),
                Lv {
                    size: 100 << 30,
                    pool: String::new(),
                    origin: String::new(),
                    thin_pool: true,
                    writable: true,
                    active: true,
                    skip: false,
                    data: BTreeMap::new(),
                },
            );
        }
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sim> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Command lines run so far, and forgets them.
    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }

    fn fail_next(&self, program: &str, message: &str) {
        self.lock().fail.insert(program.into(), message.into());
    }

    fn lv(&self, name: &str) -> Option<Lv> {
        self.lock().lvs.get(name).cloned()
    }

    fn insert_thin(&self, name: &str, size: u64, writable: bool) {
        self.lock().lvs.insert(
            name.into(),
            Lv {
                size,
                pool: "pool0".into(),
                origin: String::new(),
                thin_pool: false,
                writable,
                active: true,
                skip: false,
                data: BTreeMap::new(),
            },
        );
    }

    fn remove_pool(&self) {
        self.lock().lvs.remove("pool0");
    }

    /// The active volume whose device node is `dev`, as a guest writing it needs.
    fn device<'a>(s: &'a mut Sim, dev: &Path) -> &'a mut Lv {
        let dev = dev.to_str().unwrap();
        let name = s
            .dev_lv(dev)
            .unwrap_or_else(|| panic!("{dev} is not in /dev/vg0"))
            .to_owned();
        let lv = s
            .lvs
            .get_mut(&name)
            .unwrap_or_else(|| panic!("{dev}: no such volume"));
        assert!(lv.active, "{dev} is not active");
        lv
    }

    /// Writes `bytes` at `offset` of the device `dev`.
    fn write(&self, dev: &Path, offset: u64, bytes: &[u8]) {
        let mut s = self.lock();
        let lv = Self::device(&mut s, dev);
        assert!(lv.writable, "{} is read-only", dev.display());
        assert!(offset + bytes.len() as u64 <= lv.size, "write past the end");
        for (i, b) in bytes.iter().enumerate() {
            lv.data.insert(offset + i as u64, *b);
        }
    }

    /// Reads `len` bytes at `offset` of the device `dev`.
    fn read(&self, dev: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut s = self.lock();
        let lv = Self::device(&mut s, dev);
        assert!(offset + len as u64 <= lv.size, "read past the end");
        (offset..offset + len as u64)
            .map(|o| lv.data.get(&o).copied().unwrap_or(0))
            .collect()
    }
}

impl Sim {
    /// `<vg>/<lv>` to the LV name, if the VG is ours.
    fn lv_name<'a>(&self, lv_ref: &'a str) -> Option<&'a str> {
        lv_ref.strip_prefix(&format!("{}/", self.vg))
    }

    fn dev_lv<'a>(&self, dev: &'a str) -> Option<&'a str> {
        dev.strip_prefix(&format!("/dev/{}/", self.vg))
    }

    fn attr(lv: &Lv) -> String {
        let kind = if lv.thin_pool { 't' } else { 'V' };
        let perm = if lv.writable { 'w' } else { 'r' };
        let state = if lv.active { 'a' } else { '-' };
        let open = if lv.thin_pool && lv.active { 'o' } else { '-' };
        let skip = if lv.skip { 'k' } else { '-' };
        format!("{kind}{perm}i-{state}{open}tz-{skip}")
    }

    /// The report, laid out as lvm2 2.03 prints it.
    fn report(&self, fields: &str) -> String {
        let rows: Vec<String> = self
            .lvs
            .iter()
            .map(|(name, lv)| {
                let cells: Vec<String> = fields
                    .split(',')
                    .map(|f| {
                        let v = match f {
                            "lv_name" => name.clone(),
                            "vg_name" => self.vg.clone(),
                            "lv_size" => lv.size.to_string(),
                            "pool_lv" => lv.pool.clone(),
                            "origin" => lv.origin.clone(),
                            "lv_attr" => Self::attr(lv),
                            other => panic!("the fake does not report {other}"),
                        };
                        format!("\"{f}\":\"{v}\"")
                    })
                    .collect();
                format!("                  {{{}}}", cells.join(", "))
            })
            .collect();
        let body = if rows.is_empty() {
            String::new()
        } else {
            format!("{}\n", rows.join(",\n"))
        };
        format!(
            "  {{\n      \"report\": [\n          {{\n              \"lv\": [\n{body}              ]\n          }}\n      ]\n  }}\n"
        )
    }

    fn run(&mut self, argv: &[&str]) -> CommandOutput {
        if let Some(msg) = self.fail.remove(argv[0]) {
            return CommandOutput::new(Some(1), "", msg);
        }
        match argv {
            [
                "lvs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                fields,
                vg,
            ] => {
                if *vg == self.vg {
                    CommandOutput::ok(self.report(fields))
                } else {
                    CommandOutput::new(
                        Some(5),
                        "",
                        format!(
                            "  Volume group \"{vg}\" not found\n  Cannot process volume group {vg}\n"
                        ),
                    )
                }
            }
            ["lvcreate", "-V", size, "-T", pool_ref, "-n", name] => {
                let Some(pool) = self.lv_name(pool_ref).map(str::to_owned) else {
                    return lvm_err(format!("Volume group \"{pool_ref}\" not found"));
                };
                if !self.lvs.get(&pool).is_some_and(|p| p.thin_pool) {
                    return lvm_err(format!("Thin pool {pool_ref} not found"));
                }
                if self.lvs.contains_key(*name) {
                    return lvm_err(format!(
                        "Logical Volume \"{name}\" already exists in volume group \"{}\"",
                        self.vg
                    ));
                }
                self.lvs.insert(
                    (*name).to_owned(),
                    Lv {
                        size: round_up(bytes(size)),
                        pool,
                        origin: String::new(),
                        thin_pool: false,
                        writable: true,
                        active: true,
                        skip: false,
                        data: BTreeMap::new(),
                    },
                );
                ok()
            }
            [
                "lvcreate",
                "-s",
                "-kn",
                "-ay",
                "-prw",
                "-n",
                name,
                origin_ref,
            ] => {
                let Some(origin) = self
                    .lv_name(origin_ref)
                    .and_then(|o| self.lvs.get(o))
                    .cloned()
                else {
                    return lvm_err(format!("Failed to find logical volume \"{origin_ref}\""));
                };
                if self.lvs.contains_key(*name) {
                    return lvm_err(format!(
                        "Logical Volume \"{name}\" already exists in volume group \"{}\"",
                        self.vg
                    ));
                }
                let origin_name = self.lv_name(origin_ref).unwrap_or_default().to_owned();
                self.lvs.insert(
                    (*name).to_owned(),
                    Lv {
                        origin: origin_name,
                        writable: true,
                        active: true,
                        skip: false,
                        ..origin
                    },
                );
                ok()
            }
            ["lvchange", change @ .., lv_ref] => {
                let Some(name) = self.lv_name(lv_ref).map(str::to_owned) else {
                    return lvm_err(format!("Volume group for \"{lv_ref}\" not found"));
                };
                let Some(lv) = self.lvs.get_mut(&name) else {
                    return lvm_err(format!("Failed to find logical volume \"{lv_ref}\""));
                };
                match change {
                    ["-pr", "-ky"] => {
                        lv.writable = false;
                        lv.skip = true;
                    }
                    ["-an"] => lv.active = false,
                    other => panic!("the fake does not know lvchange {other:?}"),
                }
                ok()
            }
            ["lvextend", "-L", size, lv_ref] => {
                let Some(lv) = self.lv_name(lv_ref).and_then(|n| self.lvs.get_mut(n)) else {
                    return lvm_err(format!("Failed to find logical volume \"{lv_ref}\""));
                };
                let new = round_up(bytes(size));
                if new == lv.size {
                    let extents = new / EXTENT;
                    return lvm_err(format!(
                        "New size ({extents} extents) matches existing size ({extents} extents)."
                    ));
                }
                if new < lv.size {
                    return lvm_err(format!(
                        "New size given ({} extents) not larger than existing size ({} extents)",
                        new / EXTENT,
                        lv.size / EXTENT
                    ));
                }
                lv.size = new;
                ok()
            }
            ["lvrename", lv_ref, new_name] => {
                let Some(old) = self.lv_name(lv_ref).map(str::to_owned) else {
                    return lvm_err(format!("Volume group for \"{lv_ref}\" not found"));
                };
                if self.lvs.contains_key(*new_name) {
                    return lvm_err(format!(
                        "Logical Volume \"{new_name}\" already exists in volume group \"{}\"",
                        self.vg
                    ));
                }
                let Some(lv) = self.lvs.remove(&old) else {
                    return lvm_err(format!(
                        "Existing logical volume \"{old}\" not found in volume group \"{}\"",
                        self.vg
                    ));
                };
                self.lvs.insert((*new_name).to_owned(), lv);
                for other in self.lvs.values_mut() {
                    if other.origin == old {
                        (*new_name).clone_into(&mut other.origin);
                    }
                }
                ok()
            }
            ["lvremove", "-y", lv_ref] => {
                match self.lv_name(lv_ref).and_then(|n| self.lvs.remove(n)) {
                    Some(_) => ok(),
                    None => lvm_err(format!("Failed to find logical volume \"{lv_ref}\"")),
                }
            }
            [
                "dd",
                input,
                output,
                "bs=4M",
                "conv=sparse,fsync",
                "status=none",
            ] => {
                assert!(input.starts_with("if=/"), "dd reads the image: {input}");
                let dev = output.strip_prefix("of=").unwrap_or_default();
                match self.dev_lv(dev).and_then(|n| self.lvs.get(n)) {
                    Some(lv) if lv.active && lv.writable => ok(),
                    _ => CommandOutput::new(
                        Some(1),
                        "",
                        format!("dd: failed to open '{dev}': Permission denied\n"),
                    ),
                }
            }
            ["mkfs.ext4", "-q", "-F", "-L", "vmkit-data", dev] => {
                match self.dev_lv(dev).and_then(|n| self.lvs.get(n)) {
                    Some(lv) if lv.active && lv.writable => ok(),
                    _ => CommandOutput::new(
                        Some(1),
                        "",
                        format!(
                            "mkfs.ext4: No such file or directory while trying to determine filesystem size of {dev}\n"
                        ),
                    ),
                }
            }
            other => panic!("the fake lvm2 does not know {other:?}"),
        }
    }
}

#[async_trait]
impl LvmRunner for FakeLvm {
    async fn run(&self, argv: &[String]) -> io::Result<CommandOutput> {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut s = self.lock();
        s.log.push(argv.join(" "));
        Ok(s.run(&argv))
    }
}

// ------------------------------------------------------------------ canned outputs

/// A runner that answers every command from a table (program → output) and
/// records the command lines; unknown programs cannot be started.
#[derive(Clone, Default)]
struct Canned {
    answers: Arc<BTreeMap<String, CommandOutput>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl fmt::Debug for Canned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Canned")
    }
}

impl Canned {
    fn new(answers: &[(&str, CommandOutput)]) -> Self {
        Self {
            answers: Arc::new(
                answers
                    .iter()
                    .map(|(p, o)| ((*p).to_owned(), o.clone()))
                    .collect(),
            ),
            log: Arc::default(),
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait]
impl LvmRunner for Canned {
    async fn run(&self, argv: &[String]) -> io::Result<CommandOutput> {
        self.log.lock().unwrap().push(argv.join(" "));
        self.answers
            .get(&argv[0])
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

fn sample(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/lvm")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ------------------------------------------------------------------ fixtures

struct Fixture {
    image: Image,
    _dir: TempDir,
}

impl Fixture {
    /// An image whose root filesystem is a 10 MiB file (the fake does not read it).
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs.ext4");
        std::fs::File::create(&rootfs)
            .unwrap()
            .set_len(10 << 20)
            .unwrap();
        let mut image = Image::synthetic("tiny");
        image.digest = "4f9c2e71a0b3d5e6f708192a3b4c5d6e".into();
        image.rootfs = rootfs;
        Self { image, _dir: dir }
    }
}

/// The suite's fixture: the image, and the simulated devices to write and read.
struct SuiteFixture {
    fx: Fixture,
    lvm: FakeLvm,
}

#[async_trait]
impl StorageFixture for SuiteFixture {
    fn image(&self) -> Image {
        self.fx.image.clone()
    }
    async fn write(&self, volume: &Volume, offset: u64, data: &[u8]) {
        self.lvm.write(&volume.path, offset, data);
    }
    async fn read(&self, volume: &Volume, offset: u64, len: usize) -> Vec<u8> {
        self.lvm.read(&volume.path, offset, len)
    }
}

fn storage(runner: Arc<dyn LvmRunner>) -> LvmStorage {
    LvmStorage::with_runner(LvmConfig::new("vg0", "pool0"), runner).unwrap()
}

/// Storage on a fresh fake, with `image` imported and the log cleared.
async fn imported() -> (LvmStorage, FakeLvm, Fixture, BaseImage) {
    let fake = FakeLvm::new();
    let storage = storage(Arc::new(fake.clone()));
    let fx = Fixture::new();
    let base = storage.import_image(&fx.image).await.unwrap();
    fake.take_log();
    (storage, fake, fx, base)
}

fn vm(hex: &str) -> VmId {
    hex.parse().unwrap()
}

// ------------------------------------------------------------------ the generic suite

#[tokio::test]
async fn suite_passes_on_simulated_lvm2() {
    let fake = FakeLvm::new();
    let storage = storage(Arc::new(fake.clone()));
    let fx = SuiteFixture {
        fx: Fixture::new(),
        lvm: fake.clone(),
    };

    storage_suite(&storage, &fx).await;

    let left: Vec<String> = fake
        .lock()
        .lvs
        .keys()
        .filter(|name| !name.starts_with("kept-"))
        .cloned()
        .collect();
    assert_eq!(
        left,
        vec!["base-4f9c2e71a0b3".to_owned(), "pool0".to_owned()],
        "only the base, the pool and the released volumes remain"
    );
}

#[tokio::test]
async fn capabilities_are_thin_snapshots_data_volumes_and_resize() {
    let caps = storage(Arc::new(FakeLvm::new())).capabilities();

    assert_eq!(caps.clone_method, CloneMethod::LvmSnapshot);
    assert!(caps.data_volumes && caps.resize);
}

// ------------------------------------------------------------------ exact command lines

#[tokio::test]
async fn import_creates_writes_seals_and_deactivates_a_thin_base() {
    let fake = FakeLvm::new();
    let storage = storage(Arc::new(fake.clone()));
    let fx = Fixture::new();

    let base = storage.import_image(&fx.image).await.unwrap();

    let rootfs = fx.image.rootfs.display();
    assert_eq!(
        fake.take_log(),
        vec![
            LVS.to_owned(),
            "lvcreate -V 10485760b -T vg0/pool0 -n base-4f9c2e71a0b3".to_owned(),
            format!(
                "dd if={rootfs} of=/dev/vg0/base-4f9c2e71a0b3 bs=4M conv=sparse,fsync status=none"
            ),
            "lvchange -pr -ky vg0/base-4f9c2e71a0b3".to_owned(),
            "lvchange -an vg0/base-4f9c2e71a0b3".to_owned(),
            LVS.to_owned(),
        ]
    );
    assert_eq!(base.path, PathBuf::from("/dev/vg0/base-4f9c2e71a0b3"));
    assert_eq!(
        base.size_bytes,
        12 << 20,
        "the size lvm2 rounded to whole extents"
    );
    assert_eq!(base.digest, fx.image.digest);
}

#[tokio::test]
async fn import_of_an_imported_image_only_looks() {
    let (storage, fake, fx, base) = imported().await;

    let again = storage.import_image(&fx.image).await.unwrap();

    assert_eq!(again, base);
    assert_eq!(fake.take_log(), vec![LVS.to_owned()]);
}

#[tokio::test]
async fn unfinished_base_is_removed_and_imported_again() {
    let fake = FakeLvm::new();
    fake.insert_thin("base-4f9c2e71a0b3", 12 << 20, true);
    let storage = storage(Arc::new(fake.clone()));
    let fx = Fixture::new();

    storage.import_image(&fx.image).await.unwrap();

    let log = fake.take_log();
    assert_eq!(
        log[..3],
        [
            LVS.to_owned(),
            "lvremove -y vg0/base-4f9c2e71a0b3".to_owned(),
            "lvcreate -V 10485760b -T vg0/pool0 -n base-4f9c2e71a0b3".to_owned(),
        ]
    );
    assert!(!fake.lv("base-4f9c2e71a0b3").unwrap().writable);
}

#[tokio::test]
async fn failed_write_of_a_base_removes_it() {
    let fake = FakeLvm::new();
    fake.fail_next(
        "dd",
        "dd: error writing '/dev/vg0/base-4f9c2e71a0b3': No space left on device\n",
    );
    let storage = storage(Arc::new(fake.clone()));
    let fx = Fixture::new();

    let err = storage.import_image(&fx.image).await.unwrap_err();

    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(
        fake.take_log().last().unwrap(),
        "lvremove -y vg0/base-4f9c2e71a0b3"
    );
    assert!(fake.lv("base-4f9c2e71a0b3").is_none());
}

#[tokio::test]
async fn clone_root_is_an_active_thin_snapshot_of_the_base() {
    let (storage, fake, _fx, base) = imported().await;
    let id = vm("8a3f5e2d1c0b9a87");

    let root = storage
        .clone_root(id, &base, &[DiskFormat::Raw])
        .await
        .unwrap();

    assert_eq!(
        fake.take_log(),
        vec![
            LVS.to_owned(),
            "lvcreate -s -kn -ay -prw -n root-8a3f5e2d1c0b9a87 vg0/base-4f9c2e71a0b3".to_owned(),
            LVS.to_owned(),
        ]
    );
    assert_eq!(root.path, PathBuf::from("/dev/vg0/root-8a3f5e2d1c0b9a87"));
    assert_eq!(
        (root.kind, root.format, root.size_bytes),
        (VolumeKind::Root, DiskFormat::Raw, base.size_bytes)
    );
    assert_eq!(
        fake.lv("root-8a3f5e2d1c0b9a87").unwrap().origin,
        "base-4f9c2e71a0b3"
    );
}

#[tokio::test]
async fn qcow2_only_hypervisor_gets_no_format_and_no_command_runs() {
    let (storage, fake, _fx, base) = imported().await;

    let err = storage
        .clone_root(VmId::generate(), &base, &[DiskFormat::Qcow2])
        .await
        .unwrap_err();

    assert!(matches!(err, StorageError::NoFormat(_)), "{err}");
    assert_eq!(fake.take_log(), Vec::<String>::new());
}

#[tokio::test]
async fn clone_from_a_base_elsewhere_is_refused() {
    let (storage, fake, _fx, mut base) = imported().await;
    base.path = PathBuf::from("/dev/othervg/base-4f9c2e71a0b3");

    let err = storage
        .clone_root(VmId::generate(), &base, &[DiskFormat::Raw])
        .await
        .unwrap_err();

    assert!(matches!(err, StorageError::Refused(_)), "{err}");
    assert_eq!(fake.take_log(), Vec::<String>::new());
}

#[tokio::test]
async fn create_data_makes_a_thin_volume_and_formats_it() {
    let (storage, fake, _fx, _base) = imported().await;

    let data = storage
        .create_data(vm("c1d2e3f4a5b6c7d8"), 10 << 30)
        .await
        .unwrap();

    assert_eq!(
        fake.take_log(),
        vec![
            LVS.to_owned(),
            "lvcreate -V 10737418240b -T vg0/pool0 -n data-c1d2e3f4a5b6c7d8".to_owned(),
            "mkfs.ext4 -q -F -L vmkit-data /dev/vg0/data-c1d2e3f4a5b6c7d8".to_owned(),
            LVS.to_owned(),
        ]
    );
    assert_eq!(data.path, PathBuf::from("/dev/vg0/data-c1d2e3f4a5b6c7d8"));
    assert_eq!(
        (data.kind, data.format, data.size_bytes),
        (VolumeKind::Data, DiskFormat::Raw, 10 << 30)
    );
}

#[tokio::test]
async fn failed_mkfs_removes_the_data_volume() {
    let (storage, fake, _fx, _base) = imported().await;
    fake.fail_next("mkfs.ext4", "mkfs.ext4: Device size reported to be zero.\n");

    let err = storage
        .create_data(vm("c1d2e3f4a5b6c7d8"), 64 << 20)
        .await
        .unwrap_err();

    assert!(matches!(err, StorageError::Command { .. }), "{err}");
    assert_eq!(
        fake.take_log().last().unwrap(),
        "lvremove -y vg0/data-c1d2e3f4a5b6c7d8"
    );
    assert!(fake.lv("data-c1d2e3f4a5b6c7d8").is_none());
}

#[tokio::test]
async fn resize_extends_with_lvextend_in_bytes_and_leaves_the_filesystem_to_the_guest() {
    let (storage, fake, _fx, _base) = imported().await;
    let data = storage
        .create_data(vm("c1d2e3f4a5b6c7d8"), 64 << 20)
        .await
        .unwrap();
    fake.take_log();

    let grown = storage.resize(&data, 1 << 30).await.unwrap();

    assert_eq!(
        fake.take_log(),
        vec![
            LVS.to_owned(),
            "lvextend -L 1073741824b vg0/data-c1d2e3f4a5b6c7d8".to_owned(),
            LVS.to_owned(),
        ],
        "no e2fsck or resize2fs on the host: the filesystem is the guest's"
    );
    assert_eq!(grown.size_bytes, 1 << 30);
}

#[tokio::test]
async fn resize_to_the_same_size_or_less_runs_no_lvextend() {
    let (storage, fake, _fx, _base) = imported().await;
    let data = storage
        .create_data(vm("c1d2e3f4a5b6c7d8"), 64 << 20)
        .await
        .unwrap();
    fake.take_log();

    let same = storage.resize(&data, 64 << 20).await.unwrap();
    let shrink = storage.resize(&data, 32 << 20).await;

    assert_eq!(same, data);
    assert!(
        matches!(shrink, Err(StorageError::Shrink { current, requested, .. }) if current == 64 << 20 && requested == 32 << 20)
    );
    assert!(fake.take_log().iter().all(|c| c.starts_with("lvs ")));
}

#[tokio::test]
async fn resize_reports_the_size_lvm2_rounded_up_to() {
    let (storage, _fake, _fx, _base) = imported().await;
    let data = storage
        .create_data(vm("c1d2e3f4a5b6c7d8"), 64 << 20)
        .await
        .unwrap();

    let grown = storage.resize(&data, (64 << 20) + 1).await.unwrap();

    assert_eq!(grown.size_bytes, 68 << 20, "one 4 MiB extent more");
    assert_eq!(storage.list().await.unwrap(), vec![grown]);
}

#[tokio::test]
async fn delete_removes_with_lvremove_and_a_missing_volume_is_success() {
    let (storage, fake, _fx, base) = imported().await;
    let root = storage
        .clone_root(vm("8a3f5e2d1c0b9a87"), &base, &[DiskFormat::Raw])
        .await
        .unwrap();
    fake.take_log();

    storage.delete(&root).await.unwrap();
    storage.delete(&root).await.unwrap();

    assert_eq!(
        fake.take_log(),
        vec![
            LVS.to_owned(),
            "lvremove -y vg0/root-8a3f5e2d1c0b9a87".to_owned(),
            LVS.to_owned(),
        ]
    );
}

#[tokio::test]
async fn copy_is_an_active_thin_snapshot_of_the_source() {
    let (storage, fake, _fx, _base) = imported().await;
    let data = storage
        .create_data(vm("8a3f5e2d1c0b9a87"), 64 << 20)
        .await
        .unwrap();
    fake.take_log();

    let copy = storage
        .copy_volume(&data, vm("0123456789abcdef"))
        .await
        .unwrap();

    assert_eq!(
        fake.take_log(),
        vec![
            LVS.to_owned(),
            "lvcreate -s -kn -ay -prw -n data-0123456789abcdef vg0/data-8a3f5e2d1c0b9a87"
                .to_owned(),
            LVS.to_owned(),
        ]
    );
    assert_eq!(copy.path, PathBuf::from("/dev/vg0/data-0123456789abcdef"));
    assert_eq!(
        (copy.kind, copy.format, copy.size_bytes),
        (VolumeKind::Data, DiskFormat::Raw, data.size_bytes)
    );
    let lv = fake.lv("data-0123456789abcdef").unwrap();
    assert!(lv.active && lv.writable && !lv.skip);
}

#[tokio::test]
async fn copy_onto_an_existing_volume_runs_no_lvcreate() {
    let (storage, fake, _fx, base) = imported().await;
    let a = storage
        .clone_root(vm("8a3f5e2d1c0b9a87"), &base, &[DiskFormat::Raw])
        .await
        .unwrap();
    storage
        .clone_root(vm("0123456789abcdef"), &base, &[DiskFormat::Raw])
        .await
        .unwrap();
    fake.take_log();

    let err = storage
        .copy_volume(&a, vm("0123456789abcdef"))
        .await
        .unwrap_err();

    assert!(
        matches!(err, StorageError::Exists(ref id) if id == "root-0123456789abcdef"),
        "{err}"
    );
    assert_eq!(fake.take_log(), vec![LVS.to_owned()]);
}

#[tokio::test]
async fn release_renames_the_volume_out_of_the_listed_names() {
    let (storage, fake, _fx, _base) = imported().await;
    let data = storage
        .create_data(vm("8a3f5e2d1c0b9a87"), 64 << 20)
        .await
        .unwrap();
    fake.take_log();

    let kept = storage.release(&data).await.unwrap();

    let log = fake.take_log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0], LVS);
    let new_name = kept
        .to_str()
        .unwrap()
        .strip_prefix("/dev/vg0/")
        .unwrap()
        .to_owned();
    assert_eq!(
        log[1],
        format!("lvrename vg0/data-8a3f5e2d1c0b9a87 {new_name}")
    );
    let secs = new_name
        .strip_prefix("kept-data-8a3f5e2d1c0b9a87-")
        .unwrap_or_else(|| panic!("{new_name} is not kept-<id>-<secs>"));
    assert!(secs.parse::<u64>().is_ok(), "{new_name}");
    assert!(fake.lv(&new_name).is_some(), "the volume lives on");
    assert_eq!(storage.list().await.unwrap(), Vec::<Volume>::new());
}

#[tokio::test]
async fn volumes_that_are_not_vmkits_are_refused_before_any_command() {
    let (storage, fake, _fx, base) = imported().await;
    let root = storage
        .clone_root(vm("8a3f5e2d1c0b9a87"), &base, &[DiskFormat::Raw])
        .await
        .unwrap();
    fake.take_log();
    let mut pool = root.clone();
    pool.id = "pool0".into();
    let mut elsewhere = root.clone();
    elsewhere.path = PathBuf::from("/dev/sda");
    let mut qcow2 = root.clone();
    qcow2.format = DiskFormat::Qcow2;

    for v in [&pool, &elsewhere, &qcow2] {
        assert!(
            matches!(storage.delete(v).await, Err(StorageError::Refused(_))),
            "{v:?}"
        );
        assert!(
            matches!(
                storage.resize(v, 1 << 40).await,
                Err(StorageError::Refused(_))
            ),
            "{v:?}"
        );
    }
    assert_eq!(fake.take_log(), Vec::<String>::new());
}

#[tokio::test]
async fn missing_thin_pool_error_says_how_to_create_it() {
    let fake = FakeLvm::new();
    fake.remove_pool();
    let storage = storage(Arc::new(fake.clone()));

    let err = storage
        .create_data(VmId::generate(), 64 << 20)
        .await
        .unwrap_err();

    assert!(
        err.to_string()
            .contains("lvcreate --type thin-pool -L <size> -n pool0 vg0"),
        "{err}"
    );
}

#[tokio::test]
async fn invalid_volume_group_names_are_refused() {
    for vg in ["", "-vg", "vg/../x", "vg name", ".."] {
        let err = LvmStorage::with_runner(LvmConfig::new(vg, "pool0"), Arc::new(FakeLvm::new()))
            .unwrap_err();
        assert!(matches!(err, StorageError::Refused(_)), "{vg:?}: {err}");
    }
}

#[tokio::test]
async fn missing_lvm2_tools_error_says_to_install_lvm2() {
    let storage = storage(Arc::new(Canned::new(&[])));

    let err = storage.list().await.unwrap_err();

    assert!(err.to_string().contains("apt-get install lvm2"), "{err}");
}

// ------------------------------------------------------------------ real lvm2 output

#[tokio::test]
async fn list_reads_a_real_lvs_report_and_keeps_only_vmkit_volumes() {
    let runner = Canned::new(&[("lvs", CommandOutput::ok(sample("lvs_vg.json")))]);
    let storage =
        LvmStorage::with_runner(LvmConfig::new("vmkit", "pool"), Arc::new(runner.clone())).unwrap();

    let listed = storage.list().await.unwrap();

    let summary: Vec<(String, VmId, VolumeKind, PathBuf, u64)> = listed
        .iter()
        .map(|v| (v.id.clone(), v.vm, v.kind, v.path.clone(), v.size_bytes))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "data-8a3f5e2d1c0b9a87".to_owned(),
                vm("8a3f5e2d1c0b9a87"),
                VolumeKind::Data,
                PathBuf::from("/dev/vmkit/data-8a3f5e2d1c0b9a87"),
                67_108_864
            ),
            (
                "data-c1d2e3f4a5b6c7d8".to_owned(),
                vm("c1d2e3f4a5b6c7d8"),
                VolumeKind::Data,
                PathBuf::from("/dev/vmkit/data-c1d2e3f4a5b6c7d8"),
                10_737_418_240
            ),
            (
                "root-8a3f5e2d1c0b9a87".to_owned(),
                vm("8a3f5e2d1c0b9a87"),
                VolumeKind::Root,
                PathBuf::from("/dev/vmkit/root-8a3f5e2d1c0b9a87"),
                2_147_483_648
            ),
        ]
    );
    assert!(listed.iter().all(|v| v.format == DiskFormat::Raw));
    assert_eq!(runner.log(), vec![
        "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,pool_lv,origin,lv_attr vmkit".to_owned(),
    ]);
}

#[tokio::test]
async fn single_volume_and_empty_real_reports_parse() {
    let one = LvmStorage::with_runner(
        LvmConfig::new("vmkit", "pool"),
        Arc::new(Canned::new(&[(
            "lvs",
            CommandOutput::ok(sample("lvs_one_lv.json")),
        )])),
    )
    .unwrap();
    let empty = LvmStorage::with_runner(
        LvmConfig::new("vmkit", "pool"),
        Arc::new(Canned::new(&[(
            "lvs",
            CommandOutput::ok(sample("lvs_empty.json")),
        )])),
    )
    .unwrap();

    let ids: Vec<String> = one
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();

    assert_eq!(ids, vec!["root-8a3f5e2d1c0b9a87".to_owned()]);
    assert_eq!(empty.list().await.unwrap(), Vec::<Volume>::new());
}

#[tokio::test]
async fn read_only_base_in_a_real_report_is_reused_without_changes() {
    let runner = Canned::new(&[("lvs", CommandOutput::ok(sample("lvs_vg.json")))]);
    let storage =
        LvmStorage::with_runner(LvmConfig::new("vmkit", "pool"), Arc::new(runner.clone())).unwrap();
    let fx = Fixture::new();

    let base = storage.import_image(&fx.image).await.unwrap();

    assert_eq!(base.path, PathBuf::from("/dev/vmkit/base-4f9c2e71a0b3"));
    assert_eq!(base.size_bytes, 2_147_483_648);
    assert_eq!(runner.log().len(), 1, "only lvs ran");
}

#[tokio::test]
async fn existing_root_in_a_real_report_is_exists() {
    let runner = Canned::new(&[("lvs", CommandOutput::ok(sample("lvs_vg.json")))]);
    let storage =
        LvmStorage::with_runner(LvmConfig::new("vmkit", "pool"), Arc::new(runner)).unwrap();
    let fx = Fixture::new();
    let base = storage.import_image(&fx.image).await.unwrap();

    let err = storage
        .clone_root(vm("8a3f5e2d1c0b9a87"), &base, &[DiskFormat::Raw])
        .await
        .unwrap_err();

    assert!(
        matches!(err, StorageError::Exists(ref id) if id == "root-8a3f5e2d1c0b9a87"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_volume_group_error_carries_lvm2_message_and_a_hint() {
    let runner = Canned::new(&[(
        "lvs",
        CommandOutput::new(
            Some(5),
            sample("lvs_empty.json"),
            sample("lvs_missing_vg.stderr"),
        ),
    )]);
    let storage =
        LvmStorage::with_runner(LvmConfig::new("nosuchvg", "pool"), Arc::new(runner)).unwrap();

    let err = storage.list().await.unwrap_err();

    let msg = err.to_string();
    assert!(msg.contains("Volume group \"nosuchvg\" not found"), "{msg}");
    assert!(msg.contains("`vgs`"), "{msg}");
}

#[tokio::test]
async fn volume_vanishing_before_lvremove_is_deleted_anyway() {
    // lvs still shows the root; lvremove then answers as real lvm2 does for a
    // volume that is gone.
    let runner = Canned::new(&[
        ("lvs", CommandOutput::ok(sample("lvs_vg.json"))),
        (
            "lvremove",
            CommandOutput::new(
                Some(5),
                "",
                sample("lvremove_missing_lv.stderr")
                    .replace("root-0000000000000000", "root-8a3f5e2d1c0b9a87"),
            ),
        ),
    ]);
    let storage =
        LvmStorage::with_runner(LvmConfig::new("vmkit", "pool"), Arc::new(runner.clone())).unwrap();
    let root = storage
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.kind == VolumeKind::Root)
        .unwrap();

    storage.delete(&root).await.unwrap();

    assert_eq!(
        runner.log().last().unwrap(),
        "lvremove -y vmkit/root-8a3f5e2d1c0b9a87"
    );
}

#[tokio::test]
async fn report_with_noise_before_the_json_and_json_std_numbers_parses() {
    let json_std = "  WARNING: something lvm2 prints first\n{\"report\":[{\"lv\":[{\"lv_name\":\"data-0123456789abcdef\",\"vg_name\":\"vmkit\",\"lv_size\":67108864,\"pool_lv\":\"pool\",\"origin\":null,\"lv_attr\":\"Vwi-a-tz--\"}]}],\"log\":[]}";
    let storage = LvmStorage::with_runner(
        LvmConfig::new("vmkit", "pool"),
        Arc::new(Canned::new(&[("lvs", CommandOutput::ok(json_std))])),
    )
    .unwrap();

    let listed = storage.list().await.unwrap();

    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size_bytes, 64 << 20);
}
