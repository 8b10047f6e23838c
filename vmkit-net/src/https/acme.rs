//! Certificates from an ACME CA (`tls = "acme"`), with instant-acme.
//!
//! [`AcmeIssuer`] gets:
//! - the wildcard (`domain` and `*.domain`) by DNS-01: it puts the values in
//!   [`AcmeChallenges::add_dns01`], which vmkit's DNS server
//!   (`vmkit_net::dns`, feature `dns`) serves as `_acme-challenge.domain` TXT, and removes them after;
//! - a custom domain's certificate by HTTP-01: it puts the answer in
//!   [`AcmeChallenges::set_http01`], which the HTTPS edge serves at
//!   `/.well-known/acme-challenge/TOKEN` on its plain-HTTP listener. Orders for one
//!   domain are rate-limited ([`AcmeConfig::rate_limit`]).
//!
//! Each certificate goes into the [`CertStore`] at once (the next handshake uses
//! it) and into [`AcmeConfig::state_dir`] (`certs/wildcard.{crt,key}`,
//! `certs/custom/HOST.{crt,key}`, keys mode 0600), so a restart serves them
//! ([`AcmeIssuer::load_stored`]) without a new order. The ACME account's
//! credentials are stored sealed with the [`SecretBox`] (`account-*.sealed`; the
//! box's key lives outside the data directory).
//!
//! [`AcmeIssuer::run`] renews every certificate [`AcmeConfig::renew_before`] its
//! expiry, retries failures with exponential backoff and jitter between
//! [`AcmeConfig::retry_backoff`]'s bounds, and reports each success and failure as
//! an [`AcmeEvent`]. A failure never stops it, nor the listener: the old
//! certificate is served until a new one is installed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use vmkit_core::SecretBox;

use super::tls::{CertStore, IssuedCert, certified_key};
use crate::challenges::AcmeChallenges;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// What the sealed account credentials are bound to (the `aad` of the box).
const ACCOUNT_AAD: &[u8] = b"vmkit acme account credentials";
/// The longest wait between two looks at the certificates, so that custom domains
/// added meanwhile are not forgotten.
const MAX_IDLE: Duration = Duration::from_secs(3600);

/// How [`AcmeIssuer`] talks to the CA and keeps what it gets.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AcmeConfig {
    /// The CA's directory URL (default [`LETS_ENCRYPT`]).
    pub directory_url: String,
    /// Contact email addresses for the account.
    pub contacts: Vec<String>,
    /// A PEM file with the one root CA to trust for the CA's own HTTPS (a test CA
    /// such as pebble); none: the system's roots.
    pub ca_root_pem: Option<PathBuf>,
    /// Where certificates and the sealed account are kept (in the data directory).
    pub state_dir: PathBuf,
    /// How long before expiry a certificate is renewed (default 30 days).
    pub renew_before: Duration,
    /// The first and the longest wait between failed attempts (default 1 minute
    /// and 6 hours); each failure doubles the wait, with jitter.
    pub retry_min: Duration,
    /// See [`AcmeConfig::retry_min`].
    pub retry_max: Duration,
    /// At most this many orders for one domain...
    pub rate_limit_orders: usize,
    /// ...within this window (default 5 per 24 hours).
    pub rate_limit_window: Duration,
    /// How long one order may take, challenges to certificate (default 3 minutes).
    pub order_timeout: Duration,
}

impl AcmeConfig {
    /// Let's Encrypt, keeping state in `state_dir`, with the defaults.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            directory_url: LETS_ENCRYPT.to_owned(),
            contacts: Vec::new(),
            ca_root_pem: None,
            state_dir: state_dir.into(),
            renew_before: Duration::from_secs(30 * 24 * 3600),
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(6 * 3600),
            rate_limit_orders: 5,
            rate_limit_window: Duration::from_secs(24 * 3600),
            order_timeout: Duration::from_secs(180),
        }
    }

    /// Uses the CA at `url` (its directory).
    pub fn directory_url(mut self, url: &str) -> Self {
        self.directory_url = url.to_owned();
        self
    }

    /// Adds a contact email address.
    pub fn contact(mut self, email: &str) -> Self {
        self.contacts.push(email.to_owned());
        self
    }

    /// Trusts only the root CA in the PEM file `path` for the CA's HTTPS.
    pub fn ca_root_pem(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_root_pem = Some(path.into());
        self
    }

    /// Renews certificates `before` their expiry.
    pub fn renew_before(mut self, before: Duration) -> Self {
        self.renew_before = before;
        self
    }

    /// Waits between `min` and `max` after failures.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max.max(min);
        self
    }

    /// Allows at most `orders` orders for one domain within `window`.
    pub fn rate_limit(mut self, orders: usize, window: Duration) -> Self {
        self.rate_limit_orders = orders;
        self.rate_limit_window = window;
        self
    }

    /// Gives up on an order after `timeout`.
    pub fn order_timeout(mut self, timeout: Duration) -> Self {
        self.order_timeout = timeout;
        self
    }
}

/// Errors of [`AcmeIssuer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// The CA refused or failed a request.
    #[error("the ACME CA: {what}")]
    Ca {
        /// What was being done and what the CA said.
        what: String,
    },
    /// A challenge could not be answered or was not accepted.
    #[error("validating {name} failed: {what}")]
    Challenge {
        /// The name being validated.
        name: String,
        /// What went wrong, as the CA said it.
        what: String,
    },
    /// Too many orders for one domain.
    #[error(
        "{domain} had {orders} certificate orders within {window:?}; the next is allowed in {retry_in:?}"
    )]
    RateLimited {
        /// The domain.
        domain: String,
        /// The limit.
        orders: usize,
        /// Its window.
        window: Duration,
        /// When an order is allowed again.
        retry_in: Duration,
    },
    /// A host name that cannot have a certificate.
    #[error(
        "{host:?} is not a host name a certificate can name; use a DNS name such as app.example.com"
    )]
    BadHost {
        /// The name.
        host: String,
    },
    /// The account's stored credentials cannot be used.
    #[error("the stored ACME account {path} cannot be used: {what}; move it away to register a new account", path = path.display())]
    Account {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Reading or writing the state directory failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate the CA sent, or one stored, is unusable.
    #[error("the certificate for {name} is unusable: {what}")]
    Certificate {
        /// Its name.
        name: String,
        /// What is wrong.
        what: String,
    },
}

/// What the renewal task reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AcmeEvent {
    /// A certificate was issued and installed.
    Issued {
        /// The names it covers.
        names: Vec<String>,
        /// When it expires.
        not_after: SystemTime,
    },
    /// Getting a certificate failed; the old one (if any) is still served.
    Failed {
        /// The names asked for.
        names: Vec<String>,
        /// What went wrong.
        error: String,
        /// When the next attempt is made.
        retry_in: Duration,
    },
}

/// A certificate the issuer keeps current.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target {
    /// `domain` and `*.domain`, by DNS-01.
    Wildcard,
    /// A custom domain, by HTTP-01.
    Custom(String),
}

/// Failures of one target, for its backoff.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    next: Instant,
}

/// Gets and renews the certificates of the HTTPS edge from an ACME CA.
pub struct AcmeIssuer {
    config: AcmeConfig,
    domain: String,
    store: Arc<CertStore>,
    challenges: Arc<AcmeChallenges>,
    secrets: Arc<SecretBox>,
    account: tokio::sync::Mutex<Option<Account>>,
    orders: Mutex<HashMap<String, VecDeque<Instant>>>,
    custom: Mutex<BTreeSet<String>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeIssuer")
            .field("domain", &self.domain)
            .field("directory_url", &self.config.directory_url)
            .finish_non_exhaustive()
    }
}

impl AcmeIssuer {
    /// An issuer for `domain`'s wildcard and the custom domains added later,
    /// installing into `store`, answering challenges through `challenges`, sealing
    /// the account with `secrets`.
    pub fn new(
        config: AcmeConfig,
        domain: &str,
        store: Arc<CertStore>,
        challenges: Arc<AcmeChallenges>,
        secrets: Arc<SecretBox>,
    ) -> Result<Arc<Self>, AcmeError> {
        let domain = check_host(domain)?;
        std::fs::create_dir_all(config.state_dir.join("certs").join("custom")).map_err(|e| {
            AcmeError::Io {
                what: format!("creating {}", config.state_dir.display()),
                source: e,
            }
        })?;
        Ok(Arc::new(Self {
            config,
            domain,
            store,
            challenges,
            secrets,
            account: tokio::sync::Mutex::new(None),
            orders: Mutex::new(HashMap::new()),
            custom: Mutex::new(BTreeSet::new()),
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// Installs the certificates stored by earlier runs into the store (the
    /// wildcard as the default, custom domains for their names, which are then kept
    /// current by [`AcmeIssuer::run`]); how many. An unusable stored certificate is
    /// skipped with a warning (it is issued again).
    pub fn load_stored(&self) -> Result<usize, AcmeError> {
        let mut loaded = 0;
        if let Some(cert) = self.read_stored(&Target::Wildcard)? {
            self.install(&Target::Wildcard, &cert)?;
            loaded += 1;
        }
        let dir = self.config.state_dir.join("certs").join("custom");
        let entries = std::fs::read_dir(&dir).map_err(|e| AcmeError::Io {
            what: format!("listing {}", dir.display()),
            source: e,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(host) = name.strip_suffix(".crt") else {
                continue;
            };
            let Ok(host) = check_host(host) else { continue };
            let target = Target::Custom(host.clone());
            match self.read_stored(&target) {
                Ok(Some(cert)) => {
                    self.install(&target, &cert)?;
                    lock(&self.custom).insert(host);
                    loaded += 1;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(host, error = %e, "skipping a stored certificate"),
            }
        }
        Ok(loaded)
    }

    /// Keeps `host` (a custom domain whose ownership was proven) certified: the
    /// renewal task gets its certificate soon.
    pub fn add_custom_domain(&self, host: &str) -> Result<(), AcmeError> {
        let host = check_host(host)?;
        lock(&self.custom).insert(host);
        self.wake.notify_one();
        Ok(())
    }

    /// The custom domains kept certified (added, or loaded from an earlier run).
    pub fn custom_domains(&self) -> BTreeSet<String> {
        lock(&self.custom).clone()
    }

    /// Stops keeping `host` certified and serving its certificate.
    pub fn remove_custom_domain(&self, host: &str) {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        lock(&self.custom).remove(&host);
        self.store.remove(&host);
    }

    /// Gets `domain` + `*.domain` by DNS-01, installs the result as the store's
    /// default and stores it.
    pub async fn issue_wildcard(&self) -> Result<IssuedCert, AcmeError> {
        self.issue(&Target::Wildcard).await
    }

    /// Gets a certificate for the custom domain `host` by HTTP-01 (rate-limited),
    /// installs it for `host` and stores it.
    pub async fn issue_custom(&self, host: &str) -> Result<IssuedCert, AcmeError> {
        let host = check_host(host)?;
        self.issue(&Target::Custom(host)).await
    }

    /// Renews every certificate as it nears expiry (issuing missing ones at once)
    /// until `shutdown` completes, reporting through `events`. Failures are retried
    /// with backoff; nothing here stops on one.
    pub async fn run(
        self: Arc<Self>,
        events: impl Fn(AcmeEvent) + Send + Sync + 'static,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut backoff: HashMap<Target, Backoff> = HashMap::new();
        // After an issuance, not before two thirds of the new certificate's life:
        // a CA whose certificates live shorter than `renew_before` is not asked
        // again at once.
        let mut not_before: HashMap<Target, Instant> = HashMap::new();
        tokio::pin!(shutdown);
        loop {
            let now = Instant::now();
            let mut next_look = now + MAX_IDLE;
            for target in self.targets() {
                let mut due = self.due(&target, backoff.get(&target), now);
                if let Some(earliest) = not_before.get(&target) {
                    due = due.max(*earliest);
                }
                if due > now {
                    next_look = next_look.min(due);
                    continue;
                }
                // Each attempt in a task of its own: even a panic in a dependency is
                // reported as a failure, not the end of renewals.
                let this = self.clone();
                let attempt = target.clone();
                let result = tokio::spawn(async move { this.issue(&attempt).await }).await;
                let names = self.names(&target);
                let result = result.unwrap_or_else(|join| {
                    Err(AcmeError::Ca {
                        what: format!("the order task failed: {join}"),
                    })
                });
                match result {
                    Ok(cert) => {
                        backoff.remove(&target);
                        let life = cert
                            .not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        let earliest = Instant::now() + (life * 2 / 3).min(MAX_IDLE * 24 * 365);
                        not_before.insert(target.clone(), earliest);
                        events(AcmeEvent::Issued {
                            names,
                            not_after: cert.not_after,
                        });
                    }
                    Err(e) => {
                        let wait = self.failed(&mut backoff, &target, &e);
                        next_look = next_look.min(Instant::now() + wait);
                        events(AcmeEvent::Failed {
                            names,
                            error: e.to_string(),
                            retry_in: wait,
                        });
                    }
                }
            }
            let sleep = next_look.saturating_duration_since(Instant::now());
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(sleep) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// The certificates to keep current.
    fn targets(&self) -> Vec<Target> {
        let mut targets = vec![Target::Wildcard];
        targets.extend(lock(&self.custom).iter().cloned().map(Target::Custom));
        targets
    }

    /// When `target` is next due: at its backoff after a failure, else
    /// `renew_before` its expiry (now if it has no certificate).
    fn due(&self, target: &Target, backoff: Option<&Backoff>, now: Instant) -> Instant {
        if let Some(b) = backoff {
            return b.next;
        }
        let expiry = match target {
            Target::Wildcard => self.store.default_expiry(),
            Target::Custom(host) => self.store.expiry_for(host),
        };
        match expiry {
            None => now,
            Some(expiry) => {
                let renew_at = expiry
                    .checked_sub(self.config.renew_before)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                match renew_at.duration_since(SystemTime::now()) {
                    Ok(wait) => now + wait.min(MAX_IDLE),
                    Err(_) => now,
                }
            }
        }
    }

    /// Records a failure of `target`; how long until the next attempt.
    fn failed(
        &self,
        backoff: &mut HashMap<Target, Backoff>,
        target: &Target,
        error: &AcmeError,
    ) -> Duration {
        let failures = backoff.get(target).map_or(0, |b| b.failures) + 1;
        let mut wait = retry_delay(
            self.config.retry_min,
            self.config.retry_max,
            failures,
            rand::random::<f64>(),
        );
        if let AcmeError::RateLimited { retry_in, .. } = error {
            wait = wait.max(*retry_in);
        }
        tracing::warn!(names = ?self.names(target), error = %error, ?wait, "ACME: getting a certificate failed");
        backoff.insert(
            target.clone(),
            Backoff {
                failures,
                next: Instant::now() + wait,
            },
        );
        wait
    }

    fn names(&self, target: &Target) -> Vec<String> {
        match target {
            Target::Wildcard => vec![self.domain.clone(), format!("*.{}", self.domain)],
            Target::Custom(host) => vec![host.clone()],
        }
    }

    /// One order for `target`, start to end: the certificate is installed and
    /// stored when this returns `Ok`.
    async fn issue(&self, target: &Target) -> Result<IssuedCert, AcmeError> {
        let rate_key = match target {
            Target::Wildcard => self.domain.clone(),
            Target::Custom(host) => host.clone(),
        };
        self.take_order_slot(&rate_key)?;
        let names = self.names(target);
        let kind = match target {
            Target::Wildcard => ChallengeType::Dns01,
            Target::Custom(_) => ChallengeType::Http01,
        };
        let account = self.account().await?;
        let cert = tokio::time::timeout(
            self.config.order_timeout,
            self.order(&account, &names, kind),
        )
        .await
        .map_err(|_| AcmeError::Ca {
            what: format!(
                "the order for {} took over {:?}",
                names.join(", "),
                self.config.order_timeout
            ),
        })??;
        self.install(target, &cert)?;
        self.write_stored(target, &cert)?;
        tracing::info!(names = ?names, "ACME: certificate installed");
        Ok(cert)
    }

    /// Counts an order for `domain`, or refuses it past the rate limit.
    fn take_order_slot(&self, domain: &str) -> Result<(), AcmeError> {
        let window = self.config.rate_limit_window;
        let mut orders = lock(&self.orders);
        let recent = orders.entry(domain.to_owned()).or_default();
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            recent.pop_front();
        }
        if recent.len() >= self.config.rate_limit_orders {
            let oldest = recent.front().copied().unwrap_or(now);
            return Err(AcmeError::RateLimited {
                domain: domain.to_owned(),
                orders: self.config.rate_limit_orders,
                window,
                retry_in: window.saturating_sub(now.duration_since(oldest)),
            });
        }
        recent.push_back(now);
        Ok(())
    }

    /// The order itself: challenges answered, then removed whatever happens.
    async fn order(
        &self,
        account: &Account,
        names: &[String],
        kind: ChallengeType,
    ) -> Result<IssuedCert, AcmeError> {
        // `*.domain` is asked for as such; its challenge is at `domain`.
        let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(ca("placing the order"))?;
        let mut answered = Answered::new(&self.challenges);
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(ca("reading an authorization"))?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    status => {
                        return Err(AcmeError::Challenge {
                            name: authz.identifier().to_string(),
                            what: format!("the authorization is {status:?}"),
                        });
                    }
                }
                let name = authz.identifier().to_string();
                let mut challenge =
                    authz
                        .challenge(kind.clone())
                        .ok_or_else(|| AcmeError::Challenge {
                            name: name.clone(),
                            what: format!("the CA offers no {kind:?} challenge"),
                        })?;
                let key_authorization = challenge.key_authorization();
                match kind {
                    ChallengeType::Dns01 => {
                        let host = name.trim_start_matches("*.");
                        answered.dns01(
                            format!("_acme-challenge.{host}"),
                            key_authorization.dns_value(),
                        );
                    }
                    _ => answered.http01(
                        challenge.token.clone(),
                        key_authorization.as_str().to_owned(),
                    ),
                }
                challenge
                    .set_ready()
                    .await
                    .map_err(ca("telling the CA a challenge is ready"))?;
            }
            let retry = RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .backoff(1.5)
                .timeout(self.config.order_timeout);
            let status = order
                .poll_ready(&retry)
                .await
                .map_err(|e| AcmeError::Challenge {
                    name: names.join(", "),
                    what: e.to_string(),
                })?;
            if status != OrderStatus::Ready {
                return Err(AcmeError::Challenge {
                    name: names.join(", "),
                    what: format!("the order is {status:?}"),
                });
            }
            let key_pem = order.finalize().await.map_err(ca("finalizing the order"))?;
            let chain_pem = order
                .poll_certificate(&retry)
                .await
                .map_err(ca("downloading the certificate"))?;
            Ok((chain_pem, key_pem))
        }
        .await;
        answered.clear();
        let (chain_pem, key_pem) = result?;
        let not_after = chain_not_after(&chain_pem).ok_or_else(|| AcmeError::Certificate {
            name: names.join(", "),
            what: "its expiry cannot be read".into(),
        })?;
        Ok(IssuedCert::new(chain_pem, key_pem, not_after))
    }

    /// The account: loaded once from its sealed file, or registered and sealed.
    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(account) = slot.as_ref() {
            return Ok(account.clone());
        }
        let path = self.account_path();
        let builder = || match &self.config.ca_root_pem {
            Some(root) => Account::builder_with_root(root).map_err(|e| AcmeError::Ca {
                what: format!("trusting the root CA in {}: {e}", root.display()),
            }),
            None => Account::builder().map_err(ca("setting up the HTTPS client")),
        };
        let account = match std::fs::read(&path) {
            Ok(sealed) => {
                let bad = |what: String| AcmeError::Account {
                    path: path.clone(),
                    what,
                };
                let json = self
                    .secrets
                    .open(&sealed, ACCOUNT_AAD)
                    .map_err(|e| bad(e.to_string()))?;
                let credentials: AccountCredentials =
                    serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
                builder()?
                    .from_credentials(credentials)
                    .await
                    .map_err(ca("loading the account"))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let contacts: Vec<String> = self
                    .config
                    .contacts
                    .iter()
                    .map(|c| format!("mailto:{c}"))
                    .collect();
                let contacts: Vec<&str> = contacts.iter().map(String::as_str).collect();
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory_url.clone(),
                        None,
                    )
                    .await
                    .map_err(ca("registering an account"))?;
                let json = serde_json::to_vec(&credentials).map_err(|e| AcmeError::Ca {
                    what: format!("serializing the account: {e}"),
                })?;
                write_file(&path, &self.secrets.seal(&json, ACCOUNT_AAD), 0o600)?;
                account
            }
            Err(e) => {
                return Err(AcmeError::Io {
                    what: format!("reading {}", path.display()),
                    source: e,
                });
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// The sealed account of this directory URL (another CA gets another account).
    fn account_path(&self) -> PathBuf {
        let digest =
            ring::digest::digest(&ring::digest::SHA256, self.config.directory_url.as_bytes());
        let short: String = digest.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.config
            .state_dir
            .join(format!("account-{short}.sealed"))
    }

    fn paths(&self, target: &Target) -> (PathBuf, PathBuf) {
        let certs = self.config.state_dir.join("certs");
        let (dir, stem) = match target {
            Target::Wildcard => (certs, "wildcard"),
            Target::Custom(host) => (certs.join("custom"), host.as_str()),
        };
        (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        )
    }

    fn install(&self, target: &Target, cert: &IssuedCert) -> Result<(), AcmeError> {
        let unusable = |e: super::HttpsError| AcmeError::Certificate {
            name: self.names(target).join(", "),
            what: e.to_string(),
        };
        match target {
            Target::Wildcard => self.store.set_default(cert).map_err(unusable),
            Target::Custom(host) => self.store.set_for(host, cert).map_err(unusable),
        }
    }

    fn write_stored(&self, target: &Target, cert: &IssuedCert) -> Result<(), AcmeError> {
        let (crt, key) = self.paths(target);
        // The key first: a certificate on disk always has its key.
        write_file(&key, cert.key_pem.as_bytes(), 0o600)?;
        write_file(&crt, cert.chain_pem.as_bytes(), 0o644)
    }

    fn read_stored(&self, target: &Target) -> Result<Option<IssuedCert>, AcmeError> {
        let (crt, key) = self.paths(target);
        let read = |path: &Path| match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AcmeError::Io {
                what: format!("reading {}", path.display()),
                source: e,
            }),
        };
        let (Some(chain_pem), Some(key_pem)) = (read(&crt)?, read(&key)?) else {
            return Ok(None);
        };
        let name = self.names(target).join(", ");
        let not_after = chain_not_after(&chain_pem).ok_or_else(|| AcmeError::Certificate {
            name: name.clone(),
            what: format!("{} has no readable expiry", crt.display()),
        })?;
        let cert = IssuedCert::new(chain_pem, key_pem, not_after);
        certified_key(&cert).map_err(|e| AcmeError::Certificate {
            name,
            what: e.to_string(),
        })?;
        Ok(Some(cert))
    }
}

/// The challenge answers of one order, removed when it ends.
struct Answered<'a> {
    challenges: &'a AcmeChallenges,
    dns: Vec<(String, String)>,
    http: Vec<String>,
}

impl<'a> Answered<'a> {
    fn new(challenges: &'a AcmeChallenges) -> Self {
        Self {
            challenges,
            dns: Vec::new(),
            http: Vec::new(),
        }
    }

    fn dns01(&mut self, name: String, value: String) {
        self.challenges.add_dns01(&name, &value);
        self.dns.push((name, value));
    }

    fn http01(&mut self, token: String, key_authorization: String) {
        self.challenges.set_http01(&token, &key_authorization);
        self.http.push(token);
    }

    fn clear(&mut self) {
        for (name, value) in self.dns.drain(..) {
            self.challenges.remove_dns01(&name, &value);
        }
        for token in self.http.drain(..) {
            self.challenges.remove_http01(&token);
        }
    }
}

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        // An order cancelled midway (a timeout) leaves nothing behind either.
        self.clear();
    }
}

fn ca(what: &'static str) -> impl Fn(instant_acme::Error) -> AcmeError {
    move |e| AcmeError::Ca {
        what: format!("{what}: {e}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `host` lowercased without the final dot, if a certificate can name it (and a
/// file can be named after it).
fn check_host(host: &str) -> Result<String, AcmeError> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(h)
    } else {
        Err(AcmeError::BadHost {
            host: host.to_owned(),
        })
    }
}

/// Writes `bytes` to `path` through a temporary file, with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AcmeError> {
    let result = vmkit_core::write_file_atomic(path, bytes, mode);
    result.map_err(|e| AcmeError::Io {
        what: format!("writing {}", path.display()),
        source: e,
    })
}

/// The wait after the `failures`-th failure in a row: `min` doubled each time, at
/// most `max`, then scaled by `0.5 + jitter / 2` (`jitter` in `0..1`) so that
/// many hosts do not retry in step.
fn retry_delay(min: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let doubled = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let capped = doubled.min(max);
    capped.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// When the first certificate of a PEM chain expires.
fn chain_not_after(chain_pem: &str) -> Option<SystemTime> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    der_not_after(leaf.as_ref())
}

/// The `notAfter` of a DER certificate (RFC 5280 4.1: Certificate → TBSCertificate
/// → [version], serialNumber, signature, issuer, validity).
fn der_not_after(der: &[u8]) -> Option<SystemTime> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (mut tbs, _) = der_element(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs, 0xa0)?.1;
    }
    let (_, rest) = der_element(tbs, 0x02)?;
    let (_, rest) = der_element(rest, 0x30)?;
    let (_, rest) = der_element(rest, 0x30)?;
    let (validity, _) = der_element(rest, 0x30)?;
    let not_before_tag = *validity.first()?;
    let (_, rest) = der_element(validity, not_before_tag)?;
    let tag = *rest.first()?;
    let (time, _) = der_element(rest, tag)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let digits = |s: &str| s.parse::<u32>().ok();
    let (year, rest) = match tag {
        // UTCTime: YYMMDDHHMMSS, 1950–2049.
        0x17 if text.len() == 12 => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        // GeneralizedTime: YYYYMMDDHHMMSS.
        0x18 if text.len() == 14 => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| digits(&rest[2 * i..2 * i + 2]);
    let month = time::Month::try_from(u8::try_from(field(0)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(year).ok()?,
        month,
        u8::try_from(field(1)?).ok()?,
    )
    .ok()?;
    let at = date
        .with_hms(
            u8::try_from(field(2)?).ok()?,
            u8::try_from(field(3)?).ok()?,
            u8::try_from(field(4)?).ok()?,
        )
        .ok()?
        .assume_utc();
    let secs = u64::try_from(at.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The contents of the DER element of `tag` at the start of `input`, and what
/// follows it.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::https::tls::LocalCa;

    fn issuer(dir: &Path) -> Arc<AcmeIssuer> {
        let store = CertStore::new("vm.test", None).unwrap();
        let secrets = Arc::new(SecretBox::from_bytes(&[3; 32]));
        let config = AcmeConfig::new(dir.join("acme")).rate_limit(2, Duration::from_secs(3600));
        AcmeIssuer::new(
            config,
            "vm.test",
            store,
            Arc::new(AcmeChallenges::new()),
            secrets,
        )
        .unwrap()
    }

    #[test]
    fn the_expiry_is_read_from_the_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let cert = ca.issue(&["web.vm.test".into()]).unwrap();
        let read = chain_not_after(&cert.chain_pem).unwrap();
        let expected = cert
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(
            read.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            expected
        );
        assert_eq!(chain_not_after("not a certificate"), None);
        assert_eq!(der_not_after(&[0x30, 0x82, 0xff]), None);
    }

    #[test]
    fn the_retry_delay_doubles_within_its_bounds_with_jitter() {
        let min = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        assert_eq!(retry_delay(min, max, 1, 1.0), min);
        assert_eq!(retry_delay(min, max, 1, 0.0), min / 2);
        assert_eq!(retry_delay(min, max, 3, 1.0), min * 4);
        assert_eq!(retry_delay(min, max, 40, 1.0), max);
        assert_eq!(retry_delay(min, max, 40, 0.0), max / 2);
    }

    #[test]
    fn orders_for_one_domain_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = issuer(dir.path());
        issuer.take_order_slot("app.example.com").unwrap();
        issuer.take_order_slot("app.example.com").unwrap();
        let err = issuer.take_order_slot("app.example.com").unwrap_err();
        assert!(
            matches!(err, AcmeError::RateLimited { orders: 2, .. }),
            "{err}"
        );
        issuer.take_order_slot("other.example.com").unwrap();
    }

    #[test]
    fn stored_certificates_are_served_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let first = issuer(dir.path());
        let wildcard = ca.issue(&["vm.test".into(), "*.vm.test".into()]).unwrap();
        let custom = ca.issue(&["app.example.com".into()]).unwrap();
        first.write_stored(&Target::Wildcard, &wildcard).unwrap();
        first
            .write_stored(&Target::Custom("app.example.com".into()), &custom)
            .unwrap();
        let key = dir.path().join("acme/certs/custom/app.example.com.key");
        let mode = std::fs::metadata(key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let again = issuer(dir.path());
        assert_eq!(again.load_stored().unwrap(), 2);
        assert!(again.store.default_expiry().is_some());
        assert!(again.store.expiry_for("app.example.com").is_some());
        assert_eq!(
            again.targets(),
            [Target::Wildcard, Target::Custom("app.example.com".into())]
        );
    }

    #[test]
    fn a_certificate_is_due_renew_before_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let issuer = issuer(dir.path());
        let now = Instant::now();
        assert_eq!(issuer.due(&Target::Wildcard, None, now), now);
        // 90 days left, renewed 30 days before: not due now.
        issuer
            .install(&Target::Wildcard, &ca.issue(&["vm.test".into()]).unwrap())
            .unwrap();
        assert!(issuer.due(&Target::Wildcard, None, now) > now + Duration::from_secs(60));
    }

    #[test]
    fn host_names_that_are_not_dns_names_are_refused() {
        for bad in ["", "../etc", "a..b", "-a.com", "a b.com", "*.x.com"] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
        assert_eq!(check_host("App.Example.com.").unwrap(), "app.example.com");
    }
}
