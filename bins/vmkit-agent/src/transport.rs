//! Choosing the transport and serving the host over it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};
use vmkit_guest::{
    Handler, ServeError, ServerConfig, SystemHandler, VIRTIO_PORT_NAME, VSOCK_PORT, serve,
};

use crate::port::{self, Port};

/// How often to look for a transport that is not there yet.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Pause before serving the port again after the host hung up (reads then return end of
/// stream at once until it reconnects).
const IDLE_RETRY: Duration = Duration::from_millis(100);
/// Pause before reopening the port after an error.
const REOPEN_DELAY: Duration = Duration::from_millis(500);

/// How the agent reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// The virtio-serial port if it exists, else vsock.
    Auto,
    /// A virtio-serial port, by name or device path.
    VirtioSerial(String),
    /// An AF_VSOCK port.
    Vsock(u32),
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, arg) = match s.split_once(':') {
            Some((kind, arg)) => (kind, Some(arg)),
            None => (s, None),
        };
        match (kind, arg) {
            ("auto", None) => Ok(Transport::Auto),
            ("virtio-serial", None) => Ok(Transport::VirtioSerial(VIRTIO_PORT_NAME.to_owned())),
            ("virtio-serial", Some(name)) if !name.is_empty() => {
                Ok(Transport::VirtioSerial(name.to_owned()))
            }
            ("vsock", None) => Ok(Transport::Vsock(VSOCK_PORT)),
            ("vsock", Some(port)) => port
                .parse()
                .map(Transport::Vsock)
                .map_err(|_| format!("`{port}` is not a vsock port number")),
            _ => Err(format!(
                "`{s}` is not a transport: use auto, virtio-serial[:NAME] or vsock[:PORT]"
            )),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Auto => f.write_str("auto"),
            Transport::VirtioSerial(name) => write!(f, "virtio-serial:{name}"),
            Transport::Vsock(port) => write!(f, "vsock:{port}"),
        }
    }
}

/// Serves the host over `transport` forever.
pub async fn run(transport: Transport) -> anyhow::Result<()> {
    let handler: Arc<dyn Handler> = Arc::new(SystemHandler::new());
    match transport {
        Transport::VirtioSerial(name) => serve_port(&name, handler).await,
        Transport::Vsock(port) => {
            let listener = bind_vsock(port)?;
            serve_vsock(listener, handler).await
        }
        Transport::Auto => {
            let mut waiting_logged = false;
            loop {
                if port::find(VIRTIO_PORT_NAME).is_some() {
                    return serve_port(VIRTIO_PORT_NAME, handler).await;
                }
                match bind_vsock(VSOCK_PORT) {
                    Ok(listener) => return serve_vsock(listener, handler).await,
                    Err(err) if !waiting_logged => {
                        tracing::info!(
                            error = format!("{err:#}"),
                            "no virtio-serial port {VIRTIO_PORT_NAME} and no vsock yet; waiting"
                        );
                        waiting_logged = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }
}

fn bind_vsock(port: u32) -> anyhow::Result<VsockListener> {
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
        .with_context(|| format!("cannot listen on vsock port {port}"))
}

/// Serves every vsock connection, each in its own task.
async fn serve_vsock(listener: VsockListener, handler: Arc<dyn Handler>) -> anyhow::Result<()> {
    tracing::info!(
        port = listener.local_addr().map(|a| a.port()).ok(),
        "listening on vsock"
    );
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let handler = Arc::clone(&handler);
                let peer = (peer.cid(), peer.port());
                tracing::info!(?peer, "host connected over vsock");
                tokio::spawn(async move {
                    let served = serve(stream, handler, ServerConfig::default()).await;
                    log_session_end(served);
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "accepting a vsock connection failed");
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }
}

/// Serves the virtio-serial port `name` forever: waits for it to appear, serves one host
/// session after another on it, and reopens it after errors.
async fn serve_port(name: &str, handler: Arc<dyn Handler>) -> anyhow::Result<()> {
    if name.is_empty() {
        bail!("the virtio-serial port name is empty");
    }
    // Log each kind of wait once, not on every retry.
    let (mut waiting_logged, mut open_failure_logged) = (false, false);
    loop {
        let Some(path) = port::find(name) else {
            if !waiting_logged {
                tracing::info!(port = name, "waiting for the virtio-serial port to appear");
                waiting_logged = true;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
            continue;
        };
        let port = match Port::open(&path) {
            Ok(port) => port,
            Err(err) => {
                if !open_failure_logged {
                    tracing::warn!(path = %path.display(), error = %err, "cannot open the virtio-serial port; retrying");
                    open_failure_logged = true;
                }
                tokio::time::sleep(REOPEN_DELAY).await;
                continue;
            }
        };
        open_failure_logged = false;
        tracing::info!(path = %path.display(), "serving the virtio-serial port");
        // The host connects and disconnects at will; while it is away reads end at once.
        loop {
            match serve(port.clone(), Arc::clone(&handler), ServerConfig::default()).await {
                Ok(()) => tokio::time::sleep(IDLE_RETRY).await,
                Err(err) => {
                    log_session_end(Err(err));
                    port.discard_pending();
                    break;
                }
            }
        }
        drop(port);
        tokio::time::sleep(REOPEN_DELAY).await;
    }
}

fn log_session_end(served: Result<(), ServeError>) {
    match served {
        Ok(()) => tracing::info!("host closed the connection"),
        Err(err) => {
            let err = anyhow::Error::new(err);
            tracing::warn!(error = format!("{err:#}"), "host session ended");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_with_defaults() {
        assert_eq!("auto".parse(), Ok(Transport::Auto));
        assert_eq!(
            "virtio-serial".parse(),
            Ok(Transport::VirtioSerial(VIRTIO_PORT_NAME.to_owned()))
        );
        assert_eq!(
            "virtio-serial:/dev/vport0p1".parse(),
            Ok(Transport::VirtioSerial("/dev/vport0p1".to_owned()))
        );
        assert_eq!("vsock".parse(), Ok(Transport::Vsock(VSOCK_PORT)));
        assert_eq!("vsock:5000".parse(), Ok(Transport::Vsock(5000)));
    }

    #[test]
    fn bad_transports_are_rejected() {
        assert!("tcp".parse::<Transport>().is_err());
        assert!("vsock:x".parse::<Transport>().is_err());
        assert!("virtio-serial:".parse::<Transport>().is_err());
        assert!("auto:1".parse::<Transport>().is_err());
    }
}
