//! Custom domains: a host name outside the VM domain (`app.example.com`) that reaches
//! a VM's default web port, attached by the VM's owner once they prove they control
//! the name's DNS.
//!
//! The proof is either record a [`DomainProof`] names: a TXT record
//! `_vmkit-challenge.HOST` holding a value bound to the user, the host and this
//! gateway's VM domain, or `HOST` being a CNAME to `NAME.domain`. The records are
//! read through the [`DnsLookup`] seam ([`CustomDomains`] holds it); vmkit-net has
//! the resolver, `vmkit_core::testing` a fake.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::name::VmName;
use crate::time::Timestamp;
use crate::user::UserId;
use crate::vm::VmId;

/// The label under a custom host whose TXT record proves ownership.
pub const CHALLENGE_LABEL: &str = "_vmkit-challenge";

/// The prefix of the TXT value that proves ownership.
pub const CHALLENGE_PREFIX: &str = "vmkit-verify=";

/// A custom domain attached to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CustomDomain {
    /// The host name, lowercase, without a trailing dot.
    pub host: String,
    /// The VM it reaches.
    pub vm: VmId,
    /// Who attached it (the VM's owner then).
    pub owner: UserId,
    /// When it was attached.
    pub created_at: Timestamp,
}

impl CustomDomain {
    /// `host` attached to `vm` by `owner` now. `host` should have passed
    /// [`check_custom_host`].
    pub fn new(host: impl Into<String>, vm: VmId, owner: UserId) -> Self {
        Self {
            host: host.into(),
            vm,
            owner,
            created_at: Timestamp::now(),
        }
    }
}

/// Why a name cannot be a custom domain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// Not a DNS host name.
    #[error(
        "{0:?} is not a host name: give a full DNS name like app.example.com (letters, digits \
         and hyphens, labels joined by dots)"
    )]
    NotAHostName(String),
    /// A name under the gateway's own VM domain, which needs no attaching.
    #[error(
        "{host} is under this gateway's own domain {domain}, which reaches VMs by name \
         already; give a name of a domain you own"
    )]
    UnderVmDomain {
        /// The name given.
        host: String,
        /// The VM domain.
        domain: String,
    },
}

/// `host` as a custom domain is stored: lowercase, without a trailing dot; refused
/// when it is no DNS host name (at least two labels, each of 1 to 63 letters, digits
/// or inner hyphens, 253 characters at most, the last label not a number: no IP
/// addresses, no wildcards) or is the VM domain or under it.
pub fn check_custom_host(host: &str, vm_domain: &str) -> Result<String, DomainError> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    let bad = || DomainError::NotAHostName(host.clone());
    if host.is_empty() || host.len() > 253 {
        return Err(bad());
    }
    let labels: Vec<&str> = host.split('.').collect();
    if labels.len() < 2 {
        return Err(bad());
    }
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let domain = vm_domain.trim_matches('.').to_ascii_lowercase();
    if host == domain || host.ends_with(&format!(".{domain}")) {
        return Err(DomainError::UnderVmDomain { host, domain });
    }
    Ok(host)
}

/// The DNS records that prove a user owns a host, for attaching it to a VM: either
/// one will do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DomainProof {
    /// The custom host.
    pub host: String,
    /// The name of the TXT record: `_vmkit-challenge.HOST`.
    pub txt_name: String,
    /// The value it must hold: `vmkit-verify=...`, bound to the user, the host and
    /// this gateway's VM domain.
    pub txt_value: String,
    /// What `HOST` may be a CNAME to instead: `NAME.domain`.
    pub cname_target: String,
}

impl DomainProof {
    /// The proof `user` gives for attaching `host` to the VM `vm` of the gateway
    /// serving `vm_domain`.
    pub fn new(vm_domain: &str, user: UserId, host: &str, vm: &VmName) -> Self {
        let domain = vm_domain.trim_matches('.').to_ascii_lowercase();
        let digest = Sha256::digest(format!("vmkit custom domain\n{domain}\n{}\n{host}", user.0));
        let value: String = digest[..20].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            host: host.to_owned(),
            txt_name: format!("{CHALLENGE_LABEL}.{host}"),
            txt_value: format!("{CHALLENGE_PREFIX}{value}"),
            cname_target: format!("{vm}.{domain}"),
        }
    }

    /// What to do, in a sentence or two, for people.
    pub fn instructions(&self) -> String {
        format!(
            "prove you control {host}: add the DNS record `{txt} TXT \"{value}\"` (or make \
             {host} a CNAME to {cname}), wait for it to be published, then ask again",
            host = self.host,
            txt = self.txt_name,
            value = self.txt_value,
            cname = self.cname_target,
        )
    }
}

/// A DNS lookup failed (not: found no records).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// Reads DNS records, for ownership proofs. A name without records of the type is
/// an empty answer, not an error.
#[async_trait]
pub trait DnsLookup: Send + Sync {
    /// The TXT records of `name`, each record's strings joined.
    async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError>;
    /// The targets of `name`'s CNAME records, without trailing dots.
    async fn cname(&self, name: &str) -> Result<Vec<String>, LookupError>;
}

/// How a proof was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProvenBy {
    /// The TXT record.
    Txt,
    /// The CNAME.
    Cname,
}

/// Custom domains on a gateway: its VM domain and how it reads DNS.
#[derive(Clone)]
pub struct CustomDomains {
    domain: String,
    lookup: Arc<dyn DnsLookup>,
}

impl std::fmt::Debug for CustomDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomDomains")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl CustomDomains {
    /// Custom domains beside the VM domain `vm_domain`, proven through `lookup`.
    pub fn new(vm_domain: &str, lookup: Arc<dyn DnsLookup>) -> Self {
        Self {
            domain: vm_domain.trim_matches('.').to_ascii_lowercase(),
            lookup,
        }
    }

    /// The VM domain.
    pub fn vm_domain(&self) -> &str {
        &self.domain
    }

    /// `host` checked and normalized ([`check_custom_host`]).
    pub fn check(&self, host: &str) -> Result<String, DomainError> {
        check_custom_host(host, &self.domain)
    }

    /// The proof `user` gives for attaching `host` to `vm`.
    pub fn proof(&self, user: UserId, host: &str, vm: &VmName) -> DomainProof {
        DomainProof::new(&self.domain, user, host, vm)
    }

    /// Whether DNS holds `proof` now, and how; `None` when neither record is there.
    /// A lookup that fails counts only when the other proves nothing either.
    pub async fn verify(&self, proof: &DomainProof) -> Result<Option<ProvenBy>, LookupError> {
        let txt = self.lookup.txt(&proof.txt_name).await;
        if let Ok(values) = &txt
            && values.iter().any(|v| v.trim() == proof.txt_value)
        {
            return Ok(Some(ProvenBy::Txt));
        }
        let cname = self.lookup.cname(&proof.host).await;
        if let Ok(targets) = &cname
            && targets.iter().any(|t| {
                t.trim_end_matches('.')
                    .eq_ignore_ascii_case(&proof.cname_target)
            })
        {
            return Ok(Some(ProvenBy::Cname));
        }
        txt?;
        cname?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked_and_normalized() {
        assert_eq!(
            check_custom_host("App.Example.COM.", "vm.test").unwrap(),
            "app.example.com"
        );
        for bad in [
            "",
            "localhost",
            "a..b",
            "-a.com",
            "a-.com",
            "*.example.com",
            "a_b.com",
            "10.0.0.1",
            "ex ample.com",
            "xn--bcher-kva.example.com/x",
        ] {
            assert!(
                matches!(
                    check_custom_host(bad, "vm.test"),
                    Err(DomainError::NotAHostName(_))
                ),
                "{bad:?}"
            );
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(check_custom_host(&long, "vm.test").is_err());
        for own in ["vm.test", "web.vm.test", "a.b.vm.test"] {
            assert!(matches!(
                check_custom_host(own, "vm.test"),
                Err(DomainError::UnderVmDomain { .. })
            ));
        }
        // A name that merely ends with the same letters is not under it.
        assert!(check_custom_host("myvm.test", "vm.test").is_ok());
    }

    #[test]
    fn proofs_are_bound_to_user_host_and_gateway() {
        let web = VmName::new("web").unwrap();
        let a = DomainProof::new("vm.test", UserId(1), "app.example.com", &web);
        assert_eq!(a.txt_name, "_vmkit-challenge.app.example.com");
        assert!(a.txt_value.starts_with(CHALLENGE_PREFIX));
        assert_eq!(a.txt_value.len(), CHALLENGE_PREFIX.len() + 40);
        assert_eq!(a.cname_target, "web.vm.test");
        assert_eq!(
            a,
            DomainProof::new("vm.test.", UserId(1), "app.example.com", &web)
        );
        for other in [
            DomainProof::new("vm.test", UserId(2), "app.example.com", &web),
            DomainProof::new("vm.test", UserId(1), "www.example.com", &web),
            DomainProof::new("other.test", UserId(1), "app.example.com", &web),
        ] {
            assert_ne!(a.txt_value, other.txt_value);
        }
        assert!(a.instructions().contains(&a.txt_value));
    }
}
