//! The VMM process: its identity (pid and start time), signals and waiting for it to go.
//!
//! QEMU runs daemonized, so it is not our child: we cannot `wait` for it and its pid
//! may be recycled once it is gone. A process counts as the VMM only while
//! `/proc/<pid>/stat` shows the start time recorded at launch; signals go through a
//! pidfd opened *before* that check, so the check and the signal refer to the same
//! process even if the pid is recycled in between.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiter looks whether the process is gone.
const POLL: Duration = Duration::from_millis(20);

/// The fields of `/proc/<pid>/stat` that identify a process and tell whether it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from its last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 is the state, field 22 the start time.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// Reads `/proc/<pid>/stat`; `None` when there is no such process.
pub(crate) fn read_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(&text).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat does not parse"),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Who the VMM process is: its pid, its start time and, for handles that lack the
/// start time, a path its command line must contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VmmProcess {
    /// Process id.
    pub pid: u32,
    /// Start time from `/proc/<pid>/stat`; 0 when unknown.
    pub start_time: u64,
    /// A path that appears in the VMM's command line (its QMP socket).
    pub marker: PathBuf,
}

impl VmmProcess {
    /// Whether the process runs and is the VMM (not a zombie, not a recycled pid).
    pub fn is_alive(&self) -> bool {
        let Ok(Some(stat)) = read_stat(self.pid) else {
            return false;
        };
        if matches!(stat.state, 'Z' | 'X' | 'x') {
            return false;
        }
        if self.start_time != 0 {
            return stat.start_time == self.start_time;
        }
        cmdline_contains(self.pid, &self.marker)
    }

    /// Sends SIGKILL if the process is still the VMM; a gone process is not an error.
    pub fn kill(&self) -> io::Result<()> {
        match pidfd_open(self.pid) {
            Ok(Some(pidfd)) => {
                // The pidfd pins the process: if it is the VMM now, the signal reaches
                // the VMM and nothing else.
                if !self.is_alive() {
                    return Ok(());
                }
                pidfd_send_signal(&pidfd, libc::SIGKILL)
            }
            Ok(None) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                // Kernels before 5.3: check and signal, with a window of a few
                // instructions in which the pid could be recycled.
                if !self.is_alive() {
                    return Ok(());
                }
                let pid = i32::try_from(self.pid)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
                match nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                ) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
                    Err(e) => Err(io::Error::from(e)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the process to be gone; true when it is.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Whether the NUL-separated command line of `pid` contains `needle` as an argument
/// or inside one.
pub(crate) fn cmdline_contains(pid: u32, needle: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = needle.as_os_str().as_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Opens a pidfd; `None` when the process does not exist.
fn pidfd_open(pid: u32) -> io::Result<Option<OwnedFd>> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(err),
        };
    }
    let fd = i32::try_from(fd)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call (we borrow it); the
    // siginfo pointer is null, which the call defines as "like kill(2)".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(()); // exited in the meantime
        }
        return Err(err);
    }
    Ok(())
}

/// Reads a pid file as QEMU writes it (the pid and a newline).
pub(crate) fn read_pidfile(path: &Path) -> io::Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_parentheses_and_spaces_in_the_command_name() {
        let text = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 4 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(
            parse_stat(text),
            Some(ProcStat {
                state: 'S',
                start_time: 987654
            })
        );
    }

    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let stat = read_stat(pid).unwrap().unwrap();
        let me = VmmProcess {
            pid,
            start_time: stat.start_time,
            marker: PathBuf::new(),
        };
        assert!(me.is_alive());
        let recycled = VmmProcess {
            start_time: stat.start_time + 1,
            ..me
        };
        assert!(
            !recycled.is_alive(),
            "a pid with another start time is not ours"
        );
    }

    #[test]
    fn killing_a_recycled_pid_sends_nothing() {
        let pid = std::process::id();
        let stat = read_stat(pid).unwrap().unwrap();
        let impostor = VmmProcess {
            pid,
            start_time: stat.start_time + 1,
            marker: PathBuf::new(),
        };
        impostor.kill().unwrap();
        // Still here: the signal was not sent to this test process.
        assert!(read_stat(pid).unwrap().is_some());
    }

    #[test]
    fn a_missing_process_has_no_stat() {
        assert_eq!(read_stat(u32::MAX / 2).unwrap(), None);
    }
}
