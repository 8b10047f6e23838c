//! The HTTPS edge end to end with real clients: `curl` (HTTP/1.1 and HTTP/2, cookie
//! jars, redirects) and a raw TLS client (WebSocket upgrade, ambiguous lengths),
//! against [`HttpsEdge`] over a fake host's manager whose VMs' web servers are a
//! small HTTP server on 127.0.0.1 (the route's address is rewritten to it).
#![cfg(feature = "https")]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use vmkit_core::testing::FakeHost;
use vmkit_core::{
    Access, Action, Caller, CreateRequest, Credential, Denied, Door, Gateway, GatewayCapabilities,
    GatewayError, Handle, RouteTarget, Routed, ShareWith, StateStore, StoreGateway, User, UserId,
    VmName, VmSpec, WebSessions,
};
use vmkit_net::challenges::AcmeChallenges;
use vmkit_net::https::tls::{CertStore, LocalCa};
use vmkit_net::https::{HttpsConfig, HttpsEdge};

const DOMAIN: &str = "vm.test";

/// The store's gateway, with every VM at one loopback address of this test's own
/// (`127.X.Y.Z`), where the test's web server listens on the guest ports 80 and
/// 8080.
struct LocalGateway {
    inner: StoreGateway,
    ip: Ipv4Addr,
}

#[async_trait::async_trait]
impl Gateway for LocalGateway {
    fn capabilities(&self) -> GatewayCapabilities {
        self.inner.capabilities()
    }
    async fn identify(
        &self,
        credential: Credential<'_>,
        door: Door,
    ) -> Result<Option<Caller>, GatewayError> {
        self.inner.identify(credential, door).await
    }
    async fn route(&self, target: RouteTarget<'_>) -> Result<Option<Routed>, GatewayError> {
        let mut routed = self.inner.route(target).await?;
        if let Some(r) = &mut routed {
            r.upstream.ip = Some(self.ip);
        }
        Ok(routed)
    }
    fn policy(&self) -> Arc<dyn vmkit_core::AccessPolicy> {
        self.inner.policy()
    }
    fn authorize(&self, caller: &Caller, action: Action, routed: &Routed) -> Result<(), Denied> {
        self.inner.authorize(caller, action, routed)
    }
}

/// The "VM's" web server on `ip`, ports 80 and 8080: echoes request headers,
/// counts uploads, streams downloads, sets a cookie with `Domain`, and echoes a
/// WebSocket-style upgrade. Nothing else listens on `ip` (the guest's other ports).
async fn web_server(ip: Ipv4Addr, hits: Arc<AtomicUsize>) {
    for port in [80, 8080] {
        let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
        serve_on(listener, hits.clone());
    }
    for port in [8000, 9999] {
        assert!(
            std::net::TcpStream::connect((ip, port)).is_err(),
            "something on this host listens on every address at port {port}: the test needs \
             it free"
        );
    }
}

/// A loopback address of this test's own.
fn own_loopback() -> Ipv4Addr {
    let n = rand_suffix();
    Ipv4Addr::new(
        127,
        (n >> 8) as u8 | 1,
        (n >> 16) as u8,
        (n >> 24) as u8 | 1,
    )
}

fn serve_on(listener: tokio::net::TcpListener, hits: Arc<AtomicUsize>) {
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
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn serve(
    mut req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<TestBody>, Infallible> {
    let full = |s: String| Full::new(Bytes::from(s)).boxed();
    let path = req.uri().path().to_owned();
    let response = match path.as_str() {
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let upgraded = upgrade.await.unwrap();
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            hyper::Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
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

struct Edge {
    host: FakeHost,
    dir: TempDir,
    ca: PathBuf,
    https: u16,
    http: u16,
    hits: Arc<AtomicUsize>,
    challenges: Arc<AcmeChallenges>,
    alice: User,
    bob: User,
    stop: Option<oneshot::Sender<()>>,
}

impl Edge {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::new().await;
        let store: Arc<dyn StateStore> = host.store.clone();
        let hits = Arc::new(AtomicUsize::new(0));
        // Nothing listens on port 8000 of the VM's address: the fake guest's web
        // server there is on its loopback.
        let ip = own_loopback();
        web_server(ip, hits.clone()).await;
        let gateway = Arc::new(LocalGateway {
            inner: StoreGateway::new(store.clone(), DOMAIN),
            ip,
        });
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
        let edge = HttpsEdge::new(
            host.manager.clone(),
            gateway,
            WebSessions::new(store.clone()),
            certs,
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

    fn as_user(&self, id: u64) -> vmkit_core::Commands {
        let user = if id == 1 { &self.alice } else { &self.bob };
        self.host.manager.commands(Caller::user(user, Door::Ssh))
    }

    /// A browser (a cookie jar) signed in as user `id`.
    async fn browser(&self, id: u64) -> PathBuf {
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
    async fn curl(&self, jar: &Path, args: &[&str]) -> Output {
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

    async fn get(&self, jar: &Path, url: &str) -> Output {
        self.curl(jar, &[url]).await
    }

    fn url(&self, host: &str, path: &str) -> String {
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

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The status of the last response curl printed.
fn status(out: &Output) -> u16 {
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {}", text(out)))
}

fn header(out: &Output, name: &str) -> Option<String> {
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = s.rsplit("HTTP/").next().unwrap_or("").to_owned();
    last.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// The JSON body of a response from the echo endpoint.
fn echoed(out: &Output) -> HashMap<String, String> {
    let s = String::from_utf8_lossy(&out.stdout);
    let body = s.rsplit("\r\n\r\n").next().unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_vm_signs_in_its_owner_with_a_host_only_cookie() {
    let edge = Edge::start().await;
    let anonymous = edge.dir.path().join("anonymous");

    // Without a session: to sign in on the apex; with Authorization: 401.
    let out = edge
        .get(&anonymous, &edge.url("web.vm.test", "/a?b=c"))
        .await;
    assert_eq!(status(&out), 303, "{}", text(&out));
    let location = header(&out, "location").unwrap();
    assert_eq!(
        location,
        format!(
            "https://vm.test:{}/__vmkit/auth?host=web.vm.test&next=/a%3Fb%3Dc",
            edge.https
        )
    );
    assert!(header(&out, "strict-transport-security").is_some());
    let out = edge
        .curl(
            &anonymous,
            &[
                "-H",
                "Authorization: Bearer x",
                &edge.url("web.vm.test", "/"),
            ],
        )
        .await;
    assert_eq!(status(&out), 401);
    // The apex without a session says how to sign in.
    let out = edge.get(&anonymous, &location).await;
    assert_eq!(status(&out), 200);
    assert!(
        text(&out).contains("ssh -p 2222 vm.test browser"),
        "{}",
        text(&out)
    );
    assert_eq!(
        edge.hits.load(Ordering::SeqCst),
        0,
        "nothing reached the VM"
    );

    // Signed in, the whole dance: apex → ticket → the VM's host.
    let jar = edge.browser(1).await;
    let out = edge
        .curl(
            &jar,
            &[
                "-L",
                "-H",
                "X-Vmkit-User-Id: 99",
                "-H",
                "X-Vmkit-Email: root@evil.test",
                "-H",
                "X-Forwarded-For: 6.6.6.6",
                "-H",
                "Cookie: app=kept",
                &edge.url("web.vm.test", "/headers"),
            ],
        )
        .await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    let seen = echoed(&out);
    assert_eq!(seen["x-vmkit-user-id"], "1");
    assert_eq!(seen["x-vmkit-user"], "alice");
    assert!(
        !seen.contains_key("x-vmkit-email"),
        "alice has no email: {seen:?}"
    );
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(
        seen["x-forwarded-host"],
        format!("web.vm.test:{}", edge.https)
    );
    assert!(seen["x-vmkit-assertion"].split('.').count() == 3);
    assert!(
        !seen.get("cookie").is_some_and(|c| c.contains("vmkit")),
        "{seen:?}"
    );

    // The cookies are host-only (no subdomains), Secure and HttpOnly.
    let jar_text = std::fs::read_to_string(&jar).unwrap();
    let cookies: Vec<&str> = jar_text
        .lines()
        .filter(|l| l.contains("__Host-vmkit"))
        .collect();
    assert_eq!(cookies.len(), 2, "{jar_text}");
    for line in &cookies {
        let f: Vec<&str> = line.split('\t').collect();
        assert!(f[0].starts_with("#HttpOnly_"), "{line}");
        let domain = f[0].trim_start_matches("#HttpOnly_");
        assert!(domain == "vm.test" || domain == "web.vm.test", "{line}");
        assert_eq!(f[1], "FALSE", "host-only: {line}");
        assert_eq!(f[3], "TRUE", "secure: {line}");
    }
    // Another port is another host: a cookie of its own, through the same dance.
    let out = edge
        .curl(&jar, &["-L", &edge.url("web--8080.vm.test", "/headers")])
        .await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    assert_eq!(echoed(&out)["x-vmkit-user"], "alice");

    // Bob, signed in, may not: the same answer as a VM that does not exist.
    let bobs = edge.browser(2).await;
    let out = edge
        .curl(&bobs, &["-L", &edge.url("web.vm.test", "/")])
        .await;
    assert_eq!(status(&out), 404, "{}", text(&out));
    let out = edge
        .curl(&bobs, &["-L", &edge.url("nope.vm.test", "/")])
        .await;
    assert_eq!(status(&out), 404, "{}", text(&out));

    // A used sign-in link signs in nobody.
    let link = edge.as_user(1).sign_in_link().await.unwrap();
    let login = format!("https://vm.test:{}/__vmkit/login?token={link}", edge.https);
    let fresh = edge.dir.path().join("fresh");
    assert_eq!(status(&edge.get(&fresh, &login).await), 303);
    let other = edge.dir.path().join("other");
    assert_eq!(status(&edge.get(&other, &login).await), 400);

    // Signing out of the apex ends the VM host's session too.
    let out = edge
        .curl(
            &jar,
            &[
                "-X",
                "POST",
                &format!("https://vm.test:{}/__vmkit/logout", edge.https),
            ],
        )
        .await;
    assert_eq!(status(&out), 303);
    let out = edge.get(&jar, &edge.url("web.vm.test", "/headers")).await;
    assert_eq!(status(&out), 303, "signed out: {}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn shares_public_per_port_and_by_link() {
    let edge = Edge::start().await;
    let web = VmName::new("web").unwrap();
    let anonymous = edge.dir.path().join("anonymous");
    edge.as_user(1)
        .share_port(&web, ShareWith::Public, Access::Http, Some(80))
        .await
        .unwrap();
    let out = edge.get(&anonymous, &edge.url("web.vm.test", "/h")).await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    let seen = echoed(&out);
    assert!(
        !seen.keys().any(|k| k.starts_with("x-vmkit")),
        "no identity for anonymous visitors: {seen:?}"
    );
    // Port 8080 stays private.
    let out = edge
        .get(&anonymous, &edge.url("web--8080.vm.test", "/h"))
        .await;
    assert_eq!(status(&out), 303);

    // A link to port 8080: kept in a cookie, the token leaves the URL.
    let link = edge
        .as_user(1)
        .share_port(&web, ShareWith::Link, Access::Http, Some(8080))
        .await
        .unwrap()
        .secret
        .unwrap();
    let visitor = edge.dir.path().join("visitor");
    let out = edge
        .get(
            &visitor,
            &edge.url("web--8080.vm.test", &format!("/p?x=1&share={link}")),
        )
        .await;
    assert_eq!(status(&out), 303, "{}", text(&out));
    // Through the apex (not signed in there) and straight back, without the token.
    let visitor = edge.dir.path().join("visitor2");
    let out = edge
        .curl(
            &visitor,
            &[
                "-L",
                &edge.url("web--8080.vm.test", &format!("/p?x=1&share={link}")),
            ],
        )
        .await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    let last = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        last.contains(&format!(
            "location: https://web--8080.vm.test:{}/p?x=1\r\n",
            edge.https
        )),
        "{last}"
    );
    let out = edge
        .get(&visitor, &edge.url("web--8080.vm.test", "/p"))
        .await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    // The link is for port 8080 only.
    let other = edge
        .get(&visitor, &edge.url("web--9999.vm.test", "/"))
        .await;
    assert_eq!(status(&other), 303);

    // Used while signed in, it becomes a lasting share with that user.
    let bobs = edge.browser(2).await;
    let out = edge
        .curl(
            &bobs,
            &[
                "-L",
                &edge.url("web--8080.vm.test", &format!("/?share={link}")),
            ],
        )
        .await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    let shares = edge.as_user(1).shares(&web).await.unwrap();
    assert!(
        shares
            .iter()
            .any(|s| s.with == vmkit_core::ShareWithView::User(UserId(2)) && s.port == Some(8080)),
        "{shares:?}"
    );
    let fresh = edge.browser(2).await;
    let out = edge
        .curl(&fresh, &["-L", &edge.url("web--8080.vm.test", "/h")])
        .await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    let seen = echoed(&out);
    assert_eq!(seen["x-vmkit-user"], "bob");
    assert_eq!(seen["x-vmkit-email"], "bob@example.test");
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_listening_helps_the_owner_only() {
    let edge = Edge::start().await;
    let web = VmName::new("web").unwrap();
    let jar = edge.browser(1).await;
    let out = edge
        .curl(&jar, &["-L", &edge.url("web--9999.vm.test", "/")])
        .await;
    assert_eq!(status(&out), 502, "{}", text(&out));
    let page = text(&out);
    assert!(
        page.contains("nothing answers on port <b>9999</b>"),
        "{page}"
    );
    assert!(page.contains("ssh -p 2222 web@vm.test"), "{page}");
    edge.as_user(1)
        .share_port(&web, ShareWith::Public, Access::Http, Some(9999))
        .await
        .unwrap();
    let anonymous = edge.dir.path().join("anonymous");
    let out = edge
        .get(&anonymous, &edge.url("web--9999.vm.test", "/"))
        .await;
    assert_eq!(status(&out), 502);
    assert!(!text(&out).contains("nothing answers"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_on_the_guests_loopback_is_reached_through_the_agent() {
    let edge = Edge::start().await;
    let jar = edge.browser(1).await;
    let out = edge
        .curl(&jar, &["-L", &edge.url("web--8000.vm.test", "/")])
        .await;
    assert_eq!(status(&out), 200, "{}", text(&out));
    assert!(
        text(&out).ends_with("loopback app on port 8000"),
        "{}",
        text(&out)
    );
    // Nothing on either: the owner is told.
    let out = edge
        .curl(&jar, &["-L", &edge.url("web--9999.vm.test", "/")])
        .await;
    assert_eq!(status(&out), 502, "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_redirects_and_answers_acme() {
    let edge = Edge::start().await;
    let jar = edge.dir.path().join("jar");
    let out = edge
        .get(&jar, &format!("http://web.vm.test:{}/x?y=1", edge.http))
        .await;
    assert_eq!(status(&out), 308);
    assert_eq!(
        header(&out, "location").unwrap(),
        format!("https://web.vm.test:{}/x?y=1", edge.https)
    );
    edge.challenges.set_http01("tok", "tok.thumbprint");
    let out = edge
        .get(
            &jar,
            &format!(
                "http://nope.vm.test:{}/.well-known/acme-challenge/tok",
                edge.http
            ),
        )
        .await;
    assert_eq!(status(&out), 200);
    assert!(text(&out).ends_with("tok.thumbprint"));
    // The JWKS is public, on the apex.
    let out = edge
        .get(&jar, &edge.url(DOMAIN, "/.well-known/jwks.json"))
        .await;
    assert_eq!(status(&out), 200);
    assert!(text(&out).contains("\"kty\":\"EC\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_cookies_stay_on_their_host_and_http2_works() {
    let edge = Edge::start().await;
    let web = VmName::new("web").unwrap();
    edge.as_user(1)
        .share(&web, ShareWith::Public, Access::Http)
        .await
        .unwrap();
    let jar = edge.dir.path().join("jar");
    // 64 MiB up and down, streamed.
    let upload = edge.dir.path().join("upload");
    std::fs::write(&upload, vec![7u8; 64 << 20]).unwrap();
    for version in ["--http1.1", "--http2"] {
        let out = edge
            .curl(
                &jar,
                &[
                    version,
                    "--data-binary",
                    &format!("@{}", upload.display()),
                    &edge.url("web.vm.test", "/count"),
                ],
            )
            .await;
        assert_eq!(status(&out), 200, "{}", text(&out));
        assert!(
            text(&out).ends_with(&(64usize << 20).to_string()),
            "{}",
            text(&out)
        );
        let out = edge
            .curl(
                &jar,
                &[
                    version,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_version} %{size_download}",
                    &edge.url("web.vm.test", &format!("/big?n={}", 64 << 20)),
                ],
            )
            .await;
        let expected = if version == "--http2" { "2" } else { "1.1" };
        assert!(
            text(&out).ends_with(&format!("{expected} {}", 64 << 20)),
            "{}",
            text(&out)
        );
    }
    let out = edge.get(&jar, &edge.url("web.vm.test", "/cookie")).await;
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let set: Vec<&str> = all
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie"))
        .collect();
    assert_eq!(set, ["set-cookie: app=1; Path=/"], "{all}");
}

/// A TLS connection to the edge for `host`, trusting only the local CA.
async fn tls(edge: &Edge, host: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
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

async fn read_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
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

#[tokio::test(flavor = "multi_thread")]
async fn websockets_upgrade_through_and_ambiguous_lengths_never_reach_the_vm() {
    let edge = Edge::start().await;
    let web = VmName::new("web").unwrap();
    edge.as_user(1)
        .share(&web, ShareWith::Public, Access::Http)
        .await
        .unwrap();
    let mut ws = tls(&edge, "web.vm.test").await;
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web.vm.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for round in 0..3 {
        let message = format!("hello {round}");
        ws.write_all(message.as_bytes()).await.unwrap();
        let mut back = vec![0u8; message.len()];
        ws.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message.as_bytes());
    }
    drop(ws);

    let before = edge.hits.load(Ordering::SeqCst);
    for bad in [
        &b"POST /count HTTP/1.1\r\nHost: web.vm.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /count HTTP/1.1\r\nHost: web.vm.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        b"POST /count HTTP/1.1\r\nHost: web.vm.test\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost: web.vm.test\r\nX-Long: a\r\n folded\r\n\r\n",
    ] {
        let mut c = tls(&edge, "web.vm.test").await;
        c.write_all(bad).await.unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }
    assert_eq!(
        edge.hits.load(Ordering::SeqCst),
        before,
        "nothing reached the VM"
    );
}
