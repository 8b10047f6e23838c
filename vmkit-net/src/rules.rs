//! vmkit's nftables rules, built as `nft -j` JSON with the `nftables` crate.
//!
//! Two tables, both named from the config (default `vmkit`), hold every rule vmkit
//! installs, so setup and teardown never touch anybody else's rules:
//!
//! - `inet vmkit`: what guests may reach through the host (base chains `input`,
//!   `forward`, `prerouting`, `postrouting` and the regular chains they jump to).
//!   [`host_batch`] rewrites it atomically and idempotently.
//! - `netdev vmkit`: one base chain per VM, `vm_<id>`, on the ingress hook of the
//!   VM's TAP: the MAC and IP anti-spoofing. [`vm_batch`] adds or rewrites one;
//!   [`delete_vm_batch`] removes one by name.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem,
};
use nftables::helper::{self, DEFAULT_NFT};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Counter, JumpTarget, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use vmkit_core::{Ipv4Net, MacAddr, NetworkError, VmId};

use crate::error::{nft, request};

/// Chain names in the `inet` table.
pub(crate) mod chain {
    /// Base chain, hook input.
    pub const INPUT: &str = "input";
    /// Base chain, hook forward.
    pub const FORWARD: &str = "forward";
    /// Base chain, hook prerouting (dstnat).
    pub const PREROUTING: &str = "prerouting";
    /// Base chain, hook postrouting (srcnat).
    pub const POSTROUTING: &str = "postrouting";
    /// Guests to the host itself.
    pub const GUEST_TO_HOST: &str = "guest_to_host";
    /// Guests to anywhere through the host.
    pub const GUEST_OUT: &str = "guest_out";
    /// Anywhere through the host to guests.
    pub const GUEST_IN: &str = "guest_in";
}

/// What the host rules depend on.
#[derive(Clone, Debug)]
pub(crate) struct HostRules {
    pub table: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The uplink interface; `None` means any interface but the bridge.
    pub uplink: Option<String>,
    /// Where DNS queries to the gateway are DNAT-ed; `None` keeps them on the host.
    pub dns_upstream: Option<Ipv4Addr>,
    pub blocked: Vec<Ipv4Net>,
}

// ------------------------------------------------------------------ expressions

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(name),
        },
    )))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed(key),
        family: None,
        dir: None,
    }))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(net.network().to_string())),
        len: u32::from(net.prefix()),
    }))
}

fn set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

fn cmp(op: Operator, left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    cmp(Operator::EQ, left, right)
}

fn ne(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    cmp(Operator::NEQ, left, right)
}

fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop_() -> Statement<'static> {
    Statement::Drop(None)
}

fn jump(target: &'static str) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: Cow::Borrowed(target),
    })
}

fn established() -> Statement<'static> {
    cmp(
        Operator::IN,
        ct("state"),
        Expression::List(vec![s("established"), s("related")]),
    )
}

fn dns_port() -> [Statement<'static>; 2] {
    [
        eq(meta(MetaKey::L4proto), set(vec![s("tcp"), s("udp")])),
        eq(field("th", "dport"), Expression::Number(53)),
    ]
}

// ------------------------------------------------------------------ objects

fn table(family: NfFamily, name: &str) -> Table<'static> {
    Table {
        family,
        name: Cow::Owned(name.to_owned()),
        handle: None,
    }
}

fn regular_chain(family: NfFamily, table: &str, name: impl Into<String>) -> Chain<'static> {
    Chain {
        family,
        table: Cow::Owned(table.to_owned()),
        name: Cow::Owned(name.into()),
        ..Chain::default()
    }
}

fn base_chain(
    table: &str,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..regular_chain(NfFamily::INet, table, name)
    }
}

struct RuleAdder<'b> {
    batch: &'b mut Batch<'static>,
    family: NfFamily,
    table: String,
}

impl RuleAdder<'_> {
    fn add(&mut self, chain: &str, comment: Option<&str>, expr: Vec<Statement<'static>>) {
        self.batch.add(NfListObject::Rule(Rule {
            family: self.family,
            table: Cow::Owned(self.table.clone()),
            chain: Cow::Owned(chain.to_owned()),
            expr: Cow::Owned(expr),
            comment: comment.map(|c| Cow::Owned(c.to_owned())),
            ..Rule::default()
        }));
    }
}

// ------------------------------------------------------------------ batches

/// The whole `inet` table and the empty `netdev` table, written so that applying
/// it again replaces every host rule and leaves the per-VM chains alone.
pub(crate) fn host_batch(r: &HostRules) -> Nftables<'static> {
    use chain::*;
    let t = r.table.as_str();
    let mut b = Batch::new();
    b.add(NfListObject::Table(table(NfFamily::INet, t)));
    b.add(NfListObject::Table(table(NfFamily::NetDev, t)));
    let chains = [
        base_chain(t, INPUT, NfChainType::Filter, NfHook::Input, 0),
        base_chain(t, FORWARD, NfChainType::Filter, NfHook::Forward, 0),
        base_chain(t, PREROUTING, NfChainType::NAT, NfHook::Prerouting, -100),
        base_chain(t, POSTROUTING, NfChainType::NAT, NfHook::Postrouting, 100),
        regular_chain(NfFamily::INet, t, GUEST_TO_HOST),
        regular_chain(NfFamily::INet, t, GUEST_OUT),
        regular_chain(NfFamily::INet, t, GUEST_IN),
    ];
    for c in chains {
        b.add(NfListObject::Chain(c.clone()));
        b.add_cmd(NfCmd::Flush(FlushObject::Chain(c)));
    }

    let bridge = || s(r.bridge.clone());
    let gw = || s(r.gateway.to_string());
    let iif_bridge = || eq(meta(MetaKey::Iifname), bridge());
    let oif_bridge = || eq(meta(MetaKey::Oifname), bridge());
    let mut rules = RuleAdder {
        batch: &mut b,
        family: NfFamily::INet,
        table: t.to_owned(),
    };

    // Dispatch.
    rules.add(INPUT, None, vec![iif_bridge(), jump(GUEST_TO_HOST)]);
    rules.add(FORWARD, None, vec![iif_bridge(), jump(GUEST_OUT)]);
    rules.add(FORWARD, None, vec![oif_bridge(), jump(GUEST_IN)]);

    // Guests to the host: replies, DNS and ping on the gateway; nothing else.
    rules.add(GUEST_TO_HOST, None, vec![established(), accept()]);
    let mut dns = vec![eq(field("ip", "daddr"), gw())];
    dns.extend(dns_port());
    dns.push(accept());
    rules.add(GUEST_TO_HOST, Some("DNS on the gateway"), dns);
    rules.add(
        GUEST_TO_HOST,
        Some("ping the gateway"),
        vec![
            eq(field("ip", "daddr"), gw()),
            eq(field("icmp", "type"), s("echo-request")),
            accept(),
        ],
    );
    rules.add(
        GUEST_TO_HOST,
        Some("any other host address or port"),
        vec![counter(), drop_()],
    );

    // Guests through the host.
    rules.add(
        GUEST_OUT,
        Some("another guest through the gateway"),
        vec![oif_bridge(), counter(), drop_()],
    );
    if let Some(up) = r.dns_upstream {
        let mut fwd = vec![
            cmp(Operator::IN, ct("status"), s("dnat")),
            eq(field("ip", "daddr"), s(up.to_string())),
        ];
        fwd.extend(dns_port());
        fwd.push(accept());
        rules.add(GUEST_OUT, Some("DNS forwarded from the gateway"), fwd);
    }
    rules.add(
        GUEST_OUT,
        Some("link-local and metadata addresses"),
        vec![
            eq(field("ip", "daddr"), prefix(link_local())),
            counter(),
            drop_(),
        ],
    );
    if !r.blocked.is_empty() {
        rules.add(
            GUEST_OUT,
            Some("blocked destinations"),
            vec![
                eq(
                    field("ip", "daddr"),
                    set(r.blocked.iter().map(|n| prefix(*n)).collect()),
                ),
                counter(),
                drop_(),
            ],
        );
    }
    rules.add(
        GUEST_OUT,
        Some("IPv6"),
        vec![eq(meta(MetaKey::Nfproto), s("ipv6")), drop_()],
    );
    if let Some(up) = &r.uplink {
        rules.add(
            GUEST_OUT,
            Some("anything but the uplink"),
            vec![
                ne(meta(MetaKey::Oifname), s(up.clone())),
                counter(),
                drop_(),
            ],
        );
    }
    rules.add(GUEST_OUT, None, vec![accept()]);

    // Into guests from elsewhere: replies only.
    rules.add(GUEST_IN, None, vec![established(), accept()]);
    rules.add(GUEST_IN, Some("unsolicited"), vec![counter(), drop_()]);

    // NAT.
    if let Some(up) = r.dns_upstream {
        let mut dnat = vec![iif_bridge(), eq(field("ip", "daddr"), gw())];
        dnat.extend(dns_port());
        dnat.push(Statement::DNAT(Some(NAT {
            addr: Some(s(up.to_string())),
            family: Some(NATFamily::IP),
            port: None,
            flags: None,
        })));
        rules.add(PREROUTING, Some("guest DNS to the upstream resolver"), dnat);
        let mut masq = vec![
            eq(field("ip", "saddr"), prefix(r.subnet)),
            eq(field("ip", "daddr"), s(up.to_string())),
        ];
        masq.extend(dns_port());
        masq.push(ne(meta(MetaKey::Oifname), bridge()));
        masq.push(Statement::Masquerade(None));
        rules.add(POSTROUTING, Some("guest DNS"), masq);
    }
    let out = match &r.uplink {
        Some(up) => eq(meta(MetaKey::Oifname), s(up.clone())),
        None => ne(meta(MetaKey::Oifname), bridge()),
    };
    rules.add(
        POSTROUTING,
        Some("guest egress"),
        vec![
            eq(field("ip", "saddr"), prefix(r.subnet)),
            out,
            Statement::Masquerade(None),
        ],
    );
    b.to_nftables()
}

fn link_local() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16).expect("16 is a valid prefix")
}

/// The name of `vm`'s chain in the `netdev` table.
pub(crate) fn vm_chain(vm: VmId) -> String {
    format!("vm_{vm}")
}

/// Adds (or rewrites) `vm`'s anti-spoofing chain on the ingress of `tap`: only
/// frames from `mac` leave the TAP, and of those only IPv4 from `ip` and ARP that
/// announces `mac` as `ip`.
pub(crate) fn vm_batch(
    table: &str,
    vm: VmId,
    tap: &str,
    mac: MacAddr,
    ip: Ipv4Addr,
) -> Nftables<'static> {
    let name = vm_chain(vm);
    let mut b = Batch::new();
    let base = Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Ingress),
        prio: Some(0),
        dev: Some(Cow::Owned(tap.to_owned())),
        policy: Some(NfChainPolicy::Drop),
        ..regular_chain(NfFamily::NetDev, table, name.clone())
    };
    b.add(NfListObject::Chain(base.clone()));
    b.add_cmd(NfCmd::Flush(FlushObject::Chain(base)));
    let mac = || s(mac.to_string());
    let ip = || s(ip.to_string());
    let mut rules = RuleAdder {
        batch: &mut b,
        family: NfFamily::NetDev,
        table: table.to_owned(),
    };
    rules.add(
        &name,
        Some("spoofed source MAC"),
        vec![ne(field("ether", "saddr"), mac()), counter(), drop_()],
    );
    rules.add(
        &name,
        Some("ARP for its own address"),
        vec![
            eq(field("arp", "saddr ether"), mac()),
            eq(field("arp", "saddr ip"), ip()),
            accept(),
        ],
    );
    rules.add(
        &name,
        Some("IPv4 from its own address"),
        vec![eq(field("ip", "saddr"), ip()), accept()],
    );
    rules.add(
        &name,
        Some("spoofed source IP or another protocol"),
        vec![counter(), drop_()],
    );
    b.to_nftables()
}

/// Removes `vm`'s chain.
pub(crate) fn delete_vm_batch(table: &str, vm: VmId) -> Nftables<'static> {
    let c = regular_chain(NfFamily::NetDev, table, vm_chain(vm));
    let mut b = Batch::new();
    b.add_cmd(NfCmd::Flush(FlushObject::Chain(c.clone())));
    b.delete(NfListObject::Chain(c));
    b.to_nftables()
}

/// Removes both tables (only those that exist).
pub(crate) fn delete_tables_batch(table: &str, existing: &[(String, String)]) -> Nftables<'static> {
    let mut b = Batch::new();
    for (family, name) in existing {
        let family = match family.as_str() {
            "inet" => NfFamily::INet,
            "netdev" => NfFamily::NetDev,
            _ => continue,
        };
        if name == table {
            b.delete(NfListObject::Table(self::table(family, table)));
        }
    }
    b.to_nftables()
}

// ------------------------------------------------------------------ running nft

/// Applies a batch atomically with `nft -j -f -`, in the calling thread's namespace.
pub(crate) fn apply(batch: &Nftables<'_>, operation: &str) -> Result<(), NetworkError> {
    helper::apply_ruleset(batch).map_err(|e| nft(operation, e))
}

fn list(args: &[&str], operation: &str) -> Result<serde_json::Value, NetworkError> {
    let raw = helper::get_current_ruleset_raw(DEFAULT_NFT, args).map_err(|e| nft(operation, e))?;
    serde_json::from_str(&raw)
        .map_err(|e| request(operation, format!("nft printed invalid JSON: {e}")))
}

fn objects<'v>(
    doc: &'v serde_json::Value,
    kind: &'v str,
) -> impl Iterator<Item = &'v serde_json::Value> + 'v {
    doc.get("nftables")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(move |o| o.get(kind))
}

/// Every table as (family, name).
pub(crate) fn tables() -> Result<Vec<(String, String)>, NetworkError> {
    let doc = list(&["list", "tables"], "listing nftables tables")?;
    Ok(objects(&doc, "table")
        .filter_map(|t| {
            Some((
                t.get("family")?.as_str()?.to_owned(),
                t.get("name")?.as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// The names of the chains of the `netdev` table `table`.
pub(crate) fn netdev_chains(table: &str) -> Result<Vec<String>, NetworkError> {
    let doc = list(&["list", "chains", "netdev"], "listing nftables chains")?;
    Ok(objects(&doc, "chain")
        .filter(|c| c.get("table").and_then(|t| t.as_str()) == Some(table))
        .filter_map(|c| Some(c.get("name")?.as_str()?.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> HostRules {
        HostRules {
            table: "vmkit".into(),
            bridge: "br-vmkit".into(),
            subnet: "10.88.0.0/16".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            uplink: Some("eth0".into()),
            dns_upstream: Some(Ipv4Addr::new(192, 0, 2, 53)),
            blocked: vec!["10.0.0.0/8".parse().unwrap()],
        }
    }

    #[test]
    fn host_batch_is_json_that_nft_reads() {
        let json = serde_json::to_value(host_batch(&rules())).unwrap();
        let text = json.to_string();
        assert!(
            text.contains(r#""dnat":{"addr":"192.0.2.53","family":"ip"}"#),
            "{text}"
        );
        assert!(text.contains(r#""masquerade":null"#), "{text}");
        assert!(text.contains(r#""flush":{"chain""#), "{text}");
        assert!(
            text.contains(r#""prefix":{"addr":"169.254.0.0","len":16}"#),
            "{text}"
        );
    }

    #[test]
    fn vm_batch_names_the_device_and_the_lease() {
        let vm = VmId::from_u64(0x8000_0000_0000_0001);
        let mac = MacAddr([0x52, 0x54, 0, 0x58, 0, 2]);
        let text = serde_json::to_string(&vm_batch(
            "vmkit",
            vm,
            "vmtap",
            mac,
            Ipv4Addr::new(10, 88, 0, 2),
        ))
        .unwrap();
        assert!(text.contains(r#""dev":"vmtap""#), "{text}");
        assert!(text.contains(r#""name":"vm_8000000000000001""#), "{text}");
        assert!(text.contains("52:54:00:58:00:02"), "{text}");
        assert!(text.contains(r#""field":"saddr ip""#), "{text}");
    }
}
