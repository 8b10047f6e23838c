//! Operation locks by key: one async mutex per VM name, snapshot name or idempotency
//! key, made on first use and dropped when nobody holds or waits for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex as StdMutex};

use tokio::sync::{Mutex, OwnedMutexGuard};

type Table<K> = Arc<StdMutex<HashMap<K, Arc<Mutex<()>>>>>;

/// A lock per key.
pub(super) struct KeyedLocks<K> {
    table: Table<K>,
}

impl<K: Hash + Eq + Clone> KeyedLocks<K> {
    pub(super) fn new() -> Self {
        Self {
            table: Arc::new(StdMutex::new(HashMap::new())),
        }
    }

    /// Waits for `key`'s lock; it is held until the guard drops.
    pub(super) async fn lock(&self, key: &K) -> KeyGuard<K> {
        let lock = {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            table.entry(key.clone()).or_default().clone()
        };
        KeyGuard {
            guard: Some(lock.lock_owned().await),
            key: key.clone(),
            table: self.table.clone(),
        }
    }

    /// How many keys have a lock now (held or waited for).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Holds one key's lock; drops the table's entry when no one else waits.
pub(super) struct KeyGuard<K: Hash + Eq> {
    guard: Option<OwnedMutexGuard<()>>,
    key: K,
    table: Table<K>,
}

impl<K: Hash + Eq> Drop for KeyGuard<K> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = table.get(&self.key) {
            // Only the table holds it: nobody waits.
            if Arc::strong_count(lock) == 1 {
                table.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_key_and_no_entry_left_once_all_are_done() {
        let locks = Arc::new(KeyedLocks::new());
        let first = locks.lock(&"a").await;
        let other = locks.lock(&"b").await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { drop(locks.lock(&"a").await) })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a second holder of one key waits");
        drop(first);
        waiter.await.unwrap();
        drop(other);
        assert_eq!(locks.len(), 0);
    }
}
