//! The HTTPS edge in a real browser: headless Debian Chromium, driven over W3C
//! WebDriver by `chromedriver` (the few JSON calls made with `curl`), trusting the
//! local CA through an NSS database in a temporary HOME (no certificate errors
//! ignored), every `*.vm.test` host resolved to 127.0.0.1. The whole sign-in dance
//! ends on the VM's page with the identity the VM saw; the session cookies are read
//! on each host (host-only, Secure, HttpOnly, one per port); a WebSocket echo runs
//! from the page's JavaScript through the edge to a real WebSocket upstream.
//!
//! Needs `chromium`, `chromedriver` and `certutil`: `scripts/install-deps.sh`
//! installs them. Without them the test fails, saying so.
#![cfg(feature = "https")]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use common::https::*;

/// How long one WebDriver call may take (a navigation through the sign-in
/// redirects included).
const CALL_TIMEOUT_SECS: u64 = 60;
/// How long chromedriver has to answer `/status`.
const DRIVER_START: Duration = Duration::from_secs(30);

/// Fails, saying what to install, when `tool` does not run.
fn require(tool: &str, args: &[&str]) {
    let ran = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        ran.is_ok(),
        "`{tool}` is missing ({}): run scripts/install-deps.sh, which installs chromium, \
         chromium-driver and libnss3-tools",
        ran.unwrap_err()
    );
}

/// A temporary HOME whose NSS database trusts the CA at `ca` for servers.
fn home_trusting(ca: &Path) -> TempDir {
    let home = tempfile::tempdir().unwrap();
    let db = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db = format!("sql:{}", db.display());
    let run = |args: &[&str]| {
        let out = Command::new("certutil").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["-d", &db, "-N", "--empty-password"]);
    run(&[
        "-d",
        &db,
        "-A",
        "-t",
        "C,,",
        "-n",
        "vmkit test CA",
        "-i",
        ca.to_str().unwrap(),
    ]);
    home
}

/// chromedriver and the Chromium session it drives; `Drop` ends the session and
/// kills both, whatever the test's outcome.
struct Browser {
    driver: Child,
    port: u16,
    session: Option<String>,
    home: TempDir,
}

impl Browser {
    /// Starts chromedriver with HOME trusting `ca`, and a headless Chromium session.
    async fn start(ca: &Path) -> Self {
        require("chromium", &["--version"]);
        require("chromedriver", &["--version"]);
        require("certutil", &["-H"]);
        let home = home_trusting(ca);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                home.path().join("chromedriver.log").display()
            ))
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut browser = Self {
            driver,
            port,
            session: None,
            home,
        };
        let started = Instant::now();
        loop {
            let status = browser.call("GET", "/status", None).await;
            if status.ok().is_some_and(|v| v["ready"] == true) {
                break;
            }
            assert!(
                started.elapsed() < DRIVER_START,
                "chromedriver did not answer in {DRIVER_START:?}: {}",
                browser.driver_log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let profile = browser.home.path().join("profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "timeouts": {"script": 20_000, "pageLoad": 30_000, "implicit": 0},
            "goog:chromeOptions": {"args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                format!("--user-data-dir={}", profile.display()),
                "--host-resolver-rules=MAP vm.test 127.0.0.1, MAP *.vm.test 127.0.0.1",
            ]},
        }}});
        let session = browser
            .call("POST", "/session", Some(capabilities))
            .await
            .unwrap_or_else(|e| panic!("starting Chromium: {e}\n{}", browser.driver_log()));
        browser.session = Some(session["sessionId"].as_str().unwrap().to_owned());
        browser
    }

    fn driver_log(&self) -> String {
        let log =
            std::fs::read_to_string(self.home.path().join("chromedriver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// One WebDriver call; its `value`, or the error WebDriver answered.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            &CALL_TIMEOUT_SECS.to_string(),
            "-X",
            method,
        ])
        .arg(format!("http://127.0.0.1:{}{path}", self.port))
        .kill_on_drop(true);
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d"])
                .arg(body.to_string());
        }
        let out = cmd.output().await.map_err(|e| format!("curl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{method} {path}: curl: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let answer: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "{method} {path}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let value = answer["value"].clone();
        match value.get("error") {
            Some(error) => Err(format!("{method} {path}: {error}: {}", value["message"])),
            None => Ok(value),
        }
    }

    /// A call in this session, which must succeed.
    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let session = self.session.as_deref().unwrap();
        self.call(method, &format!("/session/{session}{path}"), body)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.driver_log()))
    }

    /// Navigates to `url` (following redirects); the URL it ends on.
    async fn go(&self, url: &str) -> String {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .await;
        let at = self.session_call("GET", "/url", None).await;
        at.as_str().unwrap().to_owned()
    }

    /// The text of the page's body.
    async fn page_text(&self) -> String {
        self.run("return document.body.innerText;").await
    }

    /// Runs `script` in the page; what it returns, as a string.
    async fn run(&self, script: &str) -> String {
        let v = self
            .session_call(
                "POST",
                "/execute/sync",
                Some(json!({ "script": script, "args": [] })),
            )
            .await;
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    }

    /// Runs asynchronous `script`, which calls its last argument with a result.
    async fn run_async(&self, script: &str, args: Value) -> Value {
        self.session_call(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// The cookies the current page's host gets, by name.
    async fn cookies(&self) -> HashMap<String, Value> {
        let all = self.session_call("GET", "/cookie", None).await;
        all.as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_owned(), c.clone()))
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = Command::new("curl")
                .args(["-sS", "--max-time", "10", "-X", "DELETE"])
                .arg(format!("http://127.0.0.1:{}/session/{session}", self.port))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // A Chromium that outlived its driver: the processes of this test's profile.
        let profile = self.home.path().to_string_lossy().into_owned();
        for pid in processes_mentioning(&profile) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// The processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(needle)
            .then_some(pid)
    })
    .collect()
}

/// The `__Host-vmkit` cookie among `cookies`, checked to be host-only for `host`,
/// Secure, HttpOnly and SameSite=Lax; its value.
fn session_cookie(cookies: &HashMap<String, Value>, host: &str) -> String {
    let cookie = cookies
        .get("__Host-vmkit")
        .unwrap_or_else(|| panic!("no session cookie on {host}: {cookies:?}"));
    assert_eq!(cookie["domain"], host, "host-only: {cookie}");
    assert_eq!(cookie["path"], "/", "{cookie}");
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Lax", "{cookie}");
    cookie["value"].as_str().unwrap().to_owned()
}

/// The page's WebSocket echo: sends three messages to `url`, one at a time, and
/// returns what came back (or the error).
const WS_ECHO: &str = r#"
const [url, done] = [arguments[0], arguments[arguments.length - 1]];
const got = [];
const ws = new WebSocket(url);
ws.onopen = () => ws.send("hello 0");
ws.onmessage = (e) => {
    got.push(e.data);
    if (got.length < 3) { ws.send("hello " + got.length); } else { ws.close(); done(got); }
};
ws.onerror = () => done("websocket error after " + JSON.stringify(got));
"#;

#[tokio::test(flavor = "multi_thread")]
async fn chromium_signs_in_keeps_cookies_per_host_and_echoes_over_a_websocket() {
    let edge = Edge::start().await;
    let browser = Browser::start(&edge.ca).await;
    let apex = format!("vm.test:{}", edge.https);

    // The one-time link signs the browser in on the apex, with a host-only cookie.
    let link = edge.as_user(1).sign_in_link().await.unwrap();
    let at = browser
        .go(&format!("https://{apex}/__vmkit/login?token={link}"))
        .await;
    assert!(at.starts_with(&format!("https://{apex}/")), "{at}");
    let apex_session = session_cookie(&browser.cookies().await, "vm.test");

    // The private VM: through the apex and back, ending on the VM's page, which
    // shows the identity the VM was sent.
    let page = edge.url("web.vm.test", "/page?x=1");
    assert_eq!(browser.go(&page).await, page);
    let text = browser.page_text().await;
    let seen: HashMap<String, String> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: not the VM's page: {text}"));
    assert_eq!(seen["x-vmkit-user"], "alice", "{seen:?}");
    assert_eq!(seen["x-vmkit-user-id"], "1", "{seen:?}");
    assert_eq!(seen["x-vmkit-assertion"].split('.').count(), 3, "{seen:?}");
    assert_eq!(
        seen["x-forwarded-host"],
        format!("web.vm.test:{}", edge.https)
    );
    assert!(
        !seen.get("cookie").is_some_and(|c| c.contains("vmkit")),
        "the edge's cookie reached the VM: {seen:?}"
    );
    let web_cookies = browser.cookies().await;
    assert_eq!(web_cookies.len(), 1, "{web_cookies:?}");
    let web_session = session_cookie(&web_cookies, "web.vm.test");
    assert_ne!(
        web_session, apex_session,
        "the apex's cookie is not the VM's"
    );

    // Page JavaScript sees the VM's own cookie (its Domain= removed), never the
    // edge's (HttpOnly), and the VM cannot overwrite the edge's.
    let cookie_page = edge.url("web.vm.test", "/cookie");
    assert_eq!(browser.go(&cookie_page).await, cookie_page);
    assert_eq!(browser.run("return document.cookie;").await, "app=1");
    let web_cookies = browser.cookies().await;
    assert_eq!(
        web_cookies["app"]["domain"], "web.vm.test",
        "{web_cookies:?}"
    );
    assert_eq!(session_cookie(&web_cookies, "web.vm.test"), web_session);

    // A WebSocket from the page, through the edge, to the VM's echo server.
    let ws = format!("wss://web.vm.test:{}/ws", edge.https);
    let echoed = browser.run_async(WS_ECHO, json!([ws])).await;
    assert_eq!(echoed, json!(["hello 0", "hello 1", "hello 2"]));

    // Another port is another host: the VM host's cookie is not sent there; it
    // gets its own through the same dance.
    let other = edge.url("web--8080.vm.test", "/other");
    assert_eq!(browser.go(&other).await, other);
    let seen: HashMap<String, String> = serde_json::from_str(&browser.page_text().await).unwrap();
    assert_eq!(seen["x-vmkit-user"], "alice", "{seen:?}");
    let port_cookies = browser.cookies().await;
    assert_eq!(port_cookies.len(), 1, "{port_cookies:?}");
    let port_session = session_cookie(&port_cookies, "web--8080.vm.test");
    assert_ne!(port_session, web_session);
    assert_ne!(port_session, apex_session);

    // The apex still has its own cookie only.
    browser.go(&format!("https://{apex}/")).await;
    let apex_cookies = browser.cookies().await;
    assert_eq!(apex_cookies.len(), 1, "{apex_cookies:?}");
    assert_eq!(session_cookie(&apex_cookies, "vm.test"), apex_session);
}
