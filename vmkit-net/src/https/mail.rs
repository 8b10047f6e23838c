//! Sign-in links by email: the [`Mailer`] seam and [`SmtpMailer`] (lettre) that sends
//! through the operator's SMTP relay, and the limits on who may ask how often.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Sends mail.
#[async_trait]
pub trait Mailer: Send + Sync {
    /// Sends a plain-text message `body` with `subject` to `to`.
    async fn send(&self, to: &str, subject: &str, body: &str) -> Result<(), MailError>;
}

/// Sending failed, or the mailer could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MailError(pub String);

/// How the connection to the relay is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SmtpTls {
    /// Plain SMTP upgraded with STARTTLS, which is required (port 587).
    #[default]
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS at all: only for a relay on the same host or a trusted network.
    None,
}

/// Where and how [`SmtpMailer`] sends.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SmtpConfig {
    /// The relay's host name (also the name its certificate must have).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// How the connection is secured.
    pub tls: SmtpTls,
    /// The sender address (`vmkit <vmkit@example.com>` or a bare address).
    pub from: String,
    /// User name and password for the relay, when it asks for them.
    pub credentials: Option<(String, String)>,
    /// A PEM file of the CA that signed the relay's certificate, besides the webpki
    /// roots (a private relay).
    pub ca_root: Option<PathBuf>,
}

impl SmtpConfig {
    /// A relay at `host:port`, STARTTLS, sending as `from`.
    pub fn new(host: impl Into<String>, port: u16, from: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            tls: SmtpTls::StartTls,
            from: from.into(),
            credentials: None,
            ca_root: None,
        }
    }
}

/// A [`Mailer`] over SMTP (lettre), a connection per message.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// How long one message may take to send.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);

impl SmtpMailer {
    /// A mailer for `config`; fails when the sender or the CA file is unusable.
    pub fn new(config: &SmtpConfig) -> Result<Self, MailError> {
        let from = config.from.parse().map_err(|e| {
            MailError(format!(
                "the sender {:?} is not an address: {e}",
                config.from
            ))
        })?;
        let tls = || -> Result<TlsParameters, MailError> {
            let mut params = TlsParameters::builder(config.host.clone());
            if let Some(path) = &config.ca_root {
                let pem = std::fs::read(path)
                    .map_err(|e| MailError(format!("reading {}: {e}", path.display())))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| MailError(format!("{} is no certificate: {e}", path.display())))?;
                params = params.add_root_certificate(cert);
            }
            params
                .build_rustls()
                .map_err(|e| MailError(format!("setting up TLS for the relay: {e}")))
        };
        let tls = match config.tls {
            SmtpTls::StartTls => Tls::Required(tls()?),
            SmtpTls::Tls => Tls::Wrapper(tls()?),
            SmtpTls::None => Tls::None,
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .tls(tls)
            .timeout(Some(SEND_TIMEOUT));
        if let Some((user, password)) = &config.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Self {
            transport: builder.build(),
            from,
        })
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, to: &str, subject: &str, body: &str) -> Result<(), MailError> {
        let to = to
            .parse()
            .map_err(|e| MailError(format!("{to:?} is not an address: {e}")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_owned())
            .map_err(|e| MailError(format!("building the message: {e}")))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| MailError(format!("the relay refused or failed: {e}")))
    }
}

/// How often sign-in mail may be asked for: per address and per client address,
/// in memory (bounded).
#[derive(Debug)]
pub struct MailLimits {
    per_address: Duration,
    per_peer: (usize, Duration),
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    addresses: HashMap<String, Instant>,
    peers: HashMap<IpAddr, Vec<Instant>>,
}

/// Entries kept before the oldest are forgotten.
const MAX_TRACKED: usize = 10_000;

impl Default for MailLimits {
    /// One message per address a minute; ten asks per client address an hour.
    fn default() -> Self {
        Self::new(Duration::from_secs(60), 10, Duration::from_secs(3600))
    }
}

impl MailLimits {
    /// One message per address per `per_address`; `asks` per client address per
    /// `window`.
    pub fn new(per_address: Duration, asks: usize, window: Duration) -> Self {
        Self {
            per_address,
            per_peer: (asks, window),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Whether `peer` may ask for mail to `address` now (and counts the ask).
    pub fn allow(&self, peer: IpAddr, address: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (asks, window) = self.per_peer;
        if seen.peers.len() >= MAX_TRACKED {
            seen.peers.retain(|_, times| {
                times.retain(|t| now.duration_since(*t) < window);
                !times.is_empty()
            });
        }
        let times = seen.peers.entry(peer).or_default();
        times.retain(|t| now.duration_since(*t) < window);
        if times.len() >= asks {
            return false;
        }
        times.push(now);
        let per_address = self.per_address;
        if seen.addresses.len() >= MAX_TRACKED {
            seen.addresses
                .retain(|_, t| now.duration_since(*t) < per_address);
        }
        let key = address.to_ascii_lowercase();
        if let Some(last) = seen.addresses.get(&key)
            && now.duration_since(*last) < per_address
        {
            return false;
        }
        seen.addresses.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_one_message_a_while_and_a_client_only_so_many_asks() {
        let limits = MailLimits::new(Duration::from_secs(60), 3, Duration::from_secs(3600));
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limits.allow(peer, "ada@example.com"));
        assert!(!limits.allow(peer, "ADA@example.com"), "the same address");
        assert!(limits.allow(peer, "bob@example.com"));
        assert!(
            !limits.allow(peer, "eve@example.com"),
            "past the peer's three asks"
        );
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limits.allow(other, "eve@example.com"));
    }

    #[test]
    fn a_bad_sender_is_refused_when_the_mailer_is_made() {
        let config = SmtpConfig::new("localhost", 25, "not an address");
        assert!(SmtpMailer::new(&config).is_err());
    }
}
