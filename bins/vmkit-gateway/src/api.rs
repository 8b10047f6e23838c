//! The REST API: a thin adapter from HTTP to [`Manager`] commands. Routes and wire
//! types are documented in `vmkit_core::api`.

mod users;

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::error;
use vmkit_core::api::{
    CreateVm, ErrorBody, ExecBody, ExecLine, FIRST_EVENT_HEADER, NameBody, SshKeyInfo, status_for,
};
use vmkit_core::{
    CloneSource, CreateRequest, DeleteOptions, ErrorChain, ErrorKind, Manager, ManagerError,
    ResizeRequest, SshPublicKey, UserId, VmName,
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
}

/// Resolves once `shutdown` turns true; never if its sender is gone without.
async fn shutting_down(mut shutdown: watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The API router.
pub fn router(state: AppState) -> Router {
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
        .merge(users::router())
        .with_state(state)
}

/// An API error: a status and a JSON body. Internal detail is logged, not sent.
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
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
        Self::new(status, e.code(), ErrorChain(&e).to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
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

async fn list_vms(State(s): State<AppState>) -> ApiResult<Response> {
    Ok(Json(s.manager.list(None).await?).into_response())
}

async fn get_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.manager.get(&vm_name(&name)?).await?).into_response())
}

async fn create_vm(
    State(s): State<AppState>,
    body: Result<Json<CreateVm>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text()))?;
    let defaults = &s.manager.config().default_spec;
    let mut request = CreateRequest::new(UserId::LOCAL, body.spec_or(defaults));
    if let Some(name) = &body.name {
        request = request.name(vm_name(name)?);
    }
    // The create runs to completion even if the client goes away, so that a
    // dropped connection never leaves a half-created VM.
    let manager = s.manager.clone();
    let vm = tokio::spawn(async move { manager.create(request).await })
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
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let options = DeleteOptions::default().keep_data(q.keep_data);
    let manager = s.manager.clone();
    let deleted = detached(async move { manager.delete(&name, options).await }).await?;
    if q.keep_data {
        // Where the kept data went is the answer.
        return Ok(Json(deleted).into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let manager = s.manager.clone();
    Ok(Json(detached(async move { manager.start(&name).await }).await?).into_response())
}

async fn stop_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let manager = s.manager.clone();
    Ok(Json(detached(async move { manager.stop(&name).await }).await?).into_response())
}

async fn restart_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let manager = s.manager.clone();
    Ok(Json(detached(async move { manager.restart(&name).await }).await?).into_response())
}

async fn pause_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let manager = s.manager.clone();
    Ok(Json(detached(async move { manager.pause(&name).await }).await?).into_response())
}

async fn resume_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let manager = s.manager.clone();
    Ok(Json(detached(async move { manager.resume(&name).await }).await?).into_response())
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
    State(s): State<AppState>,
    Path(name): Path<String>,
    request: JsonBody<ResizeRequest>,
) -> ApiResult<Response> {
    let (name, request) = (vm_name(&name)?, body(request)?);
    let manager = s.manager.clone();
    Ok(Json(detached(async move { manager.resize(&name, request).await }).await?).into_response())
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
            let text = s.manager.logs(&name, q.bytes.min(16 << 20)).await?;
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
        let lines = s.manager.guest_logs(&name, request).await?;
        return Ok(ndjson(stream::iter(lines.into_iter().map(line))));
    }
    let log = s.manager.follow_guest_logs(&name, request).await?;
    let lines = stream::unfold(Some(log), move |log| async move {
        let mut log = log?;
        match log.next().await? {
            Ok(l) => Some((line(l), Some(log))),
            Err(e) => Some((
                serde_json::json!({ "error": ErrorChain(&e).to_string() }),
                None,
            )),
        }
    });
    Ok(ndjson(lines.take_until(shutting_down(s.shutdown.clone()))))
}

async fn metrics_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.manager.metrics(&vm_name(&name)?).await?).into_response())
}

async fn snapshot_vm(
    State(s): State<AppState>,
    Path(name): Path<String>,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let (vm, snapshot) = (
        vm_name(&name)?,
        required_name(body(request)?, "snapshot's name")?,
    );
    let manager = s.manager.clone();
    let taken = detached(async move { manager.snapshot(&vm, snapshot).await }).await?;
    Ok((StatusCode::CREATED, Json(taken)).into_response())
}

async fn restore_vm(
    State(s): State<AppState>,
    Path(name): Path<String>,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let (vm, snapshot) = (
        vm_name(&name)?,
        required_name(body(request)?, "snapshot to restore")?,
    );
    let manager = s.manager.clone();
    Ok(Json(detached(async move { manager.restore(&vm, &snapshot).await }).await?).into_response())
}

async fn clone_from(
    s: AppState,
    source: CloneSource,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let name = body(request)?.name.map(|n| vm_name(&n)).transpose()?;
    let manager = s.manager.clone();
    let vm = detached(async move { manager.clone_vm(source, name, UserId::LOCAL).await }).await?;
    Ok((StatusCode::CREATED, Json(vm)).into_response())
}

async fn clone_vm(
    State(s): State<AppState>,
    Path(name): Path<String>,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let source = CloneSource::Vm(vm_name(&name)?);
    clone_from(s, source, request).await
}

async fn clone_snapshot(
    State(s): State<AppState>,
    Path(name): Path<String>,
    request: JsonBody<NameBody>,
) -> ApiResult<Response> {
    let source = CloneSource::Snapshot(vm_name(&name)?);
    clone_from(s, source, request).await
}

async fn list_snapshots(State(s): State<AppState>) -> ApiResult<Response> {
    Ok(Json(s.manager.list_snapshots(None).await?).into_response())
}

async fn delete_snapshot(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let name = vm_name(&name)?;
    let manager = s.manager.clone();
    detached(async move { manager.delete_snapshot(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
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
    State(s): State<AppState>,
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
    let exec = s.manager.exec(&vm_name(&name)?, request).await?;
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

async fn events(State(s): State<AppState>, Query(q): Query<EventsQuery>) -> ApiResult<Response> {
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

async fn images(State(s): State<AppState>) -> ApiResult<Response> {
    let names = s
        .manager
        .backends()
        .images
        .list()
        .await
        .map_err(ManagerError::from)?;
    Ok(Json(names).into_response())
}

async fn list_keys(State(s): State<AppState>) -> ApiResult<Response> {
    let keys = s.manager.ssh_keys(UserId::LOCAL).await?;
    Ok(Json(keys.iter().map(SshKeyInfo::from).collect::<Vec<_>>()).into_response())
}

async fn add_key(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let text = std::str::from_utf8(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body is not UTF-8 text; send one OpenSSH public key line",
        )
    })?;
    let key = SshPublicKey::parse(text).map_err(ManagerError::from)?;
    s.manager.add_ssh_key(UserId::LOCAL, &key).await?;
    Ok((StatusCode::CREATED, Json(SshKeyInfo::from(&key))).into_response())
}

async fn remove_key(
    State(s): State<AppState>,
    Path(fingerprint): Path<String>,
) -> ApiResult<Response> {
    s.manager
        .remove_ssh_key(UserId::LOCAL, &fingerprint)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use vmkit_core::testing::FakeHost;

    use super::*;

    async fn app() -> Router {
        app_on(&FakeHost::new().await)
    }

    fn app_on(host: &FakeHost) -> Router {
        router(AppState {
            manager: host.manager.clone(),
            shutdown: watch::channel(false).1,
            not_ready: None,
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
        let vm: vmkit_core::VmRecord = serde_json::from_str(&body).unwrap();
        let pid = vm.resources.vmm.unwrap().pid;
        assert_eq!(host.hypervisor.guest(pid).unwrap().ssh_keys, vec![CAROL]);

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
}
