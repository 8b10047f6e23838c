//! A hostile host: arbitrary bytes as everything the host sends to a real `serve` loop.
//! Serving must end (the bytes run out) without a panic.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_guest::{
    ExecRequest, ExitStatus, Handler, HelloInfo, InputStream, LogsRequest, Metrics, OutputSink,
    ServerConfig, SessionInput, SessionRequest, SshInfo, WriteFileRequest, serve,
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

/// Answers everything from memory, reading bodies and streaming a little output.
struct Echo;

#[vmkit_guest::async_trait]
impl Handler for Echo {
    async fn hello(&self) -> HelloInfo {
        HelloInfo::new("0", "b", "k", "a")
    }

    async fn exec(&self, req: ExecRequest, out: OutputSink) -> Result<ExitStatus, String> {
        out.stdout(&req.stdin).await.map_err(|e| e.to_string())?;
        Ok(ExitStatus::default())
    }

    async fn shutdown(&self, _reboot: bool) -> Result<(), String> {
        Ok(())
    }

    async fn write_file(
        &self,
        _req: WriteFileRequest,
        mut input: InputStream,
    ) -> Result<u64, String> {
        let mut size = 0;
        while let Some(chunk) = input.next_chunk().await.map_err(|e| e.to_string())? {
            size += chunk.len() as u64;
        }
        Ok(size)
    }

    async fn metrics(&self, _interval: Duration) -> Result<Metrics, String> {
        Ok(Metrics::default())
    }

    async fn logs(&self, req: LogsRequest, out: OutputSink) -> Result<(), String> {
        let lines: Vec<String> = (0..req.effective_lines().min(3))
            .map(|i| i.to_string())
            .collect();
        out.lines(&lines).await.map_err(|e| e.to_string())
    }

    async fn ssh_info(&self) -> Result<SshInfo, String> {
        Ok(SshInfo::default())
    }

    /// Echoes standard input until it ends or the host hangs up, taking controls as
    /// they come.
    async fn session(
        &self,
        _req: SessionRequest,
        input: SessionInput,
        out: OutputSink,
    ) -> Result<ExitStatus, String> {
        let (mut stdin, mut controls) = input.split();
        loop {
            tokio::select! {
                data = stdin.next() => match data {
                    Some(data) => out.stdout(&data).await.map_err(|e| e.to_string())?,
                    None => return Ok(ExitStatus::exited(0)),
                },
                control = controls.next() => {
                    if control.is_none() {
                        return Ok(ExitStatus::killed(1));
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (host, agent) = tokio::io::duplex(1 << 16);
        let (mut replies, mut requests) = tokio::io::split(host);
        let config = ServerConfig::default()
            .max_frame(4096)
            .input_timeout(Duration::from_secs(1));
        let server = tokio::spawn(serve(agent, Arc::new(Echo), config));
        // Replies are drained while the requests go in, so neither side waits on a full
        // pipe.
        let send = async {
            let _ = requests.write_all(data).await;
            let _ = requests.shutdown().await;
        };
        let mut sink = Vec::new();
        let (_, _) = tokio::join!(send, replies.read_to_end(&mut sink));
        let _ = server.await.expect("serve panicked");
    });
});
