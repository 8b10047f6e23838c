#![allow(clippy::unwrap_used)]
//! The crash test: the daemon on the real QEMU backend with the tiny image and the
//! bridge network (inside a network namespace this test creates), creates and
//! deletes under way, SIGKILLed at random moments, restarted; after every round the
//! state file and the host must agree: no TAP, volume, lease, QEMU process or run
//! directory without a VM record, and no VM record whose resources are missing.
//!
//! Rounds: `VMKIT_CRASH_ROUNDS` (default 30, the CI's count); the random moments
//! come from `VMKIT_CRASH_SEED` (default: the clock), printed so a failing run can
//! be replayed.

mod support;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use support::host::check_host;
use support::netns::Netns;
use support::{Daemon, stderr};

const SUBNET: &str = "10.78.0.0/24";
/// Most VMs alive at once (each a TCG guest with 256 MiB).
const MAX_VMS: usize = 3;
/// The longest a round lets operations run before the kill.
const MAX_RUN_MS: u64 = 10_000;
/// The longest a delete-only round lets it run before the kill.
const MAX_DELETE_MS: u64 = 500;

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

fn start(ns: &Netns, dir: &Path) -> Daemon {
    support::netns::qemu_daemon(
        ns,
        dir,
        SUBNET,
        &[
            ("VMKIT_TIMEOUTS_BOOT_SECS", "120"),
            ("VMKIT_TIMEOUTS_SHUTDOWN_GRACE_SECS", "5"),
        ],
    )
}

fn d_log_len(dir: &Path) -> usize {
    std::fs::metadata(dir.join("daemon.log")).map_or(0, |m| m.len() as usize)
}

/// Adds up the counts of the daemon's "reconciled" log line (`key=N` fields).
fn tally(log: &str, sums: &mut std::collections::BTreeMap<String, u64>) {
    for line in log.lines().filter(|l| l.contains("reconciled")) {
        for field in line.split_whitespace() {
            if let Some((k, v)) = field.split_once('=')
                && let Ok(n) = v.parse::<u64>()
            {
                *sums.entry(k.to_owned()).or_default() += n;
            }
        }
    }
}

#[test]
fn the_daemon_killed_at_random_moments_leaves_nothing_inconsistent() {
    let rounds = env_u64("VMKIT_CRASH_ROUNDS").unwrap_or(30);
    let seed = env_u64("VMKIT_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("crash test: {rounds} rounds, VMKIT_CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    support::link_tiny_image(tmp.path());
    let ns = Netns::new();

    let mut names: Vec<String> = Vec::new();
    let (mut create_rounds, mut delete_rounds) = (0, 0);
    let mut reconciled = std::collections::BTreeMap::new();
    for round in 0..rounds {
        let d = start(&ns, tmp.path());
        let mut running: Vec<Child> = Vec::new();
        // A third of the rounds with VMs only delete, and kill within the short time
        // a delete takes; the others create (and maybe delete) and kill at any
        // moment of a boot.
        let room = MAX_VMS.saturating_sub(names.len()) as u64;
        let window = if !names.is_empty() && (room == 0 || rng.below(3) == 0) {
            let victim = names.remove(rng.below(names.len() as u64) as usize);
            running.push(d.cli_spawn(&["vm", "rm", &victim]));
            delete_rounds += 1;
            MAX_DELETE_MS
        } else {
            if !names.is_empty() && rng.below(2) == 0 {
                let victim = names.remove(rng.below(names.len() as u64) as usize);
                running.push(d.cli_spawn(&["vm", "rm", &victim]));
            }
            let creates = 1 + rng.below(room);
            for k in 0..creates {
                let name = format!("crash-{round}-{k}");
                running.push(d.cli_spawn(&["vm", "create", &name, "--memory", "256"]));
            }
            create_rounds += 1;
            MAX_RUN_MS
        };
        std::thread::sleep(Duration::from_millis(rng.below(window)));
        d.crash();
        for mut cli in running {
            let _ = cli.kill();
            let _ = cli.wait();
        }

        // The restart reconciles; then the daemon is stopped so the state file can be
        // read and the host inspected without anything moving.
        let before = d_log_len(tmp.path());
        let d = start(&ns, tmp.path());
        let log = d.log();
        tally(&log[before.min(log.len())..], &mut reconciled);
        let status = d.terminate();
        assert!(
            status.success(),
            "round {round}: daemon exit {status}\n{log}"
        );
        names = check_host(tmp.path(), &ns, &format!("round {round} (seed {seed})"));
    }
    eprintln!(
        "crash test: rounds with creates {}, with a delete only {}",
        create_rounds, delete_rounds
    );
    eprintln!("crash test: what the restarts' reconciles did, summed: {reconciled:?}");

    // Everything left can be removed, and then nothing at all remains.
    let d = start(&ns, tmp.path());
    for name in &names {
        let out = d.cli(&["vm", "rm", name]);
        assert!(out.status.success(), "rm {name}: {}", stderr(&out));
    }
    d.terminate();
    assert!(check_host(tmp.path(), &ns, "after removing every VM").is_empty());
}
