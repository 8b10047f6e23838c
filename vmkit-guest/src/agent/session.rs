//! Interactive sessions: a process with a pty or pipes whose input the host streams.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, Bytes};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::{Winsize, openpty};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::process::{ChildStdin, Command};
use tokio::sync::watch;

use super::system::{User, groups_of, lookup_user};
use super::{DEFAULT_PATH, Pipe, SystemHandler, pump};
use crate::message::ExitStatus;
use crate::ops::SessionRequest;
use crate::server::{OutputSink, SessionControl, SessionInput};

/// After a hang-up's `SIGHUP`, how long the process group has before `SIGKILL`.
const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// How often a hang-up looks whether the session's processes are gone.
const HANGUP_POLL: Duration = Duration::from_millis(50);

/// The signal with this SSH name (RFC 4254 6.10, without `SIG`).
pub(super) fn signal_named(name: &str) -> Option<Signal> {
    Some(match name {
        "ABRT" => Signal::SIGABRT,
        "ALRM" => Signal::SIGALRM,
        "FPE" => Signal::SIGFPE,
        "HUP" => Signal::SIGHUP,
        "ILL" => Signal::SIGILL,
        "INT" => Signal::SIGINT,
        "KILL" => Signal::SIGKILL,
        "PIPE" => Signal::SIGPIPE,
        "QUIT" => Signal::SIGQUIT,
        "SEGV" => Signal::SIGSEGV,
        "TERM" => Signal::SIGTERM,
        "USR1" => Signal::SIGUSR1,
        "USR2" => Signal::SIGUSR2,
        _ => return None,
    })
}

/// The live processes of the session `sid` (zombies left out), with their process
/// groups, from `/proc`.
fn members(sid: Pid) -> Vec<(Pid, Pid)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let pid: i32 = name.to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command's name, in parentheses: state, ppid, pgrp, session.
            let (_, rest) = stat.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().take(4).collect();
            let [state, _, pgrp, session] = fields.as_slice() else {
                return None;
            };
            (*state != "Z" && session.parse::<i32>().ok()? == sid.as_raw())
                .then(|| Some((Pid::from_raw(pid), Pid::from_raw(pgrp.parse().ok()?))))
                .flatten()
        })
        .collect()
}

/// Sends `signal` to every process group of the session `sid`: the shell's, and those
/// its job control made for background jobs.
fn signal_session(sid: Pid, signal: Signal) {
    let mut groups: Vec<Pid> = members(sid).into_iter().map(|(_, pgrp)| pgrp).collect();
    groups.push(sid);
    groups.sort_unstable();
    groups.dedup();
    for group in groups {
        // ESRCH (the group is gone) is fine.
        let _ = killpg(group, signal);
    }
}

/// Kills the whole session with `SIGKILL` when dropped, unless disarmed: the cleanup when
/// the session's future is dropped (the connection to the host closed).
struct SessionGuard {
    sid: Option<Pid>,
}

impl SessionGuard {
    fn kill(&mut self) {
        if let Some(sid) = self.sid.take() {
            signal_session(sid, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.sid = None;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Who a session runs as.
struct Identity {
    user: User,
    groups: Vec<Gid>,
}

fn identity(handler: &SystemHandler, user: Option<&str>) -> Result<Identity, String> {
    let name = user.unwrap_or("root");
    let user = match lookup_user(&handler.root, name)? {
        Some(user) => user,
        // An image without a passwd entry for root still has root.
        None if user.is_none() => User {
            name: "root".to_owned(),
            uid: 0,
            gid: 0,
            home: "/root".to_owned(),
            shell: "/bin/sh".to_owned(),
        },
        None => return Err(format!("there is no user `{name}` in the guest")),
    };
    let mut groups = vec![Gid::from_raw(user.gid)];
    for gid in groups_of(&handler.root, &user.name)? {
        let gid = Gid::from_raw(gid);
        if !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    Ok(Identity { user, groups })
}

/// A pty master, non-blocking, registered with the runtime.
struct Master(AsyncFd<OwnedFd>);

impl Master {
    fn new(fd: OwnedFd) -> io::Result<Master> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: an `OwnedFd` is a valid open descriptor that stays open, and is the
        // same, for as long as it is owned, which the `AsyncFd` does until dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|err| err.into_parts().1)?;
        Ok(Master(fd))
    }

    /// Writes some input. Cancel safe: nothing is written unless it returns.
    async fn write(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    fn resize(&self, cols: u16, rows: u16) {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `struct winsize`, which `size` is, from a valid
        // pointer; the fd is a pty master this function borrows.
        let rc = unsafe { nix::libc::ioctl(self.0.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "resizing a pty failed");
        }
    }
}

/// The pty's output, read as a pipe's is (so that [`pump`] streams it): end of file
/// when the last holder of the slave has closed it (EIO).
impl tokio::io::AsyncRead for &Master {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Ok(Err(err)) if err.raw_os_error() == Some(nix::libc::EIO) => {
                    return std::task::Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return std::task::Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Where the session's standard input goes.
enum Stdin<'a> {
    Pty(&'a Master),
    Pipe(Option<ChildStdin>),
}

impl Stdin<'_> {
    async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stdin::Pty(master) => master.write(data).await,
            Stdin::Pipe(Some(pipe)) => pipe.write(data).await,
            Stdin::Pipe(None) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// End of input: closes the pipe; nothing with a pty (the client sends ^D).
    fn close(&mut self) {
        if let Stdin::Pipe(pipe) = self {
            *pipe = None;
        }
    }
}

/// How the session's main loop ended.
enum Ended {
    Exited(io::Result<std::process::ExitStatus>),
    HungUp,
}

/// How long a connection to a port on the guest's loopback may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A session that is a TCP connection to `port` on the guest's loopback: the host's
/// input is written to it, what it sends is the session's output.
async fn relay_port(
    port: u16,
    input: SessionInput,
    out: &OutputSink,
) -> Result<ExitStatus, String> {
    let connect = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            return Err(format!(
                "nothing answers on port {port} in the guest: {err}"
            ));
        }
        Err(_) => return Err(format!("port {port} in the guest does not answer")),
    };
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.into_split();
    let (mut stdin, mut controls) = input.split();
    // Reading stops when the host hangs up (the session's end), not before: an app
    // may answer after its input ended.
    let (hung_up_tx, hung_up_rx) = watch::channel(false);
    let feed = async {
        let mut open = true;
        loop {
            tokio::select! {
                control = controls.next() => if control.is_none() {
                    break;
                },
                chunk = stdin.next(), if open => match chunk {
                    Some(chunk) => {
                        if writer.write_all(&chunk).await.is_err() {
                            open = false;
                        }
                    }
                    None => {
                        open = false;
                        let _ = writer.shutdown().await;
                    }
                },
            }
        }
        hung_up_tx.send_replace(true);
    };
    let output = pump(Some(reader), out, Pipe::Stdout, hung_up_rx);
    // The output ends when the app closes its side; the feed when the host hangs up
    // or its input ends and the output is done.
    tokio::select! {
        () = feed => {}
        () = output => {}
    }
    Ok(ExitStatus {
        code: Some(0),
        signal: None,
        timed_out: false,
    })
}

/// Runs a session for [`SystemHandler::session`](crate::Handler::session).
pub(super) async fn run(
    handler: &SystemHandler,
    req: SessionRequest,
    input: SessionInput,
    out: &OutputSink,
) -> Result<ExitStatus, String> {
    let SessionRequest {
        argv,
        user,
        env,
        pty,
        connect,
    } = req;
    if let Some(port) = connect {
        return relay_port(port, input, out).await;
    }
    let Identity { user, groups } = identity(handler, user.as_deref())?;
    let euid = nix::unistd::geteuid();
    let switch = euid.is_root();
    if !switch && euid.as_raw() != user.uid {
        return Err(format!(
            "the agent cannot start a session as `{}`: it does not run as root",
            user.name
        ));
    }

    let mut command = match argv.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args);
            command
        }
        None => {
            let base = Path::new(&user.shell)
                .file_name()
                .map_or_else(|| "sh".into(), |name| name.to_string_lossy());
            let mut command = Command::new(&user.shell);
            command.arg0(format!("-{base}"));
            command
        }
    };
    let shown = argv.first().unwrap_or(&user.shell).clone();
    let home = if Path::new(&user.home).is_dir() {
        user.home.as_str()
    } else {
        "/"
    };
    command
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell)
        .current_dir(home)
        .kill_on_drop(true);
    if let Some(pty) = &pty {
        command.env("TERM", &pty.term);
    }
    command.envs(env);

    let (master, slave) = match &pty {
        Some(size) => {
            let winsize = Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pair = openpty(&winsize, None).map_err(|err| format!("openpty failed: {err}"))?;
            let master = Master::new(pair.master)
                .map_err(|err| format!("cannot use the pty master: {err}"))?;
            (Some(master), Some(pair.slave))
        }
        None => (None, None),
    };
    match &slave {
        Some(slave) => {
            let stdio = || {
                slave
                    .try_clone()
                    .map(Stdio::from)
                    .map_err(|err| format!("cannot share the pty: {err}"))
            };
            command.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
        }
        None => {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let with_pty = slave.is_some();
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid, setuid) on
    // values prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            if with_pty && nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if switch {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot start `{shown}`: {err}"))?;
    // The child holds the slave now; the pty reports EIO once the child's side is gone.
    drop(command);
    drop(slave);
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    let mut guard = SessionGuard { sid: pgid };

    let (child_stdout, child_stderr) = (child.stdout.take(), child.stderr.take());
    let mut stdin_to = match &master {
        Some(master) => Stdin::Pty(master),
        None => Stdin::Pipe(child.stdin.take()),
    };
    let (exited_tx, exited_rx) = watch::channel(false);
    let (mut stdin, mut controls) = input.split();

    let main = async {
        let mut pending = Bytes::new();
        let mut stdin_open = true;
        let ended = loop {
            let data = pending.clone();
            tokio::select! {
                biased;
                control = controls.next() => match control {
                    Some(SessionControl::Resize { cols, rows }) => {
                        if let Some(master) = &master {
                            master.resize(cols, rows);
                        }
                    }
                    Some(SessionControl::Signal(name)) => match (signal_named(&name), pgid) {
                        // The session leader's group: the shell, or the command.
                        (Some(signal), Some(pgid)) => {
                            // ESRCH (the group is gone) is fine.
                            let _ = killpg(pgid, signal);
                        }
                        _ => tracing::debug!(signal = %name, "unknown signal ignored"),
                    },
                    None => break Ended::HungUp,
                },
                status = child.wait() => break Ended::Exited(status),
                written = stdin_to.write(&data), if !data.is_empty() => match written {
                    Ok(n) => pending.advance(n.min(pending.len())),
                    // The process closed its input: what comes for it is dropped.
                    Err(_) => {
                        pending.clear();
                        stdin_open = false;
                        stdin_to.close();
                    }
                },
                chunk = stdin.next(), if data.is_empty() && stdin_open => match chunk {
                    Some(chunk) => pending = chunk,
                    None => {
                        stdin_open = false;
                        stdin_to.close();
                    }
                },
            }
        };
        let status = match ended {
            Ended::Exited(status) => status,
            Ended::HungUp => {
                if let Some(sid) = pgid {
                    signal_session(sid, Signal::SIGHUP);
                    signal_session(sid, Signal::SIGCONT);
                }
                // The whole session, background jobs too, has the grace to end.
                let ended = async {
                    let status = child.wait().await;
                    while pgid.is_some_and(|sid| !members(sid).is_empty()) {
                        tokio::time::sleep(HANGUP_POLL).await;
                    }
                    status
                };
                let status = tokio::time::timeout(HANGUP_GRACE, ended).await;
                guard.kill();
                match status {
                    Ok(status) => status,
                    Err(_) => child.wait().await,
                }
            }
        };
        guard.disarm();
        exited_tx.send_replace(true);
        status
    };
    let output = async {
        match &master {
            Some(master) => pump(Some(master), out, Pipe::Stdout, exited_rx.clone()).await,
            None => {
                tokio::join!(
                    pump(child_stdout, out, Pipe::Stdout, exited_rx.clone()),
                    pump(child_stderr, out, Pipe::Stderr, exited_rx.clone()),
                );
            }
        }
    };
    let (status, ()) = tokio::join!(main, output);
    let status = status.map_err(|err| format!("waiting for `{shown}` failed: {err}"))?;
    Ok(ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out: false,
    })
}
