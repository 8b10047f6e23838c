//! vmkit's durable state in one redb file: [`RedbStore`].
//!
//! # Layout
//!
//! | table         | key                              | value                       |
//! |---------------|----------------------------------|-----------------------------|
//! | `meta`        | `&str` (`"schema_version"`)      | `u64`                       |
//! | `meta`        | `&str` (`"next_user_id"`)        | `u64`: lowest id not yet handed out |
//! | `users`       | user id `u64`                    | `User` as JSON              |
//! | `user_handles`| handle `&str`                    | user id `u64` (index)       |
//! | `ssh_keys`    | fingerprint `&str` (`SHA256:…`)  | `{user, key}` as JSON       |
//! | `quotas`      | user id `u64`                    | `Quota` as JSON             |
//! | `vms`         | VM id `u64`                      | `VmRecord` as JSON          |
//! | `vm_names`    | VM name `&str`                   | VM id `u64` (index)         |
//! | `shares`      | (VM id `u64`, `[target, access]` JSON `&str`) | `Share` as JSON |
//! | `leases`      | IPv4 address `u32`               | `IpLease` as JSON           |
//! | `lease_by_vm` | VM id `u64`                      | IPv4 address `u32` (index)  |
//! | `uids`        | VMM uid `u32`                    | VM id `u64`                 |
//! | `uid_by_vm`   | VM id `u64`                      | VMM uid `u32` (index)       |
//! | `api_keys`    | key id `&str`                    | `ApiKey` as JSON            |
//! | `invites`     | invite id `&str`                 | `Invite` as JSON (the code's hash, never the code) |
//! | `web_tokens`  | token hash `&str` (64 hex digits) | `WebToken` as JSON (sign-in links, sessions, host tickets) |
//! | `domains`     | custom domain host `&str`        | `CustomDomain` as JSON      |
//! | `events`      | sequence number `u64`            | `Event` as JSON             |
//!
//! The indexes are written in the same transactions as the tables they index.
//!
//! # Transactions and durability
//!
//! Every [`StateStore`](vmkit_core::StateStore) method is one redb transaction, run
//! on tokio's blocking thread pool. Writes commit with redb's default
//! [`redb::Durability::Immediate`]: when a method returns `Ok`, the change is on disk
//! (fsync'd) and survives a crash of the process or the host. A kill at any moment
//! leaves the file at its last commit; redb repairs its allocator state on the next
//! open.
//!
//! # Schema versions
//!
//! The file records its layout version ([`RedbStore::SCHEMA_VERSION`]). Opening an
//! older file migrates it in one transaction; opening a file written by a newer
//! vmkit fails with [`StoreError::SchemaTooNew`].
//!
//! # One process at a time
//!
//! redb locks the whole file while it is open. A second opener, in this process or
//! another, gets [`StoreError::Locked`].

mod ops;
mod schema;
mod tables;

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, StorageError, WriteTransaction,
};
use vmkit_core::StoreError;

use tables::{Context, META, SCHEMA_VERSION_KEY};

/// How to open a [`RedbStore`].
///
/// ```
/// use vmkit_store::{RedbConfig, RedbStore};
///
/// # fn main() -> Result<(), vmkit_core::StoreError> {
/// # let dir = std::env::temp_dir().join(format!("vmkit-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).ok();
/// let config = RedbConfig::new().cache_size(16 << 20);
/// let store = RedbStore::open_with(dir.join("state.redb"), &config)?;
/// assert_eq!(store.schema_version()?, RedbStore::SCHEMA_VERSION);
/// # drop(store);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedbConfig {
    /// Most memory redb may use to cache pages, in bytes. Default 64 MiB.
    pub cache_size: usize,
    /// Verify every page's checksum on open, not only after a crash. Default off:
    /// redb detects an unclean shutdown by itself.
    pub check_integrity_on_open: bool,
}

impl RedbConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the page cache limit in bytes.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes;
        self
    }

    /// Sets whether every open verifies the whole file.
    pub fn check_integrity_on_open(mut self, enabled: bool) -> Self {
        self.check_integrity_on_open = enabled;
        self
    }
}

impl Default for RedbConfig {
    fn default() -> Self {
        Self {
            cache_size: 64 << 20,
            check_integrity_on_open: false,
        }
    }
}

/// vmkit's state in one redb file; implements [`vmkit_core::StateStore`].
///
/// Share it behind an `Arc`; every method runs its transaction on tokio's blocking
/// pool, so it must be called from within a tokio runtime. The file is closed when
/// the store is dropped and no transaction started on its behalf still runs (a
/// cancelled call's transaction runs to its end).
///
/// ```
/// use std::sync::Arc;
/// use vmkit_core::{Handle, StateStore, User, UserId};
/// use vmkit_store::RedbStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), vmkit_core::StoreError> {
/// # let dir = std::env::temp_dir().join(format!("vmkit-doc2-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).ok();
/// let store: Arc<dyn StateStore> = Arc::new(RedbStore::open(dir.join("state.redb"))?);
/// let alice = Handle::new("alice").expect("a valid handle");
/// let alice = store.create_user(&User::new(UserId(0), alice), None).await?;
/// assert_eq!(store.get_user(alice.id).await?.map(|u| u.handle.to_string()), Some("alice".into()));
/// # drop(store);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(())
/// # }
/// ```
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Queues writers here, so that a burst of writes waits as futures rather than
    /// as blocking threads parked in `begin_write`. redb serialises writers anyway.
    writers: tokio::sync::Mutex<()>,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// The layout version this build reads and writes.
    pub const SCHEMA_VERSION: u64 = schema::CURRENT;

    /// Opens the state file at `path` with the default [`RedbConfig`], creating it if
    /// it does not exist and migrating it if it is older than
    /// [`Self::SCHEMA_VERSION`].
    ///
    /// Blocks: it reads (and after a crash repairs) the file.
    ///
    /// # Errors
    ///
    /// [`StoreError::Locked`] when another process (or another handle in this one)
    /// has the file open; [`StoreError::SchemaTooNew`] for a file from a newer vmkit;
    /// [`StoreError::Corrupt`] when the file or a record being migrated does not
    /// decode; [`StoreError::Backend`] for I/O errors.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, &RedbConfig::default())
    }

    /// Opens the state file at `path` with `config`; see [`Self::open`].
    pub fn open_with(path: impl AsRef<Path>, config: &RedbConfig) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = Database::builder()
            .set_cache_size(config.cache_size)
            .set_check_integrity_on_open(config.check_integrity_on_open)
            .create(&path)
            .map_err(|e| open_error(&path, e))?;
        // Private to its owner whatever the umask: the data directory may be
        // traversable by the VMMs' uids (they open their own disks by name).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            StoreError::backend(
                format!("cannot make {} private (mode 0600)", path.display()),
                e,
            )
        })?;
        schema::migrate(&db).map_err(|e| with_op(&format!("open {}", path.display()), e))?;
        tracing::debug!(path = %path.display(), "opened the state file");
        Ok(Self {
            db: Arc::new(db),
            path,
            writers: tokio::sync::Mutex::new(()),
        })
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout version stamped in the file. Blocks for one read transaction.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self
            .db
            .begin_read()
            .context("cannot begin a read transaction")?;
        let meta = txn.open_table(META).context("cannot open table meta")?;
        let version = meta
            .get(SCHEMA_VERSION_KEY)
            .context("cannot read the schema version")?;
        version
            .map(|v| v.value())
            .ok_or_else(|| StoreError::Corrupt("the state file has no schema version".into()))
    }

    /// Verifies the checksum of every page of the file and rebuilds redb's allocator
    /// state. `Ok(true)`: the file is intact; `Ok(false)`: it was damaged and has been
    /// repaired to its last good commit.
    ///
    /// Slow (reads the whole file) and blocking; not needed in normal operation, as
    /// redb recovers from crashes on open by itself. Takes `&mut self` because no
    /// transaction may run meanwhile: call it before sharing the store.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when the file cannot be repaired;
    /// [`StoreError::Backend`] when a transaction of this store is still running.
    pub fn check_integrity(&mut self) -> Result<bool, StoreError> {
        let db = Arc::get_mut(&mut self.db).ok_or_else(|| StoreError::Backend {
            message: "cannot check the state file while one of its transactions runs".into(),
            source: None,
        })?;
        db.check_integrity().map_err(|e| match e {
            DatabaseError::Storage(StorageError::Corrupted(m)) => {
                StoreError::Corrupt(format!("{}: {m}", self.path.display()))
            }
            other => StoreError::backend(
                format!("cannot check the integrity of {}", self.path.display()),
                other,
            ),
        })
    }

    /// Runs `f` in a read transaction on the blocking pool; `op` names the operation
    /// in error messages.
    async fn read<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        blocking(op, move || {
            let txn = db.begin_read().context("cannot begin a read transaction")?;
            f(&txn)
        })
        .await
    }

    /// Runs `f` in a write transaction on the blocking pool and commits it if `f`
    /// succeeds (durably); an error from `f` aborts it.
    async fn write<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let _turn = self.writers.lock().await;
        let db = Arc::clone(&self.db);
        blocking(op, move || {
            let txn = db
                .begin_write()
                .context("cannot begin a write transaction")?;
            // On an error `txn` is dropped here, which aborts it.
            let out = f(&txn)?;
            txn.commit().context("cannot commit")?;
            Ok(out)
        })
        .await
    }
}

/// Runs `f` on tokio's blocking pool.
async fn blocking<T, F>(op: &'static str, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| with_op(op, e)),
        Err(join) => Err(StoreError::backend(
            format!("{op}: the store's worker thread failed"),
            join,
        )),
    }
}

/// Prefixes backend and corruption messages with the operation they came from.
fn with_op(op: &str, e: StoreError) -> StoreError {
    match e {
        StoreError::Backend { message, source } => StoreError::Backend {
            message: format!("{op}: {message}"),
            source,
        },
        StoreError::Corrupt(what) => StoreError::Corrupt(format!("{op}: {what}")),
        other => other,
    }
}

/// The store error for a failed open of `path`.
fn open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked {
                path: path.display().to_string(),
            }
        }
        DatabaseError::Storage(StorageError::Corrupted(m)) => {
            StoreError::Corrupt(format!("{}: {m}", path.display()))
        }
        other => StoreError::backend(format!("cannot open state file {}", path.display()), other),
    }
}
