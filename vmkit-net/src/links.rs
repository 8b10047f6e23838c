//! Links, addresses and routes over rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoKind, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, RouteMessageBuilder};
use vmkit_core::{Ipv4Net, NetworkError};

use crate::error::{netlink, netlink_errno};

/// What vmkit needs to know about a link.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            kind: None,
            controller: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// The link called `name`, if there is one.
pub(crate) async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>, NetworkError> {
    let mut stream = h.link().get().match_name(name.to_owned()).execute();
    match stream.try_next().await {
        Ok(m) => Ok(m.as_ref().map(Link::from_message)),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink(format!("looking up link {name}"), e)),
    }
}

/// Every link.
pub(crate) async fn links(h: &Handle) -> Result<Vec<Link>, NetworkError> {
    h.link()
        .get()
        .execute()
        .map_ok(|m| Link::from_message(&m))
        .try_collect()
        .await
        .map_err(|e| netlink("listing links", e))
}

/// Creates the bridge `name` with the fixed MAC `mac` (so that it does not follow
/// its ports' MACs), down. Returns its index.
pub(crate) async fn create_bridge(
    h: &Handle,
    name: &str,
    mac: [u8; 6],
) -> Result<u32, NetworkError> {
    let msg = LinkBridge::new(name).down().address(mac.to_vec()).build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| netlink(format!("creating bridge {name}"), e))?;
    link_by_name(h, name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| {
            crate::error::request(
                format!("creating bridge {name}"),
                "the bridge vanished right after it was created",
            )
        })
}

/// Sets a link up.
pub(crate) async fn set_up(h: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink(format!("setting {name} up"), e))
}

/// Sets a link's alias (free text shown by `ip link`).
pub(crate) async fn set_alias(
    h: &Handle,
    index: u32,
    name: &str,
    alias: &str,
) -> Result<(), NetworkError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).alias(alias).build())
        .execute()
        .await
        .map_err(|e| netlink(format!("setting the alias of {name}"), e))
}

/// Makes `index` a port of the bridge `bridge`.
pub(crate) async fn enslave(
    h: &Handle,
    index: u32,
    name: &str,
    bridge: u32,
) -> Result<(), NetworkError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).controller(bridge).build())
        .execute()
        .await
        .map_err(|e| netlink(format!("attaching {name} to the bridge"), e))
}

/// Sets the bridge port `index` isolated: it exchanges frames with the bridge
/// itself (the host) but with no other isolated port.
pub(crate) async fn set_isolated(h: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    let msg = LinkBridgePort::new(index)
        .append_info_data(InfoBridgePort::Isolated(true))
        .build();
    h.link()
        .set_port(msg)
        .execute()
        .await
        .map_err(|e| netlink(format!("isolating bridge port {name}"), e))
}

/// Deletes a link; a link that is already gone is not an error.
pub(crate) async fn delete_link(h: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(netlink(format!("deleting {name}"), e)),
    }
}

/// Adds `addr/prefix` to the link unless it has it already.
pub(crate) async fn ensure_address(
    h: &Handle,
    index: u32,
    name: &str,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetworkError> {
    let existing: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink(format!("listing the addresses of {name}"), e))?;
    let present = existing.iter().any(|m| {
        m.header.prefix_len == prefix
            && m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(ip)) if *ip == addr))
    });
    if present {
        return Ok(());
    }
    match h
        .address()
        .add(index, IpAddr::V4(addr), prefix)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(netlink(format!("adding {addr}/{prefix} to {name}"), e)),
    }
}

/// An IPv4 route as far as collision checks and uplink detection care.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub dst: Ipv4Net,
    pub oif: Option<u32>,
    pub table: u32,
    pub priority: u32,
}

/// Every IPv4 route in every table.
pub(crate) async fn routes(h: &Handle) -> Result<Vec<Route>, NetworkError> {
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink("listing routes", e))?;
    Ok(msgs.iter().filter_map(route_of).collect())
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut oif = None;
    let mut table = u32::from(m.header.table);
    let mut priority = 0;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    let dst = Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?;
    Some(Route {
        dst,
        oif,
        table,
        priority,
    })
}
