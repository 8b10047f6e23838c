//! The client against agents that misbehave: it must fail calls with a specific error,
//! never panic, and never grow memory without bound.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RawPeer, client_with_raw_peer, frame_bytes};
use serde_json::json;
use vmkit_guest::{Client, ClientConfig, ClientError, ExecEvent, ExecRequest, FrameError};

fn quick() -> ClientConfig {
    ClientConfig::default().with_call_timeout(Duration::from_secs(1))
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
    let (client, mut peer) = client_with_raw_peer(quick().with_max_frame(1024));
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
    let (client, _peer) = client_with_raw_peer(quick().with_max_frame(1024));

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
        let (client, mut peer) = client_with_raw_peer(quick().with_max_frame(4096));
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
