//! vmkit-gateway: the vmkit daemon. It owns the state file and the VMM processes
//! and serves the REST API on a Unix socket in its data directory.
//!
//! Run with: `vmkit-gateway` (as root; state under /var/lib/vmkit), or
//! `vmkit-gateway --fake-backends` to try the API with simulated VMs.

mod api;
mod backends;
mod config;
mod notify;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::UnixListener;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use vmkit_core::{
    ErrorChain, Manager, ManagerConfig, Quota, SpecLimits, StateStore, User, UserId, VmSpec,
};

use crate::config::{Config, LogFormat};

/// The vmkit daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (default: /etc/vmkit/gateway.toml if it exists). Every key
    /// can also be set with a VMKIT_* variable, e.g. VMKIT_DATA_DIR or
    /// VMKIT_TIMEOUTS_BOOT_SECS.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory (overrides the file and VMKIT_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run on in-memory fake backends: simulated VMs, nothing persisted. For trying
    /// the API on a machine that cannot run VMs. Never the default; only in builds
    /// with the `fake-backends` feature (the packaged daemon has none).
    #[arg(long)]
    fake_backends: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmkit-gateway: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(dir) = args.data_dir.clone() {
        config.socket = vmkit_core::api::socket_path(&dir);
        config.data_dir = dir;
    }
    if args.print_config {
        match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                return std::process::ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("vmkit-gateway: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    init_tracing(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmkit-gateway: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, args.fake_backends)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("vmkit-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_from_env("VMKIT_LOG")
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

/// The daemon's effective uid: `/proc/self` belongs to it.
fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

async fn run(config: Config, fake: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("securing data directory {}", config.data_dir.display()))?;

    // The state store's lock is taken first: a second daemon stops here with a
    // clear message, before it touches the socket.
    let backends = if fake {
        fake_backends(&config)?
    } else {
        backends::real(&config).await?
    };
    ensure_local_user(&*backends.store).await?;
    let backends = match custom_domains(&config)? {
        Some(domains) => backends.with_custom_domains(domains),
        None => backends,
    };

    let t = &config.timeouts;
    let mut limits = SpecLimits::default();
    limits.max_vcpus = config.limits.max_vcpus;
    limits.min_memory_mib = config.limits.min_memory_mib;
    limits.max_memory_mib = config.limits.max_memory_mib;
    limits.max_disk_gib = config.limits.max_disk_gib;
    let q = &config.quota;
    let manager_config = ManagerConfig::new(&config.data_dir)
        .spec_limits(limits)
        .default_quota(Quota::new(
            q.max_vms,
            q.max_vcpus,
            q.max_memory_mib,
            q.max_disk_gib,
        ))
        .boot_timeout(Duration::from_secs(t.boot_secs))
        .shutdown_grace(Duration::from_secs(t.shutdown_grace_secs))
        .agent_timeout(Duration::from_secs(t.agent_secs))
        .ssh_ready_timeout(Duration::from_secs(t.ssh_ready_secs))
        .on_vmm_exit(config.on_vmm_exit)
        .event_retention(config.events.retention())
        .registration(config.users.registration)
        .confinement(config.confinement.resolve(effective_uid())?)
        .default_spec(VmSpec::new(config.default_image.clone()).root_gib(config.default_root_gib));
    let manager = Manager::new(manager_config, backends)
        .await
        .context("starting the VM manager")?;

    // Store and host are made to agree before the first request: interrupted
    // operations finished or rolled back, VMMs re-attached, orphans removed. Nothing
    // reconcile meets stops the daemon: a VM it cannot settle is quarantined, and a
    // reconcile that fails as a whole is logged and shown by /readyz while the API
    // serves, so that the operator can look and act (a daemon that exited here
    // would be restarted by systemd into the same failure, with no API to fix it).
    let (report, not_ready) = match manager.reconcile().await {
        Ok(report) => (report, None),
        Err(e) => {
            let why = format!(
                "reconcile failed at start: {}; the API serves, but VMs may not be re-attached \
                 and interrupted operations are not settled: fix the cause and restart the \
                 daemon",
                ErrorChain(&e)
            );
            error!("{why}");
            (vmkit_core::ReconcileReport::default(), Some(why.into()))
        }
    };
    info!(
        reattached = report.reattached.len(),
        stopped = report.stopped.len(),
        rolled_back = report.rolled_back.len(),
        deleted = report.deleted.len(),
        orphans = report.orphans.len(),
        unreachable = report.unreachable.len(),
        failed = report.failed.len(),
        "reconciled"
    );
    for failure in &report.failed {
        match &failure.vm {
            Some(vm) => error!(
                %vm,
                error = %failure.error,
                "reconcile could not {}; the VM is quarantined: only `vmkit vm rm {vm}` is \
                 accepted (fix the cause it names first)",
                failure.action
            ),
            None => warn!(
                error = %failure.error,
                "reconcile could not {}; the next start tries again",
                failure.action
            ),
        }
    }
    let monitor = tokio::spawn(monitor(
        manager.clone(),
        Duration::from_secs(t.vmm_check_secs.max(1)),
        Duration::from_secs(t.agent_secs.max(1)),
    ));
    // VMs the exit policy wants back boot while the API serves.
    for name in report.to_restart {
        spawn_restart(&manager, name);
    }

    // Signals are caught from before the socket exists: a client that sees the
    // socket may stop the daemon at once, and that must be a clean shutdown.
    let shutdown = shutdown_signal()?;
    let listener = bind(&config.socket).await?;
    info!(socket = %config.socket.display(), "serving the API");
    // The store was opened with the backends above, the socket is bound and SIGTERM
    // is handled.
    notify::ready();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let https = match config.https.listen()? {
        Some(addr) => Some(bind_https(&config, addr).await?),
        None => None,
    };
    // The port HTTPS links name: the own edge's, else, with the edge in a process
    // of its own (`vmkit-proxy`, [https] listen = ""), [https] public_port.
    let https_port = https
        .as_ref()
        .map(|h| h.public_port)
        .or(Some(config.https.public_port).filter(|p| *p != 0));
    let lobby = match config.ssh.listen()? {
        Some(addr) => Some(serve_ssh(&config, &manager, addr, https_port, stopping.clone()).await?),
        None => None,
    };
    // One set of ACME challenge answers: the edge serves HTTP-01 ones, the DNS
    // server DNS-01 ones.
    let challenges = Arc::new(vmkit_net::challenges::AcmeChallenges::new());
    let dns = match config.dns.listen()? {
        Some(addr) => Some(
            serve_dns(
                &config,
                &manager,
                addr,
                challenges.clone(),
                stopping.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let app_state = api::AppState {
        manager: manager.clone(),
        shutdown: stopping.clone(),
        not_ready,
        ca_certificate: https
            .is_some()
            .then(|| config.data_dir.join(vmkit_net::https::tls::CA_CERT_FILE)),
    };
    let edge = match https {
        Some(bound) => Some(serve_https(
            &config,
            &manager,
            bound,
            challenges,
            api::https::apex_api(
                app_state.clone(),
                Arc::new(vmkit_core::StoreGateway::new(
                    manager.backends().store.clone(),
                    config.ssh.domain.clone(),
                )),
                config.https.api_burst,
                config.https.api_requests_per_minute,
            ),
            stopping.clone(),
        )?),
        None => None,
    };
    // What a `vmkit-proxy` asks, answered as the daemon's own edge would.
    let edge_backend = {
        let store = manager.backends().store.clone();
        vmkit_net::https::LocalBackend::new(
            manager.clone(),
            Arc::new(vmkit_core::StoreGateway::new(
                store.clone(),
                config.ssh.domain.clone(),
            )),
            vmkit_core::WebSessions::new(store),
        )
    };
    let app = api::socket_router(app_state, edge_backend);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            notify::stopping();
            // Follows of the event log end, or the shutdown would wait for them.
            stop.send_replace(true);
        })
        .await;
    monitor.abort();
    if let Some(lobby) = lobby {
        // It saw the same stop: its sessions are closing.
        if let Err(e) = lobby.await {
            warn!(error = %e, "the SSH lobby's task failed");
        }
    }
    for (task, what) in [(edge, "HTTPS edge"), (dns, "DNS server")] {
        if let Some(task) = task
            && let Err(e) = task.await
        {
            warn!(error = %e, "the {what}'s task failed");
        }
    }
    if let Err(e) = std::fs::remove_file(&config.socket) {
        warn!(error = %e, "cannot remove the API socket");
    }
    served.context("serving the API")?;
    info!("stopped; VMs keep running and are re-attached at the next start");
    Ok(())
}

#[cfg(feature = "fake-backends")]
fn fake_backends(config: &Config) -> anyhow::Result<vmkit_core::Backends> {
    Ok(backends::fake(&config.data_dir))
}

#[cfg(not(feature = "fake-backends"))]
fn fake_backends(_: &Config) -> anyhow::Result<vmkit_core::Backends> {
    bail!(
        "this vmkit-gateway was built without the fake-backends feature; run it without \
         --fake-backends, or build it with `cargo build -p vmkit-gateway --features fake-backends`"
    )
}

/// The HTTPS edge's listeners, bound before anything is served so that a port
/// taken stops the start with a clear error.
struct HttpsListeners {
    https: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    public_port: u16,
}

async fn bind_https(config: &Config, addr: std::net::SocketAddr) -> anyhow::Result<HttpsListeners> {
    let https = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the HTTPS edge to {addr} ([https] listen; another port there, or \
             listen = \"\" to turn it off)"
        )
    })?;
    let bound = https
        .local_addr()
        .context("reading the HTTPS edge's address")?;
    let http = match config.https.http_listen()? {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "binding plain HTTP to {addr} ([https] http_listen; another port there, or \
                 http_listen = \"\" for none)"
            )
        })?),
        None => None,
    };
    let public_port = match config.https.public_port {
        0 => bound.port(),
        port => port,
    };
    info!(address = %bound, "serving HTTPS");
    Ok(HttpsListeners {
        https,
        http,
        public_port,
    })
}

/// Custom domains as `[https]` configures them: `None` when no edge serves HTTPS
/// or `custom_domains = false`, or when no resolver can be made (logged: the rest of
/// the daemon runs without them).
fn custom_domains(config: &Config) -> anyhow::Result<Option<vmkit_core::CustomDomains>> {
    use vmkit_net::dns::DnsResolver;
    // An edge serves HTTPS: the daemon's own, or a `vmkit-proxy` (whose port
    // `public_port` names then).
    let edge = config.https.listen()?.is_some() || config.https.public_port != 0;
    if !edge || !config.https.custom_domains {
        return Ok(None);
    }
    let resolvers = &config.https.domain_resolvers;
    let resolver = match resolvers.is_empty() {
        true => DnsResolver::system(),
        false => DnsResolver::with_servers(resolvers),
    };
    match resolver {
        Ok(resolver) => Ok(Some(vmkit_core::CustomDomains::new(
            &config.ssh.domain,
            Arc::new(resolver),
        ))),
        Err(e) => {
            warn!(error = %e, "custom domains are off: set [https] domain_resolvers");
            Ok(None)
        }
    }
}

/// Starts the HTTPS edge on bound listeners (and, with `tls = "acme"`, the task that
/// keeps its certificates); they stop when `stopping` turns true.
fn serve_https(
    config: &Config,
    manager: &Manager,
    bound: HttpsListeners,
    challenges: Arc<vmkit_net::challenges::AcmeChallenges>,
    api: vmkit_net::https::ApexApi,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use vmkit_net::https::tls::{CertStore, LocalCa};
    use vmkit_net::https::{HttpsConfig, HttpsEdge};
    let domain = config.ssh.domain.clone();
    let store = manager.backends().store.clone();
    let mut acme = None;
    let certs = match config.https.tls {
        config::TlsMode::SelfSigned => {
            let ca = LocalCa::load_or_create(&config.data_dir).context("loading the local CA")?;
            info!(certificate = %ca.certificate_path().display(), "certificates from the local CA");
            CertStore::new(&domain, Some(ca)).context("issuing the local certificates")?
        }
        config::TlsMode::Acme => {
            let certs = CertStore::new(&domain, None).context("making the certificate store")?;
            acme = Some(acme_issuer(config, &domain, &certs, &challenges)?);
            certs
        }
    };
    let ssh_host = match config.ssh.public_host.trim() {
        "" => domain.clone(),
        host => host.to_owned(),
    };
    let ssh_port = match config.ssh.listen()? {
        Some(addr) => match config.ssh.public_port {
            0 => addr.port(),
            port => port,
        },
        None => 22,
    };
    let https_config = HttpsConfig::new(&domain, &config.data_dir)
        .public_port(bound.public_port)
        .ssh(ssh_host, ssh_port)
        .hsts(config.https.hsts)
        .trusted_proxies(config.https.trusted_proxies.clone());
    let edge = HttpsEdge::local(
        manager.clone(),
        Arc::new(vmkit_core::StoreGateway::new(store.clone(), domain)),
        vmkit_core::WebSessions::new(store),
        certs.clone(),
        challenges,
        https_config,
    )
    .context("starting the HTTPS edge")?;
    let edge = match mailer(&config.https.smtp)? {
        Some(mailer) => edge.with_mailer(mailer),
        None => edge,
    }
    .with_api(api);
    // Custom domains' certificates follow `domain add` and `domain rm`.
    {
        let domains = vmkit_net::https::domains::DomainCerts::new(certs.clone(), acme.clone());
        let manager = manager.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            domains.run(manager, stop).await;
        });
    }
    if let Some(issuer) = acme {
        let manager = manager.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let events = move |event| {
                let manager = manager.clone();
                tokio::spawn(async move { record_certificate_event(&manager, event).await });
            };
            let stop = async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            issuer.run(events, stop).await;
        });
    }
    let mut stopping = stopping;
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        if let Err(e) = edge.serve(bound.https, bound.http, stop).await {
            error!(error = %e, "the HTTPS edge stopped");
        }
    }))
}

/// The mailer of `[https.smtp]`, `None` while its relay is empty.
fn mailer(
    smtp: &config::SmtpSection,
) -> anyhow::Result<Option<Arc<dyn vmkit_net::https::mail::Mailer>>> {
    use vmkit_net::https::mail::{SmtpConfig, SmtpMailer, SmtpTls};
    let relay = smtp.relay.trim();
    if relay.is_empty() {
        return Ok(None);
    }
    let (host, port) = relay
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .with_context(|| format!("[https.smtp] relay {relay:?}: give HOST:PORT"))?;
    if smtp.from.trim().is_empty() {
        anyhow::bail!("[https.smtp] from is empty: give the sender address of sign-in mail");
    }
    let mut config = SmtpConfig::new(host, port, smtp.from.trim());
    config.tls = match smtp.tls {
        config::SmtpTlsMode::Starttls => SmtpTls::StartTls,
        config::SmtpTlsMode::Tls => SmtpTls::Tls,
        config::SmtpTlsMode::None => SmtpTls::None,
    };
    if !smtp.username.is_empty() {
        let password = match std::env::var("VMKIT_SMTP_PASSWORD") {
            Ok(password) => password,
            Err(_) => std::fs::read_to_string(&smtp.password_file)
                .with_context(|| {
                    format!(
                        "reading [https.smtp] password_file {} (or set VMKIT_SMTP_PASSWORD)",
                        smtp.password_file.display()
                    )
                })?
                .trim_end()
                .to_owned(),
        };
        config.credentials = Some((smtp.username.clone(), password));
    }
    if !smtp.ca_root.as_os_str().is_empty() {
        config.ca_root = Some(smtp.ca_root.clone());
    }
    let mailer = SmtpMailer::new(&config).context("[https.smtp]")?;
    info!(relay, "sign-in links by email");
    Ok(Some(Arc::new(mailer)))
}

/// The ACME issuer of `[https] tls = "acme"`, with the certificates of earlier runs
/// installed.
fn acme_issuer(
    config: &Config,
    domain: &str,
    certs: &Arc<vmkit_net::https::tls::CertStore>,
    challenges: &Arc<vmkit_net::challenges::AcmeChallenges>,
) -> anyhow::Result<Arc<vmkit_net::https::acme::AcmeIssuer>> {
    use vmkit_net::https::acme::{AcmeConfig, AcmeIssuer};
    let acme = &config.https.acme;
    if config.dns.listen()?.is_none() {
        bail!(
            "[https] tls = \"acme\" gets the wildcard certificate by DNS-01, answered by \
             vmkit's own DNS server: set [dns] listen (and delegate {domain} to this host)"
        );
    }
    let secrets = match std::env::var_os("VMKIT_SECRET_KEY") {
        Some(_) => vmkit_core::SecretBox::from_env("VMKIT_SECRET_KEY")
            .context("reading the secret key from VMKIT_SECRET_KEY")?,
        None => {
            if acme.secret_key_file.starts_with(&config.data_dir) {
                bail!(
                    "[https.acme] secret_key_file = {} is inside the data directory: keep \
                     the key that seals secrets apart from them (the default is \
                     /etc/vmkit/secret.key), or set VMKIT_SECRET_KEY",
                    acme.secret_key_file.display()
                );
            }
            vmkit_core::SecretBox::from_key_file(&acme.secret_key_file).with_context(|| {
                format!(
                    "reading the secret key {} ([https.acme] secret_key_file)",
                    acme.secret_key_file.display()
                )
            })?
        }
    };
    let mut acme_config =
        AcmeConfig::new(config.data_dir.join("acme")).directory_url(&acme.directory_url);
    if !acme.contact.trim().is_empty() {
        acme_config = acme_config.contact(acme.contact.trim());
    }
    if !acme.ca_root.as_os_str().is_empty() {
        acme_config = acme_config.ca_root_pem(&acme.ca_root);
    }
    let issuer = AcmeIssuer::new(
        acme_config,
        domain,
        certs.clone(),
        challenges.clone(),
        Arc::new(secrets),
    )
    .context("starting ACME")?;
    let loaded = issuer
        .load_stored()
        .context("loading the certificates of earlier runs")?;
    info!(
        directory = %acme.directory_url,
        stored = loaded,
        "certificates from ACME"
    );
    Ok(issuer)
}

/// An ACME outcome, logged and recorded in the event log.
async fn record_certificate_event(manager: &Manager, event: vmkit_net::https::acme::AcmeEvent) {
    use vmkit_net::https::acme::AcmeEvent;
    let kind = match event {
        AcmeEvent::Issued { names, not_after } => {
            info!(names = ?names, "certificate issued");
            let ms = not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            vmkit_core::EventKind::CertificateIssued {
                names,
                expires: vmkit_core::Timestamp(ms),
            }
        }
        AcmeEvent::Failed {
            names,
            error,
            retry_in,
        } => {
            warn!(names = ?names, %error, retry_in_secs = retry_in.as_secs(), "getting a certificate failed");
            vmkit_core::EventKind::CertificateFailed {
                names,
                error,
                retry_in_secs: retry_in.as_secs(),
            }
        }
        _ => return,
    };
    manager.record_host_event(kind).await;
}

/// Starts vmkit's DNS server on `addr` (UDP and TCP); it stops when `stopping`
/// turns true.
async fn serve_dns(
    config: &Config,
    manager: &Manager,
    addr: std::net::SocketAddr,
    challenges: Arc<vmkit_net::challenges::AcmeChallenges>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use vmkit_net::dns::{DnsConfig, DnsServer};
    let dns = &config.dns;
    if dns.addresses.is_empty() {
        bail!(
            "[dns] listen is set but [dns] addresses is empty: list the host's public \
             addresses, which the domain's names resolve to"
        );
    }
    let mut dns_config = DnsConfig::new(&config.ssh.domain).addresses(dns.addresses.clone());
    if !dns.ns_host.trim().is_empty() {
        dns_config = dns_config.ns_host(dns.ns_host.trim());
    }
    for issuer in &dns.caa_issuers {
        dns_config = dns_config.caa_issuer(issuer);
    }
    let server = DnsServer::new(dns_config, manager.backends().store.clone(), challenges)
        .context("configuring the DNS server ([dns])")?;
    let udp = tokio::net::UdpSocket::bind(addr).await.with_context(|| {
        format!("binding DNS (UDP) to {addr} ([dns] listen; another port there, or listen = \"\")")
    })?;
    let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding DNS (TCP) to {addr} ([dns] listen; another port there, or listen = \"\")")
    })?;
    info!(address = %addr, "serving DNS for {}", config.ssh.domain);
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        if let Err(e) = server.serve(udp, tcp, stop).await {
            error!(error = %e, "the DNS server stopped");
        }
    }))
}

/// Starts the SSH lobby on `addr`; it stops when `stopping` turns true.
async fn serve_ssh(
    config: &Config,
    manager: &Manager,
    addr: std::net::SocketAddr,
    https_port: Option<u16>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use vmkit_net::ssh::{SshConfig, SshGateway};
    let ssh = &config.ssh;
    let host_key = config.data_dir.join(&ssh.host_key);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the SSH lobby to {addr} ([ssh] listen; another port there, or \
                 listen = \"\" to turn the lobby off)"
        )
    })?;
    let bound = listener
        .local_addr()
        .context("reading the SSH lobby's address")?;
    let public_port = match ssh.public_port {
        0 => bound.port(),
        port => port,
    };
    let gateway = Arc::new(vmkit_core::StoreGateway::new(
        manager.backends().store.clone(),
        ssh.domain.clone(),
    ));
    let mut ssh_config = match ssh.public_host.trim() {
        "" => SshConfig::new(&host_key, ssh.domain.clone()),
        host => SshConfig::new(&host_key, ssh.domain.clone()).public_host(host),
    }
    .public_port(public_port);
    if let Some(port) = https_port {
        ssh_config = ssh_config.https_port(port);
    }
    let lobby = SshGateway::new(manager.clone(), gateway, ssh_config)
        .with_context(|| format!("loading the SSH host key {}", host_key.display()))?;
    info!(address = %bound, host_key = %lobby.host_key_fingerprint(), "serving the SSH lobby");
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        if let Err(e) = lobby.serve(listener, stop).await {
            error!(error = %e, "the SSH lobby stopped");
        }
    }))
}

async fn ensure_local_user(store: &dyn StateStore) -> anyhow::Result<()> {
    if store.get_user(UserId::LOCAL).await?.is_none() {
        store.put_user(&User::local()).await?;
    }
    Ok(())
}

/// Binds the API socket with mode 0600, replacing a stale socket file but never a
/// live daemon's.
async fn bind(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another vmkit-gateway is serving {}; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("securing {}", path.display()))?;
    Ok(listener)
}

/// The VMM poll, a safety net under the events `Manager::supervise` reacts to,
/// runs every this many agent checks.
const VMM_POLL_TICKS: u32 = 10;

/// Reacts to what VMMs report as it happens (`Manager::supervise`: a guest reboot
/// keeps its VM running and configures it again, a power-off or panic stops it),
/// restarts VMs whose VMM died under `on_vmm_exit = "restart"`, checks the agents
/// every `every` (an agent that stopped answering or broke the protocol marks its VM
/// unhealthy) and polls the VMMs every [`VMM_POLL_TICKS`] of those. A failure of one
/// VM stays with that VM.
async fn monitor(manager: Manager, every: Duration, agent_timeout: Duration) {
    let (died_tx, mut died) = tokio::sync::mpsc::unbounded_channel();
    let supervisor = manager.clone();
    let _supervising = AbortOnDrop(tokio::spawn(
        async move { supervisor.supervise(died_tx).await },
    ));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut restarts = Restarts::default();
    let mut ticks: u32 = 0;
    loop {
        let died_now = tokio::select! {
            Some(name) = died.recv() => vec![name],
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                let died_now = if ticks % VMM_POLL_TICKS == 1 {
                    match manager.check_vmms().await {
                        Ok(died) => died,
                        Err(e) => {
                            warn!(error = %ErrorChain(&e), "VMM check failed");
                            Vec::new()
                        }
                    }
                } else {
                    Vec::new()
                };
                // VMMs that could not be re-attached at start: again, or proven dead.
                manager.retry_unreachable().await;
                if let Err(e) = manager.check_agents(agent_timeout).await {
                    warn!(error = %ErrorChain(&e), "agent check failed");
                }
                died_now
            }
        };
        if manager.config().on_vmm_exit != vmkit_core::ExitPolicy::Restart {
            continue;
        }
        for name in died_now {
            if !restarts.allow(&name, std::time::Instant::now()) {
                error!(
                    vm = %name,
                    "its VMM died {RESTART_LIMIT} times within {RESTART_WINDOW:?}; left \
                     stopped (see `vmkit vm logs`, then start it)"
                );
                continue;
            }
            spawn_restart(&manager, name);
        }
    }
}

/// Aborts a task when dropped (the monitor's supervisor with the monitor).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Boots `name`, whose VMM died, again in the background (under
/// `on_vmm_exit = "restart"`).
fn spawn_restart(manager: &Manager, name: vmkit_core::VmName) {
    let manager = manager.clone();
    tokio::spawn(async move {
        match manager.start(&name).await {
            Ok(_) => info!(vm = %name, "restarted after its VMM died"),
            Err(e) => warn!(vm = %name, error = %ErrorChain(&e), "cannot restart"),
        }
    });
}

/// Most restarts of one VM within [`RESTART_WINDOW`] under `on_vmm_exit = "restart"`;
/// a VM whose VMM keeps dying is then left stopped rather than restarted forever.
const RESTART_LIMIT: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(600);

/// Recent automatic restarts per VM.
#[derive(Default)]
struct Restarts(std::collections::HashMap<vmkit_core::VmName, Vec<std::time::Instant>>);

impl Restarts {
    /// Whether `vm` may be restarted `now`; records the restart when it may.
    fn allow(&mut self, vm: &vmkit_core::VmName, now: std::time::Instant) -> bool {
        let recent = self.0.entry(vm.clone()).or_default();
        recent.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if recent.len() >= RESTART_LIMIT {
            return false;
        }
        recent.push(now);
        true
    }
}

/// Resolves at the first SIGTERM or SIGINT; the handlers are installed at once.
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
    use super::*;

    #[test]
    fn a_vm_that_keeps_dying_is_restarted_a_bounded_number_of_times() {
        let mut restarts = Restarts::default();
        let vm: vmkit_core::VmName = "web".parse().unwrap();
        let other: vmkit_core::VmName = "db".parse().unwrap();
        let t0 = std::time::Instant::now();
        for i in 0..RESTART_LIMIT {
            assert!(restarts.allow(&vm, t0 + Duration::from_secs(i as u64)));
        }
        assert!(
            !restarts.allow(&vm, t0 + Duration::from_secs(60)),
            "limit reached"
        );
        assert!(
            restarts.allow(&other, t0 + Duration::from_secs(60)),
            "per VM"
        );
        assert!(
            restarts.allow(&vm, t0 + RESTART_WINDOW + Duration::from_secs(1)),
            "restarts older than the window no longer count"
        );
    }
}
