//! A small HTTP/1.1 client of the daemon's Unix socket API.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmkit_core::api::ErrorBody;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The daemon is not there.
    #[error(
        "cannot reach the vmkit daemon at {socket}: is vmkit-gateway running? \
         Start it with `vmkit-gateway` (as root), or point --socket / VMKIT_SOCKET at it"
    )]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The daemon answered with an error.
    #[error("{}", .body.message)]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error.
        body: ErrorBody,
    },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The API client.
pub struct Api {
    socket: PathBuf,
    client: Client<UnixConnector, Full<Bytes>>,
}

impl Api {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            client: Client::unix(),
        }
    }

    /// Sends a request and returns the raw response once its status is a success.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Response<Incoming>, CallError> {
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).context("encoding the request")?),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(Uri::new(&self.socket, path))
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .context("building the request")?;
        let response = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                CallError::Unreachable {
                    socket: self.socket.clone(),
                }
            } else {
                CallError::Other(anyhow::Error::new(e).context("talking to the daemon"))
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let raw = response
            .into_body()
            .collect()
            .await
            .context("reading the error")?
            .to_bytes();
        let body = serde_json::from_slice(&raw).unwrap_or_else(|_| {
            ErrorBody::new(
                "http_error",
                format!("{status}: {}", String::from_utf8_lossy(&raw)),
            )
        });
        Err(CallError::Api { status, body })
    }

    /// Sends a request and returns its answer as text.
    pub async fn text(&self, method: Method, path: &str) -> Result<String, CallError> {
        let response = self.send(method, path, None::<&()>).await?;
        let raw = response
            .into_body()
            .collect()
            .await
            .context("reading the answer")?
            .to_bytes();
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// Sends a request and decodes a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CallError> {
        let response = self.send(method, path, body).await?;
        let raw = response
            .into_body()
            .collect()
            .await
            .context("reading the answer")?
            .to_bytes();
        Ok(serde_json::from_slice(&raw).context("decoding the answer")?)
    }

    /// Sends a request and calls `each` with every line of an NDJSON answer as it
    /// arrives.
    pub async fn lines<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        mut each: impl FnMut(T) -> anyhow::Result<()>,
    ) -> Result<(), CallError> {
        let mut body_stream = self.send(method, path, body).await?.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body_stream.frame().await {
            let frame = frame.context("reading the stream")?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let item = serde_json::from_slice(&line[..line.len() - 1])
                    .context("decoding a stream line")?;
                each(item)?;
            }
        }
        Ok(())
    }
}
