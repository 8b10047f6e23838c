//! An in-memory gateway with a fixed route table.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::gateway::{Gateway, GatewayCapabilities, GatewayError, Principal, Route};
use crate::share::Access;
use crate::vm::{VmId, VmRecord};

/// A complete [`Gateway`] over explicit tables: routes by exact host name, and
/// grants listed one by one (owners are always allowed).
#[derive(Debug, Default)]
pub struct FakeGateway {
    routes: Mutex<BTreeMap<String, Route>>,
    grants: Mutex<Vec<(Principal, VmId, Access)>>,
}

impl FakeGateway {
    /// An empty gateway.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `host` to `route`.
    pub fn add_route(&self, host: &str, route: Route) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_ascii_lowercase(), route);
    }

    /// Grants `principal` `access` to `vm`.
    pub fn grant(&self, principal: Principal, vm: VmId, access: Access) {
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((principal, vm, access));
    }
}

#[async_trait]
impl Gateway for FakeGateway {
    fn capabilities(&self) -> GatewayCapabilities {
        GatewayCapabilities {
            host_routing: true,
            shares: true,
        }
    }

    async fn route(&self, host: &str) -> Result<Option<Route>, GatewayError> {
        Ok(self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host.to_ascii_lowercase())
            .cloned())
    }

    async fn authorize(
        &self,
        principal: &Principal,
        vm: &VmRecord,
        access: Access,
    ) -> Result<bool, GatewayError> {
        if *principal == Principal::User(vm.owner) {
            return Ok(true);
        }
        Ok(self
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(p, id, a)| p == principal && *id == vm.id && *a == access))
    }
}
