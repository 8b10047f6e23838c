//! Addresses: MACs, IPv4 networks, the lease pool and leases.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::vm::VmId;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The locally administered QEMU/KVM prefix `52:54:00` followed by the low three
    /// bytes of `ip`: stable for a lease and unique within any pool up to a /8.
    pub fn for_ip(ip: Ipv4Addr) -> Self {
        let o = ip.octets();
        Self([0x52, 0x54, 0x00, o[1], o[2], o[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A string that is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address; expected six hex pairs such as 52:54:00:0a:00:02")]
#[non_exhaustive]
pub struct MacParseError(String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = MacParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// An IPv4 network in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

/// A string that is not an IPv4 network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 network; expected CIDR notation such as 10.88.0.0/16")]
#[non_exhaustive]
pub struct NetParseError(String);

impl Ipv4Net {
    /// The network containing `addr` with `prefix` bits; host bits are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetParseError> {
        if prefix > 32 {
            return Err(NetParseError(format!("{addr}/{prefix}")));
        }
        let mask = Self::mask_of(prefix);
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !Self::mask_of(self.prefix))
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.addr)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NetParseError(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        Self::new(addr, prefix).map_err(|_| err())
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = NetParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Net> for String {
    fn from(n: Ipv4Net) -> String {
        n.to_string()
    }
}

/// The addresses guests are leased from.
///
/// The host's own address on it ([`IpPool::host_address`], the bridge's, which is
/// the guests' default gateway) is the first of the subnet; guests get addresses from
/// the second one up to the last before broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct IpPool {
    /// The guests' subnet.
    pub subnet: Ipv4Net,
}

impl IpPool {
    /// A pool over `subnet`, which must leave room for the host and one guest.
    pub fn new(subnet: Ipv4Net) -> Result<Self, NetParseError> {
        if subnet.prefix() > 30 {
            return Err(NetParseError(format!(
                "{subnet} (too small: use a /30 or larger)"
            )));
        }
        Ok(Self { subnet })
    }

    /// The host's address on the VM network: the bridge's own, and the guests'
    /// default gateway.
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// Every address a guest may be given, lowest first.
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let first = u32::from(self.subnet.network()) + 2;
        let last = u32::from(self.subnet.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }

    /// How many guests the pool holds.
    pub fn capacity(&self) -> u32 {
        u32::from(self.subnet.broadcast()) - u32::from(self.subnet.network()) - 2
    }
}

/// An address leased to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct IpLease {
    /// The VM holding the lease.
    pub vm: VmId,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC, derived from the address.
    pub mac: MacAddr,
    /// Prefix length of the subnet.
    pub prefix: u8,
    /// The gateway.
    pub gateway: Ipv4Addr,
    /// When the lease was taken.
    pub leased_at: Timestamp,
}

impl IpLease {
    /// A lease of `ip` from `pool` to `vm`, taken now.
    pub fn new(vm: VmId, ip: Ipv4Addr, pool: &IpPool) -> Self {
        Self {
            vm,
            ip,
            mac: MacAddr::for_ip(ip),
            prefix: pool.subnet.prefix(),
            gateway: pool.host_address(),
            leased_at: Timestamp::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_text() {
        let m: MacAddr = "52:54:00:0a:ff:02".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:0a:ff:02");
        assert!("52:54:00:0a:ff".parse::<MacAddr>().is_err());
        assert!("52:54:00:0a:ff:02:03".parse::<MacAddr>().is_err());
        assert!("zz:54:00:0a:ff:02".parse::<MacAddr>().is_err());
    }

    #[test]
    fn pool_skips_network_gateway_and_broadcast() {
        let pool = IpPool::new("10.88.0.0/29".parse().unwrap()).unwrap();
        assert_eq!(pool.host_address(), Ipv4Addr::new(10, 88, 0, 1));
        let addrs: Vec<_> = pool.guest_addresses().collect();
        assert_eq!(addrs.first(), Some(&Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(addrs.last(), Some(&Ipv4Addr::new(10, 88, 0, 6)));
        assert_eq!(addrs.len() as u32, pool.capacity());
    }

    #[test]
    fn network_math_is_right() {
        let n: Ipv4Net = "10.88.3.7/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.88.0.0/16");
        assert!(n.contains(Ipv4Addr::new(10, 88, 255, 1)));
        assert!(!n.contains(Ipv4Addr::new(10, 89, 0, 1)));
        assert!(n.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!n.overlaps(&"192.168.0.0/16".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
    }

    #[test]
    fn macs_of_distinct_leases_differ() {
        let a = MacAddr::for_ip(Ipv4Addr::new(10, 88, 0, 2));
        let b = MacAddr::for_ip(Ipv4Addr::new(10, 88, 1, 2));
        assert_ne!(a, b);
        assert_eq!(a.0[..3], [0x52, 0x54, 0x00]);
    }
}
