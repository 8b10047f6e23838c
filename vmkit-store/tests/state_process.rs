//! The state file under other processes: SIGKILL in the middle of commits, and a
//! second process opening a file already in use.
//!
//! The children are this test binary run again with an environment variable set:
//! each test checks its variable first and, if it is set, plays the child.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;
use vmkit_core::{
    EventKind, IpPool, NewEvent, Quota, StateStore, StoreError, UserId, VmName, VmRecord, VmSpec,
};
use vmkit_store::RedbStore;

/// Set in a writer child: the state file.
const WRITER_ENV: &str = "VMKIT_STORE_CHILD";
/// Set in a writer child: its round, which names its VMs.
const ROUND_ENV: &str = "VMKIT_STORE_ROUND";
/// Set in a holder child: the state file.
const HOLD_ENV: &str = "VMKIT_STORE_HOLD";

/// Kill rounds; at least 50 by requirement.
const ROUNDS: u64 = 120;

const SIGKILL_TEST: &str = "acknowledged_writes_survive_sigkill_and_the_file_stays_intact";
const LOCKED_TEST: &str = "opening_a_file_held_by_another_process_fails_with_locked";

fn pool() -> IpPool {
    IpPool::new("10.33.0.0/16".parse().unwrap()).unwrap()
}

fn vm_name(round: u64, i: u64) -> VmName {
    VmName::new(format!("r{round}-{i}")).unwrap()
}

/// This test binary, running only `test`, with stdout piped.
fn child(test: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--test-threads=1", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// A child that is killed and reaped if the test fails before it has ended.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Writes one line to stdout and flushes it; false when the parent has gone.
fn say(line: &str) -> bool {
    // `print!` would be captured by the test harness; the raw handle is not.
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// The writer child: commits VM, lease and event for `r{round}-{i}`, i = 1, 2, ...,
/// acknowledging each i on stdout after all three have committed.
fn run_writer(path: &str) -> ! {
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = RedbStore::open(path).unwrap();
        let pool = pool();
        if !say("READY") {
            return;
        }
        // Bounded, so that a child whose parent hangs does not write forever.
        for i in 1..=100_000 {
            let vm = VmRecord::new(vm_name(round, i), UserId(round), VmSpec::new("tiny"));
            store.create_vm(&vm, &Quota::unlimited()).await.unwrap();
            store.allocate_lease(vm.id, &pool).await.unwrap();
            store
                .append_event(
                    NewEvent::vm(vm.id, &vm.name, EventKind::Creating),
                    &vmkit_core::EventRetention::unlimited(),
                )
                .await
                .unwrap();
            if !say(&format!("ACK {i}")) {
                return;
            }
        }
    });
    std::process::exit(0)
}

/// What a writer child printed before it died.
#[derive(Debug, Default)]
struct Heard {
    /// The highest acknowledged i.
    acked: u64,
    /// Lines that were neither READY nor ACK (harness output, panics).
    other: Vec<String>,
}

/// A moment in a child's life from which the parent may time its kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moment {
    /// The child was started (the kill may land while it opens and repairs the file).
    Spawned,
    /// The child opened the store.
    Ready,
    /// The child acknowledged its first write.
    FirstAck,
}

/// Reads the child's stdout to its end, reporting READY and the first ACK on `moments`.
fn listen(child: &mut Child, moments: mpsc::Sender<Moment>) -> std::thread::JoinHandle<Heard> {
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut heard = Heard::default();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line == "READY" {
                let _ = moments.send(Moment::Ready);
            } else if let Some(n) = line.strip_prefix("ACK ") {
                if heard.acked == 0 {
                    let _ = moments.send(Moment::FirstAck);
                }
                heard.acked = heard.acked.max(n.parse().unwrap());
            } else {
                heard.other.push(line);
            }
        }
        heard
    })
}

/// Reopens the file after a kill and checks it: integrity, every acknowledged write
/// of every round so far, and that no later commit survived without an earlier one.
async fn verify(path: &Path, acked: &[(u64, u64)]) -> usize {
    let mut store = RedbStore::open(path).unwrap();
    assert!(
        store.check_integrity().unwrap(),
        "redb's integrity check passes after the kill"
    );

    let vms: HashMap<String, VmRecord> = store
        .list_vms(None)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.name.to_string(), v))
        .collect();
    let leases = store.list_leases().await.unwrap();
    let leased: HashMap<_, _> = leases.iter().map(|l| (l.vm, l.ip)).collect();
    assert_eq!(leased.len(), leases.len(), "no VM holds two leases");
    let ips: HashSet<_> = leases.iter().map(|l| l.ip).collect();
    assert_eq!(ips.len(), leases.len(), "no address is leased twice");
    let events = store.events(0, usize::MAX).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "events are numbered 1, 2, 3, ... without gaps"
    );
    let evented: HashSet<_> = events.iter().filter_map(|e| e.vm).collect();

    for &(round, n) in acked {
        for i in 1..=n {
            let name = vm_name(round, i).to_string();
            let vm = vms
                .get(&name)
                .unwrap_or_else(|| panic!("acknowledged VM {name} is missing"));
            assert!(
                leased.contains_key(&vm.id),
                "acknowledged lease of {name} is missing"
            );
            assert!(
                evented.contains(&vm.id),
                "acknowledged event of {name} is missing"
            );
        }
    }
    let ids: HashSet<_> = vms.values().map(|v| v.id).collect();
    assert!(
        leased.keys().all(|vm| ids.contains(vm)),
        "a lease survived without the VM committed before it"
    );
    assert!(
        evented.iter().all(|vm| ids.contains(vm)),
        "an event survived without the VM committed before it"
    );
    vms.len()
}

#[test]
fn acknowledged_writes_survive_sigkill_and_the_file_stays_intact() {
    if let Ok(path) = std::env::var(WRITER_ENV) {
        run_writer(&path);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let started = Instant::now();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut stored = 0;

    for round in 1..=ROUNDS {
        let mut writer = Reaped(
            child(SIGKILL_TEST)
                .env(WRITER_ENV, &path)
                .env(ROUND_ENV, round.to_string())
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let (moments_tx, moments_rx) = mpsc::channel();
        let listener = listen(&mut writer.0, moments_tx);
        // Rotate what the random delay is timed from; a commit takes a few fsyncs,
        // so kills from the later moments mostly land inside one.
        let from = [Moment::Spawned, Moment::Ready, Moment::FirstAck][(round % 3) as usize];
        if from != Moment::Spawned {
            while moments_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the writer opens the store and writes")
                != from
            {}
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..=50)));
        writer.0.kill().unwrap(); // SIGKILL
        let status = writer.0.wait().unwrap();
        let heard = listener.join().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "writer {round} died on its own: {:?}",
            heard.other
        );
        acked.push((round, heard.acked));

        stored = rt.block_on(verify(&path, &acked));
    }

    let total: u64 = acked.iter().map(|(_, n)| n).sum();
    let zero = acked.iter().filter(|(_, n)| *n == 0).count();
    eprintln!(
        "sigkill: {ROUNDS} rounds, {total} acknowledged iterations ({} writes), \
         {zero} rounds killed before any acknowledgement, {stored} VMs in the file, {:.1?}",
        total * 3,
        started.elapsed()
    );
}

#[test]
fn opening_a_file_held_by_another_process_fails_with_locked() {
    if let Ok(path) = std::env::var(HOLD_ENV) {
        let store = RedbStore::open(&path).unwrap();
        say("READY");
        // Hold the file until the parent closes our stdin.
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        drop(store);
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let mut holder = Reaped(
        child(LOCKED_TEST)
            .env(HOLD_ENV, &path)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (ready_tx, ready_rx) = mpsc::channel();
    let listener = listen(&mut holder.0, ready_tx);
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the holder opens the store");

    let err = RedbStore::open(&path).unwrap_err();

    let shown = path.display().to_string();
    assert!(
        matches!(&err, StoreError::Locked { path } if *path == shown),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&shown), "{message}");
    assert!(
        message.contains("in use by another process")
            && message.contains("vmkit-gateway already running"),
        "the message says what to do: {message}"
    );

    drop(holder.0.stdin.take());
    assert!(holder.0.wait().unwrap().success());
    listener.join().unwrap();
    RedbStore::open(&path).expect("the file opens once its holder has exited");
}

#[test]
fn a_second_handle_in_the_same_process_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let _first = RedbStore::open(&path).unwrap();

    assert!(matches!(
        RedbStore::open(&path),
        Err(StoreError::Locked { .. })
    ));
}
