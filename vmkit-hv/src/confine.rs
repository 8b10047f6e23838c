//! Confining a VMM: what the daemon does as root before the VMM starts.
//!
//! For a [`MachineConfig`] with a [`Confinement`], both backends:
//!
//! 1. check that they can confine at all (root, a usable cgroup hierarchy), and fail
//!    with what to do otherwise;
//! 2. record the VMM's cgroup directories in the run directory ([`Plan::dirs`]);
//! 3. hand the VM's disks to its uid and gid, mode 0600 (at every start: a restore or
//!    a clone writes them as root), and its TAP (`TUNSETOWNER`, `TUNSETGROUP`), so
//!    that the VMM can open them and no other VMM can;
//! 4. create its cgroup with the limits of [`crate::cgroup::Limits`];
//! 5. start the VMM through [`crate::spawn`] with the [`Credentials`] of the jail.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vmkit_core::{Confinement, HypervisorError, MachineConfig};

use crate::cgroup::{self, Hierarchy, Limits, VmCgroup};
use crate::spawn::Credentials;

/// What a confined start will do, decided before anything is changed.
#[derive(Debug)]
pub(crate) struct Plan {
    confinement: Confinement,
    hierarchy: Hierarchy,
    /// The directories of the VMM's cgroup, to record before they exist.
    pub(crate) dirs: Vec<PathBuf>,
}

/// A VMM's confinement, in place: its files and TAP are its uid's, its cgroup exists.
#[derive(Debug)]
pub(crate) struct Jail {
    confinement: Confinement,
    cgroup: VmCgroup,
    /// The VM's TAP, opened and attached by vmkit, for a VMM that takes it as a
    /// descriptor (QEMU): `/dev/net/tun` may be root's only.
    tap: Option<OwnedFd>,
}

fn cannot(why: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::InvalidConfig(format!(
        "cannot confine the VMM: {why}; or turn confinement off ([confinement] enabled = \
         \"off\" in the daemon's configuration, or no ManagerConfig::confinement)"
    ))
}

/// The plan for `config`, or `None` when it asks for no confinement.
pub(crate) fn plan(config: &MachineConfig) -> Result<Option<Plan>, HypervisorError> {
    let Some(confinement) = config.confinement else {
        return Ok(None);
    };
    if confinement.uid == 0 || confinement.gid == 0 {
        return Err(HypervisorError::InvalidConfig(
            "a confined VMM needs a uid and gid other than 0".to_owned(),
        ));
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Err(cannot(
            "only root can run a VMM as another uid and place it in a cgroup; run vmkit as root",
        ));
    }
    let hierarchy = cgroup::detect().map_err(|e| {
        cannot(format!(
            "{e}; mount cgroup2 with the cpu and memory controllers (or cgroup v1 cpu, memory \
             and pids)"
        ))
    })?;
    let dirs = hierarchy.dirs(&config.vm.to_string());
    Ok(Some(Plan {
        confinement,
        hierarchy,
        dirs,
    }))
}

impl Plan {
    /// Hands the disks and the TAP of `config` to the VMM's uid and creates its cgroup,
    /// whose memory limit also allows `extra_mib` (what the backend knows its VMM needs
    /// beyond its own overhead, such as TCG's code cache).
    pub(crate) fn apply(
        self,
        config: &MachineConfig,
        extra_mib: u64,
    ) -> Result<Jail, HypervisorError> {
        let Confinement {
            uid, gid, limits, ..
        } = self.confinement;
        for disk in &config.disks {
            own(&disk.path, uid, gid)?;
        }
        let tap = config
            .nic
            .as_ref()
            .map(|nic| open_tap(&nic.tap, uid, gid))
            .transpose()?;
        let limits = Limits::new(config.vcpus, config.memory_mib + extra_mib, &limits);
        let cgroup = self
            .hierarchy
            .create(&config.vm.to_string(), &limits)
            .map_err(|e| HypervisorError::io("cannot create the VMM's cgroup", e))?;
        Ok(Jail {
            confinement: self.confinement,
            cgroup,
            tap,
        })
    }
}

impl Jail {
    /// The VM's TAP, attached, when it has one.
    pub(crate) fn tap(&self) -> Option<&OwnedFd> {
        self.tap.as_ref()
    }

    /// What the child needs to enter the jail.
    pub(crate) fn credentials(&self) -> Result<Credentials, HypervisorError> {
        let cgroup_procs = self
            .cgroup
            .open_procs()
            .map_err(|e| HypervisorError::io("cannot open the VMM's cgroup", e))?;
        Ok(Credentials {
            cgroup_procs,
            uid: self.confinement.uid,
            gid: self.confinement.gid,
            groups: kvm_group().into_iter().collect(),
        })
    }
}

/// Rewrites the CPU limits of the cgroup in `dirs` for `vcpus` (after a live resize).
pub(crate) fn set_vcpus(
    dirs: &[PathBuf],
    confinement: &Confinement,
    vcpus: u32,
    memory_mib: u64,
) -> Result<(), HypervisorError> {
    if dirs.is_empty() {
        return Ok(());
    }
    VmCgroup::from_dirs(dirs.to_vec())
        .apply(&Limits::new(vcpus, memory_mib, &confinement.limits))
        .map_err(|e| HypervisorError::io("cannot update the VMM's cgroup limits", e))
}

/// Removes the cgroup in `dirs`, killing whatever still runs there. Idempotent.
pub(crate) async fn remove_cgroup(dirs: &[PathBuf]) -> Result<(), HypervisorError> {
    if dirs.is_empty() {
        return Ok(());
    }
    VmCgroup::from_dirs(dirs.to_vec())
        .remove()
        .await
        .map_err(|e| HypervisorError::io("cannot remove the VMM's cgroup", e))
}

/// The group of `/dev/kvm` when only its group may open it (the usual `kvm` group).
fn kvm_group() -> Option<u32> {
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    (meta.mode() & 0o006 != 0o006).then_some(meta.gid())
}

/// Makes `path` (a file or a device node; links are followed) owned by `uid`:`gid`
/// with mode 0600.
fn own(path: &Path, uid: u32, gid: u32) -> Result<(), HypervisorError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
        HypervisorError::io(
            format!("cannot hand {} to the VMM's uid {uid}", path.display()),
            e,
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| HypervisorError::io(format!("cannot set mode 0600 on {}", path.display()), e))
}

/// Makes the persistent TAP `name` usable by `uid` and `gid` (`TUNSETOWNER`,
/// `TUNSETGROUP`), in this thread's network namespace, and returns a descriptor
/// attached to it (close-on-exec). The TAP must exist and no VMM may hold it.
pub(crate) fn open_tap(name: &str, uid: u32, gid: u32) -> Result<OwnedFd, HypervisorError> {
    let op = || format!("cannot hand the TAP {name} to the VMM's uid {uid}");
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| HypervisorError::io(op(), e))?;
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(HypervisorError::InvalidConfig(format!(
            "TAP name {name:?} is not 1 to 15 bytes"
        )));
    }
    // TUNSETIFF as root would make a missing TAP: it must exist (vmkit-net made it).
    let c_name = std::ffi::CString::new(bytes).map_err(|_| {
        HypervisorError::InvalidConfig(format!("TAP name {name:?} holds a NUL byte"))
    })?;
    // SAFETY: if_nametoindex reads the NUL-terminated name and nothing else.
    if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
        return Err(HypervisorError::InvalidConfig(format!(
            "the TAP {name} does not exist in this network namespace; the network backend \
             makes it when the VM is created or the daemon starts"
        )));
    }
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and
    // arrays); all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // The flags the TAP was made with (vmkit-net): a tap, no packet info, one queue.
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    let fd = tun.as_raw_fd();
    // SAFETY: `fd` is an open /dev/net/tun file for the whole call, and TUNSETIFF
    // reads and writes one `ifreq`, which `ifr` is, NUL-terminated by the check above.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
    if rc < 0 {
        return Err(HypervisorError::io(op(), std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETOWNER and TUNSETGROUP take the id by value; `fd` is attached.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOWNER, libc::c_ulong::from(uid)) };
    if rc < 0 {
        return Err(HypervisorError::io(op(), std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETGROUP, libc::c_ulong::from(gid)) };
    if rc < 0 {
        return Err(HypervisorError::io(op(), std::io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(tun))
}

/// Whether VMMs can be confined on this host, as `vmkit doctor` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfinementReport {
    /// vmkit runs as root (needed to run VMMs as other uids and place them in cgroups).
    pub root: bool,
    /// The cgroup hierarchy VMMs would get (version and controllers), or why none.
    pub cgroups: Result<String, String>,
    /// Whether the QEMU program takes vmkit's `-sandbox` (seccomp) options.
    pub qemu_sandbox: bool,
}

impl ConfinementReport {
    /// Whether a confined QEMU VMM can start here.
    pub fn qemu_ready(&self) -> bool {
        self.root && self.cgroups.is_ok() && self.qemu_sandbox
    }
}

/// Looks at what confining VMMs needs on this host, with `qemu` as the QEMU program.
/// Blocking: it runs `qemu -sandbox ... -version`.
pub fn probe_confinement(qemu: &Path) -> ConfinementReport {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    // Options are parsed before -version exits, so a QEMU without seccomp fails here.
    let qemu_sandbox = std::process::Command::new(qemu)
        .args(["-sandbox", crate::qemu::SANDBOX, "-version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ConfinementReport {
        root,
        cgroups: cgroup::detect().map(|h| h.describe()),
        qemu_sandbox,
    }
}
