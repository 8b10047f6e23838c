//! Certificates for custom domains, kept in step with the state store: each domain
//! attached with `domain add` gets one (from the local CA at its first handshake,
//! or from ACME by HTTP-01 soon after), and a detached domain, or one whose VM is
//! deleted, stops being certified.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::error::RecvError;
use vmkit_core::{EventKind, Manager};

use super::acme::AcmeIssuer;
use super::tls::CertStore;

/// The custom domains being certified, and where their certificates come from.
pub struct DomainCerts {
    certs: Arc<CertStore>,
    acme: Option<Arc<AcmeIssuer>>,
    current: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for DomainCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainCerts")
            .field("acme", &self.acme.is_some())
            .finish_non_exhaustive()
    }
}

impl DomainCerts {
    /// Certifies custom domains in `certs`: from ACME through `acme` when given,
    /// else from `certs`' local CA.
    /// The domains an earlier run left certified in `acme` count as current, so
    /// that one detached while the daemon was down stops being renewed at the first
    /// sync.
    pub fn new(certs: Arc<CertStore>, acme: Option<Arc<AcmeIssuer>>) -> Arc<Self> {
        let current = acme
            .as_ref()
            .map(|a| a.custom_domains())
            .unwrap_or_default();
        Arc::new(Self {
            certs,
            acme,
            current: Mutex::new(current),
        })
    }

    /// The domains certified now.
    pub fn hosts(&self) -> BTreeSet<String> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Certifies exactly `hosts`: new ones are added, gone ones removed.
    pub fn sync(&self, hosts: BTreeSet<String>) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        for gone in current.difference(&hosts) {
            tracing::info!(host = %gone, "custom domain detached: no longer certified");
            match &self.acme {
                Some(acme) => acme.remove_custom_domain(gone),
                None => self.certs.remove_local_host(gone),
            }
        }
        for new in hosts.difference(&current) {
            tracing::info!(host = %new, "custom domain attached: certifying it");
            match &self.acme {
                Some(acme) => {
                    if let Err(e) = acme.add_custom_domain(new) {
                        tracing::warn!(host = %new, error = %e, "cannot certify a custom domain");
                    }
                }
                None => self.certs.add_local_host(new),
            }
        }
        *current = hosts;
    }

    /// Reads the attached domains from `manager`'s store and [`Self::sync`]s.
    pub async fn sync_from(&self, manager: &Manager) {
        match manager.backends().store.list_domains(None).await {
            Ok(domains) => self.sync(domains.into_iter().map(|d| d.host).collect()),
            Err(e) => tracing::warn!(error = %e, "cannot read the custom domains"),
        }
    }

    /// Syncs now, then again whenever a domain is attached or detached or a VM is
    /// deleted, until `shutdown` completes.
    pub async fn run(self: Arc<Self>, manager: Manager, shutdown: impl Future<Output = ()>) {
        let mut events = manager.subscribe();
        self.sync_from(&manager).await;
        tokio::pin!(shutdown);
        loop {
            let event = tokio::select! {
                _ = &mut shutdown => return,
                event = events.recv() => event,
            };
            match event {
                Ok(event) => {
                    if matches!(
                        event.kind,
                        EventKind::DomainAdded { .. }
                            | EventKind::DomainRemoved { .. }
                            | EventKind::Deleted
                    ) {
                        self.sync_from(&manager).await;
                    }
                }
                // Events were missed: read the store instead.
                Err(RecvError::Lagged(_)) => self.sync_from(&manager).await,
                Err(RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_ca_certifies_exactly_the_attached_domains() {
        let dir = tempfile::tempdir().unwrap();
        let ca = super::super::tls::LocalCa::load_or_create(dir.path()).unwrap();
        let certs = CertStore::new("vm.test", Some(ca)).unwrap();
        let domains = DomainCerts::new(certs.clone(), None);
        domains.sync(["a.example.com".to_owned(), "b.example.com".to_owned()].into());
        assert!(certs.certifies_locally("a.example.com"));
        assert!(certs.certifies_locally("b.example.com"));
        domains.sync(["b.example.com".to_owned()].into());
        assert!(!certs.certifies_locally("a.example.com"));
        assert!(certs.certifies_locally("b.example.com"));
        assert_eq!(domains.hosts(), ["b.example.com".to_owned()].into());
    }

    #[test]
    fn with_acme_a_domain_left_from_an_earlier_run_stops_being_renewed_at_the_first_sync() {
        use super::super::acme::AcmeConfig;
        let dir = tempfile::tempdir().unwrap();
        let certs = CertStore::new("vm.test", None).unwrap();
        let issuer = AcmeIssuer::new(
            AcmeConfig::new(dir.path()),
            "vm.test",
            certs.clone(),
            Arc::new(crate::challenges::AcmeChallenges::new()),
            Arc::new(vmkit_core::SecretBox::from_bytes(&[7; 32])),
        )
        .unwrap();
        // As `load_stored` does for a certificate on disk.
        issuer.add_custom_domain("old.example.com").unwrap();
        let domains = DomainCerts::new(certs, Some(issuer.clone()));
        assert_eq!(domains.hosts(), ["old.example.com".to_owned()].into());
        domains.sync(["new.example.com".to_owned()].into());
        assert_eq!(
            issuer.custom_domains(),
            ["new.example.com".to_owned()].into()
        );
    }
}
