//! Reading DNS records for custom-domain proofs: [`DnsResolver`], vmkit-core's
//! [`DnsLookup`] on hickory-resolver.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use vmkit_core::{DnsLookup, LookupError};

/// Looks records up through the host's resolvers (`/etc/resolv.conf`) or the name
/// servers given, without a cache of its own: an owner who just published a record
/// and asks again is answered from DNS, not from an earlier miss.
#[derive(Clone)]
pub struct DnsResolver {
    resolver: TokioResolver,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver").finish_non_exhaustive()
    }
}

/// How long one query waits for an answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

impl DnsResolver {
    /// Through the resolvers in the host's `/etc/resolv.conf`.
    pub fn system() -> Result<Self, LookupError> {
        let mut builder = TokioResolver::builder_tokio().map_err(|e| {
            LookupError(format!(
                "cannot read the host's resolver configuration: {e}"
            ))
        })?;
        tune(builder.options_mut());
        let resolver = builder
            .build()
            .map_err(|e| LookupError(format!("cannot start the DNS resolver: {e}")))?;
        Ok(Self { resolver })
    }

    /// Through the name servers at `servers` (UDP, then TCP for long answers).
    pub fn with_servers(servers: &[SocketAddr]) -> Result<Self, LookupError> {
        if servers.is_empty() {
            return Err(LookupError("no name server given".into()));
        }
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                config.connections = vec![udp, tcp];
                config
            })
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), name_servers);
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        tune(builder.options_mut());
        let resolver = builder
            .build()
            .map_err(|e| LookupError(format!("cannot start the DNS resolver: {e}")))?;
        Ok(Self { resolver })
    }

    async fn lookup(&self, name: &str, kind: RecordType) -> Result<Vec<RData>, LookupError> {
        // Fully qualified: no search domains appended.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.lookup(fqdn.as_str(), kind).await {
            Ok(lookup) => Ok(lookup.answers().iter().map(|r| r.data.clone()).collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
            Err(e) => Err(LookupError(format!("{kind} lookup of {name} failed: {e}"))),
        }
    }
}

fn tune(options: &mut hickory_resolver::config::ResolverOpts) {
    options.cache_size = 0;
    options.timeout = QUERY_TIMEOUT;
    options.attempts = 2;
}

#[async_trait]
impl DnsLookup for DnsResolver {
    async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError> {
        Ok(self
            .lookup(name, RecordType::TXT)
            .await?
            .into_iter()
            .filter_map(|data| match data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }

    async fn cname(&self, name: &str) -> Result<Vec<String>, LookupError> {
        Ok(self
            .lookup(name, RecordType::CNAME)
            .await?
            .into_iter()
            .filter_map(|data| match data {
                RData::CNAME(target) => Some(
                    target
                        .0
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                ),
                _ => None,
            })
            .collect())
    }
}
