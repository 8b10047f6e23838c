//! Run with: `cargo run -p vmkit-examples --example sandbox -- --images DIR` (as root;
//! DIR holds a `tiny` image built by `vmkit image build tiny`, default: the images of
//! vmkit's data directory; `VMKIT_IMAGES=DIR` works too).
//!
//! A sandbox for code an agent wrote: each job gets a fresh VM, runs with a time
//! limit, its output is collected up to a cap, and the VM is destroyed. The tenant's
//! quota bounds how many sandboxes it holds at once, and the job runner never asks
//! for more.
//!
//! Start-up cost and preparation: sandboxes start from a *snapshot*. A template VM
//! is booted once, prepared (here: a prelude library every job can source), stopped
//! so its disk is clean, and snapshotted; the template is then removed and every
//! sandbox is a clone of the snapshot, with its own name, address and host name. The
//! clone's disk is a copy-on-write copy of the snapshot's (a reflink or a sparse
//! copy), so what is left per sandbox is one kernel boot. The sandboxes have no
//! network (no NIC at all), which suits untrusted code.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use tokio::sync::Semaphore;
use vmkit_core::guest::{ExecEvent, ExecRequest, ExitStatus};
use vmkit_core::{
    CloneSource, CreateRequest, DeleteOptions, Handle, Manager, ManagerError, Quota, User, UserId,
    VmName, VmSpec,
};
use vmkit_examples::{IMAGE, run_on_default_backends};

/// The tenant the sandboxes belong to.
const TENANT: UserId = UserId(1001);
/// Most output kept per stream and job; the rest is read and dropped.
const OUTPUT_CAP: usize = 64 * 1024;

/// One piece of untrusted code and how long it may run.
struct Job {
    name: &'static str,
    script: &'static str,
    limit: Duration,
}

/// What a job left behind.
#[derive(Debug)]
struct JobResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
    truncated: bool,
    boot: Duration,
    /// The sandbox the job ran in.
    vm: VmName,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logging, the image, a scratch data directory, a manager on the default
    // backends, and every VM removed at the end, whatever happens (see lib.rs).
    run_on_default_backends(env!("CARGO_CRATE_NAME"), run).await
}

async fn run(manager: Manager) -> anyhow::Result<()> {
    let backends = manager.backends();
    // The tenant and its quota: two small VMs at a time. Disk counts every root disk
    // at its volume's size (the tiny image's, 1 GiB rounded up) and the snapshot's
    // copy: the template and its snapshot, then two sandboxes beside the snapshot.
    let quota = Quota::default()
        .max_vms(2)
        .max_vcpus(2)
        .max_memory_mib(512)
        .max_disk_gib(4);
    backends
        .store
        .put_user(&User::new(TENANT, Handle::new("agent-sandboxes")?))
        .await?;
    backends.store.set_quota(TENANT, &quota).await?;
    let spec = VmSpec::new(IMAGE).vcpus(1).memory_mib(256);

    // A sandbox larger than the quota is refused before anything is taken.
    let too_big = CreateRequest::new(TENANT, spec.clone().memory_mib(1024));
    match manager.create(too_big).await {
        Err(ManagerError::QuotaExceeded(e)) => println!("over-quota sandbox refused: {e}"),
        other => bail!("a sandbox over the memory quota was not refused: {other:?}"),
    }

    // The template: booted once, prepared, stopped, snapshotted, removed.
    let started = Instant::now();
    let snapshot = prepare_template(&manager, spec.clone()).await?;
    println!(
        "snapshot {snapshot} ready in {:.1?} (the template VM is gone)",
        started.elapsed()
    );

    let jobs = [
        Job {
            name: "hello",
            script: ". /opt/sandbox/prelude.sh; greet; echo 'a warning' >&2",
            limit: Duration::from_secs(10),
        },
        Job {
            name: "spin",
            script: "while :; do :; done",
            limit: Duration::from_secs(3),
        },
        Job {
            name: "fail",
            script: "echo partial; exit 3",
            limit: Duration::from_secs(10),
        },
        Job {
            name: "flood",
            script: "yes vmkit | head -c 1000000",
            limit: Duration::from_secs(20),
        },
    ];

    // Never more sandboxes at once than the quota allows.
    let slots = std::sync::Arc::new(Semaphore::new(quota.max_vms as usize));
    let mut running = tokio::task::JoinSet::new();
    for job in jobs {
        let (manager, snapshot, slots) = (manager.clone(), snapshot.clone(), slots.clone());
        running.spawn(async move {
            let _slot = slots.acquire_owned().await?;
            let result = in_sandbox(&manager, &snapshot, &job).await;
            Ok::<_, anyhow::Error>((job.name, result?))
        });
    }
    let mut results = std::collections::BTreeMap::new();
    while let Some(joined) = running.join_next().await {
        let (name, result) = joined.context("a job panicked")??;
        println!(
            "job {name:<6} boot {:>6.1?}  status {:?}  stdout {} B{}  stderr {:?}",
            result.boot,
            result.status,
            result.stdout.len(),
            if result.truncated { " (capped)" } else { "" },
            String::from_utf8_lossy(&result.stderr).trim(),
        );
        results.insert(name, result);
    }
    check(&results)?;
    manager.delete_snapshot(&snapshot).await?;
    println!("every job ran in its own VM and every check passed");
    Ok(())
}

/// The prelude the template installs: what every sandbox finds on its disk.
const PRELUDE: &str = "greet() { echo \"hello from $(hostname) on $(uname -r)\"; }\n";

/// Boots a template VM, installs [`PRELUDE`] on its disk, stops it (a clean
/// shutdown: everything written reaches the disk) and snapshots it. The template VM
/// is removed, on failure too; the snapshot outlives it.
async fn prepare_template(manager: &Manager, spec: VmSpec) -> anyhow::Result<VmName> {
    let template = manager.create(CreateRequest::new(TENANT, spec)).await?;
    let prepared = async {
        let install = ExecRequest::new([
            "sh",
            "-c",
            "mkdir -p /opt/sandbox && cat > /opt/sandbox/prelude.sh",
        ])
        .stdin(PRELUDE)
        .timeout(Duration::from_secs(10));
        let out = manager
            .exec(&template.name, install)
            .await?
            .collect(4096)
            .await?;
        ensure!(
            out.status.success(),
            "installing the prelude: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        manager.stop(&template.name).await?;
        let snapshot: VmName = "sandbox-ready".parse()?;
        manager.snapshot(&template.name, snapshot.clone()).await?;
        Ok(snapshot)
    }
    .await;
    let removed = manager
        .delete(&template.name, DeleteOptions::default())
        .await;
    let snapshot = prepared.context("preparing the template")?;
    removed.context("removing the template VM")?;
    Ok(snapshot)
}

/// Creates a sandbox from `snapshot`, runs `job` in it and destroys it, whatever the
/// job did.
async fn in_sandbox(manager: &Manager, snapshot: &VmName, job: &Job) -> anyhow::Result<JobResult> {
    let started = Instant::now();
    let vm = manager
        .clone_vm(CloneSource::Snapshot(snapshot.clone()), None, TENANT)
        .await?;
    let boot = started.elapsed();
    // The agent kills the job at its limit; the host stops waiting a little later in
    // case the guest itself stalls.
    let ran = tokio::time::timeout(
        job.limit + Duration::from_secs(30),
        run_job(manager, &vm.name, job),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow!("the sandbox stopped answering")));
    let destroyed = manager.delete(&vm.name, DeleteOptions::default()).await;
    let mut result = ran.with_context(|| format!("job {} in {}", job.name, vm.name))?;
    destroyed.with_context(|| format!("destroying sandbox {}", vm.name))?;
    result.boot = boot;
    Ok(result)
}

async fn run_job(manager: &Manager, vm: &VmName, job: &Job) -> anyhow::Result<JobResult> {
    // The code goes in as data on standard input, never on a command line.
    let request = ExecRequest::new(["sh", "-s"])
        .stdin(job.script)
        .timeout(job.limit);
    let mut events = manager.exec(vm, request).await?;
    let (mut stdout, mut stderr, mut truncated) = (Vec::new(), Vec::new(), false);
    while let Some(event) = events.next().await {
        let (buffer, bytes) = match event? {
            ExecEvent::Stdout(bytes) => (&mut stdout, bytes),
            ExecEvent::Stderr(bytes) => (&mut stderr, bytes),
            ExecEvent::Exit(status) => {
                return Ok(JobResult {
                    stdout,
                    stderr,
                    status,
                    truncated,
                    boot: Duration::ZERO,
                    vm: vm.clone(),
                });
            }
            _ => continue,
        };
        let room = OUTPUT_CAP.saturating_sub(buffer.len());
        truncated |= bytes.len() > room;
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
    bail!("the job's output ended without an exit status")
}

/// The checks that make this example a test: each job ended the way its code says.
fn check(results: &std::collections::BTreeMap<&str, JobResult>) -> anyhow::Result<()> {
    let get = |name| {
        results
            .get(name)
            .ok_or_else(|| anyhow!("job {name} has no result"))
    };
    let hello = get("hello")?;
    ensure!(hello.status.success(), "hello failed: {:?}", hello.status);
    // The prelude came from the snapshot; the host name is the clone's own.
    let greeting = String::from_utf8_lossy(&hello.stdout);
    ensure!(
        greeting.starts_with(&format!("hello from {} on ", hello.vm)),
        "hello printed {greeting:?}"
    );
    ensure!(
        hello.stderr == b"a warning\n",
        "hello's stderr was {:?}",
        hello.stderr
    );
    let spin = get("spin")?;
    ensure!(
        spin.status.timed_out,
        "the endless loop was not stopped: {:?}",
        spin.status
    );
    let fail = get("fail")?;
    ensure!(
        fail.status.code == Some(3),
        "fail exited with {:?}",
        fail.status
    );
    ensure!(
        fail.stdout == b"partial\n",
        "fail printed {:?}",
        fail.stdout
    );
    let flood = get("flood")?;
    ensure!(flood.status.success(), "flood failed: {:?}", flood.status);
    ensure!(
        flood.truncated && flood.stdout.len() == OUTPUT_CAP,
        "flood's output was not capped at {OUTPUT_CAP} bytes ({} kept)",
        flood.stdout.len()
    );
    Ok(())
}
