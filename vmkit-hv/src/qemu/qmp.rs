//! A small QMP client: the greeting, `qmp_capabilities`, then commands and events.
//!
//! Commands carry ids. [`Qmp::execute`] runs one command and skips the events that
//! arrive before its reply (for the handshake and tests); the VMM's supervisor
//! (`super::supervisor`) instead sends with [`Qmp::send`] and reads every message
//! with [`Qmp::next_message`], events included. Every call, the connection
//! included, has a timeout. QEMU's monitor serves one client at a time, so one
//! supervisor per VMM holds the connection and everything else goes through it.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use serde_json::{Map, Value, json};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, Interest,
};
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
    /// The connection; reads are buffered, writes go straight to the stream.
    stream: BufReader<S>,
    /// What has been read of the next message: kept across cancelled reads.
    line: Vec<u8>,
    next_id: u64,
    timeout: Duration,
}

/// A stream QMP commands can be written to, with a descriptor attached when asked.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Writes all of `bytes`, with `fd` attached to the first part if given.
    fn send_bytes(
        &mut self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl Transport for UnixStream {
    async fn send_bytes(
        &mut self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<()> {
        match fd {
            Some(fd) => send_with_fd(self, bytes, fd).await,
            None => {
                self.write_all(bytes).await?;
                self.flush().await
            }
        }
    }
}

impl Transport for tokio::io::DuplexStream {
    async fn send_bytes(
        &mut self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<()> {
        if fd.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "an in-memory stream cannot pass descriptors",
            ));
        }
        self.write_all(bytes).await?;
        self.flush().await
    }
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

/// Writes all of `bytes` to `stream`, the first part with `fd` attached.
async fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let rights = [fd.as_raw_fd()];
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let attached: &[ControlMessage<'_>] = if sent == 0 {
            &[ControlMessage::ScmRights(&rights)]
        } else {
            &[]
        };
        let result = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &[IoSlice::new(&bytes[sent..])],
                attached,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match result {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<S: AsyncRead + AsyncWrite + Unpin> Qmp<S> {
    /// Reads the greeting from `stream` and enters command mode.
    pub async fn handshake(stream: S, timeout: Duration) -> Result<Self, QmpError> {
        let mut qmp = Self {
            stream: BufReader::new(stream),
            line: Vec::new(),
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
        let (id, line) = self.request(command, arguments);
        let stream = self.stream.get_mut();
        stream.write_all(&line).await.map_err(write_error)?;
        stream.flush().await.map_err(write_error)?;
        self.reply(id).await
    }

    /// The next request id and the line that sends `command`.
    fn request(&mut self, command: &str, arguments: Option<Value>) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        (id, line)
    }

    /// Reads messages up to the reply to request `id`, skipping events.
    async fn reply(&mut self, id: u64) -> Result<Value, QmpError> {
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

    /// Reads one JSON object (QMP sends one per line). Cancel-safe: what was read
    /// of a message stays for the next call.
    async fn read_message(&mut self) -> Result<Map<String, Value>, QmpError> {
        let limit = MAX_LINE.saturating_sub(self.line.len() as u64);
        let n = (&mut self.stream)
            .take(limit)
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(QmpError::Io)?;
        let line = std::mem::take(&mut self.line);
        if n == 0 && line.is_empty() {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if line.len() as u64 >= MAX_LINE {
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

impl<S: Transport> Qmp<S> {
    /// Sends `command` with `arguments` (and `fd`, passed with `SCM_RIGHTS`) without
    /// waiting for the reply; returns the id the reply will carry.
    pub async fn send(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<u64, QmpError> {
        let (id, line) = self.request(command, arguments);
        self.stream
            .get_mut()
            .send_bytes(&line, fd)
            .await
            .map_err(write_error)?;
        Ok(id)
    }

    /// The next message from QEMU: a reply or an event. Cancel-safe.
    pub async fn next_message(&mut self) -> Result<Message, QmpError> {
        let mut message = self.read_message().await?;
        if let Some(Value::String(event)) = message.remove("event") {
            let data = message.remove("data").unwrap_or(Value::Null);
            return Ok(Message::Event { event, data });
        }
        let id = message.get("id").and_then(Value::as_u64);
        let Some(id) = id else {
            return Err(QmpError::Protocol(format!(
                "a message that is neither an event nor a reply: {}",
                Value::Object(message)
            )));
        };
        if let Some(value) = message.remove("return") {
            return Ok(Message::Reply {
                id,
                result: Ok(value),
            });
        }
        if let Some(error) = message.remove("error") {
            let field = |name: &str| {
                error
                    .get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            return Ok(Message::Reply {
                id,
                result: Err(QmpError::Command {
                    class: field("class"),
                    desc: field("desc"),
                }),
            });
        }
        Err(QmpError::Protocol(format!(
            "a reply with neither return nor error: {}",
            Value::Object(message)
        )))
    }
}

/// A message from QEMU.
#[derive(Debug)]
pub(crate) enum Message {
    /// The reply to the command with this id.
    Reply {
        /// The command's id.
        id: u64,
        /// Its `return` value, or its error.
        result: Result<Value, QmpError>,
    },
    /// An event, such as `SHUTDOWN`, with its `data`.
    Event {
        /// The event's name.
        event: String,
        /// Its data (`null` when it has none).
        data: Value,
    },
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

    /// A QEMU that answers `qmp_capabilities`, then receives one command with a
    /// descriptor attached, writes `through` into that descriptor and answers.
    fn fd_taking_qemu(stream: std::os::unix::net::UnixStream, through: &'static [u8]) -> Value {
        use nix::sys::socket::{ControlMessageOwned, recvmsg};
        use std::io::{BufRead, IoSliceMut, Write};
        let mut writer = stream.try_clone().unwrap();
        writer
            .write_all(format!("{GREETING}\r\n").as_bytes())
            .unwrap();
        let mut capabilities = String::new();
        std::io::BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut capabilities)
            .unwrap();
        writer
            .write_all(b"{\"return\": {}, \"id\": 1}\r\n")
            .unwrap();
        let mut line = vec![0u8; 4096];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut line)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let n = msg.bytes;
        let fds: Vec<std::os::fd::RawFd> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(fds.len(), 1, "one descriptor comes with the command");
        // SAFETY: the descriptor was just received with SCM_RIGHTS and nothing else owns it.
        let mut passed = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        passed.write_all(through).unwrap();
        let request: Value = serde_json::from_slice(&line[..n]).unwrap();
        writer
            .write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", request["id"]).as_bytes())
            .unwrap();
        request
    }

    #[tokio::test]
    async fn a_descriptor_passed_with_a_command_reaches_the_peer() {
        let (host, qemu) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || fd_taking_qemu(qemu, b"via the passed fd"));
        host.set_nonblocking(true).unwrap();
        let host = UnixStream::from_std(host).unwrap();
        let mut qmp = Qmp::handshake(host, Duration::from_secs(5)).await.unwrap();
        let (read_end, write_end) = nix::unistd::pipe().unwrap();

        let id = qmp
            .send(
                "getfd",
                Some(json!({ "fdname": "snap" })),
                Some(std::os::fd::AsFd::as_fd(&write_end)),
            )
            .await
            .unwrap();
        let reply = qmp.next_message().await.unwrap();
        assert!(
            matches!(reply, Message::Reply { id: got, result: Ok(_) } if got == id),
            "{reply:?}"
        );

        drop(write_end);
        let request = server.join().unwrap();
        assert_eq!(request["execute"], "getfd");
        assert_eq!(request["arguments"]["fdname"], "snap");
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(read_end), &mut got).unwrap();
        assert_eq!(got, b"via the passed fd");
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
