//! Configuration of the bridge backend.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use vmkit_core::Ipv4Net;

/// The default bridge name.
pub const DEFAULT_BRIDGE: &str = "br-vmkit";
/// The default guest subnet.
pub const DEFAULT_SUBNET: &str = "10.88.0.0/16";
/// The default name of vmkit's nftables tables (one `inet`, one `netdev`).
pub const DEFAULT_TABLE: &str = "vmkit";

/// Which interface guests' traffic leaves the host through (and is masqueraded on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Uplink {
    /// The interface of the IPv4 default route at [`setup_host`] time; when there is
    /// no default route, any interface but the bridge (as [`Uplink::Any`]).
    ///
    /// [`setup_host`]: vmkit_core::Network::setup_host
    #[default]
    Auto,
    /// This interface.
    Interface(String),
    /// Any interface but the bridge (hosts with several uplinks or policy routing).
    Any,
}

/// How the guests' DNS queries, sent to their gateway, are answered.
///
/// Guests are always told to use their gateway (the bridge address) as their only
/// name server, and may reach the gateway on port 53 (UDP and TCP) and nothing else.
/// vmkit runs no resolver itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DnsForwarding {
    /// The first IPv4 name server in `/etc/resolv.conf` that is not a loopback
    /// address (else in `/run/systemd/resolve/resolv.conf`, where systemd-resolved
    /// lists its upstreams), as [`DnsForwarding::To`]; when there is none, as
    /// [`DnsForwarding::Local`].
    #[default]
    Auto,
    /// Queries to the gateway's port 53 are DNAT-ed to this resolver (and
    /// masqueraded), so guests resolve through it without reaching it directly.
    To(Ipv4Addr),
    /// Queries stay on the host: the operator runs a resolver that listens on the
    /// gateway address (dnsmasq, unbound, systemd-resolved with a `DNSStubListenerExtra`).
    Local,
}

/// Configuration of a [`BridgeNetwork`](crate::BridgeNetwork). Build it with
/// [`BridgeConfig::new`] and the setters.
///
/// ```
/// use vmkit_net::{BridgeConfig, DnsForwarding};
///
/// let config = BridgeConfig::new()
///     .bridge("br-vmkit")
///     .subnet("10.88.0.0/16".parse().expect("a CIDR"))
///     .dns(DnsForwarding::Local);
/// assert_eq!(config.bridge_name(), "br-vmkit");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeConfig {
    pub(crate) bridge: String,
    pub(crate) subnet: Ipv4Net,
    pub(crate) dns: DnsForwarding,
    pub(crate) uplink: Uplink,
    pub(crate) table: String,
    pub(crate) netns: Option<PathBuf>,
    pub(crate) tap_owner: Option<u32>,
    pub(crate) blocked: Vec<Ipv4Net>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl BridgeConfig {
    /// The defaults: bridge `br-vmkit`, subnet `10.88.0.0/16`, DNS forwarded to the
    /// host's resolver, uplink from the default route, tables named `vmkit`, the
    /// daemon's own network namespace, TAPs owned by the daemon's user, and the
    /// private, link-local, loopback, multicast and reserved ranges unreachable
    /// for guests (see [`BridgeConfig::blocked_destinations`]).
    pub fn new() -> Self {
        Self {
            bridge: DEFAULT_BRIDGE.to_owned(),
            subnet: net(Ipv4Addr::new(10, 88, 0, 0), 16),
            dns: DnsForwarding::default(),
            uplink: Uplink::default(),
            table: DEFAULT_TABLE.to_owned(),
            netns: None,
            tap_owner: None,
            blocked: default_blocked(),
        }
    }

    /// The bridge's name (at most 15 bytes).
    pub fn bridge(mut self, name: impl Into<String>) -> Self {
        self.bridge = name.into();
        self
    }

    /// The guests' subnet; the gateway is its first host address.
    pub fn subnet(mut self, subnet: Ipv4Net) -> Self {
        self.subnet = subnet;
        self
    }

    /// How guests' DNS queries to the gateway are answered.
    pub fn dns(mut self, dns: DnsForwarding) -> Self {
        self.dns = dns;
        self
    }

    /// Which interface guest traffic is masqueraded out of.
    pub fn uplink(mut self, uplink: Uplink) -> Self {
        self.uplink = uplink;
        self
    }

    /// The name of vmkit's nftables tables (`inet` and `netdev` families).
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// Operate in the network namespace bound at `path` (such as
    /// `/run/netns/NAME`) instead of the daemon's own: links, routes, sysctls and
    /// nftables rules are all made there.
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// The user that may open the TAPs by name (the hypervisor's user). Defaults to
    /// the daemon's effective user.
    pub fn tap_owner(mut self, uid: u32) -> Self {
        self.tap_owner = Some(uid);
        self
    }

    /// Destinations guests may never reach through the host, in addition to the
    /// host itself, other guests and `169.254.0.0/16` (always blocked). Replaces
    /// the default list: `0.0.0.0/8`, `10.0.0.0/8`, `100.64.0.0/10`, `127.0.0.0/8`,
    /// `169.254.0.0/16`, `172.16.0.0/12`, `192.0.0.0/24`, `192.168.0.0/16`,
    /// `198.18.0.0/15`, `224.0.0.0/4`, `240.0.0.0/4`.
    pub fn blocked_destinations(mut self, nets: Vec<Ipv4Net>) -> Self {
        self.blocked = nets;
        self
    }

    /// The bridge's name.
    pub fn bridge_name(&self) -> &str {
        &self.bridge
    }

    /// The guests' subnet.
    pub fn subnet_net(&self) -> Ipv4Net {
        self.subnet
    }

    /// The nftables table name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The network namespace operated in, if not the daemon's own.
    pub fn netns_path(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// The DNS setting.
    pub fn dns_forwarding(&self) -> &DnsForwarding {
        &self.dns
    }

    /// The uplink setting.
    pub fn uplink_setting(&self) -> &Uplink {
        &self.uplink
    }
}

fn net(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
    Ipv4Net::new(addr, prefix).expect("every prefix in this file is at most 32")
}

fn default_blocked() -> Vec<Ipv4Net> {
    [
        ([0, 0, 0, 0], 8),
        ([10, 0, 0, 0], 8),
        ([100, 64, 0, 0], 10),
        ([127, 0, 0, 0], 8),
        ([169, 254, 0, 0], 16),
        ([172, 16, 0, 0], 12),
        ([192, 0, 0, 0], 24),
        ([192, 168, 0, 0], 16),
        ([198, 18, 0, 0], 15),
        ([224, 0, 0, 0], 4),
        ([240, 0, 0, 0], 4),
    ]
    .into_iter()
    .map(|(a, p)| net(Ipv4Addr::from(a), p))
    .collect()
}

/// The first IPv4 name server that is not a loopback address in a resolv.conf text.
pub(crate) fn upstream_nameserver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse::<Ipv4Addr>().ok(),
                _ => None,
            }
        })
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_parsing_skips_loopback_and_ipv6() {
        let text = "# generated\nnameserver 127.0.0.53\nnameserver ::1\nsearch lan\nnameserver 192.0.2.53\n";
        assert_eq!(
            upstream_nameserver(text),
            Some(Ipv4Addr::new(192, 0, 2, 53))
        );
        assert_eq!(upstream_nameserver("nameserver 127.0.0.1\n"), None);
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = BridgeConfig::new();
        assert_eq!(c.bridge_name(), DEFAULT_BRIDGE);
        assert_eq!(c.subnet_net().to_string(), DEFAULT_SUBNET);
        assert_eq!(c.table_name(), DEFAULT_TABLE);
        assert_eq!(c.blocked.len(), 11);
        assert!(
            c.blocked
                .iter()
                .any(|n| n.contains(Ipv4Addr::new(169, 254, 169, 254)))
        );
    }
}
