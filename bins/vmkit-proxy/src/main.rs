//! vmkit-proxy: vmkit's HTTPS edge as a process of its own, for operators who split
//! it out of the daemon. It serves `https://NAME.domain` exactly as the daemon's own
//! edge does, and asks the daemon (over its Unix socket, `/v1/edge/...`) who callers
//! are, where hosts go and what callers may do: only the daemon opens the state file.
//!
//! Run with: `vmkit-proxy` (as root, beside a running `vmkit-gateway` whose own edge
//! is off), or `vmkit-proxy --data-dir DIR --listen 127.0.0.1:8443 --domain vm.test`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use vmkit_net::challenges::AcmeChallenges;
use vmkit_net::https::domains::DomainCerts;
use vmkit_net::https::tls::{CertStore, LocalCa};
use vmkit_net::https::{DaemonBackend, EdgeBackend as _, HttpsConfig, HttpsEdge};

/// How often the daemon is asked which custom domains to certify.
const DOMAIN_POLL: Duration = Duration::from_secs(5);

/// vmkit's HTTPS edge as its own process, asking the vmkit daemon for routes.
///
/// Certificates come from the daemon's local CA (in the data directory, made when
/// absent): ACME stays in the daemon, whose edge serves it. Settings come from the
/// flags (or their VMKIT_PROXY_* variables), else from the `[ssh]` and `[https]`
/// sections of the daemon's configuration file when --config names it, else from
/// the defaults.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The daemon's configuration file (e.g. /etc/vmkit/gateway.toml), for its data
    /// directory, `[ssh] domain`, `public_host` and `[https]` settings.
    #[arg(long, short, env = "VMKIT_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// The daemon's data directory: its socket, the local CA and the assertion key
    /// are there [default: /var/lib/vmkit].
    #[arg(long, env = "VMKIT_PROXY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The daemon's API socket [default: DATA_DIR/vmkit.sock].
    #[arg(long, env = "VMKIT_PROXY_SOCKET")]
    socket: Option<PathBuf>,
    /// Address and port to serve HTTPS on [default: 0.0.0.0:8443].
    #[arg(long, env = "VMKIT_PROXY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address and port of plain HTTP, which only redirects to HTTPS [default: none].
    #[arg(long, env = "VMKIT_PROXY_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// The domain VMs are reached under (`NAME.domain`) [default: localhost].
    #[arg(long, env = "VMKIT_PROXY_DOMAIN")]
    domain: Option<String>,
    /// The HTTPS port clients dial, when not the one of --listen.
    #[arg(long, env = "VMKIT_PROXY_PUBLIC_PORT")]
    public_port: Option<u16>,
    /// The SSH lobby's host and port as users dial them, for the sign-in pages
    /// (`ssh -p PORT HOST browser`) [default: the domain, port 2222].
    #[arg(long, env = "VMKIT_PROXY_SSH", value_name = "HOST:PORT")]
    ssh: Option<String>,
    /// How long to wait for the daemon's socket at start, in seconds.
    #[arg(long, env = "VMKIT_PROXY_WAIT_SECS", default_value_t = 30)]
    wait_secs: u64,
}

/// What the proxy reads of the daemon's configuration file; the rest is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    ssh: FileSsh,
    https: FileHttps,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileSsh {
    listen: Option<String>,
    domain: Option<String>,
    public_host: Option<String>,
    public_port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileHttps {
    listen: Option<String>,
    http_listen: Option<String>,
    public_port: Option<u16>,
    tls: Option<String>,
    hsts: Option<bool>,
    trusted_proxies: Option<Vec<std::net::IpAddr>>,
}

/// The settings the proxy runs with.
#[derive(Debug)]
struct Settings {
    data_dir: PathBuf,
    socket: PathBuf,
    listen: SocketAddr,
    http_listen: Option<SocketAddr>,
    domain: String,
    public_port: Option<u16>,
    ssh_host: Option<String>,
    ssh_port: u16,
    hsts: bool,
    trusted_proxies: Vec<std::net::IpAddr>,
    wait: Duration,
}

/// Parses an address setting of the file; empty is none.
fn address(value: Option<&str>, what: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .with_context(|| format!("{what} = {v:?} is not an address and port")),
    }
}

impl Settings {
    fn resolve(args: Args) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("reading {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        if file.https.tls.as_deref() == Some("acme") {
            warn!(
                "the configuration asks for ACME certificates: vmkit-proxy serves the local \
                 CA's; ACME stays in the daemon, whose own edge serves it"
            );
        }
        // As the daemon does: a data directory named on the command line has its
        // socket in it, whatever the file says.
        let file_socket = file.socket.filter(|_| args.data_dir.is_none());
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/vmkit"));
        let socket = args
            .socket
            .or(file_socket)
            .unwrap_or_else(|| data_dir.join("vmkit.sock"));
        let listen = match args.listen {
            Some(addr) => addr,
            None => address(file.https.listen.as_deref(), "[https] listen")?
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8443))),
        };
        let http_listen = match args.http_listen {
            Some(addr) => Some(addr),
            None => address(file.https.http_listen.as_deref(), "[https] http_listen")?,
        };
        let domain = args
            .domain
            .or(file.ssh.domain)
            .unwrap_or_else(|| "localhost".into());
        let public_port = args
            .public_port
            .or(file.https.public_port)
            .filter(|p| *p != 0);
        let (ssh_host, ssh_port) = match args.ssh {
            Some(value) => {
                let (host, port) = value
                    .rsplit_once(':')
                    .with_context(|| format!("--ssh {value:?} is not HOST:PORT"))?;
                let port = port
                    .parse()
                    .with_context(|| format!("--ssh {value:?} is not HOST:PORT"))?;
                (Some(host.to_owned()), port)
            }
            None => {
                let listen = address(file.ssh.listen.as_deref(), "[ssh] listen")?;
                let port = match file.ssh.public_port.filter(|p| *p != 0) {
                    Some(port) => port,
                    None => listen.map_or(2222, |a| a.port()),
                };
                (file.ssh.public_host.filter(|h| !h.trim().is_empty()), port)
            }
        };
        Ok(Self {
            data_dir,
            socket,
            listen,
            http_listen,
            domain,
            public_port,
            ssh_host,
            ssh_port,
            hsts: file.https.hsts.unwrap_or(true),
            trusted_proxies: file.https.trusted_proxies.unwrap_or_default(),
            wait: Duration::from_secs(args.wait_secs),
        })
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VMKIT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let settings = match Settings::resolve(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmkit-proxy: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmkit-proxy: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmkit-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Waits up to `wait` for the daemon at `socket` to answer.
async fn daemon(socket: &Path, wait: Duration) -> anyhow::Result<DaemonBackend> {
    let deadline = Instant::now() + wait;
    loop {
        match DaemonBackend::connect(socket).await {
            Ok(backend) => return Ok(backend),
            Err(e) if Instant::now() >= deadline => {
                if !socket.exists() {
                    bail!(
                        "the vmkit daemon's socket {} is absent: start vmkit-gateway first \
                         (or name its socket with --socket)",
                        socket.display()
                    );
                }
                return Err(e)
                    .with_context(|| format!("asking the vmkit daemon at {}", socket.display()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let backend = daemon(&settings.socket, settings.wait).await?;
    info!(socket = %settings.socket.display(), "asking the vmkit daemon");
    let ca = LocalCa::load_or_create(&settings.data_dir).context("loading the local CA")?;
    info!(certificate = %ca.certificate_path().display(), "certificates from the local CA");
    let certs = CertStore::new(&settings.domain, Some(ca)).context("issuing the certificates")?;
    let https = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding HTTPS to {} (--listen)", settings.listen))?;
    let bound = https.local_addr().context("reading the HTTPS address")?;
    let http = match settings.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding plain HTTP to {addr} (--http-listen)"))?,
        ),
        None => None,
    };
    let ssh_host = settings
        .ssh_host
        .clone()
        .unwrap_or_else(|| settings.domain.clone());
    let config = HttpsConfig::new(&settings.domain, &settings.data_dir)
        .public_port(settings.public_port.unwrap_or(bound.port()))
        .ssh(ssh_host, settings.ssh_port)
        .hsts(settings.hsts)
        .trusted_proxies(settings.trusted_proxies.clone());
    let backend = Arc::new(backend);
    // Custom domains get certificates from the local CA as they are attached;
    // the daemon is asked for them every few seconds.
    let domains = DomainCerts::new(certs.clone(), None);
    {
        let backend = backend.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(DOMAIN_POLL);
            loop {
                every.tick().await;
                match backend.custom_domains().await {
                    Ok(hosts) => domains.sync(hosts.into_iter().collect()),
                    Err(e) => warn!(error = %e, "cannot ask the daemon for custom domains"),
                }
            }
        });
    }
    let edge = HttpsEdge::new(backend, certs, Arc::new(AcmeChallenges::new()), config)
        .context("starting the HTTPS edge")?;
    info!(address = %bound, domain = %settings.domain, "serving HTTPS");
    edge.serve(https, http, shutdown)
        .await
        .context("serving HTTPS")?;
    info!("stopped");
    Ok(())
}

/// Resolves at SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["vmkit-proxy"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/vmkit\"\n[ssh]\ndomain = \"vm.example.com\"\nlisten = \"0.0.0.0:22\"\n\
             [https]\nlisten = \"0.0.0.0:443\"\nhsts = false\n[dns]\nlisten = \"\"\n",
        )
        .unwrap();
        let s = Settings::resolve(args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/srv/vmkit"));
        assert_eq!(s.socket, PathBuf::from("/srv/vmkit/vmkit.sock"));
        assert_eq!(s.listen, "0.0.0.0:443".parse().unwrap());
        assert_eq!(s.domain, "vm.example.com");
        assert_eq!(s.ssh_port, 22);
        assert!(!s.hsts);
        let s = Settings::resolve(args(&[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9443",
            "--domain",
            "vm.test",
        ]))
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(s.domain, "vm.test");
        let s = Settings::resolve(args(&[])).unwrap();
        assert_eq!(s.socket, PathBuf::from("/var/lib/vmkit/vmkit.sock"));
        assert_eq!(s.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(s.http_listen, None);
    }
}
