//! The SSH gateway's lobby (feature `ssh`): `ssh HOST CMD` manages the caller's VMs.
//!
//! [`SshGateway`] serves SSH on a listener with [russh]. A client signs in with a
//! public key only (no password, no keyboard-interactive): every key it offers is
//! asked about, and the first one the [`Gateway`] identifies
//! ([`Credential::SshKey`](vmkit_core::Credential::SshKey) through [`Door::Ssh`](vmkit_core::Door::Ssh))
//! signs it in, once the client proved it holds the key. What happens to a key
//! nobody registered follows the manager's registration policy
//! ([`ManagerConfig::registration`](vmkit_core::ManagerConfig::registration)):
//! - `closed`: it is refused; the pre-authentication banner says how to get access
//!   (the operator adds the key: `vmkit user add HANDLE --key FILE`).
//! - `open` and `invite`: once every other key the client holds was tried (a
//!   registered one wins), it signs in to a session where only `register HANDLE
//!   [--email E]`, `help` and `whoami` work, and `register` registers that key.
//!   Under `invite` the code is the SSH user name: `ssh vmi_CODE@HOST register
//!   HANDLE`.
//!
//! Once in, `ssh HOST CMD ARGS` runs one lobby command through
//! [`Manager::commands`] for the caller and exits with its status; `ssh -t HOST` gets
//! a prompt (`vmkit> `) with line editing, history and tab completion of commands
//! and VM names (the `line` module; without a pty the prompt reads plain lines and
//! echoes nothing). Commands run in tasks of their own, never inside a russh
//! callback, so a long one (a create) neither stalls the connection nor is cut short
//! when the client hangs up.
//!
//! Only modern algorithms are offered: `curve25519-sha256` key exchange (with
//! OpenSSH's strict-kex extension), an `ssh-ed25519` host key, `chacha20-poly1305`
//! and AES-GCM ciphers; nothing with SHA-1, CBC or finite-field Diffie-Hellman.
//!
//! Limits: [`SshConfig::max_auth_attempts`] failed sign-ins per connection,
//! [`SshConfig::auth_timeout`] to sign in, [`SshConfig::max_connections_per_ip`]
//! connections open at once from one address, [`SshConfig::max_channels`] channels
//! open at once on one connection. Nothing a client sends grows without bound: the
//! banner line and packets are bounded by russh, a prompt's line and history by the
//! line editor, a command's stdin by 16 KiB. What a command does not read is
//! dropped as it comes, and so is what is typed at the prompt beyond 64 KiB not yet
//! taken (while a command runs, say), so that a client sending faster than the
//! gateway reads never stalls its own connection.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(manager: vmkit_core::Manager, store: std::sync::Arc<dyn vmkit_core::StateStore>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vmkit_core::StoreGateway;
//! use vmkit_net::ssh::{SshConfig, SshGateway};
//!
//! let gateway = Arc::new(StoreGateway::new(store, "vm.example.com"));
//! let config = SshConfig::new("/var/lib/vmkit/ssh_host_ed25519_key", "vm.example.com");
//! let lobby = SshGateway::new(manager, gateway, config)?;
//! println!("host key {}", lobby.host_key_fingerprint());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:2222").await?;
//! lobby
//!     .serve(listener, async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod host_key;
mod line;
pub mod lobby;
mod relay;
mod server;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vmkit_core::{Gateway, Manager};

/// Errors of the SSH gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The host key file is not a key the gateway can use.
    #[error("the SSH host key {path} cannot be used: {reason}")]
    HostKey {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading or writing a file, or the listener, failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How the SSH gateway runs. Start from [`SshConfig::new`] and set what differs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SshConfig {
    /// Where the ed25519 host key is kept; made there (mode 0600) on first start.
    pub host_key_path: PathBuf,
    /// The domain VMs are reached under, for the commands and URLs the lobby prints.
    pub domain: String,
    /// The port clients dial, for the commands the lobby prints; the listener's
    /// port when `None`.
    pub public_port: Option<u16>,
    /// The gateway's host name as clients dial it, for the commands the lobby
    /// prints (`ssh NAME@HOST`, the `ProxyJump` of `ssh-config`); the domain
    /// unless set.
    pub public_host: String,
    /// Channels a connection may have open at once (64); more are refused.
    pub max_channels: usize,
    /// Failed sign-in attempts allowed per connection (6).
    pub max_auth_attempts: usize,
    /// Time a client has to sign in (30 s).
    pub auth_timeout: Duration,
    /// Connections open at once from one source address (32).
    pub max_connections_per_ip: usize,
    /// A signed-in connection with no traffic for this long is closed (1 hour).
    pub inactivity_timeout: Duration,
    /// The port of the HTTPS edge as clients dial it, for the URLs the lobby
    /// prints (`new`, `share ... link`, `browser`); `None` when no HTTPS edge
    /// serves the domain (`browser` then says so; URLs are printed for 443).
    pub https_port: Option<u16>,
}

impl SshConfig {
    /// The defaults, with the host key at `host_key_path` and VMs under `domain`.
    pub fn new(host_key_path: impl Into<PathBuf>, domain: impl Into<String>) -> Self {
        let domain = domain.into().trim_matches('.').to_ascii_lowercase();
        Self {
            host_key_path: host_key_path.into(),
            public_host: domain.clone(),
            domain,
            public_port: None,
            max_channels: 64,
            max_auth_attempts: 6,
            auth_timeout: Duration::from_secs(30),
            max_connections_per_ip: 32,
            inactivity_timeout: Duration::from_secs(3600),
            https_port: None,
        }
    }

    /// Sets the HTTPS edge's port as clients dial it.
    pub fn https_port(mut self, port: u16) -> Self {
        self.https_port = Some(port);
        self
    }

    /// Sets the port clients dial.
    pub fn public_port(mut self, port: u16) -> Self {
        self.public_port = Some(port);
        self
    }

    /// Sets the gateway's host name as clients dial it.
    pub fn public_host(mut self, host: impl Into<String>) -> Self {
        self.public_host = host.into();
        self
    }

    /// Sets the channels a connection may have open at once.
    pub fn max_channels(mut self, channels: usize) -> Self {
        self.max_channels = channels;
        self
    }

    /// Sets the failed sign-in attempts allowed per connection.
    pub fn max_auth_attempts(mut self, attempts: usize) -> Self {
        self.max_auth_attempts = attempts;
        self
    }

    /// Sets the time a client has to sign in.
    pub fn auth_timeout(mut self, timeout: Duration) -> Self {
        self.auth_timeout = timeout;
        self
    }

    /// Sets the connections allowed at once from one address.
    pub fn max_connections_per_ip(mut self, connections: usize) -> Self {
        self.max_connections_per_ip = connections;
        self
    }

    /// Sets the idle time after which a connection is closed.
    pub fn inactivity_timeout(mut self, timeout: Duration) -> Self {
        self.inactivity_timeout = timeout;
        self
    }
}

/// The SSH gateway: the lobby over a [`Manager`], with a [`Gateway`] to identify
/// callers.
pub struct SshGateway {
    manager: Manager,
    gateway: Arc<dyn Gateway>,
    config: SshConfig,
    host_key: russh::keys::PrivateKey,
}

impl std::fmt::Debug for SshGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshGateway")
            .field("config", &self.config)
            .field("host_key", &self.host_key_fingerprint())
            .finish_non_exhaustive()
    }
}

impl SshGateway {
    /// A gateway serving `manager`'s lobby; loads the host key, or makes it on the
    /// first start.
    pub fn new(
        manager: Manager,
        gateway: Arc<dyn Gateway>,
        config: SshConfig,
    ) -> Result<Self, SshError> {
        let host_key = host_key::load_or_create(&config.host_key_path)?;
        Ok(Self {
            manager,
            gateway,
            config,
            host_key,
        })
    }

    /// The host key's SHA-256 fingerprint, as `ssh` prints it (`SHA256:...`).
    pub fn host_key_fingerprint(&self) -> String {
        self.host_key
            .public_key()
            .fingerprint(russh::keys::HashAlg::Sha256)
            .to_string()
    }

    /// The host key's public half as an OpenSSH line (`ssh-ed25519 AAAA...`), for a
    /// `known_hosts` entry.
    pub fn host_public_key(&self) -> String {
        self.host_key
            .public_key()
            .to_openssh()
            .unwrap_or_else(|e| format!("(cannot encode the host key: {e})"))
    }

    /// Serves connections from `listener` until `shutdown` completes; then closes
    /// the connections still open (commands they started run to their end).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SshError> {
        server::serve(self, listener, shutdown).await
    }
}
