//! Boot latency: vmkit create → agent hello on the QEMU backend, with its breakdown,
//! against the same image booted by a plain `qemu-system-x86_64` command line to the
//! agent's first byte — both measured in the same run — and the cost of confinement:
//! the same create with the VMM confined (its uid, seccomp, its cgroup; needs root),
//! measured in alternation with unconfined creates.
//!
//! Run with: `scripts/test-assets.sh && cargo bench -p vmkit-benches --bench boot`
//!
//! Criterion measures the two totals (`boot/vmkit_create_to_ready` and
//! `boot/plain_qemu_to_first_byte`); the breakdown of a vmkit boot (disk
//! preparation, VMM spawn, kernel to hello) is timed phase by phase over separate
//! runs and printed as means, together with the ratio of the two totals.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_core::testing::{suites::wait_for_agent, test_image};
use vmkit_core::{
    Backends, CreateRequest, DeleteOptions, DirImageCatalog, DiskConfig, Hypervisor, MachineConfig,
    Manager, ManagerConfig, Quota, Storage, UserId, VmId, VmName, VmSpec,
};

const SAMPLES: usize = 10;

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    manager: Manager,
    hv: Arc<vmkit_hv::Qemu>,
    storage: Arc<vmkit_store::FileStorage>,
}

fn setup(rt: &tokio::runtime::Runtime, confined: bool) -> Setup {
    let tmp = tempfile::Builder::new()
        .prefix("vmkb")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let dir = tmp.path().to_owned();
    let image = test_image("tiny");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let image_dir = image.rootfs.parent().expect("image dir").to_owned();
    std::os::unix::fs::symlink(&image_dir, images.join("tiny")).expect("symlink image");
    let hv = Arc::new(vmkit_hv::Qemu::new(vmkit_hv::QemuConfig::new()));
    let storage =
        Arc::new(vmkit_store::FileStorage::new(dir.join("volumes")).expect("file storage"));
    let store =
        Arc::new(vmkit_store::RedbStore::open(dir.join("state.redb")).expect("state store"));
    let backends = Backends::new(
        hv.clone(),
        storage.clone(),
        store,
        Arc::new(DirImageCatalog::new(images)),
    );
    let config = ManagerConfig::new(&dir)
        .default_quota(Quota::unlimited())
        .boot_timeout(Duration::from_secs(180))
        .confinement(confined.then(vmkit_core::ConfinementConfig::new));
    let manager = rt
        .block_on(Manager::new(config, backends))
        .expect("manager");
    Setup {
        _tmp: tmp,
        dir,
        manager,
        hv,
        storage,
    }
}

/// One vmkit boot: create → ready, then delete (not timed).
async fn vmkit_boot(s: &Setup, n: usize) -> Duration {
    let name = VmName::new(format!("bench-{n}")).expect("name");
    let request =
        CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").memory_mib(256)).name(name.clone());
    let start = Instant::now();
    s.manager.create(request).await.expect("create");
    let took = start.elapsed();
    s.manager
        .delete(&name, DeleteOptions::default())
        .await
        .expect("delete");
    took
}

/// The phases of one boot driven through the backends directly.
async fn phases(s: &Setup, n: usize) -> [Duration; 3] {
    let image = test_image("tiny");
    let vm = VmId::generate();
    let t0 = Instant::now();
    let base = s.storage.import_image(&image).await.expect("import");
    let root = s
        .storage
        .clone_root(vm, &base, &s.hv.capabilities().disk_formats)
        .await
        .expect("clone");
    let disk = t0.elapsed();

    let mut config = MachineConfig::new(
        vm,
        VmName::new(format!("phase-{n}")).expect("name"),
        s.dir.join("run").join(vm.to_string()),
        image.kernel.clone(),
    );
    config.initramfs = image.initramfs.clone();
    config.cmdline = image.cmdline.clone();
    config.memory_mib = 256;
    config.disks.push(DiskConfig::new(&root.path, root.format));
    let t1 = Instant::now();
    let handle = s.hv.start(&config).await.expect("start");
    let spawn = t1.elapsed();

    let t2 = Instant::now();
    let _client = wait_for_agent(&*s.hv, &handle, Duration::from_secs(180)).await;
    let hello = t2.elapsed();

    s.hv.kill(&handle).await.expect("kill");
    s.hv.cleanup(&handle).await.expect("cleanup");
    s.storage.delete(&root).await.expect("delete root");
    [disk, spawn, hello]
}

/// The same image booted by a bare QEMU command line, to the agent's first byte.
async fn plain_qemu_boot(dir: &Path, accel: vmkit_hv::Accel, n: usize) -> Duration {
    let image = test_image("tiny");
    let run = dir.join(format!("plain-{n}"));
    std::fs::create_dir_all(&run).expect("run dir");
    let overlay = run.join("root.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image.rootfs)
        .arg(&overlay)
        .status()
        .expect("qemu-img");
    assert!(status.success(), "qemu-img failed");
    let sock = run.join("agent.sock");
    // The accelerator the backend resolved, so both sides run alike.
    let (accel, cpu) = match accel {
        vmkit_hv::Accel::Kvm => ("kvm", "host"),
        _ => ("tcg", "max"),
    };
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M", "q35", "-accel", accel, "-cpu", cpu, "-m", "256", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(image.initramfs.as_ref().expect("initramfs"))
        .arg("-append")
        .arg(format!("{} console=ttyS0", image.cmdline))
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=virtio", overlay.display()))
        // The same devices the backend gives every guest: entropy (the guest's
        // crng is seeded from it early in boot) and the agent's port.
        .args(["-device", "virtio-rng-pci"])
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.vmkit.agent.0",
            "-serial",
            "null",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let mut stream = loop {
        match tokio::net::UnixStream::connect(&sock).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    // A hello request frame; the first byte of any reply ends the measurement.
    let body = br#"{"id":1,"request":{"type":"hello"}}"#;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    stream.write_all(&frame).await.expect("write hello");
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.expect("first byte");
    let took = start.elapsed();
    let _ = qemu.kill();
    let _ = qemu.wait();
    let _ = std::fs::remove_dir_all(&run);
    took
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len().max(1) as u32
}

fn boot(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let s = setup(&rt, false);
    let jailed = setup(&rt, true);
    let mut group = c.benchmark_group("boot");
    group.sample_size(SAMPLES);
    group.measurement_time(Duration::from_secs(60));
    group.warm_up_time(Duration::from_millis(1));

    let mut vmkit_runs = Vec::new();
    let mut n = 0;
    group.bench_function("vmkit_create_to_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let t = rt.block_on(vmkit_boot(&s, n));
                vmkit_runs.push(t);
                total += t;
            }
            total
        })
    });
    let accel = rt.block_on(s.hv.accel());
    println!("accelerator: {}", rt.block_on(s.hv.accel_choice()));
    let mut plain_runs = Vec::new();
    group.bench_function("plain_qemu_to_first_byte", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let t = rt.block_on(plain_qemu_boot(&s.dir, accel, n));
                plain_runs.push(t);
                total += t;
            }
            total
        })
    });
    group.finish();

    // Confined against unconfined, alternating so that a change of host load hits
    // both alike.
    let (mut free, mut confined) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        n += 1;
        free.push(rt.block_on(vmkit_boot(&s, n)));
        n += 1;
        confined.push(rt.block_on(vmkit_boot(&jailed, n)));
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON);
    let (f, j) = (mean(&free), mean(&confined));
    let (fm, jm) = (median(&mut free), median(&mut confined));
    println!(
        "confinement: create->ready confined {j:?} vs unconfined {f:?} (means of {} \
         alternating runs each, ratio {:.3}); medians {jm:?} vs {fm:?} (ratio {:.3})",
        free.len(),
        ratio(j, f),
        ratio(jm, fm)
    );

    let mut disk = Vec::new();
    let mut spawn = Vec::new();
    let mut hello = Vec::new();
    for i in 0..SAMPLES.min(5) {
        let [d, sp, h] = rt.block_on(phases(&s, 1000 + i));
        disk.push(d);
        spawn.push(sp);
        hello.push(h);
    }
    let (v, p) = (mean(&vmkit_runs), mean(&plain_runs));
    println!("\nboot breakdown (mean of {} direct runs):", disk.len());
    println!("  disk preparation (import + clone): {:?}", mean(&disk));
    println!("  VMM spawn (QEMU up, QMP answered): {:?}", mean(&spawn));
    println!("  kernel to agent hello:             {:?}", mean(&hello));
    println!(
        "vmkit create->ready {v:?} vs plain qemu->first byte {p:?}: ratio {:.3}, overhead {:?}",
        v.as_secs_f64() / p.as_secs_f64().max(f64::EPSILON),
        v.saturating_sub(p)
    );
}

criterion_group!(benches, boot);
criterion_main!(benches);
