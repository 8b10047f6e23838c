//! Every message through a real `Client` and a real `serve` loop, with an in-memory handler.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FakeHandler, connected, exited, server_with_raw_host};
use serde_json::json;
use tokio::task::JoinHandle;
use vmkit_guest::{
    Client, ClientConfig, ClientError, ExecEvent, ExecRequest, PROTOCOL_VERSION, ServeError,
    ServerConfig,
};

fn defaults() -> (ClientConfig, ServerConfig) {
    (ClientConfig::default(), ServerConfig::default())
}

#[tokio::test]
async fn hello_returns_the_handlers_info() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let info = client.hello().await.unwrap();

    assert_eq!(info.protocol, PROTOCOL_VERSION);
    assert_eq!(info.agent_version, "9.9.9");
    assert_eq!(info.boot_id, "boot-1");
    assert_eq!(info.kernel, "6.1.0-test");
    assert_eq!(info.arch, "x86_64");
}

#[tokio::test]
async fn ping_measures_a_round_trip() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let rtt = client.ping().await.unwrap();

    assert!(rtt < Duration::from_secs(5));
}

#[tokio::test]
async fn exec_streams_output_then_the_exit_status() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let mut stream = client
        .exec(ExecRequest::new(["echo", "a", "b"]))
        .await
        .unwrap();

    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ExecEvent::Stdout("a b".into())
    );
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ExecEvent::Exit(exited(0))
    );
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn exec_passes_stdin_to_the_handler() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);
    let input: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();

    let output = client
        .exec_collect(ExecRequest::new(["cat"]).stdin(input.clone()), usize::MAX)
        .await
        .unwrap();

    assert_eq!(output.stdout, input);
}

#[tokio::test]
async fn exec_reports_the_exit_code() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let output = client
        .exec_collect(ExecRequest::new(["exit", "42"]), 1024)
        .await
        .unwrap();

    assert_eq!(output.status, exited(42));
    assert!(!output.status.success());
}

#[tokio::test]
async fn exec_that_fails_in_the_agent_is_a_remote_error() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let err = client
        .exec_collect(ExecRequest::new(["fail"]), 1024)
        .await
        .unwrap_err();

    assert!(matches!(err, ClientError::Remote(message) if message == "no such program"));
}

#[tokio::test]
async fn exec_collect_truncates_each_stream_at_the_limit() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let output = client
        .exec_collect(ExecRequest::new(["spam", "10", "1000"]), 2500)
        .await
        .unwrap();

    assert_eq!(output.stdout.len(), 2500);
    assert_eq!(output.stderr.len(), 2500);
    assert!(output.truncated);
    assert!(output.status.success());
}

#[tokio::test]
async fn large_output_is_split_into_chunks_that_fit_the_frame_cap() {
    let client_config = ClientConfig::default().max_frame(16 * 1024);
    let server_config = ServerConfig::default().max_frame(16 * 1024);
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let mut stream = client
        .exec(ExecRequest::new(["spam", "4", "100000"]))
        .await
        .unwrap();
    let (mut chunks, mut bytes) = (0, 0);
    while let Some(event) = stream.next().await {
        if let ExecEvent::Stdout(data) = event.unwrap() {
            chunks += 1;
            bytes += data.len();
        }
    }

    assert_eq!(bytes, 400_000);
    assert!(chunks >= 400_000 / (12 * 1024));
}

/// What a [`FakeHandler`] has been asked, one line a call.
type Calls = Arc<Mutex<Vec<String>>>;

/// A client of a [`FakeHandler`], the calls that handler records, and its `serve` task.
fn recorded() -> (Client, Calls, JoinHandle<Result<(), ServeError>>) {
    let (client_config, server_config) = defaults();
    let handler = FakeHandler::default();
    let calls = handler.calls.clone();
    let (client, server) = connected(handler, client_config, server_config);
    (client, calls, server)
}

#[tokio::test]
async fn shutdown_is_acknowledged() {
    let (client, calls, _server) = recorded();

    client.shutdown(false).await.unwrap();

    assert_eq!(*calls.lock().unwrap(), ["shutdown reboot=false"]);
}

#[tokio::test]
async fn shutdown_refused_by_the_handler_is_a_remote_error() {
    let (client, calls, _server) = recorded();

    let err = client.shutdown(true).await.unwrap_err();

    assert!(matches!(err, ClientError::Remote(message) if message == "reboot refused"));
    assert_eq!(*calls.lock().unwrap(), ["shutdown reboot=true"]);
}

#[tokio::test]
async fn reboot_reaches_the_handler_as_a_shutdown_with_reboot_set() {
    let (client, calls, _server) = recorded();

    client.reboot().await.unwrap_err();

    assert_eq!(*calls.lock().unwrap(), ["shutdown reboot=true"]);
}

#[tokio::test]
async fn concurrent_calls_get_their_own_replies() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let calls = (0..50).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let word = format!("word-{i}");
            let output = client
                .exec_collect(ExecRequest::new(["echo", word.as_str()]), 1024)
                .await
                .unwrap();
            client.ping().await.unwrap();
            (word, output.stdout)
        })
    });
    let results = futures_join_all(calls).await;

    for (word, stdout) in results {
        assert_eq!(stdout, word.as_bytes());
    }
}

#[tokio::test]
async fn a_hanging_exec_does_not_block_other_calls() {
    let (client_config, server_config) = defaults();
    let (client, _server) = connected(FakeHandler::default(), client_config, server_config);

    let _hanging = client.exec(ExecRequest::new(["hang"])).await.unwrap();
    let info = client.hello().await.unwrap();

    assert_eq!(info.kernel, "6.1.0-test");
}

#[tokio::test(start_paused = true)]
async fn exec_stream_times_out_after_its_own_timeout_plus_the_call_timeout() {
    let client_config = ClientConfig::default().call_timeout(Duration::from_secs(1));
    let (client, _server) = connected(
        FakeHandler::default(),
        client_config,
        ServerConfig::default(),
    );
    let start = tokio::time::Instant::now();

    let mut stream = client
        .exec(ExecRequest::new(["hang"]).timeout(Duration::from_secs(2)))
        .await
        .unwrap();
    let first = stream.next().await.unwrap();

    assert!(matches!(first, Err(ClientError::Timeout)));
    assert!(start.elapsed() >= Duration::from_secs(3));
    assert!(stream.next().await.is_none());
    assert!(!client.is_closed());
}

#[tokio::test]
async fn dropping_the_client_ends_serve_and_cancels_running_requests() {
    let handler = FakeHandler::default();
    let dropped = handler.dropped.clone();
    let (client, server) = connected(handler, ClientConfig::default(), ServerConfig::default());
    let stream = client.exec(ExecRequest::new(["hang"])).await.unwrap();
    client.ping().await.unwrap(); // the exec request has been read by now

    drop(stream);
    drop(client);
    let served = server.await.unwrap();

    assert!(served.is_ok());
    assert!(dropped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn server_answers_an_unknown_request_type_with_an_error_and_goes_on() {
    let (mut host, _server) = server_with_raw_host(FakeHandler::default(), ServerConfig::default());

    host.write_json(&json!({"id": 7, "request": {"type": "frobnicate"}}))
        .await;
    let reply = host.read_json().await;
    host.write_json(&json!({"id": 8, "request": {"type": "ping"}}))
        .await;
    let pong = host.read_json().await;

    assert_eq!(reply["id"], 7);
    assert_eq!(reply["reply"]["type"], "error");
    assert_eq!(pong, json!({"id": 8, "reply": {"type": "pong"}}));
}

#[tokio::test]
async fn server_stops_on_a_frame_over_its_cap() {
    let config = ServerConfig::default().max_frame(1024);
    let (mut host, server) = server_with_raw_host(FakeHandler::default(), config);

    host.write_raw(&2048u32.to_be_bytes()).await;
    let served = server.await.unwrap();

    assert!(matches!(
        served,
        Err(ServeError::Read(vmkit_guest::FrameError::TooLarge {
            len: 2048,
            max: 1024
        }))
    ));
}

#[tokio::test]
async fn server_stops_on_a_frame_without_a_request_id() {
    let (mut host, server) = server_with_raw_host(FakeHandler::default(), ServerConfig::default());

    host.write_raw(&common::frame_bytes(b"{not json")).await;
    let served = server.await.unwrap();

    assert!(matches!(
        served,
        Err(ServeError::Read(vmkit_guest::FrameError::Malformed(_)))
    ));
}

#[tokio::test]
async fn server_returns_ok_when_the_host_hangs_up_between_frames() {
    let (host, server) = server_with_raw_host(FakeHandler::default(), ServerConfig::default());

    drop(host);

    assert!(server.await.unwrap().is_ok());
}

#[tokio::test]
async fn server_reports_a_frame_cut_short_by_the_host() {
    let (mut host, server) = server_with_raw_host(FakeHandler::default(), ServerConfig::default());

    host.write_raw(&[0, 0, 0, 50, b'{']).await;
    drop(host);

    assert!(matches!(
        server.await.unwrap(),
        Err(ServeError::Read(vmkit_guest::FrameError::Truncated))
    ));
}

async fn futures_join_all<T>(
    handles: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap());
    }
    results
}
