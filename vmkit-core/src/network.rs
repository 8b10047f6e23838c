//! The Network seam: host setup, per-VM TAPs and isolation.

use std::net::Ipv4Addr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::address::{IpLease, IpPool, MacAddr};
use crate::vm::VmId;

/// A VM's place on the network: its TAP and what the guest must be told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NetAttachment {
    /// Owning VM.
    pub vm: VmId,
    /// Host TAP device.
    pub tap: String,
    /// Guest MAC.
    pub mac: MacAddr,
    /// Guest address.
    pub ip: Ipv4Addr,
    /// Subnet prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// DNS servers for the guest.
    pub dns: Vec<Ipv4Addr>,
}

impl NetAttachment {
    /// The attachment of `lease` on `tap`, with `dns` servers for the guest.
    pub fn new(lease: &IpLease, tap: impl Into<String>, dns: Vec<Ipv4Addr>) -> Self {
        Self {
            vm: lease.vm,
            tap: tap.into(),
            mac: lease.mac,
            ip: lease.ip,
            prefix: lease.prefix,
            gateway: lease.gateway,
            dns,
        }
    }
}

/// What a Network backend provides. Start from `default()` (nothing) and set fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NetworkCapabilities {
    /// Guests cannot reach the host, each other or metadata addresses.
    pub isolation: bool,
    /// Guests reach the internet through NAT.
    pub nat: bool,
    /// Spoofed source MACs and IPs are dropped.
    pub anti_spoof: bool,
}

/// Errors from a Network backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// The configured subnet collides with an existing route.
    #[error("subnet {subnet} collides with existing route {route}; choose another subnet")]
    SubnetCollision {
        /// Configured subnet.
        subnet: String,
        /// The conflicting route.
        route: String,
    },
    /// The lease is not from this backend's pool.
    #[error("lease {0} is not in this network's pool")]
    ForeignLease(Ipv4Addr),
    /// The host was not set up.
    #[error("host networking is not set up; the daemon sets it up at start")]
    NotSetUp,
    /// Not allowed (not root, or missing CAP_NET_ADMIN).
    #[error("permission denied: {0}; run the daemon as root or with CAP_NET_ADMIN")]
    Permission(String),
    /// A netlink or nftables request failed.
    #[error("{operation} failed: {message}")]
    Request {
        /// What was being done.
        operation: String,
        /// The kernel's or tool's message.
        message: String,
    },
    /// An I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A network backend. Addresses come from the state store's lease table over
/// [`Network::pool`]; the backend turns a lease into a TAP with isolation rules.
#[async_trait]
pub trait Network: Send + Sync {
    /// What this backend provides.
    fn capabilities(&self) -> NetworkCapabilities;

    /// The pool guest addresses are leased from.
    fn pool(&self) -> IpPool;

    /// One-time host setup (bridge, forwarding, NAT, base rules). Idempotent.
    async fn setup_host(&self) -> Result<(), NetworkError>;

    /// Creates `vm`'s TAP on the bridge with isolation rules for `lease`. Idempotent.
    async fn attach(&self, vm: VmId, lease: &IpLease) -> Result<NetAttachment, NetworkError>;

    /// Removes `vm`'s TAP and its rules. Idempotent: a missing TAP is not an error.
    async fn detach(&self, vm: VmId) -> Result<(), NetworkError>;

    /// The VMs that have a TAP on the host, for reconcile.
    async fn list(&self) -> Result<Vec<VmId>, NetworkError>;
}
