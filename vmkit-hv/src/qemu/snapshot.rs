//! Snapshots: the guest's device and memory state, saved with QMP `migrate` into a file
//! and loaded into a fresh VMM started with `-incoming defer`.
//!
//! # Files in a snapshot directory
//!
//! - `memory`: QEMU's migration stream (devices, vCPUs and guest RAM). QEMU writes it
//!   straight into a file vmkit opened and passed over QMP (`getfd`, then
//!   `migrate fd:`), so no shell runs and no helper process can be cut short while it
//!   still has data to write. It is written as `memory.partial` and renamed once QEMU
//!   reports the migration `completed` and the file is synced.
//! - `vmkit-qemu-snapshot.json`: what a restore must match, written last (so a
//!   directory with it holds a whole snapshot): the format version, the QEMU version,
//!   the resolved machine type (`pc-q35-7.2`, not the `q35` alias, so that a newer QEMU
//!   restores with the machine the state was saved on), the accelerator, the vCPUs,
//!   the memory, the number of disks and the NIC's MAC. All of them are read from the
//!   running VMM over QMP, not from a config, so they are what QEMU saved.
//!
//! The disks are not in the snapshot: the caller copies them (see
//! [`Storage::copy_volume`](vmkit_core::Storage::copy_volume)) and hands the copies to
//! restore in its config. After a snapshot QEMU's run state is `postmigrate`: the
//! guest stays paused, QEMU has flushed the disks and given up its locks and write
//! access on them, which makes that the moment to copy them; `resume` (QMP `cont`)
//! takes them back and runs the guest on.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vmkit_core::{HypervisorError, MachineConfig, VmmHandle};

use super::supervisor::QmpClient;
use super::{Accel, Qemu};

/// The migration stream.
pub(super) const MEMORY_FILE: &str = "memory";
/// What a restore must match; its presence marks a whole snapshot.
pub(super) const META_FILE: &str = "vmkit-qemu-snapshot.json";
/// The migration stream while QEMU writes it.
const MEMORY_PARTIAL: &str = "memory.partial";
/// The version of the files above that this code writes and reads. 2: the disks'
/// virtio-blk devices have `num-queues` pinned to the vCPU slots (format 1 had QEMU's
/// default, the boot vCPUs, which a live resize makes differ from the restore's).
/// 3: every VM has a `pvpanic-pci` device, which a VMM of format 2 lacks.
const FORMAT: u32 = 3;
/// The name under which the snapshot file's descriptor is passed to QEMU.
const FD_NAME: &str = "vmkit-snapshot";
/// Migration bandwidth for a snapshot (bytes/s): no limit in practice. QEMU's default
/// (128 MiB/s) would make saving a 1 GiB guest take seconds for nothing.
const BANDWIDTH: u64 = 1 << 40;
/// How often the migration's progress is polled.
const POLL: Duration = Duration::from_millis(20);

/// The contents of `vmkit-qemu-snapshot.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapshotMeta {
    /// [`FORMAT`] when written.
    pub(super) format: u32,
    /// The QEMU that saved it (`7.2.22`), for people reading the file.
    pub(super) qemu_version: String,
    /// The resolved machine type (`pc-q35-7.2`), which the restoring VMM is started with.
    pub(super) machine: String,
    /// `kvm` or `tcg`.
    pub(super) accel: String,
    /// vCPUs online.
    pub(super) vcpus: u32,
    /// vCPU slots.
    pub(super) max_vcpus: u32,
    /// Guest RAM in MiB.
    pub(super) memory_mib: u64,
    /// Disks attached.
    pub(super) disks: usize,
    /// The MAC the guest's NIC has, if it has one.
    pub(super) mac: Option<String>,
}

impl SnapshotMeta {
    /// Checks that `config` can take this snapshot on a VMM using `accel`, with an
    /// error that says what differs.
    pub(super) fn check(
        &self,
        config: &MachineConfig,
        accel: Accel,
        dir: &Path,
    ) -> Result<(), HypervisorError> {
        let mismatch = |what: String| {
            Err(HypervisorError::InvalidConfig(format!(
                "the snapshot in {} cannot be restored with this config: {what}; restore it \
                 with the machine it was taken of",
                dir.display()
            )))
        };
        let accel = accel.to_string();
        if self.accel != accel {
            return mismatch(format!(
                "it was taken under {} and this QEMU runs guests under {accel}",
                self.accel
            ));
        }
        // The vCPU slots are the snapshot's: a VM resized live has more or fewer
        // vCPUs than it booted with, so its config's maximum may differ.
        if (self.vcpus, self.memory_mib) != (config.vcpus, config.memory_mib) {
            return mismatch(format!(
                "it has {} vCPUs and {} MiB, the config {} vCPUs and {} MiB",
                self.vcpus, self.memory_mib, config.vcpus, config.memory_mib
            ));
        }
        if self.disks != config.disks.len() {
            return mismatch(format!(
                "it has {} disks, the config {}",
                self.disks,
                config.disks.len()
            ));
        }
        let mac = config.nic.as_ref().map(|nic| nic.mac.to_string());
        let same_mac = match (&self.mac, &mac) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            (None, None) => true,
            _ => false,
        };
        if !same_mac {
            let show = |m: &Option<String>| {
                m.as_ref()
                    .map_or_else(|| "no NIC".to_owned(), |m| format!("a NIC with MAC {m}"))
            };
            return mismatch(format!(
                "it has {}, the config {} (the guest keeps its NIC's state, MAC included)",
                show(&self.mac),
                show(&mac)
            ));
        }
        Ok(())
    }
}

/// Reads the snapshot in `dir`: its description, checked for this code's format and
/// a machine type that is safe on a command line, and its open migration stream.
pub(super) fn open(dir: &Path) -> Result<(SnapshotMeta, std::fs::File), HypervisorError> {
    let meta_path = dir.join(META_FILE);
    let text = match std::fs::read(&meta_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(HypervisorError::Refused {
                operation: "restore",
                message: format!(
                    "no QEMU snapshot in {} ({META_FILE} is missing); give the directory a \
                     snapshot was written to",
                    dir.display()
                ),
            });
        }
        Err(e) => {
            return Err(HypervisorError::io(
                format!("cannot read {}", meta_path.display()),
                e,
            ));
        }
    };
    let format = serde_json::from_slice::<Value>(&text)
        .ok()
        .and_then(|v| v.get("format").and_then(Value::as_u64));
    if format != Some(u64::from(FORMAT)) {
        return Err(HypervisorError::InvalidConfig(format!(
            "{} is not a snapshot description of format {FORMAT} (found format {}); it was \
             written by another vmkit version, which must restore it",
            meta_path.display(),
            format.map_or_else(|| "none".to_owned(), |f| f.to_string())
        )));
    }
    let meta: SnapshotMeta = serde_json::from_slice(&text).map_err(|e| {
        HypervisorError::Protocol(format!("{} does not parse: {e}", meta_path.display()))
    })?;
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if meta.machine.is_empty() || !meta.machine.bytes().all(safe) {
        return Err(HypervisorError::InvalidConfig(format!(
            "{} names machine type {:?}, which is not a QEMU machine type",
            meta_path.display(),
            meta.machine
        )));
    }
    let memory_path = dir.join(MEMORY_FILE);
    let memory = std::fs::File::open(&memory_path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => HypervisorError::Refused {
            operation: "restore",
            message: format!(
                "the snapshot in {} has no {MEMORY_FILE} file; it is incomplete",
                dir.display()
            ),
        },
        _ => HypervisorError::io(format!("cannot open {}", memory_path.display()), e),
    })?;
    Ok((meta, memory))
}

/// The migration stream being written; removed on drop unless persisted, so that a
/// failed or cancelled snapshot leaves no partial file.
struct Partial {
    path: PathBuf,
    file: std::fs::File,
    done: bool,
}

impl Partial {
    fn create(dir: &Path) -> Result<Self, HypervisorError> {
        let path = dir.join(MEMORY_PARTIAL);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| HypervisorError::io(format!("cannot create {}", path.display()), e))?;
        Ok(Self {
            path,
            file,
            done: false,
        })
    }

    /// Syncs the file and renames it to `name` in its directory.
    fn persist(mut self, name: &str) -> Result<(), HypervisorError> {
        let target = self.path.with_file_name(name);
        self.file
            .sync_all()
            .and_then(|()| std::fs::rename(&self.path, &target))
            .map_err(|e| HypervisorError::io(format!("cannot write {}", target.display()), e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates `dir` if needed, refusing one that holds a snapshot already.
fn prepare_dir(dir: &Path) -> Result<(), HypervisorError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| HypervisorError::io(format!("cannot create {}", dir.display()), e))?;
    if [META_FILE, MEMORY_FILE]
        .iter()
        .any(|name| dir.join(name).symlink_metadata().is_ok())
    {
        return Err(HypervisorError::Refused {
            operation: "snapshot",
            message: format!(
                "{} holds a snapshot already; remove it or use an empty directory",
                dir.display()
            ),
        });
    }
    Ok(())
}

/// Writes `meta` as `dir/META_FILE` (through a temporary file) and syncs `dir`.
fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), HypervisorError> {
    let path = dir.join(META_FILE);
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(meta).map_err(|e| {
        HypervisorError::Protocol(format!("cannot encode the snapshot description: {e}"))
    })?;
    let written = (|| {
        let file = std::fs::File::create(&tmp)?;
        io::Write::write_all(&mut &file, &text)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HypervisorError::io(format!("cannot write {}", path.display()), e)
    })
}

impl Qemu {
    /// [`Hypervisor::snapshot`](vmkit_core::Hypervisor::snapshot): see the module docs.
    pub(super) async fn save_snapshot(
        &self,
        handle: &VmmHandle,
        dir: &Path,
    ) -> Result<(), HypervisorError> {
        const OP: &str = "snapshot";
        Self::require_running(handle)?;
        let mut qmp = self.qmp(handle, OP).await?;
        let status = self.run_status(handle, &mut qmp, OP).await?;
        match status.as_str() {
            "paused" => {}
            "postmigrate" => {
                return Err(HypervisorError::Refused {
                    operation: OP,
                    message: "the guest has not run since its last snapshot, and QEMU saves a \
                              guest only once until it runs again; resume it (and pause it) \
                              before the next snapshot"
                        .to_owned(),
                });
            }
            other => {
                return Err(HypervisorError::Refused {
                    operation: OP,
                    message: format!("the guest is {other}, not paused; pause it first"),
                });
            }
        }
        let meta = self.describe(handle, &mut qmp).await?;
        prepare_dir(dir)?;
        let partial = Partial::create(dir)?;
        self.migrate_to(handle, &mut qmp, &partial.file).await?;
        partial.persist(MEMORY_FILE)?;
        write_meta(dir, &meta)?;
        tracing::debug!(pid = handle.pid, dir = %dir.display(), "snapshot written");
        Ok(())
    }

    /// What a restore must match, read from the VMM.
    async fn describe(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
    ) -> Result<SnapshotMeta, HypervisorError> {
        const OP: &str = "snapshot";
        let bad = |what: &str, value: &Value| {
            HypervisorError::Protocol(format!("{what} returned {value}"))
        };
        let machine = self
            .exec(
                handle,
                qmp,
                OP,
                "qom-get",
                Some(json!({ "path": "/machine", "property": "type" })),
            )
            .await?;
        let machine = machine
            .as_str()
            .map(|t| t.strip_suffix("-machine").unwrap_or(t).to_owned())
            .ok_or_else(|| bad("qom-get /machine type", &machine))?;
        let version = self.exec(handle, qmp, OP, "query-version", None).await?;
        let q = &version["qemu"];
        let qemu_version = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
        let kvm = self.exec(handle, qmp, OP, "query-kvm", None).await?;
        let accel = match kvm["enabled"].as_bool() {
            Some(true) => Accel::Kvm,
            Some(false) => Accel::Tcg,
            None => return Err(bad("query-kvm", &kvm)),
        };
        let count = |value: &Value, what: &str| {
            value
                .as_array()
                .map(Vec::len)
                .ok_or_else(|| bad(what, value))
        };
        let cpus = self.exec(handle, qmp, OP, "query-cpus-fast", None).await?;
        let vcpus = count(&cpus, "query-cpus-fast")?;
        let slots = self
            .exec(handle, qmp, OP, "query-hotpluggable-cpus", None)
            .await?;
        let max_vcpus = count(&slots, "query-hotpluggable-cpus")?;
        let memory = self
            .exec(handle, qmp, OP, "query-memory-size-summary", None)
            .await?;
        let bytes = memory["base-memory"].as_u64().unwrap_or(0)
            + memory["plugged-memory"].as_u64().unwrap_or(0);
        let block = self.exec(handle, qmp, OP, "query-block", None).await?;
        let disks = block
            .as_array()
            .ok_or_else(|| bad("query-block", &block))?
            .iter()
            .filter(|b| b.get("inserted").is_some())
            .count();
        let filters = self.exec(handle, qmp, OP, "query-rx-filter", None).await?;
        let mac = filters
            .as_array()
            .ok_or_else(|| bad("query-rx-filter", &filters))?
            .iter()
            .find_map(|f| f["main-mac"].as_str().map(str::to_owned));
        Ok(SnapshotMeta {
            format: FORMAT,
            qemu_version,
            machine,
            accel: accel.to_string(),
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
            max_vcpus: u32::try_from(max_vcpus).unwrap_or(u32::MAX),
            memory_mib: bytes >> 20,
            disks,
            mac,
        })
    }

    /// Migrates the guest's state into `file` and waits until QEMU reports it
    /// complete, within the snapshot timeout (the migration is cancelled then).
    async fn migrate_to(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
        file: &std::fs::File,
    ) -> Result<(), HypervisorError> {
        const OP: &str = "snapshot";
        self.exec(
            handle,
            qmp,
            OP,
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": BANDWIDTH })),
        )
        .await?;
        self.pass_fd(handle, qmp, OP, file).await?;
        let uri = format!("fd:{FD_NAME}");
        if let Err(e) = self
            .exec(handle, qmp, OP, "migrate", Some(json!({ "uri": uri })))
            .await
        {
            let _ = qmp
                .execute("closefd", Some(json!({ "fdname": FD_NAME })))
                .await;
            return Err(e);
        }
        let timeout = self.config.snapshot_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.exec(handle, qmp, OP, "query-migrate", None).await?;
            match info["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    return Err(HypervisorError::Refused {
                        operation: OP,
                        message: format!(
                            "QEMU could not save the guest's state: {}",
                            info["error-desc"]
                                .as_str()
                                .unwrap_or("the migration failed without a reason")
                        ),
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                if let Err(e) = qmp.execute("migrate_cancel", None).await {
                    tracing::warn!(pid = handle.pid, error = %e, "cannot cancel a snapshot that timed out");
                }
                return Err(HypervisorError::Timeout {
                    operation: OP,
                    timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Loads the state in `memory` into the VMM of `handle`, started with
    /// `-incoming defer` and `-S`, and waits until the guest is paused with it.
    pub(super) async fn load_snapshot(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
        memory: &std::fs::File,
    ) -> Result<(), HypervisorError> {
        const OP: &str = "restore";
        self.pass_fd(handle, qmp, OP, memory).await?;
        let uri = format!("fd:{FD_NAME}");
        self.exec(
            handle,
            qmp,
            OP,
            "migrate-incoming",
            Some(json!({ "uri": uri })),
        )
        .await?;
        let timeout = self.config.snapshot_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // A stream QEMU cannot load makes it exit: this then fails with NotRunning.
            match self.run_status(handle, qmp, OP).await?.as_str() {
                "paused" => return Ok(()),
                "inmigrate" => {}
                other => {
                    return Err(HypervisorError::Protocol(format!(
                        "the guest is {other} after loading the snapshot, not paused"
                    )));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HypervisorError::Timeout {
                    operation: OP,
                    timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Hands `file` to QEMU under [`FD_NAME`].
    async fn pass_fd(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
        operation: &'static str,
        file: &std::fs::File,
    ) -> Result<(), HypervisorError> {
        match qmp
            .execute_with_fd("getfd", Some(json!({ "fdname": FD_NAME })), file.as_fd())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.qmp_error(handle, operation, e).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_core::{MacAddr, NicConfig, VmId, VmName};

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            format: FORMAT,
            qemu_version: "7.2.22".to_owned(),
            machine: "pc-q35-7.2".to_owned(),
            accel: "tcg".to_owned(),
            vcpus: 1,
            max_vcpus: 2,
            memory_mib: 256,
            disks: 1,
            mac: Some("52:54:00:01:02:03".to_owned()),
        }
    }

    fn config() -> MachineConfig {
        let mut config = MachineConfig::new(
            VmId::generate(),
            VmName::new("snap").unwrap(),
            "/run/snap".into(),
            "/boot/vmlinuz".into(),
        );
        config.vcpus = 1;
        config.max_vcpus = 2;
        config.memory_mib = 256;
        config.disks = vec![vmkit_core::DiskConfig::new(
            "/disk.qcow2",
            vmkit_core::DiskFormat::Qcow2,
        )];
        config.nic = Some(NicConfig::new("vmk0", MacAddr([0x52, 0x54, 0, 1, 2, 3])));
        config
    }

    fn refusal(config: &MachineConfig, accel: Accel) -> String {
        match meta().check(config, accel, Path::new("/snap")) {
            Err(HypervisorError::InvalidConfig(message)) => message,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn the_machine_it_was_taken_of_passes() {
        meta()
            .check(&config(), Accel::Tcg, Path::new("/snap"))
            .unwrap();
    }

    #[test]
    fn other_memory_vcpus_disks_mac_or_accel_are_refused_saying_what_differs() {
        let mut more_memory = config();
        more_memory.memory_mib = 512;
        assert!(
            refusal(&more_memory, Accel::Tcg).contains("256 MiB, the config 1 vCPUs and 512 MiB")
        );

        let mut more_cpus = config();
        more_cpus.vcpus = 2;
        assert!(refusal(&more_cpus, Accel::Tcg).contains("the config 2 vCPUs"));

        let mut two_disks = config();
        two_disks.disks.push(two_disks.disks[0].clone());
        assert!(refusal(&two_disks, Accel::Tcg).contains("1 disks, the config 2"));

        let mut other_mac = config();
        other_mac.nic = Some(NicConfig::new("vmk0", MacAddr([0x52, 0x54, 0, 9, 9, 9])));
        assert!(refusal(&other_mac, Accel::Tcg).contains("MAC 52:54:00:09:09:09"));

        let mut no_nic = config();
        no_nic.nic = None;
        assert!(refusal(&no_nic, Accel::Tcg).contains("the config no NIC"));

        assert!(refusal(&config(), Accel::Kvm).contains("taken under tcg"));
    }

    fn write_snapshot(dir: &Path, meta_text: &str) {
        std::fs::write(dir.join(META_FILE), meta_text).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), b"QEVM").unwrap();
    }

    #[test]
    fn an_empty_directory_is_refused_as_holding_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, HypervisorError::Refused { operation: "restore", message } if message.contains("no QEMU snapshot")),
            "{err:?}"
        );
    }

    #[test]
    fn another_format_or_an_unsafe_machine_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut future = serde_json::to_value(meta()).unwrap();
        future["format"] = json!(FORMAT + 1);
        write_snapshot(dir.path(), &future.to_string());
        let err = open(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("found format {}", FORMAT + 1)),
            "{err}"
        );
        let mut past = serde_json::to_value(meta()).unwrap();
        past["format"] = json!(1);
        write_snapshot(dir.path(), &past.to_string());
        let err = open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("found format 1"), "{err}");

        let mut injected = meta();
        injected.machine = "q35,accel=kvm".to_owned();
        write_snapshot(dir.path(), &serde_json::to_string(&injected).unwrap());
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, HypervisorError::InvalidConfig(_)), "{err:?}");
    }

    #[test]
    fn a_description_without_its_memory_file_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot(dir.path(), &serde_json::to_string(&meta()).unwrap());
        std::fs::remove_file(dir.path().join(MEMORY_FILE)).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("incomplete"), "{err}");
        write_snapshot(dir.path(), &serde_json::to_string(&meta()).unwrap());
        let (read, _) = open(dir.path()).unwrap();
        assert_eq!(read, meta());
    }

    #[test]
    fn a_directory_holding_a_snapshot_is_not_written_over() {
        let dir = tempfile::tempdir().unwrap();
        prepare_dir(&dir.path().join("new")).unwrap();
        write_snapshot(dir.path(), "{}");
        assert!(matches!(
            prepare_dir(dir.path()),
            Err(HypervisorError::Refused {
                operation: "snapshot",
                ..
            })
        ));
    }

    #[test]
    fn a_partial_stream_is_removed_unless_persisted() {
        let dir = tempfile::tempdir().unwrap();
        drop(Partial::create(dir.path()).unwrap());
        assert!(!dir.path().join(MEMORY_PARTIAL).exists());
        Partial::create(dir.path())
            .unwrap()
            .persist(MEMORY_FILE)
            .unwrap();
        assert!(dir.path().join(MEMORY_FILE).exists());
        assert!(!dir.path().join(MEMORY_PARTIAL).exists());
    }
}
