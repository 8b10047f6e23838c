//! vmkit's HTTPS edge as `scripts/bench-https.sh` measures it against nginx and
//! Caddy: [`HttpsEdge`] over a fake host (`vmkit_core::testing`) with one VM, `web`,
//! shared public, whose port 80 is the benchmark's upstream on 127.0.0.1 (a
//! [`LoopbackGateway`]). It issues one certificate from a local CA for
//! `web.vm.test`, `vm.test` and `*.vm.test`, serves it for every name, and writes
//! it (`cert.pem`, the chain; `key.pem`; `ca.pem`) into DIR for nginx and Caddy to
//! serve the very same. Prints `ready` when listening; stops on SIGINT or SIGTERM.
//!
//! The runtime is tokio's multi-threaded one with a worker per CPU, as the daemon's;
//! `HTTPS_EDGE_WORKERS=N` sets another number of workers (for profiling).
//!
//! Run with: cargo run --release -p vmkit-benches --bin https-edge -- PORT UPSTREAM_PORT DIR

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use vmkit_core::testing::{FakeHost, LoopbackGateway};
use vmkit_core::{
    Access, Caller, CreateRequest, Door, Handle, ShareWith, StateStore, StoreGateway, User, UserId,
    VmName, VmSpec, WebSessions,
};
use vmkit_net::challenges::AcmeChallenges;
use vmkit_net::https::tls::{CertStore, LocalCa};
use vmkit_net::https::{HttpsConfig, HttpsEdge};

const DOMAIN: &str = "vm.test";

fn main() -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Ok(workers) = std::env::var("HTTPS_EDGE_WORKERS") {
        runtime.worker_threads(workers.parse().context("HTTPS_EDGE_WORKERS is a number")?);
    }
    runtime
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, upstream, dir] = args.as_slice() else {
        bail!("usage: https-edge PORT UPSTREAM_PORT DIR");
    };
    let port: u16 = port.parse().context("PORT is a port number")?;
    let upstream: u16 = upstream.parse().context("UPSTREAM_PORT is a port number")?;
    let dir = PathBuf::from(dir);

    let host = FakeHost::new().await;
    let store: Arc<dyn StateStore> = host.store.clone();
    let owner = User::new(UserId(1), Handle::new("bench")?);
    store.put_user(&owner).await?;
    let web = VmName::new("web")?;
    let commands = host.manager.commands(Caller::user(&owner, Door::Ssh));
    commands
        .create(CreateRequest::new(owner.id, VmSpec::default()).name(web.clone()))
        .await
        .context("creating the VM")?;
    commands
        .share(&web, ShareWith::Public, Access::Http)
        .await
        .context("sharing the VM")?;
    let gateway = LoopbackGateway::new(
        StoreGateway::new(store.clone(), DOMAIN),
        HashMap::from([(80, upstream)]),
    );

    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).context("making the CA's directory")?;
    let ca = LocalCa::load_or_create(&ca_dir)?;
    let names = ["web.vm.test", "vm.test", "*.vm.test"].map(String::from);
    let cert = ca.issue(&names)?;
    std::fs::write(dir.join("cert.pem"), &cert.chain_pem).context("writing cert.pem")?;
    std::fs::write(dir.join("key.pem"), &cert.key_pem).context("writing key.pem")?;
    std::fs::write(dir.join("ca.pem"), ca.certificate_pem()).context("writing ca.pem")?;
    // No CA in the store: the one certificate above for every name, as nginx and
    // Caddy serve it.
    let certs = CertStore::new(DOMAIN, None)?;
    certs.set_default(&cert)?;

    let config = HttpsConfig::new(DOMAIN, dir.join("edge"))
        .public_port(port)
        // Every benchmark connection comes from 127.0.0.1.
        .max_connections_per_ip(1_000_000);
    std::fs::create_dir_all(&config.data_dir).context("making the edge's directory")?;
    let edge = HttpsEdge::local(
        host.manager.clone(),
        gateway,
        WebSessions::new(store.clone()),
        certs,
        Arc::new(AcmeChallenges::new()),
        config,
    )?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
    println!("ready https://web.vm.test:{port}/");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    edge.serve(listener, None, async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await?;
    Ok(())
}
