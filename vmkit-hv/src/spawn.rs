//! Starting a VMM process that is not our child, confined if asked.
//!
//! Both backends start their VMM with a double fork: the forked child makes a new
//! session, forks again and exits, and the grandchild execs the VMM. The VMM is thus
//! adopted by init (or the nearest subreaper), survives the daemon, gets no signal
//! meant for the daemon's process group, and is reaped by someone else when it ends.
//!
//! A confined VMM is moved in the grandchild, before `exec`, into its cgroup (by
//! writing `0` to each `cgroup.procs`, opened by the daemon beforehand), then drops
//! to its uid and gid with only the supplementary groups given (`kvm` where
//! `/dev/kvm` needs it). So it runs not one instruction of the VMM as root or outside
//! its cgroup.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmkit_core::HypervisorError;

use crate::process::read_stat;

/// What a confined VMM is given in the child before `exec`.
#[derive(Debug)]
pub(crate) struct Credentials {
    /// `cgroup.procs` of each hierarchy of its cgroup, open for writing.
    pub(crate) cgroup_procs: Vec<OwnedFd>,
    /// Its uid.
    pub(crate) uid: u32,
    /// Its gid.
    pub(crate) gid: u32,
    /// Its supplementary groups.
    pub(crate) groups: Vec<u32>,
}

/// How to start one VMM.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    /// The program.
    pub(crate) binary: &'a Path,
    /// Its arguments.
    pub(crate) args: &'a [OsString],
    /// Its working directory.
    pub(crate) cwd: &'a Path,
    /// Its stdout and stderr.
    pub(crate) stdout: File,
    pub(crate) stderr: File,
    /// Descriptors it inherits (listening sockets named on its command line).
    pub(crate) keep: &'a [RawFd],
    /// Its `argv[0]`, when not the program.
    pub(crate) arg0: Option<OsString>,
    /// Its confinement, if any.
    pub(crate) credentials: Option<&'a Credentials>,
}

/// A VMM process as started.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    /// Its start time, or `None` when it was already gone when looked at.
    pub(crate) start: Option<u64>,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `launch` detached (see the module docs). Stdin is `/dev/null`.
///
/// Blocking: call it from a blocking thread.
pub(crate) fn spawn_detached(launch: Launch<'_>) -> Result<Spawned, HypervisorError> {
    let (read_end, write_end) =
        pipe().map_err(|e| HypervisorError::io("creating a pipe for the VMM's pid", e))?;
    let write_fd = write_end.as_raw_fd();
    // Everything the child needs, allocated here: the child must not allocate.
    let keep: Vec<RawFd> = launch.keep.to_vec();
    let jail: Option<(Vec<RawFd>, libc::uid_t, libc::gid_t, Vec<libc::gid_t>)> =
        launch.credentials.map(|c| {
            (
                c.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect(),
                c.uid,
                c.gid,
                c.groups.clone(),
            )
        });

    let mut cmd = Command::new(launch.binary);
    cmd.args(launch.args)
        .current_dir(launch.cwd)
        .stdin(Stdio::null())
        .stdout(launch.stdout)
        .stderr(launch.stderr);
    if let Some(arg0) = launch.arg0 {
        cmd.arg0(arg0);
    }
    // SAFETY: the closure runs in the forked child before exec. It calls only
    // async-signal-safe functions (setsid, fork, write, fcntl, setgroups, setgid,
    // setuid, _exit) and allocates nothing. The intermediate child reports the
    // grandchild's pid through the pipe and exits at once; the grandchild returns to
    // exec the VMM, so a failing step there or a failing exec is still reported by
    // `spawn` through std's own error pipe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => return Err(io::Error::last_os_error()),
                0 => {}
                pid => {
                    let bytes = pid.to_ne_bytes();
                    libc::write(write_fd, bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(0)
                }
            }
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((procs, uid, gid, groups)) = &jail {
                // Into the cgroup first, while still allowed to move.
                for &fd in procs {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) == -1
                    || libc::setgid(*gid) == -1
                    || libc::setuid(*uid) == -1
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut intermediate =
        spawn_retrying_busy(&mut cmd).map_err(|source| HypervisorError::Spawn {
            binary: launch.binary.to_owned(),
            source,
        })?;
    drop(write_end);
    // The intermediate child has exited already or is about to: reap it.
    let _ = intermediate.wait();

    let mut bytes = [0u8; 4];
    File::from(read_end)
        .read_exact(&mut bytes)
        .map_err(|e| HypervisorError::io("reading the VMM's pid", e))?;
    let pid = u32::try_from(i32::from_ne_bytes(bytes))
        .map_err(|_| HypervisorError::Protocol("the VMM's pid is negative".into()))?;
    Ok(Spawned {
        pid,
        start: read_stat(pid)
            .ok()
            .flatten()
            .filter(|s| !s.is_gone())
            .map(|s| s.start_time),
    })
}

/// Spawns `cmd`, retrying a few times while the program is "text file busy": a
/// program that was just written (an upgrade, a test's stand-in) stays busy while
/// any process forked meanwhile still holds the writer's descriptor.
fn spawn_retrying_busy(cmd: &mut Command) -> io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
