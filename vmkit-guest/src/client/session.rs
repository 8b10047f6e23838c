//! Interactive sessions: a process in the guest whose standard input the host streams.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::{Client, ClientError, Deadline, ReplyStream, Route, unexpected};
use crate::frame::encode_frame;
use crate::message::{ExecEvent, Reply, Request, RequestFrame, SESSION_WINDOW, base64_bytes};
use crate::ops::SessionRequest;
use crate::server::STDIN_CHUNK_COST;

/// The largest piece of standard input sent in one frame, before base64.
const MAX_STDIN_CHUNK: usize = 64 << 10;
/// Room left in a frame for the envelope around a chunk.
const ENVELOPE_ROOM: usize = 256;
/// Replies buffered per session before the reader waits for its consumer.
const SESSION_QUEUE: usize = 16;

/// The serialize-only form of a stdin chunk, borrowing its bytes.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Outgoing<'a> {
    Chunk {
        #[serde(serialize_with = "base64_bytes::serialize")]
        data: &'a [u8],
    },
}

/// What the reader, the writer half and the event half of one session share.
struct SessionState {
    /// Bytes of standard input the agent has room for (see [`SESSION_WINDOW`]); closed
    /// when the session ends.
    credits: Semaphore,
    /// The host hung the session up.
    hung_up: AtomicBool,
}

/// The reader's route for a session.
#[derive(Clone)]
pub(super) struct SessionRoute {
    pub(super) tx: mpsc::Sender<Result<Reply, ClientError>>,
    state: Arc<SessionState>,
}

impl SessionRoute {
    /// Gives back credit the agent acknowledged. A guest acknowledging more than was
    /// sent gains nothing: the credit never passes the window.
    pub(super) fn ack(&self, bytes: u64) {
        let credits = &self.state.credits;
        let room = SESSION_WINDOW.saturating_sub(credits.available_permits());
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX).min(room);
        credits.add_permits(bytes);
    }

    /// The session takes no more input.
    pub(super) fn end(&self) {
        self.state.credits.close();
    }
}

impl Client {
    /// Starts a session: a process in the guest whose standard input is streamed from
    /// here, with a pty (`ssh VM`) or pipes (`ssh VM cmd`).
    ///
    /// Returns once the request is queued for sending (within the call timeout); an
    /// agent that cannot start the process (an unknown user, say) reports it as the
    /// first event, [`ClientError::Remote`]. The session has no deadline: it ends when
    /// the process exits, when it is hung up, or when the connection closes.
    pub async fn session(&self, req: SessionRequest) -> Result<GuestSession, ClientError> {
        let state = Arc::new(SessionState {
            credits: Semaphore::new(SESSION_WINDOW),
            hung_up: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let route = SessionRoute {
            tx,
            state: Arc::clone(&state),
        };
        let id = self.inner.shared.register(Route::Session(route))?;
        // From here on the events' drop removes the route.
        let events = SessionEvents {
            inner: ReplyStream {
                client: self.clone(),
                id,
                rx,
                deadline: Deadline::Never,
                done: false,
            },
            state: Arc::clone(&state),
            agent_done: false,
        };
        let deadline = Instant::now() + self.inner.config.call_timeout;
        self.send(id, &Request::Session(req), deadline).await?;
        let chunk = self
            .inner
            .config
            .max_frame
            .saturating_sub(ENVELOPE_ROOM)
            .checked_div(4)
            .map_or(1, |n| n * 3)
            .clamp(1, MAX_STDIN_CHUNK);
        Ok(GuestSession {
            writer: SessionWriter {
                client: self.clone(),
                id,
                state,
                chunk,
            },
            events,
        })
    }
}

/// A running session, from [`Client::session`]: its input half ([`SessionWriter`]) and
/// its events ([`SessionEvents`]); [`GuestSession::split`] parts them so that each can go
/// to its own task.
#[derive(Debug)]
pub struct GuestSession {
    writer: SessionWriter,
    events: SessionEvents,
}

impl GuestSession {
    /// The input half: standard input, resizes, signals, hang-up.
    pub fn writer(&self) -> &SessionWriter {
        &self.writer
    }

    /// The next chunk of output or the exit status; see [`SessionEvents::next`].
    pub async fn next(&mut self) -> Option<Result<ExecEvent, ClientError>> {
        self.events.next().await
    }

    /// The input half and the events apart.
    pub fn split(self) -> (SessionWriter, SessionEvents) {
        (self.writer, self.events)
    }
}

/// The input half of a session: cheap to clone, usable from any task.
///
/// Every method fails with [`ClientError::SessionEnded`] once the session has ended.
#[derive(Clone)]
pub struct SessionWriter {
    client: Client,
    id: u64,
    state: Arc<SessionState>,
    chunk: usize,
}

impl fmt::Debug for SessionWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionWriter")
            .field("id", &self.id)
            .field("ended", &self.is_ended())
            .finish_non_exhaustive()
    }
}

impl SessionWriter {
    /// Sends bytes to the process's standard input (with a pty, what the user types).
    ///
    /// Waits while [`SESSION_WINDOW`] bytes are on their way and not yet taken by the
    /// process: a process that does not read its input slows its sender, and nothing
    /// else on the connection.
    pub async fn send(&self, data: &[u8]) -> Result<(), ClientError> {
        for piece in data.chunks(self.chunk) {
            let cost = u32::try_from(piece.len() + STDIN_CHUNK_COST)
                .expect("a chunk of at most 64 KiB and its cost fit in u32");
            self.state
                .credits
                .acquire_many(cost)
                .await
                .map_err(|_| ClientError::SessionEnded)?
                .forget();
            let frame = encode_frame(
                &RequestFrame {
                    id: self.id,
                    request: Outgoing::Chunk { data: piece },
                },
                self.client.inner.config.max_frame,
            )?;
            self.client.send_frame(frame, self.deadline()).await?;
        }
        Ok(())
    }

    /// Sets the pty's size (ignored by the agent for a session without a pty).
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), ClientError> {
        self.control(&Request::Resize { cols, rows }).await
    }

    /// Ends the process's standard input once what was sent before is written
    /// (ignored with a pty: send the terminal's end-of-file character, ^D, instead).
    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.control(&Request::CloseStdin).await
    }

    /// Sends a signal to the process group, by its SSH name without `SIG`: `INT`,
    /// `TERM`, `HUP`, `KILL`, `QUIT`, `USR1`, `USR2`. The agent ignores names it does
    /// not know.
    pub async fn signal(&self, name: &str) -> Result<(), ClientError> {
        self.control(&Request::Signal {
            signal: name.to_owned(),
        })
        .await
    }

    /// Hangs up: the agent sends `SIGHUP` to the process group, and `SIGKILL` shortly
    /// after, and sends nothing more. The events then end (`None`).
    pub async fn hang_up(&self) -> Result<(), ClientError> {
        if self.is_ended() {
            return Err(ClientError::SessionEnded);
        }
        self.state.hung_up.store(true, Ordering::Release);
        self.client.inner.shared.unregister(self.id);
        self.client
            .send(self.id, &Request::Cancel, self.deadline())
            .await
    }

    /// Whether the session has ended, for this client: the process exited, the session
    /// failed or was hung up, or the connection closed.
    pub fn is_ended(&self) -> bool {
        self.state.credits.is_closed()
    }

    async fn control(&self, request: &Request) -> Result<(), ClientError> {
        if self.is_ended() {
            return Err(ClientError::SessionEnded);
        }
        self.client.send(self.id, request, self.deadline()).await
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.client.inner.config.call_timeout
    }
}

/// The output and exit status of a session, as [`ExecEvent`]s.
///
/// Read it promptly: like an [`ExecStream`](crate::ExecStream), it is dropped with
/// [`ClientError::Lagged`] when its buffer stays full for the call timeout. Dropping it
/// before the exit status hangs the session up.
pub struct SessionEvents {
    inner: ReplyStream,
    state: Arc<SessionState>,
    /// The agent ended the session itself (its last reply came).
    agent_done: bool,
}

impl fmt::Debug for SessionEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionEvents")
            .field("id", &self.inner.id)
            .field("done", &self.inner.done)
            .finish_non_exhaustive()
    }
}

impl SessionEvents {
    /// The next chunk of output (with a pty, all of it comes as
    /// [`ExecEvent::Stdout`]) or the exit status.
    ///
    /// Ends (`None`) after [`ExecEvent::Exit`], after the first error, or once the
    /// session was hung up from this side. Cancel safe.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, ClientError>> {
        if self.hung_up() {
            return None;
        }
        let reply = self.inner.next().await?;
        if self.hung_up() {
            return None;
        }
        Some(match reply {
            Ok(Reply::Stdout { data }) => Ok(ExecEvent::Stdout(data)),
            Ok(Reply::Stderr { data }) => Ok(ExecEvent::Stderr(data)),
            Ok(Reply::Exit(status)) => {
                self.agent_done = true;
                Ok(ExecEvent::Exit(status))
            }
            Ok(other) => Err(self.inner.fail(unexpected("session", other))),
            Err(err) => {
                self.agent_done = matches!(err, ClientError::Remote(_));
                Err(err)
            }
        })
    }

    fn hung_up(&self) -> bool {
        self.state.hung_up.load(Ordering::Acquire)
    }
}

impl Drop for SessionEvents {
    /// Hangs the session up unless it has ended: its output would have nowhere to go.
    fn drop(&mut self) {
        self.state.credits.close();
        if !self.agent_done && !self.hung_up() {
            self.inner.client.cancel(self.inner.id);
        }
    }
}
