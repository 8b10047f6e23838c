//! The stand-in guest's agent: the real protocol server (`vmkit_guest::serve`) with a
//! handler whose exec understands a few commands.

use std::sync::Arc;
use std::time::Duration;

use vmkit_core::guest::{ExecRequest, ExitStatus, Handler, HelloInfo, OutputSink, async_trait};

/// The fake agent of one stand-in guest.
pub struct StandinAgent {
    /// Changes on every boot (and stays across a restore, as a real boot id would).
    pub boot_id: String,
    /// Powers the guest off (the VMM process then exits, as cloud-hypervisor does).
    pub power_off: Arc<dyn Fn() + Send + Sync>,
    /// Records an event (source, event) in the event monitor's file.
    pub event: EventSink,
}

/// Records an event (source, event) as cloud-hypervisor's event monitor would.
pub type EventSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

fn exit(code: i32) -> ExitStatus {
    ExitStatus::exited(code)
}

#[async_trait]
impl Handler for StandinAgent {
    async fn hello(&self) -> HelloInfo {
        HelloInfo::new(
            "0.0.0-standin",
            self.boot_id.clone(),
            "6.1.0-standin",
            std::env::consts::ARCH,
        )
    }

    /// `echo ARGS`, `cat` (stdin back), `true`, `false`, `exit N`, `sleep SECS`,
    /// `uname`, `panic` (the kernel panics: the pvpanic device reports it, and the
    /// VMM goes on, as cloud-hypervisor does); anything else exits 127.
    async fn exec(&self, req: ExecRequest, out: OutputSink) -> Result<ExitStatus, String> {
        let args: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        match args.as_slice() {
            [] => Err("empty argv".into()),
            ["echo", rest @ ..] => {
                out.stdout(format!("{}\n", rest.join(" ")).as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exit(0))
            }
            ["cat"] => {
                out.stdout(&req.stdin).await.map_err(|e| e.to_string())?;
                Ok(exit(0))
            }
            ["uname", ..] => {
                out.stdout(b"Linux standin\n")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exit(0))
            }
            ["true"] => Ok(exit(0)),
            ["panic"] => {
                (self.event)("guest", "panic");
                Ok(exit(0))
            }
            ["false"] => Ok(exit(1)),
            ["exit", code] => Ok(exit(code.parse().unwrap_or(2))),
            ["sleep", secs] => {
                let secs: f64 = secs.parse().map_err(|_| "sleep: bad number".to_owned())?;
                tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))).await;
                Ok(exit(0))
            }
            [cmd, ..] => {
                out.stderr(format!("{cmd}: command not found\n").as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(exit(127))
            }
        }
    }

    async fn shutdown(&self, reboot: bool) -> Result<(), String> {
        if reboot {
            // cloud-hypervisor resets the VM in the same process.
            (self.event)("vm", "rebooting");
            (self.event)("vm", "rebooted");
            return Ok(());
        }
        (self.power_off)();
        Ok(())
    }
}
