//! The VMM process: a detached spawn, identity by start time, signals that cannot
//! reach a recycled pid, and waiting for the end.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmkit_core::HypervisorError;

use super::body::RunPaths;

/// A VMM process as started.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    /// Its start time, or `None` when it was already gone when looked at.
    pub(crate) start: Option<u64>,
}

/// Who a handle's process is: its pid, its start time (0 when unknown) and its API
/// socket (used to recognise it when the start time is unknown).
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub(crate) pid: u32,
    pub(crate) start: u64,
    pub(crate) socket: PathBuf,
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
        start: proc_stat(pid).filter(|s| !s.gone()).map(|s| s.start),
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

/// The fields of `/proc/PID/stat` the backend uses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProcStat {
    state: u8,
    start: u64,
}

impl ProcStat {
    /// A zombie (or dead) process is gone for our purposes: only its parent's `wait`
    /// is left, and that parent is not us.
    fn gone(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Reads state and start time (field 22, in clock ticks since boot) of `pid`.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start })
}

fn cmdline_mentions(pid: u32, socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = socket.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

impl Identity {
    /// Whether the process still runs and is the one this identity names: same start
    /// time, or (start time unknown) a command line naming the API socket.
    pub(crate) fn is_running(&self) -> bool {
        match proc_stat(self.pid) {
            None => false,
            Some(s) if s.gone() => false,
            Some(s) if self.start != 0 => s.start == self.start,
            Some(_) => cmdline_mentions(self.pid, &self.socket),
        }
    }

    /// Whether `pid` is still the process this identity names, in whatever state
    /// (a dying process included).
    fn same_process(&self) -> bool {
        match proc_stat(self.pid) {
            None => false,
            Some(s) if self.start != 0 => s.start == self.start,
            Some(_) => cmdline_mentions(self.pid, &self.socket),
        }
    }

    /// A pidfd for the pid: `Ok(None)` when no such process exists, `Err` when the
    /// kernel has no pidfds (before 5.3) or refuses one.
    fn pidfd(&self) -> io::Result<Option<OwnedFd>> {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return Ok(None);
        };
        if pid == 0 {
            return Ok(None);
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ESRCH) {
                Ok(None)
            } else {
                Err(err)
            };
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: pidfd_open returned a fresh descriptor that nothing else owns.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `signal` if the process is still this one. Returns whether it was sent.
    ///
    /// A pidfd pins the process between the identity check and the signal, so a pid
    /// recycled in between is never hit. On kernels without pidfds (before 5.3) the
    /// check and `kill` leave a window of a few instructions.
    pub(crate) fn signal(&self, signal: libc::c_int) -> io::Result<bool> {
        let sent = |rc: libc::c_long| {
            if rc >= 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(err)
            }
        };
        match self.pidfd() {
            Ok(None) => Ok(false),
            Ok(Some(pidfd)) => {
                if !self.is_running() {
                    return Ok(false);
                }
                // SAFETY: the pidfd is open; a null siginfo and flags 0 are allowed.
                sent(unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        signal,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                if !self.is_running() {
                    return Ok(false);
                }
                let pid = libc::pid_t::try_from(self.pid).map_err(io::Error::other)?;
                // SAFETY: kill takes a pid and a signal number; no memory is involved.
                sent(libc::c_long::from(unsafe { libc::kill(pid, signal) }))
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the process to end; returns whether it did.
    ///
    /// "Ended" means every thread has exited, so its descriptors (the API socket's
    /// listener among them) are closed: a thread-group leader can show as a zombie
    /// while its other threads are still being torn down. The pidfd becomes readable
    /// exactly then; without pidfds `/proc` is polled.
    pub(crate) async fn wait_gone(&self, timeout: Duration) -> bool {
        let pidfd = match self.pidfd() {
            Ok(None) => return true,
            Ok(Some(fd)) => fd,
            Err(_) => return self.poll_gone(timeout).await,
        };
        if !self.same_process() {
            return true;
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open (and is not
        // replaced) until the AsyncFd is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        };
        match registered {
            Ok(fd) => matches!(
                tokio::time::timeout(timeout, fd.readable()).await,
                Ok(Ok(_))
            ),
            Err(_) => self.poll_gone(timeout).await,
        }
    }

    async fn poll_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_stat_parses_and_we_are_running() {
        let me = std::process::id();
        let stat = proc_stat(me).expect("own stat");
        let id = Identity {
            pid: me,
            start: stat.start,
            socket: PathBuf::new(),
        };
        assert!(id.is_running());
        let recycled = Identity {
            start: stat.start + 1,
            ..id.clone()
        };
        assert!(
            !recycled.is_running(),
            "another start time is another process"
        );
        assert!(
            !recycled.signal(0).expect("signal"),
            "no signal reaches a process with another start time"
        );
    }

    #[test]
    fn pid_zero_is_never_running() {
        let id = Identity {
            pid: 0,
            start: 0,
            socket: PathBuf::new(),
        };
        assert!(!id.is_running());
        assert!(!id.signal(libc::SIGKILL).expect("signal"));
    }
}
