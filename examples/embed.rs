//! Run with: `cargo run -p vmkit-examples --example embed -- --images DIR` (as root;
//! DIR holds a `tiny` image built by `vmkit image build tiny`, default: the images of
//! vmkit's data directory; `VMKIT_IMAGES=DIR` works too).
//!
//! The smallest embedding of vmkit: build a manager from the default backends, create
//! a VM, run a command in it, remove it. This file stands alone — copy it to start.
//!
//! The default backends are those of `vmkit-gateway`: QEMU (with KVM when the host
//! can run a stock guest under it, else software emulation), copy-on-write file
//! volumes and the redb state store. Guest networking is left off (no bridge, no
//! TAP): `Backends::with_network` adds it. Everything lives in a scratch data
//! directory that is removed at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use vmkit_core::guest::{ExecEvent, ExecRequest};
use vmkit_core::{
    Backends, CreateRequest, DeleteOptions, DirImageCatalog, ImageCatalog, Manager, ManagerConfig,
    ManagerError, UserId, VmName, VmSpec,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let images = images_dir().await?;
    let data = tempfile::Builder::new()
        .prefix("vmkit-embed-")
        .tempdir()
        .context("creating a scratch data directory")?;

    // 1. The manager, from the default backends.
    let store = vmkit_store::RedbStore::open(data.path().join("state.redb"))
        .context("opening the state store")?;
    let storage = vmkit_store::FileStorage::new(data.path().join("volumes"))
        .context("preparing the volume directory")?;
    let hypervisor = vmkit_hv::Qemu::new(vmkit_hv::QemuConfig::new());
    let backends = Backends::new(
        Arc::new(hypervisor),
        Arc::new(storage),
        Arc::new(store),
        Arc::new(DirImageCatalog::new(&images)),
    );
    let manager = Manager::new(ManagerConfig::new(data.path()), backends).await?;

    // 2. and 3. Create a VM and run a command in it; Ctrl-C stops waiting.
    let name = VmName::new("embed-demo")?;
    let outcome = tokio::select! {
        outcome = create_and_exec(&manager, &name) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };

    // 4. Remove the VM whatever happened: its VMM would outlive this program.
    let removed = match manager.delete(&name, DeleteOptions::default()).await {
        Ok(_) | Err(ManagerError::NotFound(_)) => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("removing VM {name}"))),
    };
    println!("removed VM {name}");
    outcome.and(removed)
    // `data` drops here: the scratch directory goes with it.
}

async fn create_and_exec(manager: &Manager, name: &VmName) -> anyhow::Result<()> {
    let spec = VmSpec::new("tiny").vcpus(1).memory_mib(256);
    let started = std::time::Instant::now();
    let vm = manager
        .create(CreateRequest::new(UserId::LOCAL, spec).name(name.clone()))
        .await?;
    println!(
        "created VM {} ({}) in {:.1?}",
        vm.name,
        vm.state,
        started.elapsed()
    );

    let mut output = manager
        .exec(name, ExecRequest::new(["uname", "-a"]))
        .await?;
    let mut stdout = Vec::new();
    while let Some(event) = output.next().await {
        match event? {
            ExecEvent::Stdout(bytes) => stdout.extend_from_slice(&bytes),
            ExecEvent::Stderr(bytes) => eprint!("{}", String::from_utf8_lossy(&bytes)),
            ExecEvent::Exit(status) if status.success() => {
                print!("uname -a in the VM: {}", String::from_utf8_lossy(&stdout));
                if !stdout.starts_with(b"Linux ") {
                    bail!("uname -a printed {stdout:?}, not a Linux kernel");
                }
                return Ok(());
            }
            ExecEvent::Exit(status) => bail!("uname -a failed in the VM: {status:?}"),
            _ => {}
        }
    }
    bail!("the command's output ended without an exit status")
}

/// `--images DIR`, else `$VMKIT_IMAGES`, else the images of vmkit's data directory.
async fn images_dir() -> anyhow::Result<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    let dir = match (args.next(), args.next()) {
        (Some(flag), Some(dir)) if flag == "--images" => PathBuf::from(dir),
        (None, _) => match std::env::var_os("VMKIT_IMAGES") {
            Some(dir) => PathBuf::from(dir),
            None => vmkit_core::api::default_data_dir().join("images"),
        },
        _ => bail!("usage: embed [--images DIR]"),
    };
    check_image(&dir).await?;
    Ok(dir)
}

async fn check_image(dir: &Path) -> anyhow::Result<()> {
    DirImageCatalog::new(dir)
        .resolve("tiny")
        .await
        .with_context(|| {
            format!(
                "looking for the image in {} (choose another directory with --images DIR \
                 or VMKIT_IMAGES)",
                dir.display()
            )
        })?;
    Ok(())
}
