//! `SystemHandler` running real processes on this machine, through a real client and
//! `serve` loop.
#![cfg(feature = "agent")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::connected;
use vmkit_guest::{
    Client, ClientConfig, ClientError, ExecEvent, ExecRequest, ServerConfig, SystemHandler,
};

fn client() -> Client {
    let (client, _server) = connected(
        SystemHandler::new(),
        ClientConfig::default(),
        ServerConfig::default(),
    );
    client
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[tokio::test]
async fn hello_reports_this_system() {
    let info = client().hello().await.unwrap();

    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.arch, std::env::consts::ARCH);
    assert_eq!(info.boot_id.len(), 36, "boot id {:?}", info.boot_id);
    assert!(!info.kernel.is_empty());
}

#[tokio::test]
async fn exec_reports_exit_codes() {
    let client = client();

    let ok = client.exec_collect(sh("exit 0"), 1024).await.unwrap();
    let failed = client.exec_collect(sh("exit 3"), 1024).await.unwrap();

    assert!(ok.status.success());
    assert_eq!(failed.status.code, Some(3));
    assert_eq!(failed.status.signal, None);
    assert!(!failed.status.timed_out);
}

#[tokio::test]
async fn exec_feeds_stdin_and_separates_stdout_from_stderr() {
    let output = client()
        .exec_collect(sh("tr a-z A-Z; echo oops >&2").stdin(*b"hello\n"), 1024)
        .await
        .unwrap();

    assert_eq!(output.stdout, b"HELLO\n");
    assert_eq!(output.stderr, b"oops\n");
}

#[tokio::test]
async fn exec_applies_env_and_cwd() {
    let output = client()
        .exec_collect(
            sh("echo \"$GREETING\" \"$(pwd)\"")
                .env("GREETING", "hi")
                .cwd("/tmp"),
            1024,
        )
        .await
        .unwrap();

    assert_eq!(output.stdout, b"hi /tmp\n");
}

#[tokio::test]
async fn large_output_is_streamed_in_many_chunks() {
    const SIZE: usize = 8 << 20;
    let mut stream = client()
        .exec(sh(&format!("head -c {SIZE} /dev/zero")))
        .await
        .unwrap();
    let (mut chunks, mut bytes, mut status) = (0, 0, None);

    while let Some(event) = stream.next().await {
        match event.unwrap() {
            ExecEvent::Stdout(data) => {
                chunks += 1;
                bytes += data.len();
            }
            ExecEvent::Exit(exit) => status = Some(exit),
            other => panic!("unexpected {other:?}"),
        }
    }

    assert_eq!(bytes, SIZE);
    assert!(chunks >= SIZE / (64 << 10), "only {chunks} chunks");
    assert!(status.unwrap().success());
}

#[tokio::test]
async fn exec_timeout_kills_the_process_group() {
    let start = Instant::now();

    // The background sleep is in the same process group and must die too, or the pipe
    // would stay open.
    let output = client()
        .exec_collect(
            sh("sleep 30 & echo started; wait").timeout(Duration::from_millis(300)),
            1024,
        )
        .await
        .unwrap();

    assert!(output.status.timed_out);
    assert_eq!(output.status.signal, Some(9));
    assert_eq!(output.stdout, b"started\n");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn exec_reports_the_signal_that_killed_the_command() {
    let output = client()
        .exec_collect(sh("kill -TERM $$"), 1024)
        .await
        .unwrap();

    assert_eq!(output.status.signal, Some(15));
    assert_eq!(output.status.code, None);
    assert!(!output.status.timed_out);
}

#[tokio::test]
async fn exec_of_a_missing_program_is_a_remote_error() {
    let err = client()
        .exec_collect(ExecRequest::new(["/nonexistent/program"]), 1024)
        .await
        .unwrap_err();

    assert!(
        matches!(err, ClientError::Remote(message) if message.contains("/nonexistent/program"))
    );
}

#[tokio::test]
async fn exec_with_empty_argv_is_a_remote_error() {
    let err = client()
        .exec_collect(ExecRequest::default(), 1024)
        .await
        .unwrap_err();

    assert!(matches!(err, ClientError::Remote(_)));
}

#[tokio::test]
async fn command_that_ignores_its_stdin_still_finishes() {
    let output = client()
        .exec_collect(sh("exit 0").stdin(vec![b'x'; 1 << 20]), 1024)
        .await
        .unwrap();

    assert!(output.status.success());
}

#[tokio::test]
async fn concurrent_execs_run_in_parallel() {
    let client = client();
    let start = Instant::now();

    let runs: Vec<_> = (0..8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .exec_collect(sh(&format!("sleep 1; echo {i}")), 1024)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut outputs = Vec::new();
    for run in runs {
        outputs.push(run.await.unwrap());
    }

    for (i, output) in outputs.iter().enumerate() {
        assert_eq!(output.stdout, format!("{i}\n").as_bytes());
    }
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn background_process_holding_the_pipe_does_not_hang_the_exec() {
    let start = Instant::now();

    let output = client()
        .exec_collect(sh("sleep 5 & echo done"), 1024)
        .await
        .unwrap();

    assert_eq!(output.stdout, b"done\n");
    assert!(output.status.success());
    assert!(start.elapsed() < Duration::from_secs(3));
}
