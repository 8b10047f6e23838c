//! vmkit-net: the [`Network`](vmkit_core::Network) backend of vmkit on a Linux bridge.
//!
//! [`BridgeNetwork`] puts every guest on one bridge (default `br-vmkit`,
//! `10.88.0.0/16`, the gateway is the first address) through a persistent TAP per
//! VM, masquerades guest traffic out of the uplink, and confines guests with
//! nftables rules in vmkit's own tables. Links, addresses and routes are made over
//! rtnetlink; TAPs with `TUNSETIFF`; rules with `nft -j -f -` (JSON, built with the
//! `nftables` crate). Everything can run inside a given network namespace
//! ([`BridgeConfig::netns`]), which is how the tests run it.
//!
//! # What a guest can reach
//!
//! | destination | reached? | enforced by |
//! | --- | --- | --- |
//! | the internet | yes, masqueraded out of the uplink | `inet vmkit` `postrouting` |
//! | its gateway, UDP/TCP 53 (DNS) and ICMP echo | yes | `inet vmkit` `guest_to_host` |
//! | any other address or port of the host (incl. the daemon's API) | no | `guest_to_host` drops |
//! | other guests, on the bridge | no | bridge ports are `isolated` |
//! | other guests, routed through the gateway | no | `guest_out` drops bridge → bridge |
//! | `169.254.0.0/16` (metadata) and the blocked ranges (private, CGNAT, loopback, multicast, reserved; [`BridgeConfig::blocked_destinations`]) | no | `guest_out` drops |
//! | anything over IPv6 | no | IPv6 is disabled on the bridge and TAPs, and IPv6 frames are dropped at each TAP |
//!
//! Nothing from outside reaches a guest unless it answers the guest (`guest_in`);
//! the host itself reaches guests freely. That is where the SSH gateway and the
//! HTTPS edge reach them from.
//!
//! Each TAP has its own `netdev` chain on its ingress hook: a frame leaves the TAP
//! only if its source MAC is the lease's, and it is either IPv4 from the lease's
//! address or ARP announcing the lease's MAC and address. Everything else (spoofed
//! MAC or IP, IPv6, VLAN tags, other protocols) is counted and dropped.
//!
//! # DNS
//!
//! Guests are told to use their gateway as their only name server. vmkit runs no
//! resolver: by default ([`DnsForwarding::Auto`]) queries to the gateway's port 53
//! are DNAT-ed to the host's upstream resolver from `resolv.conf`;
//! [`DnsForwarding::To`] names one; [`DnsForwarding::Local`] leaves them to a
//! resolver the operator runs on the gateway address.
//!
//! # TAPs
//!
//! A VM's TAP is called `vm` + its id in 13 base-32 digits ([`tap_name`]), so
//! [`list`](vmkit_core::Network::list) recovers full ids; it is persistent,
//! single-queue, with `IFF_VNET_HDR`, owned by [`BridgeConfig::tap_owner`], so the
//! hypervisor opens it by name without privileges.
//!
//! # The SSH lobby
//!
//! With the `ssh` feature, [`ssh::SshGateway`] serves the SSH lobby (`ssh HOST ls`)
//! over the command surface of a [`Manager`](vmkit_core::Manager).
//!
//! # The HTTPS edge
//!
//! With the `https` feature, [`https::HttpsEdge`] serves `https://NAME.domain` (a
//! VM's web server), private to its owner until shared, with sign-in on the apex
//! host and certificates from a [`https::tls::CertStore`].
//!
//! # Example
//!
//! Building the backend changes nothing; `setup_host` and `attach` need root
//! (or `CAP_NET_ADMIN`).
//!
//! ```
//! use vmkit_core::Network;
//! use vmkit_net::{BridgeConfig, BridgeNetwork, DnsForwarding};
//!
//! # fn main() -> Result<(), vmkit_core::NetworkError> {
//! let network = BridgeNetwork::new(BridgeConfig::new().dns(DnsForwarding::Local))?;
//! assert_eq!(network.pool().host_address().to_string(), "10.88.0.1");
//! assert!(network.capabilities().anti_spoof);
//! // As root: network.setup_host().await?; network.attach(vm, &lease).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
#[cfg(any(feature = "https", feature = "dns"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "https", feature = "dns"))))]
pub mod challenges;
mod config;
mod core_types;
#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub mod dns;
mod error;
#[cfg(feature = "https")]
#[cfg_attr(docsrs, doc(cfg(feature = "https")))]
pub mod https;
mod links;
mod rules;
mod sysctl;
mod tap;
mod worker;

#[cfg(feature = "ssh")]
#[cfg_attr(docsrs, doc(cfg(feature = "ssh")))]
pub mod ssh;

pub use backend::BridgeNetwork;
pub use config::{
    BridgeConfig, DEFAULT_BRIDGE, DEFAULT_SUBNET, DEFAULT_TABLE, DnsForwarding, Uplink,
};
pub use tap::{TAP_PREFIX, tap_name, vm_of_tap};
