//! Control-plane cost on the fake backends: create/delete rate, `ls` latency at
//! 1,000 and 10,000 VMs, and resident memory per VM.
//!
//! Two hosts are built on the fakes of `vmkit_core::testing`: a [`FakeHost`]
//! (in-memory store) and the same fakes over a real [`RedbStore`] in a temporary
//! directory, which commits every write durably. Both have a fake network, so the
//! store is the only difference between them. Both use an unlimited quota.
//!
//! - `control_plane/create_delete/{sequential,concurrent-32}`: create+delete pairs
//!   per second on the in-memory host with 1,000 VMs present, one pair at a time
//!   and spread over 32 concurrent tasks.
//! - `control_plane/ls/{1000,10000}/{memory,redb}`: one `Manager::list(None)`.
//!   Each host is filled once to 1,000 VMs through `Manager::create`, measured,
//!   topped up to 10,000 and measured again. The memory host is topped up through
//!   `create`; the redb host gets copies of those records written straight into
//!   its store (see [`top_up`]). That top-up is most of the run time.
//! - Memory per VM is not a criterion timing: this process's `VmRSS` is read before
//!   and after the first 1,000 creates on each host, in this run, and the
//!   difference per VM is printed. The number includes what the fakes keep per VM
//!   (the fake VMM, its in-process agent with its relay buffers, the fault log);
//!   the in-memory store also holds its records and events in RSS.
//!
//! Run with:
//!
//! ```text
//! cargo bench -p vmkit-benches --bench control_plane
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use vmkit_core::testing::{FakeHost, FakeHypervisor, FakeImages, FakeNetwork, FakeStorage};
use vmkit_core::{
    Backends, CreateRequest, DeleteOptions, IpPool, Manager, ManagerConfig, Quota, UserId, VmName,
    VmRecord, VmSpec,
};
use vmkit_store::RedbStore;

/// Concurrent tasks of the concurrent create/delete variant and of the fills.
const TASKS: u64 = 32;
const SMALL: u64 = 1_000;
const LARGE: u64 = 10_000;

fn config() -> ManagerConfig {
    ManagerConfig::new("/nonexistent").default_quota(Quota::unlimited())
}

fn request(name: String) -> CreateRequest {
    CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny"))
        .name(VmName::new(name).expect("bench names are valid DNS labels"))
}

/// The fakes of [`FakeHost`] (image `tiny`, a 10.88.0.0/16 pool) over a redb
/// store at `dir/state.redb`.
async fn redb_manager(dir: &std::path::Path) -> Manager {
    let store = RedbStore::open(dir.join("state.redb")).expect("open the redb state file");
    let pool = IpPool::new("10.88.0.0/16".parse().expect("valid CIDR")).expect("valid pool");
    let backends = Backends::new(
        Arc::new(FakeHypervisor::new()),
        Arc::new(FakeStorage::new()),
        Arc::new(store),
        Arc::new(FakeImages::with(&["tiny"])),
    )
    .with_network(Arc::new(FakeNetwork::new(pool)));
    Manager::new(config(), backends)
        .await
        .expect("fake network setup cannot fail")
}

/// Creates VMs `ls-{from}`..`ls-{to - 1}` over [`TASKS`] concurrent tasks and
/// returns how long it took.
fn fill(rt: &Runtime, manager: &Manager, from: u64, to: u64) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let manager = manager.clone();
                tokio::spawn(async move {
                    for i in (from + t..to).step_by(TASKS as usize) {
                        manager
                            .create(request(format!("ls-{i:05}")))
                            .await
                            .expect("create on the fakes");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("fill task");
        }
    });
    start.elapsed()
}

/// Writes `records` (made by `create` on the memory host) straight into the store
/// of `manager`, one `create_vm` each, and returns how long it took.
///
/// This skips the ten or so durable commits a [`Manager::create`] makes per VM, but
/// not the larger cost: `RedbStore::create_vm` decodes every stored VM to sum the
/// owner's usage, so each insert is O(n) and going from 1,000 to 10,000 VMs takes
/// minutes either way (200 s through `create` in one run on the 2-core host).
fn top_up(rt: &Runtime, manager: &Manager, records: &[VmRecord]) -> Duration {
    let store = &manager.backends().store;
    let start = Instant::now();
    rt.block_on(async {
        for record in records {
            store
                .create_vm(record, &Quota::unlimited())
                .await
                .expect("create a VM record");
        }
    });
    start.elapsed()
}

/// This process's resident set size in bytes, from `/proc/self/status`.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("VmRSS line in /proc/self/status");
    kib * 1024
}

/// Fills `manager` to [`SMALL`] VMs and prints the RSS it added per VM.
fn memory_per_vm(rt: &Runtime, label: &str, manager: &Manager, baseline: u64) {
    let took = fill(rt, manager, 0, SMALL);
    let after = rss();
    let per_vm = after.saturating_sub(baseline) / SMALL;
    println!(
        "memory/{label}: RSS {baseline} B before, {after} B after {SMALL} VMs: \
         {per_vm} B per VM (fill took {took:?})"
    );
}

/// One create+delete pair.
async fn create_delete(manager: &Manager, n: u64) {
    let vm = manager
        .create(request(format!("cd-{n}")))
        .await
        .expect("create on the fakes");
    manager
        .delete(&vm.name, DeleteOptions::default())
        .await
        .expect("delete on the fakes");
}

/// Means of the `ls` timings recorded by the benches, for the ratios printed at
/// the end.
#[derive(Default)]
struct Recorded {
    total: Duration,
    calls: u64,
}

impl Recorded {
    fn mean(&self) -> Duration {
        self.total / u32::try_from(self.calls.max(1)).unwrap_or(u32::MAX)
    }
}

fn bench_ls(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    size: u64,
    label: &str,
    manager: &Manager,
) -> Recorded {
    let mut recorded = Recorded::default();
    group.bench_function(BenchmarkId::new(size.to_string(), label), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let vms = rt.block_on(manager.list(None)).expect("list");
                assert_eq!(vms.len() as u64, size);
            }
            let took = start.elapsed();
            recorded.total += took;
            recorded.calls += iters;
            took
        });
    });
    recorded
}

fn control_plane(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let tmp = tempfile::tempdir().expect("temp dir");

    // Memory per VM first, before the benches have grown the heap. The memory host
    // stays alive while the redb host is filled, so the second fill cannot reuse
    // memory the first one freed.
    let baseline = rss();
    let memory = rt.block_on(FakeHost::with_config(config()));
    memory_per_vm(&rt, "memory", &memory.manager, baseline);
    let baseline = rss();
    let redb = rt.block_on(redb_manager(tmp.path()));
    memory_per_vm(&rt, "redb", &redb, baseline);
    memory.faults.reset();

    let mut group = c.benchmark_group("control_plane/create_delete");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    let next = Arc::new(AtomicU64::new(0));
    group.bench_function("sequential", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (manager, next) = (memory.manager.clone(), next.clone());
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    create_delete(&manager, next.fetch_add(1, Ordering::Relaxed)).await;
                }
                start.elapsed()
            }
        });
        // The fault log of the fakes grows by one entry per call.
        memory.faults.reset();
    });
    group.bench_function(format!("concurrent-{TASKS}"), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (manager, next) = (memory.manager.clone(), next.clone());
            async move {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|t| {
                        let (manager, next) = (manager.clone(), next.clone());
                        let pairs = iters / TASKS + u64::from(t < iters % TASKS);
                        tokio::spawn(async move {
                            for _ in 0..pairs {
                                create_delete(&manager, next.fetch_add(1, Ordering::Relaxed)).await;
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("create/delete task");
                }
                start.elapsed()
            }
        });
        memory.faults.reset();
    });
    group.finish();

    let mut group = c.benchmark_group("control_plane/ls");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let mem_small = bench_ls(&mut group, &rt, SMALL, "memory", &memory.manager);
    let redb_small = bench_ls(&mut group, &rt, SMALL, "redb", &redb);
    let took = fill(&rt, &memory.manager, SMALL, LARGE);
    println!("fill memory host {SMALL} -> {LARGE} VMs took {took:?}");
    memory.faults.reset();
    let records = rt.block_on(memory.manager.list(None)).expect("list");
    let took = top_up(&rt, &redb, &records[SMALL as usize..]);
    println!(
        "copy {} records into the redb store took {took:?}",
        LARGE - SMALL
    );
    let mem_large = bench_ls(&mut group, &rt, LARGE, "memory", &memory.manager);
    let redb_large = bench_ls(&mut group, &rt, LARGE, "redb", &redb);
    group.finish();

    let ratio = |a: &Recorded, b: &Recorded| a.mean().as_secs_f64() / b.mean().as_secs_f64();
    println!("\nls means over every recorded call (warm-up included):");
    for (name, r) in [
        ("1000/memory", &mem_small),
        ("1000/redb", &redb_small),
        ("10000/memory", &mem_large),
        ("10000/redb", &redb_large),
    ] {
        println!("  ls/{name}: {:?} ({} calls)", r.mean(), r.calls);
    }
    println!(
        "  ls 10k/1k: memory {:.2}, redb {:.2}",
        ratio(&mem_large, &mem_small),
        ratio(&redb_large, &redb_small)
    );
    println!(
        "  ls redb/memory: 1k {:.2}, 10k {:.2}",
        ratio(&redb_small, &mem_small),
        ratio(&redb_large, &mem_large)
    );
    drop(redb);
    drop(tmp);
}

criterion_group!(benches, control_plane);
criterion_main!(benches);
