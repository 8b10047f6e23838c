//! Cookies and the signed identity assertion.
//!
//! The session cookie is `__Host-vmkit`: the `__Host-` prefix makes browsers hold it
//! for the exact host only (no `Domain`, `Path=/`, `Secure`), so a VM can neither
//! read nor set another VM's cookie. Each port of a VM has a host of its own
//! (`NAME--PORT.domain`), so each port has its own cookie too.
//!
//! The assertion is a JWT (ES256) for one host, valid a few minutes, signed with a
//! P-256 key kept in the data directory and published as a JWKS at
//! `https://domain/.well-known/jwks.json`, so an app can check who is calling
//! instead of trusting a header.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper::HeaderMap;
use hyper::header::{COOKIE, HeaderValue};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

use super::HttpsError;

/// The session cookie, on the apex and on each VM host.
pub const SESSION_COOKIE: &str = "__Host-vmkit";
/// The cookie that keeps a share link's secret on the VM host it was used on.
pub const SHARE_COOKIE: &str = "__Host-vmkit-share";
/// The signing key of assertions, in the data directory.
pub const JWT_KEY_FILE: &str = "https_assertion.key";
/// How long an assertion is valid.
pub const ASSERTION_TTL: Duration = Duration::from_secs(300);

/// The value of cookie `name` in the request's `Cookie` headers, if set once; a
/// cookie set twice (a VM's page may try to shadow ours) counts as not set.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut found = None;
    for value in headers.get_all(COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if k.trim() == name {
                if found.is_some() {
                    return None;
                }
                found = Some(v.trim().trim_matches('"'));
            }
        }
    }
    found
}

/// Removes the proxy's own cookies from the request's `Cookie` headers, keeping
/// every other cookie as it was.
pub fn strip_own_cookies(headers: &mut HeaderMap) {
    let values: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    headers.remove(COOKIE);
    let mut kept = Vec::new();
    for value in &values {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            let name = pair.split('=').next().unwrap_or("").trim();
            if name.is_empty() || name.starts_with("__Host-vmkit") {
                continue;
            }
            kept.push(pair.trim().to_owned());
        }
    }
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(COOKIE, value);
    }
}

/// A `Set-Cookie` value for `name`: host-only, HttpOnly, Secure, SameSite=Lax,
/// living `max_age` (a zero age deletes it).
pub fn set_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
        max_age.as_secs()
    )
}

/// A `Set-Cookie` value as a VM sent it, without any `Domain` attribute, so that
/// it stays on the VM's own host.
pub fn without_domain(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .filter(|attr| {
            !attr
                .trim()
                .get(..6)
                .is_some_and(|a| a.eq_ignore_ascii_case("domain"))
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Who is signed in, as the assertion and headers say it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The user's id.
    pub id: u64,
    /// Their handle.
    pub handle: String,
    /// Their email, when known.
    pub email: Option<String>,
}

/// Signs assertions, and publishes their public key.
pub struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the key from `dir`, or makes it there (mode 0600).
    pub fn load_or_create(dir: &Path) -> Result<Self, HttpsError> {
        let path = dir.join(JWT_KEY_FILE);
        let rng = SystemRandom::new();
        let pkcs8 = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| HttpsError::Certificate {
                        what: "making the assertion signing key failed".into(),
                    })?;
                vmkit_core::write_file_atomic(&path, doc.as_ref(), 0o600).map_err(|source| {
                    HttpsError::Io {
                        what: format!("writing {}", path.display()),
                        source,
                    }
                })?;
                doc.as_ref().to_vec()
            }
            Err(source) => {
                return Err(HttpsError::Io {
                    what: format!("reading {}", path.display()),
                    source,
                });
            }
        };
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| HttpsError::Certificate {
                what: format!(
                    "the assertion key {} is unreadable ({e}); move it away to make a new one",
                    path.display()
                ),
            })?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
        Ok(Self { key, kid, rng })
    }

    /// The JWKS document with the public key.
    pub fn jwks(&self) -> String {
        // An uncompressed point: 0x04, then x and y, 32 bytes each.
        let point = self.key.public_key().as_ref();
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "alg": "ES256",
                "use": "sig",
                "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            }]
        })
        .to_string()
    }

    /// An assertion that `who` is calling `audience` (`https://host`), issued by
    /// `issuer` (`https://domain`), valid for [`ASSERTION_TTL`].
    pub fn assertion(&self, who: &Identity, issuer: &str, audience: &str) -> Option<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let mut claims = serde_json::json!({
            "iss": issuer,
            "aud": audience,
            "sub": who.id.to_string(),
            "handle": who.handle,
            "iat": now,
            "nbf": now.saturating_sub(30),
            "exp": now + ASSERTION_TTL.as_secs(),
        });
        if let Some(email) = &who.email {
            claims["email"] = serde_json::Value::String(email.clone());
        }
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.key.sign(&self.rng, signing_input.as_bytes()).ok()?;
        Some(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn a_cookie_set_twice_counts_as_not_set() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; __Host-vmkit=s1"));
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("s1"));
        h.append(COOKIE, HeaderValue::from_static("__Host-vmkit=s2"));
        assert_eq!(cookie(&h, SESSION_COOKIE), None);
        assert_eq!(cookie(&h, "a"), Some("1"));
    }

    #[test]
    fn own_cookies_never_reach_the_vm() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("app=x; __Host-vmkit=secret; __Host-vmkit-share=vms_y"),
        );
        h.append(COOKIE, HeaderValue::from_static("theme=dark"));
        strip_own_cookies(&mut h);
        assert_eq!(h.get(COOKIE).unwrap(), "app=x; theme=dark");
        let mut only = HeaderMap::new();
        only.append(COOKIE, HeaderValue::from_static("__Host-vmkit=secret"));
        strip_own_cookies(&mut only);
        assert!(only.get(COOKIE).is_none());
    }

    #[test]
    fn a_vm_cannot_widen_its_cookies() {
        assert_eq!(
            without_domain("sid=1; Domain=.vm.test; Path=/; domain=vm.test; Secure"),
            "sid=1; Path=/; Secure"
        );
        assert_eq!(without_domain("sid=1"), "sid=1");
    }

    #[test]
    fn assertions_verify_with_the_published_key_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load_or_create(dir.path()).unwrap();
        let again = Signer::load_or_create(dir.path()).unwrap();
        assert_eq!(signer.jwks(), again.jwks());
        let who = Identity {
            id: 7,
            handle: "alice".into(),
            email: Some("a@example.test".into()),
        };
        let jwt = again
            .assertion(&who, "https://vm.test", "https://web.vm.test")
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let jwks: serde_json::Value = serde_json::from_str(&signer.jwks()).unwrap();
        let key = &jwks["keys"][0];
        let mut point = vec![4u8];
        point.extend(URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap());
        point.extend(URL_SAFE_NO_PAD.decode(key["y"].as_str().unwrap()).unwrap());
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(input.as_bytes(), &signature)
            .unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "7");
        assert_eq!(claims["aud"], "https://web.vm.test");
        assert_eq!(claims["email"], "a@example.test");
        // A changed claim no longer verifies.
        let forged = format!(
            "{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims.to_string().replace("\"7\"", "\"1\""))
        );
        assert!(
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                .verify(forged.as_bytes(), &signature)
                .is_err()
        );
    }
}
