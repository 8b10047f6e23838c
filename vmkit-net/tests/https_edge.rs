//! The HTTPS edge end to end with real clients: `curl` (HTTP/1.1 and HTTP/2, cookie
//! jars, redirects) and a raw TLS client (WebSocket upgrade, ambiguous lengths),
//! against `HttpsEdge` over a fake host's manager whose VMs' web servers are a
//! small HTTP server on 127.0.0.1 (the route's address is rewritten to it): the
//! harness in `common/https.rs`.
#![cfg(feature = "https")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;
use vmkit_core::{Access, ShareWith, UserId, VmName};

use common::https::*;

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
    // Port 8000 is not mapped: nothing answers at the VM's address there, and the
    // fake guest's web server is on its loopback.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", vmkit_core::testing::FAKE_LOOPBACK_HTTP_PORT))
            .is_err(),
        "something on this host listens on 127.0.0.1:8000: the test needs it free"
    );
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
    assert!(
        head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    for round in 0..3 {
        let message = format!("hello {round}");
        ws.write_all(&ws_frame(
            WS_TEXT,
            message.as_bytes(),
            Some([1, 2, 3, round]),
        ))
        .await
        .unwrap();
        let back = read_ws_frame(&mut ws).await.unwrap();
        assert_eq!(
            back,
            WsFrame {
                head: WS_TEXT,
                payload: message.into_bytes()
            }
        );
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

/// The leaf certificate a TLS connection got.
fn leaf(conn: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_certificate_serves_new_connections_while_a_download_goes_on() {
    use tokio::io::AsyncReadExt;
    let edge = Edge::start().await;
    edge.as_user(1)
        .share(
            &VmName::new("web").unwrap(),
            ShareWith::Public,
            Access::Http,
        )
        .await
        .unwrap();
    let mut download = tls(&edge, "web.vm.test").await;
    let before = leaf(&download);
    download
        .write_all(b"GET /slow HTTP/1.1\r\nHost: web.vm.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut download).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut first = [0u8; 1024];
    download.read_exact(&mut first).await.unwrap();

    // Renewed mid-download: a new certificate for every name.
    let names = vec!["vm.test".to_owned(), "*.vm.test".to_owned()];
    let renewed = edge.certs.local_ca().unwrap().issue(&names).unwrap();
    edge.certs.set_default(&renewed).unwrap();

    // A new connection gets the new certificate...
    let fresh = tls(&edge, "web.vm.test").await;
    assert_ne!(
        leaf(&fresh),
        before,
        "a new connection gets the new certificate"
    );
    // ...and the download finishes on its connection, every byte of it.
    let mut rest = Vec::new();
    download.read_to_end(&mut rest).await.unwrap();
    let body = rest.len() + first.len();
    // Chunked framing adds a few bytes per chunk; the data is 40 × 64 KiB.
    let data =
        rest.iter().filter(|b| **b == b's').count() + first.iter().filter(|b| **b == b's').count();
    assert_eq!(data, 40 * 65536, "{body} bytes read");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_arrive_as_they_are_sent() {
    use tokio::io::AsyncReadExt;
    let edge = Edge::start().await;
    edge.as_user(1)
        .share(
            &VmName::new("web").unwrap(),
            ShareWith::Public,
            Access::Http,
        )
        .await
        .unwrap();
    let mut conn = tls(&edge, "web.vm.test").await;
    conn.write_all(b"GET /sse HTTP/1.1\r\nHost: web.vm.test\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.contains("text/event-stream"), "{head}");
    // The first event comes before the upstream sends the second (a second later):
    // nothing holds it back.
    let start = std::time::Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("data: 1") {
        let n = tokio::time::timeout(std::time::Duration::from_millis(800), conn.read(&mut buf))
            .await
            .expect("the first event arrives at once")
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&seen).contains("data: 2"));
    while !String::from_utf8_lossy(&seen).contains("data: 2") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(start.elapsed() >= std::time::Duration::from_millis(900));
}
