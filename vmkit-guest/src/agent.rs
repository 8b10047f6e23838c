//! The real in-guest handler, used by the `vmkit-agent` binary.

mod files;
mod grow;
mod hotplug;
mod logs;
mod metrics;
mod network;
mod session;
mod ssh;
mod system;
mod upgrade;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::watch;

use crate::message::{ExecRequest, ExitStatus, HelloInfo};
use crate::ops::{
    GrowReport, HardenReport, HardenRequest, LogsRequest, Metrics, NetworkConfig, SessionRequest,
    SshInfo, UpgradeReport, UpgradeRequest, WriteFileRequest,
};
use crate::server::{Handler, InputStream, OutputSink, SessionInput};

pub use hotplug::online_hotplugged;

/// `PATH` given to commands when neither the agent nor the request has one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bytes read from a command's pipe at a time.
const READ_CHUNK: usize = 64 << 10;
/// After the command exits, how long to wait for more output from processes it left behind
/// holding its pipes.
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// Delay between answering a shutdown request and going down, so the answer gets out.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(250);

/// The in-guest [`Handler`]: runs commands with the agent's privileges, manages the
/// guest's network, host name, SSH keys, files and users, reports its load and logs,
/// replaces the agent binary, and powers the guest off.
///
/// - `hello` reports this crate's version, the kernel's boot id and release, and the CPU
///   architecture.
/// - `exec` starts `argv` in a new process group with the request's environment added to
///   the agent's, pipes `stdin` in, streams stdout and stderr in chunks as they come, and
///   kills the whole group with `SIGKILL` when the timeout passes (reported as
///   `timed_out`) or when the request is cancelled because the host went away.
/// - `shutdown` syncs the filesystems, answers, and shortly after asks systemd to power
///   off or reboot (`systemctl`) when systemd is PID 1, else calls `reboot(2)`.
/// - `configure_network` talks netlink: finds the interface by MAC, sets its MTU, brings
///   it up, replaces its IPv4 addresses with the one given, replaces the default route
///   and writes `/etc/resolv.conf` atomically.
/// - `set_hostname` calls `sethostname(2)` and rewrites `/etc/hostname` and the
///   `127.0.1.1` line of `/etc/hosts`.
/// - `install_ssh_keys` rewrites the block vmkit manages in the user's
///   `~/.ssh/authorized_keys` (mode 0600, `~/.ssh` 0700, both owned by the user). The
///   default user is the one named in `/etc/vmkit/default-user`, else `root`.
/// - `read_file` and `write_file` stream files; writes are atomic (temporary file in the
///   same directory, fsync, rename, fsync of the directory).
/// - `metrics` samples `/proc` and `statvfs(3)`, and asks Docker when it is installed.
/// - `logs` runs `journalctl` for a unit, or reads the end of a file; both can follow.
/// - `harden` creates the deploy user with `useradd` (sudo without a password, the SSH
///   keys of the default user), writes `/etc/ssh/sshd_config.d/50-vmkit.conf` and reloads
///   sshd.
/// - `grow_filesystems` grows the ext4 filesystems mounted at `/` and `/data` to their
///   block devices, online, with the kernel's `EXT4_IOC_RESIZE_FS` (no tool needed).
/// - `ssh_info` reports whether `/usr/sbin/sshd` exists, the public keys in
///   `/etc/ssh/ssh_host_*_key.pub` and the user in `/etc/vmkit/default-user`. When sshd
///   is installed without host keys it makes them first: with
///   `systemctl start vmkit-ssh-keygen.service` when systemd runs the system and has that
///   unit (the base image's first-boot unit, so that the two never write the same keys
///   at once), else with `ssh-keygen -A`.
/// - `session` starts `argv` (or the user's login shell, as `-sh`, `-bash`, ...) in a new
///   session (`setsid`) as the user (root by default: uid, gid, groups, `HOME`, `USER`,
///   `LOGNAME`, `SHELL`, the home directory as working directory, an environment of its
///   own), with a pty as its controlling terminal or with pipes. It writes the host's
///   input to it, resizes the pty, sends signals to its process group, and on a hang-up
///   sends `SIGHUP` and, two seconds later, `SIGKILL`. It ends when the process has
///   exited and its output is drained; the group is killed if the session's future is
///   dropped (the host went away).
/// - `upgrade` takes the new binary from the channel, checks its
///   SHA-256 and that it runs (`--version`), renames it over the running binary, and exits
///   shortly after answering so that systemd (`Restart=always`) or init (`respawn`)
///   starts the new one.
///
/// It assumes the agent is not PID 1 (an init reaps orphans and owns the shutdown path).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SystemHandler {
    root: PathBuf,
    agent_path: Option<PathBuf>,
    restart_after_upgrade: bool,
    /// Serialises the edits of configuration files (authorized_keys, hosts, ...).
    edits: Arc<tokio::sync::Mutex<()>>,
    /// Held while an upgrade runs.
    upgrading: Arc<tokio::sync::Mutex<()>>,
}

impl Default for SystemHandler {
    fn default() -> Self {
        SystemHandler {
            root: PathBuf::from("/"),
            agent_path: None,
            restart_after_upgrade: true,
            edits: Arc::default(),
            upgrading: Arc::default(),
        }
    }
}

impl SystemHandler {
    /// A handler for the system the agent runs on.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads and writes the system's configuration (`etc/...`, home directories) under
    /// `root` instead of `/`, and leaves services alone (no sshd reload): for tests.
    /// Paths the host names (files, logs) are used as they are.
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    /// Installs upgrades at `path` instead of over the running executable.
    pub fn with_agent_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent_path = Some(path.into());
        self
    }

    /// Whether to exit after an upgrade so that the supervisor starts the new binary
    /// (default true; tests turn it off).
    pub fn with_restart_after_upgrade(mut self, restart: bool) -> Self {
        self.restart_after_upgrade = restart;
        self
    }

    /// `path` (absolute, as in the guest) under the configured root.
    fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Whether this handler manages the live system (root `/`), so that it may touch
    /// services.
    fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// Whether systemd is the init of this system.
fn systemd_is_init() -> bool {
    std::fs::read_to_string("/proc/1/comm").is_ok_and(|comm| comm.trim() == "systemd")
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
            if systemd_is_init() {
                let verb = if reboot { "reboot" } else { "poweroff" };
                match run_tool("systemctl", &["--no-block", verb], TOOL_TIMEOUT).await {
                    Ok(_) => return,
                    Err(err) => {
                        tracing::warn!(error = %err, "systemctl {verb} failed; calling reboot(2)")
                    }
                }
            }
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

    async fn configure_network(&self, config: NetworkConfig) -> Result<(), String> {
        let _edit = self.edits.lock().await;
        network::configure(self, &config).await
    }

    async fn set_hostname(&self, hostname: String) -> Result<(), String> {
        let _edit = self.edits.lock().await;
        system::set_hostname(self, &hostname).await
    }

    async fn install_ssh_keys(
        &self,
        user: Option<String>,
        keys: Vec<String>,
    ) -> Result<(), String> {
        let _edit = self.edits.lock().await;
        system::install_ssh_keys(self, user, keys).await
    }

    async fn read_file(&self, path: String, limit: u64, out: OutputSink) -> Result<u64, String> {
        files::read(&path, limit, &out).await
    }

    async fn write_file(&self, req: WriteFileRequest, input: InputStream) -> Result<u64, String> {
        files::write(self, req, input).await
    }

    async fn metrics(&self, interval: Duration) -> Result<Metrics, String> {
        metrics::collect(interval).await
    }

    async fn logs(&self, req: LogsRequest, out: OutputSink) -> Result<(), String> {
        logs::send(req, &out).await
    }

    async fn harden(&self, req: HardenRequest) -> Result<HardenReport, String> {
        let _edit = self.edits.lock().await;
        system::harden(self, req).await
    }

    async fn upgrade(
        &self,
        req: UpgradeRequest,
        input: InputStream,
    ) -> Result<UpgradeReport, String> {
        upgrade::upgrade(self, req, input).await
    }

    async fn ssh_info(&self) -> Result<SshInfo, String> {
        ssh::info(self).await
    }

    async fn session(
        &self,
        req: SessionRequest,
        input: SessionInput,
        out: OutputSink,
    ) -> Result<ExitStatus, String> {
        session::run(self, req, input, &out).await
    }

    async fn grow_filesystems(&self) -> Result<GrowReport, String> {
        let points: Vec<PathBuf> = grow::GROWN_MOUNTS.iter().map(|p| self.path(p)).collect();
        tokio::task::spawn_blocking(move || {
            let points: Vec<&Path> = points.iter().map(PathBuf::as_path).collect();
            grow::grow(&points)
        })
        .await
        .map_err(|e| format!("growing the filesystems failed: {e}"))
    }
}

/// How long a system tool (`useradd`, `systemctl`, `docker`, ...) may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// The most output of a system tool that is kept.
const TOOL_OUTPUT: usize = 1 << 20;

/// A command for a system tool: `PATH` set when the agent has none, stdin closed, killed
/// when dropped.
fn tool(program: &str) -> Command {
    let mut command = Command::new(program);
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    command.stdin(Stdio::null()).kill_on_drop(true);
    command
}

/// Runs a system tool to its end and returns its standard output; a failure (it cannot
/// start, exits non-zero or takes longer than `limit`) is a sentence with its stderr.
async fn run_tool(program: &str, args: &[&str], limit: Duration) -> Result<String, String> {
    let mut command = tool(program);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let child = command
        .spawn()
        .map_err(|err| format!("cannot run `{shown}`: {err}"))?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| format!("`{shown}` did not finish within {}s", limit.as_secs()))?
        .map_err(|err| format!("waiting for `{shown}` failed: {err}"))?;
    let text =
        |bytes: &[u8]| String::from_utf8_lossy(&bytes[..bytes.len().min(TOOL_OUTPUT)]).into_owned();
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        Err(format!(
            "`{shown}` failed ({}): {}",
            output.status,
            text(&output.stderr).trim()
        ))
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
