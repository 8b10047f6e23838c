//! `POST /v1/vms/{name}/session`: an interactive session in a VM through its agent,
//! on the upgraded connection (`vmkit vm shell`). The wire is `vmkit_core::api::session`.

use axum::body::Body;
use axum::extract::{Path, Request};
use axum::http::{StatusCode, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tracing::debug;
use vmkit_core::api::session::{ClientFrame, SESSION_HEADER, SESSION_PROTOCOL, ServerFrame};
use vmkit_core::guest::{ExecEvent, GuestSession, SessionRequest};

use super::{ApiError, ApiResult, Asking, vm_name};

pub(super) async fn session_vm(
    Asking(c): Asking,
    Path(name): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if !upgrade.is_some_and(|v| v.eq_ignore_ascii_case(SESSION_PROTOCOL)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "upgrade_required",
            format!("a session needs `Connection: upgrade` and `Upgrade: {SESSION_PROTOCOL}`"),
        ));
    }
    let asked: SessionRequest = request
        .headers()
        .get(SESSION_HEADER)
        .map(|v| serde_json::from_slice(v.as_bytes()))
        .transpose()
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the {SESSION_HEADER} header is not a session request: {e}"),
            )
        })?
        .unwrap_or_default();
    let session = c.session(&vm_name(&name)?, asked).await?;
    let upgraded = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(connection) => relay(TokioIo::new(connection), session).await,
            Err(e) => debug!(error = %e, "a session's connection was not upgraded"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, SESSION_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// Relays the client's frames to the session and its output back, each direction
/// waiting on its own writes (the agent's input window, the socket).
async fn relay(connection: TokioIo<hyper::upgrade::Upgraded>, session: GuestSession) {
    let (mut reader, mut writer) = tokio::io::split(connection);
    let (input, mut events) = session.split();
    let to_guest = {
        let input = input.clone();
        async move {
            loop {
                let sent = match ClientFrame::read(&mut reader).await {
                    Ok(Some(ClientFrame::Stdin(data))) => input.send(&data).await,
                    Ok(Some(ClientFrame::Resize { cols, rows })) => input.resize(cols, rows).await,
                    Ok(Some(ClientFrame::CloseStdin)) => input.close_stdin().await,
                    Ok(Some(ClientFrame::Signal(name))) => input.signal(&name).await,
                    Ok(Some(ClientFrame::HangUp) | None) => break,
                    Ok(Some(_)) => Ok(()),
                    Err(e) => {
                        debug!(error = %e, "a session client broke the protocol");
                        break;
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
        }
    };
    let from_guest = async {
        while let Some(event) = events.next().await {
            let frame = match event {
                Ok(ExecEvent::Stdout(data)) => ServerFrame::Stdout(data.to_vec()),
                Ok(ExecEvent::Stderr(data)) => ServerFrame::Stderr(data.to_vec()),
                Ok(ExecEvent::Exit(status)) => ServerFrame::Exit(status),
                Ok(_) => continue,
                Err(e) => ServerFrame::Error(format!("the session broke: {e}")),
            };
            let last = matches!(frame, ServerFrame::Exit(_) | ServerFrame::Error(_));
            if writer.write_all(&frame.encode()).await.is_err() || last {
                return;
            }
        }
    };
    tokio::select! {
        () = from_guest => {}
        () = to_guest => {
            let _ = input.hang_up().await;
        }
    }
    let _ = writer.shutdown().await;
}
