//! Helpers shared by the integration tests: a scripted fake agent that speaks raw frames,
//! and an in-memory handler for `serve`.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use vmkit_guest::{
    Client, ClientConfig, ExecRequest, ExitStatus, Handler, HelloInfo, OutputSink, ServerConfig,
    serve,
};

/// Room in each direction of the in-memory pipe.
pub const PIPE: usize = 256 * 1024;

/// Frames a raw body: big-endian u32 length, then the bytes.
pub fn frame_bytes(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

/// The far end of a client: reads the requests the client sends and writes whatever
/// bytes a test wants back.
pub struct RawPeer {
    pub stream: DuplexStream,
}

impl RawPeer {
    /// Reads one frame and parses it as JSON.
    pub async fn read_json(&mut self) -> Value {
        let len = self.stream.read_u32().await.unwrap() as usize;
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// Reads one request and returns its id and its `request` object.
    pub async fn read_request(&mut self) -> (u64, Value) {
        let frame = self.read_json().await;
        (frame["id"].as_u64().unwrap(), frame["request"].clone())
    }

    /// Writes raw bytes.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Writes one JSON value as a frame.
    pub async fn write_json(&mut self, value: &Value) {
        let body = serde_json::to_vec(value).unwrap();
        self.write_raw(&frame_bytes(&body)).await;
    }

    /// Sends a reply envelope.
    pub async fn reply(&mut self, id: u64, reply: Value) {
        self.write_json(&json!({"id": id, "reply": reply})).await;
    }

    /// Answers the next request, which must be a ping.
    pub async fn answer_ping(&mut self) {
        let (id, request) = self.read_request().await;
        assert_eq!(request["type"], "ping");
        self.reply(id, json!({"type": "pong"})).await;
    }
}

/// A client connected to a raw peer.
pub fn client_with_raw_peer(config: ClientConfig) -> (Client, RawPeer) {
    let (host, guest) = tokio::io::duplex(PIPE);
    (Client::new(host, config), RawPeer { stream: guest })
}

/// A handler that runs nothing real:
/// - `echo ARGS...` writes the arguments, space-separated, to stdout and exits 0;
/// - `fail` returns an error;
/// - `spam N SIZE` writes N chunks of SIZE bytes to stdout and N to stderr;
/// - `hang` never ends and sets `dropped` when its future is dropped;
/// - `exit N` exits with code N.
#[derive(Default)]
pub struct FakeHandler {
    pub dropped: Arc<AtomicBool>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub fn exited(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        ..ExitStatus::default()
    }
}

#[async_trait::async_trait]
impl Handler for FakeHandler {
    async fn hello(&self) -> HelloInfo {
        HelloInfo::new("9.9.9", "boot-1", "6.1.0-test", "x86_64")
    }

    async fn exec(&self, req: ExecRequest, out: OutputSink) -> Result<ExitStatus, String> {
        let args: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        match args.as_slice() {
            ["echo", rest @ ..] => {
                out.stdout(rest.join(" ").as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exited(0))
            }
            ["cat"] => {
                out.stdout(&req.stdin).await.map_err(|e| e.to_string())?;
                Ok(exited(0))
            }
            ["fail"] => Err("no such program".to_owned()),
            ["spam", n, size] => {
                let (n, size): (usize, usize) = (n.parse().unwrap(), size.parse().unwrap());
                let chunk = vec![b'x'; size];
                for _ in 0..n {
                    out.stdout(&chunk).await.map_err(|e| e.to_string())?;
                    out.stderr(&chunk).await.map_err(|e| e.to_string())?;
                }
                Ok(exited(0))
            }
            ["hang"] => {
                let _flag = SetOnDrop(Arc::clone(&self.dropped));
                tokio::time::sleep(Duration::from_secs(1 << 30)).await;
                Ok(exited(0))
            }
            ["exit", code] => Ok(exited(code.parse().unwrap())),
            _ => Err(format!("fake handler cannot run {args:?}")),
        }
    }

    async fn shutdown(&self, reboot: bool) -> Result<(), String> {
        if reboot {
            Err("reboot refused".to_owned())
        } else {
            Ok(())
        }
    }
}

/// A client and a `serve` loop with `handler`, joined by an in-memory pipe.
pub fn connected<H: Handler>(
    handler: H,
    client_config: ClientConfig,
    server_config: ServerConfig,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), vmkit_guest::ServeError>>,
) {
    let (host, guest) = tokio::io::duplex(PIPE);
    let server = tokio::spawn(serve(guest, Arc::new(handler), server_config));
    (Client::new(host, client_config), server)
}

/// The far end of a `serve` loop: the host side, speaking raw frames.
pub fn server_with_raw_host(
    handler: impl Handler,
    config: ServerConfig,
) -> (
    RawPeer,
    tokio::task::JoinHandle<Result<(), vmkit_guest::ServeError>>,
) {
    let (host, guest) = tokio::io::duplex(PIPE);
    let server = tokio::spawn(serve(guest, Arc::new(handler), config));
    (RawPeer { stream: host }, server)
}
