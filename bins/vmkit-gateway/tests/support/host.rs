//! Checks that the state file and the host agree, for tests that run the daemon
//! on real backends: every VM record's resources exist, and every resource vmkit
//! owns on the host belongs to a record.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use vmkit_core::{StateStore, VmId, VmRecord, VmState};

use super::netns::Netns;

/// The state file's VMs and leased VM ids, read with the daemon stopped.
pub fn read_state(dir: &Path) -> (Vec<VmRecord>, Vec<VmId>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = vmkit_store::RedbStore::open(dir.join("state.redb")).unwrap();
        let vms = store.list_vms(None).await.unwrap();
        let leases = store
            .list_leases()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.vm)
            .collect();
        (vms, leases)
    })
}

/// Processes whose command line names a path under `run_root`: the VMMs.
pub fn vmm_processes(run_root: &Path) -> BTreeSet<u32> {
    let marker = format!("{}/", run_root.display());
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&marker) && !stat.contains(") Z ") {
            pids.insert(pid);
        }
    }
    pids
}

fn entries(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Every check of the test, with the daemon stopped. Returns the VM names.
pub fn check_host(dir: &Path, ns: &Netns, context: &str) -> Vec<String> {
    let (vms, leases) = read_state(dir);
    let run_root = dir.join("run");
    // Temporary files of a copy cut short count too: storage removes them at start.
    let volumes = entries(&dir.join("volumes/vm"));
    let taps: BTreeSet<VmId> = ns
        .ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .filter_map(|n| vmkit_net::vm_of_tap(n.trim().split('@').next().unwrap()))
        .collect();
    let leases: BTreeSet<VmId> = leases.into_iter().collect();
    let run_dirs = entries(&run_root);
    let processes = vmm_processes(&run_root);

    let (mut held_volumes, mut held_taps, mut held_leases) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let (mut held_runs, mut held_pids) = (BTreeSet::new(), BTreeSet::new());
    for vm in &vms {
        let what = format!("{context}: VM {} ({})", vm.name, vm.state);
        assert!(!vm.state.is_transient(), "{what} is left mid-operation");
        for v in [&vm.resources.root, &vm.resources.data]
            .into_iter()
            .flatten()
        {
            assert!(
                volumes.contains(&v.path),
                "{what}: volume {} is missing",
                v.path.display()
            );
            held_volumes.insert(v.path.clone());
        }
        assert!(vm.resources.root.is_some(), "{what} has no root volume");
        if vm.resources.net.is_some() {
            assert!(taps.contains(&vm.id), "{what}: its TAP is missing");
            held_taps.insert(vm.id);
        }
        if vm.resources.lease.is_some() {
            assert!(leases.contains(&vm.id), "{what}: its lease is missing");
            held_leases.insert(vm.id);
        }
        match (&vm.resources.vmm, vm.state) {
            (Some(h), VmState::Running | VmState::Paused) => {
                assert!(processes.contains(&h.pid), "{what}: QEMU {} is gone", h.pid);
                assert!(
                    run_dirs.contains(&h.run_dir),
                    "{what}: its run directory is gone"
                );
                held_pids.insert(h.pid);
                held_runs.insert(h.run_dir.clone());
            }
            (None, VmState::Stopped) => {}
            (vmm, _) => panic!("{what} has VMM {vmm:?}"),
        }
    }
    assert_eq!(
        volumes, held_volumes,
        "{context}: volumes without a VM record"
    );
    assert_eq!(taps, held_taps, "{context}: TAPs without a VM record");
    assert_eq!(leases, held_leases, "{context}: leases without a VM record");
    assert_eq!(
        run_dirs, held_runs,
        "{context}: run directories without a VM record"
    );
    assert_eq!(
        processes, held_pids,
        "{context}: QEMU processes without a VM record"
    );
    vms.iter().map(|v| v.name.to_string()).collect()
}
