//! The cloud-hypervisor REST API over its Unix socket, through the
//! cloud-hypervisor-client crate, with a timeout on every call.
//!
//! Nothing here leaves the module: callers get vmkit's own types and errors.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cloud_hypervisor_client::apis::configuration::Configuration;
use cloud_hypervisor_client::apis::{DefaultApi, DefaultApiClient, Error as ClientError};
use cloud_hypervisor_client::models;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type SocketClient = DefaultApiClient<hyperlocal::UnixConnector>;
type Call<T> = Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send>>;

/// Why a call did not succeed, before the caller adds what it knows about the
/// process.
#[derive(Debug)]
pub(crate) enum ApiFailure {
    /// cloud-hypervisor answered with an error status.
    Refused { status: u16, message: String },
    /// The socket could not be reached or the connection broke.
    Unreachable(std::io::Error),
    /// No answer in time.
    Timeout,
    /// An answer that does not decode.
    Protocol(String),
}

/// One VMM's API.
pub(crate) struct Api {
    client: SocketClient,
    socket: PathBuf,
}

impl Api {
    /// A client for the API socket at `socket`. Connections are not pooled: every
    /// call opens its own, so a VMM that died and a new one on the same path are
    /// never confused by a stale pooled connection.
    pub(crate) fn new(socket: &Path) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(hyperlocal::UnixConnector);
        let base: hyper::Uri = hyperlocal::Uri::new(socket, "/api/v1").into();
        let configuration = Configuration {
            base_path: base.to_string(),
            user_agent: Some(concat!("vmkit/", env!("CARGO_PKG_VERSION")).to_owned()),
            client,
        };
        Self {
            client: DefaultApiClient::new(Arc::new(configuration)),
            socket: socket.to_owned(),
        }
    }

    /// The socket this client talks to.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call<T>(&self, timeout: Duration, call: Call<T>) -> Result<T, ApiFailure> {
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(ApiFailure::Timeout),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(failure(err)),
        }
    }

    pub(crate) async fn ping(&self, t: Duration) -> Result<models::VmmPingResponse, ApiFailure> {
        self.call(t, self.client.vmm_ping_get()).await
    }

    pub(crate) async fn create(&self, t: Duration, c: models::VmConfig) -> Result<(), ApiFailure> {
        self.call(t, self.client.create_vm(c)).await
    }

    pub(crate) async fn boot(&self, t: Duration) -> Result<(), ApiFailure> {
        self.call(t, self.client.boot_vm()).await
    }

    pub(crate) async fn info(&self, t: Duration) -> Result<models::VmInfo, ApiFailure> {
        self.call(t, self.client.vm_info_get()).await
    }

    pub(crate) async fn pause(&self, t: Duration) -> Result<(), ApiFailure> {
        self.call(t, self.client.pause_vm()).await
    }

    pub(crate) async fn resume(&self, t: Duration) -> Result<(), ApiFailure> {
        self.call(t, self.client.resume_vm()).await
    }

    pub(crate) async fn power_button(&self, t: Duration) -> Result<(), ApiFailure> {
        self.call(t, self.client.power_button_vm()).await
    }

    pub(crate) async fn shutdown_vm(&self, t: Duration) -> Result<(), ApiFailure> {
        self.call(t, self.client.shutdown_vm()).await
    }

    pub(crate) async fn shutdown_vmm(&self, t: Duration) -> Result<(), ApiFailure> {
        self.call(t, self.client.shutdown_vmm()).await
    }

    pub(crate) async fn resize(
        &self,
        t: Duration,
        vcpus: Option<i32>,
        ram_bytes: Option<i64>,
    ) -> Result<(), ApiFailure> {
        let mut body = models::VmResize::new();
        body.desired_vcpus = vcpus;
        body.desired_ram = ram_bytes;
        self.call(t, self.client.vm_resize_put(body)).await
    }

    pub(crate) async fn snapshot(&self, t: Duration, url: String) -> Result<(), ApiFailure> {
        let mut body = models::VmSnapshotConfig::new();
        body.destination_url = Some(url);
        self.call(t, self.client.vm_snapshot_put(body)).await
    }

    pub(crate) async fn restore(&self, t: Duration, url: String) -> Result<(), ApiFailure> {
        let mut body = models::RestoreConfig::new(url);
        // Stated: the contract is that a restored guest starts paused.
        body.resume = Some(false);
        self.call(t, self.client.vm_restore_put(body)).await
    }
}

fn failure(err: ClientError) -> ApiFailure {
    match err {
        ClientError::Api(api) => ApiFailure::Refused {
            status: api.code.as_u16(),
            message: ch_message(api.code.as_u16(), &api.body),
        },
        ClientError::HyperClient(e) => ApiFailure::Unreachable(io_error(&e)),
        ClientError::Hyper(e) => ApiFailure::Unreachable(io_error(&e)),
        ClientError::Serde(e) => ApiFailure::Protocol(format!("undecodable reply: {e}")),
        other => ApiFailure::Protocol(other.to_string()),
    }
}

/// The I/O error at the root of a transport error, or the error's text.
fn io_error(err: &(dyn std::error::Error + 'static)) -> std::io::Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return std::io::Error::new(io.kind(), io.to_string());
        }
        cur = e.source();
    }
    std::io::Error::other(err.to_string())
}

/// cloud-hypervisor's own message from an error reply. Its body is a JSON array of
/// the error chain, outermost first (`["Error from API", "The VM could not be
/// paused", ...]`); it is joined the way cloud-hypervisor logs it.
pub(crate) fn ch_message(status: u16, body: &str) -> String {
    match serde_json::from_str::<Vec<String>>(body) {
        Ok(chain) if !chain.is_empty() => chain.join(": "),
        _ if !body.trim().is_empty() => body.trim().to_owned(),
        _ => format!("HTTP status {status} with no message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_chain_is_joined() {
        let body = r#"["Error from API","The VM could not be paused","VM is not running"]"#;
        assert_eq!(
            ch_message(500, body),
            "Error from API: The VM could not be paused: VM is not running"
        );
    }

    #[test]
    fn a_body_that_is_not_a_chain_is_kept_and_an_empty_one_named() {
        assert_eq!(ch_message(400, " Bad Request \n"), "Bad Request");
        assert_eq!(ch_message(400, ""), "HTTP status 400 with no message");
    }
}
