//! DNS over TCP with a bound on connections (hickory's own TCP listener takes
//! every connection): past [`DnsConfig::max_tcp_connections`] a new connection is
//! closed at once, so a flood of idle connections cannot take the process's file
//! descriptors. Each connection answers its queries one at a time and is closed
//! after [`DnsConfig::tcp_idle_timeout`] without a whole query.
//!
//! [`DnsConfig::max_tcp_connections`]: super::DnsConfig::max_tcp_connections
//! [`DnsConfig::tcp_idle_timeout`]: super::DnsConfig::tcp_idle_timeout

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::MessageType;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Handler;

/// Accepts connections on `listener` for ever (until dropped), at most `max` at once.
pub(super) async fn serve(listener: TcpListener, handler: Handler, max: usize, idle: Duration) {
    let permits = Arc::new(Semaphore::new(max));
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, a connection reset before it was taken: wait a
                // little and go on; the server stays up.
                tracing::debug!(error = %e, "DNS: accepting a TCP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "DNS: too many TCP connections; closing a new one");
            continue;
        };
        let handler = handler.clone();
        connections.spawn(async move {
            connection(stream, peer, &handler, idle).await;
            drop(permit);
        });
    }
}

/// Answers the queries of one connection (two-byte length, then the message).
async fn connection(mut stream: TcpStream, peer: SocketAddr, handler: &Handler, idle: Duration) {
    loop {
        let mut length = [0u8; 2];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut length)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut message)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Ok(request) = Request::from_bytes(message, peer, Protocol::Tcp) else {
            return;
        };
        if request.metadata.message_type == MessageType::Response {
            return;
        }
        let answer = Encoded::default();
        handler
            .handle_request::<_, TokioTime>(&request, answer.clone())
            .await;
        let Some(bytes) = answer.take() else {
            return;
        };
        let Ok(length) = u16::try_from(bytes.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(2 + bytes.len());
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(&bytes);
        if !matches!(
            tokio::time::timeout(idle, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Where the handler's answer is encoded, for the connection to send.
#[derive(Clone, Default)]
struct Encoded(Arc<Mutex<Option<Vec<u8>>>>);

impl Encoded {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Encoded {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(u16::MAX);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(|e| NetError::from(format!("encoding an answer: {e}")))?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(info)
    }
}
