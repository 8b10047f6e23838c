//! A fake [`DnsLookup`]: TXT and CNAME records tests publish, and lookups that fail
//! on demand.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::domain::{DnsLookup, LookupError};

/// DNS records held in memory. Clones share the records.
#[derive(Clone, Debug, Default)]
pub struct FakeDns {
    records: Arc<Mutex<Records>>,
}

#[derive(Debug, Default)]
struct Records {
    txt: BTreeMap<String, Vec<String>>,
    cname: BTreeMap<String, Vec<String>>,
    failure: Option<String>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl FakeDns {
    /// No records.
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a TXT record `value` at `name` (beside any there).
    pub fn add_txt(&self, name: &str, value: &str) {
        self.records()
            .txt
            .entry(key(name))
            .or_default()
            .push(value.to_owned());
    }

    /// Makes `name` a CNAME to `target` (replacing one there).
    pub fn set_cname(&self, name: &str, target: &str) {
        self.records()
            .cname
            .insert(key(name), vec![target.to_owned()]);
    }

    /// Removes every record at `name`.
    pub fn remove(&self, name: &str) {
        let mut records = self.records();
        records.txt.remove(&key(name));
        records.cname.remove(&key(name));
    }

    /// Makes every lookup fail with `message` (`None`: answer again).
    pub fn fail_with(&self, message: Option<&str>) {
        self.records().failure = message.map(str::to_owned);
    }
}

#[async_trait]
impl DnsLookup for FakeDns {
    async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let records = self.records();
        if let Some(message) = &records.failure {
            return Err(LookupError(message.clone()));
        }
        Ok(records.txt.get(&key(name)).cloned().unwrap_or_default())
    }

    async fn cname(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let records = self.records();
        if let Some(message) = &records.failure {
            return Err(LookupError(message.clone()));
        }
        Ok(records.cname.get(&key(name)).cloned().unwrap_or_default())
    }
}
