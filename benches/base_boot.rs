//! Time to SSH on the base image: how long after the agent's hello a base VM's sshd
//! answers on port 22 ("ready means reachable"), for one or more builds of the image,
//! booted in alternation in the same run so that they share the machine's load.
//!
//! Run with: `scripts/test-assets.sh && cargo bench -p vmkit-benches --bench base_boot -- [N] [LABEL=IMAGE_DIR...]`
//!
//! `N` boots per image (default 5); each `LABEL=IMAGE_DIR` names a built image (a
//! directory with its `manifest.json`, as `vmkit image build` makes); without any, the
//! test assets' `base`. To compare a recipe with the one before it, build both and name
//! both, e.g. `before=/path/to/old/images/base after=target/vmkit-test/images/base`.
//!
//! Each boot is a VM as `vmkit vm create` makes it by default (one vCPU, 512 MiB, the
//! root disk a qcow2 overlay of 10 GiB that the guest grows its filesystem to, no data
//! disk; with `VMKIT_BENCH_DATA_MIB=M` in the environment, also a data disk of M MiB
//! as the storage backend makes it, ext4 labelled `vmkit-data`). The times are the
//! guest's uptime (`/proc/uptime`), so the host's speed at starting QEMU does not
//! enter:
//!
//! - `hello`: when the agent's first hello answered (the host's instant of it, put in
//!   guest uptime by a quick exec once the guest is idle);
//! - `listen`: when port 22 began to accept, from systemd (`ssh.socket` if it listens,
//!   else the notify-type `ssh.service`, active once sshd listens);
//! - `command`: the uptime printed by the first command run through SSH as the default
//!   user (`ssh vmkit@127.0.0.1 cat /proc/uptime` inside the guest, with a key the agent
//!   installed right after its hello, as the manager does; tried every 250 ms) — what a
//!   user sees, logins refused until `systemd-user-sessions` lets them in included.
//!
//! It prints each boot, then per image the mean and median of the three and of the
//! ratios `listen / hello` and `command / hello`, and `systemd-analyze` (with the
//! journal's warnings) of the image's last boot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmkit_core::guest::{Client, ExecRequest, WriteFileRequest};
use vmkit_core::testing::{suites::wait_for_agent, test_images_dir};
use vmkit_core::{
    DiskConfig, DiskFormat, Hypervisor, Image, ImageManifest, MachineConfig, VmId, VmName,
};
use vmkit_hv::{Qemu, QemuConfig};

const DEFAULT_BOOTS: usize = 5;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(250);
/// Where the bench's client key goes in the guest.
const GUEST_KEY: &str = "/run/vmkit-bench-key";
/// The guest's uptime as a command run through SSH prints it, or a failure.
const SSH_PROBE: &str = "ssh -q -i /run/vmkit-bench-key -o BatchMode=yes -o ConnectTimeout=30 \
     -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
     \"$(cat /etc/vmkit/default-user)@127.0.0.1\" cat /proc/uptime";

struct Boot {
    hello: f64,
    listen: f64,
    command: f64,
}

fn main() {
    let mut boots = DEFAULT_BOOTS;
    let mut images: Vec<(String, PathBuf)> = Vec::new();
    // `cargo bench` adds `--bench`; flags are not ours.
    for arg in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
        match arg.split_once('=') {
            Some((label, dir)) => images.push((label.to_owned(), PathBuf::from(dir))),
            None => boots = arg.parse().expect("N, the boots per image, is a number"),
        }
    }
    if images.is_empty() {
        images.push(("base".to_owned(), test_images_dir().join("base")));
    }
    let images: Vec<(String, Image)> = images
        .into_iter()
        .map(|(label, dir)| {
            let image = load_image(&dir);
            (label, image)
        })
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let qemu = Qemu::new(QemuConfig::new());
    let key = Key::generate();
    let mut results: Vec<Vec<Boot>> = images.iter().map(|_| Vec::new()).collect();
    let mut analyses: Vec<String> = vec![String::new(); images.len()];
    for n in 0..boots {
        for (i, (label, image)) in images.iter().enumerate() {
            let (boot, analysis) =
                rt.block_on(boot_once(&qemu, image, &key, &format!("bb-{i}-{n}")));
            println!(
                "base_boot/{label} #{n}: hello {:6.2} s  listen {:6.2} s  command {:6.2} s  \
                 listen/hello {:5.2}  command/hello {:5.2}",
                boot.hello,
                boot.listen,
                boot.command,
                boot.listen / boot.hello,
                boot.command / boot.hello
            );
            results[i].push(boot);
            analyses[i] = analysis;
        }
    }

    println!("\nbase_boot: {boots} boots per image; guest uptime in seconds, mean / median");
    println!(
        "{:<10} {:>15} {:>15} {:>15} {:>15} {:>15}",
        "image", "hello", "listen", "command", "listen/hello", "command/hello"
    );
    for ((label, _), boots) in images.iter().zip(&results) {
        let column = |f: &dyn Fn(&Boot) -> f64| {
            let values: Vec<f64> = boots.iter().map(f).collect();
            format!("{:.2} / {:.2}", mean(&values), median(&values))
        };
        println!(
            "{label:<10} {:>15} {:>15} {:>15} {:>15} {:>15}",
            column(&|b| b.hello),
            column(&|b| b.listen),
            column(&|b| b.command),
            column(&|b| b.listen / b.hello),
            column(&|b| b.command / b.hello)
        );
    }
    for ((label, _), analysis) in images.iter().zip(&analyses) {
        println!("\n--- {label}: systemd-analyze of the last boot ---\n{analysis}");
    }
}

/// The bench's SSH client key, made on the host.
struct Key {
    public: String,
    private: Vec<u8>,
}

impl Key {
    fn generate() -> Key {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmkit-bench", "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen");
        assert!(status.success(), "ssh-keygen failed");
        Key {
            public: std::fs::read_to_string(path.with_extension("pub"))
                .expect("public key")
                .trim()
                .to_owned(),
            private: std::fs::read(&path).expect("private key"),
        }
    }
}

fn load_image(dir: &Path) -> Image {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    Image::from_manifest(dir, manifest)
        .unwrap_or_else(|e| panic!("{} is unusable: {e}", dir.display()))
}

/// One boot of `image` to the first command through SSH; the VM is killed after.
async fn boot_once(qemu: &Qemu, image: &Image, key: &Key, name: &str) -> (Boot, String) {
    let dir = tempfile::Builder::new()
        .prefix("vmkbb")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let overlay = dir.path().join("root.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image.rootfs)
        .arg(&overlay)
        .arg("10G")
        .status()
        .expect("qemu-img");
    assert!(status.success(), "qemu-img create failed");
    let mut disks = vec![DiskConfig::new(overlay, DiskFormat::Qcow2)];
    let data_mib: u64 = std::env::var("VMKIT_BENCH_DATA_MIB")
        .map(|v| v.parse().expect("VMKIT_BENCH_DATA_MIB is a number of MiB"))
        .unwrap_or(0);
    if data_mib > 0 {
        let data = dir.path().join("data.ext4");
        let status = std::process::Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", "vmkit-data"])
            .arg(&data)
            .arg(format!("{data_mib}M"))
            .status()
            .expect("mke2fs");
        assert!(status.success(), "mke2fs failed");
        disks.push(DiskConfig::new(data, DiskFormat::Raw));
    }
    let mut config = MachineConfig::new(
        VmId::generate(),
        VmName::new(name).expect("name"),
        dir.path().join("run"),
        image.kernel.clone(),
    );
    config.initramfs = image.initramfs.clone();
    config.cmdline = image.cmdline.clone();
    config.disks = disks;
    config.memory_mib = 512;
    config.vcpus = 1;
    config.max_vcpus = 1;
    let handle = qemu.start(&config).await.expect("start");
    let client = wait_for_agent(qemu, &handle, BOOT_TIMEOUT).await;
    let hello_at = Instant::now();
    let deadline = hello_at + BOOT_TIMEOUT;
    client
        .install_ssh_keys(None, [key.public.as_str()])
        .await
        .expect("install the bench's key");
    client
        .write_file(WriteFileRequest::new(GUEST_KEY).mode(0o600), &key.private)
        .await
        .expect("write the bench's key");
    let command = loop {
        assert!(
            Instant::now() < deadline,
            "{name}: no command ran through SSH within {BOOT_TIMEOUT:?}"
        );
        let (ok, out) = sh(&client, SSH_PROBE).await;
        if let (true, Some(Ok(uptime))) = (ok, out.split_whitespace().next().map(str::parse)) {
            break uptime;
        }
        tokio::time::sleep(POLL).await;
    };
    // The guest's clock against ours, now that the guest is idle and an exec is quick:
    // the hello's instant in guest uptime.
    let before = Instant::now();
    let (ok, out) = sh(&client, "cut -d' ' -f1 /proc/uptime").await;
    let after = Instant::now();
    assert!(ok, "cannot read /proc/uptime");
    let uptime: f64 = out.trim().parse().expect("uptime");
    let midpoint = before + (after - before) / 2;
    let hello = uptime - (midpoint - hello_at).as_secs_f64();
    // When port 22 began to accept, from systemd: ssh.socket if it listens, else the
    // notify-type ssh.service (ready once sshd listens).
    let (ok, out) = sh(
        &client,
        "for u in ssh.socket ssh.service; do \
         t=$(systemctl show -P ActiveEnterTimestampMonotonic $u); \
         [ \"${t:-0}\" -gt 0 ] && { echo \"$t\"; exit 0; }; done; exit 1",
    )
    .await;
    assert!(ok, "neither ssh.socket nor ssh.service became active");
    let listen = out.trim().parse::<f64>().expect("monotonic usec") / 1e6;
    let (_, analysis) = sh(
        &client,
        &format!(
            "systemd-analyze time; \
             systemd-analyze critical-chain vmkit-agent.service ssh.service ssh.socket; \
             systemd-analyze blame | head -n 15; \
             user=$(cat /etc/vmkit/default-user); uid=$(id -u \"$user\"); \
             for u in basic.target vmkit-ssh-keygen.service ssh.socket ssh.service \
               systemd-user-sessions.service user@$uid.service; do \
               awk -v u=$u -v a=$(systemctl show -P InactiveExitTimestampMonotonic $u) \
                 -v b=$(systemctl show -P ActiveEnterTimestampMonotonic $u) \
                 -v c=$(systemctl show -P InactiveEnterTimestampMonotonic $u) \
                 'BEGIN {{ printf \"%s: started %.2f s, active %.2f s, inactive %.2f s\\n\", \
                   u, a / 1e6, b / 1e6, c / 1e6 }}'; \
             done; \
             start=$(cut -d' ' -f1 /proc/uptime); {SSH_PROBE} >/dev/null; \
             echo \"a second command through SSH: $start s to $(cut -d' ' -f1 /proc/uptime) s\"; \
             journalctl -b -p warning --no-pager -o short-monotonic | tail -n 20"
        ),
    )
    .await;
    qemu.kill(&handle).await.expect("kill");
    qemu.cleanup(&handle).await.expect("cleanup");
    (
        Boot {
            hello,
            listen,
            command,
        },
        analysis,
    )
}

/// Runs a bash script in the guest: whether it succeeded, and its stdout.
async fn sh(client: &Client, script: &str) -> (bool, String) {
    let out = client
        .exec_collect(
            ExecRequest::new(["bash", "-c", script]).timeout(Duration::from_secs(60)),
            1 << 16,
        )
        .await
        .expect("exec through the agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}
