//! `/v1/edge/...`: what an HTTPS edge in a process of its own (`vmkit-proxy`) asks the
//! daemon, on the root-only socket only. The wire is
//! `vmkit_net::https::backend::wire`; each question is answered by the daemon's
//! [`LocalBackend`], so the proxy's edge decides exactly as the daemon's own would.
//!
//! The proxy is trusted infrastructure (it holds the socket), but it never says who
//! a caller is: it passes what the client presented (a session cookie, a share
//! link), and each endpoint identifies that itself. A forged credential identifies
//! nobody, and an action for a route is taken only when the host still goes to the
//! VM the proxy named.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};
use vmkit_core::{Action, Caller};
use vmkit_net::https::backend::wire::{
    AcceptShareLink, Authorize, CONNECT_HEADER, CONNECT_PROTOCOL, Connect, EmailSignInLink, Empty,
    ErrorAnswer, Hello, HostTicket, Identify, Identity, RedeemHostTicket, Route, RouteRef,
    RouteView, Session, SignInLink, SignOut, SignedIn, Wake,
};
use vmkit_net::https::backend::{BackendError, EdgeCaller, EdgeRoute, Presented};
use vmkit_net::https::{EdgeBackend, LocalBackend};

type Backend = Arc<LocalBackend>;

/// The edge endpoints, answered by `backend`.
pub fn router(backend: LocalBackend) -> Router {
    Router::new()
        .route("/v1/edge/hello", post(hello))
        .route("/v1/edge/identify", post(identify))
        .route("/v1/edge/route", post(route))
        .route("/v1/edge/authorize", post(authorize))
        .route("/v1/edge/accept-share-link", post(accept_share_link))
        .route("/v1/edge/wake", post(wake))
        .route("/v1/edge/connect", post(connect))
        .route("/v1/edge/identity", post(identity))
        .route("/v1/edge/redeem-sign-in-link", post(redeem_sign_in_link))
        .route("/v1/edge/host-ticket", post(host_ticket))
        .route("/v1/edge/redeem-host-ticket", post(redeem_host_ticket))
        .route("/v1/edge/session-user", post(session_user))
        .route("/v1/edge/sign-out", post(sign_out))
        .route("/v1/edge/purge-expired", post(purge_expired))
        .route("/v1/edge/custom-domains", post(custom_domains))
        .route("/v1/edge/email-sign-in-link", post(email_sign_in_link))
        .with_state(Arc::new(backend))
}

/// An edge endpoint's error: a status and a sentence.
struct EdgeError(StatusCode, String);

impl IntoResponse for EdgeError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorAnswer { error: self.1 })).into_response()
    }
}

impl From<BackendError> for EdgeError {
    fn from(e: BackendError) -> Self {
        warn!(error = %e, "an edge question failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.message())
    }
}

type EdgeResult<T> = Result<Json<T>, EdgeError>;

fn refused(why: &str) -> EdgeError {
    EdgeError(StatusCode::FORBIDDEN, why.to_owned())
}

/// Who `presented` identifies, as the daemon decides it.
async fn caller(backend: &Backend, presented: &Presented) -> Result<Option<EdgeCaller>, EdgeError> {
    Ok(backend.identify(presented).await?)
}

/// The route `target` names, routed anew; `None` unless it still goes to its VM.
async fn again(backend: &Backend, target: &RouteRef) -> Result<Option<EdgeRoute>, EdgeError> {
    let routed = backend.route(&target.host, target.port).await?;
    Ok(routed.filter(|r| r.upstream.vm.to_string() == target.vm))
}

fn view(route: &EdgeRoute) -> RouteView {
    RouteView {
        upstream: route.upstream.clone(),
        owner: route.owner,
    }
}

async fn hello(State(backend): State<Backend>) -> Json<Hello> {
    Json(Hello {
        session_lifetime_secs: backend.session_lifetime().as_secs(),
    })
}

async fn identify(
    State(backend): State<Backend>,
    Json(q): Json<Identify>,
) -> EdgeResult<Option<Caller>> {
    let found = caller(&backend, &q.presented).await?;
    Ok(Json(found.map(|c| c.caller().clone())))
}

async fn route(
    State(backend): State<Backend>,
    Json(q): Json<Route>,
) -> EdgeResult<Option<RouteView>> {
    let routed = backend.route(&q.host, q.port).await?;
    Ok(Json(routed.as_ref().map(view)))
}

async fn authorize(State(backend): State<Backend>, Json(q): Json<Authorize>) -> EdgeResult<bool> {
    let Some(who) = caller(&backend, &q.presented).await? else {
        return Ok(Json(false));
    };
    let Some(routed) = again(&backend, &q.target).await? else {
        return Ok(Json(false));
    };
    Ok(Json(backend.authorize(&who, q.action, &routed).await?))
}

async fn accept_share_link(
    State(backend): State<Backend>,
    Json(q): Json<AcceptShareLink>,
) -> EdgeResult<Empty> {
    let Some(who) = caller(&backend, &q.presented)
        .await?
        .filter(EdgeCaller::signed_in)
    else {
        return Err(refused("accepting a share link needs a signed-in user"));
    };
    let Some(routed) = again(&backend, &q.target).await? else {
        return Err(EdgeError(StatusCode::NOT_FOUND, "no such VM".into()));
    };
    backend.accept_share_link(&who, &routed, &q.link).await?;
    Ok(Json(Empty {}))
}

async fn wake(
    State(backend): State<Backend>,
    Json(q): Json<Wake>,
) -> EdgeResult<Option<RouteView>> {
    let Some(who) = caller(&backend, &q.presented).await? else {
        return Ok(Json(None));
    };
    let Some(routed) = again(&backend, &q.target).await? else {
        return Ok(Json(None));
    };
    let woken = backend.wake(&who, &routed).await?;
    Ok(Json(woken.as_ref().map(view)))
}

/// `POST /v1/edge/connect` with `Upgrade: vmkit-tcp` and the question in
/// [`CONNECT_HEADER`]: `101`, then the bytes of the guest's port, for a caller who
/// may use the VM's web ports.
async fn connect(State(backend): State<Backend>, request: Request) -> Result<Response, EdgeError> {
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if !upgrade.is_some_and(|v| v.eq_ignore_ascii_case(CONNECT_PROTOCOL)) {
        return Err(EdgeError(
            StatusCode::BAD_REQUEST,
            format!("a connection needs `Connection: upgrade` and `Upgrade: {CONNECT_PROTOCOL}`"),
        ));
    }
    let Some(q) = request
        .headers()
        .get(CONNECT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(Connect::from_header)
    else {
        return Err(EdgeError(
            StatusCode::BAD_REQUEST,
            format!("the {CONNECT_HEADER} header is missing or not a connect question"),
        ));
    };
    let Some(who) = caller(&backend, &q.presented).await? else {
        return Err(refused("the credential identifies nobody"));
    };
    let Some(routed) = again(&backend, &q.target).await? else {
        return Err(EdgeError(StatusCode::NOT_FOUND, "no such VM".into()));
    };
    if !backend.authorize(&who, Action::UseHttp, &routed).await? {
        return Err(refused("the caller may not use this VM's web ports"));
    }
    let mut guest = backend.connect(&who, &routed, q.port).await?;
    let upgraded = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(connection) => {
                let mut connection = TokioIo::new(connection);
                let _ = tokio::io::copy_bidirectional(&mut connection, &mut guest).await;
            }
            Err(e) => debug!(error = %e, "an edge connection was not upgraded"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, CONNECT_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| EdgeError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn identity(
    State(backend): State<Backend>,
    Json(q): Json<Identify>,
) -> EdgeResult<Option<Identity>> {
    let Some(who) = caller(&backend, &q.presented).await? else {
        return Ok(Json(None));
    };
    Ok(Json(backend.identity(&who).await?))
}

async fn redeem_sign_in_link(
    State(backend): State<Backend>,
    Json(q): Json<SignInLink>,
) -> EdgeResult<Option<SignedIn>> {
    let redeemed = backend.redeem_sign_in_link(&q.token).await?;
    Ok(Json(
        redeemed.map(|(session, user)| SignedIn { session, user }),
    ))
}

async fn host_ticket(
    State(backend): State<Backend>,
    Json(q): Json<HostTicket>,
) -> EdgeResult<Option<String>> {
    Ok(Json(backend.host_ticket(&q.session, &q.host).await?))
}

async fn redeem_host_ticket(
    State(backend): State<Backend>,
    Json(q): Json<RedeemHostTicket>,
) -> EdgeResult<Option<String>> {
    Ok(Json(backend.redeem_host_ticket(&q.ticket, &q.host).await?))
}

async fn session_user(
    State(backend): State<Backend>,
    Json(q): Json<Session>,
) -> EdgeResult<Option<Identity>> {
    Ok(Json(backend.session_user(&q.session).await?))
}

async fn sign_out(State(backend): State<Backend>, Json(q): Json<SignOut>) -> EdgeResult<Empty> {
    backend.sign_out(&q.session, q.everywhere).await?;
    Ok(Json(Empty {}))
}

async fn purge_expired(State(backend): State<Backend>) -> EdgeResult<usize> {
    Ok(Json(backend.purge_expired().await?))
}

async fn email_sign_in_link(
    State(backend): State<Backend>,
    Json(q): Json<EmailSignInLink>,
) -> EdgeResult<Option<String>> {
    Ok(Json(backend.email_sign_in_link(&q.email).await?))
}

async fn custom_domains(State(backend): State<Backend>) -> EdgeResult<Vec<String>> {
    Ok(Json(backend.custom_domains().await?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use vmkit_core::testing::FakeHost;
    use vmkit_core::{StoreGateway, WebSessions};

    use super::*;

    const DOMAIN: &str = "vm.test";

    /// The daemon's socket routes with the edge endpoints, and a VM `web` of the
    /// operator.
    async fn app() -> (FakeHost, Router) {
        let host = FakeHost::new().await;
        let store: Arc<dyn vmkit_core::StateStore> = host.store.clone();
        let backend = LocalBackend::new(
            host.manager.clone(),
            Arc::new(StoreGateway::new(store.clone(), DOMAIN)),
            WebSessions::new(store),
        );
        let request = vmkit_core::CreateRequest::new(
            vmkit_core::UserId::LOCAL,
            vmkit_core::VmSpec::new("tiny"),
        )
        .name(vmkit_core::VmName::new("web").unwrap());
        host.manager.create(request).await.unwrap();
        (host, router(backend))
    }

    async fn ask(app: &Router, what: &str, body: serde_json::Value) -> (StatusCode, String) {
        let response = app
            .clone()
            .oneshot(
                Request::post(format!("/v1/edge/{what}"))
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn forged() -> serde_json::Value {
        serde_json::json!({"kind": "session", "secret": "vmw_forged", "host": "web.vm.test"})
    }

    /// The route of `web`, as the proxy names it back.
    async fn target(app: &Router) -> serde_json::Value {
        let (status, body) = ask(
            app,
            "route",
            serde_json::json!({"host": "web.vm.test", "port": null}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        serde_json::json!({"host": "web.vm.test", "port": null, "vm": view["upstream"]["vm"]})
    }

    #[tokio::test]
    async fn a_forged_session_identifies_nobody() {
        let (_host, app) = app().await;
        let (status, body) =
            ask(&app, "identify", serde_json::json!({"presented": forged()})).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
        let (status, body) =
            ask(&app, "identity", serde_json::json!({"presented": forged()})).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
        let (status, body) = ask(
            &app,
            "session-user",
            serde_json::json!({"session": "vmw_forged"}),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
    }

    #[tokio::test]
    async fn a_private_vm_is_refused_to_a_forged_session_and_to_nobody() {
        let (_host, app) = app().await;
        let target = target(&app).await;
        for presented in [forged(), serde_json::json!({"kind": "nobody"})] {
            let (status, body) = ask(
                &app,
                "authorize",
                serde_json::json!({"presented": presented, "action": "use_http", "target": target}),
            )
            .await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "false"));
        }
    }

    #[tokio::test]
    async fn a_wake_of_a_route_naming_another_vm_does_nothing() {
        let (_host, app) = app().await;
        let mut target = target(&app).await;
        target["vm"] = serde_json::json!("0000000000000001");
        let (status, body) = ask(
            &app,
            "wake",
            serde_json::json!({"presented": {"kind": "nobody"}, "target": target}),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
    }

    #[tokio::test]
    async fn a_share_link_is_not_accepted_for_a_forged_session() {
        let (_host, app) = app().await;
        let target = target(&app).await;
        let (status, _) = ask(
            &app,
            "accept-share-link",
            serde_json::json!({"presented": forged(), "target": target, "link": "vms_x"}),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn no_connection_to_a_guest_for_a_forged_session() {
        let (_host, app) = app().await;
        let target = target(&app).await;
        let question: Connect = serde_json::from_value(
            serde_json::json!({"presented": forged(), "target": target, "port": 8000}),
        )
        .unwrap();
        let response = app
            .oneshot(
                Request::post("/v1/edge/connect")
                    .header(header::CONNECTION, "upgrade")
                    .header(header::UPGRADE, CONNECT_PROTOCOL)
                    .header(CONNECT_HEADER, question.to_header())
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_used_or_unknown_sign_in_link_or_ticket_signs_nobody_in() {
        let (_host, app) = app().await;
        let (status, body) = ask(
            &app,
            "redeem-sign-in-link",
            serde_json::json!({"token": "vml_forged"}),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
        let (status, body) = ask(
            &app,
            "redeem-host-ticket",
            serde_json::json!({"ticket": "vmt_forged", "host": "web.vm.test"}),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
        let (status, body) = ask(
            &app,
            "host-ticket",
            serde_json::json!({"session": "vmw_forged", "host": "web.vm.test"}),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
    }
}
