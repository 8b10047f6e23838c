//! `POST /v1/vms/{name}/session`: an interactive session in a VM through its agent
//! ([`Commands::session`](crate::Commands::session)), on the API's connection once it
//! is upgraded.
//!
//! The request carries the [`SessionRequest`](crate::guest::SessionRequest) as JSON in
//! the [`SESSION_HEADER`] header, with `Connection: upgrade` and `Upgrade:`
//! [`SESSION_PROTOCOL`]. An error (the VM is not found, not running, ...) is an
//! ordinary JSON error answer; success is `101 Switching Protocols`, after which both
//! sides send frames: a kind byte, the payload's length as a big-endian `u32`, and
//! at most [`MAX_FRAME`] bytes of payload. The client sends [`ClientFrame`]s (its
//! input, window changes, signals, the end of its input, a hang-up); the daemon
//! sends [`ServerFrame`]s (output, then one exit or error frame) and closes.

use tokio::io::{AsyncRead, AsyncReadExt};

use vmkit_guest::ExitStatus;

/// The header that carries the session's request, as JSON.
pub const SESSION_HEADER: &str = "vmkit-session";
/// The protocol the connection is upgraded to.
pub const SESSION_PROTOCOL: &str = "vmkit-session";
/// The largest payload of one frame.
pub const MAX_FRAME: usize = 64 * 1024;

/// What the client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientFrame {
    /// Bytes for the process's standard input (what the user types, with a pty).
    Stdin(Vec<u8>),
    /// The terminal is now `cols` × `rows`.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The input has ended.
    CloseStdin,
    /// A signal for the process, by its SSH name (`INT`, `TERM`, ...).
    Signal(String),
    /// The client is leaving: end the session.
    HangUp,
}

/// What the daemon sends.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerFrame {
    /// Standard output (with a pty, everything the terminal shows).
    Stdout(Vec<u8>),
    /// Standard error (without a pty).
    Stderr(Vec<u8>),
    /// How the process ended; the last frame.
    Exit(ExitStatus),
    /// The session broke; the last frame.
    Error(String),
}

/// A frame that is not one of the protocol's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Reading the connection failed.
    #[error("reading the session failed")]
    Io(#[from] std::io::Error),
    /// A payload larger than [`MAX_FRAME`].
    #[error("a session frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    /// An unknown kind, or a payload that does not fit its kind.
    #[error("a malformed session frame (kind {0})")]
    Malformed(u8),
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frames are built from at most MAX_FRAME bytes");
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads one frame: its kind and payload; `None` at a clean end of the connection.
async fn read_frame(
    reader: &mut (impl AsyncRead + Unpin),
) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
    let mut head = [0u8; 5];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

impl ClientFrame {
    /// Its bytes on the wire; input longer than [`MAX_FRAME`] goes in several frames.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ClientFrame::Stdin(data) => data
                .chunks(MAX_FRAME)
                .flat_map(|piece| frame(0, piece))
                .collect(),
            ClientFrame::Resize { cols, rows } => {
                let mut payload = cols.to_be_bytes().to_vec();
                payload.extend_from_slice(&rows.to_be_bytes());
                frame(1, &payload)
            }
            ClientFrame::CloseStdin => frame(2, &[]),
            ClientFrame::Signal(name) => frame(3, name.as_bytes()),
            ClientFrame::HangUp => frame(4, &[]),
        }
    }

    /// The next frame from `reader`; `None` when the client closed the connection.
    pub async fn read(reader: &mut (impl AsyncRead + Unpin)) -> Result<Option<Self>, FrameError> {
        let Some((kind, payload)) = read_frame(reader).await? else {
            return Ok(None);
        };
        Ok(Some(match (kind, payload.as_slice()) {
            (0, _) => ClientFrame::Stdin(payload),
            (1, [c0, c1, r0, r1]) => ClientFrame::Resize {
                cols: u16::from_be_bytes([*c0, *c1]),
                rows: u16::from_be_bytes([*r0, *r1]),
            },
            (2, []) => ClientFrame::CloseStdin,
            (3, name) if name.len() <= 32 => ClientFrame::Signal(
                String::from_utf8(name.to_vec()).map_err(|_| FrameError::Malformed(kind))?,
            ),
            (4, []) => ClientFrame::HangUp,
            _ => return Err(FrameError::Malformed(kind)),
        }))
    }
}

impl ServerFrame {
    /// Its bytes on the wire; output longer than [`MAX_FRAME`] goes in several frames.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ServerFrame::Stdout(data) => data.chunks(MAX_FRAME).flat_map(|p| frame(0, p)).collect(),
            ServerFrame::Stderr(data) => data.chunks(MAX_FRAME).flat_map(|p| frame(1, p)).collect(),
            ServerFrame::Exit(status) => frame(
                2,
                &serde_json::to_vec(status).expect("an exit status always serializes"),
            ),
            ServerFrame::Error(message) => frame(3, message.as_bytes()),
        }
    }

    /// The next frame from `reader`; `None` when the daemon closed the connection.
    pub async fn read(reader: &mut (impl AsyncRead + Unpin)) -> Result<Option<Self>, FrameError> {
        let Some((kind, payload)) = read_frame(reader).await? else {
            return Ok(None);
        };
        Ok(Some(match kind {
            0 => ServerFrame::Stdout(payload),
            1 => ServerFrame::Stderr(payload),
            2 => ServerFrame::Exit(
                serde_json::from_slice(&payload).map_err(|_| FrameError::Malformed(kind))?,
            ),
            3 => ServerFrame::Error(String::from_utf8_lossy(&payload).into_owned()),
            _ => return Err(FrameError::Malformed(kind)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_long_input_is_split() {
        let frames = [
            ClientFrame::Stdin(b"ls\r".to_vec()),
            ClientFrame::Resize {
                cols: 132,
                rows: 43,
            },
            ClientFrame::CloseStdin,
            ClientFrame::Signal("INT".into()),
            ClientFrame::HangUp,
        ];
        let wire: Vec<u8> = frames.iter().flat_map(ClientFrame::encode).collect();
        let mut reader = wire.as_slice();
        for want in &frames {
            assert_eq!(
                ClientFrame::read(&mut reader).await.unwrap().as_ref(),
                Some(want)
            );
        }
        assert!(ClientFrame::read(&mut reader).await.unwrap().is_none());

        let long = vec![7u8; MAX_FRAME * 2 + 1];
        let wire = ServerFrame::Stdout(long.clone()).encode();
        let mut reader = wire.as_slice();
        let mut got = Vec::new();
        while let Some(ServerFrame::Stdout(piece)) = ServerFrame::read(&mut reader).await.unwrap() {
            assert!(piece.len() <= MAX_FRAME);
            got.extend(piece);
        }
        assert_eq!(got, long);
        let wire = ServerFrame::Exit(ExitStatus::exited(3)).encode();
        assert_eq!(
            ServerFrame::read(&mut wire.as_slice()).await.unwrap(),
            Some(ServerFrame::Exit(ExitStatus::exited(3)))
        );
    }

    #[tokio::test]
    async fn oversized_or_malformed_frames_are_refused() {
        let mut oversized = vec![0u8];
        oversized.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            ClientFrame::read(&mut oversized.as_slice()).await,
            Err(FrameError::TooLarge(_))
        ));
        for bad in [frame(1, &[1, 2, 3]), frame(9, &[]), frame(2, b"x")] {
            assert!(matches!(
                ClientFrame::read(&mut bad.as_slice()).await,
                Err(FrameError::Malformed(_))
            ));
        }
    }
}
