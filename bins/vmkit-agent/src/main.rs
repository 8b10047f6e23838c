//! vmkit-agent: the vmkit guest agent.
//!
//! Runs inside every guest and answers the host over the agent protocol of `vmkit-guest`,
//! on a QEMU virtio-serial port or on AF_VSOCK. Started by systemd (`vmkit-agent.service`
//! in the base image, `Restart=always`), or by the init of tiny images (`respawn`); it logs
//! to stderr, which the init sends to the journal or the console. After installing an
//! upgrade it exits with status 75 so that its supervisor starts the new binary;
//! `--version` must work, since an upgrade runs the new binary with it before installing.
//!
//! ```text
//! vmkit-agent [--transport auto|virtio-serial[:NAME|:PATH]|vsock[:PORT]] [--no-hotplug]
//! ```

mod port;
mod transport;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::transport::Transport;

/// The vmkit guest agent: answers the host over virtio-serial or vsock.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// How to reach the host: `auto` (the virtio-serial port if it exists, else vsock),
    /// `virtio-serial[:NAME]` (a port name, or a device path starting with `/`), or
    /// `vsock[:PORT]`.
    #[arg(long, default_value = "auto", env = "VMKIT_AGENT_TRANSPORT")]
    transport: Transport,
    /// Leave CPUs and memory the host adds offline (by default the agent brings them
    /// online, as udev rules do); for running the agent outside a VM.
    #[arg(long)]
    no_hotplug: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            EnvFilter::try_from_env("VMKIT_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), transport = %args.transport, "vmkit-agent starting");
    // vCPUs and memory the host adds to the running VM come up at once.
    if !args.no_hotplug
        && let Err(e) = vmkit_guest::online_hotplugged()
    {
        tracing::warn!(error = %e, "cannot listen for hot-added CPUs and memory; they stay offline");
    }
    runtime.block_on(transport::run(args.transport))
}
