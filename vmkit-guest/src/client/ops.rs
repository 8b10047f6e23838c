//! The management calls: network, host name, SSH keys, files, metrics, logs, reboot,
//! harden and upgrade. Every size and value the agent sends back is checked against what
//! was asked for before it is handed to the caller.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};

use super::{Client, ClientError, Deadline, ReplyStream, Route, RouteGuard, unexpected};
use crate::frame::encode_frame;
use crate::message::{Reply, Request, RequestFrame, base64_bytes};
use crate::ops::{
    GrowReport, HardenReport, HardenRequest, LogsRequest, MAX_LOG_LINE, Metrics, NetworkConfig,
    SshInfo, UpgradeReport, UpgradeRequest, UpgradeSource, WriteFileRequest,
};

/// The largest body chunk sent in one frame, before base64.
const MAX_UPLOAD_CHUNK: usize = 256 << 10;
/// Room left in a frame for the envelope around a body chunk.
const ENVELOPE_ROOM: usize = 256;
/// The most bytes of log lines [`Client::logs`] accepts in all.
pub(crate) const MAX_LOGS_BYTES: usize = 16 << 20;
/// The most entries of a metrics container map, and of a harden report's changes.
const MAX_ENTRIES: usize = 4096;
/// The longest container name or harden change accepted.
const MAX_TEXT: usize = 4096;

/// The serialize-only form of a body chunk, borrowing its bytes.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Outgoing<'a> {
    Chunk {
        #[serde(serialize_with = "base64_bytes::serialize")]
        data: &'a [u8],
    },
}

impl Client {
    /// Addresses the guest's interface whose MAC is `config.mac`, brings it up, routes
    /// through the gateway and writes the name servers. Idempotent; a new address replaces
    /// the old one.
    pub async fn configure_network(&self, config: &NetworkConfig) -> Result<(), ClientError> {
        self.call_ok(
            &Request::ConfigureNetwork(config.clone()),
            "configure_network",
        )
        .await
    }

    /// Sets the guest's host name (the kernel's, `/etc/hostname` and `/etc/hosts`).
    pub async fn set_hostname(&self, hostname: &str) -> Result<(), ClientError> {
        let request = Request::SetHostname {
            hostname: hostname.to_owned(),
        };
        self.call_ok(&request, "set_hostname").await
    }

    /// Replaces the SSH public keys vmkit manages in `user`'s `authorized_keys` (the
    /// image's default user when `None`); the file's other lines are kept. No keys removes
    /// vmkit's.
    pub async fn install_ssh_keys<I, S>(
        &self,
        user: Option<&str>,
        keys: I,
    ) -> Result<(), ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let request = Request::InstallSshKeys {
            user: user.map(str::to_owned),
            keys: keys.into_iter().map(Into::into).collect(),
        };
        self.call_ok(&request, "install_ssh_keys").await
    }

    /// Reads a whole file of at most `limit` bytes. A larger file is an error
    /// ([`ClientError::Remote`]); an agent that sends more than `limit` anyway breaks the
    /// protocol.
    pub async fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        let mut data = Vec::new();
        self.read_file_to(path, limit, &mut data).await?;
        Ok(data)
    }

    /// Reads a file of at most `limit` bytes into `out` as it arrives; returns its size.
    /// On an error, `out` may have received part of the file.
    pub async fn read_file_to<W>(
        &self,
        path: &str,
        limit: u64,
        out: &mut W,
    ) -> Result<u64, ClientError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let request = Request::ReadFile {
            path: path.to_owned(),
            limit,
        };
        let idle = Deadline::Idle(self.inner.config.call_timeout);
        let mut stream = self.open_stream(&request, idle).await?;
        let mut received: u64 = 0;
        while let Some(reply) = stream.next().await {
            match reply? {
                Reply::Data { data } => {
                    received = received.saturating_add(data.len() as u64);
                    if received > limit {
                        return Err(stream.fail(ClientError::Protocol(format!(
                            "the agent sent more of {path} than the {limit} bytes asked for"
                        ))));
                    }
                    if let Err(err) = out.write_all(&data).await {
                        return Err(stream.fail(ClientError::Source(Arc::new(err))));
                    }
                }
                Reply::Eof { size } if size == received => return Ok(size),
                Reply::Eof { size } => {
                    return Err(ClientError::Protocol(format!(
                        "the agent announced {size} bytes of {path} but sent {received}"
                    )));
                }
                other => return Err(stream.fail(unexpected("read_file", other))),
            }
        }
        Err(ClientError::Protocol(
            "read_file stream ended without an end of file".to_owned(),
        ))
    }

    /// Writes `data` to a file in the guest, atomically (a temporary file in the same
    /// directory, flushed, renamed over the target). Returns the bytes written. The data
    /// travels in chunks that fit the frame cap.
    pub async fn write_file(&self, req: WriteFileRequest, data: &[u8]) -> Result<u64, ClientError> {
        self.write_file_from(req, data.len() as u64, data).await
    }

    /// Like [`Client::write_file`], with the `size` bytes read from `reader`.
    pub async fn write_file_from<R>(
        &self,
        mut req: WriteFileRequest,
        size: u64,
        reader: R,
    ) -> Result<u64, ClientError>
    where
        R: AsyncRead + Unpin,
    {
        req.size = size;
        match self
            .call_with_body(&Request::WriteFile(req), size, reader)
            .await?
        {
            Reply::Written { size: written } if written == size => Ok(written),
            Reply::Written { size: written } => Err(ClientError::Protocol(format!(
                "the agent wrote {written} bytes of the {size} sent"
            ))),
            other => Err(unexpected("write_file", other)),
        }
    }

    /// Samples the guest's load, measuring the CPU over `interval` (at most 10 s). Every
    /// value is checked: percentages within 0–100, finite numbers, bounded maps.
    pub async fn metrics(&self, interval: Duration) -> Result<Metrics, ClientError> {
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let request = Request::Metrics {
            interval_ms: Some(interval_ms),
        };
        let deadline = Instant::now() + interval + self.inner.config.call_timeout;
        match self.call_until(&request, deadline).await? {
            Reply::Metrics(metrics) => {
                check_metrics(&metrics).map_err(ClientError::Protocol)?;
                Ok(metrics)
            }
            other => Err(unexpected("metrics", other)),
        }
    }

    /// The last `req.lines` lines (at most 5000) of a unit's journal or a file. `follow`
    /// is ignored here; see [`Client::follow_logs`]. The agent may send no more lines than
    /// asked for, none longer than 16 KiB and 16 MiB in all.
    pub async fn logs(&self, mut req: LogsRequest) -> Result<Vec<String>, ClientError> {
        req.follow = false;
        let max_lines = req.effective_lines() as usize;
        let idle = Deadline::Idle(self.inner.config.call_timeout);
        let mut stream = self.open_stream(&Request::Logs(req), idle).await?;
        let (mut lines, mut bytes) = (Vec::new(), 0usize);
        while let Some(reply) = stream.next().await {
            match reply? {
                Reply::Lines { lines: batch } => {
                    if let Err(err) = check_lines(&batch) {
                        return Err(stream.fail(err));
                    }
                    bytes = bytes.saturating_add(batch.iter().map(String::len).sum());
                    if lines.len() + batch.len() > max_lines || bytes > MAX_LOGS_BYTES {
                        return Err(stream.fail(ClientError::Protocol(format!(
                            "the agent sent more log than the {max_lines} lines asked for"
                        ))));
                    }
                    lines.extend(batch);
                }
                Reply::Ok => return Ok(lines),
                other => return Err(stream.fail(unexpected("logs", other))),
            }
        }
        Err(ClientError::Protocol(
            "logs stream ended without its end".to_owned(),
        ))
    }

    /// The last `req.lines` lines and then every new line as it is written, until the
    /// returned stream is dropped (which cancels the request in the agent).
    pub async fn follow_logs(&self, mut req: LogsRequest) -> Result<LogStream, ClientError> {
        req.follow = true;
        let stream = self
            .open_stream(&Request::Logs(req), Deadline::Never)
            .await?;
        Ok(LogStream {
            inner: stream,
            pending: VecDeque::new(),
            agent_done: false,
        })
    }

    /// Asks the agent to reboot the guest: `shutdown` with `reboot` set. `Ok` means the
    /// agent accepted; the connection closes as the guest goes down.
    pub async fn reboot(&self) -> Result<(), ClientError> {
        self.shutdown(true).await
    }

    /// Creates the deploy user (with sudo and the SSH keys) and tightens sshd: no root
    /// login, no passwords. Idempotent; the report says what changed.
    pub async fn harden(&self, req: HardenRequest) -> Result<HardenReport, ClientError> {
        match self.call(&Request::Harden(req)).await? {
            Reply::Hardened(report) => {
                check_report(&report).map_err(ClientError::Protocol)?;
                Ok(report)
            }
            other => Err(unexpected("harden", other)),
        }
    }

    /// Asks the guest to grow the filesystems mounted at `/` and `/data` to their
    /// disks (online, in the guest: the host never touches a guest's filesystem).
    /// Idempotent: a filesystem that fills its disk is reported unchanged.
    pub async fn grow_filesystems(&self) -> Result<GrowReport, ClientError> {
        match self.call(&Request::GrowFilesystems).await? {
            Reply::Grown(report) => {
                check_grow_report(&report).map_err(ClientError::Protocol)?;
                Ok(report)
            }
            other => Err(unexpected("grow_filesystems", other)),
        }
    }

    /// The guest's SSH facts: whether sshd is installed, its public host keys (the agent
    /// makes them first when sshd has none yet) and the image's default user. Checked:
    /// at most 16 keys, each an OpenSSH public key line of at most 16 KiB, and a user
    /// name of at most 256 bytes. Generating keys can take a while under emulation, so
    /// this waits twice the call timeout.
    pub async fn ssh_info(&self) -> Result<SshInfo, ClientError> {
        let deadline = Instant::now() + 2 * self.inner.config.call_timeout;
        match self.call_until(&Request::SshInfo, deadline).await? {
            Reply::SshInfo(info) => {
                check_ssh_info(&info).map_err(ClientError::Protocol)?;
                Ok(info)
            }
            other => Err(unexpected("ssh_info", other)),
        }
    }

    /// Sends a new agent binary over the channel. The agent checks it against `sha256`
    /// (64 hex digits), installs it atomically over itself and restarts shortly after
    /// answering; on a mismatch it keeps the installed binary and says so
    /// ([`ClientError::Remote`]).
    pub async fn upgrade(&self, binary: &[u8], sha256: &str) -> Result<UpgradeReport, ClientError> {
        let size = binary.len() as u64;
        let request = Request::Upgrade(UpgradeRequest {
            sha256: sha256.to_owned(),
            source: UpgradeSource::Upload { size },
        });
        let reply = self.call_with_body(&request, size, binary).await?;
        upgrade_report(reply, sha256)
    }

    async fn call_ok(&self, request: &Request, what: &str) -> Result<(), ClientError> {
        match self.call(request).await? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(what, other)),
        }
    }

    /// Sends `request` and then its `size`-byte body from `body` in `chunk` requests, and
    /// waits for the single reply. An early reply (an error) stops the sending; a failure
    /// while sending cancels the request in the agent.
    async fn call_with_body<R>(
        &self,
        request: &Request,
        size: u64,
        mut body: R,
    ) -> Result<Reply, ClientError>
    where
        R: AsyncRead + Unpin,
    {
        let call_timeout = self.inner.config.call_timeout;
        let max_frame = self.inner.config.max_frame;
        let (tx, mut rx) = oneshot::channel();
        let id = self.inner.shared.register(Route::Call(tx))?;
        let _route = RouteGuard {
            shared: &self.inner.shared,
            id,
        };
        self.send(id, request, Instant::now() + call_timeout)
            .await?;

        let chunk = max_frame
            .saturating_sub(ENVELOPE_ROOM)
            .checked_div(4)
            .map_or(1, |n| n * 3)
            .clamp(1, MAX_UPLOAD_CHUNK);
        let send_body = async {
            let mut buf = vec![0u8; usize::try_from(size).unwrap_or(chunk).min(chunk)];
            let mut left = size;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(chunk).min(chunk);
                body.read_exact(&mut buf[..want])
                    .await
                    .map_err(|err| ClientError::Source(Arc::new(err)))?;
                let frame = encode_frame(
                    &RequestFrame {
                        id,
                        request: Outgoing::Chunk { data: &buf[..want] },
                    },
                    max_frame,
                )?;
                self.send_frame(frame, Instant::now() + call_timeout)
                    .await?;
                left -= want as u64;
            }
            Ok::<(), ClientError>(())
        };
        let sent = tokio::select! {
            biased;
            early = &mut rx => return answered(early),
            sent = send_body => sent,
        };
        if let Err(err) = sent {
            self.cancel(id);
            return Err(err);
        }
        match timeout_at(Instant::now() + call_timeout, rx).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(result) => answered(result),
        }
    }
}

/// The reply a call's route delivered.
fn answered(
    result: Result<Result<Reply, ClientError>, oneshot::error::RecvError>,
) -> Result<Reply, ClientError> {
    match result {
        Err(_) => Err(ClientError::Closed),
        Ok(result) => result,
    }
}

fn upgrade_report(reply: Reply, sha256: &str) -> Result<UpgradeReport, ClientError> {
    match reply {
        Reply::Upgraded(report) if report.sha256.eq_ignore_ascii_case(sha256) => Ok(report),
        Reply::Upgraded(report) => Err(ClientError::Protocol(format!(
            "the agent reports installing {}, not the {sha256} sent",
            report.sha256
        ))),
        other => Err(unexpected("upgrade", other)),
    }
}

/// Checks a batch of log lines from the agent.
fn check_lines(lines: &[String]) -> Result<(), ClientError> {
    match lines.iter().find(|line| line.len() > MAX_LOG_LINE) {
        Some(line) => Err(ClientError::Protocol(format!(
            "the agent sent a log line of {} bytes, over the limit of {MAX_LOG_LINE}",
            line.len()
        ))),
        None => Ok(()),
    }
}

fn check_pct(name: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && (0.0..=100.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("the agent sent {name} = {value}, not a percentage"))
    }
}

/// Checks the values of a metrics reply.
fn check_metrics(m: &Metrics) -> Result<(), String> {
    check_pct("cpu_pct", m.cpu_pct)?;
    check_pct("mem_pct", m.mem_pct)?;
    check_pct("disk_pct", m.disk_pct)?;
    if let Some(pct) = m.data_disk_pct {
        check_pct("data_disk_pct", pct)?;
    }
    if m.mem_available_bytes > m.mem_total_bytes {
        return Err("the agent sent more available memory than there is".to_owned());
    }
    if let Some(load) = m.load.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
        return Err(format!("the agent sent a load average of {load}"));
    }
    if let Some(health) = &m.container_health {
        if health.len() > MAX_ENTRIES {
            return Err(format!(
                "the agent sent the health of {} containers, over the limit of {MAX_ENTRIES}",
                health.len()
            ));
        }
        if health.keys().any(|name| name.len() > MAX_TEXT) {
            return Err("the agent sent an overlong container name".to_owned());
        }
    }
    Ok(())
}

/// Checks the size of a harden report.
fn check_report(report: &HardenReport) -> Result<(), String> {
    if report.changes.len() > MAX_ENTRIES
        || report.user.len() > MAX_TEXT
        || report.changes.iter().any(|c| c.len() > MAX_TEXT)
    {
        return Err("the agent sent an oversized harden report".to_owned());
    }
    Ok(())
}

/// The most filesystems and failures a grow report may list: the agent looks at two
/// mount points.
const MAX_GROWN: usize = 16;

fn check_grow_report(report: &GrowReport) -> Result<(), String> {
    if report.filesystems.len() > MAX_GROWN
        || report.failures.len() > MAX_GROWN
        || report.failures.iter().any(|f| f.len() > MAX_TEXT)
        || report
            .filesystems
            .iter()
            .any(|f| f.mount.len() > MAX_TEXT || f.device.len() > MAX_TEXT)
    {
        return Err("the agent sent an oversized grow report".to_owned());
    }
    Ok(())
}

/// The most host keys an `ssh_info` may list (OpenSSH makes at most four types).
const MAX_HOST_KEYS: usize = 16;
/// The longest host key line accepted.
const MAX_HOST_KEY: usize = 16 << 10;
/// The longest user name accepted.
const MAX_USER: usize = 256;

fn check_ssh_info(info: &SshInfo) -> Result<(), String> {
    if info.host_keys.len() > MAX_HOST_KEYS {
        return Err(format!(
            "the agent sent {} host keys, over the limit of {MAX_HOST_KEYS}",
            info.host_keys.len()
        ));
    }
    let well_formed = |key: &String| {
        key.len() <= MAX_HOST_KEY
            && !key.chars().any(char::is_control)
            && key.split_whitespace().count() >= 2
    };
    if !info.host_keys.iter().all(well_formed) {
        return Err("the agent sent a host key that is not an OpenSSH public key line".to_owned());
    }
    if let Some(user) = &info.default_user
        && (user.is_empty() || user.len() > MAX_USER || user.chars().any(char::is_control))
    {
        return Err("the agent sent an invalid default user name".to_owned());
    }
    Ok(())
}

/// The lines of a followed log, from [`Client::follow_logs`]. Dropping it cancels the
/// request in the agent (also after an error such as [`ClientError::Lagged`]).
///
/// Read it promptly: like an [`ExecStream`](crate::ExecStream), it is dropped with
/// [`ClientError::Lagged`] when its buffer stays full for the call timeout.
pub struct LogStream {
    inner: ReplyStream,
    pending: VecDeque<String>,
    /// The agent ended the request itself (its last reply came), so there is nothing to
    /// cancel.
    agent_done: bool,
}

impl fmt::Debug for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStream")
            .field("id", &self.inner.id)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl LogStream {
    /// The next line. Ends (`None`) after the first error, or when the agent ends the log
    /// (a followed journal whose `journalctl` exited). Cancel safe.
    pub async fn next(&mut self) -> Option<Result<String, ClientError>> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(Ok(line));
            }
            match self.inner.next().await? {
                Ok(Reply::Lines { lines }) => {
                    if let Err(err) = check_lines(&lines) {
                        return Some(Err(self.inner.fail(err)));
                    }
                    self.pending.extend(lines);
                }
                Ok(Reply::Ok) => {
                    self.agent_done = true;
                    return None;
                }
                Ok(other) => return Some(Err(self.inner.fail(unexpected("logs", other)))),
                Err(err) => {
                    self.agent_done = matches!(err, ClientError::Remote(_));
                    return Some(Err(err));
                }
            }
        }
    }
}

impl Drop for LogStream {
    /// Cancels the request in the agent unless the agent ended it: it would otherwise
    /// follow the log until the connection closes.
    fn drop(&mut self) {
        if !self.agent_done {
            self.inner.client.cancel(self.inner.id);
        }
    }
}
