//! The host side of cloud-hypervisor's hybrid vsock.
//!
//! cloud-hypervisor exposes the guest's vsock device as a Unix socket on the host.
//! A host program connects to it and writes `CONNECT <port>\n`; the VMM opens a vsock
//! connection to that port in the guest and answers `OK <host port>\n`, after which
//! the stream carries the connection's bytes both ways. When nothing in the guest
//! listens on the port, the VMM closes the Unix stream instead of answering.

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmkit_core::HypervisorError;

/// Longest handshake answer accepted (`OK ` and a 32-bit port fit in 14).
const MAX_ANSWER: usize = 32;

/// Connects to `port` in the guest through the hybrid-vsock socket at `socket` and
/// returns the raw stream once the VMM has answered `OK`.
pub(crate) async fn connect(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HypervisorError> {
    match tokio::time::timeout(timeout, handshake(socket, port)).await {
        Ok(result) => result,
        Err(_) => Err(HypervisorError::Timeout {
            operation: "the hybrid-vsock handshake",
            timeout,
        }),
    }
}

async fn handshake(socket: &Path, port: u32) -> Result<UnixStream, HypervisorError> {
    let context = |what: &str| format!("{what} the hybrid-vsock socket {}", socket.display());
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| HypervisorError::io(context("connecting to"), e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| HypervisorError::io(context("writing to"), e))?;

    // Byte by byte: whatever follows the newline belongs to the agent protocol.
    let mut answer = Vec::with_capacity(MAX_ANSWER);
    loop {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(HypervisorError::io(
                    format!("nothing in the guest listens on vsock port {port} yet"),
                    io::Error::from(io::ErrorKind::ConnectionRefused),
                ));
            }
            Err(e) => return Err(HypervisorError::io(context("reading from"), e)),
        };
        if byte == b'\n' {
            break;
        }
        if answer.len() == MAX_ANSWER {
            return Err(HypervisorError::Protocol(
                "the hybrid-vsock answer has no end of line".into(),
            ));
        }
        answer.push(byte);
    }
    let answer = String::from_utf8_lossy(&answer);
    match answer.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_host_port)) => Ok(stream),
        _ => Err(HypervisorError::Protocol(format!(
            "the hybrid-vsock socket answered {answer:?} instead of `OK <port>`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    async fn vmm_answering(answer: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.expect("read");
            assert_eq!(line, "CONNECT 1024\n");
            stream.get_mut().write_all(answer).await.expect("write");
            // Keep the stream open a moment so the client reads what was sent.
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn ok_hands_over_the_stream_without_eating_protocol_bytes() {
        let (_dir, path) = vmm_answering(b"OK 1073741824\nHELLO").await;
        let mut stream = connect(&path, 1024, Duration::from_secs(2))
            .await
            .expect("connect");
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"HELLO");
    }

    #[tokio::test]
    async fn a_closed_stream_means_no_listener_in_the_guest() {
        let (_dir, path) = vmm_answering(b"").await;
        let err = connect(&path, 1024, Duration::from_secs(2)).await.err();
        assert!(matches!(err, Some(HypervisorError::Io { .. })), "{err:?}");
    }

    #[tokio::test]
    async fn another_answer_is_a_protocol_error() {
        let (_dir, path) = vmm_answering(b"NO\n").await;
        let err = connect(&path, 1024, Duration::from_secs(2)).await.err();
        assert!(matches!(err, Some(HypervisorError::Protocol(_))), "{err:?}");
    }
}
