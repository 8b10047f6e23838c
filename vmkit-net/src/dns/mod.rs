//! vmkit's authoritative DNS server for the VM domain (feature `dns`), on
//! hickory-server.
//!
//! It answers from the state store at each query, so VMs resolve as soon as they
//! exist and stop resolving when they are gone:
//!
//! | name | type | answer |
//! | --- | --- | --- |
//! | the apex (`vm.example`) | SOA, NS | the zone's SOA; the name server [`DnsConfig::ns_host`] |
//! | the apex, `NAME.domain`, `NAME--PORT.domain`, the NS host | A, AAAA | [`DnsConfig::addresses`] (when `NAME` is a VM; `PORT` decimal, 1–65535) |
//! | the apex | CAA | `0 issue "ISSUER"` for each [`DnsConfig::caa_issuer`] |
//! | `_acme-challenge.X` under the domain | TXT | the DNS-01 values in [`AcmeChallenges`] |
//! | any other name under the domain | | NXDOMAIN, with the SOA |
//! | an existing name, another type | | NOERROR, no answer, with the SOA (NODATA) |
//! | a name outside the domain | | REFUSED, except [`DnsConfig::extra_host`] names |
//!
//! Custom domains are outside the zone: their owners publish them in their own DNS,
//! where [`DnsResolver`] (on hickory-resolver) reads the proof records of
//! `domain add`.
//!
//! Names are matched in any case. `NAME--PORT.domain` is where the HTTPS edge
//! serves port `PORT` of VM `NAME` under the same wildcard certificate.
//!
//! # Bounds
//!
//! At most [`MAX_IN_FLIGHT`] queries are looked up at once; past that a query is
//! answered SERVFAIL at once (resolvers retry), so a flood of queries does not
//! queue. A store lookup that takes over two seconds is answered SERVFAIL. At most
//! [`DnsConfig::max_tcp_connections`] TCP connections are open at once (a new one
//! past that is closed at once); each answers its queries one at a time and is
//! closed after [`DnsConfig::tcp_idle_timeout`] without a whole query.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_core::StateStore;
//! use vmkit_net::challenges::AcmeChallenges;
//! use vmkit_net::dns::{DnsConfig, DnsServer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store: Arc<dyn StateStore> = Arc::new(vmkit_core::testing::MemoryStore::new());
//! let config = DnsConfig::new("vm.example")
//!     .address("192.0.2.1".parse()?)
//!     .caa_issuer("letsencrypt.org");
//! let server = DnsServer::new(config, store, Arc::new(AcmeChallenges::new()))?;
//! let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! // Serves until the shutdown future completes (here at once).
//! server.serve(udp, tcp, async {}).await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::Semaphore;
use vmkit_core::StateStore;

use crate::challenges::AcmeChallenges;

mod resolve;
mod tcp;
mod zone;

pub use resolve::DnsResolver;

use zone::{Answer, Zone};

/// Queries looked up at once; past it, queries are answered SERVFAIL at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long a TCP connection stays open without a query, by default.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connections open at once, by default.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 128;
/// The UDP payload size this server advertises with EDNS.
const EDNS_PAYLOAD: u16 = 1232;

/// What the DNS server answers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DnsConfig {
    /// The VM domain (`vm.example`), lowercase, without the final dot.
    pub domain: String,
    /// The host's addresses: the A and AAAA records of the apex and of every VM.
    pub addresses: Vec<IpAddr>,
    /// The name server's host name (default `ns.DOMAIN`).
    pub ns_host: Option<String>,
    /// The TTL of every record, in seconds (default 60).
    pub ttl: u32,
    /// The CAs allowed to issue for the domain (CAA `issue`); none: no CAA record.
    pub caa_issuers: Vec<String>,
    /// Names outside the domain answered with the host's addresses.
    pub extra_hosts: Vec<String>,
    /// TCP connections open at once (default [`DEFAULT_MAX_TCP_CONNECTIONS`]).
    pub max_tcp_connections: usize,
    /// How long a TCP connection stays open without a whole query (default
    /// [`DEFAULT_TCP_IDLE_TIMEOUT`]).
    pub tcp_idle_timeout: Duration,
}

impl DnsConfig {
    /// A zone for `domain`, with no addresses yet, TTL 60 and no CAA.
    pub fn new(domain: &str) -> Self {
        Self {
            domain: normalize(domain),
            addresses: Vec::new(),
            ns_host: None,
            ttl: 60,
            caa_issuers: Vec::new(),
            extra_hosts: Vec::new(),
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
        }
    }

    /// Keeps at most `max` TCP connections open at once.
    pub fn max_tcp_connections(mut self, max: usize) -> Self {
        self.max_tcp_connections = max.max(1);
        self
    }

    /// Closes a TCP connection after `timeout` without a whole query.
    pub fn tcp_idle_timeout(mut self, timeout: Duration) -> Self {
        self.tcp_idle_timeout = timeout;
        self
    }

    /// Adds one of the host's addresses (A for IPv4, AAAA for IPv6).
    pub fn address(mut self, address: IpAddr) -> Self {
        self.addresses.push(address);
        self
    }

    /// Sets the host's addresses.
    pub fn addresses(mut self, addresses: Vec<IpAddr>) -> Self {
        self.addresses = addresses;
        self
    }

    /// Sets the name server's host name (the NS record and the SOA's primary).
    pub fn ns_host(mut self, host: &str) -> Self {
        self.ns_host = Some(normalize(host));
        self
    }

    /// Sets the TTL of every record, in seconds.
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    /// Allows `issuer` (`letsencrypt.org`) to issue for the domain: a CAA record
    /// `0 issue "ISSUER"` at the apex.
    pub fn caa_issuer(mut self, issuer: &str) -> Self {
        self.caa_issuers.push(normalize(issuer));
        self
    }

    /// Also answers `host`, outside the domain, with the host's addresses: for a
    /// resolver that asks this server for everything (an ACME test server's
    /// `-dnsserver`), where a custom domain must reach this host. Public resolvers
    /// never ask this server for such names; point real custom domains at
    /// `NAME.domain` with a CNAME at their own DNS.
    pub fn extra_host(mut self, host: &str) -> Self {
        self.extra_hosts.push(normalize(host));
        self
    }

    /// The name server's host name.
    pub fn ns_host_name(&self) -> String {
        self.ns_host
            .clone()
            .unwrap_or_else(|| format!("ns.{}", self.domain))
    }
}

fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The configuration cannot be served.
    #[error("DNS configuration: {what}")]
    Config {
        /// What is wrong and what to do.
        what: String,
    },
    /// A socket failed while serving.
    #[error("the DNS server stopped: {what}")]
    Serve {
        /// What failed.
        what: String,
    },
}

/// vmkit's authoritative DNS server for the VM domain.
pub struct DnsServer {
    handler: Handler,
    max_tcp_connections: usize,
    tcp_idle_timeout: Duration,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").finish_non_exhaustive()
    }
}

impl DnsServer {
    /// A server answering `config`'s zone from `store`, with the DNS-01 values of
    /// `challenges`.
    pub fn new(
        config: DnsConfig,
        store: Arc<dyn StateStore>,
        challenges: Arc<AcmeChallenges>,
    ) -> Result<Self, DnsError> {
        if config.domain.is_empty() {
            return Err(DnsError::Config {
                what: "the domain is empty; set the VM domain (`vm.example.com`)".into(),
            });
        }
        Ok(Self {
            max_tcp_connections: config.max_tcp_connections,
            tcp_idle_timeout: config.tcp_idle_timeout,
            handler: Handler {
                zone: Arc::new(Zone::new(config, store, challenges)?),
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            },
        })
    }

    /// Serves DNS on `udp` and `tcp` (both bound already) until `shutdown`
    /// completes; returns early only if a socket fails.
    pub async fn serve(
        self,
        udp: tokio::net::UdpSocket,
        tcp: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DnsError> {
        let tcp = tcp::serve(
            tcp,
            self.handler.clone(),
            self.max_tcp_connections,
            self.tcp_idle_timeout,
        );
        let mut server = Server::new(self.handler);
        server.register_socket(udp);
        let token = server.shutdown_token().clone();
        tokio::select! {
            () = shutdown => token.cancel(),
            () = tcp => {}
            result = server.block_until_done() => {
                return result.map_err(|e| DnsError::Serve { what: e.to_string() });
            }
        }
        server
            .block_until_done()
            .await
            .map_err(|e| DnsError::Serve {
                what: e.to_string(),
            })
    }
}

/// Answers each request from the zone.
#[derive(Clone)]
struct Handler {
    zone: Arc<Zone>,
    in_flight: Arc<Semaphore>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let answer = if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            Answer::code(ResponseCode::NotImp)
        } else {
            match request.request_info() {
                Err(_) => Answer::code(ResponseCode::FormErr),
                Ok(info) => match self.in_flight.clone().try_acquire_owned() {
                    Ok(_permit) => {
                        let query = info.query.original();
                        self.zone.answer(query.name(), query.query_type()).await
                    }
                    Err(_) => Answer::servfail(),
                },
            }
        };
        metadata.response_code = answer.code;
        metadata.authoritative = answer.authoritative;
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        if request.edns.is_some() {
            builder.edns(&edns);
        }
        let response = builder.build(
            metadata,
            answer.answers.iter(),
            answer.authority.iter(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: sending an answer failed");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
