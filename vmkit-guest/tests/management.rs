//! The management calls (network, host name, keys, files, metrics, logs, harden,
//! upgrade) through a real `Client` and a real `serve` loop, with an in-memory handler.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FakeHandler, MinimalHandler, connected, hex_sha256, server_with_raw_host};
use serde_json::json;
use vmkit_guest::{
    ClientConfig, ClientError, HardenRequest, LogsRequest, MAX_LOG_LINES, NetworkConfig,
    ServerConfig, WriteFileRequest,
};

fn client_of(handler: FakeHandler) -> vmkit_guest::Client {
    connected(handler, ClientConfig::default(), ServerConfig::default()).0
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

#[tokio::test]
async fn network_hostname_and_keys_reach_the_handler() {
    let handler = FakeHandler::default();
    let calls = handler.calls.clone();
    let client = client_of(handler);
    let config = NetworkConfig::new(
        "52:54:00:00:00:01",
        [10, 0, 0, 2].into(),
        24,
        [10, 0, 0, 1].into(),
    )
    .dns([[10, 0, 0, 1].into()]);

    client.configure_network(&config).await.unwrap();
    client.set_hostname("box").await.unwrap();
    client
        .install_ssh_keys(Some("vmkit"), ["ssh-ed25519 AAAA a", "ssh-ed25519 BBBB b"])
        .await
        .unwrap();

    assert_eq!(
        *calls.lock().unwrap(),
        [
            "network 52:54:00:00:00:01 10.0.0.2/24",
            "hostname box",
            "keys Some(\"vmkit\") 2"
        ]
    );
}

#[tokio::test]
async fn a_file_larger_than_a_frame_is_written_and_read_back() {
    let handler = FakeHandler::default();
    let files = handler.files.clone();
    let (client, _server) = connected(
        handler,
        ClientConfig::default().max_frame(64 << 10),
        ServerConfig::default().max_frame(64 << 10),
    );
    let data = pattern(1 << 20);

    let written = client
        .write_file(WriteFileRequest::new("/tmp/big"), &data)
        .await
        .unwrap();
    let read = client.read_file("/tmp/big", 1 << 20).await.unwrap();

    assert_eq!(written, 1 << 20);
    assert_eq!(files.lock().unwrap()["/tmp/big"], data);
    assert_eq!(read, data);
}

#[tokio::test]
async fn an_empty_file_is_written_without_a_body() {
    let handler = FakeHandler::default();
    let files = handler.files.clone();
    let client = client_of(handler);

    let written = client
        .write_file(WriteFileRequest::new("/tmp/empty"), b"")
        .await
        .unwrap();

    assert_eq!(written, 0);
    assert!(files.lock().unwrap()["/tmp/empty"].is_empty());
}

#[tokio::test]
async fn a_write_refused_early_stops_sending_and_leaves_the_client_usable() {
    let client = client_of(FakeHandler::default());
    let data = pattern(8 << 20);

    let err = client
        .write_file(WriteFileRequest::new("/refuse/this"), &data)
        .await
        .unwrap_err();
    let info = client.hello().await.unwrap();

    assert!(matches!(err, ClientError::Remote(m) if m.contains("refused")));
    assert_eq!(info.agent_version, "9.9.9");
}

#[tokio::test]
async fn reading_a_file_over_the_limit_is_refused_by_the_agent() {
    let handler = FakeHandler::default();
    handler
        .files
        .lock()
        .unwrap()
        .insert("/f".to_owned(), vec![1; 100]);
    let client = client_of(handler);

    let err = client.read_file("/f", 99).await.unwrap_err();

    assert!(matches!(err, ClientError::Remote(m) if m.contains("over the limit")));
}

#[tokio::test]
async fn metrics_come_back_checked() {
    let client = client_of(FakeHandler::default());

    let metrics = client.metrics(Duration::from_millis(250)).await.unwrap();

    assert_eq!(metrics.cpu_pct, 12.5);
    assert_eq!(metrics.uptime_secs, 250, "the interval reached the handler");
    assert_eq!(metrics.container_health, None);
}

#[tokio::test]
async fn metrics_interval_is_clamped_to_ten_seconds() {
    let (mut host, _server) = server_with_raw_host(FakeHandler::default(), ServerConfig::default());

    host.write_json(&json!({"id": 1, "request": {"type": "metrics", "interval_ms": 600_000}}))
        .await;
    let reply = host.read_json().await;

    // The fake reports the interval it was given as its uptime.
    assert_eq!(reply["reply"]["uptime_secs"], 10_000);
}

#[tokio::test]
async fn logs_return_the_last_lines_asked_for() {
    let client = client_of(FakeHandler::default());

    let lines = client
        .logs(LogsRequest::unit("ssh.service").lines(3))
        .await
        .unwrap();
    let default = client.logs(LogsRequest::unit("x")).await.unwrap();
    let most = client
        .logs(LogsRequest::unit("x").lines(u32::MAX))
        .await
        .unwrap();

    assert_eq!(lines, ["ssh.service 1", "ssh.service 2", "ssh.service 3"]);
    assert_eq!(default.len(), 100);
    assert_eq!(most.len(), MAX_LOG_LINES as usize);
}

#[tokio::test]
async fn a_followed_log_streams_until_dropped_and_dropping_cancels_it_in_the_agent() {
    let handler = FakeHandler::default();
    let dropped = handler.dropped.clone();
    let client = client_of(handler);

    let mut stream = client
        .follow_logs(LogsRequest::unit("u").lines(2))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(stream.next().await.unwrap().unwrap());
    }
    drop(stream);
    for _ in 0..100 {
        if dropped.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    assert_eq!(seen, ["u 1", "u 2", "u new 1", "u new 2", "u new 3"]);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the agent stopped following"
    );
    assert!(client.ping().await.is_ok());
}

#[tokio::test]
async fn harden_reports_what_changed() {
    let client = client_of(FakeHandler::default());

    let report = client
        .harden(HardenRequest::new().user("kamal"))
        .await
        .unwrap();

    assert_eq!(report.user, "kamal");
    assert_eq!(report.changes, ["created user kamal"]);
}

#[tokio::test]
async fn grow_filesystems_reports_each_filesystem_before_and_after() {
    let client = client_of(FakeHandler::default());

    let report = client.grow_filesystems().await.unwrap();

    let grown: Vec<(&str, bool)> = report
        .filesystems
        .iter()
        .map(|fs| (fs.mount.as_str(), fs.grew()))
        .collect();
    assert_eq!(grown, [("/", false), ("/data", true)]);
    assert!(report.failures.is_empty());
}

#[tokio::test]
async fn upgrade_with_the_right_hash_is_installed() {
    let client = client_of(FakeHandler::default());
    let binary = pattern(5 << 20);
    let sha = hex_sha256(&binary);

    let report = client.upgrade(&binary, &sha).await.unwrap();

    assert_eq!(report.sha256, sha);
    assert_eq!(report.size, 5 << 20);
}

#[tokio::test]
async fn upgrade_with_a_wrong_hash_is_refused_and_says_so() {
    let client = client_of(FakeHandler::default());
    let binary = pattern(100_000);

    let err = client.upgrade(&binary, &"0".repeat(64)).await.unwrap_err();

    assert!(
        matches!(&err, ClientError::Remote(m) if m.contains("SHA-256 mismatch") && m.contains("unchanged")),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_old_handler_answers_new_calls_as_unsupported() {
    let (client, _server) = connected(
        MinimalHandler,
        ClientConfig::default(),
        ServerConfig::default(),
    );

    let metrics = client.metrics(Duration::ZERO).await.unwrap_err();
    let grow = client.grow_filesystems().await.unwrap_err();
    let write = client
        .write_file(WriteFileRequest::new("/x"), &pattern(300_000))
        .await
        .unwrap_err();
    let hello = client.hello().await;

    assert!(
        matches!(&metrics, ClientError::Remote(m) if m == "`metrics` is unsupported by this agent")
    );
    assert!(matches!(&write, ClientError::Remote(m) if m.contains("unsupported")));
    assert!(
        matches!(&grow, ClientError::Remote(m) if m == "`grow_filesystems` is unsupported by this agent")
    );
    assert!(
        hello.is_ok(),
        "the chunks of the refused write were dropped"
    );
}

#[tokio::test]
async fn uploads_beyond_the_limit_are_refused_while_others_run() {
    let (mut host, _server) = server_with_raw_host(
        FakeHandler::default(),
        ServerConfig::default().max_uploads(1),
    );

    host.write_json(&json!({"id": 1, "request": {"type": "write_file", "path": "/a", "size": 2}}))
        .await;
    host.write_json(&json!({"id": 2, "request": {"type": "write_file", "path": "/b", "size": 2}}))
        .await;
    let refused = host.read_json().await;
    host.write_json(&json!({"id": 1, "request": {"type": "chunk", "data": "aGk="}}))
        .await;
    let written = host.read_json().await;

    assert_eq!(refused["id"], 2);
    assert_eq!(refused["reply"]["type"], "error");
    assert_eq!(
        written,
        json!({"id": 1, "reply": {"type": "written", "size": 2}})
    );
}

#[tokio::test]
async fn a_body_longer_than_announced_is_abandoned() {
    let (mut host, _server) = server_with_raw_host(FakeHandler::default(), ServerConfig::default());

    host.write_json(&json!({"id": 1, "request": {"type": "write_file", "path": "/a", "size": 1}}))
        .await;
    host.write_json(&json!({"id": 1, "request": {"type": "chunk", "data": "aGk="}}))
        .await;
    let reply = host.read_json().await;

    assert_eq!(reply["id"], 1);
    assert_eq!(reply["reply"]["type"], "error");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stops_arriving_times_out_in_the_agent() {
    let (mut host, _server) = server_with_raw_host(
        FakeHandler::default(),
        ServerConfig::default().input_timeout(Duration::from_secs(5)),
    );

    host.write_json(&json!({"id": 1, "request": {"type": "write_file", "path": "/a", "size": 10}}))
        .await;
    host.write_json(&json!({"id": 1, "request": {"type": "chunk", "data": "aGk="}}))
        .await;
    let reply = host.read_json().await;

    assert_eq!(reply["reply"]["type"], "error");
    assert!(
        reply["reply"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped sending")
    );
}

#[tokio::test]
async fn cancel_stops_a_running_request_without_a_reply() {
    let handler = FakeHandler::default();
    let dropped = handler.dropped.clone();
    let (mut host, _server) = server_with_raw_host(handler, ServerConfig::default());

    host.write_json(&json!({"id": 5, "request": {"type": "exec", "argv": ["hang"]}}))
        .await;
    // Once the ping is answered, the exec has started.
    host.write_json(&json!({"id": 4, "request": {"type": "ping"}}))
        .await;
    let _ = host.read_json().await;
    host.write_json(&json!({"id": 5, "request": {"type": "cancel"}}))
        .await;
    host.write_json(&json!({"id": 6, "request": {"type": "ping"}}))
        .await;
    let next = host.read_json().await;

    assert_eq!(next, json!({"id": 6, "reply": {"type": "pong"}}));
    for _ in 0..100 {
        if dropped.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dropped.load(Ordering::SeqCst));
}
