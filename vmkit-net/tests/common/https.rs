//! The HTTPS edge's harness, shared by its tests: [`Edge`] runs
//! [`HttpsEdge`] over a fake host's manager with alice's VM `web`, whose web
//! server (ports 80 and 8080) is a small HTTP server on 127.0.0.1 ([`serve`]) that
//! echoes what it was sent, WebSocket messages included; `curl` and a raw TLS client
//! reach it through the edge.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use vmkit_core::testing::{FakeHost, LoopbackGateway};
use vmkit_core::{
    Caller, CreateRequest, Door, Handle, StateStore, StoreGateway, User, UserId, VmName, VmSpec,
    WebSessions,
};
use vmkit_net::challenges::AcmeChallenges;
use vmkit_net::https::tls::{CertStore, LocalCa};
use vmkit_net::https::{HttpsConfig, HttpsEdge};

pub const DOMAIN: &str = "vm.test";

/// The "VM's" web server: echoes request headers (as JSON), counts uploads, streams
/// downloads, sets a cookie with `Domain`, and echoes WebSocket messages (`/ws`).
pub async fn web_server(hits: Arc<AtomicUsize>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let hits = hits.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    serve(req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub async fn serve(
    mut req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<TestBody>, Infallible> {
    let full = |s: String| Full::new(Bytes::from(s)).boxed();
    let path = req.uri().path().to_owned();
    let response = match path.as_str() {
        "/ws" => {
            let accept = req
                .headers()
                .get("sec-websocket-key")
                .map(|key| websocket_accept(key.as_bytes()))
                .unwrap_or_default();
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let upgraded = upgrade.await.unwrap();
                websocket_echo(hyper_util::rt::TokioIo::new(upgraded)).await;
            });
            hyper::Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(full(String::new()))
                .unwrap()
        }
        "/count" => {
            let mut body = req.into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                }
            }
            hyper::Response::new(full(total.to_string()))
        }
        "/big" => {
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .unwrap()
                .parse()
                .unwrap();
            let chunks = (0..n.div_ceil(65536)).map(move |i| {
                let len = 65536.min(n - i * 65536);
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; len])))
            });
            hyper::Response::new(StreamBody::new(futures::stream::iter(chunks)).boxed())
        }
        // Server-sent events: one now, the next a second later.
        "/sse" => {
            let events = futures::stream::unfold(0u32, |n| async move {
                if n == 2 {
                    return None;
                }
                if n == 1 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: {}\n\n", n + 1)));
                Some((Ok::<_, Infallible>(frame), n + 1))
            });
            hyper::Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(events).boxed())
                .unwrap()
        }
        // A slow download: 40 chunks of 64 KiB, 50 ms apart.
        "/slow" => {
            let chunks = futures::stream::unfold(0u32, |n| async move {
                if n == 40 {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let frame = Frame::data(Bytes::from(vec![b's'; 65536]));
                Some((Ok::<_, Infallible>(frame), n + 1))
            });
            hyper::Response::new(StreamBody::new(chunks).boxed())
        }
        "/cookie" => hyper::Response::builder()
            .header("set-cookie", "app=1; Domain=vm.test; Path=/")
            .header("set-cookie", "__Host-vmkit=forged; Path=/; Secure")
            .body(full("cookie".into()))
            .unwrap(),
        _ => {
            let headers: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            hyper::Response::new(full(serde_json::to_string(&headers).unwrap()))
        }
    };
    Ok(response)
}

pub struct Edge {
    pub host: FakeHost,
    pub dir: TempDir,
    pub ca: PathBuf,
    pub https: u16,
    pub http: u16,
    pub hits: Arc<AtomicUsize>,
    pub challenges: Arc<AcmeChallenges>,
    /// The certificates the edge serves (replaceable while it runs).
    pub certs: Arc<CertStore>,
    pub alice: User,
    pub bob: User,
    pub stop: Option<oneshot::Sender<()>>,
}

impl Edge {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::new().await;
        let store: Arc<dyn StateStore> = host.store.clone();
        let hits = Arc::new(AtomicUsize::new(0));
        let web = web_server(hits.clone()).await;
        let gateway = LoopbackGateway::new(
            StoreGateway::new(store.clone(), DOMAIN),
            HashMap::from([(80, web), (8080, web)]),
        );
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let ca_path = ca.certificate_path().to_owned();
        let certs = CertStore::new(DOMAIN, Some(ca)).unwrap();
        let challenges = Arc::new(AcmeChallenges::new());
        let https = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https_port = https.local_addr().unwrap().port();
        let http_port = http.local_addr().unwrap().port();
        let config = HttpsConfig::new(DOMAIN, dir.path())
            .public_port(https_port)
            .ssh("vm.test", 2222);
        let edge = HttpsEdge::local(
            host.manager.clone(),
            gateway,
            WebSessions::new(store.clone()),
            certs.clone(),
            challenges.clone(),
            config,
        )
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            edge.serve(https, Some(http), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let alice = User::new(UserId(1), Handle::new("alice").unwrap());
        let mut bob = User::new(UserId(2), Handle::new("bob").unwrap());
        bob.email = Some("bob@example.test".into());
        store.put_user(&alice).await.unwrap();
        store.put_user(&bob).await.unwrap();
        let edge = Self {
            host,
            dir,
            ca: ca_path,
            https: https_port,
            http: http_port,
            hits,
            challenges,
            certs,
            alice,
            bob,
            stop: Some(stop),
        };
        edge.as_user(1)
            .create(
                CreateRequest::new(UserId(1), VmSpec::default()).name(VmName::new("web").unwrap()),
            )
            .await
            .unwrap();
        edge
    }

    pub fn as_user(&self, id: u64) -> vmkit_core::Commands {
        let user = if id == 1 { &self.alice } else { &self.bob };
        self.host.manager.commands(Caller::user(user, Door::Ssh))
    }

    /// A browser (a cookie jar) signed in as user `id`.
    pub async fn browser(&self, id: u64) -> PathBuf {
        let jar = self.dir.path().join(format!("jar-{id}-{}", rand_suffix()));
        let link = self.as_user(id).sign_in_link().await.unwrap();
        let out = self
            .curl(
                &jar,
                &[&format!(
                    "https://{DOMAIN}:{}/__vmkit/login?token={link}",
                    self.https
                )],
            )
            .await;
        assert_eq!(status(&out), 303, "{}", text(&out));
        jar
    }

    /// `curl` with the local CA, every host resolved to 127.0.0.1, the cookie jar
    /// `jar`; prints the status line and headers, then the body.
    pub async fn curl(&self, jar: &Path, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "-i", "--max-time", "30", "--cacert"])
            .arg(&self.ca)
            .arg("-c")
            .arg(jar)
            .arg("-b")
            .arg(jar);
        for host in [
            DOMAIN,
            "web.vm.test",
            "web--8080.vm.test",
            "web--9999.vm.test",
            "web--8000.vm.test",
            "nope.vm.test",
        ] {
            for port in [self.https, self.http] {
                cmd.arg("--resolve").arg(format!("{host}:{port}:127.0.0.1"));
            }
        }
        cmd.args(args).output().await.unwrap()
    }

    pub async fn get(&self, jar: &Path, url: &str) -> Output {
        self.curl(jar, &[url]).await
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The status of the last response curl printed.
pub fn status(out: &Output) -> u16 {
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {}", text(out)))
}

/// The value of header `name` in the last response curl printed.
pub fn header(out: &Output, name: &str) -> Option<String> {
    let s = String::from_utf8_lossy(&out.stdout);
    let last = s.rsplit("HTTP/").next().unwrap_or("");
    last.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// The JSON body of a response from the echo endpoint.
pub fn echoed(out: &Output) -> HashMap<String, String> {
    let s = String::from_utf8_lossy(&out.stdout);
    let body = s.rsplit("\r\n\r\n").next().unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// A TLS connection to the edge for `host`, trusting only the local CA.
pub async fn tls(
    edge: &Edge,
    host: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&edge.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", edge.https))
        .await
        .unwrap();
    connector
        .connect(host.to_owned().try_into().unwrap(), tcp)
        .await
        .unwrap()
}

pub async fn read_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The `Sec-WebSocket-Accept` answer to `key` (RFC 6455, section 4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// A WebSocket frame: its first byte (FIN and opcode) and its payload.
#[derive(Debug, PartialEq, Eq)]
pub struct WsFrame {
    pub head: u8,
    pub payload: Vec<u8>,
}

/// A final text frame.
pub const WS_TEXT: u8 = 0x81;
/// A close frame.
pub const WS_CLOSE: u8 = 0x88;

/// Reads one frame, unmasking it; `None` at the end of the stream.
pub async fn read_ws_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<WsFrame> {
    let mut two = [0u8; 2];
    io.read_exact(&mut two).await.ok()?;
    let len = match two[1] & 0x7f {
        126 => u64::from(io.read_u16().await.ok()?),
        127 => io.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut mask = [0u8; 4];
    if two[1] & 0x80 != 0 {
        io.read_exact(&mut mask).await.ok()?;
    }
    assert!(len <= 1 << 20, "a test frame of {len} bytes");
    let mut payload = vec![0u8; len as usize];
    io.read_exact(&mut payload).await.ok()?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Some(WsFrame {
        head: two[0],
        payload,
    })
}

/// A frame with `head` (FIN and opcode) and `payload`, masked with `mask` (as a
/// client must) or not (as a server does).
pub fn ws_frame(head: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![head];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = mask.unwrap_or_default();
    if bit != 0 {
        out.extend_from_slice(&mask);
    }
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Echoes every frame back unmasked until the client closes (its close frame is
/// echoed too, as the closing handshake).
async fn websocket_echo(mut io: impl AsyncRead + AsyncWrite + Unpin) {
    while let Some(frame) = read_ws_frame(&mut io).await {
        let close = frame.head & 0x0f == 0x8;
        if io
            .write_all(&ws_frame(frame.head, &frame.payload, None))
            .await
            .is_err()
            || close
        {
            break;
        }
    }
}
