//! Certificates: the local CA (`tls = "self-signed"`) and the store the TLS
//! listener picks a certificate from at each handshake.
//!
//! [`CertStore`] implements rustls' [`ResolvesServerCert`]: a handshake takes the
//! certificate set for its SNI name (a custom domain's), else one the local CA
//! issues for that exact host under the domain (made on first use, kept), else the
//! default (the apex and wildcard). Replacing a certificate ([`CertStore::set_default`],
//! [`CertStore::set_for`]) takes effect at the next handshake; connections already
//! open keep the one they began with, so a renewal drops nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::HttpsError;

/// The local CA's key, in the data directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The local CA's certificate, in the data directory: what users add to their
/// browser's trust store (`vmkit ca` prints it).
pub const CA_CERT_FILE: &str = "ca.crt";

/// How long a certificate the local CA issues is valid (browsers cap server
/// certificates at 398 days; a restart issues new ones).
const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long the local CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Hosts the local CA keeps a certificate for at once; past it the oldest go.
const MAX_ISSUED: usize = 4096;

/// A certificate chain and its key, as PEM.
#[derive(Clone)]
#[non_exhaustive]
pub struct IssuedCert {
    /// The leaf, then its issuers, as PEM.
    pub chain_pem: String,
    /// The leaf's private key (PKCS#8), as PEM.
    pub key_pem: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

impl IssuedCert {
    /// A chain and key read from PEM, expiring at `not_after`.
    pub fn new(chain_pem: String, key_pem: String, not_after: SystemTime) -> Self {
        Self {
            chain_pem,
            key_pem,
            not_after,
        }
    }
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate authority of this host (`tls = "self-signed"`): an ECDSA P-256
/// key and a self-signed certificate kept in a directory (the data directory),
/// made on first start. Users trust it once (`vmkit ca` prints it); it issues the
/// certificates of the apex, `*.domain` and each `NAME.domain`.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_path: PathBuf,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads the CA from `dir` (`ca.key`, `ca.crt`), or makes it there.
    pub fn load_or_create(dir: &Path) -> Result<Self, HttpsError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let io = |what: String| move |source| HttpsError::Io { what, source };
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| HttpsError::Certificate {
                what: format!(
                    "the local CA key {} is unreadable ({e}); move it away to make a new CA \
                     (users then trust the new {CA_CERT_FILE})",
                    key_path.display()
                ),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate().map_err(cert_error("making the local CA key"))?;
                vmkit_core::write_file_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(io(format!("writing {}", key_path.display())))?;
                // A new key makes any old certificate stale.
                let _ = std::fs::remove_file(&cert_path);
                key
            }
            Err(e) => return Err(io(format!("reading {}", key_path.display()))(e)),
        };
        let params = ca_params(&key);
        let cert_pem = match std::fs::read_to_string(&cert_path) {
            Ok(pem) if pem.contains("BEGIN CERTIFICATE") => pem,
            Ok(_) | Err(_) => {
                let cert = params
                    .self_signed(&key)
                    .map_err(cert_error("signing the local CA certificate"))?;
                let pem = cert.pem();
                std::fs::write(&cert_path, &pem)
                    .map_err(io(format!("writing {}", cert_path.display())))?;
                pem
            }
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            cert_path,
        })
    }

    /// The CA certificate, as PEM: what users add to their trust store.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Where the CA certificate is kept.
    pub fn certificate_path(&self) -> &Path {
        &self.cert_path
    }

    /// A certificate for `names` (DNS names, `*.` wildcards allowed), with a new
    /// key, signed by this CA.
    pub fn issue(&self, names: &[String]) -> Result<IssuedCert, HttpsError> {
        let key = KeyPair::generate().map_err(cert_error("making a certificate key"))?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(cert_error("naming a certificate"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        let not_after = now + LEAF_VALIDITY;
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_error("signing a certificate"))?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// The CA's parameters, the same at every load (its name derives from its key),
/// so that what it signs names the certificate users trust.
fn ca_params(key: &KeyPair) -> CertificateParams {
    use ring::digest::{SHA256, digest};
    let id = digest(&SHA256, rcgen::PublicKeyData::der_bytes(key));
    let short: String = id.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vmkit");
    dn.push(DnType::CommonName, format!("vmkit local CA {short}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Fixed dates, so a reload signs with the same issuer as the stored certificate.
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after =
        (SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_600) + CA_VALIDITY).into();
    params
}

fn cert_error(what: &'static str) -> impl Fn(rcgen::Error) -> HttpsError {
    move |e| HttpsError::Certificate {
        what: format!("{what}: {e}"),
    }
}

/// A chain and key as rustls serves them.
pub fn certified_key(cert: &IssuedCert) -> Result<Arc<CertifiedKey>, HttpsError> {
    let bad = |what: &str| HttpsError::Certificate {
        what: what.to_owned(),
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&format!("the certificate chain is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(bad("the certificate chain is empty"));
    }
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| bad(&format!("the certificate key is not PEM: {e}")))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| bad(&format!("the certificate key cannot sign: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

/// One certificate in the store, with when it expires.
#[derive(Clone)]
struct Entry {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// The certificates the TLS listener serves, replaceable while it runs.
pub struct CertStore {
    domain: String,
    ca: Option<LocalCa>,
    default: RwLock<Option<Entry>>,
    custom: RwLock<HashMap<String, Entry>>,
    issued: RwLock<HashMap<String, Entry>>,
    /// Custom domains the local CA certifies (at their first handshake).
    local_hosts: RwLock<HashSet<String>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("domain", &self.domain)
            .field("local_ca", &self.ca.is_some())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// An empty store for `domain`; with `ca`, hosts under the domain get a
    /// certificate of their own from it at their first handshake, and the default
    /// (apex and wildcard) is issued now.
    pub fn new(domain: &str, ca: Option<LocalCa>) -> Result<Arc<Self>, HttpsError> {
        let store = Self {
            domain: domain.trim_matches('.').to_ascii_lowercase(),
            ca,
            default: RwLock::new(None),
            custom: RwLock::new(HashMap::new()),
            issued: RwLock::new(HashMap::new()),
            local_hosts: RwLock::new(HashSet::new()),
        };
        if let Some(ca) = &store.ca {
            let names = vec![store.domain.clone(), format!("*.{}", store.domain)];
            store.set_default(&ca.issue(&names)?)?;
        }
        Ok(Arc::new(store))
    }

    /// The local CA, when the store has one.
    pub fn local_ca(&self) -> Option<&LocalCa> {
        self.ca.as_ref()
    }

    /// Serves `cert` for the apex, the wildcard and any name without its own.
    pub fn set_default(&self, cert: &IssuedCert) -> Result<(), HttpsError> {
        let entry = Entry {
            key: certified_key(cert)?,
            not_after: cert.not_after,
        };
        *self.default.write().unwrap_or_else(|e| e.into_inner()) = Some(entry);
        // Certificates issued per host were for the old default's sake.
        self.issued
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }

    /// Serves `cert` for `host` (a custom domain).
    pub fn set_for(&self, host: &str, cert: &IssuedCert) -> Result<(), HttpsError> {
        let entry = Entry {
            key: certified_key(cert)?,
            not_after: cert.not_after,
        };
        self.custom
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.trim_end_matches('.').to_ascii_lowercase(), entry);
        Ok(())
    }

    /// Stops serving a certificate of its own for `host`.
    pub fn remove(&self, host: &str) {
        self.custom
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host.trim_end_matches('.').to_ascii_lowercase());
    }

    /// Has the local CA (when the store has one) certify the custom domain `host` at
    /// its first handshake, as it does the VM hosts.
    pub fn add_local_host(&self, host: &str) {
        self.local_hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.trim_end_matches('.').to_ascii_lowercase());
    }

    /// Whether the local CA certifies the custom domain `host`.
    pub fn certifies_locally(&self, host: &str) -> bool {
        self.ca.is_some()
            && self
                .local_hosts
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&host.trim_end_matches('.').to_ascii_lowercase())
    }

    /// Stops certifying the custom domain `host` from the local CA.
    pub fn remove_local_host(&self, host: &str) {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.local_hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host);
        self.issued
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host);
    }

    /// When the default certificate expires, if there is one.
    pub fn default_expiry(&self) -> Option<SystemTime> {
        self.default
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| e.not_after)
    }

    /// When `host`'s own certificate expires, if it has one.
    pub fn expiry_for(&self, host: &str) -> Option<SystemTime> {
        self.custom
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&host.to_ascii_lowercase())
            .map(|e| e.not_after)
    }

    /// Whether `host` is under the domain with a single label (`NAME.domain`).
    fn is_vm_host(&self, host: &str) -> bool {
        host.strip_suffix(self.domain.as_str())
            .and_then(|l| l.strip_suffix('.'))
            .is_some_and(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    }

    /// A certificate of the local CA for `host`, issued now or earlier.
    fn issued_for(&self, ca: &LocalCa, host: &str) -> Option<Arc<CertifiedKey>> {
        let now = SystemTime::now();
        if let Some(entry) = self
            .issued
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .filter(|e| e.not_after > now + Duration::from_secs(24 * 3600))
        {
            return Some(entry.key.clone());
        }
        let names = match self.is_vm_host(host) {
            true => vec![host.to_owned(), format!("*.{}", self.domain)],
            false => vec![host.to_owned()],
        };
        let cert = match ca.issue(&names) {
            Ok(cert) => cert,
            Err(e) => {
                tracing::warn!(host, error = %e, "issuing a certificate failed");
                return None;
            }
        };
        let key = certified_key(&cert).ok()?;
        let mut issued = self.issued.write().unwrap_or_else(|e| e.into_inner());
        if issued.len() >= MAX_ISSUED {
            issued.clear();
        }
        issued.insert(
            host.to_owned(),
            Entry {
                key: key.clone(),
                not_after: cert.not_after,
            },
        );
        Some(key)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name() {
            let sni = sni.to_ascii_lowercase();
            if let Some(entry) = self
                .custom
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&sni)
            {
                return Some(entry.key.clone());
            }
            // Browsers refuse a wildcard directly under a one-label domain
            // (`*.localhost`): give each VM host a certificate naming it.
            if let Some(ca) = &self.ca
                && (self.is_vm_host(&sni)
                    || self
                        .local_hosts
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&sni))
                && let Some(key) = self.issued_for(ca, &sni)
            {
                return Some(key);
            }
        }
        self.default
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| e.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_ca_survives_a_restart_and_signs_as_the_same_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalCa::load_or_create(dir.path()).unwrap();
        let again = LocalCa::load_or_create(dir.path()).unwrap();
        assert_eq!(first.certificate_pem(), again.certificate_pem());
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let leaf = again.issue(&["web.example.test".into()]).unwrap();
        assert!(leaf.chain_pem.ends_with(first.certificate_pem()));
        // The leaf verifies against the CA certificate written at the first start.
        let roots = {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(first.certificate_pem().as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            Arc::new(roots)
        };
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let name = rustls::pki_types::ServerName::try_from("web.example.test").unwrap();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            &chain[0],
            &chain[1..],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
        let other = rustls::pki_types::ServerName::try_from("other.example.test").unwrap();
        assert!(
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &chain[0],
                &chain[1..],
                &other,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .is_err()
        );
    }

    #[test]
    fn a_corrupt_ca_key_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
        let err = LocalCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("move it away"), "{err}");
    }

    #[test]
    fn vm_hosts_are_single_labels_under_the_domain() {
        let store = CertStore::new("vm.test", None).unwrap();
        assert!(store.is_vm_host("web.vm.test"));
        assert!(store.is_vm_host("web--8080.vm.test"));
        assert!(!store.is_vm_host("vm.test"));
        assert!(!store.is_vm_host("a.web.vm.test"));
        assert!(!store.is_vm_host("webvm.test"));
        assert!(!store.is_vm_host("web.other.test"));
    }
}
