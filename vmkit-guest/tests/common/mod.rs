//! Helpers shared by the integration tests: a scripted fake agent that speaks raw frames,
//! and an in-memory handler for `serve`.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use vmkit_guest::{
    Client, ClientConfig, ExecRequest, ExitStatus, Handler, HardenReport, HardenRequest, HelloInfo,
    InputStream, LogSource, LogsRequest, Metrics, NetworkConfig, OutputSink, ServerConfig,
    UpgradeReport, UpgradeRequest, UpgradeSource, WriteFileRequest, serve,
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
///
/// The management calls work on memory: `files` (read and written), `calls` (a line per
/// call), logs of unit `U` are the lines `U 1`, `U 2`, ... (a followed log then waits
/// forever and sets `dropped` when dropped), and an upgrade checks the SHA-256 of what it
/// received.
#[derive(Default)]
pub struct FakeHandler {
    pub dropped: Arc<AtomicBool>,
    pub files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    pub calls: Arc<Mutex<Vec<String>>>,
}

impl FakeHandler {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

/// Reads a whole body.
pub async fn drain(input: &mut InputStream) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    while let Some(chunk) = input.next_chunk().await.map_err(|e| e.to_string())? {
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

pub fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub fn exited(code: i32) -> ExitStatus {
    ExitStatus::exited(code)
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
        self.record(format!("shutdown reboot={reboot}"));
        if reboot {
            Err("reboot refused".to_owned())
        } else {
            Ok(())
        }
    }

    async fn configure_network(&self, config: NetworkConfig) -> Result<(), String> {
        self.record(format!(
            "network {} {}/{}",
            config.mac, config.address, config.prefix
        ));
        Ok(())
    }

    async fn set_hostname(&self, hostname: String) -> Result<(), String> {
        self.record(format!("hostname {hostname}"));
        Ok(())
    }

    async fn install_ssh_keys(
        &self,
        user: Option<String>,
        keys: Vec<String>,
    ) -> Result<(), String> {
        self.record(format!("keys {user:?} {}", keys.len()));
        Ok(())
    }

    async fn read_file(&self, path: String, limit: u64, out: OutputSink) -> Result<u64, String> {
        let data = self
            .files
            .lock()
            .unwrap()
            .get(&path)
            .cloned()
            .ok_or_else(|| format!("no file {path}"))?;
        if data.len() as u64 > limit {
            return Err(format!("{path} is over the limit"));
        }
        out.data(&data).await.map_err(|e| e.to_string())?;
        Ok(data.len() as u64)
    }

    async fn write_file(
        &self,
        req: WriteFileRequest,
        mut input: InputStream,
    ) -> Result<u64, String> {
        if req.path.starts_with("/refuse") {
            return Err(format!("{} is refused", req.path));
        }
        let data = drain(&mut input).await?;
        let size = data.len() as u64;
        self.files.lock().unwrap().insert(req.path, data);
        Ok(size)
    }

    async fn metrics(&self, interval: Duration) -> Result<Metrics, String> {
        let mut metrics = Metrics::default();
        metrics.cpu_pct = 12.5;
        metrics.mem_pct = 50.0;
        metrics.mem_total_bytes = 1 << 30;
        metrics.mem_available_bytes = 1 << 29;
        metrics.disk_pct = 10.0;
        metrics.load = [0.5, 0.25, 0.125];
        metrics.uptime_secs = interval.as_millis() as u64;
        Ok(metrics)
    }

    async fn logs(&self, req: LogsRequest, out: OutputSink) -> Result<(), String> {
        let LogSource::Unit(unit) = &req.source else {
            return Err("files are not faked".to_owned());
        };
        let lines: Vec<String> = (1..=req.effective_lines())
            .map(|i| format!("{unit} {i}"))
            .collect();
        out.lines(&lines).await.map_err(|e| e.to_string())?;
        if req.follow {
            let _flag = SetOnDrop(Arc::clone(&self.dropped));
            for i in 1.. {
                tokio::time::sleep(Duration::from_millis(10)).await;
                out.lines(&[format!("{unit} new {i}")])
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// `/data` grew from 1 to 2 GiB; `/` already filled its disk.
    async fn grow_filesystems(&self) -> Result<vmkit_guest::GrowReport, String> {
        let fs = |mount: &str, device: &str, before: u64, after: u64| {
            let mut fs = vmkit_guest::FilesystemGrowth::default();
            fs.mount = mount.to_owned();
            fs.device = device.to_owned();
            fs.before_bytes = before;
            fs.after_bytes = after;
            fs
        };
        let mut report = vmkit_guest::GrowReport::default();
        report.filesystems = vec![
            fs("/", "/dev/vda", 10 << 30, 10 << 30),
            fs("/data", "/dev/vdb", 1 << 30, 2 << 30),
        ];
        Ok(report)
    }

    async fn harden(&self, req: HardenRequest) -> Result<HardenReport, String> {
        let mut report = HardenReport::default();
        report.user = req.user.unwrap_or_else(|| "deploy".to_owned());
        report.changes = vec![format!("created user {}", report.user)];
        Ok(report)
    }

    async fn upgrade(
        &self,
        req: UpgradeRequest,
        mut input: InputStream,
    ) -> Result<UpgradeReport, String> {
        let UpgradeSource::Upload { .. } = req.source else {
            return Err("only uploads are faked".to_owned());
        };
        let data = drain(&mut input).await?;
        let sha256 = hex_sha256(&data);
        if sha256 != req.sha256 {
            return Err(format!(
                "SHA-256 mismatch: got {sha256}; the installed agent is unchanged"
            ));
        }
        let mut report = UpgradeReport::default();
        report.path = "/usr/local/bin/vmkit-agent".to_owned();
        report.sha256 = sha256;
        report.size = data.len() as u64;
        report.restarting = true;
        Ok(report)
    }
}

/// A handler with only the required methods, like one written for an older version.
pub struct MinimalHandler;

#[async_trait::async_trait]
impl Handler for MinimalHandler {
    async fn hello(&self) -> HelloInfo {
        HelloInfo::new("0.0.1", "boot", "6.1.0", "x86_64")
    }

    async fn exec(&self, _req: ExecRequest, _out: OutputSink) -> Result<ExitStatus, String> {
        Ok(exited(0))
    }

    async fn shutdown(&self, _reboot: bool) -> Result<(), String> {
        Ok(())
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
