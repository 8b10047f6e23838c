//! Run with: `cargo run -p vmkit-examples --example sandbox -- --images DIR` (as root;
//! DIR holds a `tiny` image built by `vmkit image build tiny`, default: the images of
//! vmkit's data directory; `VMKIT_IMAGES=DIR` works too).
//!
//! A sandbox for code an agent wrote: each job gets a fresh VM, runs with a time
//! limit, its output is collected up to a cap, and the VM is destroyed. The tenant's
//! quota bounds how many sandboxes it holds at once, and the job runner never asks
//! for more.
//!
//! Start-up cost: vmkit cannot restore snapshots yet, so sandboxes start from a
//! *warm image* instead: the image is imported into storage once, before the first
//! job, and every sandbox's root disk is then a copy-on-write clone of it (a reflink
//! or a qcow2 overlay, O(1) in the image's size). What is left per sandbox is one
//! kernel boot. The sandboxes have no network (no NIC at all), which suits untrusted
//! code.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use tokio::sync::Semaphore;
use vmkit_core::guest::{ExecEvent, ExecRequest, ExitStatus};
use vmkit_core::{
    CreateRequest, DeleteOptions, Manager, ManagerError, Quota, User, UserId, VmSpec,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logging, the image, a scratch data directory, a manager on the default
    // backends, and every VM removed at the end, whatever happens (see lib.rs).
    run_on_default_backends(env!("CARGO_CRATE_NAME"), run).await
}

async fn run(manager: Manager) -> anyhow::Result<()> {
    let backends = manager.backends();
    // The tenant and its quota: two small VMs at a time.
    let quota = Quota::default()
        .max_vms(2)
        .max_vcpus(2)
        .max_memory_mib(512)
        .max_disk_gib(0);
    backends
        .store
        .put_user(&User::new(TENANT, "agent-sandboxes"))
        .await?;
    backends.store.set_quota(TENANT, &quota).await?;
    let spec = VmSpec::new(IMAGE).vcpus(1).memory_mib(256);

    // A sandbox larger than the quota is refused before anything is taken.
    let too_big = CreateRequest::new(TENANT, spec.clone().memory_mib(1024));
    match manager.create(too_big).await {
        Err(ManagerError::QuotaExceeded(e)) => println!("over-quota sandbox refused: {e}"),
        other => bail!("a sandbox over the memory quota was not refused: {other:?}"),
    }

    // Warm the image: import it once, so each sandbox only clones it.
    let image = backends.images.resolve(IMAGE).await?;
    let started = Instant::now();
    backends.storage.import_image(&image).await?;
    println!("image {IMAGE} warm in {:.1?}", started.elapsed());

    let jobs = [
        Job {
            name: "hello",
            script: "echo \"hello from $(uname -r)\"; echo 'a warning' >&2",
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
        let (manager, spec, slots) = (manager.clone(), spec.clone(), slots.clone());
        running.spawn(async move {
            let _slot = slots.acquire_owned().await?;
            let result = in_sandbox(&manager, spec, &job).await;
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
    println!("every job ran in its own VM and every check passed");
    Ok(())
}

/// Creates a sandbox, runs `job` in it and destroys it, whatever the job did.
async fn in_sandbox(manager: &Manager, spec: VmSpec, job: &Job) -> anyhow::Result<JobResult> {
    let started = Instant::now();
    let vm = manager.create(CreateRequest::new(TENANT, spec)).await?;
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

async fn run_job(
    manager: &Manager,
    vm: &vmkit_core::VmName,
    job: &Job,
) -> anyhow::Result<JobResult> {
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
    ensure!(
        hello.stdout.starts_with(b"hello from "),
        "hello printed {:?}",
        hello.stdout
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
