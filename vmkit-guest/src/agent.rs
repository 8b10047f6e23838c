//! The real in-guest handler, used by the `vmkit-agent` binary.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::watch;

use crate::message::{ExecRequest, ExitStatus, HelloInfo};
use crate::server::{Handler, OutputSink};

/// `PATH` given to commands when neither the agent nor the request has one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bytes read from a command's pipe at a time.
const READ_CHUNK: usize = 64 << 10;
/// After the command exits, how long to wait for more output from processes it left behind
/// holding its pipes.
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// Delay between answering a shutdown request and going down, so the answer gets out.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(250);

/// The in-guest [`Handler`]: runs commands with the agent's privileges and powers the
/// guest off with `reboot(2)`.
///
/// - `hello` reports this crate's version, the kernel's boot id and release, and the CPU
///   architecture.
/// - `exec` starts `argv` in a new process group with the request's environment added to
///   the agent's, pipes `stdin` in, streams stdout and stderr in chunks as they come, and
///   kills the whole group with `SIGKILL` when the timeout passes (reported as
///   `timed_out`) or when the request is cancelled because the host went away.
/// - `shutdown` syncs the filesystems, answers, and shortly after calls `reboot(2)`.
///
/// It assumes the agent is not PID 1 (an init reaps orphans and owns the shutdown path).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SystemHandler {}

impl SystemHandler {
    /// A handler for the system the agent runs on.
    pub fn new() -> Self {
        SystemHandler {}
    }
}

#[async_trait::async_trait]
impl Handler for SystemHandler {
    async fn hello(&self) -> HelloInfo {
        let boot_id = tokio::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .await
            .map(|id| id.trim().to_owned())
            .unwrap_or_default();
        let kernel = nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        HelloInfo::new(
            env!("CARGO_PKG_VERSION"),
            boot_id,
            kernel,
            std::env::consts::ARCH,
        )
    }

    async fn exec(&self, req: ExecRequest, out: OutputSink) -> Result<ExitStatus, String> {
        run(req, &out).await
    }

    async fn shutdown(&self, reboot: bool) -> Result<(), String> {
        tokio::task::spawn_blocking(nix::unistd::sync)
            .await
            .map_err(|err| format!("sync failed: {err}"))?;
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DELAY).await;
            let mode = if reboot {
                nix::sys::reboot::RebootMode::RB_AUTOBOOT
            } else {
                nix::sys::reboot::RebootMode::RB_POWER_OFF
            };
            let result = tokio::task::spawn_blocking(move || {
                nix::unistd::sync();
                nix::sys::reboot::reboot(mode)
            })
            .await;
            tracing::error!(?result, reboot, "reboot(2) returned");
        });
        Ok(())
    }
}

/// Kills a process group when dropped, unless disarmed: the cleanup for cancelled execs.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH (group already gone) is fine.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy)]
enum Pipe {
    Stdout,
    Stderr,
}

async fn run(req: ExecRequest, out: &OutputSink) -> Result<ExitStatus, String> {
    let ExecRequest {
        argv,
        env,
        cwd,
        stdin,
        timeout_ms,
    } = req;
    let (program, args) = argv.split_first().ok_or("argv is empty")?;
    let mut command = Command::new(program);
    command.args(args);
    if std::env::var_os("PATH").is_none() && !env.iter().any(|(key, _)| key == "PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    command.envs(env);
    if let Some(cwd) = &cwd {
        command.current_dir(cwd);
    }
    command
        .stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot start `{program}`: {err}"))?;
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    let mut group = GroupGuard { pgid };

    let child_stdin = child.stdin.take();
    let child_stdout = child.stdout.take();
    let child_stderr = child.stderr.take();
    let (exited_tx, exited_rx) = watch::channel(false);

    let wait = async {
        let limit = timeout_ms.map(Duration::from_millis);
        let (status, timed_out) = match limit {
            Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
                Ok(status) => (status, false),
                Err(_) => {
                    group.kill();
                    (child.wait().await, true)
                }
            },
            None => (child.wait().await, false),
        };
        group.disarm();
        exited_tx.send_replace(true);
        (status, timed_out)
    };
    let feed = async {
        if let Some(mut pipe) = child_stdin {
            let mut exited = exited_rx.clone();
            tokio::select! {
                // A command that exits without reading all of its input is not an error.
                _ = pipe.write_all(&stdin) => {}
                _ = exited.wait_for(|exited| *exited) => {}
            }
        }
    };
    let ((status, timed_out), (), (), ()) = tokio::join!(
        wait,
        pump(child_stdout, out, Pipe::Stdout, exited_rx.clone()),
        pump(child_stderr, out, Pipe::Stderr, exited_rx.clone()),
        feed,
    );
    let status = status.map_err(|err| format!("waiting for `{program}` failed: {err}"))?;
    Ok(ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out,
    })
}

/// Streams one pipe to the host until it closes, or until it stays quiet for
/// [`DRAIN_GRACE`] after the command exited.
async fn pump<R>(pipe: Option<R>, out: &OutputSink, which: Pipe, mut exited: watch::Receiver<bool>)
where
    R: AsyncRead + Unpin,
{
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut draining = false;
    loop {
        let read = if draining {
            match tokio::time::timeout(DRAIN_GRACE, pipe.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                read = pipe.read(&mut buf) => read,
                _ = exited.wait_for(|exited| *exited) => {
                    draining = true;
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let sent = match which {
            Pipe::Stdout => out.stdout(&buf[..n]).await,
            Pipe::Stderr => out.stderr(&buf[..n]).await,
        };
        if sent.is_err() {
            break;
        }
    }
}
