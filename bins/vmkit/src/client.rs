//! A small HTTP/1.1 client of the daemon's API: on its Unix socket, or over HTTPS at
//! `https://DOMAIN/api` with an API key (`vmkit --url ... --key-file ...`).

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
    /// The remote gateway is not there.
    #[error(
        "cannot reach the vmkit gateway at {url}: check the address (--url / VMKIT_URL) \
         and that its HTTPS edge is on"
    )]
    UnreachableRemote {
        /// The URL tried.
        url: String,
    },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Where the API is.
enum Transport {
    /// The daemon's Unix socket: every request is the operator's.
    Unix {
        socket: PathBuf,
        client: Client<UnixConnector, Full<Bytes>>,
    },
    /// A gateway's HTTPS API, as the user an API key is.
    Https {
        /// `https://DOMAIN[:PORT]/api`.
        base: String,
        /// `Bearer vmk_...`.
        authorization: hyper::header::HeaderValue,
        client: Client<
            hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
            Full<Bytes>,
        >,
    },
}

/// The API client.
pub struct Api {
    transport: Transport,
}

impl Api {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            transport: Transport::Unix {
                socket: socket.to_owned(),
                client: Client::unix(),
            },
        }
    }

    /// A client of the gateway at `url` (`https://DOMAIN[:PORT]`), signed in with
    /// the API key `key`, trusting the system's roots and the CA in `ca_file` (a
    /// gateway with a local CA: `vmkit ca` there prints it).
    pub fn remote(url: &str, key: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let url = url.trim_end_matches('/');
        anyhow::ensure!(
            url.starts_with("https://"),
            "--url {url:?}: give the gateway's HTTPS address, like https://vm.example.com"
        );
        let key = key.trim();
        anyhow::ensure!(
            vmkit_core::ApiKey::id_of(key).is_some(),
            "the API key is not one: it looks like vmk_ID_SECRET (make one with `ssh HOST \
             api-key new`)"
        );
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A system root rustls cannot use is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            use rustls::pki_types::pem::PemObject as _;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?;
            for cert in certs {
                let cert =
                    cert.with_context(|| format!("{} holds no certificate", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("{}: an unusable certificate", path.display()))?;
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let authorization = hyper::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key holds characters a header cannot")?;
        Ok(Self {
            transport: Transport::Https {
                base: format!("{url}/api"),
                authorization,
                client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
            },
        })
    }

    /// A request for `path` to wherever the API is, with the key when remote.
    fn request(&self, method: Method, path: &str) -> anyhow::Result<hyper::http::request::Builder> {
        Ok(match &self.transport {
            Transport::Unix { socket, .. } => Request::builder()
                .method(method)
                .uri(hyper::Uri::from(Uri::new(socket, path))),
            Transport::Https {
                base,
                authorization,
                ..
            } => Request::builder()
                .method(method)
                .uri(
                    format!("{base}{path}")
                        .parse::<hyper::Uri>()
                        .context("the API path")?,
                )
                .header(hyper::header::AUTHORIZATION, authorization.clone()),
        })
    }

    async fn dispatch(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, CallError> {
        let sent = match &self.transport {
            Transport::Unix { client, .. } => client.request(request).await,
            Transport::Https { client, .. } => client.request(request).await,
        };
        sent.map_err(|e| self.request_error(e))
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
        self.send_bytes(method, path, "application/json", bytes)
            .await
    }

    /// Sends `text` as a `text/plain` body and decodes a JSON answer.
    pub async fn json_from_text<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        text: String,
    ) -> Result<T, CallError> {
        let response = self
            .send_bytes(method, path, "text/plain; charset=utf-8", Bytes::from(text))
            .await?;
        decode(response).await
    }

    async fn send_bytes(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<Response<Incoming>, CallError> {
        let request = self
            .request(method, path)?
            .header("content-type", content_type)
            .body(Full::new(bytes))
            .context("building the request")?;
        let response = self.dispatch(request).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        Err(api_error(response).await)
    }

    /// Asks for `path` to be upgraded to `protocol` (with `headers`) and returns the
    /// connection once the daemon switched protocols.
    pub async fn upgrade(
        &self,
        path: &str,
        protocol: &str,
        headers: &[(&str, String)],
    ) -> Result<hyper::upgrade::Upgraded, CallError> {
        let mut request = self
            .request(Method::POST, path)?
            .header("connection", "upgrade")
            .header("upgrade", protocol);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .context("building the request")?;
        let response = self.dispatch(request).await?;
        let status = response.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return hyper::upgrade::on(response).await.map_err(|e| {
                CallError::Other(anyhow::Error::new(e).context("switching protocols"))
            });
        }
        Err(api_error(response).await)
    }

    fn request_error(&self, e: hyper_util::client::legacy::Error) -> CallError {
        match (&self.transport, e.is_connect()) {
            (Transport::Unix { socket, .. }, true) => CallError::Unreachable {
                socket: socket.clone(),
            },
            (Transport::Https { base, .. }, true) => CallError::UnreachableRemote {
                url: base.trim_end_matches("/api").to_owned(),
            },
            _ => CallError::Other(anyhow::Error::new(e).context("talking to the daemon")),
        }
    }

    /// Sends a request and returns its answer as text.
    pub async fn text(&self, method: Method, path: &str) -> Result<String, CallError> {
        let response = self.send(method, path, None::<&()>).await?;
        let raw = body_bytes(response, "reading the answer").await?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// Sends a request and decodes a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CallError> {
        decode(self.send(method, path, body).await?).await
    }

    /// Sends a request and calls `each` with every line of an NDJSON answer as it
    /// arrives.
    pub async fn lines<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        each: impl FnMut(T) -> anyhow::Result<()>,
    ) -> Result<(), CallError> {
        self.lines_with_headers(method, path, body, |_| {}, each)
            .await
    }

    /// Like [`Api::lines`], handing the answer's headers to `headers` first.
    pub async fn lines_with_headers<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        headers: impl FnOnce(&hyper::HeaderMap),
        mut each: impl FnMut(T) -> anyhow::Result<()>,
    ) -> Result<(), CallError> {
        let response = self.send(method, path, body).await?;
        headers(response.headers());
        let mut body_stream = response.into_body();
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

/// The whole body of `response`; `doing` says what for, should reading fail.
/// The error an answer that is not a success carries.
async fn api_error(response: Response<Incoming>) -> CallError {
    let status = response.status();
    let raw = match body_bytes(response, "reading the error").await {
        Ok(raw) => raw,
        Err(e) => return e,
    };
    let body = serde_json::from_slice(&raw).unwrap_or_else(|_| {
        ErrorBody::new(
            "http_error",
            format!("{status}: {}", String::from_utf8_lossy(&raw)),
        )
    });
    CallError::Api { status, body }
}

async fn body_bytes(response: Response<Incoming>, doing: &'static str) -> Result<Bytes, CallError> {
    Ok(response
        .into_body()
        .collect()
        .await
        .context(doing)?
        .to_bytes())
}

/// Decodes a JSON answer.
async fn decode<T: DeserializeOwned>(response: Response<Incoming>) -> Result<T, CallError> {
    let raw = body_bytes(response, "reading the answer").await?;
    Ok(serde_json::from_slice(&raw).context("decoding the answer")?)
}

/// `segment` as one segment of a request path: everything but letters, digits and
/// `-._~:` percent-encoded (an SSH key fingerprint's base64 holds `/` and `+`).
pub fn path_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::path_segment;

    #[test]
    fn a_fingerprint_stays_one_path_segment() {
        assert_eq!(path_segment("SHA256:Kz/e1+wf=k"), "SHA256:Kz%2Fe1%2Bwf%3Dk");
    }
}
