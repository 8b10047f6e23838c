//! The agent side: [`serve`] reads requests and answers them with a [`Handler`].

use std::io;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinError, JoinSet};

use crate::frame::{DEFAULT_MAX_FRAME, FrameError, decode, encode_frame, read_frame};
use crate::message::{
    ExecRequest, ExitStatus, HelloInfo, IdOnly, Reply, ReplyFrame, Request, RequestFrame,
    base64_bytes,
};

/// Frames waiting for the writer task.
const WRITE_QUEUE: usize = 64;
/// Room left in a frame for the envelope around an output chunk.
const ENVELOPE_ROOM: usize = 256;
/// Longest error message sent to the host, in bytes.
const MAX_ERROR_MESSAGE: usize = 16 << 10;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 64,
            chunk_size: 64 << 10,
        }
    }
}

impl ServerConfig {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ServerConfig::max_frame`].
    pub fn with_max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }

    /// Sets [`ServerConfig::max_in_flight`].
    pub fn with_max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Sets [`ServerConfig::chunk_size`].
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size;
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

/// What the agent does for each request. [`serve`] calls it from concurrent tasks.
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
}

/// The host is gone: output can no longer be delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the connection to the host is closed")]
#[non_exhaustive]
pub struct OutputClosed;

/// Sends one exec's output to the host, in chunks that fit a frame.
///
/// Sending waits while the connection's write queue is full, so a slow host slows the
/// command down instead of growing memory.
#[derive(Debug, Clone)]
pub struct OutputSink {
    id: u64,
    frames: mpsc::Sender<Vec<u8>>,
    max_frame: usize,
    chunk: usize,
}

/// The serialize-only form of an output reply, borrowing its bytes.
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

    async fn send(&self, chunk: &Chunk<'_>) -> Result<(), OutputClosed> {
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

/// Everything a request task needs.
#[derive(Clone)]
struct Context {
    handler: Arc<dyn Handler>,
    frames: mpsc::Sender<Vec<u8>>,
    max_frame: usize,
    chunk: usize,
}

impl Context {
    async fn handle(self, id: u64, request: Request) {
        let reply = match request {
            Request::Hello => Reply::Hello(self.handler.hello().await),
            Request::Ping => Reply::Pong,
            Request::Exec(req) => {
                let out = OutputSink {
                    id,
                    frames: self.frames.clone(),
                    max_frame: self.max_frame,
                    chunk: self.chunk,
                };
                match self.handler.exec(req, out).await {
                    Ok(status) => Reply::Exit(status),
                    Err(message) => error_reply(message),
                }
            }
            Request::Shutdown { reboot } => match self.handler.shutdown(reboot).await {
                Ok(()) => Reply::Ok,
                Err(message) => error_reply(message),
            },
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

/// Serves one host connection with `handler` until the host closes it.
///
/// Requests are handled concurrently, each in its own task (up to
/// [`ServerConfig::max_in_flight`]); an exec's output is streamed as it comes. A request of a
/// type this version does not know is answered with an error and serving goes on. Returns
/// `Ok(())` when the host closes the stream; a bad frame or a failed write ends serving with
/// an error. Either way, requests still running are cancelled (an exec's processes are
/// killed by the [`Handler`] when its future is dropped).
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

    let result = loop {
        while tasks.try_join_next().is_some() {}
        let next = async {
            let permit = Arc::clone(&permits).acquire_owned().await;
            (permit, read_frame(&mut reader, config.max_frame).await)
        };
        let (permit, frame) = tokio::select! {
            next = next => next,
            written = &mut writer => break writer_outcome(written),
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { break Ok(()) };
        let body = match frame {
            Ok(Some(body)) => body,
            Ok(None) => break Ok(()),
            Err(err) => break Err(ServeError::Read(err)),
        };
        match decode::<RequestFrame<Request>>(&body) {
            Ok(RequestFrame { id, request }) => {
                let context = context.clone();
                tasks.spawn(async move {
                    context.handle(id, request).await;
                    drop(permit);
                });
            }
            Err(err) => match decode::<IdOnly>(&body) {
                Ok(IdOnly { id }) => {
                    tracing::debug!(id, error = %err, "unsupported request");
                    let reply = error_reply(format!("unsupported request: {err}"));
                    context.reply(id, &reply).await;
                }
                Err(_) => break Err(ServeError::Read(err)),
            },
        }
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
        let config = ServerConfig::default().with_max_frame(1024);
        assert_eq!(config.effective_chunk(), (1024 - ENVELOPE_ROOM) / 4 * 3);
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let Reply::Error { message } = error_reply("é".repeat(MAX_ERROR_MESSAGE)) else {
            panic!("not an error reply");
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE);
    }
}
