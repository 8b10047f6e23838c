//! The messages and the envelopes they travel in.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ops::{
    GrowReport, HardenReport, HardenRequest, LogsRequest, Metrics, NetworkConfig, SessionRequest,
    SshInfo, UpgradeReport, UpgradeRequest, WriteFileRequest,
};

/// The protocol version this crate speaks, reported in [`HelloInfo::protocol`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The name of the QEMU virtio-serial port the agent serves
/// (`/dev/virtio-ports/org.vmkit.agent.0` in the guest).
pub const VIRTIO_PORT_NAME: &str = "org.vmkit.agent.0";

/// The AF_VSOCK port the agent listens on.
pub const VSOCK_PORT: u32 = 1024;

/// A request from the host to the agent.
///
/// On the wire it is a JSON object whose `type` field names the variant in snake case
/// (`"hello"`, `"ping"`, `"exec"`, `"shutdown"`, `"read_file"`, ...); the variant's fields
/// sit beside it.
///
/// Some kinds are not requests of their own but refer to the request whose id their
/// envelope carries: [`Request::Chunk`] (the next piece of its body or a session's
/// standard input), [`Request::Cancel`], and a session's [`Request::Resize`],
/// [`Request::CloseStdin`] and [`Request::Signal`]. None of them is answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// Ask the agent who it is; answered with [`HelloInfo`].
    Hello,
    /// Liveness probe; answered with an empty `pong`.
    Ping,
    /// Run a command; answered with a stream of output chunks and one exit status.
    Exec(ExecRequest),
    /// Power the guest off (or reboot it); answered with `ok` once accepted.
    Shutdown {
        /// Reboot instead of powering off.
        reboot: bool,
    },
    /// Address the interface with a given MAC, route through the gateway and set the name
    /// servers; answered with `ok`.
    ConfigureNetwork(NetworkConfig),
    /// Set the host name (kernel, `/etc/hostname`, the `127.0.1.1` line of `/etc/hosts`);
    /// answered with `ok`.
    SetHostname {
        /// The new host name.
        hostname: String,
    },
    /// Replace the keys vmkit manages in a user's `~/.ssh/authorized_keys`, keeping
    /// every other line; answered with `ok`.
    InstallSshKeys {
        /// The user; the image's default user when `None`.
        #[serde(default)]
        user: Option<String>,
        /// OpenSSH public keys, one per entry. None removes vmkit's keys.
        keys: Vec<String>,
    },
    /// Read a file; answered with `data` chunks and then `eof`, or an error when the file
    /// is larger than `limit`.
    ReadFile {
        /// The file's absolute path.
        path: String,
        /// The most bytes the host accepts.
        limit: u64,
    },
    /// Write a file atomically from the `size` bytes of `chunk` requests that follow;
    /// answered with `written`.
    WriteFile(WriteFileRequest),
    /// Sample the guest's load; answered with `metrics`.
    Metrics {
        /// The CPU sampling interval (default 1 s, at most 10 s).
        #[serde(default)]
        interval_ms: Option<u64>,
    },
    /// Read the last lines of a unit's journal or a file, and follow it if asked;
    /// answered with `lines` batches and then `ok` (never, when following).
    Logs(LogsRequest),
    /// Create the deploy user and tighten sshd; answered with `hardened`.
    Harden(HardenRequest),
    /// Replace the agent binary and restart; answered with `upgraded`.
    Upgrade(UpgradeRequest),
    /// Grow the ext4 filesystems mounted at `/` and `/data` to their block devices,
    /// online (the host grows only the disks); answered with `grown`.
    GrowFilesystems,
    /// Report the guest's SSH server: its host keys, whether it is installed, the
    /// image's default user; answered with `ssh_info`.
    SshInfo,
    /// Start a process whose standard input the host streams (an interactive shell, with
    /// a pty or pipes); answered like `exec` with `stdout` and `stderr` chunks and one
    /// `exit`, and with `stdin_ack`s as the process takes its input (see
    /// [`SESSION_WINDOW`]).
    Session(SessionRequest),
    /// The next piece of the body of the request with this envelope's id (`write_file`,
    /// `upgrade`), or bytes for the standard input of the session with that id. An empty
    /// chunk carries nothing (it is not an end of input: see [`Request::CloseStdin`]).
    /// Not answered.
    Chunk {
        /// The bytes, base64 on the wire.
        #[serde(with = "base64_bytes")]
        data: Bytes,
    },
    /// Stop the request with this envelope's id (a followed log), or hang up the session
    /// with that id (`SIGHUP` to its process group, `SIGKILL` shortly after). Not
    /// answered; the cancelled request gets no further reply.
    Cancel,
    /// Set the window size of the pty of the session with this envelope's id
    /// (`TIOCSWINSZ`, which sends `SIGWINCH` to its foreground process group); ignored
    /// for a session without a pty. Not answered.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// End of the standard input of the session with this envelope's id: its pipe is
    /// closed once the input sent before has been written. Ignored for a session with a
    /// pty, whose client sends the terminal's end-of-file character (^D) instead. Not
    /// answered.
    CloseStdin,
    /// Send a signal to the process group of the session with this envelope's id. Not
    /// answered; an unknown name is ignored, as SSH servers do.
    Signal {
        /// The signal's SSH name, without `SIG`: `INT`, `TERM`, `HUP`, `KILL`, `QUIT`,
        /// `USR1`, `USR2`, ... (RFC 4254, section 6.10).
        signal: String,
    },
}

/// How many bytes of a session's standard input may be on their way to the process
/// before the agent acknowledges them (`stdin_ack` replies, sent as the process takes
/// its input).
///
/// The [`Client`](crate::Client) never has more than this unacknowledged, so a process
/// that does not read its input slows down only its own sender, never the connection
/// that every other call shares. An agent that receives more than this ahead of the
/// process ends the session with an error: the host broke the protocol.
pub const SESSION_WINDOW: usize = 1 << 20;

/// What the agent says about itself in answer to [`Request::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HelloInfo {
    /// The protocol version the agent speaks ([`PROTOCOL_VERSION`] for this crate).
    pub protocol: u32,
    /// The agent's own version.
    pub agent_version: String,
    /// The guest kernel's boot id; it changes on every boot.
    pub boot_id: String,
    /// The guest kernel's release (`uname -r`).
    pub kernel: String,
    /// The guest's CPU architecture (`x86_64`, `aarch64`, ...).
    pub arch: String,
}

impl HelloInfo {
    /// A hello for the current [`PROTOCOL_VERSION`].
    pub fn new(
        agent_version: impl Into<String>,
        boot_id: impl Into<String>,
        kernel: impl Into<String>,
        arch: impl Into<String>,
    ) -> Self {
        HelloInfo {
            protocol: PROTOCOL_VERSION,
            agent_version: agent_version.into(),
            boot_id: boot_id.into(),
            kernel: kernel.into(),
            arch: arch.into(),
        }
    }
}

/// A command for the agent to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExecRequest {
    /// The program and its arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those of) the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory; the agent's own when `None`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes written to the command's standard input, which is then closed.
    /// Base64 on the wire; it must fit in one frame together with the rest of the request.
    #[serde(default, with = "base64_bytes")]
    pub stdin: Vec<u8>,
    /// Kill the command's process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// A request to run `argv` with nothing else set.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the bytes fed to standard input.
    pub fn stdin(mut self, stdin: impl Into<Vec<u8>>) -> Self {
        self.stdin = stdin.into();
        self
    }

    /// Sets the timeout after which the agent kills the command.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

/// How a command ended. Built with [`ExitStatus::exited`] or [`ExitStatus::killed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExitStatus {
    /// The exit code, when the command exited by itself.
    #[serde(default)]
    pub code: Option<i32>,
    /// The signal that killed the command, when one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// The agent killed the command because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// A command that exited by itself with `code`.
    pub fn exited(code: i32) -> Self {
        Self {
            code: Some(code),
            ..Self::default()
        }
    }

    /// A command that `signal` killed.
    pub fn killed(signal: i32) -> Self {
        Self {
            signal: Some(signal),
            ..Self::default()
        }
    }

    /// Marks the command as killed by the agent because its timeout passed.
    pub fn after_timeout(mut self) -> Self {
        self.timed_out = true;
        self
    }

    /// The command exited with code 0 before its timeout.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// One event of a running command, as yielded by [`ExecStream`](crate::ExecStream).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecEvent {
    /// A chunk of standard output.
    Stdout(Bytes),
    /// A chunk of standard error.
    Stderr(Bytes),
    /// The command ended; this is the last event.
    Exit(ExitStatus),
}

/// The collected result of a command: [`ExecStream::collect`](crate::ExecStream::collect)
/// or [`Client::exec_collect`](crate::Client::exec_collect).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecOutput {
    /// Standard output, up to the collection limit.
    pub stdout: Vec<u8>,
    /// Standard error, up to the collection limit.
    pub stderr: Vec<u8>,
    /// How the command ended.
    pub status: ExitStatus,
    /// Some output was dropped because a stream passed the collection limit.
    pub truncated: bool,
}

/// A reply from the agent to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Reply {
    /// Answer to `hello`.
    Hello(HelloInfo),
    /// Answer to `ping`.
    Pong,
    /// A chunk of an exec's standard output.
    Stdout {
        #[serde(with = "base64_bytes")]
        data: Bytes,
    },
    /// A chunk of an exec's standard error.
    Stderr {
        #[serde(with = "base64_bytes")]
        data: Bytes,
    },
    /// The last reply of an exec.
    Exit(ExitStatus),
    /// A chunk of a file being read.
    Data {
        #[serde(with = "base64_bytes")]
        data: Bytes,
    },
    /// A batch of log lines.
    Lines { lines: Vec<String> },
    /// The last reply of `read_file`: how many bytes were sent.
    Eof { size: u64 },
    /// Answer to `write_file`: how many bytes were written.
    Written { size: u64 },
    /// Answer to `metrics`.
    Metrics(Metrics),
    /// Answer to `harden`.
    Hardened(HardenReport),
    /// Answer to `upgrade`.
    Upgraded(UpgradeReport),
    /// Answer to `grow_filesystems`.
    Grown(GrowReport),
    /// Answer to `ssh_info`.
    SshInfo(SshInfo),
    /// The process of a session took this many more bytes of its standard input: the
    /// host may send as many more (see [`SESSION_WINDOW`]).
    StdinAck { bytes: u64 },
    /// A request was carried out (shutdown, network, hostname, keys, logs).
    Ok,
    /// A request failed in the agent; the last reply for its id.
    Error { message: String },
}

impl Reply {
    /// The `type` tag, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Reply::Hello(_) => "hello",
            Reply::Pong => "pong",
            Reply::Stdout { .. } => "stdout",
            Reply::Stderr { .. } => "stderr",
            Reply::Exit(_) => "exit",
            Reply::Data { .. } => "data",
            Reply::Lines { .. } => "lines",
            Reply::Eof { .. } => "eof",
            Reply::Written { .. } => "written",
            Reply::Metrics(_) => "metrics",
            Reply::Hardened(_) => "hardened",
            Reply::Upgraded(_) => "upgraded",
            Reply::Grown(_) => "grown",
            Reply::SshInfo(_) => "ssh_info",
            Reply::StdinAck { .. } => "stdin_ack",
            Reply::Ok => "ok",
            Reply::Error { .. } => "error",
        }
    }

    /// Whether this reply is the last one for its request id.
    pub(crate) fn is_final(&self) -> bool {
        !matches!(
            self,
            Reply::Stdout { .. }
                | Reply::Stderr { .. }
                | Reply::Data { .. }
                | Reply::Lines { .. }
                | Reply::StdinAck { .. }
        )
    }
}

/// A request in its envelope: `{"id": 7, "request": {"type": "ping"}}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RequestFrame<R> {
    pub(crate) id: u64,
    pub(crate) request: R,
}

/// A reply in its envelope: `{"id": 7, "reply": {"type": "pong"}}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReplyFrame<R> {
    pub(crate) id: u64,
    pub(crate) reply: R,
}

/// Just the id of a request envelope, to answer requests this version does not know.
#[derive(Debug, Deserialize)]
pub(crate) struct IdOnly {
    pub(crate) id: u64,
}

/// Serde for byte payloads as standard, padded base64 strings.
pub(crate) mod base64_bytes {
    use std::fmt;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserializer, Serializer, de};

    pub(crate) fn serialize<T, S>(bytes: &T, serializer: S) -> Result<S::Ok, S::Error>
    where
        T: AsRef<[u8]>,
        S: Serializer,
    {
        serializer.serialize_str(&STANDARD.encode(bytes.as_ref()))
    }

    pub(crate) fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: From<Vec<u8>>,
        D: Deserializer<'de>,
    {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                STANDARD.decode(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor).map(T::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_a_snake_case_type_tag() {
        let json = serde_json::to_value(RequestFrame {
            id: 3,
            request: Request::Shutdown { reboot: true },
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 3, "request": {"type": "shutdown", "reboot": true}})
        );
    }

    #[test]
    fn exec_payloads_are_base64() {
        let json =
            serde_json::to_value(Request::Exec(ExecRequest::new(["cat"]).stdin(*b"hi"))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "exec", "argv": ["cat"], "env": [], "cwd": null,
                "stdin": "aGk=", "timeout_ms": null
            })
        );
    }

    #[test]
    fn a_session_request_needs_only_its_type() {
        let req: Request = serde_json::from_str(r#"{"type":"session"}"#).unwrap();
        assert_eq!(req, Request::Session(SessionRequest::shell()));
    }

    #[test]
    fn session_controls_are_tagged_and_flat() {
        let controls = [
            (
                Request::Resize { cols: 80, rows: 24 },
                r#"{"type":"resize","cols":80,"rows":24}"#,
            ),
            (Request::CloseStdin, r#"{"type":"close_stdin"}"#),
            (
                Request::Signal {
                    signal: "INT".to_owned(),
                },
                r#"{"type":"signal","signal":"INT"}"#,
            ),
            (Request::SshInfo, r#"{"type":"ssh_info"}"#),
        ];
        for (request, json) in controls {
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request);
        }
    }

    #[test]
    fn stdin_acks_are_not_final() {
        let reply: Reply = serde_json::from_str(r#"{"type":"stdin_ack","bytes":64}"#).unwrap();
        assert_eq!(reply, Reply::StdinAck { bytes: 64 });
        assert!(!reply.is_final());
    }

    #[test]
    fn exec_request_needs_only_argv() {
        let req: Request = serde_json::from_str(r#"{"type":"exec","argv":["true"]}"#).unwrap();
        assert_eq!(req, Request::Exec(ExecRequest::new(["true"])));
    }

    #[test]
    fn output_chunks_decode_from_base64() {
        let reply: ReplyFrame<Reply> =
            serde_json::from_str(r#"{"id":9,"reply":{"type":"stdout","data":"aGk="}}"#).unwrap();
        assert_eq!(
            reply.reply,
            Reply::Stdout {
                data: Bytes::from_static(b"hi")
            }
        );
    }

    #[test]
    fn invalid_base64_is_rejected() {
        let reply = serde_json::from_str::<Reply>(r#"{"type":"stderr","data":"not base64!"}"#);
        assert!(reply.is_err());
    }

    #[test]
    fn exit_status_success_needs_code_zero_and_no_timeout() {
        assert!(ExitStatus::exited(0).success());
        assert!(!ExitStatus::exited(0).after_timeout().success());
        assert!(!ExitStatus::exited(1).success());
        assert!(!ExitStatus::killed(9).after_timeout().success());
    }
}
