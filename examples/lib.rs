//! Scaffolding shared by the vmkit examples: where the images are, the default
//! backends in a scratch data directory, and running a piece of work so that every VM
//! it created is removed afterwards — on success, on error, on a panic and on Ctrl-C.
//!
//! The examples themselves are the files beside this one (see `README.md`);
//! `embed.rs` does all of this inline, so it can be copied on its own.
//!
//! VMMs outlive the process that started them (the QEMU backend detaches them so
//! that a daemon restart does not take VMs down). An embedding program that exits
//! without deleting its VMs therefore leaves them running: that is why every example
//! removes what it created on every path out.

#![deny(missing_docs)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use vmkit_core::{
    Backends, DeleteOptions, DirImageCatalog, ErrorChain, ImageCatalog, Manager, ManagerConfig,
    StateStore,
};

/// The image every example boots: small, and ready in seconds even without KVM.
pub const IMAGE: &str = "tiny";

/// Where the example finds its images: `--images DIR`, else `$VMKIT_IMAGES`, else the
/// `images` directory of vmkit's default data directory (where `vmkit image build`
/// puts them). Fails, saying how to build it, when the `tiny` image is not there.
async fn images_dir() -> anyhow::Result<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    let mut from_args = None;
    while let Some(arg) = args.next() {
        if arg == "--images" {
            from_args = Some(
                args.next()
                    .ok_or_else(|| anyhow!("--images needs a directory"))?,
            );
        } else {
            bail!("unknown argument {arg:?}; the only one is --images DIR (or set VMKIT_IMAGES)");
        }
    }
    let dir = match from_args.or_else(|| std::env::var_os("VMKIT_IMAGES")) {
        Some(dir) => PathBuf::from(dir),
        None => vmkit_core::api::default_data_dir().join("images"),
    };
    DirImageCatalog::new(&dir)
        .resolve(IMAGE)
        .await
        .with_context(|| {
            format!(
                "looking for the examples' image in {} (choose another directory with \
                 --images DIR or VMKIT_IMAGES; in a vmkit checkout `scripts/test-assets.sh` \
                 builds it into target/vmkit-test/images)",
                dir.display()
            )
        })?;
    Ok(dir)
}

/// A fresh data directory under the system's temporary directory, removed when the
/// returned guard drops.
fn scratch_dir(example: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("vmkit-{example}-"))
        .tempdir()
        .context("creating a scratch data directory")
}

/// The backends `vmkit-gateway` uses, with guest networking off: QEMU (KVM when the
/// host can run a stock guest under it, else TCG), copy-on-write file volumes, the
/// redb state store and the image directory `images`. Everything is kept under
/// `data_dir`.
pub fn default_backends(data_dir: &Path, images: &Path) -> anyhow::Result<Backends> {
    let store = vmkit_store::RedbStore::open(data_dir.join("state.redb"))
        .context("opening the state store")?;
    let storage = vmkit_store::FileStorage::new(data_dir.join("volumes"))
        .context("preparing the volume directory")?;
    let qemu = vmkit_hv::Qemu::new(vmkit_hv::QemuConfig::new());
    Ok(Backends::new(
        Arc::new(qemu),
        Arc::new(storage),
        Arc::new(store) as Arc<dyn StateStore>,
        Arc::new(DirImageCatalog::new(images)),
    ))
}

/// Installs a log subscriber on standard error: `RUST_LOG` if set, else warnings
/// from everything and information from `example` (pass `env!("CARGO_CRATE_NAME")`).
/// Libraries never do this; programs do.
pub fn init_logging(example: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,{example}=info")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The frame of an example: installs logging, finds the image, makes a scratch data
/// directory, builds a manager on [`default_backends`] in it, runs `work` with
/// [`run_then_remove_all`], and removes the scratch directory. `example` names the
/// example (`env!("CARGO_CRATE_NAME")`).
pub async fn run_on_default_backends<F, Fut, T>(example: &str, work: F) -> anyhow::Result<T>
where
    F: FnOnce(Manager) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    init_logging(example);
    let images = images_dir().await?;
    let data = scratch_dir(example)?;
    let manager = Manager::new(
        ManagerConfig::new(data.path()),
        default_backends(data.path(), &images)?,
    )
    .await
    .context("starting the VM manager")?;
    run_then_remove_all(&manager, work).await
    // `data` drops here and takes the scratch directory with it.
}

/// Runs `work` on `manager`, then deletes every VM and snapshot the manager knows, whether the
/// work succeeded, failed, panicked or was interrupted with Ctrl-C. The manager must
/// have a data directory of its own (as the examples' scratch directories are): every
/// VM in its store is taken to be this program's.
pub async fn run_then_remove_all<F, Fut, T>(manager: &Manager, work: F) -> anyhow::Result<T>
where
    F: FnOnce(Manager) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    // A task of its own, so that a panic in the work still reaches the clean-up.
    let mut task = tokio::spawn(work(manager.clone()));
    let outcome = tokio::select! {
        joined = &mut task => joined.unwrap_or_else(|e| Err(anyhow!("the example panicked: {e}"))),
        _ = tokio::signal::ctrl_c() => {
            task.abort();
            // Let the aborted work drop its state before the VMs are removed.
            let _ = task.await;
            Err(anyhow!("interrupted"))
        }
    };
    let removed = remove_all(manager).await;
    match (outcome, removed) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(cleanup)) => {
            Err(e.context(format!("and the clean-up failed too: {cleanup:#}")))
        }
    }
}

/// Deletes every VM of `manager`, VMM, volumes and all, and every snapshot. Tries
/// them all even when one fails, and reports the first failure.
pub async fn remove_all(manager: &Manager) -> anyhow::Result<()> {
    let mut first_error = None;
    for vm in manager.list(None).await.context("listing VMs to remove")? {
        tracing::info!(vm = %vm.name, "removing");
        if let Err(e) = manager.delete(&vm.name, DeleteOptions::default()).await {
            tracing::error!(vm = %vm.name, error = %ErrorChain(&e), "cannot remove");
            first_error.get_or_insert(anyhow!(e).context(format!("removing VM {}", vm.name)));
        }
    }
    let snapshots = manager
        .list_snapshots(None)
        .await
        .context("listing snapshots to remove")?;
    for snapshot in snapshots {
        tracing::info!(snapshot = %snapshot.name, "removing");
        if let Err(e) = manager.delete_snapshot(&snapshot.name).await {
            tracing::error!(snapshot = %snapshot.name, error = %ErrorChain(&e), "cannot remove");
            first_error
                .get_or_insert(anyhow!(e).context(format!("removing snapshot {}", snapshot.name)));
        }
    }
    first_error.map_or(Ok(()), Err)
}
