//! The HTTPS edge (feature `https`): `https://NAME.domain` reaches the web server in
//! a VM, private to its owner until they share it.
//!
//! [`HttpsEdge`] serves HTTPS (HTTP/2 and HTTP/1.1 by ALPN, on hyper and rustls) and,
//! on a second listener, plain HTTP that only redirects to HTTPS and answers ACME
//! HTTP-01 challenges. Hosts:
//!
//! | host | reaches |
//! | --- | --- |
//! | `domain` (the apex) | sign-in (`/__vmkit/login`), sign-out, the JWKS at `/.well-known/jwks.json` |
//! | `NAME.domain` | the VM's default web port (80, or what `share port` set) |
//! | `NAME--PORT.domain` | port `PORT` of the VM (one wildcard certificate covers every port) |
//!
//! **Access.** Each request is decided by the [`Gateway`](vmkit_core::Gateway): routed to a VM with the
//! shares of that port, and authorized for [`Action::UseHttp`](vmkit_core::Action)
//! for the caller. The caller is the user of the session cookie (`__Host-vmkit`, a
//! host-only cookie checked against a server-side record:
//! [`WebSessions`](vmkit_core::WebSessions)), else someone holding a share link
//! (`?share=TOKEN`, kept in a host-only cookie; used while signed in, the link becomes
//! a lasting share with that user), else anonymous (public ports). A request refused
//! without a session is sent to sign in on the apex, which hands a single-use ticket
//! back to the VM host (`/__vmkit/ticket`), where it becomes that host's cookie; a
//! request carrying `Authorization` gets `401` instead. Signed in but not allowed is
//! `404`, as a VM that does not exist. The path prefix `/__vmkit/` on every VM host is
//! the edge's own and never forwarded.
//!
//! **What the VM sees.** `X-Forwarded-For` is the real peer (a client's own value is
//! kept only from a trusted proxy), `X-Forwarded-Proto: https`, `X-Forwarded-Host`;
//! for a signed-in visitor `X-Vmkit-User-Id`, `X-Vmkit-User`, `X-Vmkit-Email` (when
//! known) and `X-Vmkit-Assertion`, a JWT (ES256) for that host, valid five minutes,
//! whose key is published at `https://domain/.well-known/jwks.json`. Every
//! `X-Vmkit-*` header a client sends and the edge's own cookies are removed first;
//! `Domain=` is removed from cookies the VM sets.
//!
//! **A real proxy.** Bodies stream both ways, never buffered whole; WebSockets and
//! other HTTP/1.1 upgrades are spliced through; request heads are bounded
//! ([`HttpsConfig::max_header_bytes`]) and timed ([`HttpsConfig::header_timeout`]);
//! a connection without traffic is closed ([`HttpsConfig::idle_timeout`]);
//! HTTP/1.1 requests ambiguous about their length (`Content-Length` with
//! `Transfer-Encoding`, two `Content-Length`s, a `Transfer-Encoding` other than
//! `chunked`) are refused with `400` before they reach the VM. The owner of a VM that
//! answers nothing on the port gets a page that says what to do; others a plain
//! `502`. A stopped VM is started by its owner's request.
//!
//! **Where it asks.** The edge asks an [`EdgeBackend`]: in the daemon's process a
//! [`LocalBackend`] ([`HttpsEdge::local`]); in a process of its own (`vmkit-proxy`)
//! a [`DaemonBackend`], which asks the daemon over its Unix socket.
//!
//! **Certificates** come from a [`tls::CertStore`]: the local CA
//! (`tls = "self-signed"`, [`tls::LocalCa`]) or ACME, replaced while serving.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(manager: vmkit_core::Manager, store: std::sync::Arc<dyn vmkit_core::StateStore>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vmkit_core::{StoreGateway, WebSessions};
//! use vmkit_net::challenges::AcmeChallenges;
//! use vmkit_net::https::tls::{CertStore, LocalCa};
//! use vmkit_net::https::{HttpsConfig, HttpsEdge};
//!
//! let data = std::path::Path::new("/var/lib/vmkit");
//! let domain = "vm.example.com";
//! let certs = CertStore::new(domain, Some(LocalCa::load_or_create(data)?))?;
//! let edge = HttpsEdge::local(
//!     manager,
//!     Arc::new(StoreGateway::new(store.clone(), domain)),
//!     WebSessions::new(store),
//!     certs,
//!     Arc::new(AcmeChallenges::new()),
//!     HttpsConfig::new(domain, data).ssh(domain, 2222),
//! )?;
//! let https = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
//! let http = tokio::net::TcpListener::bind("0.0.0.0:80").await?;
//! edge.serve(https, Some(http), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```

pub mod acme;
mod auth;
pub mod backend;
pub mod domains;
mod edge;
mod idle;
pub mod mail;
mod pages;
mod strict;
pub mod tls;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use auth::{ASSERTION_TTL, Identity, JWT_KEY_FILE, SESSION_COOKIE, SHARE_COOKIE};
pub use backend::{DaemonBackend, EdgeBackend, LocalBackend};
pub use edge::{ApexApi, ApiBody, HttpsEdge};

/// The path prefix on every host that belongs to the edge.
pub const RESERVED_PREFIX: &str = "/__vmkit/";

/// Errors of the HTTPS edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsError {
    /// Making, reading or using a certificate or key failed.
    #[error("{what}")]
    Certificate {
        /// What went wrong.
        what: String,
    },
    /// Reading or writing a file, or a listener, failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How the HTTPS edge runs. Start from [`HttpsConfig::new`] and set what differs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HttpsConfig {
    /// The domain VMs are reached under; its apex serves sign-in.
    pub domain: String,
    /// Where the edge keeps its keys (the assertion signing key).
    pub data_dir: PathBuf,
    /// The HTTPS port clients dial, for the URLs the edge writes; 443 when `None`.
    pub public_port: Option<u16>,
    /// The SSH gateway's host as users dial it, for the pages that tell them to
    /// sign in (`ssh HOST browser`); the domain unless set.
    pub ssh_host: String,
    /// The SSH gateway's port, when not 22.
    pub ssh_port: Option<u16>,
    /// Sends `Strict-Transport-Security` (a year, with subdomains). Never for a
    /// `localhost` domain: a browser would then upgrade every `http://*.localhost`
    /// development server of its user.
    pub hsts: bool,
    /// Peers whose `X-Forwarded-For` is kept (a load balancer in front); from anyone
    /// else it is replaced by the peer's address.
    pub trusted_proxies: Vec<IpAddr>,
    /// Time for a TLS handshake, and for a request's head to arrive (10 s).
    pub header_timeout: Duration,
    /// A request head larger than this is refused (64 KiB).
    pub max_header_bytes: usize,
    /// A connection on which no byte moved for this long is closed (5 minutes):
    /// idle HTTP/2 connections and WebSockets (an idle HTTP/1.1 connection is
    /// closed after [`HttpsConfig::header_timeout`]).
    pub idle_timeout: Duration,
    /// Time to connect to the VM's port (5 s).
    pub connect_timeout: Duration,
    /// Time a stopped VM has to start when its owner's request wakes it (180 s).
    pub wake_timeout: Duration,
    /// Connections open at once from one address (256).
    pub max_connections_per_ip: usize,
}

impl HttpsConfig {
    /// The defaults, serving `domain` with keys kept in `data_dir`.
    pub fn new(domain: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        let domain = domain.into().trim_matches('.').to_ascii_lowercase();
        Self {
            ssh_host: domain.clone(),
            ssh_port: None,
            domain,
            data_dir: data_dir.into(),
            public_port: None,
            hsts: true,
            trusted_proxies: Vec::new(),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            wake_timeout: Duration::from_secs(180),
            max_connections_per_ip: 256,
        }
    }

    /// Sets the HTTPS port clients dial.
    pub fn public_port(mut self, port: u16) -> Self {
        self.public_port = Some(port).filter(|p| *p != 443);
        self
    }

    /// Sets the SSH gateway's host and port the pages show.
    pub fn ssh(mut self, host: impl Into<String>, port: u16) -> Self {
        self.ssh_host = host.into();
        self.ssh_port = Some(port).filter(|p| *p != 22);
        self
    }

    /// The command that reaches the lobby, or as `user@` a VM.
    pub fn ssh_command(&self, user: Option<&str>) -> String {
        let port = self
            .ssh_port
            .map(|p| format!("-p {p} "))
            .unwrap_or_default();
        let user = user.map(|u| format!("{u}@")).unwrap_or_default();
        format!("ssh {port}{user}{}", self.ssh_host)
    }

    /// Sets whether to send HSTS.
    pub fn hsts(mut self, on: bool) -> Self {
        self.hsts = on;
        self
    }

    /// Sets the proxies whose `X-Forwarded-For` is kept.
    pub fn trusted_proxies(mut self, proxies: Vec<IpAddr>) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Sets the time for a handshake and a request head.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// Sets the largest request head.
    pub fn max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = bytes;
        self
    }

    /// Sets the time after which a connection without traffic is closed.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the time to connect to a VM.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the time a woken VM has to start.
    pub fn wake_timeout(mut self, timeout: Duration) -> Self {
        self.wake_timeout = timeout;
        self
    }

    /// Sets the connections allowed at once from one address.
    pub fn max_connections_per_ip(mut self, connections: usize) -> Self {
        self.max_connections_per_ip = connections;
        self
    }

    /// Whether responses carry `Strict-Transport-Security`.
    pub fn sends_hsts(&self) -> bool {
        self.hsts && self.domain != "localhost" && !self.domain.ends_with(".localhost")
    }

    /// `https://host[:port]`, as clients reach `host`.
    pub fn origin(&self, host: &str) -> String {
        match self.public_port {
            Some(port) => format!("https://{host}:{port}"),
            None => format!("https://{host}"),
        }
    }

    /// The URL of a VM's default web port.
    pub fn vm_url(&self, name: &str) -> String {
        format!("{}/", self.origin(&format!("{name}.{}", self.domain)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsts_is_never_sent_for_a_localhost_domain() {
        assert!(HttpsConfig::new("vm.example.com", "/tmp").sends_hsts());
        assert!(
            !HttpsConfig::new("vm.example.com", "/tmp")
                .hsts(false)
                .sends_hsts()
        );
        assert!(!HttpsConfig::new("localhost", "/tmp").sends_hsts());
        assert!(!HttpsConfig::new("dev.localhost", "/tmp").sends_hsts());
    }

    #[test]
    fn urls_leave_out_port_443() {
        let c = HttpsConfig::new("vm.test", "/tmp").public_port(443);
        assert_eq!(c.vm_url("web"), "https://web.vm.test/");
        let c = c.public_port(8443);
        assert_eq!(c.vm_url("web"), "https://web.vm.test:8443/");
        assert_eq!(
            c.ssh("vm.test", 2222).ssh_command(Some("web")),
            "ssh -p 2222 web@vm.test"
        );
    }
}
