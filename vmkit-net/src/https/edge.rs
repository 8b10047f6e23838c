//! The edge itself: listeners, connections, and what each request gets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use vmkit_core::{Action, Gateway, Manager, WebSessions};

use super::auth::{self, SESSION_COOKIE, SHARE_COOKIE, Signer};
use super::backend::{
    BackendError, EdgeBackend, EdgeCaller, EdgeRoute, GuestStream, LocalBackend, Presented,
};
use super::idle::Idle;
use super::mail::{MailLimits, Mailer};
use super::tls::CertStore;
use super::{HttpsConfig, HttpsError, RESERVED_PREFIX, pages, strict};
use crate::challenges::AcmeChallenges;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What serves `https://DOMAIN/api/...` (the daemon's REST API, for `vmk_` keys):
/// called with the request, its path without the `/api` prefix, and the peer.
pub type ApexApi = Arc<
    dyn Fn(
            Request<Incoming>,
            SocketAddr,
        ) -> std::pin::Pin<Box<dyn Future<Output = Response<ApiBody>> + Send>>
        + Send
        + Sync,
>;

/// The body of an [`ApexApi`] response.
pub type ApiBody = BoxBody<Bytes, BoxError>;

/// The largest form the apex reads (`/__vmkit/email`).
const MAX_FORM_BYTES: usize = 4096;

/// Headers that describe one hop, never forwarded as they came.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The HTTPS edge, asking an [`EdgeBackend`] who callers are, where hosts go and
/// what callers may do.
#[derive(Clone)]
pub struct HttpsEdge {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn EdgeBackend>,
    certs: Arc<CertStore>,
    challenges: Arc<AcmeChallenges>,
    signer: Signer,
    client: Client<HttpConnector, Body>,
    config: HttpsConfig,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// VM ports that answered on the VM's address lately.
    direct: Mutex<HashMap<(vmkit_core::VmId, u16), std::time::Instant>>,
    /// Sends sign-in links by email, within limits, when set.
    mailer: Option<(Arc<dyn Mailer>, MailLimits)>,
    /// Serves `/api/...` on the apex, when set.
    api: Option<ApexApi>,
}

impl std::fmt::Debug for HttpsEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsEdge")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// What a host is to the edge.
#[derive(Debug, PartialEq, Eq)]
enum HostKind {
    Apex,
    Vm,
    Other,
}

impl HttpsEdge {
    /// An edge in the daemon's own process, serving `manager`'s VMs, deciding with
    /// `gateway`, sessions in `sessions` (a [`LocalBackend`]); otherwise as
    /// [`HttpsEdge::new`].
    pub fn local(
        manager: Manager,
        gateway: Arc<dyn Gateway>,
        sessions: WebSessions,
        certs: Arc<CertStore>,
        challenges: Arc<AcmeChallenges>,
        config: HttpsConfig,
    ) -> Result<Self, HttpsError> {
        let backend =
            LocalBackend::new(manager, gateway, sessions).wake_timeout(config.wake_timeout);
        Self::new(Arc::new(backend), certs, challenges, config)
    }

    /// An edge serving the VMs `backend` routes to under `config.domain`, with
    /// certificates from `certs` and ACME HTTP-01 answers from `challenges`; loads
    /// or makes the assertion key in `config.data_dir`.
    pub fn new(
        backend: Arc<dyn EdgeBackend>,
        certs: Arc<CertStore>,
        challenges: Arc<AcmeChallenges>,
        config: HttpsConfig,
    ) -> Result<Self, HttpsError> {
        let signer = Signer::load_or_create(&config.data_dir)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .set_host(false)
            .build(connector);
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                certs,
                challenges,
                signer,
                client,
                config,
                per_ip: Mutex::new(HashMap::new()),
                direct: Mutex::new(HashMap::new()),
                mailer: None,
                api: None,
            }),
        })
    }

    /// Serves `https://DOMAIN/api/...` with `api` (the path handed on without
    /// `/api`). Call it before [`HttpsEdge::serve`], on the edge
    /// [`HttpsEdge::new`] answered, as [`HttpsEdge::with_mailer`].
    pub fn with_api(mut self, api: ApexApi) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.api = Some(api),
            None => tracing::warn!("with_api on a shared edge: the API stays off"),
        }
        self
    }

    /// Offers sign-in links by email through `mailer` (to the address of an active
    /// user's account; one per address a minute, ten asks per client address an
    /// hour). Call it before [`HttpsEdge::serve`], on the edge [`HttpsEdge::new`]
    /// answered: a clone made earlier keeps the edge without it.
    pub fn with_mailer(mut self, mailer: Arc<dyn Mailer>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.mailer = Some((mailer, MailLimits::default())),
            None => tracing::warn!("with_mailer on a shared edge: email sign-in stays off"),
        }
        self
    }

    /// The JWKS document apps verify assertions with.
    pub fn jwks(&self) -> String {
        self.inner.signer.jwks()
    }

    /// Serves HTTPS on `https` and, when given, plain HTTP (redirects and ACME
    /// HTTP-01) on `http`, until `shutdown` completes; then lets the requests in
    /// flight finish (30 s at most).
    pub async fn serve(
        self,
        https: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), HttpsError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Certificate {
            what: format!("configuring TLS: {e}"),
        })?
        .with_no_client_auth()
        .with_cert_resolver(self.inner.certs.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let purge = {
            let backend = self.inner.backend.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tick.tick().await;
                    if let Err(e) = backend.purge_expired().await {
                        tracing::warn!(error = %e, "purging expired web sessions failed");
                    }
                }
            })
        };
        tokio::pin!(shutdown);
        loop {
            let (stream, peer, secure) = tokio::select! {
                () = &mut shutdown => break,
                accepted = https.accept() => match accepted {
                    Ok((s, p)) => (s, p, true),
                    Err(e) => { accept_error(e).await; continue; }
                },
                accepted = accept_opt(http.as_ref()) => match accepted {
                    Ok((s, p)) => (s, p, false),
                    Err(e) => { accept_error(e).await; continue; }
                },
            };
            let Some(slot) = Slot::take(&self.inner, peer.ip()) else {
                tracing::debug!(%peer, "too many connections from one address");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let edge = self.clone();
            let acceptor = acceptor.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _slot = slot;
                edge.connection(stream, peer, secure.then_some(acceptor), watcher)
                    .await;
            });
        }
        purge.abort();
        drop(https);
        drop(http);
        if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("HTTPS connections still open after 30 s; closing them");
        }
        Ok(())
    }

    async fn connection(
        self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let config = &self.inner.config;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(config.max_header_bytes as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Duration::from_secs(30));
        let Some(acceptor) = tls else {
            let edge = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let edge = edge.clone();
                async move { Ok::<_, Infallible>(edge.plain(req).await) }
            });
            let io = strict::Strict::new(
                Idle::new(stream, config.idle_timeout),
                config.max_header_bytes,
            );
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let _ = watcher.watch(conn.into_owned()).await;
            return;
        };
        let stream =
            match tokio::time::timeout(config.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let stream = Idle::new(stream, config.idle_timeout);
        let edge = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let edge = edge.clone();
            async move { Ok::<_, Infallible>(edge.secure(req, peer).await) }
        });
        if h2 {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
        } else {
            let io = strict::Strict::new(stream, config.max_header_bytes);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let _ = watcher.watch(conn.into_owned()).await;
        }
    }

    /// Plain HTTP: ACME HTTP-01 answers, else a redirect to HTTPS.
    async fn plain(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            return match self.inner.challenges.http01(token) {
                Some(answer) => text(StatusCode::OK, answer),
                None => text(StatusCode::NOT_FOUND, "no such challenge\n".into()),
            };
        }
        let Some(host) = request_host(&req) else {
            return text(
                StatusCode::BAD_REQUEST,
                "the request names no host\n".into(),
            );
        };
        if self.host_kind(&host) == HostKind::Other && !self.is_custom_host(&host).await {
            return text(
                StatusCode::NOT_FOUND,
                "not a host this gateway serves\n".into(),
            );
        }
        let target = format!(
            "{}{}",
            self.inner.config.origin(&host),
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        );
        redirect(StatusCode::PERMANENT_REDIRECT, &target)
    }

    /// HTTPS: the apex, or a VM host.
    async fn secure(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let Some(host) = request_host(&req) else {
            return text(
                StatusCode::BAD_REQUEST,
                "the request names no host\n".into(),
            );
        };
        let mut response = match self.host_kind(&host) {
            HostKind::Apex => self.apex(req, peer).await,
            HostKind::Vm => self.vm_host(req, &host, peer).await,
            HostKind::Other if self.is_custom_host(&host).await => {
                self.vm_host(req, &host, peer).await
            }
            HostKind::Other => html(
                StatusCode::MISDIRECTED_REQUEST,
                pages::error(421, "Not a host this gateway serves"),
            ),
        };
        if self.inner.config.sends_hsts() {
            response.headers_mut().insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=31536000; includeSubDomains"),
            );
        }
        response
    }

    /// Whether `host`, outside the domain, is a custom domain attached to a VM.
    async fn is_custom_host(&self, host: &str) -> bool {
        matches!(self.inner.backend.route(host, None).await, Ok(Some(_)))
    }

    fn host_kind(&self, host: &str) -> HostKind {
        let domain = self.inner.config.domain.as_str();
        if host == domain {
            return HostKind::Apex;
        }
        match host.strip_suffix(domain).and_then(|l| l.strip_suffix('.')) {
            Some(label) if !label.is_empty() && !label.contains('.') => HostKind::Vm,
            _ => HostKind::Other,
        }
    }

    // ---- the apex ----

    async fn apex(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let inner = &self.inner;
        let path = req.uri().path().to_owned();
        if let Some(rest) = path.strip_prefix("/api")
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return match &inner.api {
                Some(api) => {
                    let mut req = req;
                    let rest = match rest {
                        "" => "/",
                        rest => rest,
                    };
                    let uri = match req.uri().query() {
                        Some(q) => format!("{rest}?{q}"),
                        None => rest.to_owned(),
                    };
                    match uri.parse::<Uri>() {
                        Ok(uri) => {
                            *req.uri_mut() = uri;
                            api(req, peer).await
                        }
                        Err(_) => html(StatusCode::BAD_REQUEST, pages::error(400, "Bad Request")),
                    }
                }
                None => html(StatusCode::NOT_FOUND, pages::error(404, "Not Found")),
            };
        }
        let session = auth::cookie(req.headers(), SESSION_COOKIE).map(str::to_owned);
        match (req.method().clone(), path.as_str()) {
            (Method::GET | Method::HEAD, "/.well-known/jwks.json") => {
                let mut r = bytes_response(StatusCode::OK, inner.signer.jwks().into());
                set(&mut r, header::CONTENT_TYPE, "application/json");
                set(&mut r, header::CACHE_CONTROL, "public, max-age=300");
                r
            }
            (Method::GET, "/__vmkit/login") => {
                let Some(token) = query(req.uri(), "token") else {
                    return html(StatusCode::BAD_REQUEST, self.sign_in_page(None));
                };
                match inner.backend.redeem_sign_in_link(&token).await {
                    Ok(Some((secret, user))) => {
                        tracing::info!(user = %user.handle, "signed in a browser");
                        let next = next_path(req.uri());
                        let mut r = redirect(StatusCode::SEE_OTHER, &next);
                        add_cookie(
                            &mut r,
                            SESSION_COOKIE,
                            &secret,
                            inner.backend.session_lifetime(),
                        );
                        r
                    }
                    Ok(None) => html(
                        StatusCode::BAD_REQUEST,
                        pages::page(
                            "This sign-in link cannot be used",
                            &format!(
                                "<p>It was used already, or it expired. Get a new one:</p>\
                                 <pre>{} browser</pre>",
                                pages::escape(&inner.config.ssh_command(None))
                            ),
                        ),
                    ),
                    Err(e) => internal(e),
                }
            }
            (Method::GET, "/__vmkit/auth") => {
                let Some(target) = query(req.uri(), "host").map(|h| h.to_ascii_lowercase()) else {
                    return html(StatusCode::BAD_REQUEST, pages::error(400, "Bad Request"));
                };
                // Only hosts of this gateway: never an open redirect.
                if self.host_kind(&target) != HostKind::Vm
                    && !(self.host_kind(&target) == HostKind::Other
                        && self.is_custom_host(&target).await)
                {
                    return html(StatusCode::BAD_REQUEST, pages::error(400, "Bad Request"));
                }
                let next = next_path(req.uri());
                let ticket = match &session {
                    Some(s) => inner.backend.host_ticket(s, &target).await,
                    None => Ok(None),
                };
                match ticket {
                    Ok(Some(ticket)) => redirect(
                        StatusCode::SEE_OTHER,
                        &format!(
                            "{}/__vmkit/ticket?t={}&next={}",
                            inner.config.origin(&target),
                            encode(&ticket),
                            encode(&next)
                        ),
                    ),
                    // Not signed in, and signing in is optional (a share link
                    // visitor): straight back, without the link in the URL.
                    Ok(None) if query(req.uri(), "optional").is_some() => {
                        let back = next
                            .parse::<Uri>()
                            .map(|u| without_query(&u, "share"))
                            .unwrap_or_else(|_| "/".into());
                        redirect(
                            StatusCode::SEE_OTHER,
                            &format!("{}{back}", inner.config.origin(&target)),
                        )
                    }
                    Ok(None) => html(StatusCode::OK, self.sign_in_page(Some(&target))),
                    Err(e) => internal(e),
                }
            }
            (Method::GET, "/__vmkit/logout") => html(
                StatusCode::OK,
                pages::confirm_sign_out(query(req.uri(), "everywhere").is_some()),
            ),
            (Method::POST, "/__vmkit/logout") => {
                let everywhere = query(req.uri(), "everywhere").is_some();
                if let Some(s) = &session
                    && let Err(e) = inner.backend.sign_out(s, everywhere).await
                {
                    return internal(e);
                }
                let mut r = redirect(StatusCode::SEE_OTHER, "/");
                add_cookie(&mut r, SESSION_COOKIE, "", Duration::ZERO);
                r
            }
            (Method::POST, "/__vmkit/email") => self.email_link(req, peer).await,
            (Method::GET | Method::HEAD, "/") => {
                let user = match &session {
                    Some(s) => inner.backend.session_user(s).await,
                    None => Ok(None),
                };
                match user {
                    Ok(Some(user)) => html(StatusCode::OK, pages::signed_in(user.handle.as_str())),
                    Ok(None) => html(StatusCode::OK, self.sign_in_page(None)),
                    Err(e) => internal(e),
                }
            }
            _ => html(StatusCode::NOT_FOUND, pages::error(404, "Not Found")),
        }
    }

    /// `POST /__vmkit/email` (`email=ADDRESS`): mails a sign-in link to the address
    /// when it is an active user's, in the background; the answer is the same
    /// either way, and as fast.
    async fn email_link(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let inner = &self.inner;
        let Some((_, limits)) = &inner.mailer else {
            return html(StatusCode::NOT_FOUND, pages::error(404, "Not Found"));
        };
        // A form posted from another site is refused.
        let origin = inner.config.origin(&inner.config.domain);
        if let Some(from) = req.headers().get(header::ORIGIN)
            && from.as_bytes() != origin.as_bytes()
        {
            return html(StatusCode::FORBIDDEN, pages::error(403, "Forbidden"));
        }
        let body = match http_body_util::Limited::new(req.into_body(), MAX_FORM_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return html(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    pages::error(413, "Payload Too Large"),
                );
            }
        };
        let form = String::from_utf8_lossy(&body);
        let Some(address) = param(&form, "email")
            .map(|a| a.trim().to_owned())
            .filter(|a| a.len() <= 254 && a.contains('@') && !a.contains(char::is_whitespace))
        else {
            return html(
                StatusCode::BAD_REQUEST,
                pages::error(400, "Bad Request: give an email address"),
            );
        };
        if limits.allow(peer.ip(), &address) {
            let this = self.clone();
            let to = address.clone();
            tokio::spawn(async move { this.send_link(&to).await });
        } else {
            tracing::info!(peer = %peer.ip(), "a sign-in mail refused by the limits");
        }
        html(StatusCode::OK, pages::email_sent(&address))
    }

    async fn send_link(&self, to: &str) {
        let inner = &self.inner;
        let Some((mailer, _)) = &inner.mailer else {
            return;
        };
        let secret = match inner.backend.email_sign_in_link(to).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                tracing::debug!("a sign-in mail asked for an address no active user has");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "making a sign-in link for email failed");
                return;
            }
        };
        let domain = &inner.config.domain;
        let url = format!(
            "{}/__vmkit/login?token={}",
            inner.config.origin(domain),
            encode(&secret)
        );
        let body = format!(
            "Open this link within 10 minutes to sign in to {domain} (it works once):\n\n\
             {url}\n\nIf you did not ask for it, ignore this message.\n"
        );
        match mailer
            .send(to, &format!("Sign in to {domain}"), &body)
            .await
        {
            Ok(()) => tracing::info!("sent a sign-in link by email"),
            Err(e) => tracing::warn!(error = %e, "sending a sign-in link failed"),
        }
    }

    fn sign_in_page(&self, wanted: Option<&str>) -> String {
        pages::sign_in(
            &self.inner.config.ssh_command(None),
            wanted,
            self.inner.mailer.is_some(),
        )
    }

    // ---- VM hosts ----

    async fn vm_host(
        &self,
        req: Request<Incoming>,
        host: &str,
        peer: SocketAddr,
    ) -> Response<Body> {
        if req.uri().path().starts_with(RESERVED_PREFIX) {
            return self.reserved(req, host).await;
        }
        let inner = &self.inner;
        let session = auth::cookie(req.headers(), SESSION_COOKIE).map(str::to_owned);
        let user = match &session {
            Some(secret) => match inner
                .backend
                .identify(&Presented::Session {
                    secret: secret.clone(),
                    host: Some(host.to_owned()),
                })
                .await
            {
                Ok(caller) => caller.filter(EdgeCaller::signed_in),
                Err(e) => return internal(e),
            },
            None => None,
        };
        let routed = match inner.backend.route(host, inner.config.public_port).await {
            Ok(routed) => routed,
            Err(e) => return internal(e),
        };
        let caller = user.clone().unwrap_or_else(EdgeCaller::anonymous);
        let Some(routed) = routed else {
            return self.refused(&req, host, user.is_some());
        };
        let allowed = match inner
            .backend
            .authorize(&caller, Action::UseHttp, &routed)
            .await
        {
            Ok(allowed) => allowed,
            Err(e) => return internal(e),
        };
        if allowed {
            // A link used while signed in becomes a lasting share; the token leaves
            // the URL.
            if let Some(link) = query(req.uri(), "share") {
                if user.is_some()
                    && let Err(e) = inner
                        .backend
                        .accept_share_link(&caller, &routed, &link)
                        .await
                {
                    tracing::warn!(error = %e, "accepting a share link failed");
                }
                return redirect(StatusCode::SEE_OTHER, &without_query(req.uri(), "share"));
            }
            return self.forward(req, host, peer, caller, routed).await;
        }
        // A share link, from the URL or kept in a cookie.
        let from_url = query(req.uri(), "share");
        let link = from_url
            .clone()
            .or_else(|| auth::cookie(req.headers(), SHARE_COOKIE).map(str::to_owned));
        if let Some(link) = link {
            let holder = match inner
                .backend
                .identify(&Presented::ShareLink { link: link.clone() })
                .await
            {
                Ok(holder) => holder,
                Err(e) => return internal(e),
            };
            let allowed = match &holder {
                Some(holder) => match inner
                    .backend
                    .authorize(holder, Action::UseHttp, &routed)
                    .await
                {
                    Ok(allowed) => allowed,
                    Err(e) => return internal(e),
                },
                None => false,
            };
            if let Some(holder) = holder.filter(|_| allowed) {
                if from_url.is_none() {
                    return self.forward(req, host, peer, holder, routed).await;
                }
                let target = without_query(req.uri(), "share");
                if let Some(signed_in) = &user {
                    if let Err(e) = inner
                        .backend
                        .accept_share_link(signed_in, &routed, &link)
                        .await
                    {
                        tracing::warn!(error = %e, "accepting a share link failed");
                    }
                    return redirect(StatusCode::SEE_OTHER, &target);
                }
                // Not signed in on this host: the link works from now on (a
                // cookie), and a visitor signed in on the apex is signed in here on
                // the way, so that the link becomes theirs.
                let config = &inner.config;
                let next = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                let mut r = redirect(
                    StatusCode::SEE_OTHER,
                    &format!(
                        "{}/__vmkit/auth?host={}&next={}&optional=1",
                        config.origin(&config.domain),
                        encode(host),
                        encode(next)
                    ),
                );
                add_cookie(
                    &mut r,
                    SHARE_COOKIE,
                    &link,
                    inner.backend.session_lifetime(),
                );
                return r;
            }
        }
        self.refused(&req, host, user.is_some())
    }

    /// What a request the caller may not make gets: `404` when signed in (as a VM
    /// that does not exist), `401` with `Authorization`, else a redirect to sign in.
    fn refused(&self, req: &Request<Incoming>, host: &str, signed_in: bool) -> Response<Body> {
        if signed_in {
            return html(StatusCode::NOT_FOUND, pages::error(404, "Not Found"));
        }
        if req.headers().contains_key(header::AUTHORIZATION) {
            let mut r = html(StatusCode::UNAUTHORIZED, pages::error(401, "Unauthorized"));
            set(&mut r, header::WWW_AUTHENTICATE, "Bearer realm=\"vmkit\"");
            return r;
        }
        let config = &self.inner.config;
        let next = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        redirect(
            StatusCode::SEE_OTHER,
            &format!(
                "{}/__vmkit/auth?host={}&next={}",
                config.origin(&config.domain),
                encode(host),
                encode(next)
            ),
        )
    }

    /// `/__vmkit/…` on a VM host: redeem a ticket, sign out.
    async fn reserved(&self, req: Request<Incoming>, host: &str) -> Response<Body> {
        let inner = &self.inner;
        match (req.method().clone(), req.uri().path()) {
            (Method::GET, "/__vmkit/ticket") => {
                let Some(ticket) = query(req.uri(), "t") else {
                    return html(StatusCode::BAD_REQUEST, pages::error(400, "Bad Request"));
                };
                let next = next_path(req.uri());
                match inner.backend.redeem_host_ticket(&ticket, host).await {
                    Ok(Some(secret)) => {
                        let mut r = redirect(StatusCode::SEE_OTHER, &next);
                        add_cookie(
                            &mut r,
                            SESSION_COOKIE,
                            &secret,
                            inner.backend.session_lifetime(),
                        );
                        r
                    }
                    // Used or expired (a reload): sign in again from the start.
                    Ok(None) => redirect(
                        StatusCode::SEE_OTHER,
                        &format!(
                            "{}/__vmkit/auth?host={}&next={}",
                            inner.config.origin(&inner.config.domain),
                            encode(host),
                            encode(&next)
                        ),
                    ),
                    Err(e) => internal(e),
                }
            }
            (Method::GET, "/__vmkit/logout") => {
                html(StatusCode::OK, pages::confirm_sign_out(false))
            }
            (Method::POST, "/__vmkit/logout") => {
                if let Some(s) = auth::cookie(req.headers(), SESSION_COOKIE)
                    && let Err(e) = inner.backend.sign_out(s, false).await
                {
                    return internal(e);
                }
                let mut r = html(
                    StatusCode::OK,
                    pages::page(
                        "Signed out",
                        &format!("<p>Signed out of <code>{}</code>.</p>", pages::escape(host)),
                    ),
                );
                add_cookie(&mut r, SESSION_COOKIE, "", Duration::ZERO);
                add_cookie(&mut r, SHARE_COOKIE, "", Duration::ZERO);
                r
            }
            _ => html(StatusCode::NOT_FOUND, pages::error(404, "Not Found")),
        }
    }

    // ---- forwarding ----

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        host: &str,
        peer: SocketAddr,
        caller: EdgeCaller,
        mut routed: EdgeRoute,
    ) -> Response<Body> {
        let inner = &self.inner;
        let owner = caller.caller().owner() == Some(routed.owner) || caller.caller().is_admin();
        if !routed.upstream.running {
            match self.wake(&caller, &routed).await {
                Ok(Some(again)) => routed = again,
                Ok(None) => {
                    let mut r = html(
                        StatusCode::SERVICE_UNAVAILABLE,
                        pages::page(
                            "503 Not running",
                            "<p>This VM is not running. Try again later.</p>",
                        ),
                    );
                    set(&mut r, header::RETRY_AFTER, "30");
                    return r;
                }
                Err(e) => {
                    tracing::warn!(vm = %routed.upstream.name, error = %e, "waking a VM failed");
                    let body = if owner {
                        pages::page(
                            "503 The VM did not start",
                            &format!("<p>{}</p>", pages::escape(&e.message())),
                        )
                    } else {
                        pages::error(503, "Service Unavailable")
                    };
                    return html(StatusCode::SERVICE_UNAVAILABLE, body);
                }
            }
        }
        let Some(ip) = routed.upstream.ip else {
            return html(StatusCode::BAD_GATEWAY, pages::error(502, "Bad Gateway"));
        };
        let port = routed.upstream.port;
        let identity = match inner.backend.identity(&caller).await {
            Ok(identity) => identity,
            Err(e) => {
                tracing::warn!(error = %e, "who is signed in cannot be told");
                None
            }
        };

        // The request as the VM gets it.
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let uri: Uri = match format!("http://{ip}:{port}{path}").parse() {
            Ok(uri) => uri,
            Err(_) => return html(StatusCode::BAD_REQUEST, pages::error(400, "Bad Request")),
        };
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let from_trusted = inner.config.trusted_proxies.contains(&peer.ip());
        sanitize_request(&mut parts.headers, upgrade);
        let forwarded_for = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(chain) if from_trusted => format!("{chain}, {}", peer.ip()),
            _ => peer.ip().to_string(),
        };
        let h = &mut parts.headers;
        h.remove("x-forwarded-for");
        h.remove("x-forwarded-proto");
        h.remove("x-forwarded-host");
        h.remove("forwarded");
        insert(h, "x-forwarded-for", &forwarded_for);
        insert(h, "x-forwarded-proto", "https");
        let shown_host = match inner.config.public_port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        insert(h, "x-forwarded-host", &shown_host);
        h.insert(
            header::HOST,
            HeaderValue::from_str(&shown_host).unwrap_or(HeaderValue::from_static("localhost")),
        );
        if let Some(who) = &identity {
            insert(h, "x-vmkit-user-id", &who.id.to_string());
            insert(h, "x-vmkit-user", &who.handle);
            if let Some(email) = &who.email {
                insert(h, "x-vmkit-email", email);
            }
            let issuer = inner.config.origin(&inner.config.domain);
            if let Some(jwt) = inner
                .signer
                .assertion(who, &issuer, &inner.config.origin(host))
            {
                insert(h, "x-vmkit-assertion", &jwt);
            }
        }
        parts.uri = uri;
        parts.version = hyper::Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());

        let sent = match self.reach(&caller, &routed, ip, port).await {
            Reach::Direct => inner.client.request(upstream_req).await.map_err(|e| {
                if e.is_connect() {
                    connect_detail(&format!("{e:?}"))
                } else {
                    "the server closed the connection without an answer".to_owned()
                }
            }),
            Reach::Loopback(stream) => send_over(stream, upstream_req).await,
            Reach::Nowhere(detail) => Err(detail),
        };
        let mut response = match sent {
            Ok(response) => response,
            Err(detail) => return self.unreachable(&routed, port, owner, &detail),
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return html(StatusCode::BAD_GATEWAY, pages::error(502, "Bad Gateway"));
            };
            let vm_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let (client, vm) = match tokio::try_join!(client_upgrade, vm_upgrade) {
                    Ok(both) => both,
                    Err(e) => {
                        tracing::debug!(error = %e, "an upgrade did not complete");
                        return;
                    }
                };
                let mut client = TokioIo::new(client);
                let mut vm = TokioIo::new(vm);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut vm).await;
            });
            let (mut parts, _) = response.into_parts();
            sanitize_response(&mut parts.headers, true);
            return Response::from_parts(parts, empty());
        }
        let (mut parts, body) = response.into_parts();
        sanitize_response(&mut parts.headers, false);
        Response::from_parts(parts, body.map_err(BoxError::from).boxed())
    }

    /// Starts a stopped VM for a caller who may, and routes again; `None` when the
    /// caller may not start it or it is in no state to start.
    async fn wake(
        &self,
        caller: &EdgeCaller,
        routed: &EdgeRoute,
    ) -> Result<Option<EdgeRoute>, BackendError> {
        self.inner.backend.wake(caller, routed).await
    }

    /// How to reach `port` of the routed VM: its address when something listens
    /// there (remembered for a minute, so that pooled connections are used), else
    /// its loopback through the agent, for apps bound to `127.0.0.1` only.
    async fn reach(
        &self,
        caller: &EdgeCaller,
        routed: &EdgeRoute,
        ip: std::net::Ipv4Addr,
        port: u16,
    ) -> Reach {
        let inner = &self.inner;
        let key = (routed.upstream.vm, port);
        let fresh = |seen: &std::time::Instant| seen.elapsed() < DIRECT_MEMORY;
        if lock(&inner.direct).get(&key).is_some_and(fresh) {
            return Reach::Direct;
        }
        let probe = tokio::net::TcpStream::connect((ip, port));
        let detail = match tokio::time::timeout(inner.config.connect_timeout, probe).await {
            Ok(Ok(_)) => {
                let mut direct = lock(&inner.direct);
                if direct.len() >= 4096 {
                    direct.retain(|_, seen| fresh(seen));
                }
                direct.insert(key, std::time::Instant::now());
                return Reach::Direct;
            }
            Ok(Err(e)) => connect_detail(&format!("{e:?}")),
            Err(_) => "no answer to the connection".to_owned(),
        };
        match inner.backend.connect(caller, routed, port).await {
            Ok(stream) => Reach::Loopback(stream),
            Err(e) => {
                tracing::debug!(vm = %routed.upstream.name, port, error = %e, "no way to the guest's loopback");
                Reach::Nowhere(detail)
            }
        }
    }

    /// The VM did not answer: a page that helps its owner, a plain error for others.
    fn unreachable(
        &self,
        routed: &EdgeRoute,
        port: u16,
        owner: bool,
        detail: &str,
    ) -> Response<Body> {
        tracing::debug!(vm = %routed.upstream.name, port, detail, "upstream failed");
        if !owner {
            return html(StatusCode::BAD_GATEWAY, pages::error(502, "Bad Gateway"));
        }
        let ssh = self
            .inner
            .config
            .ssh_command(Some(routed.upstream.name.as_str()));
        html(
            StatusCode::BAD_GATEWAY,
            pages::nothing_listening(
                routed.upstream.name.as_str(),
                port,
                &ssh,
                &self.inner.config.ssh_command(None),
                detail,
            ),
        )
    }
}

/// How long a port that answered on the VM's address is taken to still answer.
const DIRECT_MEMORY: Duration = Duration::from_secs(60);

/// How a request reaches the VM's port.
enum Reach {
    /// At the VM's address, through the pooled client.
    Direct,
    /// On the guest's loopback, through the agent.
    Loopback(GuestStream),
    /// Not at all, and why.
    Nowhere(String),
}

/// What a failed connection says to the VM's owner.
fn connect_detail(error: &str) -> String {
    if error.contains("ConnectionRefused") || error.contains("onnection refused") {
        "the connection was refused".to_owned()
    } else if error.contains("timed out") || error.contains("TimedOut") {
        "no answer to the connection".to_owned()
    } else {
        "cannot connect".to_owned()
    }
}

/// Sends `request` over a connection of its own on `stream` (the guest's loopback),
/// upgrades allowed.
async fn send_over(
    stream: GuestStream,
    mut request: Request<Body>,
) -> Result<Response<Incoming>, String> {
    // A connection of its own takes the origin form (`GET /path`), as servers
    // expect from a client that is not a proxy.
    let origin_form = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *request.uri_mut() = origin_form.parse().map_err(|_| "a bad path".to_owned())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("cannot talk HTTP through the agent: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "a connection to a guest's loopback failed");
        }
    });
    sender.send_request(request).await.map_err(|_| {
        "nothing answers on the VM's address, nor on its loopback (127.0.0.1)".to_owned()
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's place in the per-address count.
struct Slot {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl Slot {
    fn take(inner: &Arc<Inner>, ip: IpAddr) -> Option<Self> {
        let mut counts = inner.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= inner.config.max_connections_per_ip {
            return None;
        }
        *count += 1;
        Some(Self {
            inner: inner.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.inner.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

async fn accept_opt(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_error(e: std::io::Error) {
    // Out of file descriptors and the like: wait instead of spinning.
    tracing::warn!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The request's host, lowercase, without a port: the authority of HTTP/2 (and of
/// absolute-form requests), else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let value = req.headers().get(header::HOST)?.to_str().ok()?;
            let authority: hyper::http::uri::Authority = value.parse().ok()?;
            authority.host().to_owned()
        }
    };
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// The `next` parameter when it is a path on the same host, else `/`.
fn next_path(uri: &Uri) -> String {
    query(uri, "next")
        .filter(|n| local_path(n))
        .unwrap_or_else(|| "/".into())
}

/// Whether `next` is a path on the same host (never `//elsewhere` or a URL).
fn local_path(next: &str) -> bool {
    // Browsers drop tabs and newlines from URLs and read `\` as `/`: `/\t/x` and
    // `/\\x` would be `//x`, another host.
    next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control() || c == ' ')
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Headers named in `Connection`, which are for this hop only.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

fn sanitize_request(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    for name in connection_listed(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    let own: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-vmkit-"))
        .cloned()
        .collect();
    for name in own {
        headers.remove(name);
    }
    auth::strip_own_cookies(headers);
    if upgrade && let Some(value) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
}

fn sanitize_response(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    for name in connection_listed(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        // A VM may not set the edge's cookies.
        .filter(|v| !v.trim_start().starts_with("__Host-vmkit"))
        .filter_map(|v| HeaderValue::from_str(&auth::without_domain(v)).ok())
        .collect();
    headers.remove(header::SET_COOKIE);
    for cookie in cookies {
        headers.append(header::SET_COOKIE, cookie);
    }
    if upgrade && let Some(value) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn set(r: &mut Response<Body>, name: HeaderName, value: &'static str) {
    r.headers_mut()
        .insert(name, HeaderValue::from_static(value));
}

fn add_cookie(r: &mut Response<Body>, name: &str, value: &str, max_age: Duration) {
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(name, value, max_age)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

fn bytes_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = bytes_response(status, body.into());
    set(&mut r, header::CONTENT_TYPE, "text/plain; charset=utf-8");
    r
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut r = bytes_response(status, body.into());
    set(&mut r, header::CONTENT_TYPE, "text/html; charset=utf-8");
    set(&mut r, header::CACHE_CONTROL, "no-store");
    set(
        &mut r,
        HeaderName::from_static("x-content-type-options"),
        "nosniff",
    );
    set(&mut r, HeaderName::from_static("x-frame-options"), "DENY");
    r
}

fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut r = bytes_response(status, Bytes::new());
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    set(&mut r, header::CACHE_CONTROL, "no-store");
    r
}

fn internal(e: impl std::fmt::Display) -> Response<Body> {
    tracing::warn!(error = %e, "an HTTPS request failed");
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        pages::error(500, "Internal Server Error"),
    )
}

/// The first value of query parameter `name`, percent-decoded.
fn query(uri: &Uri, name: &str) -> Option<String> {
    param(uri.query()?, name)
}

/// Parameter `name` of `pairs` (`a=1&b=2`, a query or a form body), decoded.
fn param(pairs: &str, name: &str) -> Option<String> {
    pairs.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k)? == name).then(|| decode(v)).flatten()
    })
}

/// `uri`'s path and query without parameter `name`.
fn without_query(uri: &Uri, name: &str) -> String {
    let path = uri.path();
    let kept: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| {
            let k = pair.split('=').next().unwrap_or("");
            !pair.is_empty() && decode(k).as_deref() != Some(name)
        })
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed() {
        for ok in ["/", "/a?b=c", "/x/y"] {
            assert!(local_path(ok), "{ok}");
        }
        for bad in [
            "//evil.test/",
            "https://evil.test/",
            "evil",
            "/\\evil.test",
            "",
            "/\t/evil.test",
            "/\n/evil.test",
            "/\r\n/evil.test",
            "/ /evil.test",
        ] {
            assert!(!local_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn query_parameters_round_trip() {
        let next = "/a b?c=d&e=é";
        let uri: Uri = format!("/x?next={}&share=vms_1", encode(next))
            .parse()
            .unwrap();
        assert_eq!(query(&uri, "next").as_deref(), Some(next));
        assert_eq!(query(&uri, "share").as_deref(), Some("vms_1"));
        assert_eq!(query(&uri, "none"), None);
        assert_eq!(
            without_query(&uri, "share"),
            format!("/x?next={}", encode(next))
        );
        let only: Uri = "/p?share=vms_1".parse().unwrap();
        assert_eq!(without_query(&only, "share"), "/p");
    }

    #[test]
    fn forged_identity_and_hop_headers_never_reach_the_vm() {
        let mut h = HeaderMap::new();
        h.insert("x-vmkit-user-id", HeaderValue::from_static("1"));
        h.insert("X-Vmkit-Email", HeaderValue::from_static("root@x"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("s"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("__Host-vmkit=s; a=b"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        sanitize_request(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h.get("x-app").unwrap(), "kept");
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=b");

        let mut ws = HeaderMap::new();
        ws.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        ws.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&ws));
        sanitize_request(&mut ws, true);
        assert_eq!(ws.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(ws.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn a_vm_cannot_set_the_edge_cookies_or_widen_its_own() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("__Host-vmkit=stolen; Path=/; Secure"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("sid=1; Domain=vm.test; Path=/"),
        );
        sanitize_response(&mut h, false);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["sid=1; Path=/"]);
    }
}
