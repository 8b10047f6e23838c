//! The Gateway seam: what a front door (the SSH gateway, the HTTPS edge, the API)
//! asks of vmkit before it lets traffic in.
//!
//! - **identity** — a credential the client presented (an SSH public key, a `vmk_`
//!   API key, a share link) to a [`Caller`];
//! - **routing** — what the client dialled (an SSH user name, a jump target, an HTTP
//!   host and port) to an [`Upstream`]: the VM, the port, where it is reached;
//! - **policy** — whether the caller may do the [`Action`] (reach the web port, SSH
//!   in) on what was routed to, decided by the [`AccessPolicy`] the command surface
//!   uses too, so every door gives the same answer.
//!
//! A route answers the VM's record and shares as one lookup read them ([`Routed`]);
//! the decision is made on exactly that, and the upstream it names is that VM's: no
//! check of one thing and use of another. [`StoreGateway`] implements the seam over
//! the state store; an integrator with their own users or rules implements it (and
//! [`AccessPolicy`]) themselves. The generic suite in `vmkit_core::testing::suites`
//! checks any implementation.

use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::access::{AccessPolicy, Action, Caller, Denied, Door, Policy};
use crate::name::VmName;
use crate::share::Share;
use crate::state_store::{StateStore, StoreError};
use crate::time::Timestamp;
use crate::user::{ApiKey, SshPublicKey};
use crate::vm::{VmId, VmRecord};
use crate::vm_state::VmState;

/// A credential a client presented.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Credential<'a> {
    /// An SSH public key the client proved it holds.
    SshKey(&'a SshPublicKey),
    /// An API key, `vmk_<id>_<secret>` (see [`ApiKey`](crate::ApiKey)).
    ApiKey(&'a str),
    /// A share link's secret (`vms_...`).
    ShareLink(&'a str),
    /// A browser session cookie (see [`WebSessions`](crate::WebSessions)): on the
    /// gateway's own host when `host` is `None`, else on that VM host, where only a
    /// session made for it counts.
    WebSession {
        /// The cookie's value.
        secret: &'a str,
        /// The host the cookie came to, for a VM host's session.
        host: Option<&'a str>,
    },
}

/// What a client dialled.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum RouteTarget<'a> {
    /// `ssh NAME@host`, or `ssh NAME+USER@host` to land as `USER` in the guest: the
    /// SSH user name. One that names no VM is for the lobby.
    SshUser(&'a str),
    /// `ssh -J host NAME.domain`: the host and port the client asked the gateway to
    /// dial.
    SshJump {
        /// The host name asked for.
        host: &'a str,
        /// The port asked for.
        port: u16,
    },
    /// An HTTP request: its `Host` (without port) and the port it came in on as the
    /// client sees it. [`StoreGateway`] reaches the VM's default web port at
    /// `NAME.domain` and at the VM's custom domains, and port `N` at
    /// `NAME--N.domain`, whatever port the URL names.
    Http {
        /// The host name.
        host: &'a str,
        /// The port of the URL, `None` for the scheme's default.
        port: Option<u16>,
    },
}

/// Where routed traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Upstream {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: VmName,
    /// Its address on the host's VM network, when it has one.
    pub ip: Option<Ipv4Addr>,
    /// The port in the guest.
    pub port: u16,
    /// The user to land as in the guest (SSH), when the client named one.
    pub guest_user: Option<String>,
    /// Whether the VM is running (a stopped one may be woken by its owner).
    pub running: bool,
}

/// The answer of a route: the upstream, with the VM and its shares as the same
/// lookup read them, for the policy to decide on.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Routed {
    /// Where the traffic goes.
    pub upstream: Upstream,
    /// The VM's record.
    pub vm: VmRecord,
    /// Its shares.
    pub shares: Vec<Share>,
}

/// What a gateway does. Start from `default()` (nothing) and set fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GatewayCapabilities {
    /// Routes HTTP hosts (`NAME.domain`).
    pub host_routing: bool,
    /// Routes SSH user names and jump targets.
    pub ssh_routing: bool,
    /// Honours shares.
    pub shares: bool,
    /// Identifies API keys.
    pub api_keys: bool,
}

/// Errors from a Gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The host name is neither under the gateway's domain nor a custom domain.
    #[error("{0:?} is not a host this gateway serves")]
    UnknownHost(String),
    /// Looking up state failed.
    #[error("gateway lookup failed")]
    Store(#[from] StoreError),
}

/// The ingress seam: identity, routing and policy for front doors.
#[async_trait]
pub trait Gateway: Send + Sync {
    /// What this gateway does.
    fn capabilities(&self) -> GatewayCapabilities;

    /// The caller `credential` identifies, coming through `door`; `None` when it
    /// identifies nobody (an SSH key nobody registered: first contact, where the
    /// registration policy applies; a wrong API key). A suspended user is
    /// identified: the policy refuses them, and the door can say why.
    async fn identify(
        &self,
        credential: Credential<'_>,
        door: Door,
    ) -> Result<Option<Caller>, GatewayError>;

    /// Where `target` goes, with what the policy needs; `None` when it names no VM.
    async fn route(&self, target: RouteTarget<'_>) -> Result<Option<Routed>, GatewayError>;

    /// The access policy, which the command surface uses too.
    fn policy(&self) -> Arc<dyn AccessPolicy>;

    /// Whether `caller` may take `action` on what was routed: decided on the
    /// record and shares the route read, without another lookup. A VM the caller
    /// may not see is [`Denied::NotFound`], as one that does not exist.
    fn authorize(&self, caller: &Caller, action: Action, routed: &Routed) -> Result<(), Denied> {
        self.policy().vm(caller, action, &routed.vm, &routed.shares)
    }
}

/// How often, at most, an API key's last use is written (milliseconds).
const LAST_USE_EVERY_MS: u64 = 60_000;

/// The port an HTTP request without one reaches in the guest.
pub const DEFAULT_HTTP_PORT: u16 = 80;
/// The port SSH reaches in the guest.
pub const GUEST_SSH_PORT: u16 = 22;

/// vmkit's gateway over the state store: users by SSH key, API key and browser
/// session, VMs by name (`NAME@host`, `NAME.domain`, `NAME--PORT.domain`) and by
/// custom domain (see [`CustomDomains`](crate::CustomDomains)), and the
/// [`Policy`] (or another) to decide. An HTTP route carries only the shares that
/// cover the port it reaches.
#[derive(Clone)]
pub struct StoreGateway {
    store: Arc<dyn StateStore>,
    domain: String,
    policy: Arc<dyn AccessPolicy>,
}

impl std::fmt::Debug for StoreGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreGateway")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl StoreGateway {
    /// A gateway serving `*.domain` from `store`, with vmkit's [`Policy`].
    pub fn new(store: Arc<dyn StateStore>, domain: impl Into<String>) -> Self {
        Self {
            store,
            domain: domain.into().trim_matches('.').to_ascii_lowercase(),
            policy: Arc::new(Policy),
        }
    }

    /// Decides with `policy` instead.
    pub fn with_policy(mut self, policy: Arc<dyn AccessPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// The VM label of `host` under the domain: `web` of `web.example.com`.
    fn vm_label<'h>(&self, host: &'h str) -> Option<&'h str> {
        let host = host.trim_end_matches('.');
        let label = host.strip_suffix(self.domain.as_str())?.strip_suffix('.')?;
        (!label.contains('.')).then_some(label)
    }

    /// The user API key `secret` identifies, held to the key's limits: nobody for a
    /// wrong, revoked or expired key. Records the key's use at most once a
    /// minute; a failure to record it is logged and does not fail the request.
    async fn identify_api_key(
        &self,
        secret: &str,
        door: Door,
    ) -> Result<Option<Caller>, GatewayError> {
        let Some(id) = ApiKey::id_of(secret) else {
            return Ok(None);
        };
        let Some(key) = self.store.get_api_key(id).await? else {
            return Ok(None);
        };
        let now = Timestamp::now();
        if !key.verify(secret) || key.expired(now) {
            return Ok(None);
        }
        let stale = key
            .last_used_at
            .is_none_or(|last| now.0.saturating_sub(last.0) >= LAST_USE_EVERY_MS);
        if stale && let Err(e) = self.store.record_api_key_use(&key.id, now).await {
            tracing::warn!(key = %key.id, error = %e, "cannot record an API key's use");
        }
        Ok(self
            .store
            .get_user(key.user)
            .await?
            .map(|user| Caller::user(&user, door).with_api_key(&key)))
    }

    /// The VM named `label` with its shares, if the label is a VM name.
    async fn lookup(&self, label: &str) -> Result<Option<(VmRecord, Vec<Share>)>, GatewayError> {
        let Ok(name) = VmName::new(label) else {
            return Ok(None);
        };
        let Some(vm) = self.store.get_vm(&name).await? else {
            return Ok(None);
        };
        let shares = self.store.shares(vm.id).await?;
        Ok(Some((vm, shares)))
    }
}

fn routed(vm: VmRecord, shares: Vec<Share>, port: u16, guest_user: Option<String>) -> Routed {
    Routed {
        upstream: Upstream {
            vm: vm.id,
            name: vm.name.clone(),
            ip: vm.ip(),
            port,
            guest_user,
            running: vm.state == VmState::Running,
        },
        vm,
        shares,
    }
}

#[async_trait]
impl Gateway for StoreGateway {
    fn capabilities(&self) -> GatewayCapabilities {
        GatewayCapabilities {
            host_routing: true,
            ssh_routing: true,
            shares: true,
            api_keys: true,
        }
    }

    async fn identify(
        &self,
        credential: Credential<'_>,
        door: Door,
    ) -> Result<Option<Caller>, GatewayError> {
        let user = match credential {
            Credential::ShareLink(secret) => return Ok(Some(Caller::link(secret, door))),
            Credential::WebSession { secret, host } => {
                let user = crate::web::WebSessions::new(self.store.clone())
                    .user(secret, host)
                    .await?;
                return Ok(user.map(|user| Caller::user(&user, door)));
            }
            Credential::SshKey(key) => self.store.user_by_key(&key.fingerprint()).await?,
            Credential::ApiKey(secret) => return self.identify_api_key(secret, door).await,
        };
        let Some(user) = user else {
            return Ok(None);
        };
        Ok(self
            .store
            .get_user(user)
            .await?
            .map(|user| Caller::user(&user, door)))
    }

    async fn route(&self, target: RouteTarget<'_>) -> Result<Option<Routed>, GatewayError> {
        match target {
            RouteTarget::SshUser(user) => {
                let user = user.to_ascii_lowercase();
                let (label, guest_user) = match user.split_once('+') {
                    Some((label, guest)) if !guest.is_empty() => (label, Some(guest.to_owned())),
                    _ => (user.as_str(), None),
                };
                Ok(self
                    .lookup(label)
                    .await?
                    .map(|(vm, shares)| routed(vm, shares, GUEST_SSH_PORT, guest_user)))
            }
            RouteTarget::SshJump { host, port } => {
                let host = host.to_ascii_lowercase();
                let Some(label) = self.vm_label(&host) else {
                    return Err(GatewayError::UnknownHost(host));
                };
                Ok(self
                    .lookup(label)
                    .await?
                    .map(|(vm, shares)| routed(vm, shares, port, None)))
            }
            RouteTarget::Http { host, port: _ } => {
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                let (found, port) = match self.vm_label(&host) {
                    Some(label) => match VmName::with_port(label) {
                        Some((name, port)) => (self.lookup(name.as_str()).await?, Some(port)),
                        None => (self.lookup(label).await?, None),
                    },
                    // A custom domain reaches its VM's default web port.
                    None => match self.store.get_domain(&host).await? {
                        Some(domain) => match self.store.get_vm_by_id(domain.vm).await? {
                            Some(vm) => {
                                let shares = self.store.shares(vm.id).await?;
                                (Some((vm, shares)), None)
                            }
                            None => (None, None),
                        },
                        None => return Err(GatewayError::UnknownHost(host)),
                    },
                };
                Ok(found.map(|(vm, shares)| {
                    let port = port.unwrap_or_else(|| vm.default_http_port());
                    let shares = shares
                        .into_iter()
                        .filter(|s| s.access != crate::share::Access::Http || s.covers_port(port))
                        .collect();
                    routed(vm, shares, port, None)
                }))
            }
        }
    }

    fn policy(&self) -> Arc<dyn AccessPolicy> {
        self.policy.clone()
    }
}
