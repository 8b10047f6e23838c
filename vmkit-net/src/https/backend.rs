//! The edge's seam to vmkit: what the HTTPS edge asks, and two ways to answer.
//!
//! [`HttpsEdge`](super::HttpsEdge) decides nothing about users or VMs itself; it asks
//! an [`EdgeBackend`]:
//!
//! - [`LocalBackend`] answers in the same process, over a [`Manager`], a [`Gateway`]
//!   and [`WebSessions`] (the daemon's own edge);
//! - [`DaemonBackend`] asks the daemon over its Unix socket (`vmkit-proxy`, the edge
//!   as a process of its own: only the daemon may open the state file).
//!
//! The edge hands a backend what the client *presented* ([`Presented`]: a session
//! cookie, a share link), never a user it made up; a backend identifies it itself,
//! and [`DaemonBackend`] sends the credential again with every question, so that the
//! daemon identifies the caller each time and a forged credential identifies nobody.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use vmkit_core::{
    Action, Caller, Credential, Door, Gateway, Manager, RouteTarget, Routed, Upstream, UserId,
    WebSessions,
};

use super::auth::Identity;

/// A byte stream both ways, such as a connection to a guest's port.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A connection to a port on a guest's loopback, through its agent.
pub type GuestStream = Box<dyn Duplex>;

/// What a client presented to the edge, for a backend to identify.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Presented {
    /// Nothing: an anonymous visitor.
    Nobody,
    /// A web session cookie: on the apex when `host` is `None`, else on that VM
    /// host.
    Session {
        /// The cookie's value.
        secret: String,
        /// The VM host the cookie came to.
        host: Option<String>,
    },
    /// A share link's secret (`vms_...`), from the URL or its cookie.
    ShareLink {
        /// The link's secret.
        link: String,
    },
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are never printed.
        match self {
            Self::Nobody => f.write_str("Nobody"),
            Self::Session { host, .. } => f
                .debug_struct("Session")
                .field("host", host)
                .finish_non_exhaustive(),
            Self::ShareLink { .. } => f.debug_struct("ShareLink").finish_non_exhaustive(),
        }
    }
}

/// A caller as a backend identified them: the credential they presented (which
/// [`DaemonBackend`] presents again) and who it is.
#[derive(Clone, Debug)]
pub struct EdgeCaller {
    presented: Presented,
    caller: Caller,
}

impl EdgeCaller {
    /// Someone who presented nothing.
    pub fn anonymous() -> Self {
        Self {
            presented: Presented::Nobody,
            caller: Caller::anonymous(Door::Https),
        }
    }

    /// `presented`, identified as `caller` (for backends).
    pub fn new(presented: Presented, caller: Caller) -> Self {
        Self { presented, caller }
    }

    /// What they presented.
    pub fn presented(&self) -> &Presented {
        &self.presented
    }

    /// Who they are.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Whether they are a signed-in user (not a link holder, not anonymous).
    pub fn signed_in(&self) -> bool {
        self.caller.owner().is_some()
    }
}

/// Where an HTTP host goes: what the edge needs of a [`Routed`], and the host and
/// port it was routed from.
#[derive(Clone, Debug)]
pub struct EdgeRoute {
    /// Where the traffic goes.
    pub upstream: Upstream,
    /// The VM's owner.
    pub owner: UserId,
    host: String,
    port: Option<u16>,
    routed: Option<Routed>,
}

impl EdgeRoute {
    /// `host` and `port` routed to `upstream` of a VM of `owner` (for backends that
    /// decide elsewhere).
    pub fn new(host: &str, port: Option<u16>, upstream: Upstream, owner: UserId) -> Self {
        Self {
            upstream,
            owner,
            host: host.to_owned(),
            port,
            routed: None,
        }
    }

    /// `host` and `port` routed to `routed`, kept for the policy to decide on.
    pub fn from_routed(host: &str, port: Option<u16>, routed: Routed) -> Self {
        Self {
            upstream: routed.upstream.clone(),
            owner: routed.vm.owner,
            host: host.to_owned(),
            port,
            routed: Some(routed),
        }
    }

    /// The host that was routed.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port of the URL that was routed, `None` for the default.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The route's answer with the VM and its shares, when the backend kept it.
    pub fn routed(&self) -> Option<&Routed> {
        self.routed.as_ref()
    }

    /// What identifies this route to a backend that routes again.
    pub fn target(&self) -> wire::RouteRef {
        wire::RouteRef {
            host: self.host.clone(),
            port: self.port,
            vm: self.upstream.vm.to_string(),
        }
    }
}

/// Errors of an [`EdgeBackend`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The daemon's socket cannot be reached.
    #[error("cannot reach the vmkit daemon at {socket}")]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused or failed a question.
    #[error("the vmkit daemon answered {status}: {message}")]
    Daemon {
        /// The HTTP status.
        status: u16,
        /// What it said.
        message: String,
    },
    /// Talking to the daemon failed half-way, or it answered what cannot be read.
    #[error("talking to the vmkit daemon failed: {0}")]
    Protocol(String),
    /// The operation failed in this process.
    #[error("{0}")]
    Failed(String),
}

impl BackendError {
    /// What the owner of a VM is told when waking it failed.
    pub fn message(&self) -> String {
        match self {
            Self::Daemon { message, .. } | Self::Failed(message) => message.clone(),
            other => other.to_string(),
        }
    }
}

/// What the HTTPS edge asks of vmkit. Every method that acts for a caller takes the
/// [`EdgeCaller`] the backend identified, whose credential a remote backend presents
/// again: the answer is always for who the credential identifies.
#[async_trait]
pub trait EdgeBackend: Send + Sync {
    /// Who `presented` identifies; `None` when it identifies nobody (an unknown or
    /// expired session, a session of another host).
    async fn identify(&self, presented: &Presented) -> Result<Option<EdgeCaller>, BackendError>;

    /// Where an HTTP request for `host` (on the URL's `port`) goes; `None` when the
    /// host names no VM.
    async fn route(&self, host: &str, port: Option<u16>)
    -> Result<Option<EdgeRoute>, BackendError>;

    /// Whether `caller` may take `action` on what was routed, by vmkit's policy.
    async fn authorize(
        &self,
        caller: &EdgeCaller,
        action: Action,
        route: &EdgeRoute,
    ) -> Result<bool, BackendError>;

    /// Makes share link `link` of the routed VM a lasting share with the signed-in
    /// `caller`.
    async fn accept_share_link(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
        link: &str,
    ) -> Result<(), BackendError>;

    /// Starts the routed VM, stopped, for a caller who may start it, and routes
    /// again; `None` when the caller may not, the VM is in no state to start, or
    /// it did not start in time.
    async fn wake(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
    ) -> Result<Option<EdgeRoute>, BackendError>;

    /// A connection to `port` on the routed VM's loopback, through its agent, for
    /// a caller allowed to use the VM's web ports.
    async fn connect(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
        port: u16,
    ) -> Result<GuestStream, BackendError>;

    /// The signed-in user `caller` is, as the VM is told; `None` for others.
    async fn identity(&self, caller: &EdgeCaller) -> Result<Option<Identity>, BackendError>;

    /// Redeems a sign-in link (once): a new apex session's secret and its user;
    /// `None` when the link is unknown, used or expired.
    async fn redeem_sign_in_link(
        &self,
        token: &str,
    ) -> Result<Option<(String, Identity)>, BackendError>;

    /// A single-use ticket for VM host `host`, from apex session `session`; `None`
    /// when the session is not valid.
    async fn host_ticket(&self, session: &str, host: &str) -> Result<Option<String>, BackendError>;

    /// Redeems a ticket on `host`: a new session of that host; `None` when the
    /// ticket is unknown, used, expired or for another host.
    async fn redeem_host_ticket(
        &self,
        ticket: &str,
        host: &str,
    ) -> Result<Option<String>, BackendError>;

    /// The user of apex session `session`; `None` when it is not valid.
    async fn session_user(&self, session: &str) -> Result<Option<Identity>, BackendError>;

    /// Ends session `session`, or every session of its user when `everywhere`.
    async fn sign_out(&self, session: &str, everywhere: bool) -> Result<(), BackendError>;

    /// Removes expired sessions, links and tickets; how many.
    async fn purge_expired(&self) -> Result<usize, BackendError>;

    /// A one-time sign-in link's secret for the active user with email `email`, to
    /// be mailed to that address; `None` when no active user has it.
    async fn email_sign_in_link(&self, email: &str) -> Result<Option<String>, BackendError>;

    /// The custom domains attached to VMs (`domain add`), which the edge certifies.
    async fn custom_domains(&self) -> Result<Vec<String>, BackendError>;

    /// How long a web session lasts (its cookie's `Max-Age`).
    fn session_lifetime(&self) -> Duration;
}

// ---- in-process ----

/// The backend of an edge in the daemon's own process.
#[derive(Clone)]
pub struct LocalBackend {
    manager: Manager,
    gateway: Arc<dyn Gateway>,
    sessions: WebSessions,
    wake_timeout: Duration,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("wake_timeout", &self.wake_timeout)
            .finish_non_exhaustive()
    }
}

impl LocalBackend {
    /// Answers over `manager`, deciding with `gateway`, sessions in `sessions`; a
    /// woken VM has 180 s to start.
    pub fn new(manager: Manager, gateway: Arc<dyn Gateway>, sessions: WebSessions) -> Self {
        Self {
            manager,
            gateway,
            sessions,
            wake_timeout: Duration::from_secs(180),
        }
    }

    /// Sets the time a woken VM has to start.
    pub fn wake_timeout(mut self, timeout: Duration) -> Self {
        self.wake_timeout = timeout;
        self
    }

    /// `route`'s [`Routed`], or a fresh route of its host when it has none (it came
    /// from elsewhere); `None` when the host now goes to another VM, or none.
    async fn routed(&self, route: &EdgeRoute) -> Result<Option<Routed>, BackendError> {
        if let Some(routed) = route.routed() {
            return Ok(Some(routed.clone()));
        }
        let again = self.route(route.host(), route.port()).await?;
        Ok(again
            .and_then(|r| r.routed)
            .filter(|r| r.upstream.vm == route.upstream.vm))
    }
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

fn identity_of(user: &vmkit_core::User) -> Identity {
    Identity {
        id: user.id.0,
        handle: user.handle.as_str().to_owned(),
        email: user.email.clone(),
    }
}

#[async_trait]
impl EdgeBackend for LocalBackend {
    async fn identify(&self, presented: &Presented) -> Result<Option<EdgeCaller>, BackendError> {
        let credential = match presented {
            Presented::Nobody => return Ok(Some(EdgeCaller::anonymous())),
            Presented::Session { secret, host } => Credential::WebSession {
                secret,
                host: host.as_deref(),
            },
            Presented::ShareLink { link } => Credential::ShareLink(link),
        };
        let caller = self
            .gateway
            .identify(credential, Door::Https)
            .await
            .map_err(failed)?;
        Ok(caller.map(|c| EdgeCaller::new(presented.clone(), c)))
    }

    async fn route(
        &self,
        host: &str,
        port: Option<u16>,
    ) -> Result<Option<EdgeRoute>, BackendError> {
        let routed = self
            .gateway
            .route(RouteTarget::Http { host, port })
            .await
            .map_err(failed)?;
        Ok(routed.map(|r| EdgeRoute::from_routed(host, port, r)))
    }

    async fn authorize(
        &self,
        caller: &EdgeCaller,
        action: Action,
        route: &EdgeRoute,
    ) -> Result<bool, BackendError> {
        let Some(routed) = self.routed(route).await? else {
            return Ok(false);
        };
        Ok(self
            .gateway
            .authorize(caller.caller(), action, &routed)
            .is_ok())
    }

    async fn accept_share_link(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
        link: &str,
    ) -> Result<(), BackendError> {
        self.manager
            .commands(caller.caller().clone())
            .accept_share_link(&route.upstream.name, link)
            .await
            .map(|_| ())
            .map_err(failed)
    }

    async fn wake(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
    ) -> Result<Option<EdgeRoute>, BackendError> {
        let Some(routed) = self.routed(route).await? else {
            return Ok(None);
        };
        if self
            .gateway
            .authorize(caller.caller(), Action::Start, &routed)
            .is_err()
        {
            return Ok(None);
        }
        let name = routed.upstream.name.clone();
        let commands = self.manager.commands(caller.caller().clone());
        let view = commands.get(&name).await.map_err(failed)?;
        if view.state != vmkit_core::VmState::Stopped {
            return Ok(None);
        }
        tracing::info!(vm = %name, "a request of its owner wakes the VM");
        match tokio::time::timeout(self.wake_timeout, commands.start(&name)).await {
            Ok(result) => {
                result.map_err(failed)?;
            }
            Err(_) => return Ok(None),
        }
        let mut again = self.route(route.host(), route.port()).await?;
        if let Some(r) = &mut again {
            r.upstream.port = routed.upstream.port;
            if let Some(kept) = &mut r.routed {
                kept.upstream.port = routed.upstream.port;
            }
        }
        Ok(again.filter(|r| r.upstream.running && r.upstream.vm == routed.upstream.vm))
    }

    async fn connect(
        &self,
        _caller: &EdgeCaller,
        route: &EdgeRoute,
        port: u16,
    ) -> Result<GuestStream, BackendError> {
        let stream = self
            .manager
            .connect_guest_port(&route.upstream.name, port)
            .await
            .map_err(failed)?;
        Ok(Box::new(stream))
    }

    async fn identity(&self, caller: &EdgeCaller) -> Result<Option<Identity>, BackendError> {
        if !caller.signed_in() {
            return Ok(None);
        }
        let whoami = self
            .manager
            .commands(caller.caller().clone())
            .whoami()
            .await
            .map_err(failed)?;
        Ok(whoami.user.as_ref().map(identity_of))
    }

    async fn redeem_sign_in_link(
        &self,
        token: &str,
    ) -> Result<Option<(String, Identity)>, BackendError> {
        let redeemed = self
            .sessions
            .redeem_sign_in_link(token)
            .await
            .map_err(failed)?;
        Ok(redeemed.map(|(secret, user)| (secret, identity_of(&user))))
    }

    async fn host_ticket(&self, session: &str, host: &str) -> Result<Option<String>, BackendError> {
        self.sessions
            .host_ticket(session, host)
            .await
            .map_err(failed)
    }

    async fn redeem_host_ticket(
        &self,
        ticket: &str,
        host: &str,
    ) -> Result<Option<String>, BackendError> {
        self.sessions
            .redeem_host_ticket(ticket, host)
            .await
            .map_err(failed)
    }

    async fn session_user(&self, session: &str) -> Result<Option<Identity>, BackendError> {
        let user = self.sessions.user(session, None).await.map_err(failed)?;
        Ok(user.as_ref().map(identity_of))
    }

    async fn sign_out(&self, session: &str, everywhere: bool) -> Result<(), BackendError> {
        if !everywhere {
            return self
                .sessions
                .sign_out(session)
                .await
                .map(|_| ())
                .map_err(failed);
        }
        match self.sessions.user(session, None).await.map_err(failed)? {
            Some(user) => self
                .sessions
                .sign_out_everywhere(user.id)
                .await
                .map(|_| ())
                .map_err(failed),
            None => Ok(()),
        }
    }

    async fn purge_expired(&self) -> Result<usize, BackendError> {
        self.sessions.purge_expired().await.map_err(failed)
    }

    async fn email_sign_in_link(&self, email: &str) -> Result<Option<String>, BackendError> {
        Ok(self
            .sessions
            .sign_in_link_for_email(email)
            .await
            .map_err(failed)?
            .map(|(secret, _)| secret))
    }

    async fn custom_domains(&self) -> Result<Vec<String>, BackendError> {
        let domains = self
            .manager
            .backends()
            .store
            .list_domains(None)
            .await
            .map_err(failed)?;
        Ok(domains.into_iter().map(|d| d.host).collect())
    }

    fn session_lifetime(&self) -> Duration {
        self.sessions.ttls().session
    }
}

// ---- over the daemon's socket ----

/// The backend of an edge in a process of its own: asks the daemon over its Unix
/// socket (HTTP/1.1, the `/v1/edge/...` endpoints), presenting the client's
/// credential with each question. A connection to a guest's port is an HTTP
/// upgrade on that socket ([`wire::CONNECT_PROTOCOL`]).
#[derive(Clone, Debug)]
pub struct DaemonBackend {
    socket: PathBuf,
    session_lifetime: Duration,
    timeout: Duration,
}

/// How long one question to the daemon may take (a wake takes longer).
const QUESTION_TIMEOUT: Duration = Duration::from_secs(30);

impl DaemonBackend {
    /// Connects to the daemon at `socket` and asks what the edge needs to know at
    /// start (the session lifetime).
    pub async fn connect(socket: impl Into<PathBuf>) -> Result<Self, BackendError> {
        let mut backend = Self {
            socket: socket.into(),
            session_lifetime: Duration::ZERO,
            timeout: QUESTION_TIMEOUT,
        };
        let hello: wire::Hello = backend.ask("hello", &wire::Empty {}).await?;
        backend.session_lifetime = Duration::from_secs(hello.session_lifetime_secs);
        Ok(backend)
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn open(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, BackendError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| BackendError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "a connection to the daemon failed");
            }
        });
        Ok(sender)
    }

    /// Asks `/v1/edge/{what}` with `question`, within `timeout`.
    async fn ask_within<Q: Serialize + Sync, A: DeserializeOwned>(
        &self,
        what: &str,
        question: &Q,
        timeout: Duration,
    ) -> Result<A, BackendError> {
        let body =
            serde_json::to_vec(question).map_err(|e| BackendError::Protocol(e.to_string()))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/edge/{what}"))
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        let exchange = async {
            let mut sender = self.open().await?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| BackendError::Protocol(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| BackendError::Protocol(e.to_string()))?
                .to_bytes();
            Ok::<_, BackendError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| BackendError::Protocol(format!("no answer to {what} in time")))??;
        if !status.is_success() {
            return Err(daemon_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| BackendError::Protocol(e.to_string()))
    }

    async fn ask<Q: Serialize + Sync, A: DeserializeOwned>(
        &self,
        what: &str,
        question: &Q,
    ) -> Result<A, BackendError> {
        self.ask_within(what, question, self.timeout).await
    }
}

fn daemon_error(status: StatusCode, body: &[u8]) -> BackendError {
    let message = serde_json::from_slice::<wire::ErrorAnswer>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    BackendError::Daemon {
        status: status.as_u16(),
        message,
    }
}

#[async_trait]
impl EdgeBackend for DaemonBackend {
    async fn identify(&self, presented: &Presented) -> Result<Option<EdgeCaller>, BackendError> {
        if *presented == Presented::Nobody {
            return Ok(Some(EdgeCaller::anonymous()));
        }
        let caller: Option<Caller> = self
            .ask(
                "identify",
                &wire::Identify {
                    presented: presented.clone(),
                },
            )
            .await?;
        Ok(caller.map(|c| EdgeCaller::new(presented.clone(), c)))
    }

    async fn route(
        &self,
        host: &str,
        port: Option<u16>,
    ) -> Result<Option<EdgeRoute>, BackendError> {
        let view: Option<wire::RouteView> = self
            .ask(
                "route",
                &wire::Route {
                    host: host.to_owned(),
                    port,
                },
            )
            .await?;
        Ok(view.map(|v| EdgeRoute::new(host, port, v.upstream, v.owner)))
    }

    async fn authorize(
        &self,
        caller: &EdgeCaller,
        action: Action,
        route: &EdgeRoute,
    ) -> Result<bool, BackendError> {
        self.ask(
            "authorize",
            &wire::Authorize {
                presented: caller.presented().clone(),
                action,
                target: route.target(),
            },
        )
        .await
    }

    async fn accept_share_link(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
        link: &str,
    ) -> Result<(), BackendError> {
        let _: wire::Empty = self
            .ask(
                "accept-share-link",
                &wire::AcceptShareLink {
                    presented: caller.presented().clone(),
                    target: route.target(),
                    link: link.to_owned(),
                },
            )
            .await?;
        Ok(())
    }

    async fn wake(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
    ) -> Result<Option<EdgeRoute>, BackendError> {
        // The daemon gives the VM its own wake timeout; this is only a bound.
        let view: Option<wire::RouteView> = self
            .ask_within(
                "wake",
                &wire::Wake {
                    presented: caller.presented().clone(),
                    target: route.target(),
                },
                Duration::from_secs(600),
            )
            .await?;
        Ok(view.map(|v| EdgeRoute::new(route.host(), route.port(), v.upstream, v.owner)))
    }

    async fn connect(
        &self,
        caller: &EdgeCaller,
        route: &EdgeRoute,
        port: u16,
    ) -> Result<GuestStream, BackendError> {
        let question = wire::Connect {
            presented: caller.presented().clone(),
            target: route.target(),
            port,
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/edge/connect")
            .header(header::HOST, "localhost")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, wire::CONNECT_PROTOCOL)
            .header(
                wire::CONNECT_HEADER,
                HeaderValue::from_str(&question.to_header())
                    .map_err(|e| BackendError::Protocol(e.to_string()))?,
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        let exchange = async {
            let mut sender = self.open().await?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| BackendError::Protocol(e.to_string()))?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                let status = response.status();
                let bytes = response
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                return Err(daemon_error(status, &bytes));
            }
            let upgraded = hyper::upgrade::on(response)
                .await
                .map_err(|e| BackendError::Protocol(e.to_string()))?;
            Ok::<GuestStream, BackendError>(Box::new(TokioIo::new(upgraded)))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| BackendError::Protocol("no answer to connect in time".into()))?
    }

    async fn identity(&self, caller: &EdgeCaller) -> Result<Option<Identity>, BackendError> {
        if !caller.signed_in() {
            return Ok(None);
        }
        self.ask(
            "identity",
            &wire::Identify {
                presented: caller.presented().clone(),
            },
        )
        .await
    }

    async fn redeem_sign_in_link(
        &self,
        token: &str,
    ) -> Result<Option<(String, Identity)>, BackendError> {
        let signed_in: Option<wire::SignedIn> = self
            .ask(
                "redeem-sign-in-link",
                &wire::SignInLink {
                    token: token.to_owned(),
                },
            )
            .await?;
        Ok(signed_in.map(|s| (s.session, s.user)))
    }

    async fn host_ticket(&self, session: &str, host: &str) -> Result<Option<String>, BackendError> {
        self.ask(
            "host-ticket",
            &wire::HostTicket {
                session: session.to_owned(),
                host: host.to_owned(),
            },
        )
        .await
    }

    async fn redeem_host_ticket(
        &self,
        ticket: &str,
        host: &str,
    ) -> Result<Option<String>, BackendError> {
        self.ask(
            "redeem-host-ticket",
            &wire::RedeemHostTicket {
                ticket: ticket.to_owned(),
                host: host.to_owned(),
            },
        )
        .await
    }

    async fn session_user(&self, session: &str) -> Result<Option<Identity>, BackendError> {
        self.ask(
            "session-user",
            &wire::Session {
                session: session.to_owned(),
            },
        )
        .await
    }

    async fn sign_out(&self, session: &str, everywhere: bool) -> Result<(), BackendError> {
        let _: wire::Empty = self
            .ask(
                "sign-out",
                &wire::SignOut {
                    session: session.to_owned(),
                    everywhere,
                },
            )
            .await?;
        Ok(())
    }

    async fn purge_expired(&self) -> Result<usize, BackendError> {
        self.ask("purge-expired", &wire::Empty {}).await
    }

    async fn email_sign_in_link(&self, email: &str) -> Result<Option<String>, BackendError> {
        self.ask(
            "email-sign-in-link",
            &wire::EmailSignInLink {
                email: email.to_owned(),
            },
        )
        .await
    }

    async fn custom_domains(&self) -> Result<Vec<String>, BackendError> {
        self.ask("custom-domains", &wire::Empty {}).await
    }

    fn session_lifetime(&self) -> Duration {
        self.session_lifetime
    }
}

/// The JSON of the daemon's `/v1/edge/...` endpoints, which [`DaemonBackend`] asks
/// and the daemon answers. Every question for a caller carries what they presented,
/// never who they are: the daemon identifies them itself.
pub mod wire {
    use base64::Engine as _;
    use serde::{Deserialize, Serialize};
    use vmkit_core::{Action, Upstream, UserId};

    use super::Presented;
    pub use crate::https::auth::Identity;

    /// The `Upgrade` protocol of `POST /v1/edge/connect`: after `101`, the
    /// connection carries the guest port's bytes.
    pub const CONNECT_PROTOCOL: &str = "vmkit-tcp";

    /// The header that carries a [`Connect`] question (base64url of its JSON): an
    /// upgrade request has no body.
    pub const CONNECT_HEADER: &str = "vmkit-edge-connect";

    /// No fields (a question without arguments, an answer without content).
    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    pub struct Empty {}

    /// An error answer.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct ErrorAnswer {
        /// What went wrong, as a sentence.
        pub error: String,
    }

    /// The answer of `hello`: what the edge needs to know at start.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Hello {
        /// How long a web session lasts, in seconds.
        pub session_lifetime_secs: u64,
    }

    /// `identify` and `identity`: who a credential identifies (a `Caller`, or
    /// `null`), and the signed-in user's identity (or `null`).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Identify {
        /// The credential.
        pub presented: Presented,
    }

    /// `route`: where an HTTP host goes (a [`RouteView`], or `null`).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Route {
        /// The host.
        pub host: String,
        /// The URL's port, `null` for the default.
        pub port: Option<u16>,
    }

    /// What a route answers the edge.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct RouteView {
        /// Where the traffic goes.
        pub upstream: Upstream,
        /// The VM's owner.
        pub owner: UserId,
    }

    /// A route named again: the daemon routes the host anew and answers only
    /// when it still goes to the same VM.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct RouteRef {
        /// The host.
        pub host: String,
        /// The URL's port, `null` for the default.
        pub port: Option<u16>,
        /// The VM it went to.
        pub vm: String,
    }

    /// `authorize`: whether the caller may take the action (`true` or `false`).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Authorize {
        /// The credential.
        pub presented: Presented,
        /// The action.
        pub action: Action,
        /// The route.
        pub target: RouteRef,
    }

    /// `accept-share-link`: makes a link a lasting share with the signed-in caller.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct AcceptShareLink {
        /// The credential.
        pub presented: Presented,
        /// The route.
        pub target: RouteRef,
        /// The link's secret.
        pub link: String,
    }

    /// `wake`: starts a stopped VM for the caller (a [`RouteView`], or `null`).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Wake {
        /// The credential.
        pub presented: Presented,
        /// The route.
        pub target: RouteRef,
    }

    /// `connect`: a connection to a port on the guest's loopback (an upgrade).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Connect {
        /// The credential.
        pub presented: Presented,
        /// The route.
        pub target: RouteRef,
        /// The guest port.
        pub port: u16,
    }

    impl Connect {
        /// The value of [`CONNECT_HEADER`].
        pub fn to_header(&self) -> String {
            let json = serde_json::to_vec(self).unwrap_or_default();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        }

        /// Reads the value of [`CONNECT_HEADER`].
        pub fn from_header(value: &str) -> Option<Self> {
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(value)
                .ok()?;
            serde_json::from_slice(&json).ok()
        }
    }

    /// `redeem-sign-in-link`: a [`SignedIn`], or `null`.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct SignInLink {
        /// The link's token.
        pub token: String,
    }

    /// `email-sign-in-link`: a sign-in link's token for the user with `email`, to be
    /// mailed to them, or `null`.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct EmailSignInLink {
        /// The address asked for.
        pub email: String,
    }

    /// A redeemed sign-in link.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct SignedIn {
        /// The new session's secret.
        pub session: String,
        /// Its user.
        pub user: Identity,
    }

    /// `host-ticket`: a ticket (a string), or `null`.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct HostTicket {
        /// The apex session.
        pub session: String,
        /// The VM host.
        pub host: String,
    }

    /// `redeem-host-ticket`: the host session's secret (a string), or `null`.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct RedeemHostTicket {
        /// The ticket.
        pub ticket: String,
        /// The host it is redeemed on.
        pub host: String,
    }

    /// `session-user`: the apex session's user (an identity), or `null`.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Session {
        /// The apex session.
        pub session: String,
    }

    /// `sign-out`: ends a session, or all of its user's.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct SignOut {
        /// The session.
        pub session: String,
        /// Every session of its user.
        pub everywhere: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_question_round_trips_through_its_header() {
        let question = wire::Connect {
            presented: Presented::Session {
                secret: "vmh_s3cret".into(),
                host: Some("web.vm.test".into()),
            },
            target: wire::RouteRef {
                host: "web.vm.test".into(),
                port: Some(8443),
                vm: "00000000000000ff".into(),
            },
            port: 8000,
        };
        let header = question.to_header();
        assert!(HeaderValue::from_str(&header).is_ok(), "{header}");
        let back = wire::Connect::from_header(&header).expect("a connect question");
        assert_eq!(back.presented, question.presented);
        assert_eq!(back.port, 8000);
        assert_eq!(back.target.vm, "00000000000000ff");
        assert!(wire::Connect::from_header("not base64!").is_none());
    }

    #[test]
    fn credentials_are_never_printed() {
        let session = Presented::Session {
            secret: "vmh_s3cret".into(),
            host: None,
        };
        let link = Presented::ShareLink {
            link: "vms_s3cret".into(),
        };
        for presented in [session, link] {
            let caller = EdgeCaller::new(presented.clone(), Caller::anonymous(Door::Https));
            assert!(!format!("{caller:?}").contains("s3cret"), "{caller:?}");
        }
    }

    #[test]
    fn only_a_user_is_signed_in() {
        assert!(!EdgeCaller::anonymous().signed_in());
        let holder = EdgeCaller::new(
            Presented::ShareLink {
                link: "vms_x".into(),
            },
            Caller::link("vms_x", Door::Https),
        );
        assert!(!holder.signed_in());
        let user = vmkit_core::User::new(
            UserId(7),
            vmkit_core::Handle::new("alice").expect("a valid handle"),
        );
        let signed_in = EdgeCaller::new(Presented::Nobody, Caller::user(&user, Door::Https));
        assert!(signed_in.signed_in());
    }
}
