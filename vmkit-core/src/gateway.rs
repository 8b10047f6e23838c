//! The Gateway seam: how outside traffic finds a VM and whether it may enter.

use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::name::VmName;
use crate::share::{Access, ShareTarget};
use crate::state::VmState;
use crate::store::{StateStore, StoreError};
use crate::user::UserId;
use crate::vm::{VmId, VmRecord};

/// Who is asking to get in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
#[non_exhaustive]
pub enum Principal {
    /// A signed-in user (by SSH key, session or API key).
    User(UserId),
    /// Someone presenting a share link token.
    Link(String),
    /// Nobody in particular.
    Anonymous,
}

/// Where traffic for a host name goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Route {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: VmName,
    /// Its owner.
    pub owner: UserId,
    /// Its address, if it has one.
    pub ip: Option<Ipv4Addr>,
    /// Whether it is running.
    pub running: bool,
}

impl Route {
    /// The route to `vm` as it is now.
    pub fn to(vm: &VmRecord) -> Self {
        Self {
            vm: vm.id,
            name: vm.name.clone(),
            owner: vm.owner,
            ip: vm.ip(),
            running: vm.state == VmState::Running,
        }
    }
}

/// What a gateway serves. Start from `default()` (nothing) and set fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GatewayCapabilities {
    /// Routes by host name (`name.domain`).
    pub host_routing: bool,
    /// Honours shares.
    pub shares: bool,
}

/// Errors from a Gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The host name is not under the gateway's domain or names no VM.
    #[error("{0:?} is not a host this gateway serves")]
    UnknownHost(String),
    /// Looking up state failed.
    #[error("gateway lookup failed")]
    Store(#[from] StoreError),
}

/// The ingress policy: route by host name, decide access for a principal. It is meant
/// for front doors such as an SSH gateway or an HTTPS proxy; vmkit has neither yet,
/// so integrators supply their own.
#[async_trait]
pub trait Gateway: Send + Sync {
    /// What this gateway does.
    fn capabilities(&self) -> GatewayCapabilities;

    /// The VM that `host` (such as `web.example.com`) names, if any.
    async fn route(&self, host: &str) -> Result<Option<Route>, GatewayError>;

    /// Whether `principal` may use `access` on `vm`.
    async fn authorize(
        &self,
        principal: &Principal,
        vm: &VmRecord,
        access: Access,
    ) -> Result<bool, GatewayError>;
}

/// The default policy: `<vm>.<domain>` routes to the VM of that name; owners may do
/// everything; shares grant what they name; everyone else is refused.
#[derive(Clone)]
pub struct StoreGateway {
    store: Arc<dyn StateStore>,
    domain: String,
}

impl std::fmt::Debug for StoreGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreGateway")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl StoreGateway {
    /// A gateway serving `*.domain` from `store`.
    pub fn new(store: Arc<dyn StateStore>, domain: impl Into<String>) -> Self {
        Self {
            store,
            domain: domain.into().trim_matches('.').to_ascii_lowercase(),
        }
    }

    fn vm_label<'h>(&self, host: &'h str) -> Option<&'h str> {
        let host = host.split(':').next().unwrap_or(host).trim_end_matches('.');
        let label = host.strip_suffix(self.domain.as_str())?.strip_suffix('.')?;
        (!label.contains('.')).then_some(label)
    }
}

#[async_trait]
impl Gateway for StoreGateway {
    fn capabilities(&self) -> GatewayCapabilities {
        GatewayCapabilities {
            host_routing: true,
            shares: true,
        }
    }

    async fn route(&self, host: &str) -> Result<Option<Route>, GatewayError> {
        let host = host.to_ascii_lowercase();
        let Some(label) = self.vm_label(&host) else {
            return Err(GatewayError::UnknownHost(host));
        };
        let Ok(name) = VmName::new(label) else {
            return Ok(None);
        };
        Ok(self.store.get_vm(&name).await?.as_ref().map(Route::to))
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
        let shares = self.store.shares(vm.id).await?;
        Ok(shares.iter().any(|s| {
            s.access == access
                && match (&s.target, principal) {
                    (ShareTarget::Public, _) => true,
                    (ShareTarget::User(u), Principal::User(p)) => u == p,
                    (ShareTarget::Link(t), Principal::Link(p)) => t == p,
                    _ => false,
                }
        }))
    }
}
