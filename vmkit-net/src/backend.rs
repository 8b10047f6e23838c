//! [`BridgeNetwork`]: the [`Network`] backend on a Linux bridge.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use rtnetlink::Handle;
use rtnetlink::packet_route::link::InfoKind;
use vmkit_core::{
    IpLease, IpPool, NetAttachment, Network, NetworkCapabilities, NetworkError, VmId,
};

use crate::config::{BridgeConfig, DnsForwarding, Uplink, upstream_nameserver};
use crate::error::request;
use crate::links::{self, Link, Route};
use crate::rules::{self, HostRules};
use crate::tap::{self, tap_name, vm_of_tap};
use crate::worker::Worker;
use crate::{core_types, sysctl};

/// The [`Network`] backend on a Linux bridge: one bridge with the gateway address,
/// NAT out of the uplink, a persistent TAP per VM as an isolated bridge port, and
/// nftables rules that confine each guest (see the crate docs for the rules).
///
/// Every operation runs on one thread that lives in the configured network
/// namespace, one at a time.
#[derive(Debug)]
pub struct BridgeNetwork {
    config: BridgeConfig,
    pool: IpPool,
    owner: u32,
    capabilities: NetworkCapabilities,
    set_up: AtomicBool,
    worker: Worker,
}

impl BridgeNetwork {
    /// A backend for `config`. Checks the config and enters its network namespace;
    /// changes nothing on the host until [`Network::setup_host`].
    pub fn new(config: BridgeConfig) -> Result<Self, NetworkError> {
        check_config(&config)?;
        let pool = IpPool::new(config.subnet)
            .map_err(|e| request("checking the network configuration", e.to_string()))?;
        let owner = config
            .tap_owner
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        let capabilities = core_types::capabilities(true, true, true)?;
        let worker = Worker::spawn(config.netns.as_deref())?;
        Ok(Self {
            config,
            pool,
            owner,
            capabilities,
            set_up: AtomicBool::new(false),
            worker,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BridgeConfig {
        &self.config
    }

    /// Removes everything [`Network::setup_host`] and [`Network::attach`] made: every
    /// vmkit TAP on the bridge, the bridge, and vmkit's nftables tables. Guests
    /// lose their network. IP forwarding is left on, since other software may rely
    /// on it. Idempotent. For uninstalling and for tests.
    pub async fn teardown_host(&self) -> Result<(), NetworkError> {
        let cfg = self.config.clone();
        self.worker
            .run(move |ctx| async move { teardown(&ctx.netlink, &cfg).await })
            .await?;
        self.set_up.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn check_lease(&self, vm: VmId, lease: &IpLease) -> Result<(), NetworkError> {
        let pool = &self.pool;
        let subnet = pool.subnet;
        let usable = subnet.contains(lease.ip)
            && lease.ip != subnet.network()
            && lease.ip != subnet.broadcast()
            && lease.ip != pool.host_address()
            && lease.gateway == pool.host_address()
            && lease.prefix == subnet.prefix();
        if !usable {
            return Err(NetworkError::ForeignLease(lease.ip));
        }
        if lease.vm != vm {
            return Err(request(
                format!("attaching VM {vm}"),
                format!("the lease of {} belongs to VM {}", lease.ip, lease.vm),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Network for BridgeNetwork {
    fn capabilities(&self) -> NetworkCapabilities {
        self.capabilities.clone()
    }

    fn pool(&self) -> IpPool {
        self.pool
    }

    async fn setup_host(&self) -> Result<(), NetworkError> {
        let cfg = self.config.clone();
        let pool = self.pool;
        self.worker
            .run(move |ctx| async move { setup(&ctx.netlink, &cfg, pool).await })
            .await?;
        self.set_up.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn attach(&self, vm: VmId, lease: &IpLease) -> Result<NetAttachment, NetworkError> {
        if !self.set_up.load(Ordering::SeqCst) {
            return Err(NetworkError::NotSetUp);
        }
        self.check_lease(vm, lease)?;
        let cfg = self.config.clone();
        let owner = self.owner;
        let l = lease.clone();
        let tap = self
            .worker
            .run(move |ctx| async move { attach(&ctx.netlink, &cfg, owner, vm, &l).await })
            .await?;
        core_types::attachment(vm, tap, lease, vec![self.pool.host_address()])
    }

    async fn detach(&self, vm: VmId) -> Result<(), NetworkError> {
        let cfg = self.config.clone();
        self.worker
            .run(move |ctx| async move { detach(&ctx.netlink, &cfg, vm).await })
            .await
    }

    async fn list(&self) -> Result<Vec<VmId>, NetworkError> {
        let cfg = self.config.clone();
        self.worker
            .run(move |ctx| async move {
                let all = links::links(&ctx.netlink).await?;
                Ok(vmkit_taps(&all, &cfg).map(|(vm, _)| vm).collect())
            })
            .await
    }
}

// ------------------------------------------------------------------ checks

fn check_config(c: &BridgeConfig) -> Result<(), NetworkError> {
    let op = "checking the network configuration";
    if !valid_ifname(&c.bridge) {
        return Err(request(
            op,
            format!(
                "{:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or spaces)",
                c.bridge
            ),
        ));
    }
    if vm_of_tap(&c.bridge).is_some() {
        return Err(request(
            op,
            format!("the bridge name {:?} looks like a vmkit TAP name", c.bridge),
        ));
    }
    let table_ok = c
        .table
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic())
        && c.table.len() <= 64
        && c.table
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if !table_ok {
        return Err(request(
            op,
            format!(
                "{:?} is not a valid nftables table name (a letter, then letters, digits, '_' or '-')",
                c.table
            ),
        ));
    }
    if let Uplink::Interface(name) = &c.uplink
        && (!valid_ifname(name) || name == &c.bridge)
    {
        return Err(request(op, format!("{name:?} cannot be the uplink")));
    }
    Ok(())
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The bridge's MAC: locally administered, fixed (so it does not follow its
/// ports'), derived from the gateway address.
fn bridge_mac(gateway: Ipv4Addr) -> [u8; 6] {
    let o = gateway.octets();
    [0x02, 0x76, 0x6d, o[1], o[2], o[3]]
}

fn describe_route(r: &Route, links: &[Link]) -> String {
    let mut out = r.dst.to_string();
    if let Some(oif) = r.oif {
        match links.iter().find(|l| l.index == oif) {
            Some(l) => out.push_str(&format!(" dev {}", l.name)),
            None => out.push_str(&format!(" dev #{oif}")),
        }
    }
    match r.table {
        254 => {}
        255 => out.push_str(" table local"),
        t => out.push_str(&format!(" table {t}")),
    }
    out
}

/// vmkit TAPs in `all` that belong to this bridge (or to no bridge yet).
fn vmkit_taps<'a>(
    all: &'a [Link],
    cfg: &'a BridgeConfig,
) -> impl Iterator<Item = (VmId, &'a Link)> + 'a {
    let bridge = all.iter().find(|l| l.name == cfg.bridge).map(|l| l.index);
    all.iter().filter_map(move |l| {
        let vm = vm_of_tap(&l.name)?;
        let ours =
            l.kind == Some(InfoKind::Tun) && (l.controller.is_none() || l.controller == bridge);
        ours.then_some((vm, l))
    })
}

// ------------------------------------------------------------------ jobs

async fn setup(h: &Handle, cfg: &BridgeConfig, pool: IpPool) -> Result<(), NetworkError> {
    let gateway = pool.host_address();
    let all = links::links(h).await?;
    let existing = all.iter().find(|l| l.name == cfg.bridge);
    if let Some(l) = existing
        && l.kind != Some(InfoKind::Bridge)
    {
        return Err(request(
            format!("setting up bridge {}", cfg.bridge),
            format!("a link called {} exists and is not a bridge", cfg.bridge),
        ));
    }
    let bridge_index = existing.map(|l| l.index);

    let routes = links::routes(h).await?;
    let collision = routes.iter().find(|r| {
        r.dst.prefix() > 0
            && r.dst.overlaps(&cfg.subnet)
            && (bridge_index.is_none() || r.oif != bridge_index)
    });
    if let Some(r) = collision {
        return Err(NetworkError::SubnetCollision {
            subnet: cfg.subnet.to_string(),
            route: describe_route(r, &all),
        });
    }

    let index = match bridge_index {
        Some(i) => i,
        None => {
            let i = links::create_bridge(h, &cfg.bridge, bridge_mac(gateway)).await?;
            tracing::info!(bridge = %cfg.bridge, "created the bridge");
            i
        }
    };
    sysctl::disable_ipv6(&cfg.bridge)?;
    links::ensure_address(h, index, &cfg.bridge, gateway, cfg.subnet.prefix()).await?;
    links::set_up(h, index, &cfg.bridge).await?;
    sysctl::enable_ip_forward()?;

    let uplink = match &cfg.uplink {
        Uplink::Interface(name) => Some(name.clone()),
        Uplink::Any => None,
        Uplink::Auto => {
            let found = routes
                .iter()
                .filter(|r| {
                    r.dst.prefix() == 0 && r.table == 254 && r.oif.is_some() && r.oif != Some(index)
                })
                .min_by_key(|r| r.priority)
                .and_then(|r| all.iter().find(|l| Some(l.index) == r.oif))
                .map(|l| l.name.clone());
            if found.is_none() {
                tracing::warn!(
                    "no IPv4 default route: guest traffic is masqueraded out of any interface but the bridge"
                );
            }
            found
        }
    };
    let dns_upstream = match &cfg.dns {
        DnsForwarding::To(ip) => Some(*ip),
        DnsForwarding::Local => None,
        DnsForwarding::Auto => {
            let found = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .find_map(|text| upstream_nameserver(&text));
            if found.is_none() {
                tracing::warn!(
                    gateway = %gateway,
                    "no non-loopback name server in resolv.conf: guests' DNS queries to the gateway need a resolver listening there"
                );
            }
            found
        }
    };
    let host = HostRules {
        table: cfg.table.clone(),
        bridge: cfg.bridge.clone(),
        subnet: cfg.subnet,
        gateway,
        uplink,
        dns_upstream,
        blocked: cfg.blocked.clone(),
    };
    rules::apply(
        &rules::host_batch(&host),
        "installing vmkit's nftables rules",
    )?;
    tracing::info!(
        bridge = %cfg.bridge, subnet = %cfg.subnet, uplink = ?host.uplink, dns = ?host.dns_upstream,
        "host networking is set up"
    );
    Ok(())
}

async fn attach(
    h: &Handle,
    cfg: &BridgeConfig,
    owner: u32,
    vm: VmId,
    lease: &IpLease,
) -> Result<String, NetworkError> {
    let name = tap_name(vm);
    let Some(bridge) = links::link_by_name(h, &cfg.bridge).await? else {
        return Err(NetworkError::NotSetUp);
    };
    let (link, created) = match links::link_by_name(h, &name).await? {
        Some(l) if l.kind == Some(InfoKind::Tun) => (l, false),
        Some(_) => {
            return Err(request(
                format!("attaching VM {vm}"),
                format!("a link called {name} exists and is not a TAP"),
            ));
        }
        None => {
            tap::create_tap(&name, owner)?;
            let l = links::link_by_name(h, &name).await?.ok_or_else(|| {
                request(
                    format!("creating TAP {name}"),
                    "the TAP vanished right after it was created",
                )
            })?;
            (l, true)
        }
    };
    let configured = configure_tap(h, cfg, vm, lease, &link, bridge.index).await;
    if let Err(e) = configured {
        if created && let Err(undo) = detach(h, cfg, vm).await {
            tracing::warn!(tap = %name, error = %undo, "could not remove a half-made TAP");
        }
        return Err(e);
    }
    Ok(name)
}

/// Rules first, then the bridge, then up: the TAP carries no frame before its
/// anti-spoofing chain is in place.
async fn configure_tap(
    h: &Handle,
    cfg: &BridgeConfig,
    vm: VmId,
    lease: &IpLease,
    link: &Link,
    bridge: u32,
) -> Result<(), NetworkError> {
    let name = &link.name;
    sysctl::disable_ipv6(name)?;
    links::set_alias(h, link.index, name, &format!("vmkit vm {vm} {}", lease.ip)).await?;
    rules::apply(
        &rules::vm_batch(&cfg.table, vm, name, lease.mac, lease.ip),
        &format!("installing the anti-spoofing rules of {name}"),
    )?;
    if link.controller != Some(bridge) {
        links::enslave(h, link.index, name, bridge).await?;
    }
    links::set_isolated(h, link.index, name).await?;
    links::set_up(h, link.index, name).await
}

/// TAP first (it leaves the bridge with it), then its chain.
async fn detach(h: &Handle, cfg: &BridgeConfig, vm: VmId) -> Result<(), NetworkError> {
    let name = tap_name(vm);
    match links::link_by_name(h, &name).await? {
        Some(l) if l.kind == Some(InfoKind::Tun) => links::delete_link(h, l.index, &name).await?,
        Some(_) => {
            tracing::warn!(link = %name, "a link with VM {vm}'s TAP name is not a TAP; left alone")
        }
        None => {}
    }
    let chain = rules::vm_chain(vm);
    if rules::netdev_chains(&cfg.table)?.contains(&chain) {
        rules::apply(
            &rules::delete_vm_batch(&cfg.table, vm),
            &format!("removing the rules of {name}"),
        )?;
    }
    Ok(())
}

async fn teardown(h: &Handle, cfg: &BridgeConfig) -> Result<(), NetworkError> {
    let all = links::links(h).await?;
    for (vm, _) in vmkit_taps(&all, cfg) {
        detach(h, cfg, vm).await?;
    }
    if let Some(b) = all
        .iter()
        .find(|l| l.name == cfg.bridge && l.kind == Some(InfoKind::Bridge))
    {
        links::delete_link(h, b.index, &cfg.bridge).await?;
    }
    let existing = rules::tables()?;
    let batch = rules::delete_tables_batch(&cfg.table, &existing);
    if !batch.objects.is_empty() {
        rules::apply(&batch, "removing vmkit's nftables tables")?;
    }
    Ok(())
}
