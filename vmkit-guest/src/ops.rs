//! The payloads of the management requests: network, files, metrics, logs, harden and
//! upgrade. Plain std and serde types, so that neither side needs anything but this crate.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The default number of log lines [`LogsRequest`] asks for.
pub const DEFAULT_LOG_LINES: u32 = 100;
/// The most log lines one [`LogsRequest`] may ask for; more is clamped to this.
pub const MAX_LOG_LINES: u32 = 5000;
/// The longest log line, in bytes; the agent cuts longer lines and the client refuses them.
pub const MAX_LOG_LINE: usize = 16 << 10;
/// The default sampling interval of [`Client::metrics`](crate::Client::metrics).
pub const DEFAULT_METRICS_INTERVAL_MS: u64 = 1000;
/// The longest sampling interval of a metrics request; longer ones are clamped to this.
pub const MAX_METRICS_INTERVAL_MS: u64 = 10_000;
/// The user [`HardenRequest`] creates when it names none.
pub const DEFAULT_DEPLOY_USER: &str = "deploy";

/// The address the guest's interface gets, found by its MAC address.
///
/// Applying it is idempotent, and a different address replaces the one the interface had
/// (a clone keeps its source's address until it is told its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NetworkConfig {
    /// The interface's MAC address, `52:54:00:12:34:56` (any case).
    pub mac: String,
    /// The interface's IPv4 address.
    pub address: Ipv4Addr,
    /// The prefix length of the interface's subnet (0–32).
    pub prefix: u8,
    /// The default gateway; it must be inside the interface's subnet.
    pub gateway: Ipv4Addr,
    /// Name servers written to `/etc/resolv.conf`, in order; left alone when empty.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// The interface's MTU; left alone when `None`.
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl NetworkConfig {
    /// A config with no name servers and the interface's MTU left alone.
    pub fn new(mac: impl Into<String>, address: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Self {
        NetworkConfig {
            mac: mac.into(),
            address,
            prefix,
            gateway,
            dns: Vec::new(),
            mtu: None,
        }
    }

    /// Sets the name servers.
    pub fn dns(mut self, dns: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        self.dns = dns.into_iter().collect();
        self
    }

    /// Sets the MTU.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }
}

/// A file to write atomically: the agent writes a temporary file in the same directory,
/// flushes it, renames it over `path` and flushes the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WriteFileRequest {
    /// The absolute path of the file; its directory must exist.
    pub path: String,
    /// How many bytes follow in `chunk` requests. The client sets it from the data it
    /// sends.
    #[serde(default)]
    pub size: u64,
    /// The permission bits; `None` keeps those of the file being replaced, or 0644.
    #[serde(default)]
    pub mode: Option<u32>,
    /// The owner, `user` or `user:group` (names or numbers); `None` keeps the owner of the
    /// file being replaced, or the agent's user.
    #[serde(default)]
    pub owner: Option<String>,
}

impl WriteFileRequest {
    /// A request to write `path` with the default mode and owner.
    pub fn new(path: impl Into<String>) -> Self {
        WriteFileRequest {
            path: path.into(),
            size: 0,
            mode: None,
            owner: None,
        }
    }

    /// Sets the permission bits.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Sets the owner, `user` or `user:group`.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }
}

/// A snapshot of the guest's load, as in the seeds' health table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Metrics {
    /// CPU busy time over the sampling interval, 0–100, all CPUs together.
    pub cpu_pct: f64,
    /// Memory in use, `(MemTotal − MemAvailable) / MemTotal`, 0–100.
    pub mem_pct: f64,
    /// `MemTotal`, in bytes.
    pub mem_total_bytes: u64,
    /// `MemAvailable`, in bytes.
    pub mem_available_bytes: u64,
    /// The root filesystem's use, as `df` computes it, 0–100.
    pub disk_pct: f64,
    /// The data disk's use (mounted at `/data`), when one is mounted.
    #[serde(default)]
    pub data_disk_pct: Option<f64>,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Seconds since the guest booted.
    pub uptime_secs: u64,
    /// Running containers, when Docker is installed and answers.
    #[serde(default)]
    pub container_count: Option<u32>,
    /// Each running container's health check status, by container name, when Docker is
    /// installed and answers.
    #[serde(default)]
    pub container_health: Option<BTreeMap<String, ContainerHealth>>,
}

/// A container's health check status (`docker inspect`'s `.State.Health.Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ContainerHealth {
    /// The health check passes.
    Healthy,
    /// The health check fails.
    Unhealthy,
    /// The health check has not passed yet.
    Starting,
    /// The container has no health check.
    None,
    /// A status this version does not know.
    #[serde(other)]
    Unknown,
}

/// Where [`LogsRequest`] reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LogSource {
    /// The systemd journal of a unit (`journalctl -u UNIT`).
    Unit(String),
    /// A text file, by absolute path.
    File(String),
}

/// The last lines of a unit's journal or of a file, and optionally what follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogsRequest {
    /// What to read.
    pub source: LogSource,
    /// How many of the last lines (default [`DEFAULT_LOG_LINES`], at most
    /// [`MAX_LOG_LINES`]).
    #[serde(default = "default_log_lines")]
    pub lines: u32,
    /// Keep sending new lines as they are written, until the host cancels.
    #[serde(default)]
    pub follow: bool,
}

fn default_log_lines() -> u32 {
    DEFAULT_LOG_LINES
}

impl LogsRequest {
    /// The last [`DEFAULT_LOG_LINES`] lines of a unit's journal.
    pub fn unit(unit: impl Into<String>) -> Self {
        Self::of(LogSource::Unit(unit.into()))
    }

    /// The last [`DEFAULT_LOG_LINES`] lines of a file.
    pub fn file(path: impl Into<String>) -> Self {
        Self::of(LogSource::File(path.into()))
    }

    fn of(source: LogSource) -> Self {
        LogsRequest {
            source,
            lines: DEFAULT_LOG_LINES,
            follow: false,
        }
    }

    /// Sets how many of the last lines to read (clamped to [`MAX_LOG_LINES`]).
    pub fn lines(mut self, lines: u32) -> Self {
        self.lines = lines.min(MAX_LOG_LINES);
        self
    }

    /// Asks for new lines as they come (see [`Client::follow_logs`](crate::Client::follow_logs),
    /// which sets it).
    pub fn follow(mut self) -> Self {
        self.follow = true;
        self
    }

    /// The line count actually used: at most [`MAX_LOG_LINES`].
    pub fn effective_lines(&self) -> u32 {
        self.lines.min(MAX_LOG_LINES)
    }
}

/// Create the deploy user and tighten sshd, as the seeds' `harden` does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HardenRequest {
    /// The deploy user to create (default [`DEFAULT_DEPLOY_USER`]).
    #[serde(default)]
    pub user: Option<String>,
    /// SSH public keys for the deploy user, besides the keys vmkit installed for the
    /// image's default user (which it always gets).
    #[serde(default)]
    pub keys: Vec<String>,
}

impl HardenRequest {
    /// Hardening with the default deploy user.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the deploy user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Adds SSH public keys for the deploy user.
    pub fn keys<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.keys.extend(keys.into_iter().map(Into::into));
        self
    }
}

/// What [`HardenRequest`] changed. Hardening twice changes nothing the second time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HardenReport {
    /// The deploy user.
    pub user: String,
    /// One sentence per change made; empty when everything was already in place.
    #[serde(default)]
    pub changes: Vec<String>,
    /// sshd was told to reload its configuration.
    #[serde(default)]
    pub sshd_reloaded: bool,
}

/// Replace the agent binary and restart it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UpgradeRequest {
    /// The new binary's SHA-256, 64 hex digits. A binary with another hash is refused and
    /// the installed one kept.
    pub sha256: String,
    /// Where the new binary comes from.
    pub source: UpgradeSource,
}

/// Where an upgrade's binary comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UpgradeSource {
    /// `size` bytes sent in `chunk` requests after the upgrade request.
    ///
    /// The only source: the host sends the binary over the agent channel, whatever
    /// carries it (virtio-serial, vsock, later the agent's own connection to the
    /// gateway), so the agent needs no HTTP or TLS client of its own.
    Upload {
        /// The binary's size in bytes.
        size: u64,
    },
}

/// What an upgrade did. The agent restarts shortly after sending it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UpgradeReport {
    /// Where the new binary was installed.
    pub path: String,
    /// The SHA-256 of the binary it replaced.
    pub previous_sha256: String,
    /// The new binary's SHA-256.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// The agent exits to be restarted by its supervisor (systemd or init).
    pub restarting: bool,
}

/// One filesystem [`Request::GrowFilesystems`](crate::Request::GrowFilesystems)
/// looked at: its size before and after (equal when it already filled its disk).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FilesystemGrowth {
    /// Where it is mounted (`/`, `/data`).
    pub mount: String,
    /// Its block device (`/dev/vdb`).
    pub device: String,
    /// Its size before, in bytes.
    pub before_bytes: u64,
    /// Its size after, in bytes.
    pub after_bytes: u64,
}

impl FilesystemGrowth {
    /// Whether it grew.
    pub fn grew(&self) -> bool {
        self.after_bytes > self.before_bytes
    }
}

/// What [`Request::GrowFilesystems`](crate::Request::GrowFilesystems) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GrowReport {
    /// The ext4 filesystems mounted at `/` and `/data`, grown or not.
    #[serde(default)]
    pub filesystems: Vec<FilesystemGrowth>,
    /// One sentence per filesystem that could not be grown.
    #[serde(default)]
    pub failures: Vec<String>,
}

/// What the guest says about its SSH server, in answer to
/// [`Request::SshInfo`](crate::Request::SshInfo): what an SSH gateway needs to reach
/// the guest's sshd and to pin its host keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SshInfo {
    /// The guest sshd's public host keys as OpenSSH lines (`ssh-ed25519 AAAA... comment`),
    /// from `/etc/ssh/ssh_host_*_key.pub`. Made first (`ssh-keygen -A`) when sshd is
    /// installed and has none yet; empty without sshd.
    #[serde(default)]
    pub host_keys: Vec<String>,
    /// The image's default user (`/etc/vmkit/default-user`); `None` when the image has
    /// none (only root).
    #[serde(default)]
    pub default_user: Option<String>,
    /// Whether an OpenSSH server is installed (`/usr/sbin/sshd`).
    #[serde(default)]
    pub sshd: bool,
}

impl SshInfo {
    /// An answer with these facts.
    pub fn new(host_keys: Vec<String>, default_user: Option<String>, sshd: bool) -> Self {
        SshInfo {
            host_keys,
            default_user,
            sshd,
        }
    }
}

/// The terminal of a [`SessionRequest`] with a pty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PtySize {
    /// The terminal type, set as `TERM` (`xterm-256color`).
    pub term: String,
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl PtySize {
    /// A terminal of type `term` and `cols` × `rows` characters.
    pub fn new(term: impl Into<String>, cols: u16, rows: u16) -> Self {
        PtySize {
            term: term.into(),
            cols,
            rows,
        }
    }
}

/// A process whose standard input the host streams: `ssh VM` (a login shell on a pty)
/// or `ssh VM cmd` (pipes). See [`Client::session`](crate::Client::session).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionRequest {
    /// The program and its arguments, `argv[0]` looked up in `PATH`. Empty: the user's
    /// login shell from `/etc/passwd`, started as a login shell (`argv[0]` `-sh`,
    /// `-bash`, ...).
    #[serde(default)]
    pub argv: Vec<String>,
    /// Who runs it (name or uid); root when `None`. The process gets the user's uid,
    /// gid and groups, `HOME`, `USER`, `LOGNAME` and `SHELL`, and starts in the home
    /// directory. An unknown user is refused.
    #[serde(default)]
    pub user: Option<String>,
    /// Variables added to the session's environment (after `PATH`, `HOME`, `USER`,
    /// `LOGNAME`, `SHELL` and `TERM`, which they may replace).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// A pty as the process's standard input, output, error and controlling terminal;
    /// pipes when `None` (standard error then comes apart from standard output).
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Instead of a process: a TCP connection to this port on the guest's loopback
    /// (`127.0.0.1`), whose bytes are the session's input and output (how the HTTPS
    /// edge reaches an app bound to the guest's loopback only). The session exits
    /// with status 0 once both directions are closed; a refused connection is the
    /// request's error. `argv`, `user`, `env` and `pty` are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<u16>,
}

impl SessionRequest {
    /// A session running `argv` as root through pipes.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SessionRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..SessionRequest::default()
        }
    }

    /// A login shell: the user's shell from `/etc/passwd`.
    pub fn shell() -> Self {
        Self::default()
    }

    /// Runs it as `user` (a name or a uid).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Gives it a pty of type `term` and `cols` × `rows` characters.
    pub fn pty(mut self, term: impl Into<String>, cols: u16, rows: u16) -> Self {
        self.pty = Some(PtySize::new(term, cols, rows));
        self
    }

    /// A session that is a TCP connection to `port` on the guest's loopback.
    pub fn connect(port: u16) -> Self {
        SessionRequest {
            connect: Some(port),
            ..SessionRequest::default()
        }
    }
}
