//! Users and invites: admins' routes (on the root socket, the operator's), through
//! the command surface. Routes and wire types are documented in `vmkit_core::api`.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use vmkit_core::api::{AddUser, CreatedInvite, InviteInfo, NewInvite, UserInfo};
use vmkit_core::{
    Commands, Handle, ManagerError, NewUser, Role, SshPublicKey, Timestamp, User, VmDisposition,
};

use super::{ApiError, ApiResult, AppState, Asking, JsonBody, body, detached};

/// The routes of users and invites.
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/users", get(list_users).post(add_user))
        .route("/v1/users/{handle}", get(get_user).delete(remove_user))
        .route("/v1/users/{handle}/suspend", post(suspend_user))
        .route("/v1/users/{handle}/resume", post(resume_user))
        .route("/v1/invites", get(list_invites).post(new_invite))
        .route("/v1/invites/{id}", axum::routing::delete(delete_invite))
}

/// A handle in a path: its form is checked (a stored handle that a later vmkit
/// reserved must still be reachable).
fn existing_handle(raw: String) -> ApiResult<Handle> {
    Handle::try_from(raw).map_err(|e| ManagerError::from(e).into())
}

async fn info(c: &Commands, user: &User) -> ApiResult<UserInfo> {
    let keys = c.keys_of(user.id).await?;
    Ok(UserInfo::new(user, &keys))
}

async fn list_users(Asking(c): Asking) -> ApiResult<Response> {
    let mut out = Vec::new();
    for user in c.users().await? {
        out.push(info(&c, &user).await?);
    }
    Ok(Json(out).into_response())
}

async fn add_user(Asking(c): Asking, b: JsonBody<AddUser>) -> ApiResult<Response> {
    let b = body(b)?;
    let mut new = NewUser::new(Handle::new(b.handle).map_err(ManagerError::from)?)
        .role(b.role.unwrap_or(Role::User));
    if let Some(key) = &b.ssh_key {
        new = new.ssh_key(SshPublicKey::parse(key).map_err(ManagerError::from)?);
    }
    if let Some(email) = b.email {
        new = new.email(email);
    }
    let user = c.add_user(new).await?;
    Ok((StatusCode::CREATED, Json(info(&c, &user).await?)).into_response())
}

async fn get_user(Asking(c): Asking, Path(handle): Path<String>) -> ApiResult<Response> {
    let user = c.user(&existing_handle(handle)?).await?;
    Ok(Json(info(&c, &user).await?).into_response())
}

#[derive(Deserialize)]
struct RemoveQuery {
    /// `delete`: delete the user's VMs and snapshots.
    vms: Option<String>,
    /// Hand the user's VMs and snapshots over to this user.
    hand_over: Option<String>,
}

async fn remove_user(
    Asking(c): Asking,
    Path(handle): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<Response> {
    let handle = existing_handle(handle)?;
    let disposition = match (q.vms.as_deref(), q.hand_over) {
        (Some("delete"), None) => VmDisposition::Delete,
        (None, Some(to)) => VmDisposition::HandOver(existing_handle(to)?),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "say what becomes of the user's VMs and snapshots: add ?vms=delete to delete \
                 them or ?hand_over=HANDLE to give them to another user (one of the two)",
            ));
        }
    };
    // Deleting VMs takes a while; it runs to its end even if the client goes away.
    detached(async move { c.remove_user(&handle, disposition).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_suspended(c: Commands, handle: String, suspended: bool) -> ApiResult<Response> {
    let user = c
        .set_suspended(&existing_handle(handle)?, suspended)
        .await?;
    Ok(Json(info(&c, &user).await?).into_response())
}

async fn suspend_user(Asking(c): Asking, Path(handle): Path<String>) -> ApiResult<Response> {
    set_suspended(c, handle, true).await
}

async fn resume_user(Asking(c): Asking, Path(handle): Path<String>) -> ApiResult<Response> {
    set_suspended(c, handle, false).await
}

async fn list_invites(Asking(c): Asking) -> ApiResult<Response> {
    let now = Timestamp::now();
    let invites: Vec<_> = c
        .invites()
        .await?
        .iter()
        .map(|i| InviteInfo::new(i, now))
        .collect();
    Ok(Json(invites).into_response())
}

async fn new_invite(Asking(c): Asking, b: JsonBody<NewInvite>) -> ApiResult<Response> {
    let b = body(b)?;
    let ttl = b.ttl_secs.unwrap_or(NewInvite::DEFAULT_TTL_SECS);
    if ttl == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "ttl_secs is 0: an invite needs a lifetime of at least one second",
        ));
    }
    let (invite, code) = c
        .new_invite(Duration::from_secs(ttl), b.role.unwrap_or(Role::User))
        .await?;
    let created = CreatedInvite::new(InviteInfo::new(&invite, Timestamp::now()), code);
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn delete_invite(Asking(c): Asking, Path(id): Path<String>) -> ApiResult<Response> {
    c.delete_invite(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tokio::sync::watch;
    use tower::ServiceExt;
    use vmkit_core::api::ErrorBody;
    use vmkit_core::testing::FakeHost;
    use vmkit_core::{CreateRequest, StateStore, UserStatus, VmSpec};

    use super::*;
    use crate::api::router as api_router;

    const CAROL: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDEarYz70Byb4F3tObLPQOH7OcIbLkodxbuDcfZAAi+t carol@example";

    fn app(host: &FakeHost) -> Router {
        api_router(AppState {
            manager: host.manager.clone(),
            shutdown: watch::channel(false).1,
            not_ready: None,
            ca_certificate: None,
        })
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

    fn code(body: &str) -> String {
        serde_json::from_str::<ErrorBody>(body).unwrap().code
    }

    #[tokio::test]
    async fn a_user_is_added_listed_shown_suspended_resumed_and_removed() {
        let host = FakeHost::new().await;
        let app = app(&host);
        let add = serde_json::json!({
            "handle": "carol", "ssh_key": CAROL, "email": "carol@example.com", "role": "admin"
        });

        let (status, body) = call(app.clone(), "POST", "/v1/users", &add.to_string()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let carol: UserInfo = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (carol.handle.as_str(), carol.role, carol.status),
            ("carol", Role::Admin, UserStatus::Active)
        );
        assert_eq!(carol.ssh_keys.len(), 1);
        assert_eq!(carol.ssh_keys[0].key, CAROL);

        let (status, body) = call(app.clone(), "POST", "/v1/users", &add.to_string()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(code(&body), "handle_taken");

        let (status, body) = call(app.clone(), "GET", "/v1/users", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<Vec<UserInfo>>(&body).unwrap(),
            vec![carol.clone()]
        );
        let (status, body) = call(app.clone(), "GET", "/v1/users/carol", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(serde_json::from_str::<UserInfo>(&body).unwrap(), carol);

        let (status, body) = call(app.clone(), "POST", "/v1/users/carol/suspend", "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let suspended: UserInfo = serde_json::from_str(&body).unwrap();
        assert_eq!(suspended.status, UserStatus::Suspended);
        let (_, body) = call(app.clone(), "POST", "/v1/users/carol/resume", "").await;
        assert_eq!(
            serde_json::from_str::<UserInfo>(&body).unwrap().status,
            UserStatus::Active
        );

        let (status, body) = call(app.clone(), "DELETE", "/v1/users/carol?vms=delete", "").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, body) = call(app, "GET", "/v1/users/carol", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(code(&body), "user_not_found");
    }

    #[tokio::test]
    async fn bad_handles_keys_and_emails_are_400s_that_say_what_is_wrong() {
        let host = FakeHost::new().await;
        let app = app(&host);
        for (body, expected, says) in [
            (r#"{"handle":"Carol"}"#, "invalid_handle", "lowercase"),
            (r#"{"handle":"root"}"#, "invalid_handle", "reserved"),
            (
                r#"{"handle":"carol","ssh_key":"ssh-ed25519 AAAA"}"#,
                "invalid_ssh_key",
                ".pub file",
            ),
            (
                r#"{"handle":"carol","email":"nope"}"#,
                "invalid_email",
                "not an email address",
            ),
            (r#"{"nickname":"carol"}"#, "invalid_body", "handle"),
        ] {
            let (status, answer) = call(app.clone(), "POST", "/v1/users", body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            let error: ErrorBody = serde_json::from_str(&answer).unwrap();
            assert_eq!(error.code, expected, "{body}");
            assert!(error.message.contains(says), "{body}: {}", error.message);
        }
        let (_, body) = call(app, "GET", "/v1/users", "").await;
        assert_eq!(body, "[]");
    }

    #[tokio::test]
    async fn removing_a_user_needs_one_disposition_and_hands_over_their_vms() {
        let host = FakeHost::new().await;
        let app = app(&host);
        for handle in ["ann", "ben"] {
            let (status, body) = call(
                app.clone(),
                "POST",
                "/v1/users",
                &format!(r#"{{"handle":"{handle}"}}"#),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        let ann = host
            .manager
            .user(&Handle::new("ann").unwrap())
            .await
            .unwrap();
        let ben = host
            .manager
            .user(&Handle::new("ben").unwrap())
            .await
            .unwrap();
        host.manager
            .create(CreateRequest::new(ann.id, VmSpec::new("tiny")).name("web".parse().unwrap()))
            .await
            .unwrap();

        for query in ["", "?vms=keep", "?vms=delete&hand_over=ben"] {
            let (status, body) =
                call(app.clone(), "DELETE", &format!("/v1/users/ann{query}"), "").await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
            assert_eq!(code(&body), "invalid_query");
        }
        let (status, body) = call(app.clone(), "DELETE", "/v1/users/ann?hand_over=ann", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(code(&body), "invalid_hand_over");

        let (status, body) = call(app.clone(), "DELETE", "/v1/users/ann?hand_over=ben", "").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let vms = host.manager.list(None).await.unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].owner, ben.id);
        let (status, _) = call(app, "GET", "/v1/users/ann", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn an_invite_is_made_with_its_code_shown_once_listed_without_it_and_deleted() {
        let host = FakeHost::new().await;
        let app = app(&host);

        let (status, body) = call(
            app.clone(),
            "POST",
            "/v1/invites",
            r#"{"ttl_secs":3600,"role":"admin"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let created: CreatedInvite = serde_json::from_str(&body).unwrap();
        assert!(created.code.starts_with("vmi_"));
        assert_eq!(created.invite.role, Role::Admin);
        assert!(!created.invite.expired);
        assert_eq!(
            created.invite.expires_at.0 - created.invite.created_at.0,
            3_600_000
        );

        let (status, body) = call(app.clone(), "GET", "/v1/invites", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(!body.contains(&created.code), "the code is never listed");
        let stored = host.store.list_invites().await.unwrap();
        assert!(
            !body.contains(&stored[0].hash.to_hex()),
            "nor its hash: {body}"
        );
        assert_eq!(
            serde_json::from_str::<Vec<InviteInfo>>(&body).unwrap(),
            vec![created.invite.clone()]
        );

        let path = format!("/v1/invites/{}", created.invite.id);
        let (status, _) = call(app.clone(), "DELETE", &path, "").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = call(app.clone(), "DELETE", &path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(code(&body), "invite_not_found");

        let (status, body) = call(app, "POST", "/v1/invites", r#"{"ttl_secs":0}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(code(&body), "invalid_body");
    }

    #[tokio::test]
    async fn the_default_invite_lasts_a_week_for_a_user() {
        let host = FakeHost::new().await;
        let (status, body) = call(app(&host), "POST", "/v1/invites", "{}").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let created: CreatedInvite = serde_json::from_str(&body).unwrap();
        assert_eq!(created.invite.role, Role::User);
        assert_eq!(
            created.invite.expires_at.0 - created.invite.created_at.0,
            NewInvite::DEFAULT_TTL_SECS * 1000
        );
    }
}
