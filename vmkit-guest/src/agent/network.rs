//! The guest's network, through netlink: the interface with a given MAC gets one IPv4
//! address, comes up and routes through the gateway; `/etc/resolv.conf` names the DNS
//! servers.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::SystemHandler;
use super::files::{Owner, write_bytes};
use crate::ops::NetworkConfig;

/// Aborts the netlink connection task when the call ends.
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Parses `52:54:00:12:34:56`.
pub(super) fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let bad = || format!("`{mac}` is not a MAC address");
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

/// Checks a config before anything is changed.
pub(super) fn check(config: &NetworkConfig) -> Result<[u8; 6], String> {
    let mac = parse_mac(&config.mac)?;
    let NetworkConfig {
        address,
        prefix,
        gateway,
        mtu,
        ..
    } = config;
    if *prefix > 32 {
        return Err(format!("/{prefix} is not an IPv4 prefix length"));
    }
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
        return Err(format!("{address} cannot be an interface's address"));
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
    if u32::from(*gateway) & mask != u32::from(*address) & mask || gateway == address {
        return Err(format!(
            "the gateway {gateway} is not another address in {address}/{prefix}"
        ));
    }
    if let Some(mtu) = mtu
        && !(68..=65535).contains(mtu)
    {
        return Err(format!("an MTU of {mtu} is out of range (68-65535)"));
    }
    Ok(mac)
}

pub(super) async fn configure(
    handler: &SystemHandler,
    config: &NetworkConfig,
) -> Result<(), String> {
    let mac = check(config)?;
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|err| format!("cannot open a netlink socket: {err}"))?;
    let _connection = Connection(tokio::spawn(connection));

    let (index, name) = find_link(&handle, mac, &config.mac).await?;
    let mut link = LinkUnspec::new_with_index(index).up();
    if let Some(mtu) = config.mtu {
        link = link.mtu(mtu);
    }
    handle
        .link()
        .set(link.build())
        .execute()
        .await
        .map_err(|err| format!("cannot bring {name} up: {err}"))?;

    set_address(&handle, index, &name, config.address, config.prefix).await?;

    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(config.gateway)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|err| format!("cannot route through {} on {name}: {err}", config.gateway))?;

    if !config.dns.is_empty() {
        let mut text = String::from("# Written by the vmkit agent.\n");
        for server in &config.dns {
            text.push_str(&format!("nameserver {server}\n"));
        }
        write_bytes(
            handler.path("/etc/resolv.conf"),
            text.into_bytes(),
            0o644,
            Some(Owner { uid: 0, gid: 0 }),
        )
        .await?;
    }
    Ok(())
}

/// The index and name of the link whose MAC is `mac`.
async fn find_link(handle: &Handle, mac: [u8; 6], shown: &str) -> Result<(u32, String), String> {
    let links: Vec<_> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|err| format!("cannot list the network interfaces: {err}"))?;
    links
        .iter()
        .find_map(|link| {
            let has_mac = link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Address(bytes) if bytes.as_slice() == mac));
            has_mac.then(|| {
                let name = link
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::IfName(name) => Some(name.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| format!("interface {}", link.header.index));
                (link.header.index, name)
            })
        })
        .ok_or_else(|| format!("no network interface has the MAC address {shown}"))
}

/// The IPv4 address and prefix of an address message.
fn ipv4_of(message: &AddressMessage) -> Option<(Ipv4Addr, u8)> {
    message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, message.header.prefix_len)),
        _ => None,
    })
}

/// Leaves `address/prefix` as the link's only IPv4 address.
async fn set_address(
    handle: &Handle,
    index: u32,
    name: &str,
    address: Ipv4Addr,
    prefix: u8,
) -> Result<(), String> {
    let existing: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|err| format!("cannot list the addresses of {name}: {err}"))?;
    let mut present = false;
    for message in existing {
        match ipv4_of(&message) {
            Some(current) if current == (address, prefix) => present = true,
            Some((old, old_prefix)) => handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(|err| format!("cannot remove {old}/{old_prefix} from {name}: {err}"))?,
            None => {}
        }
    }
    if !present {
        handle
            .address()
            .add(index, IpAddr::V4(address), prefix)
            .execute()
            .await
            .map_err(|err| format!("cannot add {address}/{prefix} to {name}: {err}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: [u8; 4], prefix: u8, gateway: [u8; 4]) -> NetworkConfig {
        NetworkConfig::new("52:54:00:ab:CD:01", address.into(), prefix, gateway.into())
    }

    #[test]
    fn macs_parse_in_any_case() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:01"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5254.00ab.cd01",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn gateway_must_be_in_the_subnet() {
        assert!(check(&config([10, 0, 0, 5], 24, [10, 0, 0, 1])).is_ok());
        assert!(check(&config([10, 0, 0, 5], 24, [10, 0, 1, 1])).is_err());
        assert!(check(&config([10, 0, 0, 5], 24, [10, 0, 0, 5])).is_err());
        assert!(check(&config([10, 0, 0, 5], 0, [192, 168, 0, 1])).is_ok());
        assert!(check(&config([10, 0, 0, 5], 33, [10, 0, 0, 1])).is_err());
    }

    #[test]
    fn mtu_is_range_checked() {
        assert!(check(&config([10, 0, 0, 5], 24, [10, 0, 0, 1]).mtu(1500)).is_ok());
        assert!(check(&config([10, 0, 0, 5], 24, [10, 0, 0, 1]).mtu(10)).is_err());
    }
}
