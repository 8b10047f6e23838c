//! A network namespace for tests that run the daemon with networking on: its VMMs,
//! TAPs, bridge and nftables rules then live there, never on the host.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};

use super::{Daemon, stderr, stdout};

/// A network namespace removed on drop, with the listeners started in it.
pub struct Netns {
    pub name: String,
    listeners: Vec<Child>,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!("vmkt{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name} (run the tests as root)");
        let ns = Netns {
            name,
            listeners: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
        stdout(&out)
    }

    /// A TCP listener on `port` that accepts every connection.
    pub fn listen(&mut self, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "busybox", "nc", "-ll", "-p"])
            .arg(port.to_string())
            .args(["-e", "/bin/true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.listeners.push(child);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for l in &mut self.listeners {
            let _ = l.kill();
            let _ = l.wait();
        }
        // Whatever still runs in the namespace (QEMUs of a failed test) goes with it.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on a pid listed in our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Starts the daemon on the real QEMU backend inside `ns`, with the bridge network
/// on `subnet` and the variables of `env` on top.
pub fn qemu_daemon(
    ns: &Netns,
    dir: &std::path::Path,
    subnet: &str,
    env: &[(&str, &str)],
) -> Daemon {
    let mut all = vec![
        ("VMKIT_HYPERVISOR", "qemu"),
        ("VMKIT_NETWORK_ENABLED", "true"),
        ("VMKIT_NETWORK_SUBNET", subnet),
        ("VMKIT_NETWORK_DNS", "local"),
    ];
    all.extend_from_slice(env);
    Daemon::start_in_netns(Some(&ns.name), dir, &[], &all)
}
