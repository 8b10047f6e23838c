//! The REST API: a thin adapter from HTTP to the manager's command surface
//! ([`Manager::commands`]). Each request is taken for the [`Caller`] its door put in
//! the request's extensions (on the root-only Unix socket: the operator), and the
//! access policy decides in vmkit-core; answers are views, and errors carry their
//! causes to admins only. Routes and wire types are documented in `vmkit_core::api`.

pub mod edge;
pub mod https;
mod session;
mod users;

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::error;
use vmkit_core::api::{
    CreateVm, ErrorBody, ExecBody, ExecLine, FIRST_EVENT_HEADER, IDEMPOTENCY_KEY_HEADER, NameBody,
    NewApiKey, ShareBody, SshKeyInfo, status_for,
};
use vmkit_core::{
    Access, ApiKeyScope, Caller, CloneSource, Commands, CreateRequest, DeleteOptions, ErrorChain,
    ErrorKind, Manager, ManagerError, ResizeRequest, ShareWithView, SshPublicKey, UserId, VmName,
};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The manager every request goes to.
    pub manager: Manager,
    /// Turns true when the daemon shuts down: answers that would never end (follows)
    /// end then, so that the shutdown does not wait for their clients.
    pub shutdown: watch::Receiver<bool>,
    /// Why the daemon is not ready although it serves: the reconcile at its start
    /// failed as a whole. `/readyz` answers 503 with it; every route still serves,
    /// so that the operator can look and act.
    pub not_ready: Option<std::sync::Arc<str>>,
    /// The local CA's certificate file, when the HTTPS edge serves with it.
    pub ca_certificate: Option<std::path::PathBuf>,
}

/// Resolves once `shutdown` turns true; never if its sender is gone without.
async fn shutting_down(mut shutdown: watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The API router of the root-only Unix socket: every request is the operator's.
pub fn router(state: AppState) -> Router {
    routes(state).layer(axum::Extension(Caller::operator()))
}

/// The root-only Unix socket's routes: the API ([`router`]) and the questions of
/// an HTTPS edge in a process of its own (`/v1/edge/...`, [`edge::router`]),
/// answered by `edge`.
pub fn socket_router(state: AppState, edge: vmkit_net::https::LocalBackend) -> Router {
    router(state).merge(edge::router(edge))
}

/// The API routes for callers a door identifies: each request must carry its
/// [`Caller`] in its extensions (a layer of the door puts it there); one without is
/// refused as anonymous.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/restart", post(restart_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/exec", post(exec_vm))
        .route("/v1/vms/{name}/resize", post(resize_vm))
        .route("/v1/vms/{name}/rename", post(rename_vm))
        .route("/v1/vms/{name}/session", post(session::session_vm))
        .route("/v1/vms/{name}/logs", get(logs_vm))
        .route("/v1/vms/{name}/metrics", get(metrics_vm))
        .route("/v1/vms/{name}/snapshots", post(snapshot_vm))
        .route("/v1/vms/{name}/restore", post(restore_vm))
        .route("/v1/vms/{name}/clone", post(clone_vm))
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{name}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/snapshots/{name}/clone", post(clone_snapshot))
        .route("/v1/events", get(events))
        .route("/v1/images", get(images))
        .route("/v1/keys", get(list_keys).post(add_key))
        .route("/v1/keys/{fingerprint}", axum::routing::delete(remove_key))
        .route("/v1/api-keys", get(list_api_keys).post(create_api_key))
        .route("/v1/api-keys/{id}", axum::routing::delete(revoke_api_key))
        .route("/v1/whoami", get(whoami))
        .route("/v1/https/ca", get(ca_certificate))
        .route(
            "/v1/vms/{name}/shares",
            get(list_shares).post(add_share).delete(remove_share),
        )
        .route("/v1/vms/{name}/domains", post(add_domain))
        .route("/v1/domains", get(list_domains))
        .route("/v1/domains/{host}", axum::routing::delete(remove_domain))
        .merge(users::router())
        .layer(axum::middleware::from_fn(error_detail_for_admins))
        .with_state(state)
}

/// The command surface for the request's caller (anonymous when its door named
/// none).
struct Asking(Commands);

impl FromRequestParts<AppState> for Asking {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        let caller = parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller::anonymous(vmkit_core::Door::Https));
        Ok(Self(state.manager.commands(caller)))
    }
}

/// An error's whole chain, kept beside the answer for [`error_detail_for_admins`].
#[derive(Clone)]
struct ErrorDetail(String);

/// Gives an admin's error answers their causes; removes them from everyone else's.
async fn error_detail_for_admins(request: Request, next: Next) -> Response {
    let admin = request
        .extensions()
        .get::<Caller>()
        .is_some_and(Caller::is_admin);
    let mut response = next.run(request).await;
    let Some(ErrorDetail(detail)) = response.extensions_mut().remove::<ErrorDetail>() else {
        return response;
    };
    if !admin {
        return response;
    }
    let status = response.status();
    let code = response
        .extensions_mut()
        .remove::<ErrorCode>()
        .map_or("internal", |c| c.0);
    (status, Json(ErrorBody::new(code, detail))).into_response()
}

#[derive(Clone, Copy)]
struct ErrorCode(&'static str);

/// An API error: a status and a JSON body. Internal detail is logged, not sent; a
/// manager error's causes go to admins only (see [`error_detail_for_admins`]).
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// The whole chain, for an admin's answer.
    detail: Option<(&'static str, String)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
            detail: None,
        }
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let kind = e.kind();
        let status =
            StatusCode::from_u16(status_for(kind)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if kind == ErrorKind::Internal {
            error!(error = ?e, "internal error");
            return Self::new(
                status,
                e.code(),
                "internal error; the daemon's log has the details",
            );
        }
        let mut error = Self::new(status, e.code(), e.public_message());
        error.detail = Some((e.code(), ErrorChain(&e).to_string()));
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some((code, detail)) = self.detail {
            response.extensions_mut().insert(ErrorDetail(detail));
            response.extensions_mut().insert(ErrorCode(code));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn vm_name(raw: &str) -> ApiResult<VmName> {
    VmName::new(raw).map_err(|e| ManagerError::from(e).into())
}

async fn readyz(State(s): State<AppState>) -> Response {
    if let Some(why) = &s.not_ready {
        return (StatusCode::SERVICE_UNAVAILABLE, why.to_string()).into_response();
    }
    match s.manager.list(Some(UserId::LOCAL)).await {
        Ok(_) => "ok".into_response(),
        Err(e) => {
            error!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "state store unavailable").into_response()
        }
    }
}

async fn list_vms(Asking(c): Asking) -> ApiResult<Response> {
    Ok(Json(c.list().await?).into_response())
}

async fn get_vm(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(c.get(&vm_name(&name)?).await?).into_response())
}

/// The local CA's certificate (PEM), for users to trust.
async fn ca_certificate(State(state): State<AppState>) -> ApiResult<Response> {
    let Some(path) = &state.ca_certificate else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "https_off",
            "this daemon serves no HTTPS with a local CA; turn it on with [https] listen \
             (and tls = \"self-signed\", the default)",
        ));
    };
    let pem = tokio::fs::read_to_string(path).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

async fn whoami(Asking(c): Asking) -> ApiResult<Response> {
    Ok(Json(c.whoami().await?).into_response())
}

/// The client's `Idempotency-Key`, if it sent one.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= 255 => Ok(Some(key.to_owned())),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
        )),
    }
}

async fn create_vm(
    State(s): State<AppState>,
    Asking(c): Asking,
    headers: HeaderMap,
    body: Result<Json<CreateVm>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text()))?;
    let defaults = &s.manager.config().default_spec;
    // The owner is the caller's: the command surface sets it.
    let mut request = CreateRequest::new(UserId::LOCAL, body.spec_or(defaults));
    if let Some(name) = &body.name {
        request = request.name(vm_name(name)?);
    }
    if let Some(key) = idempotency_key(&headers)? {
        request = request.idempotency_key(key);
    }
    // The create runs to completion even if the client goes away, so that a
    // dropped connection never leaves a half-created VM.
    let vm = tokio::spawn(async move { c.create(request).await })
        .await
        .map_err(|e| {
            error!(error = %e, "create task failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "create task failed",
            )
        })??;
    Ok((StatusCode::CREATED, Json(vm)).into_response())
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    keep_data: bool,
}

async fn delete_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let options = DeleteOptions::default().keep_data(q.keep_data);
    let deleted = detached(async move { c.delete(&name, options).await }).await?;
    if q.keep_data {
        // Where the kept data went is the answer.
        return Ok(Json(deleted).into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start_vm(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    Ok(Json(detached(async move { c.start(&name).await }).await?).into_response())
}

async fn stop_vm(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    Ok(Json(detached(async move { c.stop(&name).await }).await?).into_response())
}

async fn restart_vm(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    Ok(Json(detached(async move { c.restart(&name).await }).await?).into_response())
}

async fn pause_vm(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    Ok(Json(detached(async move { c.pause(&name).await }).await?).into_response())
}

async fn resume_vm(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    Ok(Json(detached(async move { c.resume(&name).await }).await?).into_response())
}

type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(body: JsonBody<T>) -> ApiResult<T> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text()))
}

fn required_name(body: NameBody, what: &str) -> ApiResult<VmName> {
    let name = body.name.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("name is missing; give the {what}"),
        )
    })?;
    vm_name(&name)
}

async fn resize_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    request: JsonBody<ResizeRequest>,
) -> ApiResult<Response> {
    let (name, request) = (vm_name(&name)?, body(request)?);
    Ok(Json(detached(async move { c.resize(&name, request).await }).await?).into_response())
}

/// `POST /v1/vms/{name}/rename` with `{"name": NEW}`: the VM under its new name.
async fn rename_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let (vm, new) = (
        vm_name(&name)?,
        required_name(body(request)?, "VM's new name")?,
    );
    Ok(Json(detached(async move { c.rename(&vm, new).await }).await?).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default = "default_log_bytes")]
    bytes: usize,
    /// A unit's journal in the guest instead of the console.
    unit: Option<String>,
    /// A file in the guest instead of the console.
    file: Option<String>,
    /// How many of the last lines of the unit or file.
    lines: Option<u32>,
    /// Keep sending the unit's or file's new lines.
    #[serde(default)]
    follow: bool,
}

fn default_log_bytes() -> usize {
    64 << 10
}

/// The console tail as text; or, with `unit` or `file`, that log in the guest as
/// NDJSON `{"line": ...}` objects (`{"error": ...}` last if the agent fails part-way),
/// followed with `follow=true` until the client goes or the daemon stops.
async fn logs_vm(
    State(s): State<AppState>,
    Asking(c): Asking,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let source = match (q.unit, q.file) {
        (None, None) if q.follow => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "follow needs a unit or a file in the guest (the console cannot be followed)",
            ));
        }
        (None, None) => {
            let text = c.console(&name, q.bytes.min(16 << 20)).await?;
            return Ok(([("content-type", "text/plain; charset=utf-8")], text).into_response());
        }
        (Some(unit), None) => vmkit_core::guest::LogsRequest::unit(unit),
        (None, Some(file)) => vmkit_core::guest::LogsRequest::file(file),
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "give a unit or a file, not both",
            ));
        }
    };
    let mut request = source;
    if let Some(lines) = q.lines {
        request.lines = lines;
    }
    let line = |l: String| serde_json::json!({ "line": l });
    if !q.follow {
        let lines = c.guest_logs(&name, request).await?;
        return Ok(ndjson(stream::iter(lines.into_iter().map(line))));
    }
    let log = c.follow_guest_logs(&name, request).await?;
    // How the agent failed is host detail: an admin's to read.
    let admin = c.caller().is_admin();
    let lines = stream::unfold(Some(log), move |log| async move {
        let mut log = log?;
        match log.next().await? {
            Ok(l) => Some((line(l), Some(log))),
            Err(e) if admin => Some((
                serde_json::json!({ "error": ErrorChain(&e).to_string() }),
                None,
            )),
            Err(_) => Some((
                serde_json::json!({ "error": "the agent stopped sending the log; follow it again" }),
                None,
            )),
        }
    });
    Ok(ndjson(lines.take_until(shutting_down(s.shutdown.clone()))))
}

async fn metrics_vm(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(c.metrics(&vm_name(&name)?).await?).into_response())
}

async fn snapshot_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let (vm, snapshot) = (
        vm_name(&name)?,
        required_name(body(request)?, "snapshot's name")?,
    );
    let taken = detached(async move { c.snapshot(&vm, snapshot).await }).await?;
    Ok((StatusCode::CREATED, Json(taken)).into_response())
}

async fn restore_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let (vm, snapshot) = (
        vm_name(&name)?,
        required_name(body(request)?, "snapshot to restore")?,
    );
    let key = idempotency_key(&headers)?;
    Ok(Json(detached(async move { c.restore(&vm, &snapshot, key).await }).await?).into_response())
}

async fn clone_from(
    c: Commands,
    source: CloneSource,
    headers: HeaderMap,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let name = body(request)?.name.map(|n| vm_name(&n)).transpose()?;
    let key = idempotency_key(&headers)?;
    let vm = detached(async move { c.clone_vm(source, name, key).await }).await?;
    Ok((StatusCode::CREATED, Json(vm)).into_response())
}

async fn clone_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let source = CloneSource::Vm(vm_name(&name)?);
    clone_from(c, source, headers, request).await
}

async fn clone_snapshot(
    Asking(c): Asking,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let source = CloneSource::Snapshot(vm_name(&name)?);
    clone_from(c, source, headers, request).await
}

async fn list_snapshots(Asking(c): Asking) -> ApiResult<Response> {
    Ok(Json(c.snapshots().await?).into_response())
}

async fn delete_snapshot(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    detached(async move { c.delete_snapshot(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_shares(Asking(c): Asking, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(c.shares(&vm_name(&name)?).await?).into_response())
}

async fn add_share(
    Asking(c): Asking,
    Path(name): Path<String>,
    request: JsonBody<ShareBody>,
) -> ApiResult<Response> {
    let (name, request) = (vm_name(&name)?, body(request)?);
    let share = c.share(&name, request.with, request.access).await?;
    Ok((StatusCode::CREATED, Json(share)).into_response())
}

async fn add_domain(
    Asking(c): Asking,
    Path(name): Path<String>,
    request: JsonBody<vmkit_core::api::DomainBody>,
) -> ApiResult<Response> {
    let (name, request) = (vm_name(&name)?, body(request)?);
    let added = c.add_domain(&name, &request.host).await?;
    Ok((StatusCode::CREATED, Json(added)).into_response())
}

#[derive(Deserialize)]
struct DomainsQuery {
    vm: Option<String>,
}

async fn list_domains(Asking(c): Asking, Query(q): Query<DomainsQuery>) -> ApiResult<Response> {
    let vm = q.vm.as_deref().map(vm_name).transpose()?;
    Ok(Json(c.domains(vm.as_ref()).await?).into_response())
}

async fn remove_domain(Asking(c): Asking, Path(host): Path<String>) -> ApiResult<Response> {
    c.remove_domain(&host).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct UnshareQuery {
    /// `public`, `user:ID` or `link:NAME`.
    with: String,
    access: Option<Access>,
}

async fn remove_share(
    Asking(c): Asking,
    Path(name): Path<String>,
    Query(q): Query<UnshareQuery>,
) -> ApiResult<Response> {
    let with = match q.with.split_once(':') {
        None if q.with == "public" => ShareWithView::Public,
        Some(("user", id)) => match id.trim_start_matches('u').parse() {
            Ok(id) => ShareWithView::User(UserId(id)),
            Err(_) => return Err(bad_with(&q.with)),
        },
        Some(("link", short)) if !short.is_empty() => ShareWithView::Link(short.to_owned()),
        _ => return Err(bad_with(&q.with)),
    };
    let removed = c.unshare(&vm_name(&name)?, &with, q.access).await?;
    Ok(Json(serde_json::json!({ "removed": removed })).into_response())
}

fn bad_with(with: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        format!("with={with:?} names nobody; give public, user:ID or link:NAME"),
    )
}

/// Runs a lifecycle command in its own task so a client hanging up mid-way does not
/// cancel it halfway through.
async fn detached<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T, ManagerError>> + Send + 'static,
) -> ApiResult<T> {
    tokio::spawn(fut)
        .await
        .map_err(|e| {
            error!(error = %e, "operation task failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "operation task failed",
            )
        })?
        .map_err(ApiError::from)
}

async fn exec_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    body: Result<Json<ExecBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text()))?;
    if body.argv.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "argv is empty; give the command to run",
        ));
    }
    let request = body.to_request().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("stdin is not valid base64: {e}"),
        )
    })?;
    let exec = c.exec(&vm_name(&name)?, request).await?;
    let lines = stream::unfold(Some(exec), |state| async move {
        let mut exec = state?;
        match exec.next().await {
            None => None,
            Some(Ok(event)) => {
                let line = ExecLine::from_event(&event)?;
                Some((line, Some(exec)))
            }
            Some(Err(e)) => Some((
                ExecLine::Error(ErrorBody::new("agent_failed", e.to_string())),
                None,
            )),
        }
    });
    Ok(ndjson(lines))
}

fn ndjson<T: serde::Serialize + Send + 'static>(
    items: impl Stream<Item = T> + Send + 'static,
) -> Response {
    let body = items.map(|item| {
        let mut line = serde_json::to_vec(&item).unwrap_or_else(|_| b"{}".to_vec());
        line.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(line))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Only events after this one; absent: the newest `limit`.
    after: Option<u64>,
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    follow: bool,
}

fn default_limit() -> usize {
    1000
}

/// The most events one answer holds.
const MAX_EVENTS: usize = 10_000;

async fn events(
    State(s): State<AppState>,
    Asking(c): Asking,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    // The host's whole log: an admin's. The reads below go to the manager itself.
    c.may_read_events().await?;
    if q.limit > MAX_EVENTS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "limit {} is more than the {MAX_EVENTS} events an answer holds; \
                 page through the log with after=SEQ",
                q.limit
            ),
        ));
    }
    // Where the kept history starts, for clients to say so (and page no further).
    let first = s.manager.first_event_seq().await?;
    let with_first = |mut response: Response| {
        response
            .headers_mut()
            .insert(FIRST_EVENT_HEADER, axum::http::HeaderValue::from(first));
        response
    };
    if !q.follow {
        let events = match q.after {
            Some(after) => s.manager.events(after, q.limit).await?,
            None => s.manager.newest_events(q.limit).await?,
        };
        return Ok(with_first(ndjson(stream::iter(events))));
    }
    let after = match q.after {
        // Events the retention rule removed cannot be followed from: say so (410)
        // rather than start later without a word.
        Some(after) if after.saturating_add(1) < first => {
            return Err(ManagerError::HistoryTrimmed { after, first }.into());
        }
        Some(after) => after,
        None => {
            let last = s.manager.last_event_seq().await?;
            last.saturating_sub(q.limit as u64)
                .max(first.saturating_sub(1))
        }
    };
    let feed = s.manager.follow_events(after);
    let events = stream::unfold(feed, |mut feed| async move {
        match feed.next().await {
            Ok(event) => event.map(|e| (e, feed)),
            Err(e) => {
                error!(error = %e, after = feed.last_seq(), "cannot read the event log; ending a follow");
                None
            }
        }
    });
    Ok(ndjson(events.take_until(shutting_down(s.shutdown.clone()))))
}

async fn images(Asking(c): Asking) -> ApiResult<Response> {
    Ok(Json(c.images().await?).into_response())
}

async fn list_keys(Asking(c): Asking) -> ApiResult<Response> {
    let keys = c.ssh_keys().await?;
    Ok(Json(keys.iter().map(SshKeyInfo::from).collect::<Vec<_>>()).into_response())
}

async fn add_key(Asking(c): Asking, body: Bytes) -> ApiResult<Response> {
    let text = std::str::from_utf8(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body is not UTF-8 text; send one OpenSSH public key line",
        )
    })?;
    let key = SshPublicKey::parse(text).map_err(ManagerError::from)?;
    c.add_ssh_key(&key).await?;
    Ok((StatusCode::CREATED, Json(SshKeyInfo::from(&key))).into_response())
}

async fn remove_key(Asking(c): Asking, Path(fingerprint): Path<String>) -> ApiResult<Response> {
    c.remove_ssh_key(&fingerprint).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_api_keys(Asking(c): Asking) -> ApiResult<Response> {
    Ok(Json(c.api_keys().await?).into_response())
}

async fn create_api_key(Asking(c): Asking, request: JsonBody<NewApiKey>) -> ApiResult<Response> {
    let body = body(request)?;
    let scope = match body.read_only {
        true => ApiKeyScope::ReadOnly,
        false => ApiKeyScope::Full,
    };
    let expires_in = body.expires_in_secs.map(std::time::Duration::from_secs);
    let key = c
        .create_api_key(&body.label, expires_in, scope, body.vm.as_ref())
        .await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

async fn revoke_api_key(Asking(c): Asking, Path(id): Path<String>) -> ApiResult<Response> {
    c.revoke_api_key(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use vmkit_core::testing::FakeHost;
    use vmkit_core::testing::policy::{Op, Outcome, Scene, Who, expected};

    use super::*;

    async fn app() -> Router {
        app_on(&FakeHost::new().await)
    }

    fn app_on(host: &FakeHost) -> Router {
        router(AppState {
            manager: host.manager.clone(),
            shutdown: watch::channel(false).1,
            not_ready: None,
            ca_certificate: None,
        })
    }

    /// A fake host whose user may create any number of VMs.
    async fn unlimited_host() -> FakeHost {
        FakeHost::with_config(
            vmkit_core::ManagerConfig::new("/nonexistent/vmkit")
                .default_quota(vmkit_core::Quota::unlimited()),
        )
        .await
    }

    async fn call(app: Router, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
        let response = app
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_owned()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn after_a_failed_reconcile_readyz_says_why_and_the_api_still_serves() {
        let host = FakeHost::new().await;
        let app = router(AppState {
            manager: host.manager.clone(),
            shutdown: watch::channel(false).1,
            not_ready: Some("reconcile failed at start: the store is unreadable".into()),
            ca_certificate: None,
        });
        let (status, body) = call(app.clone(), "GET", "/readyz", "").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("the store is unreadable"), "{body}");
        assert_eq!(
            call(app.clone(), "GET", "/livez", "").await.0,
            StatusCode::OK
        );
        let (status, body) = call(app, "POST", "/v1/vms", r#"{"name":"web"}"#).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    #[tokio::test]
    async fn livez_and_readyz_answer_ok() {
        assert_eq!(
            call(app().await, "GET", "/livez", "").await.0,
            StatusCode::OK
        );
        assert_eq!(
            call(app().await, "GET", "/readyz", "").await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn create_returns_201_and_the_record() {
        let (status, body) = call(app().await, "POST", "/v1/vms", r#"{"name":"web"}"#).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let vm: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(vm["state"], "running");
    }

    #[tokio::test]
    async fn malformed_body_is_a_400_with_a_code() {
        let (status, body) = call(app().await, "POST", "/v1/vms", r#"{"vcpus":"many"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("invalid_body"), "{body}");
    }

    #[tokio::test]
    async fn unknown_vm_is_a_404_and_invalid_name_a_400() {
        let (status, body) = call(app().await, "GET", "/v1/vms/ghost", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("not_found"), "{body}");
        let (status, body) = call(app().await, "GET", "/v1/vms/Bad_Name", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("invalid_name"), "{body}");
    }

    #[tokio::test]
    async fn exec_with_empty_argv_is_refused() {
        let app = app().await;
        let (status, _) = call(app.clone(), "POST", "/v1/vms", r#"{"name":"web"}"#).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = call(app, "POST", "/v1/vms/web/exec", r#"{"argv":[]}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("argv is empty"), "{body}");
    }

    #[tokio::test]
    async fn delete_keeping_the_data_answers_where_it_went_and_a_plain_delete_nothing() {
        let app = app().await;
        for name in ["keep", "drop", "nodisk"] {
            let disk = if name == "nodisk" { 0 } else { 1 };
            let body = format!(r#"{{"name":"{name}","disk_gib":{disk}}}"#);
            let (status, body) = call(app.clone(), "POST", "/v1/vms", &body).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        let (status, body) = call(app.clone(), "DELETE", "/v1/vms/keep?keep_data=true", "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let deleted: vmkit_core::Deleted = serde_json::from_str(&body).unwrap();
        assert_eq!(deleted.name.as_str(), "keep");
        let kept = deleted.kept_data.expect("the data volume was kept");
        assert!(kept.starts_with("/fake/kept"), "{}", kept.display());

        let (status, body) = call(app.clone(), "DELETE", "/v1/vms/drop", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));
        let (status, body) = call(app.clone(), "DELETE", "/v1/vms/nodisk?keep_data=true", "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let deleted: vmkit_core::Deleted = serde_json::from_str(&body).unwrap();
        assert_eq!(deleted.kept_data, None, "no data volume, nothing kept");
    }

    /// An ed25519 key made by ssh-keygen; its fingerprint holds a `/`.
    const CAROL: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDEarYz70Byb4F3tObLPQOH7OcIbLkodxbuDcfZAAi+t carol@example";
    const CAROL_FP: &str = "SHA256:KzM679Yuc/e1EFD2JStDlL8a8O5S280Jkl5hJDN5wfk";

    #[tokio::test]
    async fn a_key_is_added_once_listed_given_to_new_vms_and_removed() {
        let host = FakeHost::new().await;
        let app = app_on(&host);
        let (status, body) = call(app.clone(), "POST", "/v1/keys", &format!("{CAROL}\n")).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let added: SshKeyInfo = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (added.fingerprint.as_str(), added.key.as_str()),
            (CAROL_FP, CAROL)
        );
        let (status, body) = call(app.clone(), "POST", "/v1/keys", CAROL).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(body.contains("ssh_key_exists"), "{body}");

        let (status, body) = call(app.clone(), "GET", "/v1/keys", "").await;
        assert_eq!(status, StatusCode::OK);
        let listed: Vec<SshKeyInfo> = serde_json::from_str(&body).unwrap();
        assert_eq!(listed, vec![added]);

        let (status, body) = call(app.clone(), "POST", "/v1/vms", r#"{"name":"web"}"#).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let vm: vmkit_core::VmView = serde_json::from_str(&body).unwrap();
        let pid = vm.resources.unwrap().vmm.unwrap().pid;
        // Carol's key, and the gateway's key for this VM.
        let gateway_key = host.manager.vm_key(vm.id).public_key().to_openssh();
        assert_eq!(
            host.hypervisor.guest(pid).unwrap().ssh_keys,
            vec![CAROL.to_owned(), gateway_key]
        );

        // The fingerprint's `/` is percent-encoded in the path.
        let path = format!("/v1/keys/{}", CAROL_FP.replace('/', "%2F"));
        let (status, body) = call(app.clone(), "DELETE", &path, "").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, body) = call(app.clone(), "DELETE", &path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("ssh_key_not_found"), "{body}");
        let (_, body) = call(app, "GET", "/v1/keys", "").await;
        assert_eq!(body, "[]");
    }

    #[tokio::test]
    async fn the_operator_makes_an_api_key_shown_once_lists_it_and_revokes_it() {
        let host = FakeHost::new().await;
        let app = app_on(&host);
        let (status, body) = call(
            app.clone(),
            "POST",
            "/v1/api-keys",
            r#"{"label":"ci","expires_in_secs":3600,"read_only":true}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let made: vmkit_core::ApiKeyView = serde_json::from_str(&body).unwrap();
        assert!(
            made.secret.as_deref().unwrap().starts_with("vmk_"),
            "{body}"
        );
        assert_eq!(made.scope, ApiKeyScope::ReadOnly);

        let (status, body) = call(app.clone(), "GET", "/v1/api-keys", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(!body.contains("vmk_") && !body.contains("hash"), "{body}");
        let listed: Vec<vmkit_core::ApiKeyView> = serde_json::from_str(&body).unwrap();
        assert_eq!(listed.len(), 1);

        let path = format!("/v1/api-keys/{}", made.id);
        let (status, _) = call(app.clone(), "DELETE", &path, "").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = call(app.clone(), "DELETE", &path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("api_key_not_found"), "{body}");
        let (status, body) = call(app, "POST", "/v1/api-keys", r#"{"vm":"nope"}"#).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }

    #[tokio::test]
    async fn a_body_that_is_not_one_public_key_is_a_400_saying_what_is_expected() {
        let app = app().await;
        for (body, says) in [
            (
                "",
                "expected an OpenSSH public key line such as `ssh-ed25519 AAAA...",
            ),
            ("ssh-dss AAAA", "use ssh-ed25519, ssh-rsa or ecdsa-sha2-*"),
            ("ssh-ed25519 !!!", "copy the whole line of the .pub file"),
            (&format!("{CAROL}\n{CAROL}"), "give one key at a time"),
        ] {
            let (status, answer) = call(app.clone(), "POST", "/v1/keys", body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {answer}");
            let error: ErrorBody = serde_json::from_str(&answer).unwrap();
            assert_eq!(error.code, "invalid_ssh_key");
            assert!(error.message.contains(says), "{body:?}: {}", error.message);
        }
        let (_, body) = call(app, "GET", "/v1/keys", "").await;
        assert_eq!(body, "[]", "nothing was registered");
    }

    /// Stores `count` events without broadcasting them, as if their broadcasts were
    /// lost or crossed.
    async fn store_unannounced(host: &FakeHost, count: usize) {
        use vmkit_core::{EventKind, NewEvent, StateStore};
        for i in 0..count {
            let kind = EventKind::Reconciled {
                action: format!("unannounced {i}"),
            };
            host.store
                .append_event(
                    NewEvent::host(kind),
                    &vmkit_core::EventRetention::unlimited(),
                )
                .await
                .unwrap();
        }
    }

    /// The events of a streaming NDJSON answer, read as they arrive.
    struct EventLines {
        body: Body,
        buf: Vec<u8>,
    }

    impl EventLines {
        async fn get(app: Router, uri: &str) -> Self {
            let response = app
                .oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            Self {
                body: response.into_body(),
                buf: Vec::new(),
            }
        }

        /// The next event's number, or `None` if none comes within `wait`.
        async fn next_within(&mut self, wait: std::time::Duration) -> Option<u64> {
            loop {
                if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=end).collect();
                    let event: vmkit_core::Event = serde_json::from_slice(&line).unwrap();
                    return Some(event.seq);
                }
                let frame = tokio::time::timeout(wait, self.body.frame()).await.ok()?;
                let frame = frame.expect("a follow does not end").unwrap();
                self.buf.extend_from_slice(&frame.into_data().unwrap());
            }
        }

        /// The numbers of the events up to and including `last`.
        async fn seqs_until(&mut self, last: u64) -> Vec<u64> {
            let mut seqs = Vec::new();
            while seqs.last() != Some(&last) {
                let seq = self
                    .next_within(std::time::Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|| panic!("no event after {seqs:?}; waiting for {last}"));
                seqs.push(seq);
            }
            seqs
        }
    }

    fn seqs(body: &str) -> Vec<u64> {
        body.lines()
            .map(|l| serde_json::from_str::<vmkit_core::Event>(l).unwrap().seq)
            .collect()
    }

    /// With the retention rule keeping 10 of 25 events: answers say where the kept
    /// history starts, and a read or follow from before it is refused with 410
    /// instead of silently starting later.
    #[tokio::test]
    async fn events_say_where_the_kept_history_starts_and_refuse_to_skip_trimmed_ones() {
        use vmkit_core::{EventKind, EventRetention, NewEvent, StateStore};
        let host = FakeHost::new().await;
        for i in 0..25 {
            let kind = EventKind::Reconciled {
                action: format!("event {i}"),
            };
            host.store
                .append_event(NewEvent::host(kind), &EventRetention::new(10))
                .await
                .unwrap();
        }
        let app = app_on(&host);
        let response = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/v1/events?limit=3")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[FIRST_EVENT_HEADER], "16");
        let (_, body) = call(app.clone(), "GET", "/v1/events?limit=100", "").await;
        assert_eq!(seqs(&body), (16..=25).collect::<Vec<_>>(), "the kept ten");
        let (_, body) = call(app.clone(), "GET", "/v1/events?after=15&limit=2", "").await;
        assert_eq!(
            seqs(&body),
            vec![16, 17],
            "from the start of the kept history"
        );

        for uri in ["/v1/events?after=3", "/v1/events?after=0&follow=true"] {
            let (status, body) = call(app.clone(), "GET", uri, "").await;
            assert_eq!(status, StatusCode::GONE, "{uri}: {body}");
            let error: ErrorBody = serde_json::from_str(&body).unwrap();
            assert_eq!(error.code, "history_trimmed");
            assert!(
                error.message.contains("starts at event 16") && error.message.contains("after=15"),
                "{}",
                error.message
            );
        }
        let mut follow = EventLines::get(app, "/v1/events?after=15&follow=true").await;
        assert_eq!(follow.seqs_until(25).await, (16..=25).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn events_are_the_newest_by_default_and_page_with_after_and_limit() {
        let host = FakeHost::new().await;
        store_unannounced(&host, 1500).await;
        let app = app_on(&host);
        let (status, body) = call(app.clone(), "GET", "/v1/events", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seqs(&body), (501..=1500).collect::<Vec<_>>());
        let (_, body) = call(app.clone(), "GET", "/v1/events?limit=3", "").await;
        assert_eq!(seqs(&body), vec![1498, 1499, 1500]);
        let (_, body) = call(app.clone(), "GET", "/v1/events?after=0&limit=3", "").await;
        assert_eq!(seqs(&body), vec![1, 2, 3]);
        let (_, body) = call(app.clone(), "GET", "/v1/events?after=1499", "").await;
        assert_eq!(seqs(&body), vec![1500]);
        let (status, body) = call(app, "GET", "/v1/events?limit=10001", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("page through the log with after"), "{body}");
    }

    #[tokio::test]
    async fn follow_pages_through_a_backlog_of_over_a_thousand_events_then_follows_without_a_gap() {
        let host = FakeHost::new().await;
        store_unannounced(&host, 2500).await;
        let app = app_on(&host);
        let mut follow = EventLines::get(app, "/v1/events?after=0&follow=true").await;
        assert_eq!(
            follow.seqs_until(2500).await,
            (1..=2500).collect::<Vec<_>>()
        );
        // More live events than the broadcast holds arrive before the follower
        // reads on: it falls behind and catches up from the store.
        let web = VmName::new("web").unwrap();
        let request = CreateRequest::new(UserId::LOCAL, vmkit_core::VmSpec::new("tiny"));
        host.manager
            .create(request.name(web.clone()))
            .await
            .unwrap();
        for _ in 0..300 {
            host.manager.stop(&web).await.unwrap();
            host.manager.start(&web).await.unwrap();
        }
        let last = host.manager.last_event_seq().await.unwrap();
        assert_eq!(last, 2500 + 2 + 300 * 4);
        assert_eq!(
            follow.seqs_until(last).await,
            (2501..=last).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn follow_without_after_starts_at_the_newest_limit_events() {
        let host = FakeHost::new().await;
        store_unannounced(&host, 10).await;
        let app = app_on(&host);
        let mut follow = EventLines::get(app.clone(), "/v1/events?follow=true&limit=2").await;
        assert_eq!(follow.seqs_until(10).await, vec![9, 10]);
        let (status, _) = call(app, "POST", "/v1/vms", r#"{"name":"web"}"#).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(follow.seqs_until(12).await, vec![11, 12]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn follow_delivers_every_event_once_in_order_while_many_vms_change_at_once() {
        let host = unlimited_host().await;
        let app = app_on(&host);
        let mut follow = EventLines::get(app, "/v1/events?after=0&follow=true").await;
        // The follower reads while the VMs change; it stops at the last event once
        // it learns which one that is.
        let (last_tx, mut last_rx) = tokio::sync::watch::channel(u64::MAX);
        let reader = tokio::spawn(async move {
            let mut seqs: Vec<u64> = Vec::new();
            loop {
                if seqs.last() == Some(&*last_rx.borrow()) {
                    break;
                }
                tokio::select! {
                    seq = follow.next_within(std::time::Duration::from_secs(10)) => {
                        seqs.push(seq.unwrap_or_else(|| panic!("the follow stalled after {seqs:?}")));
                    }
                    _ = last_rx.changed() => {}
                }
            }
            let extra = follow
                .next_within(std::time::Duration::from_millis(200))
                .await;
            (seqs, extra)
        });
        let mut work = tokio::task::JoinSet::new();
        for i in 0..40 {
            let manager = host.manager.clone();
            work.spawn(async move {
                let name = VmName::new(format!("vm-{i}")).unwrap();
                let spec = vmkit_core::VmSpec::new("tiny");
                let request = CreateRequest::new(UserId::LOCAL, spec).name(name.clone());
                manager.create(request).await.unwrap();
                manager.stop(&name).await.unwrap();
                manager.start(&name).await.unwrap();
                manager
                    .delete(&name, DeleteOptions::default())
                    .await
                    .unwrap();
            });
        }
        // Events whose broadcast never comes, stored among the others.
        let unannounced = host.clone();
        work.spawn(async move {
            for _ in 0..20 {
                store_unannounced(&unannounced, 3).await;
                tokio::task::yield_now().await;
            }
        });
        while let Some(done) = work.join_next().await {
            done.unwrap();
        }
        // The last events are announced, as the manager announces all of its own.
        let request = CreateRequest::new(UserId::LOCAL, vmkit_core::VmSpec::new("tiny"));
        host.manager.create(request).await.unwrap();
        let last = host.manager.last_event_seq().await.unwrap();
        assert_eq!(last, 40 * 8 + 60 + 2);
        last_tx.send(last).unwrap();
        let (seqs, extra) = reader.await.unwrap();
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
        assert_eq!(extra, None, "nothing is sent twice");
    }

    /// One HTTP/1.1 request on a fresh connection to the Unix socket `path`;
    /// returns the status code and the body.
    async fn over_socket(
        path: &std::path::Path,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
        let request = format!(
            "{method} {uri} HTTP/1.1\r\nhost: vmkit\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    }

    /// Sends `count` requests at once; request `i` must answer the status it names.
    async fn all_at_once(
        socket: &std::path::Path,
        count: usize,
        request: impl Fn(usize) -> ((&'static str, String, String), u16),
    ) {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..count {
            let ((method, uri, body), expect) = request(i);
            let socket = socket.to_owned();
            calls.spawn(async move {
                let (status, body) = over_socket(&socket, method, &uri, &body).await;
                (i, method, uri, status, expect, body)
            });
        }
        while let Some(done) = calls.join_next().await {
            let (i, method, uri, status, expect, body) = done.unwrap();
            assert_eq!(status, expect, "request {i} ({method} {uri}): {body}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_hundred_concurrent_creates_and_deletes_through_the_socket_leave_nothing() {
        use vmkit_core::testing::Holdings;
        let host = unlimited_host().await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vmkit.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let app = app_on(&host);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let create = |i: usize| {
            (
                "POST",
                "/v1/vms".to_owned(),
                format!(r#"{{"name":"c{i}"}}"#),
            )
        };
        let delete = |i: usize| ("DELETE", format!("/v1/vms/c{i}"), String::new());
        all_at_once(&socket, 200, |i| (create(i), 201)).await;
        assert_eq!(
            host.holdings().await,
            Holdings {
                vms: 200,
                volumes: 200,
                taps: 200,
                leases: 200,
                vmms: 200
            }
        );
        let ips: std::collections::BTreeSet<_> = host
            .manager
            .list(None)
            .await
            .unwrap()
            .iter()
            .map(|vm| vm.ip().unwrap())
            .collect();
        assert_eq!(ips.len(), 200, "every VM has its own address");

        // Creates of new VMs and deletes of the first ones, interleaved.
        all_at_once(&socket, 200, |i| {
            if i % 2 == 0 {
                (create(200 + i / 2), 201)
            } else {
                (delete(i / 2), 204)
            }
        })
        .await;
        assert_eq!(host.holdings().await.vms, 200);
        all_at_once(&socket, 200, |i| (delete(100 + i), 204)).await;
        assert_eq!(host.holdings().await, Holdings::default(), "nothing leaks");
        server.abort();
    }

    /// The API for `caller`, as a door that identified them would serve it.
    fn app_for(host: &FakeHost, caller: Caller) -> Router {
        routes(AppState {
            manager: host.manager.clone(),
            shutdown: watch::channel(false).1,
            not_ready: None,
            ca_certificate: None,
        })
        .layer(axum::Extension(caller))
    }

    /// The request `op` makes over HTTP.
    fn request_of(op: Op) -> (&'static str, String, String) {
        let vm = |path: &str| format!("/v1/vms/web{path}");
        let (method, uri, body) = match op {
            Op::Whoami => ("GET", "/v1/whoami".into(), ""),
            Op::List => ("GET", "/v1/vms".into(), ""),
            Op::Create => ("POST", "/v1/vms".into(), r#"{"name":"fresh"}"#),
            Op::Get => ("GET", vm(""), ""),
            Op::Metrics => ("GET", vm("/metrics"), ""),
            Op::Logs => ("GET", vm("/logs"), ""),
            Op::Exec => ("POST", vm("/exec"), r#"{"argv":["echo","hi"]}"#),
            Op::Start => ("POST", vm("/start"), ""),
            Op::Stop => ("POST", vm("/stop"), ""),
            Op::Restart => ("POST", vm("/restart"), ""),
            Op::Pause => ("POST", vm("/pause"), ""),
            Op::Resume => ("POST", vm("/resume"), ""),
            Op::Resize => ("POST", vm("/resize"), r#"{"vcpus":2}"#),
            Op::Snapshot => ("POST", vm("/snapshots"), r#"{"name":"snap2"}"#),
            Op::Restore => ("POST", vm("/restore"), r#"{"name":"snap"}"#),
            Op::Clone => ("POST", vm("/clone"), r#"{"name":"copy"}"#),
            Op::Delete => ("DELETE", vm(""), ""),
            Op::Rename => ("POST", vm("/rename"), r#"{"name":"web2"}"#),
            Op::Share => (
                "POST",
                vm("/shares"),
                r#"{"with":{"kind":"public"},"access":"http"}"#,
            ),
            Op::Shares => ("GET", vm("/shares"), ""),
            Op::ListSnapshots => ("GET", "/v1/snapshots".into(), ""),
            Op::DeleteSnapshot => ("DELETE", "/v1/snapshots/snap".into(), ""),
            Op::CloneSnapshot => (
                "POST",
                "/v1/snapshots/snap/clone".into(),
                r#"{"name":"copy"}"#,
            ),
            Op::Events => ("GET", "/v1/events?limit=5".into(), ""),
            Op::Keys => ("GET", "/v1/keys".into(), ""),
            Op::Images => ("GET", "/v1/images".into(), ""),
            _ => unreachable!("an op this test does not know: {op:?}"),
        };
        let body = match (method, body) {
            ("POST", "") => "{}",
            (_, body) => body,
        };
        (method, uri, body.to_owned())
    }

    /// What an answer over HTTP says, reduced to its outcome.
    fn outcome_of(op: Op, status: StatusCode, body: &str) -> Result<Outcome, String> {
        if status.is_success() {
            return Ok(match op {
                Op::List | Op::ListSnapshots => {
                    let items: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
                    let wanted = if op == Op::List { "web" } else { "snap" };
                    Outcome::Listed(items.iter().any(|i| i["name"] == wanted))
                }
                _ => Outcome::Done,
            });
        }
        let error: ErrorBody = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        Ok(match (status.as_u16(), error.code.as_str()) {
            (404, "not_found" | "snapshot_not_found") => Outcome::NotFound,
            (403, "forbidden") => Outcome::Forbidden,
            (403, "suspended") => Outcome::Suspended,
            (403, "admin_only") => Outcome::AdminOnly,
            (401, "sign_in_required") => Outcome::SignIn,
            _ => return Err(format!("{status} {body}")),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_http_every_caller_gets_the_answer_the_policy_matrix_gives() {
        let mut wrong = Vec::new();
        for who in Who::ALL {
            for op in Op::ALL {
                let scene = Scene::new().await;
                scene.prepare(op).await;
                let (method, uri, body) = request_of(op);
                let (status, answer) =
                    call(app_for(&scene.host, scene.caller(who)), method, &uri, &body).await;
                let got = outcome_of(op, status, &answer);
                let want = expected(who, op);
                if got != Ok(want) {
                    wrong.push(format!("{who:?} {op:?}: got {got:?}, want {want:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Every string of a JSON answer, with where it is.
    fn strings(value: &serde_json::Value, at: String, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::String(s) => out.push((at, s.clone())),
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    strings(item, format!("{at}[{i}]"), out);
                }
            }
            serde_json::Value::Object(fields) => {
                for (k, v) in fields {
                    strings(v, format!("{at}.{k}"), out);
                }
            }
            _ => {}
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_answer_to_a_user_holds_a_host_path_a_pid_or_an_error_chain() {
        for who in [Who::Owner, Who::SshSharee, Who::Stranger, Who::LinkHolder] {
            for op in Op::ALL {
                let scene = Scene::new().await;
                scene.prepare(op).await;
                // A backend that fails, so that error answers are walked too.
                if op == Op::Delete {
                    scene.host.faults.break_op(
                        "storage.delete",
                        None,
                        vmkit_core::testing::Breakage::Error,
                    );
                }
                let (method, uri, body) = request_of(op);
                let (status, answer) =
                    call(app_for(&scene.host, scene.caller(who)), method, &uri, &body).await;
                for line in answer.lines().filter(|l| l.starts_with(['{', '['])) {
                    let value: serde_json::Value = serde_json::from_str(line).unwrap();
                    let mut all = Vec::new();
                    strings(&value, String::new(), &mut all);
                    for (at, s) in all {
                        assert!(
                            !s.contains("/fake")
                                && !s.contains("/nonexistent")
                                && !s.contains("/run"),
                            "{who:?} {op:?} ({status}): {at} holds a host path: {s}"
                        );
                        assert!(!s.contains("injected"), "{who:?} {op:?}: {at}: {s}");
                    }
                    assert!(!line.contains("\"pid\""), "{who:?} {op:?}: {line}");
                    assert!(!line.contains("\"resources\""), "{who:?} {op:?}: {line}");
                }
            }
        }
    }

    #[tokio::test]
    async fn an_admin_reads_the_causes_of_an_error_and_a_user_only_what_failed() {
        let scene = Scene::new().await;
        scene
            .host
            .faults
            .break_op("storage.delete", None, vmkit_core::testing::Breakage::Error);
        let request = ("DELETE", "/v1/vms/web", "");
        let (status, owner) = call(
            app_for(&scene.host, scene.caller(Who::Owner)),
            request.0,
            request.1,
            request.2,
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{owner}");
        let (_, operator) = call(app_on(&scene.host), request.0, request.1, request.2).await;
        let owner: ErrorBody = serde_json::from_str(&owner).unwrap();
        let operator: ErrorBody = serde_json::from_str(&operator).unwrap();
        assert_eq!(owner.code, operator.code, "the same stable code");
        assert!(!owner.message.contains("injected"), "{}", owner.message);
        assert!(
            operator.message.contains("injected"),
            "{}",
            operator.message
        );
    }

    #[tokio::test]
    async fn a_create_retried_after_a_client_timeout_answers_the_same_vm() {
        let scene = Scene::new().await;
        let app = app_for(&scene.host, scene.caller(Who::Owner));
        let post = |key: &str, body: &str| {
            Request::builder()
                .method("POST")
                .uri("/v1/vms")
                .header("content-type", "application/json")
                .header(IDEMPOTENCY_KEY_HEADER, key)
                .body(Body::from(body.to_owned()))
                .unwrap()
        };
        // The first client gives up at once; the create goes on without it.
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(1),
            app.clone().oneshot(post("k-1", r#"{"name":"once"}"#)),
        )
        .await;
        drop(gave_up);
        let mut ids = Vec::new();
        for _ in 0..2 {
            let response = app
                .clone()
                .oneshot(post("k-1", r#"{"name":"once"}"#))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::CREATED);
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let vm: vmkit_core::VmView = serde_json::from_slice(&bytes).unwrap();
            ids.push(vm.id);
        }
        assert_eq!(ids[0], ids[1]);
        let listed = scene.host.manager.list(None).await.unwrap();
        assert_eq!(
            listed.iter().filter(|v| v.name.as_str() == "once").count(),
            1
        );
        let response = app
            .oneshot(post("k-1", r#"{"name":"other"}"#))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT);
    }
}
