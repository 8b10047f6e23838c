//! The agent side: [`serve`] reads requests and answers them with a [`Handler`].

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinError, JoinSet};

use crate::frame::{DEFAULT_MAX_FRAME, FrameError, decode, encode_frame, read_frame};
use crate::message::{
    ExecRequest, ExitStatus, HelloInfo, IdOnly, Reply, ReplyFrame, Request, RequestFrame,
    SESSION_WINDOW, base64_bytes,
};
use crate::ops::{
    DEFAULT_METRICS_INTERVAL_MS, GrowReport, HardenReport, HardenRequest, LogsRequest,
    MAX_LOG_LINE, MAX_METRICS_INTERVAL_MS, Metrics, NetworkConfig, SessionRequest, SshInfo,
    UpgradeReport, UpgradeRequest, UpgradeSource, WriteFileRequest,
};

/// Frames waiting for the writer task.
const WRITE_QUEUE: usize = 64;
/// Room left in a frame for the envelope around an output chunk.
const ENVELOPE_ROOM: usize = 256;
/// Longest error message sent to the host, in bytes.
const MAX_ERROR_MESSAGE: usize = 16 << 10;
/// Body chunks buffered per upload before the reader waits for the handler.
const INPUT_QUEUE: usize = 8;
/// Once this many requests are tracked for cancellation, finished ones are forgotten.
const PRUNE_RUNNING: usize = 256;
/// What each chunk of a session's standard input counts against [`SESSION_WINDOW`]
/// besides its bytes, so that a flood of tiny chunks is bounded too.
pub(crate) const STDIN_CHUNK_COST: usize = 64;
/// Resizes and signals queued for a session before the host is deemed to flood it.
const CONTROL_QUEUE: usize = 64;
/// How long a hung-up session's handler may take to end its process before its task is
/// aborted.
const HANGUP_LIMIT: Duration = Duration::from_secs(10);

/// Settings of [`serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The largest frame body accepted from the host or sent to it
    /// (default [`DEFAULT_MAX_FRAME`]).
    pub max_frame: usize,
    /// How many requests may be handled at once (default 64); reading waits when they are.
    pub max_in_flight: usize,
    /// The largest output chunk put in one frame, in bytes before base64 (default 64 KiB;
    /// lowered as needed to fit [`ServerConfig::max_frame`]).
    pub chunk_size: usize,
    /// How many requests with a body (`write_file`, `upgrade`) may receive it at once
    /// (default 4); more are refused with an error.
    pub max_uploads: usize,
    /// How long a handler waits for the next chunk of a body, and the reader for a handler
    /// to take one, before the upload is abandoned (default 30 s).
    pub input_timeout: Duration,
    /// How many sessions may run at once (default 16); more are refused with an error.
    /// Each also takes one of [`ServerConfig::max_in_flight`].
    pub max_sessions: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 64,
            chunk_size: 64 << 10,
            max_uploads: 4,
            input_timeout: Duration::from_secs(30),
            max_sessions: 16,
        }
    }
}

impl ServerConfig {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ServerConfig::max_frame`].
    pub fn max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }

    /// Sets [`ServerConfig::max_in_flight`].
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Sets [`ServerConfig::chunk_size`].
    pub fn chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    /// Sets [`ServerConfig::max_uploads`].
    pub fn max_uploads(mut self, max_uploads: usize) -> Self {
        self.max_uploads = max_uploads;
        self
    }

    /// Sets [`ServerConfig::input_timeout`].
    pub fn input_timeout(mut self, input_timeout: Duration) -> Self {
        self.input_timeout = input_timeout;
        self
    }

    /// Sets [`ServerConfig::max_sessions`].
    pub fn max_sessions(mut self, max_sessions: usize) -> Self {
        self.max_sessions = max_sessions;
        self
    }

    /// The chunk size actually used: base64 and the envelope must fit in `max_frame`.
    fn effective_chunk(&self) -> usize {
        let fits = self.max_frame.saturating_sub(ENVELOPE_ROOM) / 4 * 3;
        self.chunk_size.min(fits).max(1)
    }
}

/// [`serve`] stopped because of the channel, not because the host hung up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A request frame could not be read or was not a request.
    #[error("reading a request failed")]
    Read(#[source] FrameError),
    /// A reply could not be written.
    #[error("writing a reply failed")]
    Write(#[source] FrameError),
}

/// The error of a [`Handler`] method that this handler does not implement.
fn unsupported(what: &str) -> String {
    format!("`{what}` is unsupported by this agent")
}

/// What the agent does for each request. [`serve`] calls it from concurrent tasks.
///
/// Only `hello`, `exec` and `shutdown` must be implemented; every other method answers
/// "unsupported by this agent" unless overridden, so that a handler written for an older
/// version of this crate keeps compiling and the host learns what it lacks.
///
/// An `Err` from any method reaches the host as
/// [`ClientError::Remote`](crate::ClientError::Remote) with the message as it is.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Says who the agent is.
    async fn hello(&self) -> HelloInfo;

    /// Runs a command, sending its output through `out` as it comes, and returns how it
    /// ended. An `Err` (the command could not be started, say) reaches the host as
    /// [`ClientError::Remote`](crate::ClientError::Remote).
    async fn exec(&self, req: ExecRequest, out: OutputSink) -> Result<ExitStatus, String>;

    /// Powers the guest off or reboots it. Return before going down, so that the reply can
    /// reach the host.
    async fn shutdown(&self, reboot: bool) -> Result<(), String>;

    /// Addresses the interface whose MAC is `config.mac`, brings it up, routes through
    /// the gateway and writes the name servers. Idempotent.
    async fn configure_network(&self, config: NetworkConfig) -> Result<(), String> {
        let _ = config;
        Err(unsupported("configure_network"))
    }

    /// Sets the host name.
    async fn set_hostname(&self, hostname: String) -> Result<(), String> {
        let _ = hostname;
        Err(unsupported("set_hostname"))
    }

    /// Replaces the keys vmkit manages for `user` (the image's default user when `None`).
    async fn install_ssh_keys(
        &self,
        user: Option<String>,
        keys: Vec<String>,
    ) -> Result<(), String> {
        let _ = (user, keys);
        Err(unsupported("install_ssh_keys"))
    }

    /// Sends the file at `path` through [`OutputSink::data`] and returns its size; refuses
    /// a file of more than `limit` bytes.
    async fn read_file(&self, path: String, limit: u64, out: OutputSink) -> Result<u64, String> {
        let _ = (path, limit, out);
        Err(unsupported("read_file"))
    }

    /// Writes the `req.size` bytes of `input` to `req.path` atomically and returns how many
    /// were written.
    async fn write_file(&self, req: WriteFileRequest, input: InputStream) -> Result<u64, String> {
        let _ = (req, input);
        Err(unsupported("write_file"))
    }

    /// Samples the guest's load, measuring the CPU over `interval`.
    async fn metrics(&self, interval: Duration) -> Result<Metrics, String> {
        let _ = interval;
        Err(unsupported("metrics"))
    }

    /// Sends the last lines of a journal or file through [`OutputSink::lines`], then, when
    /// following, new lines until the future is dropped (the host cancelled or left).
    async fn logs(&self, req: LogsRequest, out: OutputSink) -> Result<(), String> {
        let _ = (req, out);
        Err(unsupported("logs"))
    }

    /// Creates the deploy user and tightens sshd; reports what changed.
    async fn harden(&self, req: HardenRequest) -> Result<HardenReport, String> {
        let _ = req;
        Err(unsupported("harden"))
    }

    /// Installs a new agent binary, from `input` (an upload) or from `req.source`'s URL,
    /// after checking its SHA-256, and arranges a restart shortly after returning.
    async fn upgrade(
        &self,
        req: UpgradeRequest,
        input: InputStream,
    ) -> Result<UpgradeReport, String> {
        let _ = (req, input);
        Err(unsupported("upgrade"))
    }

    /// Grows the filesystems mounted at `/` and `/data` to fill their disks, which
    /// the host may have grown while the VM was stopped; reports each one's size
    /// before and after.
    async fn grow_filesystems(&self) -> Result<GrowReport, String> {
        Err(unsupported("grow_filesystems"))
    }

    /// Reports the guest's SSH server: its public host keys (made first when sshd is
    /// installed without them), whether sshd is installed, the image's default user.
    async fn ssh_info(&self) -> Result<SshInfo, String> {
        Err(unsupported("ssh_info"))
    }

    /// Runs a session: starts the process `req` describes, writes what
    /// [`SessionInput`] brings to its standard input, applies its resizes and signals,
    /// sends its output through `out` as it comes and returns how it ended.
    ///
    /// When the host hangs up ([`SessionControls::next`] ends), end the process
    /// promptly; nothing more reaches the host. The future may also be dropped (the
    /// connection closed): the process must not outlive it.
    async fn session(
        &self,
        req: SessionRequest,
        input: SessionInput,
        out: OutputSink,
    ) -> Result<ExitStatus, String> {
        let _ = (req, input, out);
        Err(unsupported("session"))
    }
}

/// The host is gone: output can no longer be delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the connection to the host is closed")]
#[non_exhaustive]
pub struct OutputClosed;

/// Sends one request's streamed output to the host (an exec's stdout and stderr, a file's
/// data, log lines), in chunks that fit a frame.
///
/// Sending waits while the connection's write queue is full, so a slow host slows the
/// producer down instead of growing memory.
#[derive(Debug, Clone)]
pub struct OutputSink {
    id: u64,
    frames: mpsc::Sender<Vec<u8>>,
    max_frame: usize,
    chunk: usize,
    /// Set when the host hung up a session: nothing more is sent for it.
    muted: Option<Arc<AtomicBool>>,
}

/// The serialize-only form of a streamed reply, borrowing its contents.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Chunk<'a> {
    Stdout {
        #[serde(serialize_with = "base64_bytes::serialize")]
        data: &'a [u8],
    },
    Stderr {
        #[serde(serialize_with = "base64_bytes::serialize")]
        data: &'a [u8],
    },
    Data {
        #[serde(serialize_with = "base64_bytes::serialize")]
        data: &'a [u8],
    },
    Lines {
        lines: &'a [&'a str],
    },
    StdinAck {
        bytes: u64,
    },
}

impl OutputSink {
    /// Sends a piece of standard output.
    pub async fn stdout(&self, data: &[u8]) -> Result<(), OutputClosed> {
        for data in data.chunks(self.chunk) {
            self.send(&Chunk::Stdout { data }).await?;
        }
        Ok(())
    }

    /// Sends a piece of standard error.
    pub async fn stderr(&self, data: &[u8]) -> Result<(), OutputClosed> {
        for data in data.chunks(self.chunk) {
            self.send(&Chunk::Stderr { data }).await?;
        }
        Ok(())
    }

    /// Sends a piece of a file.
    pub async fn data(&self, data: &[u8]) -> Result<(), OutputClosed> {
        for data in data.chunks(self.chunk) {
            self.send(&Chunk::Data { data }).await?;
        }
        Ok(())
    }

    /// Sends log lines (without their line ends), in batches that fit a frame. A line
    /// longer than [`MAX_LOG_LINE`] bytes is cut to that length.
    pub async fn lines<S: AsRef<str>>(&self, lines: &[S]) -> Result<(), OutputClosed> {
        // JSON escapes at most six bytes per input byte (`\u001f`).
        let budget = (self.max_frame.saturating_sub(ENVELOPE_ROOM) / 6).max(1);
        let mut batch: Vec<&str> = Vec::new();
        let mut size = 0;
        for line in lines {
            let line = cut(line.as_ref(), MAX_LOG_LINE.min(budget));
            if !batch.is_empty() && size + line.len() + 3 > budget {
                self.send(&Chunk::Lines { lines: &batch }).await?;
                batch.clear();
                size = 0;
            }
            size += line.len() + 3;
            batch.push(line);
        }
        if !batch.is_empty() {
            self.send(&Chunk::Lines { lines: &batch }).await?;
        }
        Ok(())
    }

    async fn send(&self, chunk: &Chunk<'_>) -> Result<(), OutputClosed> {
        if self.is_muted() {
            return Err(OutputClosed);
        }
        let frame = ReplyFrame {
            id: self.id,
            reply: chunk,
        };
        match encode_frame(&frame, self.max_frame) {
            Ok(frame) => self.frames.send(frame).await.map_err(|_| OutputClosed),
            Err(err) => {
                // The chunk size is derived from max_frame, so this is a bug, not input.
                tracing::error!(error = %err, "output chunk does not fit a frame");
                Ok(())
            }
        }
    }
}

impl OutputSink {
    fn is_muted(&self) -> bool {
        self.muted
            .as_ref()
            .is_some_and(|muted| muted.load(Ordering::Acquire))
    }
}

/// One item of a session's standard input, as the reader queues it.
#[derive(Debug)]
enum StdinItem {
    Data(Bytes),
    Eof,
}

/// A resize or a signal the host sent to a running session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionControl {
    /// The terminal is now `cols` × `rows` (ignored without a pty).
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// Send this signal to the process group; its SSH name (`INT`, `TERM`, ...).
    Signal(String),
}

/// What the host sends to a session while it runs: its standard input, and resizes and
/// signals. [`SessionInput::split`] gives the two to separate futures, so that a process
/// that does not read its input still gets its signals.
#[derive(Debug)]
pub struct SessionInput {
    stdin: SessionStdin,
    controls: SessionControls,
}

impl SessionInput {
    /// Input that has ended and a host that has hung up: for a session that is refused.
    pub fn closed() -> Self {
        let (_, stdin) = mpsc::channel(1);
        let (_, controls) = mpsc::channel(1);
        SessionInput {
            stdin: SessionStdin {
                rx: stdin,
                queued: Arc::default(),
                acks: None,
            },
            controls: SessionControls { rx: controls },
        }
    }

    /// The standard input and the controls, apart.
    pub fn split(self) -> (SessionStdin, SessionControls) {
        (self.stdin, self.controls)
    }
}

/// A session's standard input, from the host's `chunk` requests.
///
/// Taking a chunk acknowledges it to the host, which may then send as much again
/// (see [`SESSION_WINDOW`](crate::SESSION_WINDOW)): take the next one only when the
/// process has taken the last, so that a process that does not read slows its sender.
#[derive(Debug)]
pub struct SessionStdin {
    rx: mpsc::Receiver<StdinItem>,
    queued: Arc<AtomicUsize>,
    acks: Option<OutputSink>,
}

impl SessionStdin {
    /// The next bytes for the process; `None` once the input has ended (the host sent
    /// `close_stdin`) or the host hung up. Cancel safe.
    pub async fn next(&mut self) -> Option<Bytes> {
        match self.rx.recv().await? {
            StdinItem::Eof => {
                self.rx.close();
                None
            }
            StdinItem::Data(data) => {
                let cost = data.len() + STDIN_CHUNK_COST;
                self.queued.fetch_sub(cost, Ordering::AcqRel);
                if let Some(acks) = &self.acks {
                    // A host that is gone needs no acknowledgement.
                    let _ = acks.send(&Chunk::StdinAck { bytes: cost as u64 }).await;
                }
                Some(data)
            }
        }
    }
}

/// A session's resizes and signals.
#[derive(Debug)]
pub struct SessionControls {
    rx: mpsc::Receiver<SessionControl>,
}

impl SessionControls {
    /// The next resize or signal; `None` when the host has hung up (it cancelled the
    /// session, broke its input window, or the connection closed): end the process.
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<SessionControl> {
        self.rx.recv().await
    }
}

/// A session the reader routes input to.
struct Session {
    stdin: mpsc::Sender<StdinItem>,
    controls: mpsc::Sender<SessionControl>,
    /// Stdin bytes (and chunk costs) queued and not yet taken by the handler.
    queued: Arc<AtomicUsize>,
    muted: Arc<AtomicBool>,
    stdin_closed: bool,
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A request's body stopped arriving before it was complete.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// No chunk came within [`ServerConfig::input_timeout`].
    #[error("the host stopped sending the request's body")]
    Stalled,
    /// The upload was abandoned: the host sent more than it announced, cancelled, or the
    /// handler was too slow to take a chunk.
    #[error("the request's body was abandoned before it was complete")]
    Abandoned,
}

/// The body of a request (`write_file`, an uploaded `upgrade`): the bytes of the `chunk`
/// requests the host sends after it, exactly as many as the request announced.
#[derive(Debug)]
pub struct InputStream {
    rx: Option<mpsc::Receiver<Bytes>>,
    remaining: u64,
    idle: Duration,
}

impl InputStream {
    /// A body of no bytes.
    pub fn empty() -> Self {
        InputStream {
            rx: None,
            remaining: 0,
            idle: Duration::ZERO,
        }
    }

    /// Bytes still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next chunk, or `None` once all announced bytes have come.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, InputError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let rx = self.rx.as_mut().ok_or(InputError::Abandoned)?;
        match tokio::time::timeout(self.idle, rx.recv()).await {
            Err(_) => Err(InputError::Stalled),
            Ok(None) => Err(InputError::Abandoned),
            Ok(Some(chunk)) => {
                // The reader never routes more than was announced.
                self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                Ok(Some(chunk))
            }
        }
    }
}

/// An upload the reader is routing `chunk` requests to.
struct Upload {
    tx: mpsc::Sender<Bytes>,
    remaining: u64,
}

/// Everything a request task needs.
#[derive(Clone)]
struct Context {
    handler: Arc<dyn Handler>,
    frames: mpsc::Sender<Vec<u8>>,
    max_frame: usize,
    chunk: usize,
}

impl Context {
    fn sink(&self, id: u64) -> OutputSink {
        OutputSink {
            id,
            frames: self.frames.clone(),
            max_frame: self.max_frame,
            chunk: self.chunk,
            muted: None,
        }
    }

    async fn handle(
        self,
        id: u64,
        request: Request,
        input: InputStream,
        session: Option<(SessionInput, Arc<AtomicBool>)>,
    ) {
        let handler = &self.handler;
        let reply = match request {
            Request::Hello => Reply::Hello(handler.hello().await),
            Request::Ping => Reply::Pong,
            Request::Exec(req) => match handler.exec(req, self.sink(id)).await {
                Ok(status) => Reply::Exit(status),
                Err(message) => error_reply(message),
            },
            Request::Shutdown { reboot } => ok_reply(handler.shutdown(reboot).await),
            Request::ConfigureNetwork(config) => ok_reply(handler.configure_network(config).await),
            Request::SetHostname { hostname } => ok_reply(handler.set_hostname(hostname).await),
            Request::InstallSshKeys { user, keys } => {
                ok_reply(handler.install_ssh_keys(user, keys).await)
            }
            Request::ReadFile { path, limit } => {
                match handler.read_file(path, limit, self.sink(id)).await {
                    Ok(size) => Reply::Eof { size },
                    Err(message) => error_reply(message),
                }
            }
            Request::WriteFile(req) => match handler.write_file(req, input).await {
                Ok(size) => Reply::Written { size },
                Err(message) => error_reply(message),
            },
            Request::Metrics { interval_ms } => {
                let ms = interval_ms
                    .unwrap_or(DEFAULT_METRICS_INTERVAL_MS)
                    .min(MAX_METRICS_INTERVAL_MS);
                match handler.metrics(Duration::from_millis(ms)).await {
                    Ok(metrics) => Reply::Metrics(metrics),
                    Err(message) => error_reply(message),
                }
            }
            Request::Logs(req) => ok_reply(handler.logs(req, self.sink(id)).await),
            Request::Harden(req) => match handler.harden(req).await {
                Ok(report) => Reply::Hardened(report),
                Err(message) => error_reply(message),
            },
            Request::GrowFilesystems => match handler.grow_filesystems().await {
                Ok(report) => Reply::Grown(report),
                Err(message) => error_reply(message),
            },
            Request::Upgrade(req) => match handler.upgrade(req, input).await {
                Ok(report) => Reply::Upgraded(report),
                Err(message) => error_reply(message),
            },
            Request::SshInfo => match handler.ssh_info().await {
                Ok(info) => Reply::SshInfo(info),
                Err(message) => error_reply(message),
            },
            Request::Session(req) => {
                let (input, muted) = session.unwrap_or_else(|| {
                    // The reader always opens the session's input; this is a bug.
                    (SessionInput::closed(), Arc::new(AtomicBool::new(false)))
                });
                let mut sink = self.sink(id);
                sink.muted = Some(Arc::clone(&muted));
                let reply = match handler.session(req, input, sink).await {
                    Ok(status) => Reply::Exit(status),
                    Err(message) => error_reply(message),
                };
                if muted.load(Ordering::Acquire) {
                    return;
                }
                reply
            }
            // Handled by the reader; never spawned.
            Request::Chunk { .. }
            | Request::Cancel
            | Request::Resize { .. }
            | Request::CloseStdin
            | Request::Signal { .. } => return,
        };
        self.reply(id, &reply).await;
    }

    async fn reply(&self, id: u64, reply: &Reply) {
        let frame = match encode_frame(&ReplyFrame { id, reply }, self.max_frame) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::warn!(id, error = %err, "reply does not fit a frame");
                let fallback = error_reply(format!("the `{}` reply is too large", reply.kind()));
                match encode_frame(
                    &ReplyFrame {
                        id,
                        reply: &fallback,
                    },
                    self.max_frame,
                ) {
                    Ok(frame) => frame,
                    Err(_) => return,
                }
            }
        };
        // Fails only when the connection is going away.
        let _ = self.frames.send(frame).await;
    }
}

fn ok_reply(result: Result<(), String>) -> Reply {
    match result {
        Ok(()) => Reply::Ok,
        Err(message) => error_reply(message),
    }
}

fn error_reply(mut message: String) -> Reply {
    if message.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Reply::Error { message }
}

/// How many body bytes follow `request` in `chunk` requests.
fn body_size(request: &Request) -> u64 {
    match request {
        Request::WriteFile(req) => req.size,
        Request::Upgrade(UpgradeRequest {
            source: UpgradeSource::Upload { size },
            ..
        }) => *size,
        _ => 0,
    }
}

/// Routes one `chunk` request to its upload. Chunks of uploads that are finished,
/// abandoned or unknown are dropped: their request has had (or will have) its answer.
async fn route_chunk(uploads: &mut HashMap<u64, Upload>, id: u64, data: Bytes, wait: Duration) {
    let Some(upload) = uploads.get_mut(&id) else {
        tracing::debug!(id, "chunk for no upload in progress; dropped");
        return;
    };
    if data.is_empty() {
        return;
    }
    let len = data.len() as u64;
    if len > upload.remaining {
        tracing::warn!(
            id,
            "the host sent more than the body it announced; upload abandoned"
        );
        uploads.remove(&id);
        return;
    }
    upload.remaining -= len;
    let complete = upload.remaining == 0;
    match tokio::time::timeout(wait, upload.tx.send(data)).await {
        Ok(Ok(())) if !complete => {}
        // All of it is queued: the handler reads the rest from its queue.
        Ok(Ok(())) => {
            uploads.remove(&id);
        }
        Ok(Err(_)) | Err(_) => {
            tracing::debug!(id, "the handler does not take the body; upload abandoned");
            uploads.remove(&id);
        }
    }
}

/// Why the reader gave up on a session's input.
enum Overflow {
    Window,
    Controls,
}

/// Routes one `chunk` request to its session. Returns `Err` when the host broke the
/// session's input window.
fn route_session_chunk(session: &mut Session, data: Bytes) -> Result<(), Overflow> {
    if data.is_empty() || session.stdin_closed {
        return Ok(());
    }
    let cost = data.len() + STDIN_CHUNK_COST;
    let queued = session.queued.fetch_add(cost, Ordering::AcqRel) + cost;
    if queued > SESSION_WINDOW {
        return Err(Overflow::Window);
    }
    match session.stdin.try_send(StdinItem::Data(data)) {
        // The byte count bounds the queue, whose capacity it cannot pass.
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => Err(Overflow::Window),
    }
}

/// Routes a resize or a signal to its session.
fn route_control(session: &Session, control: SessionControl) -> Result<(), Overflow> {
    match session.controls.try_send(control) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => Err(Overflow::Controls),
    }
}

/// Hangs up a session: its handler sees its controls end, and nothing more is sent for
/// it. Its task is aborted if it has not ended after [`HANGUP_LIMIT`].
fn hang_up(session: Session, task: Option<&AbortHandle>) {
    session.muted.store(true, Ordering::Release);
    drop(session);
    if let Some(task) = task.cloned() {
        tokio::spawn(async move {
            tokio::time::sleep(HANGUP_LIMIT).await;
            task.abort();
        });
    }
}

/// Ends a session whose host broke its input limits, with an error as its last reply.
async fn overflowed(
    context: &Context,
    sessions: &mut HashMap<u64, Session>,
    running: &HashMap<u64, AbortHandle>,
    id: u64,
    overflow: Overflow,
) {
    let Some(session) = sessions.remove(&id) else {
        return;
    };
    let why = match overflow {
        Overflow::Window => format!(
            "the host sent more than {SESSION_WINDOW} bytes of input ahead of the process; \
             session hung up"
        ),
        Overflow::Controls => "the host sent resizes and signals faster than the session \
                               takes them; session hung up"
            .to_owned(),
    };
    tracing::warn!(id, "{why}");
    hang_up(session, running.get(&id));
    context.reply(id, &error_reply(why)).await;
}

/// The reader's and the handler's ends of a new session's input.
fn open_session(context: &Context, id: u64) -> (Session, SessionInput) {
    // Every queued chunk costs at least STDIN_CHUNK_COST of the window, and one more
    // slot is for the end of input.
    let (stdin_tx, stdin_rx) = mpsc::channel(SESSION_WINDOW / STDIN_CHUNK_COST + 1);
    let (controls_tx, controls_rx) = mpsc::channel(CONTROL_QUEUE);
    let queued = Arc::new(AtomicUsize::new(0));
    let muted = Arc::new(AtomicBool::new(false));
    let mut acks = context.sink(id);
    acks.muted = Some(Arc::clone(&muted));
    let session = Session {
        stdin: stdin_tx,
        controls: controls_tx,
        queued: Arc::clone(&queued),
        muted,
        stdin_closed: false,
    };
    let input = SessionInput {
        stdin: SessionStdin {
            rx: stdin_rx,
            queued,
            acks: Some(acks),
        },
        controls: SessionControls { rx: controls_rx },
    };
    (session, input)
}

/// Serves one host connection with `handler` until the host closes it.
///
/// Requests are handled concurrently, each in its own task (up to
/// [`ServerConfig::max_in_flight`]); an exec's output is streamed as it comes. A request of a
/// type this version does not know is answered with an error and serving goes on. Returns
/// `Ok(())` when the host closes the stream; a bad frame or a failed write ends serving with
/// an error. Either way, requests still running are cancelled (an exec's processes are
/// killed by the [`Handler`] when its future is dropped).
///
/// The body of a request (`chunk` requests after a `write_file` or an uploaded `upgrade`)
/// is routed to its handler through a small queue; while that queue is full the reader
/// waits, which slows the host down. A `cancel` request drops the running request with its
/// id.
///
/// A session's standard input (`chunk` requests after a `session`) is queued for its
/// handler without ever making the reader wait: the client keeps at most
/// [`SESSION_WINDOW`](crate::SESSION_WINDOW) unacknowledged, and a host that sends more
/// (or floods resizes and signals) has its session ended with an error. `cancel` hangs a
/// session up; `resize`, `signal` and `close_stdin` go to the session with their id, and
/// are dropped for any other id.
pub async fn serve<S>(
    stream: S,
    handler: Arc<dyn Handler>,
    config: ServerConfig,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (frames, frames_rx) = mpsc::channel(WRITE_QUEUE);
    let mut writer = tokio::spawn(write_replies(writer, frames_rx));
    let context = Context {
        handler,
        frames,
        max_frame: config.max_frame,
        chunk: config.effective_chunk(),
    };
    let permits = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let mut tasks = JoinSet::new();
    let mut uploads: HashMap<u64, Upload> = HashMap::new();
    let mut running: HashMap<u64, AbortHandle> = HashMap::new();
    let mut sessions: HashMap<u64, Session> = HashMap::new();

    let result = loop {
        while tasks.try_join_next().is_some() {}
        let frame = tokio::select! {
            frame = read_frame(&mut reader, config.max_frame) => frame,
            written = &mut writer => break writer_outcome(written),
        };
        let body = match frame {
            Ok(Some(body)) => body,
            Ok(None) => break Ok(()),
            Err(err) => break Err(ServeError::Read(err)),
        };
        let (id, request) = match decode::<RequestFrame<Request>>(&body) {
            Ok(RequestFrame { id, request }) => (id, request),
            Err(err) => match decode::<IdOnly>(&body) {
                Ok(IdOnly { id }) => {
                    tracing::debug!(id, error = %err, "unsupported request");
                    let reply = error_reply(format!("unsupported request: {err}"));
                    context.reply(id, &reply).await;
                    continue;
                }
                Err(_) => break Err(ServeError::Read(err)),
            },
        };
        drop(body);
        let (request, session) = match request {
            Request::Chunk { data } => {
                match sessions.get_mut(&id) {
                    Some(session) => {
                        if let Err(overflow) = route_session_chunk(session, data) {
                            overflowed(&context, &mut sessions, &running, id, overflow).await;
                        }
                    }
                    None => route_chunk(&mut uploads, id, data, config.input_timeout).await,
                }
                continue;
            }
            Request::Resize { cols, rows } => {
                let control = SessionControl::Resize { cols, rows };
                if let Some(Err(overflow)) = sessions.get(&id).map(|s| route_control(s, control)) {
                    overflowed(&context, &mut sessions, &running, id, overflow).await;
                }
                continue;
            }
            Request::Signal { signal } => {
                let control = SessionControl::Signal(signal);
                if let Some(Err(overflow)) = sessions.get(&id).map(|s| route_control(s, control)) {
                    overflowed(&context, &mut sessions, &running, id, overflow).await;
                }
                continue;
            }
            Request::CloseStdin => {
                if let Some(session) = sessions.get_mut(&id).filter(|s| !s.stdin_closed) {
                    session.stdin_closed = true;
                    // Never full: the queue's capacity leaves room for it.
                    let _ = session.stdin.try_send(StdinItem::Eof);
                }
                continue;
            }
            Request::Cancel => {
                uploads.remove(&id);
                if let Some(session) = sessions.remove(&id) {
                    tracing::debug!(id, "session hung up by the host");
                    hang_up(session, running.get(&id));
                } else if let Some(task) = running.remove(&id) {
                    tracing::debug!(id, "request cancelled by the host");
                    task.abort();
                }
                continue;
            }
            Request::Session(req) => {
                sessions.retain(|_, s| !s.controls.is_closed());
                if sessions.len() >= config.max_sessions.max(1) {
                    let reply = error_reply(format!(
                        "too many sessions (at most {})",
                        config.max_sessions.max(1)
                    ));
                    context.reply(id, &reply).await;
                    continue;
                }
                let (session, input) = open_session(&context, id);
                let muted = Arc::clone(&session.muted);
                sessions.insert(id, session);
                (Request::Session(req), Some((input, muted)))
            }
            request => (request, None),
        };

        let size = body_size(&request);
        let input = if size == 0 {
            InputStream::empty()
        } else if uploads.len() >= config.max_uploads.max(1) {
            let reply = error_reply(format!(
                "too many uploads in progress (at most {})",
                config.max_uploads.max(1)
            ));
            context.reply(id, &reply).await;
            continue;
        } else {
            let (tx, rx) = mpsc::channel(INPUT_QUEUE);
            uploads.insert(
                id,
                Upload {
                    tx,
                    remaining: size,
                },
            );
            InputStream {
                rx: Some(rx),
                remaining: size,
                idle: config.input_timeout,
            }
        };

        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            written = &mut writer => break writer_outcome(written),
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { break Ok(()) };
        if running.len() >= PRUNE_RUNNING {
            running.retain(|_, task| !task.is_finished());
        }
        let context = context.clone();
        let task = tasks.spawn(async move {
            context.handle(id, request, input, session).await;
            drop(permit);
        });
        running.insert(id, task);
    };

    tasks.shutdown().await;
    drop(context);
    writer.abort();
    result
}

fn writer_outcome(written: Result<Result<(), FrameError>, JoinError>) -> Result<(), ServeError> {
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(ServeError::Write(err)),
        Err(join) => Err(ServeError::Write(FrameError::Io(Arc::new(
            io::Error::other(join.to_string()),
        )))),
    }
}

async fn write_replies<W>(
    mut writer: W,
    mut frames: mpsc::Receiver<Vec<u8>>,
) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
{
    while let Some(frame) = frames.recv().await {
        writer.write_all(&frame).await?;
        if frames.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_shrink_to_fit_a_small_frame() {
        let config = ServerConfig::default().max_frame(1024);
        assert_eq!(config.effective_chunk(), (1024 - ENVELOPE_ROOM) / 4 * 3);
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let Reply::Error { message } = error_reply("é".repeat(MAX_ERROR_MESSAGE)) else {
            panic!("not an error reply");
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE);
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }
}
