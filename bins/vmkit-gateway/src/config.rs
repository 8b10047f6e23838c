//! Daemon configuration: defaults that need no file, a TOML file, then `VMKIT_*`
//! environment variables, in that order of precedence (last wins).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub use vmkit_hv::probe::Preference as HypervisorChoice;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The whole daemon configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Root of all state: `state.redb`, images, volumes, run directories, the socket.
    pub data_dir: PathBuf,
    /// API socket; empty means `<data_dir>/vmkit.sock`.
    pub socket: PathBuf,
    /// Hypervisor backend of new VMs; a VM keeps the one it was created with.
    pub hypervisor: HypervisorChoice,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber `EnvFilter` syntax).
    pub log_level: String,
    /// Boot and shutdown timing.
    pub timeouts: Timeouts,
    /// Largest VM this host accepts.
    pub limits: Limits,
    /// Quota of users who have none set.
    pub quota: QuotaConfig,
    /// QEMU backend settings.
    pub qemu: QemuSection,
    /// cloud-hypervisor backend settings.
    pub cloud_hypervisor: ChSection,
    /// Guest networking.
    pub network: NetworkSection,
    /// Where volumes live.
    pub storage: StorageSection,
    /// How VMMs are confined.
    pub confinement: ConfinementSection,
    /// What happens to a VM whose VMM exited without a stop through vmkit (a crash,
    /// a guest that powered itself off; at daemon start, a host reboot or a daemon
    /// crash): `stop` marks it stopped, `restart` boots it again (at most 5 times in
    /// 10 minutes).
    pub on_vmm_exit: vmkit_core::ExitPolicy,
    /// The image of VMs created without `--image`.
    pub default_image: String,
    /// The root disk size, GiB, of VMs created without `--root` (0: the image's).
    pub default_root_gib: u64,
    /// Which events the state file keeps.
    pub events: EventsSection,
    /// Users and who may register.
    pub users: UsersSection,
    /// The SSH lobby.
    pub ssh: SshSection,
    /// The HTTPS edge.
    pub https: HttpsSection,
    /// vmkit's authoritative DNS server for the domain.
    pub dns: DnsSection,
}

/// vmkit's authoritative DNS server for `[ssh] domain`: off unless `listen` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsSection {
    /// Address and port to answer DNS on, UDP and TCP (`0.0.0.0:53` on a public
    /// host); empty (the default): no DNS server.
    pub listen: String,
    /// The host's public addresses: what the apex and every `NAME.domain` resolve
    /// to. Needed when `listen` is set.
    pub addresses: Vec<std::net::IpAddr>,
    /// The name server's own name (its NS record); empty: `ns.DOMAIN`.
    pub ns_host: String,
    /// CAs allowed to issue for the domain (CAA records), e.g. `letsencrypt.org`;
    /// none: no CAA record.
    pub caa_issuers: Vec<String>,
}

impl DnsSection {
    /// The DNS address; `None` when the server is off.
    pub fn listen(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        parse_listen("dns", "listen", &self.listen, "0.0.0.0:53")
    }
}

/// Getting certificates from an ACME CA (`[https] tls = "acme"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeSection {
    /// The CA's directory URL: Let's Encrypt's by default.
    pub directory_url: String,
    /// Contact email for the account (the CA writes before certificates expire).
    pub contact: String,
    /// A PEM file with the root CA of the ACME server's own HTTPS, for a private or
    /// test CA (pebble); empty: the system's roots.
    pub ca_root: PathBuf,
    /// The key that seals the ACME account (and later other credentials) at rest:
    /// a file OUTSIDE the data directory (made, mode 0600, if absent), unless the
    /// `VMKIT_SECRET_KEY` variable holds the key.
    pub secret_key_file: PathBuf,
}

impl Default for AcmeSection {
    fn default() -> Self {
        Self {
            directory_url: "https://acme-v02.api.letsencrypt.org/directory".into(),
            contact: String::new(),
            ca_root: PathBuf::new(),
            secret_key_file: PathBuf::from("/etc/vmkit/secret.key"),
        }
    }
}

/// Sign-in links by email (`[https.smtp]`): off while `relay` is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpSection {
    /// The relay, `host:port` (587 with STARTTLS, 465 with TLS); empty: no email.
    pub relay: String,
    /// How the connection is secured: `starttls` (required), `tls`, or `none` (a
    /// relay on this host or a trusted network only).
    pub tls: SmtpTlsMode,
    /// The sender, `vmkit <vmkit@example.com>` or a bare address.
    pub from: String,
    /// The relay's user name, when it asks for one.
    pub username: String,
    /// A file holding the relay's password (outside the data directory); the
    /// `VMKIT_SMTP_PASSWORD` variable takes its place when set.
    pub password_file: PathBuf,
    /// A PEM file with the CA of the relay's certificate, besides the public roots.
    pub ca_root: PathBuf,
}

/// How the connection to the SMTP relay is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmtpTlsMode {
    /// STARTTLS, required.
    #[default]
    Starttls,
    /// TLS from the first byte.
    Tls,
    /// Plain SMTP.
    None,
}

/// The HTTPS edge (`https://NAME.domain`, the domain of `[ssh]`): on `0.0.0.0:8443`
/// unless `listen` says otherwise; an empty `listen` turns it off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpsSection {
    /// Address and port to serve HTTPS on: `0.0.0.0:8443` by default; a public
    /// host uses `0.0.0.0:443`. Empty: no HTTPS edge.
    pub listen: String,
    /// Address and port of plain HTTP, which only redirects to HTTPS (and answers
    /// ACME HTTP-01 challenges): a public host uses `0.0.0.0:80`. Empty (the
    /// default): none.
    pub http_listen: String,
    /// The HTTPS port clients dial, when it is not the one in `listen` (behind a
    /// port forward); 0: the one in `listen`. With the edge in `vmkit-proxy`
    /// (`listen` empty here), the port the lobby's links name.
    pub public_port: u16,
    /// `self-signed`: certificates from a local CA made in the data directory
    /// (`vmkit ca` prints it for users to trust).
    pub tls: TlsMode,
    /// Send `Strict-Transport-Security`.
    pub hsts: bool,
    /// Addresses of proxies in front whose `X-Forwarded-For` is kept.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// With `tls = "acme"`: the CA and the account.
    pub acme: AcmeSection,
    /// Custom domains (`domain add NAME HOST` in the lobby): offered unless false.
    pub custom_domains: bool,
    /// Name servers (`IP:PORT`) that custom domains' proof records are read from;
    /// empty (the default): the host's resolvers (`/etc/resolv.conf`).
    pub domain_resolvers: Vec<std::net::SocketAddr>,
    /// Sign-in links by email, through an SMTP relay.
    pub smtp: SmtpSection,
    /// Requests an API key may make at once on the HTTPS API (`/api/v1/...`).
    pub api_burst: u32,
    /// Requests an API key may make each minute after its burst.
    pub api_requests_per_minute: u32,
}

/// Where the HTTPS edge's certificates come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// A local CA in the data directory.
    #[default]
    SelfSigned,
    /// An ACME CA (Let's Encrypt by default): the wildcard for the domain by DNS-01,
    /// answered by vmkit's own DNS server (`[dns] listen` must be set, and the
    /// domain delegated to it).
    Acme,
}

impl Default for HttpsSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8443".into(),
            http_listen: String::new(),
            public_port: 0,
            tls: TlsMode::SelfSigned,
            hsts: true,
            trusted_proxies: Vec::new(),
            acme: AcmeSection::default(),
            custom_domains: true,
            domain_resolvers: Vec::new(),
            smtp: SmtpSection::default(),
            api_burst: 120,
            api_requests_per_minute: 600,
        }
    }
}

impl HttpsSection {
    /// The HTTPS address; `None` when the edge is off.
    pub fn listen(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        parse_listen("https", "listen", &self.listen, "0.0.0.0:8443")
    }

    /// The plain HTTP address; `None` when there is none.
    pub fn http_listen(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        parse_listen("https", "http_listen", &self.http_listen, "0.0.0.0:80")
    }
}

fn parse_listen(
    section: &str,
    key: &str,
    value: &str,
    example: &str,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value.trim().parse().map(Some).map_err(|_| {
        anyhow::anyhow!(
            "[{section}] {key} = {value:?} is not an address and port; write it as {example} \
             (or leave it empty to turn it off)"
        )
    })
}

/// The SSH lobby (`ssh HOST CMD`): on `0.0.0.0:2222` unless `listen` says
/// otherwise; an empty `listen` turns it off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshSection {
    /// Address and port to serve SSH on: `0.0.0.0:2222` by default (2222 leaves
    /// the host's own sshd its port 22); empty: no SSH lobby.
    pub listen: String,
    /// The domain VMs are named under (`NAME.domain`), for the addresses the lobby
    /// prints.
    pub domain: String,
    /// The port clients dial, when it is not the one in `listen` (behind a port
    /// forward, say); 0: the one in `listen`.
    pub public_port: u16,
    /// The gateway's host name as clients dial it, for the commands the lobby
    /// prints (`ssh NAME@HOST`, `ssh-config`); empty: the domain.
    pub public_host: String,
    /// The host key (ed25519; made at the first start); relative paths are under
    /// the data directory.
    pub host_key: PathBuf,
}

impl Default for SshSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:2222".into(),
            domain: "localhost".into(),
            public_port: 0,
            public_host: String::new(),
            host_key: PathBuf::from("ssh_host_ed25519_key"),
        }
    }
}

impl SshSection {
    /// The address to serve on; `None` when the lobby is off.
    pub fn listen(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        self.listen.trim().parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "[ssh] listen = {:?} is not an address and port; write it as 0.0.0.0:2222 \
                 (or leave it empty to turn the SSH lobby off)",
                self.listen
            )
        })
    }
}

/// Users: who may register themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsersSection {
    /// `closed`: only the operator adds users (`vmkit user add`); `invite`: whoever
    /// has an invite code (`vmkit invite new`); `open`: anyone.
    pub registration: vmkit_core::RegistrationPolicy,
}

/// The retention rule of the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSection {
    /// Most events kept (at least 1); the oldest go first.
    pub max_count: u64,
    /// Events older than this many days go; 0 keeps events of any age.
    pub max_age_days: u64,
}

impl Default for EventsSection {
    fn default() -> Self {
        let rule = vmkit_core::EventRetention::default();
        Self {
            max_count: rule.max_events,
            max_age_days: rule.max_age.map_or(0, |age| age.as_secs() / 86_400),
        }
    }
}

impl EventsSection {
    /// The rule for the manager.
    pub fn retention(&self) -> vmkit_core::EventRetention {
        let rule = vmkit_core::EventRetention::new(self.max_count);
        match self.max_age_days {
            0 => rule,
            days => rule.max_age(std::time::Duration::from_secs(days.saturating_mul(86_400))),
        }
    }
}

/// Timeouts, in seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time a guest has to answer the agent's hello after boot.
    pub boot_secs: u64,
    /// Time a guest has to power off before it is stopped by force.
    pub shutdown_grace_secs: u64,
    /// Timeout of one agent call.
    pub agent_secs: u64,
    /// Time a guest's SSH server has, after the agent's hello, to answer before a
    /// create or start returns anyway (images with sshd, VMs with a network).
    pub ssh_ready_secs: u64,
    /// How often agents are checked for answering; VMMs are polled for having died
    /// every tenth time (a safety net: their events are followed as they happen).
    pub vmm_check_secs: u64,
}

/// Per-VM limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most vCPUs of one VM.
    pub max_vcpus: u32,
    /// Least memory of one VM, MiB.
    pub min_memory_mib: u64,
    /// Most memory of one VM, MiB.
    pub max_memory_mib: u64,
    /// Largest data disk, GiB.
    pub max_disk_gib: u64,
}

/// Default per-user quota.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// VMs.
    pub max_vms: u32,
    /// vCPUs summed.
    pub max_vcpus: u32,
    /// Memory summed, MiB.
    pub max_memory_mib: u64,
    /// Data disk summed, GiB.
    pub max_disk_gib: u64,
}

/// QEMU settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuSection {
    /// The QEMU program.
    pub binary: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
}

/// Volumes: files under the data directory, or thin volumes in an LVM thin pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// `file` or `lvm`.
    pub backend: String,
    /// File volumes: `auto`, `reflink`, `qcow2` or `copy`.
    pub clone_method: String,
    /// LVM: the volume group.
    pub volume_group: String,
    /// LVM: the thin pool in it.
    pub thin_pool: String,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            backend: "file".to_owned(),
            clone_method: "auto".to_owned(),
            volume_group: String::new(),
            thin_pool: String::new(),
        }
    }
}

/// Guest networking: a bridge with NAT and per-VM isolation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
    /// Give VMs a network (bridge, TAP, NAT, isolation). Needs root.
    pub enabled: bool,
    /// The bridge.
    pub bridge: String,
    /// The guests' subnet; the bridge takes its first address.
    pub subnet: String,
    /// Where guests' DNS queries to their gateway go: `auto` (the host's resolver
    /// from /etc/resolv.conf), `local` (a resolver the operator runs on the gateway
    /// address), or an IPv4 address.
    pub dns: String,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            enabled: true,
            bridge: "br-vmkit".to_owned(),
            subnet: "10.88.0.0/16".to_owned(),
            dns: "auto".to_owned(),
        }
    }
}

/// VMM confinement: a uid per VM and a cgroup per VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfinementSection {
    /// `auto` (on when the daemon runs as root), `on` (a VMM that cannot be confined
    /// is not started) or `off`.
    pub enabled: String,
    /// The first uid of the range handed to VMs (uid = gid).
    pub uid_first: u32,
    /// How many uids the range holds: the most VMs the host can have.
    pub uid_count: u32,
    /// CPU time a VMM may use beyond one CPU per vCPU, in thousandths of a CPU.
    pub vmm_cpu_millis: u64,
    /// Memory a VMM may use beyond its guest's, MiB.
    pub memory_overhead_mib: u64,
    /// I/O weight of every VMM, 1 to 10000.
    pub io_weight: u16,
    /// Most tasks (processes and threads) of one VMM.
    pub pids_max: u64,
}

impl Default for ConfinementSection {
    fn default() -> Self {
        let limits = vmkit_core::CgroupLimits::default();
        let uids = vmkit_core::UidRange::default();
        Self {
            enabled: "auto".to_owned(),
            uid_first: uids.first,
            uid_count: uids.count,
            vmm_cpu_millis: limits.vmm_cpu_millis,
            memory_overhead_mib: limits.memory_overhead_mib,
            io_weight: limits.io_weight,
            pids_max: limits.pids_max,
        }
    }
}

impl ConfinementSection {
    /// The manager's confinement for a daemon whose effective uid is `euid`, or what
    /// is wrong with the section.
    pub fn resolve(&self, euid: u32) -> anyhow::Result<Option<vmkit_core::ConfinementConfig>> {
        let on = match self.enabled.as_str() {
            "auto" => euid == 0,
            "on" => true,
            "off" => false,
            other => bail!("[confinement] enabled = {other:?}: use \"auto\", \"on\" or \"off\""),
        };
        if !on {
            return Ok(None);
        }
        let Some(uids) = vmkit_core::UidRange::new(self.uid_first, self.uid_count) else {
            bail!(
                "[confinement] uid_first = {} and uid_count = {} are not a range of uids \
                 (it must not hold 0 nor pass 4294967294)",
                self.uid_first,
                self.uid_count
            );
        };
        let limits = vmkit_core::CgroupLimits::default()
            .vmm_cpu_millis(self.vmm_cpu_millis)
            .memory_overhead_mib(self.memory_overhead_mib)
            .io_weight(self.io_weight)
            .pids_max(self.pids_max);
        Ok(Some(
            vmkit_core::ConfinementConfig::new()
                .uids(uids)
                .limits(limits),
        ))
    }
}

/// cloud-hypervisor settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChSection {
    /// The cloud-hypervisor program.
    pub binary: PathBuf,
    /// Memory a VM may grow by while it runs, MiB (0: no live memory resize).
    pub hotplug_memory_mib: u64,
}

impl Default for ChSection {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("cloud-hypervisor"),
            hotplug_memory_mib: 0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: vmkit_core::api::default_data_dir(),
            socket: PathBuf::new(),
            hypervisor: HypervisorChoice::Auto,
            log_format: LogFormat::Human,
            log_level: "info".to_owned(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            quota: QuotaConfig::default(),
            qemu: QemuSection::default(),
            cloud_hypervisor: ChSection::default(),
            network: NetworkSection::default(),
            storage: StorageSection::default(),
            confinement: ConfinementSection::default(),
            on_vmm_exit: vmkit_core::ExitPolicy::Stop,
            default_image: vmkit_core::DEFAULT_IMAGE.to_owned(),
            default_root_gib: 10,
            events: EventsSection::default(),
            users: UsersSection::default(),
            ssh: SshSection::default(),
            https: HttpsSection::default(),
            dns: DnsSection::default(),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            boot_secs: 120,
            shutdown_grace_secs: 15,
            agent_secs: 10,
            ssh_ready_secs: 120,
            vmm_check_secs: 2,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let d = vmkit_core::SpecLimits::default();
        Self {
            max_vcpus: d.max_vcpus,
            min_memory_mib: d.min_memory_mib,
            max_memory_mib: d.max_memory_mib,
            max_disk_gib: d.max_disk_gib,
        }
    }
}

impl Default for QuotaConfig {
    fn default() -> Self {
        let d = vmkit_core::Quota::default();
        Self {
            max_vms: d.max_vms,
            max_vcpus: d.max_vcpus,
            max_memory_mib: d.max_memory_mib,
            max_disk_gib: d.max_disk_gib,
        }
    }
}

impl Default for QemuSection {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: "auto".to_owned(),
        }
    }
}

impl Config {
    /// Loads the configuration: defaults, then `file` if given (or
    /// `/etc/vmkit/gateway.toml` if it exists), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let default_file = Path::new("/etc/vmkit/gateway.toml");
        let file = file.or_else(|| default_file.exists().then_some(default_file));
        let mut value = toml::Value::try_from(Config::default())
            .context("serializing the default configuration")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let from_file: toml::Value = text
                .parse::<toml::Table>()
                .map(toml::Value::Table)
                .with_context(|| format!("parsing config file {}", path.display()))?;
            merge(&mut value, from_file);
        }
        apply_env(&mut value, "VMKIT", &mut std::env::vars())?;
        let mut config: Config = value
            .try_into()
            .context("invalid configuration (file or VMKIT_* variables)")?;
        if config.socket.as_os_str().is_empty() {
            config.socket = vmkit_core::api::socket_path(&config.data_dir);
        }
        Ok(config)
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Overrides every leaf of `value` named by an environment variable
/// `PREFIX_SECTION_KEY` (upper case), parsing it as the leaf's type.
fn apply_env(
    value: &mut toml::Value,
    prefix: &str,
    vars: &mut dyn Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    let vars: std::collections::HashMap<String, String> = vars.collect();
    let mut known = Vec::new();
    walk(value, prefix, &vars, &mut known)?;
    for name in vars.keys() {
        let unrelated = [
            "VMKIT_SOCKET_PATH",
            "VMKIT_TEST_DATA",
            "VMKIT_LOG",
            "VMKIT_SECRET_KEY",
            "VMKIT_SMTP_PASSWORD",
        ];
        if name.starts_with("VMKIT_")
            && !known.contains(name)
            && !unrelated.contains(&name.as_str())
        {
            tracing::warn!(variable = %name, "unknown VMKIT_ variable ignored");
        }
    }
    Ok(())
}

fn walk(
    value: &mut toml::Value,
    name: &str,
    vars: &std::collections::HashMap<String, String>,
    known: &mut Vec<String>,
) -> anyhow::Result<()> {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                walk(
                    v,
                    &format!("{name}_{}", k.to_ascii_uppercase()),
                    vars,
                    known,
                )?;
            }
        }
        leaf => {
            known.push(name.to_owned());
            if let Some(raw) = vars.get(name) {
                *leaf = match leaf {
                    toml::Value::String(_) => toml::Value::String(raw.clone()),
                    toml::Value::Integer(_) => toml::Value::Integer(
                        raw.parse()
                            .with_context(|| format!("{name}={raw:?} is not an integer"))?,
                    ),
                    toml::Value::Boolean(_) => toml::Value::Boolean(
                        raw.parse()
                            .with_context(|| format!("{name}={raw:?} is not true or false"))?,
                    ),
                    // A list of strings (addresses, names): comma-separated.
                    toml::Value::Array(_) => toml::Value::Array(
                        raw.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(|s| toml::Value::String(s.to_owned()))
                            .collect(),
                    ),
                    other => bail!("{name} cannot be set from the environment ({other:?})"),
                };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(file: Option<&str>, env: &[(&str, &str)]) -> anyhow::Result<Config> {
        let mut value = toml::Value::try_from(Config::default())?;
        if let Some(text) = file {
            merge(&mut value, toml::Value::Table(text.parse::<toml::Table>()?));
        }
        let mut vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        apply_env(&mut value, "VMKIT", &mut vars)?;
        Ok(value.try_into()?)
    }

    #[test]
    fn defaults_need_no_file() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.hypervisor, HypervisorChoice::Auto);
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let c = load_with(
            Some("data_dir = \"/srv/vmkit\"\n[timeouts]\nboot_secs = 30\n"),
            &[
                ("VMKIT_TIMEOUTS_BOOT_SECS", "45"),
                ("VMKIT_HYPERVISOR", "qemu"),
            ],
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/vmkit"));
        assert_eq!(c.timeouts.boot_secs, 45);
        assert_eq!(c.hypervisor, HypervisorChoice::Qemu);
    }

    #[test]
    fn vms_boot_the_base_image_unless_configured_otherwise() {
        assert_eq!(load_with(None, &[]).unwrap().default_image, "base");
        let c = load_with(None, &[("VMKIT_DEFAULT_IMAGE", "tiny")]).unwrap();
        assert_eq!(c.default_image, "tiny");
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let err = load_with(None, &[("VMKIT_LIMITS_MAX_VCPUS", "lots")]).unwrap_err();
        assert!(err.to_string().contains("VMKIT_LIMITS_MAX_VCPUS"), "{err}");
    }

    /// The sample configuration the Debian package installs as /etc/vmkit/gateway.toml.
    const SAMPLE: &str = include_str!("../../../packaging/gateway.toml");

    /// The sample's option lines (`# key = value` and `# [section]`), uncommented.
    fn sample_options() -> toml::Table {
        let is_option = |line: &&str| {
            let name =
                |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            match line.split_once(" = ") {
                Some((key, _)) => name(key),
                None => line
                    .strip_prefix('[')
                    .and_then(|l| l.strip_suffix(']'))
                    .is_some_and(|section| section.split('.').all(name)),
            }
        };
        let options: Vec<&str> = SAMPLE
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(is_option)
            .collect();
        options.join("\n").parse().unwrap()
    }

    #[test]
    fn installed_sample_config_changes_nothing() {
        assert_eq!(load_with(Some(SAMPLE), &[]).unwrap(), Config::default());
    }

    #[test]
    fn sample_config_lists_every_option_with_its_default() {
        let mut defaults = toml::Value::try_from(Config::default()).unwrap();
        // The default data directory is root's; the sample shows that one.
        defaults["data_dir"] = toml::Value::String("/var/lib/vmkit".into());
        assert_eq!(toml::Value::Table(sample_options()), defaults);
    }

    #[test]
    fn confinement_is_on_for_root_unless_turned_off() {
        let c = load_with(None, &[]).unwrap();
        let on = c.confinement.resolve(0).unwrap().expect("root confines");
        assert_eq!(on.uids, vmkit_core::UidRange::default());
        assert_eq!(
            c.confinement.resolve(1000).unwrap(),
            None,
            "not root: auto is off"
        );
        let off = load_with(None, &[("VMKIT_CONFINEMENT_ENABLED", "off")]).unwrap();
        assert_eq!(off.confinement.resolve(0).unwrap(), None);
        let forced = load_with(None, &[("VMKIT_CONFINEMENT_ENABLED", "on")]).unwrap();
        assert!(
            forced.confinement.resolve(1000).unwrap().is_some(),
            "on asks for it; the backend then says what is missing"
        );
        let bad = load_with(Some("[confinement]\nuid_first = 0\n"), &[]).unwrap();
        assert!(
            bad.confinement
                .resolve(0)
                .unwrap_err()
                .to_string()
                .contains("uid_first")
        );
        let typo = load_with(Some("[confinement]\nenabled = \"yes\"\n"), &[]).unwrap();
        assert!(typo.confinement.resolve(0).is_err());
    }

    #[test]
    fn registration_is_closed_unless_configured() {
        use vmkit_core::RegistrationPolicy;
        assert_eq!(
            load_with(None, &[]).unwrap().users.registration,
            RegistrationPolicy::Closed
        );
        let c = load_with(Some("[users]\nregistration = \"invite\"\n"), &[]).unwrap();
        assert_eq!(c.users.registration, RegistrationPolicy::Invite);
        let c = load_with(None, &[("VMKIT_USERS_REGISTRATION", "open")]).unwrap();
        assert_eq!(c.users.registration, RegistrationPolicy::Open);
        assert!(load_with(Some("[users]\nregistration = \"maybe\"\n"), &[]).is_err());
    }

    #[test]
    fn the_https_edge_is_on_at_8443_unless_turned_off() {
        let default = load_with(None, &[]).unwrap();
        assert_eq!(
            default.https.listen().unwrap(),
            Some("0.0.0.0:8443".parse().unwrap())
        );
        assert_eq!(default.https.http_listen().unwrap(), None);
        let off = load_with(None, &[("VMKIT_HTTPS_LISTEN", "")]).unwrap();
        assert_eq!(off.https.listen().unwrap(), None);
        let lists = load_with(
            None,
            &[
                ("VMKIT_DNS_ADDRESSES", "192.0.2.1, 2001:db8::1"),
                ("VMKIT_HTTPS_TRUSTED_PROXIES", ""),
            ],
        )
        .unwrap();
        assert_eq!(
            lists.dns.addresses,
            [
                "192.0.2.1".parse::<std::net::IpAddr>().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
        assert!(lists.https.trusted_proxies.is_empty());
        let public = load_with(
            Some("[https]\nlisten = \"0.0.0.0:443\"\nhttp_listen = \"0.0.0.0:80\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(public.https.http_listen().unwrap().unwrap().port(), 80);
        let bad = load_with(Some("[https]\nlisten = \"443\"\n"), &[]).unwrap();
        let err = bad.https.listen().unwrap_err().to_string();
        assert!(err.contains("0.0.0.0:8443"), "{err}");
    }

    #[test]
    fn the_ssh_lobby_is_on_at_2222_unless_turned_off() {
        let default = load_with(None, &[]).unwrap();
        assert_eq!(
            default.ssh.listen().unwrap(),
            Some("0.0.0.0:2222".parse().unwrap())
        );
        let off = load_with(None, &[("VMKIT_SSH_LISTEN", "")]).unwrap();
        assert_eq!(off.ssh.listen().unwrap(), None);
        let off = load_with(Some("[ssh]\nlisten = \"\"\n"), &[]).unwrap();
        assert_eq!(off.ssh.listen().unwrap(), None);
        let any = load_with(None, &[("VMKIT_SSH_LISTEN", "127.0.0.1:0")]).unwrap();
        assert_eq!(
            any.ssh.listen().unwrap(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        let host = load_with(None, &[("VMKIT_SSH_PUBLIC_HOST", "gw.example.org")]).unwrap();
        assert_eq!(host.ssh.public_host, "gw.example.org");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        assert!(load_with(Some("dat_dir = \"/x\""), &[]).is_err());
    }
}
