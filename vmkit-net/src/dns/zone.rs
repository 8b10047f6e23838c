//! The answers: what the zone holds for a name and a type, looked up in the state
//! store at each query.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, CAA, NS, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use vmkit_core::{StateStore, VmName};

use super::DnsConfig;
use crate::challenges::AcmeChallenges;

/// How long one store lookup may take before the query is answered SERVFAIL.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// The label ACME's DNS-01 challenge puts in front of the name it validates.
const ACME_LABEL: &str = "_acme-challenge";

/// An answer: a response code, the answer section and the authority section.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) code: ResponseCode,
    pub(crate) authoritative: bool,
    pub(crate) answers: Vec<Record>,
    pub(crate) authority: Vec<Record>,
}

impl Answer {
    pub(crate) fn code(code: ResponseCode) -> Self {
        Self {
            code,
            authoritative: false,
            answers: Vec::new(),
            authority: Vec::new(),
        }
    }

    fn refused() -> Self {
        Self {
            code: ResponseCode::Refused,
            authoritative: false,
            answers: Vec::new(),
            authority: Vec::new(),
        }
    }

    pub(crate) fn servfail() -> Self {
        Self {
            code: ResponseCode::ServFail,
            authoritative: false,
            answers: Vec::new(),
            authority: Vec::new(),
        }
    }
}

/// What a name inside the zone is.
enum Node {
    /// The apex.
    Apex,
    /// A host that answers with the host's addresses (a VM, a VM's port, the name
    /// server's own name, an extra host).
    Host,
    /// `_acme-challenge.X` with the TXT values being asked for.
    Challenge(Vec<String>),
}

/// The zone of the VM domain, answered from the state store.
pub(crate) struct Zone {
    config: DnsConfig,
    apex: Name,
    ns: Name,
    hostmaster: Name,
    caa: Vec<Name>,
    store: Arc<dyn StateStore>,
    challenges: Arc<AcmeChallenges>,
    serial: u32,
}

impl Zone {
    pub(crate) fn new(
        config: DnsConfig,
        store: Arc<dyn StateStore>,
        challenges: Arc<AcmeChallenges>,
    ) -> Result<Self, super::DnsError> {
        let apex = parse_name(&config.domain)?;
        let ns = parse_name(&config.ns_host_name())?;
        let hostmaster = parse_name(&format!("hostmaster.{}", config.domain))?;
        let caa = config
            .caa_issuers
            .iter()
            .map(|issuer| parse_name(issuer))
            .collect::<Result<Vec<_>, _>>()?;
        for host in &config.extra_hosts {
            parse_name(host)?;
        }
        // The serial only has to grow between restarts: the start time does.
        let serial = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        Ok(Self {
            config,
            apex,
            ns,
            hostmaster,
            caa,
            store,
            challenges,
            serial,
        })
    }

    /// The answer to `qname` (any case) of type `qtype`.
    pub(crate) async fn answer(&self, qname: &Name, qtype: RecordType) -> Answer {
        let name = qname.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let owner = qname.clone();
        let node = if self.config.extra_hosts.contains(&name) {
            Some(Node::Host)
        } else if name == self.config.domain {
            Some(Node::Apex)
        } else if let Some(relative) = name
            .strip_suffix(self.config.domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        {
            match self.node(&name, relative).await {
                Ok(node) => node,
                Err(()) => return Answer::servfail(),
            }
        } else {
            return Answer::refused();
        };
        let Some(node) = node else {
            return self.negative(ResponseCode::NXDomain);
        };
        let ttl = self.config.ttl;
        let rdata: Vec<RData> = match (&node, qtype) {
            (Node::Apex | Node::Host, RecordType::A) => self
                .config
                .addresses
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(RData::A(A(*v4))),
                    IpAddr::V6(_) => None,
                })
                .collect(),
            (Node::Apex | Node::Host, RecordType::AAAA) => self
                .config
                .addresses
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V6(v6) => Some(RData::AAAA(AAAA(*v6))),
                    IpAddr::V4(_) => None,
                })
                .collect(),
            (Node::Apex, RecordType::SOA) => vec![RData::SOA(self.soa())],
            (Node::Apex, RecordType::NS) => vec![RData::NS(NS(self.ns.clone()))],
            (Node::Apex, RecordType::CAA) => self
                .caa
                .iter()
                .map(|issuer| {
                    // Without the final dot: `0 issue "letsencrypt.org"`.
                    let mut issuer = issuer.clone();
                    issuer.set_fqdn(false);
                    RData::CAA(CAA::new_issue(false, Some(issuer), Vec::new()))
                })
                .collect(),
            (Node::Challenge(values), RecordType::TXT) => values
                .iter()
                .map(|v| RData::TXT(TXT::new(vec![v.clone()])))
                .collect(),
            _ => Vec::new(),
        };
        if rdata.is_empty() {
            // The name exists without records of that type.
            return self.negative(ResponseCode::NoError);
        }
        Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: rdata
                .into_iter()
                .map(|data| Record::from_rdata(owner.clone(), ttl, data))
                .collect(),
            authority: Vec::new(),
        }
    }

    /// What `name` (`relative` + `.domain`) is; `Err` when the store failed.
    async fn node(&self, name: &str, relative: &str) -> Result<Option<Node>, ()> {
        if name == self.config.ns_host_name() {
            return Ok(Some(Node::Host));
        }
        if relative == ACME_LABEL || relative.starts_with("_acme-challenge.") {
            let values = self.challenges.dns01(name);
            return Ok((!values.is_empty()).then_some(Node::Challenge(values)));
        }
        if relative.contains('.') {
            return Ok(None);
        }
        if self.vm_exists(relative).await? {
            return Ok(Some(Node::Host));
        }
        // NAME--PORT: port PORT of VM NAME.
        if let Some((vm, port)) = relative.rsplit_once("--")
            && port
                .parse::<u16>()
                .is_ok_and(|p| p != 0 && p.to_string() == port)
            && self.vm_exists(vm).await?
        {
            return Ok(Some(Node::Host));
        }
        Ok(None)
    }

    async fn vm_exists(&self, label: &str) -> Result<bool, ()> {
        let Ok(name) = VmName::new(label) else {
            return Ok(false);
        };
        match tokio::time::timeout(STORE_TIMEOUT, self.store.get_vm(&name)).await {
            Ok(Ok(vm)) => Ok(vm.is_some()),
            Ok(Err(e)) => {
                tracing::warn!(vm = label, error = %e, "DNS: looking up a VM failed");
                Err(())
            }
            Err(_) => {
                tracing::warn!(vm = label, "DNS: looking up a VM timed out");
                Err(())
            }
        }
    }

    /// NXDOMAIN or NODATA, with the SOA for negative caching.
    fn negative(&self, code: ResponseCode) -> Answer {
        Answer {
            code,
            authoritative: true,
            answers: Vec::new(),
            authority: vec![Record::from_rdata(
                self.apex.clone(),
                self.config.ttl,
                RData::SOA(self.soa()),
            )],
        }
    }

    fn soa(&self) -> SOA {
        SOA::new(
            self.ns.clone(),
            self.hostmaster.clone(),
            self.serial,
            3600,
            600,
            86_400,
            // The negative-caching TTL: short, as VMs come and go.
            self.config.ttl,
        )
    }
}

fn parse_name(name: &str) -> Result<Name, super::DnsError> {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).map_err(|e| {
        super::DnsError::Config {
            what: format!(
                "{name:?} is not a DNS name ({e}); use labels of letters, digits and hyphens"
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use vmkit_core::testing::MemoryStore;
    use vmkit_core::{Quota, User, UserId, VmRecord, VmSpec};

    async fn zone(addresses: Vec<IpAddr>) -> (Zone, Arc<MemoryStore>, Arc<AcmeChallenges>) {
        let store = Arc::new(MemoryStore::new());
        let user = User::new(UserId(1), vmkit_core::Handle::new("alice").unwrap());
        store.put_user(&user).await.unwrap();
        let vm = VmRecord::new(VmName::new("web").unwrap(), UserId(1), VmSpec::default());
        store.create_vm(&vm, &Quota::default()).await.unwrap();
        let challenges = Arc::new(AcmeChallenges::new());
        let config = DnsConfig::new("VM.test.")
            .addresses(addresses)
            .ttl(30)
            .caa_issuer("letsencrypt.org")
            .extra_host("app.custom.test");
        let zone = Zone::new(config, store.clone(), challenges.clone()).unwrap();
        (zone, store, challenges)
    }

    impl Zone {
        async fn ask(&self, name: &str, qtype: RecordType) -> Answer {
            let labels = name.split('.').filter(|l| !l.is_empty()).map(str::as_bytes);
            let mut qname = Name::from_labels(labels).unwrap();
            qname.set_fqdn(true);
            self.answer(&qname, qtype).await
        }
    }

    fn v4() -> Vec<IpAddr> {
        vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))]
    }

    fn data(answer: &Answer) -> Vec<String> {
        answer.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[tokio::test]
    async fn a_vm_name_resolves_to_the_host_in_any_case() {
        let (zone, _, _) = zone(v4()).await;
        let answer = zone.ask("WeB.vm.TEST.", RecordType::A).await;
        assert_eq!(answer.code, ResponseCode::NoError);
        assert!(answer.authoritative);
        assert_eq!(data(&answer), ["192.0.2.7"]);
        assert_eq!(answer.answers[0].ttl, 30);
    }

    #[tokio::test]
    async fn a_vm_port_name_resolves_and_a_bad_port_does_not() {
        let (zone, _, _) = zone(v4()).await;
        let ok = zone.ask("web--8080.vm.test", RecordType::A).await;
        assert_eq!(data(&ok), ["192.0.2.7"]);
        for bad in [
            "web--0.vm.test",
            "web--08080.vm.test",
            "web--70000.vm.test",
            "db--80.vm.test",
        ] {
            let answer = zone.ask(bad, RecordType::A).await;
            assert_eq!(answer.code, ResponseCode::NXDomain, "{bad}");
        }
    }

    #[tokio::test]
    async fn an_unknown_name_is_nxdomain_with_the_soa() {
        let (zone, _, _) = zone(v4()).await;
        for name in ["db.vm.test", "a.web.vm.test", "-x-.vm.test"] {
            let answer = zone.ask(name, RecordType::A).await;
            assert_eq!(answer.code, ResponseCode::NXDomain, "{name}");
            assert_eq!(answer.authority[0].record_type(), RecordType::SOA);
        }
    }

    #[tokio::test]
    async fn a_vm_created_later_resolves() {
        let (zone, store, _) = zone(v4()).await;
        assert_eq!(
            zone.ask("db.vm.test", RecordType::A).await.code,
            ResponseCode::NXDomain
        );
        let vm = VmRecord::new(VmName::new("db").unwrap(), UserId(1), VmSpec::default());
        store.create_vm(&vm, &Quota::default()).await.unwrap();
        assert_eq!(
            data(&zone.ask("db.vm.test", RecordType::A).await),
            ["192.0.2.7"]
        );
    }

    #[tokio::test]
    async fn the_apex_has_soa_ns_caa_and_addresses() {
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let (zone, _, _) = zone(vec![v4()[0], v6]).await;
        let soa = zone.ask("vm.test", RecordType::SOA).await;
        assert!(
            data(&soa)[0].starts_with("ns.vm.test. hostmaster.vm.test."),
            "{soa:?}"
        );
        assert_eq!(
            data(&zone.ask("vm.test", RecordType::NS).await),
            ["ns.vm.test."]
        );
        assert_eq!(
            data(&zone.ask("vm.test", RecordType::CAA).await),
            ["0 issue \"letsencrypt.org\""]
        );
        assert_eq!(
            data(&zone.ask("vm.test", RecordType::A).await),
            ["192.0.2.7"]
        );
        assert_eq!(data(&zone.ask("vm.test", RecordType::AAAA).await), ["::1"]);
        assert_eq!(
            data(&zone.ask("ns.vm.test", RecordType::A).await),
            ["192.0.2.7"]
        );
    }

    #[tokio::test]
    async fn a_type_a_name_lacks_is_nodata() {
        let (zone, _, _) = zone(v4()).await;
        let answer = zone.ask("web.vm.test", RecordType::AAAA).await;
        assert_eq!(answer.code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
        assert_eq!(answer.authority[0].record_type(), RecordType::SOA);
    }

    #[tokio::test]
    async fn acme_challenges_are_served_while_asked_for() {
        let (zone, _, challenges) = zone(v4()).await;
        let name = "_acme-challenge.vm.test";
        assert_eq!(
            zone.ask(name, RecordType::TXT).await.code,
            ResponseCode::NXDomain
        );
        challenges.add_dns01(name, "one");
        challenges.add_dns01(name, "two");
        let answer = zone.ask("_ACME-challenge.vm.test.", RecordType::TXT).await;
        assert_eq!(data(&answer), ["one", "two"]);
        challenges.remove_dns01(name, "one");
        challenges.remove_dns01(name, "two");
        assert_eq!(
            zone.ask(name, RecordType::TXT).await.code,
            ResponseCode::NXDomain
        );
    }

    #[tokio::test]
    async fn names_outside_the_zone_are_refused_but_extra_hosts_answer() {
        let (zone, _, _) = zone(v4()).await;
        for name in ["example.com", "xvm.test", "test", "."] {
            assert_eq!(
                zone.ask(name, RecordType::A).await.code,
                ResponseCode::Refused,
                "{name}"
            );
        }
        assert_eq!(
            data(&zone.ask("App.Custom.test", RecordType::A).await),
            ["192.0.2.7"]
        );
    }

    #[test]
    fn a_name_that_is_not_a_dns_name_is_a_config_error() {
        let store = Arc::new(MemoryStore::new());
        let challenges = Arc::new(AcmeChallenges::new());
        let bad = DnsConfig::new("vm.test").caa_issuer("lets encrypt..org");
        let err = Zone::new(bad, store.clone(), challenges.clone())
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a DNS name"), "{err}");
        let empty = super::super::DnsServer::new(DnsConfig::new("."), store, challenges);
        assert!(
            empty
                .unwrap_err()
                .to_string()
                .contains("the domain is empty")
        );
    }
}
