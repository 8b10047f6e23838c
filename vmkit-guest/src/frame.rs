//! Framing: a u32 big-endian length, then that many bytes of JSON.

use std::io;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of the length prefix in front of every frame body.
pub(crate) const HEADER_LEN: usize = 4;

/// The default cap on a frame body, in bytes (4 MiB).
pub const DEFAULT_MAX_FRAME: usize = 4 << 20;

/// A frame could not be read, written or decoded.
///
/// Every variant is the peer's or the channel's fault; none of them is raised by a panic.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more bytes than the configured cap allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced (or, when writing, the encoded) body length.
        len: usize,
        /// The configured cap.
        max: usize,
    },
    /// The length prefix is zero; every message has a non-empty body.
    #[error("frame has a zero length")]
    Empty,
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The body is not a valid message: not JSON, an unknown message type, a missing field or
    /// a payload that is not base64.
    #[error("frame body is not a valid message: {0}")]
    Malformed(String),
    /// Reading from or writing to the channel failed.
    #[error("I/O error on the agent channel")]
    Io(#[source] Arc<io::Error>),
}

impl From<io::Error> for FrameError {
    fn from(err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(Arc::new(err))
        }
    }
}

/// Reads one frame body.
///
/// Returns `Ok(None)` when the stream ends cleanly between two frames. The length is checked
/// against `max` before anything is allocated. Not cancel safe: dropping the future in the
/// middle of a frame loses the stream's framing.
pub(crate) async fn read_frame<R>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = reader.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    // A u32 always fits in usize on the 32- and 64-bit targets we build for; saturate anyway
    // so that the cap check below rejects it rather than wrapping.
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Encodes `message` as one frame (length prefix included), refusing bodies over `max`.
pub(crate) fn encode_frame<T: Serialize + ?Sized>(
    message: &T,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - HEADER_LEN;
    let max = max.min(u32::MAX as usize);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    buf[..HEADER_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(buf)
}

/// Decodes a frame body into a message.
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn read_bytes(bytes: &[u8], max: usize) -> Result<Option<Vec<u8>>, FrameError> {
        let mut reader = bytes;
        read_frame(&mut reader, max).await
    }

    #[tokio::test]
    async fn frame_round_trips_through_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let frame = encode_frame(&serde_json::json!({"id": 1}), 1024).unwrap();
        let writer = tokio::spawn(async move { a.write_all(&frame).await });
        let body = read_frame(&mut b, 1024).await.unwrap().unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(body, br#"{"id":1}"#);
    }

    #[tokio::test]
    async fn clean_end_of_stream_between_frames_is_not_an_error() {
        assert!(read_bytes(b"", 16).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn end_of_stream_inside_the_header_is_truncated() {
        let err = read_bytes(&[0, 0], 16).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated));
    }

    #[tokio::test]
    async fn end_of_stream_inside_the_body_is_truncated() {
        let err = read_bytes(&[0, 0, 0, 5, b'{'], 16).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated));
    }

    #[tokio::test]
    async fn zero_length_is_rejected() {
        let err = read_bytes(&[0, 0, 0, 0], 16).await.unwrap_err();
        assert!(matches!(err, FrameError::Empty));
    }

    #[tokio::test]
    async fn length_over_the_cap_is_rejected_before_reading_the_body() {
        let err = read_bytes(&[0xff, 0xff, 0xff, 0xff], 16).await.unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 16
            }
        ));
    }

    #[test]
    fn encoding_over_the_cap_is_refused() {
        let err = encode_frame(&"x".repeat(100), 10).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 10, .. }));
    }
}
