//! A hostile agent: arbitrary bytes as everything the agent sends to a real `Client`
//! with calls of every kind pending. The client must end every call with a result or an
//! error, never panic, and end up closed once the bytes run out.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_guest::{
    Client, ClientConfig, ExecRequest, LogsRequest, SessionRequest, WriteFileRequest,
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (host, agent) = tokio::io::duplex(1 << 16);
        let (mut requests, mut replies) = tokio::io::split(agent);
        let config = ClientConfig::default()
            .max_frame(4096)
            .call_timeout(Duration::from_secs(1));
        let client = Client::new(host, config);
        // Ids 1.. in this order, so that the fuzzer can answer each by its id.
        let calls = vec![
            tokio::spawn({
                let c = client.clone();
                async move { c.hello().await.map(drop) }
            }),
            tokio::spawn({
                let c = client.clone();
                async move { c.read_file("/f", 64).await.map(drop) }
            }),
            tokio::spawn({
                let c = client.clone();
                async move { c.logs(LogsRequest::unit("u").lines(3)).await.map(drop) }
            }),
            tokio::spawn({
                let c = client.clone();
                async move { c.metrics(Duration::ZERO).await.map(drop) }
            }),
            tokio::spawn({
                let c = client.clone();
                async move { c.exec_collect(ExecRequest::new(["x"]), 64).await.map(drop) }
            }),
            tokio::spawn({
                let c = client.clone();
                async move {
                    c.write_file(WriteFileRequest::new("/w"), b"abc")
                        .await
                        .map(drop)
                }
            }),
            tokio::spawn({
                let c = client.clone();
                async move { c.upgrade(b"agent", &"0".repeat(64)).await.map(drop) }
            }),
            tokio::spawn({
                let c = client.clone();
                async move {
                    let mut logs = c.follow_logs(LogsRequest::unit("f")).await?;
                    while let Some(line) = logs.next().await {
                        line?;
                    }
                    Ok(())
                }
            }),
            tokio::spawn({
                let c = client.clone();
                async move { c.ssh_info().await.map(drop) }
            }),
            tokio::spawn({
                let c = client.clone();
                async move {
                    let session = c.session(SessionRequest::new(["sh"])).await?;
                    let (writer, mut events) = session.split();
                    // Input waits for acknowledgements the fuzzer may or may not send.
                    let input = tokio::spawn(async move {
                        let _ = writer.send(&[b'x'; 4096]).await;
                        let _ = writer.resize(80, 24).await;
                        let _ = writer.close_stdin().await;
                    });
                    while let Some(event) = events.next().await {
                        event?;
                    }
                    drop(events);
                    let _ = input.await;
                    Ok(())
                }
            }),
        ];
        let send = async {
            let _ = replies.write_all(data).await;
            let _ = replies.shutdown().await;
        };
        let mut sink = Vec::new();
        let drain = tokio::time::timeout(Duration::from_secs(5), requests.read_to_end(&mut sink));
        let (_, _) = tokio::join!(send, drain);
        drop((requests, replies));
        for call in calls {
            // Every call ends (time is paused: timeouts pass at once).
            let _ = call.await.expect("a call panicked");
        }
        assert!(client.is_closed(), "the client outlived its stream");
    });
});
