//! The vmkit guest agent protocol: frames, messages, the host-side [`Client`] and the
//! agent-side [`serve`] loop.
//!
//! The host talks to the agent in each guest over one byte stream: hybrid vsock
//! (cloud-hypervisor), a virtio-serial port (QEMU), or anything else that is
//! [`AsyncRead`](tokio::io::AsyncRead) + [`AsyncWrite`](tokio::io::AsyncWrite). Every frame
//! is a big-endian `u32` length and that many bytes of JSON; the length is checked against a
//! cap ([`DEFAULT_MAX_FRAME`]) before anything is allocated. Requests carry an id chosen by
//! the host and every reply names the id it answers, so calls run concurrently and an exec
//! streams its output as many replies. `DESIGN.md` beside this crate's manifest describes
//! the wire format.
//!
//! The guest is untrusted: the [`Client`] accepts no reply for an id it did not send, no
//! frame over its cap, and nothing malformed; any of those closes it with an error instead
//! of a panic.
//!
//! Beyond `hello`, `ping`, `exec` and `shutdown`, the client manages the guest:
//! [`Client::configure_network`], [`Client::set_hostname`], [`Client::install_ssh_keys`],
//! [`Client::read_file`] and [`Client::write_file`] (streamed in chunks, size-capped),
//! [`Client::metrics`], [`Client::logs`] and [`Client::follow_logs`], [`Client::reboot`],
//! [`Client::harden`], [`Client::upgrade`] and [`Client::grow_filesystems`] (the guest
//! grows its filesystems to disks the host grew), [`Client::ssh_info`] (the guest sshd's
//! host keys and the image's default user) and [`Client::session`] (an interactive
//! process, with a pty or pipes, whose standard input the host streams, for `ssh VM`
//! into images without sshd). Each [`Handler`] method behind them has a
//! default that answers "unsupported by this agent", so handlers written against an older
//! version keep compiling.
//!
//! The `agent` feature adds `SystemHandler`, the handler that runs inside real guests.
//!
//! # Example
//!
//! A toy agent served over an in-memory pipe, and a client calling it:
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_guest::{
//!     Client, ClientConfig, ExecRequest, ExitStatus, Handler, HelloInfo, OutputSink,
//!     ServerConfig, serve,
//! };
//!
//! struct Echo;
//!
//! #[async_trait::async_trait]
//! impl Handler for Echo {
//!     async fn hello(&self) -> HelloInfo {
//!         HelloInfo::new("0.0.0", "boot-id", "6.1.0", "x86_64")
//!     }
//!     async fn exec(&self, req: ExecRequest, out: OutputSink) -> Result<ExitStatus, String> {
//!         out.stdout(req.argv.join(" ").as_bytes()).await.map_err(|e| e.to_string())?;
//!         Ok(ExitStatus::exited(0))
//!     }
//!     async fn shutdown(&self, _reboot: bool) -> Result<(), String> {
//!         Err("not in a doc test".to_owned())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (host_side, guest_side) = tokio::io::duplex(64 * 1024);
//! tokio::spawn(serve(guest_side, Arc::new(Echo), ServerConfig::default()));
//!
//! let client = Client::new(host_side, ClientConfig::default());
//! assert_eq!(client.hello().await?.kernel, "6.1.0");
//! let output = client.exec_collect(ExecRequest::new(["echo", "hi"]), 1024).await?;
//! assert_eq!(output.stdout, b"echo hi");
//! assert!(output.status.success());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "agent")]
mod agent;
mod client;
mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod message;
mod ops;
mod server;

#[cfg(feature = "agent")]
pub use agent::{SystemHandler, online_hotplugged};
/// The attribute for implementing [`Handler`], re-exported so that implementors use the
/// same version.
pub use async_trait::async_trait;
/// The byte buffer in [`ExecEvent`], re-exported so that callers use the same version.
pub use bytes::Bytes;
pub use client::{
    Client, ClientConfig, ClientError, ExecStream, GuestSession, GuestText, LogStream,
    SessionEvents, SessionWriter,
};
pub use frame::{DEFAULT_MAX_FRAME, FrameError};
pub use message::{
    ExecEvent, ExecOutput, ExecRequest, ExitStatus, HelloInfo, PROTOCOL_VERSION, Request,
    SESSION_WINDOW, VIRTIO_PORT_NAME, VSOCK_PORT,
};
pub use ops::{
    ContainerHealth, DEFAULT_DEPLOY_USER, DEFAULT_LOG_LINES, DEFAULT_METRICS_INTERVAL_MS,
    FilesystemGrowth, GrowReport, HardenReport, HardenRequest, LogSource, LogsRequest,
    MAX_LOG_LINE, MAX_LOG_LINES, MAX_METRICS_INTERVAL_MS, Metrics, NetworkConfig, PtySize,
    SessionRequest, SshInfo, UpgradeReport, UpgradeRequest, UpgradeSource, WriteFileRequest,
};
pub use server::{
    Handler, InputError, InputStream, OutputClosed, OutputSink, ServeError, ServerConfig,
    SessionControl, SessionControls, SessionInput, SessionStdin, serve,
};
