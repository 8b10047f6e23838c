//! ACME challenge answers, shared by whoever asks for a certificate and whoever
//! answers the CA: the HTTPS edge serves HTTP-01 tokens at
//! `/.well-known/acme-challenge/TOKEN`, the DNS server serves DNS-01 values as TXT
//! records of `_acme-challenge.NAME`.

use std::collections::HashMap;
use std::sync::Mutex;

/// Challenge answers being asked for; cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct AcmeChallenges {
    http01: Mutex<HashMap<String, String>>,
    dns01: Mutex<HashMap<String, Vec<String>>>,
}

impl AcmeChallenges {
    /// No challenges.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers the HTTP-01 challenge `token` with `key_authorization`.
    pub fn set_http01(&self, token: &str, key_authorization: &str) {
        lock(&self.http01).insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Stops answering the HTTP-01 challenge `token`.
    pub fn remove_http01(&self, token: &str) {
        lock(&self.http01).remove(token);
    }

    /// The answer to the HTTP-01 challenge `token`, if it is being asked.
    pub fn http01(&self, token: &str) -> Option<String> {
        lock(&self.http01).get(token).cloned()
    }

    /// Adds `value` to the TXT records of `name` (`_acme-challenge.example.com`,
    /// any case, with or without the final dot). A name may have several (the apex
    /// and the wildcard are validated through the same name).
    pub fn add_dns01(&self, name: &str, value: &str) {
        let values = &mut *lock(&self.dns01);
        let list = values.entry(normalize(name)).or_default();
        if !list.iter().any(|v| v == value) {
            list.push(value.to_owned());
        }
    }

    /// Removes `value` from the TXT records of `name`.
    pub fn remove_dns01(&self, name: &str, value: &str) {
        let values = &mut *lock(&self.dns01);
        let key = normalize(name);
        if let Some(list) = values.get_mut(&key) {
            list.retain(|v| v != value);
            if list.is_empty() {
                values.remove(&key);
            }
        }
    }

    /// The TXT records of `name` being asked for.
    pub fn dns01(&self, name: &str) -> Vec<String> {
        lock(&self.dns01)
            .get(&normalize(name))
            .cloned()
            .unwrap_or_default()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_until_removed() {
        let c = AcmeChallenges::new();
        c.set_http01("tok", "tok.thumb");
        assert_eq!(c.http01("tok").as_deref(), Some("tok.thumb"));
        c.remove_http01("tok");
        assert_eq!(c.http01("tok"), None);
        c.add_dns01("_acme-challenge.VM.test.", "a");
        c.add_dns01("_acme-challenge.vm.test", "b");
        c.add_dns01("_acme-challenge.vm.test", "b");
        assert_eq!(c.dns01("_acme-challenge.vm.test"), ["a", "b"]);
        c.remove_dns01("_acme-challenge.vm.test", "a");
        c.remove_dns01("_acme-challenge.vm.test", "b");
        assert!(c.dns01("_acme-challenge.vm.test").is_empty());
    }
}
