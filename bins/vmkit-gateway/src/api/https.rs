//! The REST API over HTTPS on the apex host (`https://DOMAIN/api/v1/...`): the
//! socket API's routes ([`routes`](super::routes)), for the caller a `vmk_` key
//! identifies (`Authorization: Bearer vmk_...`), so the same operations under the
//! same access rules and error codes as the socket, the lobby and the CLI.
//!
//! Every request needs a key: one without, or with a key that identifies nobody, gets
//! 401 with `WWW-Authenticate: Bearer`. Each key may make a burst of requests, then so
//! many a minute (`[https] api_burst`, `api_requests_per_minute`); past that, 429 with
//! `Retry-After`. Request bodies are capped at [`MAX_BODY`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use sync_wrapper::SyncWrapper;
use tower::ServiceExt as _;
use vmkit_core::api::ErrorBody;
use vmkit_core::{ApiKey, Credential, Door, Gateway};
use vmkit_net::https::{ApexApi, ApiBody};

use super::AppState;

/// The largest request body, in bytes.
pub const MAX_BODY: usize = 1 << 20;
/// Keys whose buckets are kept before the full ones are forgotten.
const MAX_BUCKETS: usize = 10_000;

/// Who may call, and how often.
struct Keys {
    gateway: Arc<dyn Gateway>,
    /// Requests at once.
    burst: f64,
    /// Requests a second after the burst.
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A token bucket: `tokens` left at `at`.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Keys {
    /// Takes a request from `key`'s bucket; `Err(seconds)` to wait when it is empty.
    fn take(&self, key: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (burst, per_second) = (self.burst, self.per_second);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            // Forget the keys that are back to a full burst: they lose nothing.
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * per_second < burst
            });
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / per_second).ceil().max(1.0) as u64)
        }
    }
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"vmkit\""),
        );
    }
    response
}

/// Identifies the request's key and puts its caller in the request.
async fn authenticate(State(keys): State<Arc<Keys>>, mut request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_owned());
    let Some(secret) = presented else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "sign_in_required",
            "this API takes an API key: send `Authorization: Bearer vmk_...` (make one with \
             `ssh HOST api-key new`)",
        );
    };
    let caller = match keys
        .gateway
        .identify(Credential::ApiKey(&secret), Door::Https)
        .await
    {
        Ok(Some(caller)) => caller,
        Ok(None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "sign_in_required",
                "the API key is unknown, revoked or expired",
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "identifying an API key failed");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_failed",
                "the host could not check the key; try again",
            );
        }
    };
    let bucket = ApiKey::id_of(&secret).unwrap_or_default().to_owned();
    if let Err(wait) = keys.take(&bucket) {
        let mut response = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("too many requests with this key; try again in {wait} s"),
        );
        if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// An axum body the edge can hold: [`SyncWrapper`] makes it `Sync` (it is only
/// ever polled through `&mut`).
struct SyncBody(SyncWrapper<axum::body::Body>);

impl hyper::body::Body for SyncBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(self.get_mut().0.get_mut())
            .poll_frame(cx)
            .map(|frame| frame.map(|r| r.map_err(Into::into)))
    }
}

/// The API for the edge's apex: [`super::routes`] behind key authentication, rate
/// limits (`burst` requests at once per key, then `per_minute` a minute; at least
/// one each) and the body cap.
pub fn apex_api(
    state: AppState,
    gateway: Arc<dyn Gateway>,
    burst: u32,
    per_minute: u32,
) -> ApexApi {
    let keys = Arc::new(Keys {
        gateway,
        burst: f64::from(burst.max(1)),
        per_second: f64::from(per_minute.max(1)) / 60.0,
        buckets: Mutex::new(HashMap::new()),
    });
    let app = super::routes(state)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(keys, authenticate));
    Arc::new(move |request, _peer| {
        let app = app.clone();
        Box::pin(async move {
            let request = request.map(axum::body::Body::new);
            let response = match app.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            response.map(|body| -> ApiBody { SyncBody(SyncWrapper::new(body)).boxed() })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_waits() {
        let keys = Keys {
            gateway: Arc::new(vmkit_core::StoreGateway::new(
                Arc::new(vmkit_core::testing::MemoryStore::new()),
                "vm.test",
            )),
            burst: 120.0,
            per_second: 10.0,
            buckets: Mutex::new(HashMap::new()),
        };
        for _ in 0..120 {
            assert!(keys.take("a").is_ok());
        }
        assert_eq!(keys.take("a"), Err(1), "the burst is spent");
        assert!(keys.take("b").is_ok(), "another key has its own");
    }
}
