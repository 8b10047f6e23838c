//! A gateway whose VMs' web servers listen on this host's loopback.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    AccessPolicy, Action, Caller, Credential, Denied, Door, Gateway, GatewayCapabilities,
    GatewayError, RouteTarget, Routed, StoreGateway,
};

/// The store's gateway ([`StoreGateway`]), with every route's upstream moved to
/// 127.0.0.1 and its guest port mapped to a local port: the HTTPS edge over fake
/// VMs reaches a web server of the test's (or the benchmark's) own. A guest port
/// without a mapping keeps its number, where nothing is expected to listen.
pub struct LoopbackGateway {
    inner: StoreGateway,
    ports: HashMap<u16, u16>,
}

impl LoopbackGateway {
    /// `inner`'s routes, guest port `p` reaching 127.0.0.1 at `ports[p]`.
    pub fn new(inner: StoreGateway, ports: HashMap<u16, u16>) -> Arc<Self> {
        Arc::new(Self { inner, ports })
    }
}

#[async_trait]
impl Gateway for LoopbackGateway {
    fn capabilities(&self) -> GatewayCapabilities {
        self.inner.capabilities()
    }

    async fn identify(
        &self,
        credential: Credential<'_>,
        door: Door,
    ) -> Result<Option<Caller>, GatewayError> {
        self.inner.identify(credential, door).await
    }

    async fn route(&self, target: RouteTarget<'_>) -> Result<Option<Routed>, GatewayError> {
        let mut routed = self.inner.route(target).await?;
        if let Some(r) = &mut routed {
            r.upstream.ip = Some(Ipv4Addr::LOCALHOST);
            r.upstream.port = *self.ports.get(&r.upstream.port).unwrap_or(&r.upstream.port);
        }
        Ok(routed)
    }

    fn policy(&self) -> Arc<dyn AccessPolicy> {
        self.inner.policy()
    }

    fn authorize(&self, caller: &Caller, action: Action, routed: &Routed) -> Result<(), Denied> {
        self.inner.authorize(caller, action, routed)
    }
}
