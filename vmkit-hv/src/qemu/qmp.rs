//! A small QMP client: the greeting, `qmp_capabilities`, then one command at a time.
//!
//! Commands carry ids and run strictly one after another on a connection; events that
//! arrive in between are skipped. Every call, the connection included, has a timeout.
//! QEMU's monitor serves one client at a time, so callers open a connection per
//! operation and drop it when done.

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest QMP message accepted; replies to the commands used here are far smaller.
const MAX_LINE: u64 = 1 << 20;

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to the QMP socket")]
    Connect(#[source] std::io::Error),
    /// Reading or writing the socket failed.
    #[error("QMP connection failed")]
    Io(#[source] std::io::Error),
    /// QEMU did not answer in time.
    #[error("QMP did not answer within {0:?}")]
    Timeout(Duration),
    /// QEMU closed the connection (it is exiting).
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("{class}: {desc}")]
    Command {
        /// The error class, such as `GenericError`.
        class: String,
        /// QEMU's message.
        desc: String,
    },
}

/// A QMP session in command mode.
#[derive(Debug)]
pub(crate) struct Qmp<S> {
    reader: BufReader<tokio::io::ReadHalf<S>>,
    writer: tokio::io::WriteHalf<S>,
    next_id: u64,
    timeout: Duration,
}

impl Qmp<UnixStream> {
    /// Connects to the QMP socket at `path` and negotiates capabilities, all within
    /// `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout(timeout))?
            .map_err(QmpError::Connect)?;
        Self::handshake(stream, timeout).await
    }
}

impl<S: AsyncRead + AsyncWrite> Qmp<S> {
    /// Reads the greeting from `stream` and enters command mode.
    pub async fn handshake(stream: S, timeout: Duration) -> Result<Self, QmpError> {
        let (reader, writer) = tokio::io::split(stream);
        let mut qmp = Self {
            reader: BufReader::new(reader),
            writer,
            next_id: 1,
            timeout,
        };
        let greeting = tokio::time::timeout(timeout, qmp.read_message())
            .await
            .map_err(|_| QmpError::Timeout(timeout))??;
        if !greeting.contains_key("QMP") {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {}",
                Value::Object(greeting)
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.execute_inner(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout(timeout))?
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.writer.write_all(&line).await.map_err(write_error)?;
        self.writer.flush().await.map_err(write_error)?;
        loop {
            let mut message = self.read_message().await?;
            if message.contains_key("event") {
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                return Err(QmpError::Protocol(format!(
                    "a reply for another command (expected id {id}): {}",
                    Value::Object(message)
                )));
            }
            if let Some(value) = message.remove("return") {
                return Ok(value);
            }
            if let Some(error) = message.remove("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Err(QmpError::Command {
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "a reply with neither return nor error: {}",
                Value::Object(message)
            )));
        }
    }

    /// Reads one JSON object (QMP sends one per line).
    async fn read_message(&mut self) -> Result<Map<String, Value>, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if n as u64 >= MAX_LINE {
                QmpError::Protocol(format!("a message longer than {MAX_LINE} bytes"))
            } else {
                QmpError::Closed
            });
        }
        match serde_json::from_slice(&line) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(other) => Err(QmpError::Protocol(format!("not a JSON object: {other}"))),
            Err(e) => Err(QmpError::Protocol(format!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&line).trim_end()
            ))),
        }
    }
}

/// A write to a peer that hung up means QEMU is exiting.
fn write_error(e: std::io::Error) -> QmpError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => QmpError::Closed,
        _ => QmpError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, DuplexStream};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}"#;

    /// A scripted QEMU: for each request line, the replies to send (with `{id}` replaced
    /// by the request's id). After the script it hangs up, or with `hold` stays silent.
    async fn fake_qemu(
        stream: DuplexStream,
        script: Vec<Vec<&'static str>>,
        hold: bool,
    ) -> Vec<Value> {
        let (r, mut w) = tokio::io::split(stream);
        let mut lines = BufReader::new(r).lines();
        w.write_all(format!("{GREETING}\r\n").as_bytes())
            .await
            .unwrap();
        let mut seen = Vec::new();
        for replies in script {
            let Some(line) = lines.next_line().await.unwrap() else {
                break;
            };
            let request: Value = serde_json::from_str(&line).unwrap();
            let id = request["id"].to_string();
            seen.push(request);
            for reply in replies {
                let reply = reply.replace("{id}", &id);
                w.write_all(format!("{reply}\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        }
        if hold {
            std::future::pending::<()>().await;
        }
        seen
    }

    #[tokio::test]
    async fn events_between_command_and_reply_are_skipped() {
        let (host, qemu) = tokio::io::duplex(4096);
        let server = tokio::spawn(fake_qemu(
            qemu,
            vec![
                vec![r#"{"return": {}, "id": {id}}"#],
                vec![
                    r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                    r#"{"return": {"status": "paused", "running": false}, "id": {id}}"#,
                ],
            ],
            false,
        ));
        let mut qmp = Qmp::handshake(host, Duration::from_secs(5)).await.unwrap();
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "paused");
        let seen = server.await.unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[1]["execute"], "query-status");
        assert_ne!(seen[0]["id"], seen[1]["id"], "each command has its own id");
    }

    #[tokio::test]
    async fn command_errors_carry_class_and_description() {
        let (host, qemu) = tokio::io::duplex(4096);
        tokio::spawn(fake_qemu(
            qemu,
            vec![
                vec![r#"{"return": {}, "id": {id}}"#],
                vec![r#"{"error": {"class": "GenericError", "desc": "no way"}, "id": {id}}"#],
            ],
            false,
        ));
        let mut qmp = Qmp::handshake(host, Duration::from_secs(5)).await.unwrap();
        let err = qmp.execute("cont", None).await.unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { class, desc } if class == "GenericError" && desc == "no way"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_qemu_times_out() {
        let (host, qemu) = tokio::io::duplex(4096);
        tokio::spawn(fake_qemu(
            qemu,
            vec![vec![r#"{"return": {}, "id": {id}}"#], vec![]],
            true,
        ));
        let mut qmp = Qmp::handshake(host, Duration::from_millis(200))
            .await
            .unwrap();
        let err = qmp.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_peer_that_is_not_qmp_is_a_protocol_error() {
        let (host, mut qemu) = tokio::io::duplex(4096);
        qemu.write_all(b"220 smtp.example.com ESMTP\r\n")
            .await
            .unwrap();
        let err = Qmp::handshake(host, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_closed_connection_is_reported_as_closed() {
        let (host, qemu) = tokio::io::duplex(4096);
        tokio::spawn(fake_qemu(
            qemu,
            vec![vec![r#"{"return": {}, "id": {id}}"#], vec![]],
            false,
        ));
        let mut qmp = Qmp::handshake(host, Duration::from_secs(5)).await.unwrap();
        let err = qmp.execute("quit", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err:?}");
    }
}
