//! cloud-hypervisor's side of the VMM process: a detached spawn and the tail of its
//! stderr. Identity, signals and waiting are in [`crate::process`].

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmkit_core::HypervisorError;

use super::body::RunPaths;
use crate::process::read_stat;

/// A VMM process as started.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    /// Its start time, or `None` when it was already gone when looked at.
    pub(crate) start: Option<u64>,
}

fn open_log(path: &Path) -> Result<File, HypervisorError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| HypervisorError::io(format!("opening {}", path.display()), e))
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

/// Starts `binary args` so that it is not our child: the forked child makes a new
/// session, forks again and exits, and the grandchild execs the VMM. The VMM is thus
/// adopted by init (or the nearest subreaper), survives the daemon, gets no signal
/// meant for the daemon's process group, and is reaped by someone else when it ends.
/// Its stdin is `/dev/null`, its stdout and stderr are files in the run directory.
///
/// Blocking: call it from a blocking thread.
pub(crate) fn spawn_detached(
    binary: &Path,
    args: &[OsString],
    paths: &RunPaths,
) -> Result<Spawned, HypervisorError> {
    let stdout = open_log(&paths.stdout)?;
    let stderr = open_log(&paths.stderr)?;
    let (read_end, write_end) =
        pipe().map_err(|e| HypervisorError::io("creating a pipe for the VMM's pid", e))?;
    let write_fd = write_end.as_raw_fd();

    let mut cmd = Command::new(binary);
    cmd.args(args)
        .current_dir(&paths.dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: the closure runs in the forked child before exec. It calls only
    // async-signal-safe functions (setsid, fork, write, _exit) and allocates nothing.
    // The intermediate child reports the grandchild's pid through the pipe and exits
    // at once; the grandchild returns to exec the VMM, so a failing exec is still
    // reported by `spawn` through std's own error pipe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(io::Error::last_os_error()),
                0 => Ok(()),
                pid => {
                    let bytes = pid.to_ne_bytes();
                    libc::write(write_fd, bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(0)
                }
            }
        });
    }
    let mut intermediate =
        spawn_retrying_busy(&mut cmd).map_err(|source| HypervisorError::Spawn {
            binary: binary.to_owned(),
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

/// The last lines the VMM wrote to stderr, for error messages.
pub(crate) fn stderr_tail(paths: &RunPaths) -> String {
    const MAX: u64 = 2048;
    let read = || -> io::Result<String> {
        let mut file = File::open(&paths.stderr)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_owned())
    };
    match read() {
        Ok(text) if !text.is_empty() => text,
        _ => "(no output on stderr)".to_owned(),
    }
}
