//! LVM thin volumes: base images are thin volumes of one thin pool, root volumes
//! are thin snapshots of them, data volumes are thin volumes of the same pool.

mod report;
mod runner;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use vmkit_core::{
    BaseImage, CloneMethod, DiskFormat, Image, Storage, StorageCapabilities, StorageError, VmId,
    Volume, VolumeKind,
};

pub use self::runner::{CommandOutput, LvmRunner, SystemLvmRunner};

use self::report::Lv;
use crate::file::common::{
    base_image, capabilities, check_digest, check_volume_id, parse_volume_id,
};

/// Configuration of an [`LvmStorage`]. Build with [`LvmConfig::new`] and the
/// setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LvmConfig {
    /// The volume group.
    pub vg: String,
    /// The thin pool in it, which holds every vmkit volume.
    pub thin_pool: String,
    /// The `mkfs.ext4` program (data volumes).
    pub mkfs_ext4: String,
    /// The `dd` program (writing base images).
    pub dd: String,
}

impl LvmConfig {
    /// Volumes in thin pool `thin_pool` of volume group `vg`; programs from `PATH`.
    pub fn new(vg: impl Into<String>, thin_pool: impl Into<String>) -> Self {
        Self {
            vg: vg.into(),
            thin_pool: thin_pool.into(),
            mkfs_ext4: "mkfs.ext4".to_owned(),
            dd: "dd".to_owned(),
        }
    }

    /// Sets the `mkfs.ext4` program.
    pub fn mkfs_ext4(mut self, program: impl Into<String>) -> Self {
        self.mkfs_ext4 = program.into();
        self
    }

    /// Sets the `dd` program.
    pub fn dd(mut self, program: impl Into<String>) -> Self {
        self.dd = program.into();
        self
    }
}

/// [`Storage`] on an LVM thin pool: base images are thin volumes of one thin
/// pool, root volumes are thin snapshots of them, data volumes are thin volumes
/// of the same pool.
///
/// # Commands
///
/// Every change goes through an [`LvmRunner`], so the backend is driven by the
/// lvm2 command-line tools ([`SystemLvmRunner`]) in production and by a fake in
/// tests. With volume group `<vg>` and thin pool `<pool>`:
///
/// | operation | commands |
/// | --- | --- |
/// | look | `lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,pool_lv,origin,lv_attr <vg>` |
/// | [`import_image`](Storage::import_image) | `lvcreate -V <bytes>b -T <vg>/<pool> -n base-<digest12>`, `dd if=<rootfs> of=/dev/<vg>/base-<digest12> bs=4M conv=sparse,fsync status=none`, `lvchange -pr -ky <vg>/base-<digest12>`, `lvchange -an <vg>/base-<digest12>` |
/// | [`clone_root`](Storage::clone_root) | `lvcreate -s -kn -ay -prw -n root-<vm> <vg>/base-<digest12>` |
/// | [`create_data`](Storage::create_data) | `lvcreate -V <bytes>b -T <vg>/<pool> -n data-<vm>`, `mkfs.ext4 -q -F -L vmkit-data /dev/<vg>/data-<vm>` (and `lvremove -y` if mkfs fails) |
/// | [`resize`](Storage::resize) | `lvextend -L <bytes>b <vg>/<id>` |
/// | [`delete`](Storage::delete) | `lvremove -y <vg>/<id>` (a missing volume is success) |
/// | [`list`](Storage::list) | the `lvs` report, keeping `root-`/`data-` volumes of `<pool>` |
/// | [`copy_volume`](Storage::copy_volume) | `lvcreate -s -kn -ay -prw -n <new id> <vg>/<id>` |
/// | [`release`](Storage::release) | `lvrename <vg>/<id> kept-<id>-<unix seconds>` |
///
/// A copy is a thin snapshot of the source: O(1), and independent of it (a thin
/// snapshot does not need its origin, which can be written or removed). A
/// released volume is renamed out of the names vmkit lists (`kept-…`, with `-<n>`
/// added if that name is taken) and stays in the pool, active, at
/// `/dev/<vg>/kept-<id>-<secs>`; vmkit never removes it.
///
/// A base image is complete once it is read-only: an import that finds a writable
/// `base-*` volume (a crash between `lvcreate` and `lvchange -pr`) removes it and
/// starts again. Base volumes get the activation-skip flag and are deactivated, as
/// nothing opens them; root snapshots are made with `-kn -ay` so that they are
/// active now and are activated again after a host reboot (thin snapshots
/// otherwise get activation skip, which `-K` would only override once). Sizes are
/// read back from `lvs` after every change, as lvm2 rounds them up to whole
/// extents. Volume paths are `/dev/<vg>/<lv>`, always in raw format. Base volumes
/// are named after the first twelve characters of the image digest. A resize
/// grows the logical volume only; as with file volumes, the filesystem in it is
/// the guest's, which grows it when it next boots.
/// The thin pool is the operator's to create and to watch: thin volumes may add up
/// to more than the pool holds.
///
/// # What has run against real lvm2, and what has not
///
/// Plainly: **no volume has been created, snapshotted, written, extended or
/// removed by this code on a real LVM setup.** The development machine has no
/// device-mapper, so LVM cannot run there; this backend is tested through its
/// command seam against a fake that simulates lvm2's state and its output.
///
/// What did meet real lvm2 (2.03.16, Debian bookworm, on a loop device, without
/// device-mapper): the `lvs` JSON samples in `tests/data/lvm/` are its real output
/// for a volume group holding a thin pool, a read-only base, a root snapshot, data
/// volumes and volumes that are not vmkit's (written by `vgcfgrestore` from
/// hand-made metadata, since no thin volume can be created without
/// device-mapper), as are the messages of `lvs` for a missing volume group and of
/// `lvremove -y` for a missing volume; and lvm2 accepted the `lvextend -L` and
/// `lvchange -pr -ky` command lines above in `--test` mode. The `lvcreate` lines
/// could not be checked that way (lvm2 stops at the missing thin target), nor
/// could `lvchange -an`, `dd`, `mkfs.ext4`, `lvrename` or `lvremove` on a real
/// thin volume.
/// Run the generic storage suite on a host with a thin pool before relying on
/// this backend.
#[derive(Clone, Debug)]
pub struct LvmStorage {
    config: LvmConfig,
    runner: Arc<dyn LvmRunner>,
}

impl LvmStorage {
    /// LVM storage driven by the lvm2 tools ([`SystemLvmRunner`]).
    pub fn new(config: LvmConfig) -> Result<Self, StorageError> {
        Self::with_runner(config, Arc::new(SystemLvmRunner))
    }

    /// LVM storage whose commands go through `runner`. Fails with
    /// [`StorageError::Refused`] if the volume group or pool name is not a valid
    /// LVM name.
    pub fn with_runner(
        config: LvmConfig,
        runner: Arc<dyn LvmRunner>,
    ) -> Result<Self, StorageError> {
        check_lvm_name("volume group", &config.vg)?;
        check_lvm_name("thin pool", &config.thin_pool)?;
        Ok(Self { config, runner })
    }

    /// The configuration.
    pub fn config(&self) -> &LvmConfig {
        &self.config
    }

    fn vg(&self) -> &str {
        &self.config.vg
    }

    /// `<vg>/<lv>`, as lvm2 commands name a volume.
    fn lv_ref(&self, lv: &str) -> String {
        format!("{}/{lv}", self.vg())
    }

    /// `/dev/<vg>/<lv>`, the device node handed to the VMM.
    fn dev(&self, lv: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{lv}", self.vg()))
    }

    async fn run(&self, argv: &[&str]) -> Result<CommandOutput, StorageError> {
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let command = argv.join(" ");
        let output = self.runner.run(&argv).await.map_err(|e| StorageError::Command {
            command: command.clone(),
            stderr: if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{} is not installed; install lvm2 (Debian/Ubuntu: `apt-get install lvm2`) and e2fsprogs",
                    argv.first().map_or("", String::as_str)
                )
            } else {
                format!("cannot run it: {e}")
            },
        })?;
        Ok(output)
    }

    /// Runs `argv` and fails with [`StorageError::Command`] unless it succeeds.
    async fn run_ok(&self, argv: &[&str]) -> Result<CommandOutput, StorageError> {
        let output = self.run(argv).await?;
        if output.success() {
            Ok(output)
        } else {
            Err(command_failed(argv, &output))
        }
    }

    /// Every logical volume of the volume group.
    async fn report(&self) -> Result<Vec<Lv>, StorageError> {
        let argv = [
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            report::FIELDS,
            self.vg(),
        ];
        let output = self.run(&argv).await?;
        if !output.success() {
            let mut err = command_failed(&argv, &output);
            if let StorageError::Command { stderr, .. } = &mut err {
                stderr.push_str(&format!(
                    "; check that volume group {} exists (`vgs`)",
                    self.vg()
                ));
            }
            return Err(err);
        }
        report::parse(&output.stdout).map_err(|reason| StorageError::Command {
            command: argv.join(" "),
            stderr: reason,
        })
    }

    /// The volume called `name`, if the report has it.
    async fn find(&self, name: &str) -> Result<Option<Lv>, StorageError> {
        Ok(self
            .report()
            .await?
            .into_iter()
            .find(|lv| lv.vg == self.vg() && lv.name == name))
    }

    /// The volume called `name`, which a command just made.
    async fn made(&self, name: &str) -> Result<Lv, StorageError> {
        self.find(name).await?.ok_or_else(|| StorageError::Command {
            command: format!("lvs {}", self.lv_ref(name)),
            stderr: format!("{} was created but lvs does not show it", self.lv_ref(name)),
        })
    }

    /// The vmkit volume `id`, which a command just made in the thin pool.
    async fn made_volume(&self, id: &str) -> Result<Volume, StorageError> {
        let lv = self.made(id).await?;
        self.volume_of(&lv).ok_or_else(|| StorageError::Command {
            command: format!("lvs {}", self.lv_ref(id)),
            stderr: format!(
                "{} is not in thin pool {}",
                self.lv_ref(id),
                self.config.thin_pool
            ),
        })
    }

    /// Makes volume `id` a thin snapshot of `origin`, active now and after a reboot
    /// (`-kn -ay`) and writable.
    async fn snapshot(&self, origin: &str, id: &str) -> Result<Volume, StorageError> {
        let origin = self.lv_ref(origin);
        self.run_ok(&["lvcreate", "-s", "-kn", "-ay", "-prw", "-n", id, &origin])
            .await?;
        self.made_volume(id).await
    }

    /// Fails unless the thin pool is in `lvs`.
    fn check_pool(&self, lvs: &[Lv]) -> Result<(), StorageError> {
        let pool = &self.config.thin_pool;
        if lvs
            .iter()
            .any(|lv| lv.vg == self.vg() && &lv.name == pool && lv.thin_pool())
        {
            return Ok(());
        }
        Err(StorageError::Command {
            command: format!("lvs {}", self.vg()),
            stderr: format!(
                "thin pool {} does not exist; create it with `lvcreate --type thin-pool -L <size> -n {pool} {}`",
                self.lv_ref(pool),
                self.vg()
            ),
        })
    }

    /// Creates thin volume `name` of `size` bytes in the pool.
    async fn create_thin(&self, name: &str, size: u64) -> Result<(), StorageError> {
        let size = format!("{size}b");
        let pool = self.lv_ref(&self.config.thin_pool);
        self.run_ok(&["lvcreate", "-V", &size, "-T", &pool, "-n", name])
            .await
            .map(drop)
    }

    async fn remove(&self, name: &str) -> Result<(), StorageError> {
        let lv = self.lv_ref(name);
        let argv = ["lvremove", "-y", lv.as_str()];
        let output = self.run(&argv).await?;
        if output.success() || output.stderr.contains("Failed to find logical volume") {
            Ok(())
        } else {
            Err(command_failed(&argv, &output))
        }
    }

    /// The LV name of `volume`, after checking its id and path.
    fn volume_lv(&self, volume: &Volume) -> Result<String, StorageError> {
        check_volume_id(volume)?;
        let expected = self.dev(&volume.id);
        if volume.path != expected || volume.format != DiskFormat::Raw {
            return Err(StorageError::Refused(format!(
                "volume {} is {} in {} format, expected {} in raw format",
                volume.id,
                volume.path.display(),
                volume.format,
                expected.display()
            )));
        }
        Ok(volume.id.clone())
    }

    fn volume_of(&self, lv: &Lv) -> Option<Volume> {
        if lv.vg != self.vg() || lv.pool != self.config.thin_pool {
            return None;
        }
        let (vm, kind) = parse_volume_id(&lv.name)?;
        Some(crate::file::common::volume(
            lv.name.clone(),
            vm,
            kind,
            self.dev(&lv.name),
            DiskFormat::Raw,
            lv.size,
        ))
    }
}

/// The base volume of an image digest: `base-` and the digest's first twelve
/// characters.
fn base_lv(digest: &str) -> Result<String, StorageError> {
    check_digest(digest)?;
    Ok(format!("base-{}", digest.get(..12).unwrap_or(digest)))
}

/// Checks an LVM name: letters, digits, `+_.-`, not starting with `-`, not `.` or
/// `..`, at most 127 characters.
fn check_lvm_name(what: &str, name: &str) -> Result<(), StorageError> {
    let ok = !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::Refused(format!(
            "{what} name {name:?} is not a valid LVM name (letters, digits, '+', '_', '.', '-')"
        )))
    }
}

fn command_failed(argv: &[&str], output: &CommandOutput) -> StorageError {
    let status = output.code.map_or_else(
        || "killed by a signal".to_owned(),
        |c| format!("exit status {c}"),
    );
    StorageError::Command {
        command: argv.join(" "),
        stderr: format!("{} ({status})", output.stderr.trim()),
    }
}

#[async_trait]
impl Storage for LvmStorage {
    fn capabilities(&self) -> StorageCapabilities {
        capabilities(CloneMethod::LvmSnapshot, true, true)
    }

    async fn import_image(&self, image: &Image) -> Result<BaseImage, StorageError> {
        let name = base_lv(&image.digest)?;
        let base = |lv: &Lv| {
            base_image(
                image.name.clone(),
                image.digest.clone(),
                self.dev(&lv.name),
                lv.size,
            )
        };
        let lvs = self.report().await?;
        self.check_pool(&lvs)?;
        match lvs.iter().find(|lv| lv.vg == self.vg() && lv.name == name) {
            Some(lv) if lv.read_only() => return Ok(base(lv)),
            Some(_) => {
                tracing::warn!(lv = %self.lv_ref(&name), "removing an unfinished base image import");
                self.remove(&name).await?;
            }
            None => {}
        }
        let size = tokio::fs::metadata(&image.rootfs)
            .await
            .map_err(|e| {
                StorageError::io(
                    format!(
                        "cannot read the root filesystem {} of image {:?}; rebuild it with `vmkit image build {}`",
                        image.rootfs.display(),
                        image.name,
                        image.name
                    ),
                    e,
                )
            })?
            .len();
        self.create_thin(&name, size).await?;
        let input = format!("if={}", image.rootfs.display());
        let output = format!("of={}", self.dev(&name).display());
        let lv = self.lv_ref(&name);
        let written = async {
            self.run_ok(&[
                &self.config.dd,
                &input,
                &output,
                "bs=4M",
                "conv=sparse,fsync",
                "status=none",
            ])
            .await?;
            self.run_ok(&["lvchange", "-pr", "-ky", &lv]).await
        }
        .await;
        if let Err(e) = written {
            if let Err(cleanup) = self.remove(&name).await {
                tracing::warn!(lv = %lv, error = %cleanup, "cannot remove an unfinished base image");
            }
            return Err(e);
        }
        // The base is complete (read-only) now; an active base costs nothing but a
        // device node, so a failed deactivation is only reported.
        if let Err(e) = self.run_ok(&["lvchange", "-an", &lv]).await {
            tracing::warn!(lv = %lv, error = %e, "cannot deactivate a base image");
        }
        Ok(base(&self.made(&name).await?))
    }

    async fn clone_root(
        &self,
        vm: VmId,
        base: &BaseImage,
        formats: &[DiskFormat],
    ) -> Result<Volume, StorageError> {
        if !formats.contains(&DiskFormat::Raw) {
            return Err(StorageError::NoFormat(formats.to_vec()));
        }
        let base_name = base_lv(&base.digest)?;
        if base.path != self.dev(&base_name) {
            return Err(StorageError::Refused(format!(
                "base image {} is {}, expected {}",
                base.name,
                base.path.display(),
                self.dev(&base_name).display()
            )));
        }
        let id = Volume::id_for(vm, VolumeKind::Root);
        let lvs = self.report().await?;
        let mine = |name: &str| lvs.iter().find(|lv| lv.vg == self.vg() && lv.name == name);
        if !mine(&base_name).is_some_and(Lv::read_only) {
            return Err(StorageError::NoBaseImage(base.name.clone()));
        }
        if mine(&id).is_some() {
            return Err(StorageError::Exists(id));
        }
        self.snapshot(&base_name, &id).await
    }

    async fn create_data(&self, vm: VmId, size_bytes: u64) -> Result<Volume, StorageError> {
        let id = Volume::id_for(vm, VolumeKind::Data);
        let lvs = self.report().await?;
        self.check_pool(&lvs)?;
        if lvs.iter().any(|lv| lv.vg == self.vg() && lv.name == id) {
            return Err(StorageError::Exists(id));
        }
        self.create_thin(&id, size_bytes).await?;
        let dev = self.dev(&id).display().to_string();
        if let Err(e) = self
            .run_ok(&[&self.config.mkfs_ext4, "-q", "-F", "-L", "vmkit-data", &dev])
            .await
        {
            if let Err(cleanup) = self.remove(&id).await {
                tracing::warn!(lv = %self.lv_ref(&id), error = %cleanup, "cannot remove a data volume whose mkfs failed");
            }
            return Err(e);
        }
        self.made_volume(&id).await
    }

    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StorageError> {
        let name = self.volume_lv(volume)?;
        let lv = self
            .find(&name)
            .await?
            .ok_or_else(|| StorageError::NotFound(volume.id.clone()))?;
        if size_bytes < lv.size {
            return Err(StorageError::Shrink {
                id: volume.id.clone(),
                current: lv.size,
                requested: size_bytes,
            });
        }
        if size_bytes > lv.size {
            let size = format!("{size_bytes}b");
            let lv_ref = self.lv_ref(&name);
            let argv = ["lvextend", "-L", size.as_str(), lv_ref.as_str()];
            let output = self.run(&argv).await?;
            // Less than an extent more rounds to the size it has: nothing to do.
            if !output.success() && !output.stderr.contains("matches existing size") {
                return Err(command_failed(&argv, &output));
            }
        }
        let lv = self.made(&name).await?;
        let mut grown = volume.clone();
        grown.size_bytes = lv.size;
        Ok(grown)
    }

    async fn delete(&self, volume: &Volume) -> Result<(), StorageError> {
        let name = self.volume_lv(volume)?;
        if self.find(&name).await?.is_none() {
            return Ok(());
        }
        self.remove(&name).await
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        let mut volumes: Vec<Volume> = self
            .report()
            .await?
            .iter()
            .filter_map(|lv| self.volume_of(lv))
            .collect();
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    async fn copy_volume(&self, source: &Volume, vm: VmId) -> Result<Volume, StorageError> {
        let name = self.volume_lv(source)?;
        let id = Volume::id_for(vm, source.kind);
        let lvs = self.report().await?;
        let mine = |name: &str| lvs.iter().any(|lv| lv.vg == self.vg() && lv.name == name);
        if !mine(&name) {
            return Err(StorageError::NotFound(source.id.clone()));
        }
        if mine(&id) {
            return Err(StorageError::Exists(id));
        }
        self.snapshot(&name, &id).await
    }

    async fn release(&self, volume: &Volume) -> Result<PathBuf, StorageError> {
        let name = self.volume_lv(volume)?;
        let lvs = self.report().await?;
        let taken = |name: &str| lvs.iter().any(|lv| lv.vg == self.vg() && lv.name == name);
        if !taken(&name) {
            return Err(StorageError::NotFound(volume.id.clone()));
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let stem = format!("kept-{name}-{secs}");
        let kept = std::iter::once(stem.clone())
            .chain((1..).map(|n| format!("{stem}-{n}")))
            .find(|candidate| !taken(candidate))
            .expect("an unbounded sequence of names has one that no volume holds");
        let lv = self.lv_ref(&name);
        self.run_ok(&["lvrename", &lv, &kept]).await?;
        tracing::info!(volume = %volume.id, lv = %self.lv_ref(&kept), "volume handed over to the operator");
        Ok(self.dev(&kept))
    }
}
