//! The VMM process, as both backends see it: its identity (pid and start time),
//! signals that cannot reach a recycled pid, and waiting for it to be gone.
//!
//! Neither backend's VMM is our child (both are spawned detached, see
//! `crate::spawn`), so we cannot `wait` for it and its pid may be recycled once it is gone.
//! A process counts as the VMM only while `/proc/<pid>/stat` shows the start time
//! recorded at launch (or, when that is unknown, while its command line names the
//! VMM's control socket). Signals go through a pidfd opened *before* that check, so
//! the check and the signal refer to the same process even if the pid is recycled in
//! between.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmkit_core::VmmHandle;

/// How often a waiter without a pidfd looks whether the process is gone.
const POLL: Duration = Duration::from_millis(20);

/// The fields of `/proc/<pid>/stat` that identify a process and tell whether it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// State letter (`R`, `S`, `Z`, ...).
    pub(crate) state: char,
    /// Start time in clock ticks since boot.
    pub(crate) start_time: u64,
}

impl ProcStat {
    /// A zombie (or dead) process is gone for our purposes: only its parent's `wait`
    /// is left, and that parent is not us.
    pub(crate) fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
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

/// Reads `/proc/<pid>/stat`; `None` when there is no such process (pid 0 included).
pub(crate) fn read_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    if pid == 0 {
        return Ok(None);
    }
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
    pub(crate) pid: u32,
    /// Start time from `/proc/<pid>/stat`; 0 when unknown.
    pub(crate) start_time: u64,
    /// A path that appears in the VMM's command line (its control socket).
    pub(crate) marker: PathBuf,
}

impl VmmProcess {
    /// The VMM a handle names; its control socket is the marker.
    pub(crate) fn from_handle(handle: &VmmHandle) -> Self {
        Self {
            pid: handle.pid,
            start_time: handle.pid_start,
            marker: handle.control_socket.clone(),
        }
    }

    /// Whether the process runs and is the VMM (not a zombie, not a recycled pid).
    pub(crate) fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Ok(Some(stat)) if !stat.is_gone() => self.matches(&stat),
            _ => false,
        }
    }

    /// Whether `pid` is still the VMM, in whatever state (a dying process included).
    fn is_same_process(&self) -> bool {
        match read_stat(self.pid) {
            Ok(Some(stat)) => self.matches(&stat),
            _ => false,
        }
    }

    /// Whether `stat` (read for `self.pid`) is this VMM's: same start time or, when
    /// that is unknown, a command line naming the marker.
    fn matches(&self, stat: &ProcStat) -> bool {
        if self.start_time != 0 {
            return stat.start_time == self.start_time;
        }
        cmdline_names(self.pid, &self.marker)
    }

    /// Sends SIGKILL if the process is still the VMM; a gone process is not an error.
    pub(crate) fn kill(&self) -> io::Result<()> {
        self.signal(libc::SIGKILL).map(drop)
    }

    /// Sends `signal` if the process is still the VMM. Returns whether it was sent.
    ///
    /// A pidfd pins the process between the identity check and the signal, so a pid
    /// recycled in between is never hit. On kernels without pidfds (before 5.3) the
    /// check and `kill` leave a window of a few instructions.
    pub(crate) fn signal(&self, signal: libc::c_int) -> io::Result<bool> {
        match pidfd_open(self.pid) {
            Ok(None) => Ok(false),
            Ok(Some(pidfd)) => {
                if !self.is_alive() {
                    return Ok(false);
                }
                pidfd_send_signal(&pidfd, signal)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                if !self.is_alive() {
                    return Ok(false);
                }
                kill_pid(self.pid, signal)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the process to be gone; returns whether it is.
    ///
    /// "Gone" means every thread has exited, so its descriptors (the control socket's
    /// listener among them) are closed: a thread-group leader can show as a zombie
    /// while its other threads are still being torn down. The pidfd becomes readable
    /// exactly then; without pidfds `/proc` is polled.
    pub(crate) async fn wait_gone(&self, timeout: Duration) -> bool {
        let pidfd = match pidfd_open(self.pid) {
            Ok(None) => return true,
            Ok(Some(fd)) => fd,
            Err(_) => return self.poll_gone(timeout).await,
        };
        if !self.is_same_process() {
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

/// Whether the command line of `pid` is that of the VMM `marker` names, a path in its
/// run directory: `marker` is the program name the VMM was started with (`argv[0]`,
/// as QEMU's is `<run_dir>/qemu`), or the `path=` field of one argument (the control
/// socket: `path=SOCKET` for cloud-hypervisor), with commas doubled as QEMU's option
/// syntax escapes them. A process that merely mentions the path (an operator's
/// `tail -f`, an editor) does not match.
fn cmdline_names(pid: u32, marker: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    args_name(&cmdline, marker)
}

/// [`cmdline_names`] on a NUL-separated command line.
fn args_name(cmdline: &[u8], marker: &Path) -> bool {
    let path = marker.as_os_str().as_encoded_bytes();
    if path.is_empty() {
        return false;
    }
    if cmdline.split(|&b| b == 0).next() == Some(path) {
        return true;
    }
    let mut field = b"path=".to_vec();
    for &b in path {
        field.push(b);
        if b == b',' {
            field.push(b',');
        }
    }
    cmdline.split(|&b| b == 0).any(|arg| {
        // Fields are separated by single commas; a doubled comma is part of a value.
        let mut start = 0;
        let mut i = 0;
        while i <= arg.len() {
            if i == arg.len() || arg[i] == b',' {
                if i + 1 < arg.len() && arg[i] == b',' && arg[i + 1] == b',' {
                    i += 2;
                    continue;
                }
                if arg[start..i] == field[..] {
                    return true;
                }
                start = i + 1;
            }
            i += 1;
        }
        false
    })
}

/// The live processes whose command line names `marker` as a VMM's (see
/// [`cmdline_names`]): the VMMs a backend started with it.
pub(crate) fn processes_named(marker: &Path) -> io::Result<Vec<VmmProcess>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || !cmdline_names(pid, marker) {
            continue;
        }
        if let Ok(Some(stat)) = read_stat(pid)
            && !stat.is_gone()
        {
            found.push(VmmProcess {
                pid,
                start_time: stat.start_time,
                marker: marker.to_owned(),
            });
        }
    }
    Ok(found)
}

/// The file in a run directory naming the VMM started there (`<pid> <start time>`),
/// for backends whose VMM command line may not name the directory.
pub(crate) const IDENTITY_FILE: &str = "vmkit-vmm.id";

/// Records `vmm` as the VMM of `run_dir`, for [`discard_run_dir`].
pub(crate) fn write_identity(run_dir: &Path, vmm: &VmmProcess) -> io::Result<()> {
    std::fs::write(
        run_dir.join(IDENTITY_FILE),
        format!("{} {}\n", vmm.pid, vmm.start_time),
    )
}

/// The VMM recorded in `run_dir` by [`write_identity`], if it still runs.
pub(crate) fn recorded_identity(run_dir: &Path) -> Option<VmmProcess> {
    let text = std::fs::read_to_string(run_dir.join(IDENTITY_FILE)).ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let pid = u32::try_from(fields.next()?.ok()?).ok()?;
    let start_time = fields.next()?.ok()?;
    let vmm = VmmProcess {
        pid,
        start_time,
        marker: run_dir.to_owned(),
    };
    (start_time != 0 && vmm.is_alive()).then_some(vmm)
}

/// Kills every VMM started in `run_dir` (found by `marker`, a file name in `run_dir`
/// that its command line names as [`cmdline_names`] says, or recorded with
/// [`write_identity`]), waits for them to be gone, and removes the directory (see
/// [`vmkit_core::Hypervisor::discard`]). Other processes that name files there
/// (an operator's `tail -f console.log`) are left alone.
pub(crate) async fn discard_run_dir(
    run_dir: &Path,
    marker: &str,
    wait: Duration,
) -> Result<(), vmkit_core::HypervisorError> {
    use vmkit_core::HypervisorError;
    let mut vmms = processes_named(&run_dir.join(marker))
        .map_err(|e| HypervisorError::io("cannot list processes in /proc", e))?;
    if let Some(recorded) = recorded_identity(run_dir)
        && !vmms.iter().any(|v| v.pid == recorded.pid)
    {
        vmms.push(recorded);
    }
    for vmm in &vmms {
        tracing::warn!(pid = vmm.pid, run_dir = %run_dir.display(), "killing a VMM no record refers to");
        vmm.kill()
            .map_err(|e| HypervisorError::io(format!("cannot kill pid {}", vmm.pid), e))?;
    }
    for vmm in &vmms {
        if !vmm.wait_gone(wait).await {
            return Err(HypervisorError::Timeout {
                operation: "discard",
                timeout: wait,
            });
        }
    }
    match tokio::fs::remove_dir_all(run_dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HypervisorError::io(
            format!("cannot remove run dir {}", run_dir.display()),
            e,
        )),
    }
}

/// Opens a pidfd: `Ok(None)` when no such process exists, `Err` when the kernel has
/// no pidfds (before 5.3) or refuses one.
fn pidfd_open(pid: u32) -> io::Result<Option<OwnedFd>> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Ok(None);
    };
    if pid == 0 {
        return Ok(None);
    }
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(err),
        };
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Signals through a pidfd; `Ok(false)` when the process exited in the meantime.
fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<bool> {
    // SAFETY: the descriptor is open for the duration of the call (we borrow it); the
    // siginfo pointer is null and the flags 0, which the call defines as "like kill(2)".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc >= 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(err)
}

/// Signals by pid, for kernels without pidfds; `Ok(false)` when there is no such
/// process.
fn kill_pid(pid: u32, signal: libc::c_int) -> io::Result<bool> {
    use nix::sys::signal::Signal;
    let pid = i32::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    let signal = match signal {
        0 => None,
        n => Some(Signal::try_from(n).map_err(io::Error::from)?),
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
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
    fn no_signal_reaches_a_process_with_another_start_time() {
        let pid = std::process::id();
        let stat = read_stat(pid).unwrap().unwrap();
        let recycled = VmmProcess {
            pid,
            start_time: stat.start_time + 1,
            marker: PathBuf::new(),
        };
        assert!(!recycled.signal(0).expect("signal"));
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

    fn cmdline(args: &[&str]) -> Vec<u8> {
        args.iter().flat_map(|a| a.bytes().chain([0])).collect()
    }

    #[test]
    fn only_the_program_name_or_a_control_socket_path_field_names_the_vmm() {
        let sock = Path::new("/run/vmkit/run/00aa/qmp.sock");
        let qemu = cmdline(&[
            "qemu-system-x86_64",
            "-chardev",
            "socket,id=qmp,path=/run/vmkit/run/00aa/qmp.sock,server=on,wait=off",
        ]);
        let ch = cmdline(&[
            "cloud-hypervisor",
            "--api-socket",
            "path=/run/vmkit/run/00aa/qmp.sock",
        ]);
        let tail = cmdline(&["tail", "-f", "/run/vmkit/run/00aa/qmp.sock"]);
        let log = cmdline(&["less", "/run/vmkit/run/00aa/console.log"]);
        let longer = cmdline(&["x", "path=/run/vmkit/run/00aa/qmp.sock.old"]);
        let program = Path::new("/run/vmkit/run/00aa/qemu");
        let named = cmdline(&["/run/vmkit/run/00aa/qemu", "-S", "-M", "q35"]);
        let tail_program = cmdline(&["tail", "-f", "/run/vmkit/run/00aa/qemu"]);
        assert!(args_name(&qemu, sock));
        assert!(args_name(&ch, sock));
        assert!(!args_name(&tail, sock), "a mention is not a VMM");
        assert!(!args_name(&log, sock));
        assert!(!args_name(&longer, sock), "another file");
        assert!(args_name(&named, program), "argv[0] names the VMM");
        assert!(!args_name(&tail_program, program), "only as argv[0]");
    }

    #[test]
    fn a_socket_path_with_commas_matches_in_its_escaped_form() {
        let sock = Path::new("/data/a,b/qmp.sock");
        let escaped = cmdline(&["q", "socket,id=qmp,path=/data/a,,b/qmp.sock,server=on"]);
        let split = cmdline(&["q", "socket,id=qmp,path=/data/a,b/qmp.sock"]);
        assert!(args_name(&escaped, sock));
        assert!(!args_name(&split, sock));
    }

    /// A process that holds its command line until its stdin closes or it is killed.
    fn holder(args: &[&str]) -> std::process::Child {
        std::process::Command::new("/bin/sh")
            .args(["-c", "read _"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh")
    }

    #[tokio::test]
    async fn discard_kills_the_vmm_and_spares_an_operator_reading_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let sock = run_dir.join("qmp.sock");
        let log = run_dir.join("console.log");
        let mut vmm = holder(&[
            "vmm",
            &format!("socket,id=qmp,path={},server=on", sock.display()),
        ]);
        let mut operator = holder(&["tail", "-f", &log.display().to_string()]);
        // Until the shells have exec'd, /proc shows the test binary's command line.
        let shows = |pid: u32, text: &str| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(text.len()).any(|w| w == text.as_bytes()))
        };
        while !shows(vmm.id(), "vmm") || !shows(operator.id(), "tail") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        discard_run_dir(&run_dir, "qmp.sock", Duration::from_secs(10))
            .await
            .unwrap();

        let status = vmm.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert_eq!(
            operator.try_wait().unwrap(),
            None,
            "the operator's process runs on"
        );
        assert!(!run_dir.exists());
        operator.kill().unwrap();
        operator.wait().unwrap();
    }

    #[test]
    fn pid_zero_is_never_alive() {
        let vmm = VmmProcess {
            pid: 0,
            start_time: 0,
            marker: PathBuf::new(),
        };
        assert!(!vmm.is_alive());
        assert!(!vmm.signal(libc::SIGKILL).expect("signal"));
    }
}
