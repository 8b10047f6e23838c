//! The client's side of sessions against a raw agent: input waits for the agent's
//! acknowledgements, controls travel with the session's id, and handlers without
//! sessions answer "unsupported".
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{FakeHandler, RawPeer, client_with_raw_peer, connected};
use serde_json::json;
use vmkit_guest::{
    ClientConfig, ClientError, ExecEvent, ExitStatus, SESSION_WINDOW, ServerConfig, SessionRequest,
};

/// What each chunk costs against the window besides its bytes (the agent's accounting).
const CHUNK_COST: usize = 64;

/// Reads stdin chunks for session `id` until none comes for a while; returns their bytes
/// and how many chunks they were.
async fn drain_chunks(peer: &mut RawPeer, id: u64) -> (usize, usize) {
    let (mut bytes, mut chunks) = (0, 0);
    while let Ok((chunk_id, request)) =
        tokio::time::timeout(Duration::from_millis(300), peer.read_request()).await
    {
        assert_eq!((chunk_id, request["type"].as_str()), (id, Some("chunk")));
        bytes += STANDARD
            .decode(request["data"].as_str().unwrap())
            .unwrap()
            .len();
        chunks += 1;
    }
    (bytes, chunks)
}

#[tokio::test]
async fn session_input_waits_for_the_agents_acknowledgements() {
    let (client, mut peer) = client_with_raw_peer(ClientConfig::default());
    let session = client.session(SessionRequest::new(["cat"])).await.unwrap();
    let (writer, _events) = session.split();
    let (id, request) = peer.read_request().await;
    assert_eq!(request["type"], "session");
    let total = 2 * SESSION_WINDOW;
    let sending = tokio::spawn(async move { writer.send(&vec![b'z'; total]).await });

    let (first, chunks) = drain_chunks(&mut peer, id).await;

    assert!(
        first + chunks * CHUNK_COST <= SESSION_WINDOW,
        "{first} sent unacknowledged"
    );
    assert!(first >= SESSION_WINDOW / 2, "only {first} sent");
    assert!(!sending.is_finished());

    let mut received = first;
    let mut unacked = (first, chunks);
    while received < total {
        let (bytes, chunks) = unacked;
        let ack = bytes + chunks * CHUNK_COST;
        peer.reply(id, json!({"type": "stdin_ack", "bytes": ack}))
            .await;
        unacked = drain_chunks(&mut peer, id).await;
        assert!(unacked.0 > 0, "acknowledged input did not free the window");
        received += unacked.0;
    }
    assert_eq!(received, total);
    sending.await.unwrap().unwrap();
}

#[tokio::test]
async fn session_controls_carry_the_sessions_id() {
    let (client, mut peer) = client_with_raw_peer(ClientConfig::default());
    let mut session = client
        .session(SessionRequest::shell().user("vmkit").pty("xterm", 80, 24))
        .await
        .unwrap();
    let (id, request) = peer.read_request().await;
    assert_eq!(
        request,
        json!({"type": "session", "argv": [], "user": "vmkit", "env": [],
               "pty": {"term": "xterm", "cols": 80, "rows": 24}})
    );

    session.writer().resize(100, 30).await.unwrap();
    session.writer().signal("INT").await.unwrap();
    session.writer().close_stdin().await.unwrap();

    assert_eq!(
        peer.read_request().await,
        (id, json!({"type": "resize", "cols": 100, "rows": 30}))
    );
    assert_eq!(
        peer.read_request().await,
        (id, json!({"type": "signal", "signal": "INT"}))
    );
    assert_eq!(
        peer.read_request().await,
        (id, json!({"type": "close_stdin"}))
    );
    peer.reply(id, json!({"type": "stdout", "data": "aGk="}))
        .await;
    peer.reply(id, json!({"type": "exit", "code": 0})).await;
    assert_eq!(
        session.next().await.unwrap().unwrap(),
        ExecEvent::Stdout("hi".into())
    );
    assert_eq!(
        session.next().await.unwrap().unwrap(),
        ExecEvent::Exit(ExitStatus::exited(0))
    );
    assert!(session.next().await.is_none());
    assert!(matches!(
        session.writer().send(b"late").await,
        Err(ClientError::SessionEnded)
    ));
}

#[tokio::test]
async fn dropping_the_events_hangs_the_session_up() {
    let (client, mut peer) = client_with_raw_peer(ClientConfig::default());
    let session = client.session(SessionRequest::new(["cat"])).await.unwrap();
    let (id, _) = peer.read_request().await;

    drop(session);

    assert_eq!(peer.read_request().await, (id, json!({"type": "cancel"})));
}

#[tokio::test]
async fn a_handler_without_sessions_or_ssh_info_says_so() {
    let (client, _server) = connected(
        FakeHandler::default(),
        ClientConfig::default(),
        ServerConfig::default(),
    );

    let mut session = client.session(SessionRequest::new(["sh"])).await.unwrap();
    let first = session.next().await;
    let info = client.ssh_info().await;

    assert!(
        matches!(&first, Some(Err(ClientError::Remote(m))) if m.contains("`session` is unsupported")),
        "{first:?}"
    );
    assert!(
        matches!(&info, Err(ClientError::Remote(m)) if m.contains("`ssh_info` is unsupported")),
        "{info:?}"
    );
}
