//! The stand-in itself, spoken to over raw HTTP as cloud-hypervisor would be: its
//! state table, its spec checks and its hybrid vsock. If these rules were wrong, the
//! backend tests would prove nothing.

#[path = "support/ch_standin/mod.rs"]
mod ch_standin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ch_standin::{Behaviour, TestHost};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[test]
#[ignore = "the cloud-hypervisor stand-in's entry point; the tests run it"]
fn ch_standin_entry() {
    ch_standin::entry();
}

/// A stand-in started directly (as our child), and the machine it is told about.
struct Vmm {
    child: Child,
    api: PathBuf,
    config: Value,
    run_dir: PathBuf,
    _host: TestHost,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn vmm(behaviour: Behaviour) -> Vmm {
    let host = TestHost::new(behaviour);
    let machine = host.machine("raw");
    std::fs::create_dir_all(&machine.run_dir).expect("run dir");
    let config: Value = serde_json::from_str(
        &host
            .backend()
            .vm_create_json(&machine)
            .expect("a vm.create body"),
    )
    .expect("JSON");
    let api = machine.run_dir.join("api.sock");
    let child = ch_standin::spawn(
        Command::new(&host.binary)
            .arg("--api-socket")
            .arg(format!("path={}", api.display())),
    )
    .expect("start the stand-in");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&api).await.is_err() {
        assert!(Instant::now() < deadline, "the stand-in did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Vmm {
        child,
        api,
        config,
        run_dir: machine.run_dir,
        _host: host,
    }
}

/// One HTTP/1.1 request on its own connection; returns status and body.
async fn call(api: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let stream = UnixStream::connect(api).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://localhost/api/v1{path}"))
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
        .expect("request");
    let response = sender.send_request(request).await.expect("send");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn put(vmm: &Vmm, path: &str, body: Option<Value>) -> (u16, String) {
    let text = body.map(|b| b.to_string());
    call(&vmm.api, "PUT", path, text.as_deref()).await
}

fn chain(body: &str) -> Vec<String> {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("an error chain: {body:?}"))
}

#[tokio::test]
async fn ping_answers_with_the_spec_s_shape_and_our_pid() {
    let vmm = vmm(Behaviour::default()).await;
    let (status, body) = call(&vmm.api, "GET", "/vmm.ping", None).await;
    assert_eq!(status, 200);
    let ping: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ping["pid"], json!(vmm.child.id()));
    assert!(ping["version"].is_string());
}

#[tokio::test]
async fn the_http_layer_answers_as_cloud_hypervisor_does() {
    let vmm = vmm(Behaviour::default()).await;
    assert_eq!(
        call(&vmm.api, "GET", "/vm.nothing", None).await,
        (404, r#"["Not Found"]"#.to_owned())
    );
    assert_eq!(
        call(&vmm.api, "GET", "/vm.create", None).await,
        (400, r#"["Bad Request"]"#.to_owned()),
        "a method the spec does not list"
    );
    assert_eq!(
        put(&vmm, "/vm.create", None).await,
        (400, r#"["Bad Request"]"#.to_owned()),
        "a missing required body"
    );
    let (status, body) = call(&vmm.api, "PUT", "/vm.create", Some("{not json")).await;
    assert_eq!(
        (status, chain(&body)[0].as_str()),
        (400, "Failed to deserialize JSON")
    );
    let (status, body) = put(&vmm, "/vm.create", Some(json!({"payload": {"kernel": 7}}))).await;
    assert_eq!(status, 400);
    assert_eq!(
        chain(&body),
        [
            "Failed to deserialize JSON",
            "/payload/kernel: expected a string, got 7"
        ]
    );
}

#[tokio::test]
async fn the_state_table_is_cloud_hypervisor_s() {
    let vmm = vmm(Behaviour::default()).await;
    let not_created = put(&vmm, "/vm.boot", None).await;
    assert_eq!(not_created.0, 404);
    assert_eq!(
        chain(&not_created.1),
        [
            "Error from API",
            "The VM could not boot",
            "VM config is missing"
        ]
    );
    assert_eq!(call(&vmm.api, "GET", "/vm.info", None).await.0, 404);
    let (status, body) = put(&vmm, "/vm.pause", None).await;
    assert_eq!(
        (status, chain(&body).last().cloned()),
        (500, Some("VM is not running".into()))
    );

    assert_eq!(
        put(&vmm, "/vm.create", Some(vmm.config.clone())).await.0,
        204
    );
    let (status, body) = put(&vmm, "/vm.create", Some(vmm.config.clone())).await;
    assert_eq!(
        (status, chain(&body).last().cloned()),
        (500, Some("VM is already created".into()))
    );
    let (_, info) = call(&vmm.api, "GET", "/vm.info", None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&info).expect("info")["state"],
        "Created"
    );

    assert_eq!(put(&vmm, "/vm.boot", None).await.0, 204);
    let (status, body) = put(&vmm, "/vm.boot", None).await;
    assert_eq!(
        (status, chain(&body).last().cloned()),
        (500, Some("VM is already created".into()))
    );
    let (status, body) = put(&vmm, "/vm.resume", None).await;
    assert_eq!(status, 500);
    assert!(
        body.contains("InvalidStateTransition(Running, Running)"),
        "{body}"
    );
    let snapshot_dir = vmm.run_dir.join("snap");
    std::fs::create_dir(&snapshot_dir).expect("dir");
    let url = json!({"destination_url": format!("file://{}", snapshot_dir.display())});
    let (status, body) = put(&vmm, "/vm.snapshot", Some(url.clone())).await;
    assert_eq!(
        (status, chain(&body).last().cloned()),
        (500, Some("Trying to snapshot while VM is running".into()))
    );
    assert_eq!(put(&vmm, "/vm.pause", None).await.0, 204);
    assert_eq!(put(&vmm, "/vm.snapshot", Some(url)).await.0, 204);

    let restore = json!({"source_url": format!("file://{}", snapshot_dir.display())});
    let (status, body) = put(&vmm, "/vm.restore", Some(restore)).await;
    assert_eq!(
        (status, chain(&body)),
        (
            500,
            vec![
                "Error from API".to_owned(),
                "The VM could not be restored".to_owned(),
                "VM is already created".to_owned(),
            ]
        ),
        "restore is refused once vm.create has been called"
    );

    assert_eq!(put(&vmm, "/vm.shutdown", None).await.0, 204);
    let (_, info) = call(&vmm.api, "GET", "/vm.info", None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&info).expect("info")["state"],
        "Created",
        "after vm.shutdown the config stays and the VM can boot again"
    );
    assert_eq!(put(&vmm, "/vm.shutdown", None).await.0, 500);
}

#[tokio::test]
async fn restore_works_on_a_fresh_vmm_only() {
    let first = vmm(Behaviour::default()).await;
    assert_eq!(
        put(&first, "/vm.create", Some(first.config.clone()))
            .await
            .0,
        204
    );
    assert_eq!(put(&first, "/vm.boot", None).await.0, 204);
    assert_eq!(put(&first, "/vm.pause", None).await.0, 204);
    let dir = first.run_dir.join("snap");
    std::fs::create_dir(&dir).expect("dir");
    let url = format!("file://{}", dir.display());
    assert_eq!(
        put(
            &first,
            "/vm.snapshot",
            Some(json!({"destination_url": url}))
        )
        .await
        .0,
        204
    );
    assert_eq!(put(&first, "/vm.shutdown", None).await.0, 204);

    let second = vmm(Behaviour::default()).await;
    let (status, body) = put(&second, "/vm.restore", Some(json!({"source_url": url}))).await;
    assert_eq!((status, body.as_str()), (204, ""));
    let (_, info) = call(&second.api, "GET", "/vm.info", None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&info).expect("info")["state"],
        "Paused"
    );
    let (status, _) = put(&second, "/vm.restore", Some(json!({"source_url": url}))).await;
    assert_eq!(status, 500, "only once");
}

#[tokio::test]
async fn vmm_shutdown_answers_200_and_ends_the_process() {
    let mut vmm = vmm(Behaviour::default()).await;
    assert_eq!(put(&vmm, "/vmm.shutdown", None).await, (200, String::new()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = vmm.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the stand-in did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(!vmm.api.exists(), "a clean exit removes the API socket");
}

#[tokio::test]
async fn an_existing_api_socket_stops_it_like_an_older_cloud_hypervisor() {
    let host = TestHost::new(Behaviour::default());
    let api = host.dir.path().join("taken.sock");
    drop(std::os::unix::net::UnixListener::bind(&api).expect("bind"));
    let status = ch_standin::spawn(
        Command::new(&host.binary)
            .arg("--api-socket")
            .arg(format!("path={}", api.display())),
    )
    .and_then(|mut child| child.wait())
    .expect("run");
    assert_eq!(status.code(), Some(1));
}

#[tokio::test]
async fn hybrid_vsock_answers_ok_for_the_agent_port_only() {
    let vmm = vmm(Behaviour {
        agent_delay_ms: 0,
        ..Behaviour::default()
    })
    .await;
    assert_eq!(
        put(&vmm, "/vm.create", Some(vmm.config.clone())).await.0,
        204
    );
    assert_eq!(put(&vmm, "/vm.boot", None).await.0, 204);
    let socket = vmm.run_dir.join("vsock.sock");

    let mut other = UnixStream::connect(&socket).await.expect("connect");
    other.write_all(b"CONNECT 22\n").await.expect("write");
    let mut buf = Vec::new();
    other.read_to_end(&mut buf).await.expect("read");
    assert!(
        buf.is_empty(),
        "nothing listens on port 22: closed without an answer"
    );

    let mut agent = UnixStream::connect(&socket).await.expect("connect");
    agent.write_all(b"CONNECT 1024\n").await.expect("write");
    let mut answer = [0u8; 14];
    agent.read_exact(&mut answer).await.expect("read");
    assert_eq!(&answer, b"OK 1073741824\n");
    let client = vmkit_core::guest::Client::new(agent, vmkit_core::guest::ClientConfig::default());
    assert_eq!(
        client.hello().await.expect("hello").agent_version,
        "0.0.0-standin"
    );
}

#[test]
fn the_wrapper_answers_version_like_cloud_hypervisor() {
    let host = TestHost::new(Behaviour::default());
    let out = ch_standin::spawn(
        Command::new(&host.binary)
            .arg("--version")
            .stdout(std::process::Stdio::piped()),
    )
    .and_then(|child| child.wait_with_output())
    .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cloud-hypervisor v"));
}
