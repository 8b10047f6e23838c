//! The run directory's layout, config checks, and the request bodies vmkit sends.
//!
//! Everything cloud-hypervisor is told is decided here, from a [`MachineConfig`], so
//! that one unit test can pin the exact JSON.

use std::path::{Path, PathBuf};

use cloud_hypervisor_client::models;
use vmkit_core::{DiskFormat, HypervisorError, MachineConfig};

use super::config::ChConfig;

/// The guest's vsock context id. Each VM has its own VMM and its own vsock device, so
/// every guest can use the first id that is not reserved (0–2 are).
pub(crate) const GUEST_CID: i64 = 3;
/// The entropy source handed to the guest's virtio-rng.
pub(crate) const RNG_SOURCE: &str = "/dev/urandom";
/// What vmkit appends to every kernel command line (the serial port is the console).
pub(crate) const CONSOLE_ARG: &str = "console=ttyS0";
/// Name of the file in a snapshot directory that holds the VM config.
pub(crate) const SNAPSHOT_CONFIG: &str = "config.json";

const MIB: u64 = 1 << 20;
/// Longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest Linux interface name (`IFNAMSIZ` less its NUL).
const MAX_IFNAME: usize = 15;

/// Where everything of one VMM lives inside its run directory.
#[derive(Clone, Debug)]
pub(crate) struct RunPaths {
    pub(crate) dir: PathBuf,
    /// The REST API socket (`--api-socket path=...`).
    pub(crate) api: PathBuf,
    /// The hybrid-vsock Unix socket.
    pub(crate) vsock: PathBuf,
    /// The serial console, written by cloud-hypervisor.
    pub(crate) console: PathBuf,
    /// The VMM's own stdout and stderr.
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
    /// What the backend needs after a daemon restart (the console cap).
    pub(crate) state: PathBuf,
    /// The event monitor's output (`--event-monitor path=...`).
    pub(crate) events: PathBuf,
}

/// The API socket's file name in a run directory.
pub(crate) const API_SOCKET: &str = "api.sock";

impl RunPaths {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            api: dir.join(API_SOCKET),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            stdout: dir.join("vmm.stdout.log"),
            stderr: dir.join("vmm.stderr.log"),
            state: dir.join("vmkit-ch.json"),
            events: dir.join("events.json"),
        }
    }
}

fn invalid(message: impl Into<String>) -> HypervisorError {
    HypervisorError::InvalidConfig(message.into())
}

/// Makes every path of `config` absolute (against the daemon's working directory):
/// the VMM runs in the run directory, where relative paths would mean something else.
pub(crate) fn absolutize(config: &MachineConfig) -> Result<MachineConfig, HypervisorError> {
    let abs = |p: &Path| {
        std::path::absolute(p)
            .map_err(|e| HypervisorError::io(format!("resolving {}", p.display()), e))
    };
    let mut out = config.clone();
    out.run_dir = abs(&config.run_dir)?;
    out.kernel = abs(&config.kernel)?;
    out.initramfs = config.initramfs.as_deref().map(abs).transpose()?;
    for disk in &mut out.disks {
        disk.path = abs(&disk.path)?;
    }
    Ok(out)
}

/// Checks what this backend needs of a config before anything is started.
pub(crate) fn validate(config: &MachineConfig) -> Result<(), HypervisorError> {
    if config.disks.is_empty() {
        return Err(invalid("no root disk"));
    }
    for disk in &config.disks {
        if disk.format != DiskFormat::Raw {
            return Err(invalid(format!(
                "{} is a {} disk; the cloud-hypervisor backend takes raw disks only",
                disk.path.display(),
                disk.format
            )));
        }
    }
    if config.vcpus == 0 {
        return Err(invalid("vcpus must be at least 1"));
    }
    if config.memory_mib < 64 {
        return Err(invalid("memory below 64 MiB"));
    }
    let paths = RunPaths::new(&config.run_dir);
    for socket in [&paths.api, &paths.vsock] {
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(invalid(format!(
                "{} is {len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
                socket.display()
            )));
        }
    }
    // `--api-socket path=...` is split at commas by cloud-hypervisor's option parser.
    if paths.api.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(invalid(format!(
            "the run directory {} contains a comma, which cloud-hypervisor's --api-socket cannot take",
            config.run_dir.display()
        )));
    }
    if let Some(nic) = &config.nic
        && (nic.tap.is_empty() || nic.tap.len() > MAX_IFNAME)
    {
        return Err(invalid(format!(
            "TAP name {:?} must be 1 to {MAX_IFNAME} bytes",
            nic.tap
        )));
    }
    Ok(())
}

/// A path as the UTF-8 string the API carries.
pub(crate) fn path_str(path: &Path) -> Result<String, HypervisorError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid(format!("{} is not valid UTF-8", path.display())))
}

fn to_i32(what: &str, n: u32) -> Result<i32, HypervisorError> {
    i32::try_from(n).map_err(|_| invalid(format!("{what} {n} is out of range")))
}

pub(crate) fn mib_to_bytes(mib: u64) -> Result<i64, HypervisorError> {
    mib.checked_mul(MIB)
        .and_then(|b| i64::try_from(b).ok())
        .ok_or_else(|| invalid(format!("{mib} MiB is out of range")))
}

/// The kernel command line vmkit boots with: the config's, then the serial console.
pub(crate) fn cmdline(config: &MachineConfig) -> String {
    let base = config.cmdline.trim();
    if base.is_empty() {
        CONSOLE_ARG.to_owned()
    } else {
        format!("{base} {CONSOLE_ARG}")
    }
}

/// The `vm.create` body for `config` (already validated and absolute).
pub(crate) fn vm_config(
    config: &MachineConfig,
    ch: &ChConfig,
) -> Result<models::VmConfig, HypervisorError> {
    let paths = RunPaths::new(&config.run_dir);

    let mut payload = models::PayloadConfig::new();
    payload.kernel = Some(path_str(&config.kernel)?);
    payload.initramfs = config.initramfs.as_deref().map(path_str).transpose()?;
    payload.cmdline = Some(cmdline(config));

    let mut vm = models::VmConfig::new(payload);
    vm.cpus = Some(models::CpusConfig::new(
        to_i32("vcpus", config.vcpus)?,
        to_i32("max_vcpus", config.max_vcpus.max(config.vcpus))?,
    ));

    let mut memory = models::MemoryConfig::new(mib_to_bytes(config.memory_mib)?);
    if ch.hotplug_memory_mib > 0 {
        memory.hotplug_size = Some(mib_to_bytes(ch.hotplug_memory_mib)?);
    }
    vm.memory = Some(memory);

    let disks = config
        .disks
        .iter()
        .map(|disk| {
            let mut d = models::DiskConfig::new();
            d.path = Some(path_str(&disk.path)?);
            d.readonly = Some(disk.read_only);
            // Always stated, never probed: a guest that writes a qcow2 header into
            // its raw disk must not get it read as qcow2 on the next boot.
            d.image_type = Some(models::ImageType::Raw);
            Ok(d)
        })
        .collect::<Result<Vec<_>, HypervisorError>>()?;
    vm.disks = Some(disks);

    if let Some(nic) = &config.nic {
        let mut net = models::NetConfig::new();
        net.tap = Some(nic.tap.clone());
        net.mac = Some(nic.mac.to_string());
        vm.net = Some(vec![net]);
    }

    vm.rng = Some(models::RngConfig::new(RNG_SOURCE.to_owned()));
    // A guest kernel panic is reported as an event (see the `events` module).
    vm.pvpanic = Some(true);

    let mut serial = models::SerialConfig::new(models::ConsoleMode::File);
    serial.file = Some(path_str(&paths.console)?);
    vm.serial = Some(serial);
    vm.console = Some(models::ConsoleConfig::new(models::ConsoleMode::Off));

    vm.vsock = Some(models::VsockConfig::new(GUEST_CID, path_str(&paths.vsock)?));
    if config.confinement.is_some() {
        // cloud-hypervisor adds the paths of the config (kernel, disks, serial file,
        // vsock socket) itself; the run directory is where it makes its sockets.
        vm.landlock_enable = Some(true);
        vm.landlock_rules = Some(landlock_rules(config, None)?);
    }
    Ok(vm)
}

/// The landlock rules of a confined VMM beyond the paths of its config: its run
/// directory (read-write) and, on restore, the snapshot it loads (read-only).
pub(crate) fn landlock_rules(
    config: &MachineConfig,
    snapshot: Option<&Path>,
) -> Result<Vec<models::LandlockConfig>, HypervisorError> {
    let mut rules = vec![models::LandlockConfig::new(
        path_str(&config.run_dir)?,
        "rw".to_owned(),
    )];
    if let Some(dir) = snapshot {
        rules.push(models::LandlockConfig::new(path_str(dir)?, "r".to_owned()));
    }
    Ok(rules)
}

/// Points the run-directory paths and disks in a snapshot's `config.json` at the
/// VM being restored, keeping everything else (CPUs, memory, MAC, ids) as it was
/// snapshotted. cloud-hypervisor restores devices from that file and offers no
/// other way to move them.
pub(crate) fn patch_snapshot_config(
    snapshot: &mut serde_json::Value,
    config: &MachineConfig,
    snapshot_dir: &Path,
) -> Result<(), HypervisorError> {
    let paths = RunPaths::new(&config.run_dir);
    let bad = |what: &str| {
        HypervisorError::Protocol(format!("the snapshot's {SNAPSHOT_CONFIG} has no {what}"))
    };
    let obj = snapshot.as_object_mut().ok_or_else(|| bad("object"))?;

    let vsock = obj
        .get_mut("vsock")
        .and_then(|v| v.as_object_mut())
        .ok_or_else(|| bad("vsock device"))?;
    vsock.insert("socket".into(), path_str(&paths.vsock)?.into());

    if let Some(serial) = obj.get_mut("serial").and_then(|v| v.as_object_mut())
        && serial.get("mode").and_then(|m| m.as_str()) == Some("File")
    {
        serial.insert("file".into(), path_str(&paths.console)?.into());
    }

    let disks = obj
        .get_mut("disks")
        .and_then(|v| v.as_array_mut())
        .ok_or_else(|| bad("disks"))?;
    if disks.len() != config.disks.len() {
        return Err(invalid(format!(
            "the snapshot has {} disks and the config {}",
            disks.len(),
            config.disks.len()
        )));
    }
    for (snap, disk) in disks.iter_mut().zip(&config.disks) {
        let snap = snap.as_object_mut().ok_or_else(|| bad("disk object"))?;
        snap.insert("path".into(), path_str(&disk.path)?.into());
    }

    if let (Some(nic), Some(net)) = (
        &config.nic,
        obj.get_mut("net")
            .and_then(|v| v.as_array_mut())
            .and_then(|a| a.first_mut())
            .and_then(|n| n.as_object_mut()),
    ) {
        net.insert("tap".into(), nic.tap.clone().into());
    }
    if config.confinement.is_some() {
        let rules = serde_json::to_value(landlock_rules(config, Some(snapshot_dir))?)
            .map_err(|e| HypervisorError::Protocol(format!("encoding landlock rules: {e}")))?;
        obj.insert("landlock_enable".into(), true.into());
        obj.insert("landlock_rules".into(), rules);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_core::{DiskConfig, VmId, VmName};

    fn config() -> MachineConfig {
        let mut c = MachineConfig::new(
            VmId::generate(),
            VmName::new("unit").expect("name"),
            "/run/vmkit/unit".into(),
            "/img/vmlinuz".into(),
        );
        c.disks
            .push(DiskConfig::new("/img/root.raw", DiskFormat::Raw));
        c
    }

    #[test]
    fn cmdline_gets_the_serial_console_once() {
        let mut c = config();
        assert_eq!(cmdline(&c), "console=ttyS0");
        c.cmdline = "  root=/dev/vda rw ".into();
        assert_eq!(cmdline(&c), "root=/dev/vda rw console=ttyS0");
    }

    #[test]
    fn a_qcow2_disk_is_refused() {
        let mut c = config();
        c.disks
            .push(DiskConfig::new("/img/data.qcow2", DiskFormat::Qcow2));
        assert!(matches!(
            validate(&c),
            Err(HypervisorError::InvalidConfig(m)) if m.contains("raw disks only")
        ));
    }

    #[test]
    fn a_run_dir_too_long_for_a_socket_is_refused() {
        let mut c = config();
        c.run_dir = PathBuf::from(format!("/{}", "d".repeat(120)));
        assert!(matches!(
            validate(&c),
            Err(HypervisorError::InvalidConfig(_))
        ));
    }

    #[test]
    fn a_comma_in_the_run_dir_is_refused() {
        let mut c = config();
        c.run_dir = "/run/a,b".into();
        assert!(matches!(
            validate(&c),
            Err(HypervisorError::InvalidConfig(_))
        ));
    }

    #[test]
    fn snapshot_paths_follow_the_restored_vm() {
        let mut c = config();
        c.run_dir = "/run/vmkit/new".into();
        let mut snap = serde_json::json!({
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "disks": [{"path": "/old/root.raw", "id": "_disk0", "image_type": "Raw"}],
            "serial": {"mode": "File", "file": "/run/vmkit/old/console.log"},
            "vsock": {"cid": 3, "socket": "/run/vmkit/old/vsock.sock", "id": "_vsock0"}
        });
        patch_snapshot_config(&mut snap, &c, Path::new("/snap")).expect("patch");
        assert_eq!(snap["vsock"]["socket"], "/run/vmkit/new/vsock.sock");
        assert_eq!(snap["vsock"]["id"], "_vsock0");
        assert_eq!(snap["serial"]["file"], "/run/vmkit/new/console.log");
        assert_eq!(snap["disks"][0]["path"], "/img/root.raw");
        assert_eq!(snap["disks"][0]["id"], "_disk0");
        assert_eq!(snap["cpus"]["boot_vcpus"], 2);
    }

    #[test]
    fn a_confined_restore_gets_landlock_with_its_run_dir_and_the_snapshot() {
        let mut c = config();
        c.run_dir = "/run/vmkit/new".into();
        c.confinement = Some(vmkit_core::Confinement::new(
            0x5000_0000,
            vmkit_core::CgroupLimits::default(),
        ));
        let mut snap = serde_json::json!({
            "disks": [{"path": "/old/root.raw", "image_type": "Raw"}],
            "vsock": {"cid": 3, "socket": "/run/vmkit/old/vsock.sock"}
        });
        patch_snapshot_config(&mut snap, &c, Path::new("/snap")).expect("patch");
        assert_eq!(snap["landlock_enable"], true);
        assert_eq!(
            snap["landlock_rules"],
            serde_json::json!([
                {"path": "/run/vmkit/new", "access": "rw"},
                {"path": "/snap", "access": "r"}
            ])
        );
    }

    #[test]
    fn a_snapshot_with_other_disks_is_refused() {
        let mut snap = serde_json::json!({
            "disks": [],
            "vsock": {"cid": 3, "socket": "/x"}
        });
        assert!(matches!(
            patch_snapshot_config(&mut snap, &config(), Path::new("/snap")),
            Err(HypervisorError::InvalidConfig(_))
        ));
    }
}
