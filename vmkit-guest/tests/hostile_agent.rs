//! The client against agents that misbehave: it must fail calls with a specific error,
//! never panic, and never grow memory without bound.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RawPeer, client_with_raw_peer, frame_bytes};
use serde_json::json;
use vmkit_guest::{Client, ClientConfig, ClientError, ExecEvent, ExecRequest, FrameError};

fn quick() -> ClientConfig {
    ClientConfig::default().call_timeout(Duration::from_secs(1))
}

/// Starts a ping and returns it with the id the peer saw.
async fn pending_ping(
    client: &Client,
    peer: &mut RawPeer,
) -> (tokio::task::JoinHandle<Result<Duration, ClientError>>, u64) {
    let client = client.clone();
    let ping = tokio::spawn(async move { client.ping().await });
    let (id, request) = peer.read_request().await;
    assert_eq!(request["type"], "ping");
    (ping, id)
}

#[tokio::test]
async fn oversize_length_closes_the_client_with_a_frame_error() {
    let (client, mut peer) = client_with_raw_peer(quick().max_frame(1024));
    let (ping, _) = pending_ping(&client, &mut peer).await;

    peer.write_raw(&0xffff_ffffu32.to_be_bytes()).await;
    let err = ping.await.unwrap().unwrap_err();

    assert!(matches!(
        err,
        ClientError::Frame(FrameError::TooLarge {
            len: 0xffff_ffff,
            max: 1024
        })
    ));
    assert!(client.is_closed());
    assert!(matches!(client.ping().await, Err(ClientError::Closed)));
}

#[tokio::test]
async fn zero_length_frame_closes_the_client() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, _) = pending_ping(&client, &mut peer).await;

    peer.write_raw(&[0, 0, 0, 0]).await;

    assert!(matches!(
        ping.await.unwrap(),
        Err(ClientError::Frame(FrameError::Empty))
    ));
    assert!(client.is_closed());
}

#[tokio::test]
async fn truncated_frame_closes_the_client() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, _) = pending_ping(&client, &mut peer).await;

    peer.write_raw(&[0, 0, 0, 100, b'{', b'"']).await;
    drop(peer);

    assert!(matches!(
        ping.await.unwrap(),
        Err(ClientError::Frame(FrameError::Truncated))
    ));
    assert!(client.is_closed());
}

#[tokio::test]
async fn invalid_json_closes_the_client() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, _) = pending_ping(&client, &mut peer).await;

    peer.write_raw(&frame_bytes(b"\xff\xfe not json")).await;

    assert!(matches!(
        ping.await.unwrap(),
        Err(ClientError::Frame(FrameError::Malformed(_)))
    ));
    assert!(client.is_closed());
}

#[tokio::test]
async fn unknown_reply_type_closes_the_client() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, id) = pending_ping(&client, &mut peer).await;

    peer.reply(id, json!({"type": "launch_missiles"})).await;

    assert!(matches!(
        ping.await.unwrap(),
        Err(ClientError::Frame(FrameError::Malformed(_)))
    ));
    assert!(client.is_closed());
}

#[tokio::test]
async fn reply_to_an_id_never_sent_closes_the_client_with_a_protocol_error() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, id) = pending_ping(&client, &mut peer).await;

    peer.reply(id + 1000, json!({"type": "pong"})).await;

    assert!(matches!(ping.await.unwrap(), Err(ClientError::Protocol(_))));
    assert!(client.is_closed());
}

#[tokio::test]
async fn reply_of_the_wrong_kind_fails_that_call_only() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, id) = pending_ping(&client, &mut peer).await;

    peer.reply(id, json!({"type": "ok"})).await;
    let err = ping.await.unwrap().unwrap_err();
    let (second, id) = pending_ping(&client, &mut peer).await;
    peer.reply(id, json!({"type": "pong"})).await;

    assert!(matches!(err, ClientError::Protocol(_)));
    assert!(second.await.unwrap().is_ok());
}

#[tokio::test]
async fn flood_of_replies_to_a_finished_call_is_discarded() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, id) = pending_ping(&client, &mut peer).await;

    for _ in 0..10_000 {
        peer.reply(id, json!({"type": "pong"})).await;
    }
    let first = ping.await.unwrap();
    let (second, id) = pending_ping(&client, &mut peer).await;
    peer.reply(id, json!({"type": "pong"})).await;

    assert!(first.is_ok());
    assert!(second.await.unwrap().is_ok());
    assert!(!client.is_closed());
}

#[tokio::test(start_paused = true)]
async fn stalled_agent_times_the_call_out_and_the_client_stays_usable() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (stalled, stalled_id) = pending_ping(&client, &mut peer).await;

    let err = stalled.await.unwrap().unwrap_err();
    // The late reply to the timed-out call is dropped; the next call works.
    peer.reply(stalled_id, json!({"type": "pong"})).await;
    let (next, id) = pending_ping(&client, &mut peer).await;
    peer.reply(id, json!({"type": "pong"})).await;

    assert!(matches!(err, ClientError::Timeout));
    assert!(next.await.unwrap().is_ok());
    assert!(!client.is_closed());
}

#[tokio::test(start_paused = true)]
async fn agent_that_never_reads_times_calls_out() {
    // A tiny pipe that the agent never drains: writes block.
    let (host, _guest) = tokio::io::duplex(16);
    let client = Client::new(host, quick());

    let results: Vec<_> = futures(client.clone(), 100).await;

    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(ClientError::Timeout)))
    );
}

async fn futures(client: Client, n: usize) -> Vec<Result<Duration, ClientError>> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.ping().await })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap());
    }
    results
}

#[tokio::test]
async fn agent_hanging_up_fails_pending_calls_as_closed() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, _) = pending_ping(&client, &mut peer).await;

    drop(peer);

    assert!(matches!(ping.await.unwrap(), Err(ClientError::Closed)));
    assert!(client.is_closed());
}

#[tokio::test]
async fn dropped_exec_stream_does_not_wedge_the_client() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let stream = client.exec(ExecRequest::new(["yes"])).await.unwrap();
    let (exec_id, _) = peer.read_request().await;

    drop(stream);
    for _ in 0..1_000 {
        peer.reply(exec_id, json!({"type": "stdout", "data": "eWVzCg=="}))
            .await;
    }
    peer.reply(exec_id, json!({"type": "exit", "code": 0}))
        .await;
    let (ping, id) = pending_ping(&client, &mut peer).await;
    peer.reply(id, json!({"type": "pong"})).await;

    assert!(ping.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn unread_exec_stream_is_dropped_as_lagged_and_other_calls_go_on() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let mut stream = client.exec(ExecRequest::new(["yes"])).await.unwrap();
    let (exec_id, _) = peer.read_request().await;

    for _ in 0..1_000 {
        peer.reply(exec_id, json!({"type": "stdout", "data": "eWVzCg=="}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ping, id) = pending_ping(&client, &mut peer).await;
    peer.reply(id, json!({"type": "pong"})).await;
    let mut events = 0;
    let end = loop {
        match stream.next().await.unwrap() {
            Ok(ExecEvent::Stdout(_)) => events += 1,
            other => break other,
        }
    };

    assert!(ping.await.unwrap().is_ok());
    assert!(events < 1_000);
    assert!(matches!(end, Err(ClientError::Lagged)));
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn exec_stream_ends_with_the_close_reason_when_the_agent_breaks_framing() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let mut stream = client.exec(ExecRequest::new(["yes"])).await.unwrap();
    let (exec_id, _) = peer.read_request().await;

    peer.reply(exec_id, json!({"type": "stdout", "data": "eWVzCg=="}))
        .await;
    peer.write_raw(&[0, 0, 0, 0]).await;
    let first = stream.next().await.unwrap();
    let second = stream.next().await.unwrap();

    assert_eq!(first.unwrap(), ExecEvent::Stdout("yes\n".into()));
    assert!(matches!(second, Err(ClientError::Frame(FrameError::Empty))));
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn request_larger_than_the_frame_cap_is_refused_without_closing() {
    let (client, _peer) = client_with_raw_peer(quick().max_frame(1024));

    let err = client
        .exec(ExecRequest::new(["cat"]).stdin(vec![0u8; 4096]))
        .await
        .unwrap_err();

    assert!(matches!(
        err,
        ClientError::Frame(FrameError::TooLarge { .. })
    ));
    assert!(!client.is_closed());
}

/// A deterministic xorshift generator, so that failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn random_bytes_from_the_agent_close_the_client_without_panicking() {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    for round in 0..200 {
        let (client, mut peer) = client_with_raw_peer(quick().max_frame(4096));
        let (ping, id) = pending_ping(&client, &mut peer).await;
        // Half the rounds start with a plausible length so the body decoder gets exercised.
        let len = (rng.next() % 600) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if round % 2 == 0 {
            let mut body = format!("{{\"id\":{id},\"reply\":").into_bytes();
            body.extend_from_slice(&bytes);
            bytes = frame_bytes(&body);
        }

        peer.write_raw(&bytes).await;
        drop(peer);
        let result = ping.await.unwrap();

        assert!(result.is_err(), "round {round} produced a pong from noise");
        assert!(client.is_closed());
    }
}

#[tokio::test(start_paused = true)]
async fn hello_within_waits_past_the_call_timeout_for_a_booting_agent() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let waiter = client.clone();
    let hello = tokio::spawn(async move { waiter.hello_within(Duration::from_secs(30)).await });

    let (id, request) = peer.read_request().await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    peer.reply(
        id,
        json!({"type": "hello", "protocol": 1, "agent_version": "1", "boot_id": "b",
               "kernel": "k", "arch": "x86_64"}),
    )
    .await;

    assert_eq!(request["type"], "hello");
    assert_eq!(hello.await.unwrap().unwrap().boot_id, "b");
}

#[tokio::test(start_paused = true)]
async fn hello_within_times_out_at_its_own_deadline() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let start = tokio::time::Instant::now();
    let waiter = client.clone();
    let hello = tokio::spawn(async move { waiter.hello_within(Duration::from_secs(5)).await });

    let _ = peer.read_request().await;
    let result = hello.await.unwrap();

    assert!(matches!(result, Err(ClientError::Timeout)));
    assert!(start.elapsed() >= Duration::from_secs(5));
}

// --- The management calls against a hostile agent -----------------------------------

use vmkit_guest::{LogsRequest, WriteFileRequest};

/// Starts `read_file(path, limit)` and returns it with the id the peer saw.
async fn pending_read(
    client: &Client,
    peer: &mut RawPeer,
    limit: u64,
) -> (tokio::task::JoinHandle<Result<Vec<u8>, ClientError>>, u64) {
    let reader = client.clone();
    let read = tokio::spawn(async move { reader.read_file("/etc/passwd", limit).await });
    let (id, request) = peer.read_request().await;
    assert_eq!(request["type"], "read_file");
    assert_eq!(request["limit"], limit);
    (read, id)
}

#[tokio::test]
async fn a_file_sent_past_the_limit_fails_the_read_and_the_client_goes_on() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (read, id) = pending_read(&client, &mut peer, 4).await;

    // "hello" is 5 bytes, one more than asked for; then a flood the client must drop.
    peer.reply(id, json!({"type": "data", "data": "aGVsbG8="}))
        .await;
    for _ in 0..1_000 {
        peer.reply(id, json!({"type": "data", "data": "aGVsbG8="}))
            .await;
    }
    peer.reply(id, json!({"type": "eof", "size": 5005})).await;
    let err = read.await.unwrap().unwrap_err();
    let (ping, id) = pending_ping(&client, &mut peer).await;
    peer.reply(id, json!({"type": "pong"})).await;

    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("more")),
        "{err:?}"
    );
    assert!(ping.await.unwrap().is_ok());
    assert!(!client.is_closed());
}

#[tokio::test]
async fn a_file_whose_end_disagrees_with_its_data_is_refused() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (read, id) = pending_read(&client, &mut peer, 100).await;

    peer.reply(id, json!({"type": "data", "data": "aGVsbG8="}))
        .await;
    peer.reply(id, json!({"type": "eof", "size": 50})).await;

    assert!(matches!(read.await.unwrap(), Err(ClientError::Protocol(_))));
}

#[tokio::test(start_paused = true)]
async fn a_file_that_stops_arriving_times_out() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (read, id) = pending_read(&client, &mut peer, 100).await;

    peer.reply(id, json!({"type": "data", "data": "aGVsbG8="}))
        .await;

    assert!(matches!(read.await.unwrap(), Err(ClientError::Timeout)));
    assert!(!client.is_closed());
}

#[tokio::test]
async fn an_oversize_frame_in_the_middle_of_a_file_closes_the_client() {
    let (client, mut peer) = client_with_raw_peer(quick().max_frame(1024));
    let (read, id) = pending_read(&client, &mut peer, 1 << 20).await;

    peer.reply(id, json!({"type": "data", "data": "aGVsbG8="}))
        .await;
    peer.write_raw(&(1u32 << 30).to_be_bytes()).await;

    assert!(matches!(
        read.await.unwrap(),
        Err(ClientError::Frame(FrameError::TooLarge { .. }))
    ));
    assert!(client.is_closed());
}

#[tokio::test]
async fn more_log_lines_than_asked_for_are_refused() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let reader = client.clone();
    let logs = tokio::spawn(async move { reader.logs(LogsRequest::unit("ssh").lines(2)).await });
    let (id, request) = peer.read_request().await;

    peer.reply(id, json!({"type": "lines", "lines": ["a", "b", "c"]}))
        .await;

    assert_eq!(request["lines"], 2);
    assert!(matches!(logs.await.unwrap(), Err(ClientError::Protocol(_))));
}

#[tokio::test]
async fn an_overlong_log_line_is_refused() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let reader = client.clone();
    let logs = tokio::spawn(async move { reader.logs(LogsRequest::unit("ssh")).await });
    let (id, _) = peer.read_request().await;

    peer.reply(id, json!({"type": "lines", "lines": ["x".repeat(1 << 20)]}))
        .await;

    assert!(matches!(logs.await.unwrap(), Err(ClientError::Protocol(m)) if m.contains("log line")));
}

#[tokio::test(start_paused = true)]
async fn an_unread_followed_log_flooded_by_the_agent_is_dropped_as_lagged() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let mut stream = client.follow_logs(LogsRequest::unit("ssh")).await.unwrap();
    let (id, request) = peer.read_request().await;

    for _ in 0..1_000 {
        peer.reply(id, json!({"type": "lines", "lines": ["spam"]}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ping, ping_id) = pending_ping(&client, &mut peer).await;
    peer.reply(ping_id, json!({"type": "pong"})).await;
    let mut lines = 0;
    let end = loop {
        match stream.next().await.unwrap() {
            Ok(_) => lines += 1,
            Err(err) => break err,
        }
    };

    assert_eq!(request["follow"], true);
    assert!(ping.await.unwrap().is_ok());
    assert!(lines < 1_000);
    assert!(matches!(end, ClientError::Lagged));
}

#[tokio::test]
async fn dropping_a_followed_log_tells_the_agent_to_cancel_it() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let stream = client.follow_logs(LogsRequest::unit("ssh")).await.unwrap();
    let (id, _) = peer.read_request().await;

    drop(stream);
    let (cancel_id, cancel) = peer.read_request().await;

    assert_eq!(cancel_id, id);
    assert_eq!(cancel["type"], "cancel");
}

/// Answers the next request, a metrics one, with `metrics` merged over sane values.
async fn metrics_reply(overrides: serde_json::Value) -> Result<vmkit_guest::Metrics, ClientError> {
    let (client, mut peer) = client_with_raw_peer(quick());
    let caller = client.clone();
    let call = tokio::spawn(async move { caller.metrics(Duration::ZERO).await });
    let (id, _) = peer.read_request().await;
    let mut reply = json!({
        "type": "metrics", "cpu_pct": 1.0, "mem_pct": 2.0, "mem_total_bytes": 100,
        "mem_available_bytes": 50, "disk_pct": 3.0, "load": [0.0, 0.0, 0.0],
        "uptime_secs": 1
    });
    for (key, value) in overrides.as_object().unwrap() {
        reply[key] = value.clone();
    }
    peer.reply(id, reply).await;
    call.await.unwrap()
}

#[tokio::test]
async fn sane_metrics_are_accepted() {
    assert!(metrics_reply(json!({})).await.is_ok());
}

#[tokio::test]
async fn metrics_out_of_range_are_refused() {
    for bad in [
        json!({"cpu_pct": 250.0}),
        json!({"mem_pct": -1.0}),
        json!({"data_disk_pct": 101.0}),
        json!({"load": [1.0, -2.0, 0.0]}),
        json!({"mem_available_bytes": 101}),
    ] {
        let result = metrics_reply(bad.clone()).await;
        assert!(
            matches!(result, Err(ClientError::Protocol(_))),
            "{bad} accepted"
        );
    }
}

#[tokio::test]
async fn a_huge_container_map_is_refused() {
    let health: serde_json::Map<String, serde_json::Value> = (0..5_000)
        .map(|i| (format!("c{i}"), json!("healthy")))
        .collect();

    let result = metrics_reply(json!({"container_count": 5000, "container_health": health})).await;

    assert!(matches!(result, Err(ClientError::Protocol(_))));
}

#[tokio::test]
async fn an_unknown_container_health_is_kept_as_unknown() {
    let result = metrics_reply(json!({"container_count": 1, "container_health": {"web": "sick"}}))
        .await
        .unwrap();

    assert_eq!(
        result.container_health.unwrap()["web"],
        vmkit_guest::ContainerHealth::Unknown
    );
}

#[tokio::test]
async fn a_data_reply_to_a_metrics_call_fails_that_call_only() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let caller = client.clone();
    let call = tokio::spawn(async move { caller.metrics(Duration::ZERO).await });
    let (id, _) = peer.read_request().await;

    peer.reply(id, json!({"type": "data", "data": "aGk="}))
        .await;

    assert!(matches!(call.await.unwrap(), Err(ClientError::Protocol(_))));
    assert!(!client.is_closed());
}

#[tokio::test]
async fn an_upgrade_report_naming_another_binary_is_refused() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let caller = client.clone();
    let sha = "ab".repeat(32);
    let expected = sha.clone();
    let call = tokio::spawn(async move { caller.upgrade(b"new agent", &expected).await });
    let (id, request) = peer.read_request().await;
    let (chunk_id, chunk) = peer.read_request().await;

    peer.reply(
        id,
        json!({"type": "upgraded", "path": "/etc/shadow", "previous_sha256": "",
               "sha256": "cd".repeat(32), "size": 9, "restarting": true}),
    )
    .await;

    assert_eq!(request["sha256"], sha);
    assert_eq!(request["source"]["upload"]["size"], 9);
    assert_eq!((chunk_id, chunk["type"].as_str()), (id, Some("chunk")));
    assert!(matches!(call.await.unwrap(), Err(ClientError::Protocol(_))));
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_takes_a_file_and_never_answers_times_the_write_out() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let caller = client.clone();
    let call = tokio::spawn(async move {
        caller
            .write_file(WriteFileRequest::new("/tmp/x"), &[7u8; 100_000])
            .await
    });
    let (_, request) = peer.read_request().await;
    let (_, chunk) = peer.read_request().await;

    assert_eq!(request["type"], "write_file");
    assert_eq!(request["size"], 100_000);
    assert_eq!(chunk["type"], "chunk");
    assert!(matches!(call.await.unwrap(), Err(ClientError::Timeout)));
    assert!(!client.is_closed());
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_stops_reading_a_large_write_times_it_out_and_cancels_it() {
    // A small pipe the agent never drains: the body cannot all be sent.
    let (host, _guest) = tokio::io::duplex(1024);
    let client = Client::new(host, quick());

    let err = client
        .write_file(WriteFileRequest::new("/tmp/x"), &vec![0u8; 8 << 20])
        .await
        .unwrap_err();

    assert!(matches!(err, ClientError::Timeout));
    assert!(!client.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_followed_log_dropped_as_lagged_is_cancelled_in_the_agent() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let mut stream = client.follow_logs(LogsRequest::unit("ssh")).await.unwrap();
    let (id, _) = peer.read_request().await;
    for _ in 0..100 {
        peer.reply(id, json!({"type": "lines", "lines": ["spam"]}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = loop {
        if let Err(err) = stream.next().await.unwrap() {
            break err;
        }
    };

    drop(stream);
    let (cancel_id, cancel) = peer.read_request().await;

    assert!(matches!(end, ClientError::Lagged));
    assert_eq!((cancel_id, cancel["type"].as_str()), (id, Some("cancel")));
}

#[tokio::test]
async fn an_agent_error_cannot_forge_log_lines_or_drive_a_terminal() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, id) = pending_ping(&client, &mut peer).await;
    let forged = "no such file\n2026-01-01T00:00:00Z  INFO vmkit: forged line\u{1b}[2J\r\u{2028}";

    peer.reply(id, json!({"type": "error", "message": forged}))
        .await;
    let shown = ping.await.unwrap().unwrap_err().to_string();

    assert!(
        !shown.chars().any(|c| c.is_control() || c == '\u{2028}'),
        "{shown:?}"
    );
    assert!(
        shown.contains(r"no such file\n2026-01-01T00:00:00Z"),
        "{shown:?}"
    );
    assert!(shown.contains(r"\u{1b}[2J\r\u{2028}"), "{shown:?}");
}

#[tokio::test]
async fn a_long_agent_error_is_shown_cut() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let (ping, id) = pending_ping(&client, &mut peer).await;

    peer.reply(id, json!({"type": "error", "message": "x".repeat(100_000)}))
        .await;
    let shown = ping.await.unwrap().unwrap_err().to_string();

    assert!(shown.len() < 2000, "{} bytes", shown.len());
    assert!(shown.ends_with('…'));
}

/// A grow report listing more filesystems than the two the agent looks at is
/// refused, not logged or kept.
#[tokio::test]
async fn an_oversized_grow_report_is_a_protocol_error() {
    let (client, mut peer) = client_with_raw_peer(quick());
    let grow = tokio::spawn({
        let client = client.clone();
        async move { client.grow_filesystems().await }
    });
    let (id, request) = peer.read_request().await;
    assert_eq!(request["type"], "grow_filesystems");
    let failures: Vec<String> = (0..1000).map(|i| format!("failure {i}")).collect();
    peer.reply(id, json!({"type": "grown", "failures": failures}))
        .await;

    let err = grow.await.unwrap().unwrap_err();

    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("oversized grow report")),
        "{err:?}"
    );
}

/// An agent that went away without hanging up (its guest rebooted): `close` fails the
/// pending calls of every clone and frees the channel for a new connection.
#[tokio::test]
async fn close_fails_pending_calls_of_every_clone_and_hangs_up() {
    use tokio::io::AsyncReadExt;
    let (client, mut peer) = client_with_raw_peer(ClientConfig::default());
    let (ping, _) = pending_ping(&client, &mut peer).await;
    let other = client.clone();

    other.close();

    assert!(matches!(ping.await.unwrap(), Err(ClientError::Closed)));
    assert!(client.is_closed());
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), peer.stream.read_to_end(&mut rest))
        .await
        .expect("the peer sees the connection end");
    assert_eq!(read.unwrap(), 0);
}
