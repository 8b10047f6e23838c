//! The host side: a [`Client`] that multiplexes calls to one agent over one byte stream.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, timeout, timeout_at};

use crate::frame::{DEFAULT_MAX_FRAME, FrameError, decode, encode_frame, read_frame};
use crate::message::{
    ExecEvent, ExecOutput, ExecRequest, HelloInfo, Reply, ReplyFrame, Request, RequestFrame,
};

mod ops;
mod session;

pub use ops::LogStream;
use session::SessionRoute;
pub use session::{GuestSession, SessionEvents, SessionWriter};

/// Frames waiting for the writer task.
const WRITE_QUEUE: usize = 64;
/// Events buffered per exec stream before the reader waits for its consumer.
const STREAM_QUEUE: usize = 16;

/// Settings of a [`Client`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// How long a call waits for its reply (default 10 s). An exec waits for its own
    /// `timeout_ms` plus this. Also how long the reader waits for an exec stream's consumer
    /// before dropping that stream as [`ClientError::Lagged`].
    pub call_timeout: Duration,
    /// The largest frame body accepted from the agent or sent to it
    /// (default [`DEFAULT_MAX_FRAME`]).
    pub max_frame: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            call_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl ClientConfig {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ClientConfig::call_timeout`].
    pub fn call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// Sets [`ClientConfig::max_frame`].
    pub fn max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }
}

/// A call to the agent failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No reply came within the call's deadline. The client stays usable; a late reply is
    /// discarded.
    #[error("the agent did not answer in time")]
    Timeout,
    /// The connection is closed: the agent hung up, or the client was closed earlier for one
    /// of the other reasons (which the calls pending at that moment received).
    #[error("the connection to the agent is closed")]
    Closed,
    /// The agent broke the protocol: a reply to a request that was never sent, or a reply
    /// of the wrong kind.
    #[error("the agent broke the protocol: {}", GuestText(.0))]
    Protocol(String),
    /// The agent could not carry out the request. The message is the guest's; it is
    /// shown with control characters escaped (see [`GuestText`]).
    #[error("the agent reported an error: {}", GuestText(.0))]
    Remote(String),
    /// A frame from the agent was oversized, empty, truncated or malformed, the channel
    /// failed, or a request was too large to send.
    #[error("bad frame on the agent channel")]
    Frame(#[from] FrameError),
    /// An [`ExecStream`] (or [`LogStream`]) was not read for longer than
    /// [`ClientConfig::call_timeout`] while output waited for it, so it was dropped to let
    /// other calls proceed.
    #[error("the stream was not read in time and was dropped")]
    Lagged,
    /// Local I/O around a call failed: reading the data to send to the agent (a file's
    /// contents), or writing what it sent to where the caller asked.
    #[error("local I/O for a call to the agent failed")]
    Source(#[source] Arc<std::io::Error>),
    /// The session has ended (its process exited, it failed or was hung up): it takes
    /// no more input.
    #[error("the session has ended")]
    SessionEnded,
}

/// Text a guest sent, shown safely: control characters (newlines, escape sequences)
/// escaped as `\n`, `\u{1b}`, ..., and at most [`GuestText::MAX_CHARS`] characters,
/// so that a hostile guest can neither forge log lines nor drive an operator's
/// terminal through an error message. Use it wherever guest text is displayed.
#[derive(Clone, Copy, Debug)]
pub struct GuestText<'a>(pub &'a str);

impl GuestText<'_> {
    /// The most characters shown; longer text ends with `…`.
    pub const MAX_CHARS: usize = 1024;
}

impl std::fmt::Display for GuestText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for (i, c) in self.0.chars().enumerate() {
            if i == Self::MAX_CHARS {
                return f.write_char('…');
            }
            // Line and paragraph separators end lines in some viewers too.
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Where the reader delivers the replies for one request id.
enum Route {
    Call(oneshot::Sender<Result<Reply, ClientError>>),
    Stream(mpsc::Sender<Result<Reply, ClientError>>),
    /// A session's replies, and the credit for its standard input that its `stdin_ack`s
    /// give back.
    Session(SessionRoute),
}

struct State {
    /// The next id to hand out. Ids start at 1 and only grow, so an id at or above this
    /// was never sent.
    next_id: u64,
    routes: HashMap<u64, Route>,
    /// Why the client closed, once it has.
    closed: Option<ClientError>,
}

/// What the reader, the writer and the handles share.
struct Shared {
    state: Mutex<State>,
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a call that can panic, so a poisoned state is still
        // consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, route: Route) -> Result<u64, ClientError> {
        let mut state = self.lock();
        if state.closed.is_some() {
            return Err(ClientError::Closed);
        }
        let id = state.next_id;
        state.next_id = state.next_id.saturating_add(1);
        state.routes.insert(id, route);
        Ok(id)
    }

    fn unregister(&self, id: u64) {
        let route = self.lock().routes.remove(&id);
        if let Some(Route::Session(session)) = route {
            session.end();
        }
    }

    fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Why a stream's channel ended without a final reply.
    fn end_reason(&self) -> ClientError {
        self.lock().closed.clone().unwrap_or(ClientError::Lagged)
    }

    /// Marks the client closed and fails every pending call with `reason`.
    fn close(&self, reason: ClientError) {
        let routes = {
            let mut state = self.lock();
            if state.closed.is_some() {
                return;
            }
            state.closed = Some(reason.clone());
            std::mem::take(&mut state.routes)
        };
        self.closed_tx.send_replace(true);
        for route in routes.into_values() {
            match route {
                Route::Call(tx) => {
                    let _ = tx.send(Err(reason.clone()));
                }
                Route::Stream(tx) => {
                    // A full stream learns the reason from `end_reason` instead.
                    let _ = tx.try_send(Err(reason.clone()));
                }
                Route::Session(session) => {
                    session.end();
                    let _ = session.tx.try_send(Err(reason.clone()));
                }
            }
        }
    }

    /// Delivers one reply to whoever waits for its id.
    async fn route(&self, frame: ReplyFrame<Reply>, lag: Duration) -> Result<(), ClientError> {
        let ReplyFrame { id, reply } = frame;
        let target = {
            let mut state = self.lock();
            match state.routes.remove(&id) {
                None if id == 0 || id >= state.next_id => {
                    return Err(ClientError::Protocol(format!(
                        "`{}` reply to request id {id}, which was never sent",
                        reply.kind()
                    )));
                }
                // A request that was abandoned (timed out, stream dropped): discard.
                None => return Ok(()),
                Some(Route::Session(session)) => {
                    if let Reply::StdinAck { bytes } = reply {
                        session.ack(bytes);
                        state.routes.insert(id, Route::Session(session));
                        return Ok(());
                    }
                    if reply.is_final() {
                        session.end();
                    } else {
                        state.routes.insert(id, Route::Session(session.clone()));
                    }
                    Route::Stream(session.tx)
                }
                Some(Route::Stream(tx)) if !reply.is_final() => {
                    state.routes.insert(id, Route::Stream(tx.clone()));
                    Route::Stream(tx)
                }
                Some(route) => route,
            }
        };
        match target {
            Route::Call(tx) => {
                let _ = tx.send(Ok(reply));
            }
            Route::Stream(tx) => match timeout(lag, tx.send(Ok(reply))).await {
                Ok(Ok(())) => {}
                // The consumer is gone or too slow: stop routing to it. Once our clone is
                // dropped its channel ends and it reports `end_reason`.
                Ok(Err(_)) | Err(_) => self.unregister(id),
            },
            // Never a target: sessions are delivered as streams.
            Route::Session(_) => {}
        }
        Ok(())
    }
}

struct Inner {
    shared: Arc<Shared>,
    frames: mpsc::Sender<Vec<u8>>,
    config: ClientConfig,
    reader: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close(ClientError::Closed);
    }
}

/// A connection to one agent.
///
/// Cheap to clone; all clones share the connection, which closes when the last clone (and
/// the last [`ExecStream`]) is dropped. Calls may run concurrently; their replies are matched
/// by request id.
///
/// The agent is not trusted: every reply is checked against the ids this client sent and
/// the frame cap, and any violation closes the client instead of panicking or growing memory
/// without bound. Once closed, pending calls fail with the reason and new calls fail with
/// [`ClientError::Closed`]. A call that merely times out does not close the client.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts a client over `stream`.
    ///
    /// Spawns a reader and a writer task, so it must be called inside a Tokio runtime
    /// (it panics otherwise, like [`tokio::spawn`]).
    pub fn new<S>(stream: S, config: ClientConfig) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read_half, write_half) = tokio::io::split(stream);
        let (frames, frames_rx) = mpsc::channel(WRITE_QUEUE);
        let (closed_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_id: 1,
                routes: HashMap::new(),
                closed: None,
            }),
            closed_tx,
        });
        let reader = tokio::spawn(read_replies(
            read_half,
            Arc::clone(&shared),
            config.max_frame,
            config.call_timeout,
        ))
        .abort_handle();
        tokio::spawn(write_requests(write_half, frames_rx, Arc::clone(&shared)));
        Client {
            inner: Arc::new(Inner {
                shared,
                frames,
                config,
                reader,
            }),
        }
    }

    /// Asks the agent who it is. The caller decides what to do with a
    /// [`HelloInfo::protocol`] it does not know.
    pub async fn hello(&self) -> Result<HelloInfo, ClientError> {
        match self.call(&Request::Hello).await? {
            Reply::Hello(info) => Ok(info),
            other => Err(unexpected("hello", other)),
        }
    }

    /// Like [`Client::hello`] but bounded by `timeout` instead of the configured call
    /// timeout: for waiting on a guest that is still booting, where the request waits
    /// in the channel until the agent opens it.
    pub async fn hello_within(&self, timeout: Duration) -> Result<HelloInfo, ClientError> {
        match self
            .call_until(&Request::Hello, Instant::now() + timeout)
            .await?
        {
            Reply::Hello(info) => Ok(info),
            other => Err(unexpected("hello", other)),
        }
    }

    /// Measures one round trip to the agent.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.call(&Request::Ping).await? {
            Reply::Pong => Ok(start.elapsed()),
            other => Err(unexpected("ping", other)),
        }
    }

    /// Starts a command and returns the stream of its output and exit status.
    ///
    /// Returns once the request is queued for sending (within the call timeout); an agent
    /// that cannot start the command reports it as the stream's first item,
    /// [`ClientError::Remote`]. The stream's deadline is `req.timeout_ms` plus
    /// [`ClientConfig::call_timeout`]; without `timeout_ms` it has none and ends only when
    /// the command exits or the connection closes. `req.stdin` must fit in one frame.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        let deadline = req.timeout_ms.and_then(|ms| {
            Instant::now()
                .checked_add(Duration::from_millis(ms))?
                .checked_add(self.inner.config.call_timeout)
        });
        let deadline = deadline.map_or(Deadline::Never, Deadline::At);
        let inner = self.open_stream(&Request::Exec(req), deadline).await?;
        Ok(ExecStream { inner })
    }

    /// Runs a command to its end and collects up to `limit` bytes of each output stream;
    /// output past that is read and dropped, and [`ExecOutput::truncated`] is set.
    pub async fn exec_collect(
        &self,
        req: ExecRequest,
        limit: usize,
    ) -> Result<ExecOutput, ClientError> {
        self.exec(req).await?.collect(limit).await
    }

    /// Asks the agent to power the guest off, or to reboot it. `Ok` means the agent
    /// accepted; the guest goes down shortly after and the connection then closes.
    pub async fn shutdown(&self, reboot: bool) -> Result<(), ClientError> {
        match self.call(&Request::Shutdown { reboot }).await? {
            Reply::Ok => Ok(()),
            other => Err(unexpected("shutdown", other)),
        }
    }

    /// Closes the connection now, for every clone and stream: pending calls fail with
    /// [`ClientError::Closed`] and the stream is dropped, freeing a channel that
    /// serves one client at a time (such as QEMU's virtio-serial socket) for a new
    /// connection. For an agent that is gone without hanging up (its guest rebooted).
    pub fn close(&self) {
        self.inner.reader.abort();
        self.inner.shared.close(ClientError::Closed);
    }

    /// Whether the connection is closed; every later call then fails with
    /// [`ClientError::Closed`].
    pub fn is_closed(&self) -> bool {
        self.inner.shared.is_closed()
    }

    /// Sends one request and waits for its single reply.
    async fn call(&self, request: &Request) -> Result<Reply, ClientError> {
        self.call_until(request, Instant::now() + self.inner.config.call_timeout)
            .await
    }

    async fn call_until(&self, request: &Request, deadline: Instant) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        let id = self.inner.shared.register(Route::Call(tx))?;
        let _route = RouteGuard {
            shared: &self.inner.shared,
            id,
        };
        self.send(id, request, deadline).await?;
        match timeout_at(deadline, rx).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(result)) => result,
        }
    }

    async fn send(&self, id: u64, request: &Request, deadline: Instant) -> Result<(), ClientError> {
        let frame = encode_frame(&RequestFrame { id, request }, self.inner.config.max_frame)?;
        self.send_frame(frame, deadline).await
    }

    async fn send_frame(&self, frame: Vec<u8>, deadline: Instant) -> Result<(), ClientError> {
        match timeout_at(deadline, self.inner.frames.send(frame)).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Tells the agent to stop the request `id`, if the write queue has room; best effort.
    fn cancel(&self, id: u64) {
        if let Ok(frame) = encode_frame(
            &RequestFrame {
                id,
                request: &Request::Cancel,
            },
            self.inner.config.max_frame,
        ) {
            let _ = self.inner.frames.try_send(frame);
        }
    }

    /// Sends a request whose replies come as a stream. Returns once the request is queued
    /// for sending (within the call timeout).
    async fn open_stream(
        &self,
        request: &Request,
        deadline: Deadline,
    ) -> Result<ReplyStream, ClientError> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let id = self.inner.shared.register(Route::Stream(tx))?;
        // From here on the stream's drop removes the route.
        let stream = ReplyStream {
            client: self.clone(),
            id,
            rx,
            deadline,
            done: false,
        };
        self.send(id, request, Instant::now() + self.inner.config.call_timeout)
            .await?;
        Ok(stream)
    }
}

/// Removes a call's route when the call ends, however it ends (including cancellation).
struct RouteGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

/// How long a [`ReplyStream`] waits for its replies.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    /// As long as it takes.
    Never,
    /// Until this instant, for all of them.
    At(Instant),
    /// This long for each.
    Idle(Duration),
}

/// The replies to one request that are streamed (exec, read_file, logs).
struct ReplyStream {
    client: Client,
    id: u64,
    rx: mpsc::Receiver<Result<Reply, ClientError>>,
    deadline: Deadline,
    done: bool,
}

impl fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyStream")
            .field("id", &self.id)
            .field("deadline", &self.deadline)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ReplyStream {
    /// The next reply. Ends (`None`) after a final reply or after the first error; an
    /// `error` reply comes back as [`ClientError::Remote`]. Cancel safe.
    async fn next(&mut self) -> Option<Result<Reply, ClientError>> {
        if self.done {
            return None;
        }
        let received = match self.deadline {
            Deadline::Never => Ok(self.rx.recv().await),
            Deadline::At(deadline) => timeout_at(deadline, self.rx.recv()).await,
            Deadline::Idle(idle) => timeout(idle, self.rx.recv()).await,
        };
        let item = match received {
            Ok(item) => item,
            Err(_) => return Some(Err(self.finish_with(ClientError::Timeout))),
        };
        Some(match item {
            Some(Ok(Reply::Error { message })) => {
                Err(self.finish_with(ClientError::Remote(message)))
            }
            Some(Ok(reply)) => {
                if reply.is_final() {
                    self.finish();
                }
                Ok(reply)
            }
            Some(Err(err)) => Err(self.finish_with(err)),
            None => {
                let reason = self.client.inner.shared.end_reason();
                Err(self.finish_with(reason))
            }
        })
    }

    /// Ends the stream with `err` (returned for convenience).
    fn fail(&mut self, err: ClientError) -> ClientError {
        self.finish_with(err)
    }

    fn finish(&mut self) {
        self.done = true;
        self.rx.close();
        self.client.inner.shared.unregister(self.id);
    }

    fn finish_with(&mut self, err: ClientError) -> ClientError {
        self.finish();
        err
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        self.client.inner.shared.unregister(self.id);
    }
}

/// The output and exit status of a command started with [`Client::exec`].
///
/// Read it promptly: while its buffer is full, replies to other calls wait behind it, and
/// after [`ClientConfig::call_timeout`] of that it is dropped with [`ClientError::Lagged`].
/// Dropping it early is fine: later output for it is discarded (the command keeps running in
/// the guest until it exits or its own timeout kills it).
pub struct ExecStream {
    inner: ReplyStream,
}

impl fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecStream")
            .field("id", &self.inner.id)
            .field("deadline", &self.inner.deadline)
            .field("done", &self.inner.done)
            .finish_non_exhaustive()
    }
}

impl ExecStream {
    /// The next chunk of output or the exit status.
    ///
    /// Ends (`None`) after [`ExecEvent::Exit`] or after the first error. Cancel safe.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, ClientError>> {
        Some(match self.inner.next().await? {
            Ok(Reply::Stdout { data }) => Ok(ExecEvent::Stdout(data)),
            Ok(Reply::Stderr { data }) => Ok(ExecEvent::Stderr(data)),
            Ok(Reply::Exit(status)) => Ok(ExecEvent::Exit(status)),
            Ok(other) => Err(self.inner.fail(unexpected("exec", other))),
            Err(err) => Err(err),
        })
    }

    /// Reads the command to its end and collects up to `limit` bytes of each output
    /// stream; output past that is read and dropped, and [`ExecOutput::truncated`] is
    /// set.
    pub async fn collect(mut self, limit: usize) -> Result<ExecOutput, ClientError> {
        let mut output = ExecOutput::default();
        while let Some(event) = self.next().await {
            match event? {
                ExecEvent::Stdout(data) => {
                    output.truncated |= append_capped(&mut output.stdout, &data, limit);
                }
                ExecEvent::Stderr(data) => {
                    output.truncated |= append_capped(&mut output.stderr, &data, limit);
                }
                ExecEvent::Exit(status) => {
                    output.status = status;
                    return Ok(output);
                }
            }
        }
        // `next` reports an error before it ends without an exit status.
        Err(ClientError::Protocol(
            "exec stream ended without an exit status".to_owned(),
        ))
    }
}

/// The error for a reply that does not answer the request it is routed to.
fn unexpected(what: &str, reply: Reply) -> ClientError {
    match reply {
        Reply::Error { message } => ClientError::Remote(message),
        other => ClientError::Protocol(format!("`{}` reply to a {what} request", other.kind())),
    }
}

/// Appends as much of `data` as fits under `limit`; returns whether anything was cut.
fn append_capped(buf: &mut Vec<u8>, data: &[u8], limit: usize) -> bool {
    let room = limit.saturating_sub(buf.len());
    let take = room.min(data.len());
    buf.extend_from_slice(&data[..take]);
    take < data.len()
}

async fn read_replies<R>(mut reader: R, shared: Arc<Shared>, max_frame: usize, lag: Duration)
where
    R: AsyncRead + Unpin,
{
    let reason = loop {
        let body = match read_frame(&mut reader, max_frame).await {
            Ok(Some(body)) => body,
            Ok(None) => break ClientError::Closed,
            Err(err) => break ClientError::Frame(err),
        };
        let frame = match decode::<ReplyFrame<Reply>>(&body) {
            Ok(frame) => frame,
            Err(err) => break ClientError::Frame(err),
        };
        drop(body);
        if let Err(err) = shared.route(frame, lag).await {
            break err;
        }
    };
    tracing::debug!(error = %reason, "agent connection closed");
    shared.close(reason);
}

async fn write_requests<W>(mut writer: W, mut frames: mpsc::Receiver<Vec<u8>>, shared: Arc<Shared>)
where
    W: AsyncWrite + Unpin,
{
    let mut closed = shared.closed_tx.subscribe();
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            _ = closed.wait_for(|closed| *closed) => break,
        };
        let written = async {
            writer.write_all(&frame).await?;
            if frames.is_empty() {
                writer.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let result = tokio::select! {
            result = written => result,
            _ = closed.wait_for(|closed| *closed) => break,
        };
        if let Err(err) = result {
            shared.close(ClientError::Frame(err.into()));
            break;
        }
    }
    let _ = writer.shutdown().await;
}
