//! Runs the real daemon and CLI binaries for end-to-end tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod host;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `vmkit` CLI binary, built beside the daemon by `cargo build --workspace`.
pub fn cli_bin() -> PathBuf {
    let gateway = PathBuf::from(env!("CARGO_BIN_EXE_vmkit-gateway"));
    let cli = gateway.with_file_name("vmkit");
    assert!(
        cli.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace`; \
         the README's test command does)",
        cli.display()
    );
    cli
}

/// A daemon running in its own data directory; killed and reaped on drop.
pub struct Daemon {
    pub child: Child,
    /// Kill the VMMs of this data dir on drop (a test that failed half-way); off
    /// after a deliberate [`Daemon::terminate`], whose VMs must outlive it.
    reap_vmms: bool,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts `vmkit-gateway` with `args` on a fresh data directory and waits until
    /// its API answers.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("vmk")
            .tempdir_in("/tmp")
            .unwrap();
        let mut d = Self::start_in(tmp.path(), args, env);
        d._tmp = Some(tmp);
        d
    }

    /// Starts `vmkit-gateway` on `data_dir`.
    pub fn start_in(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_in_netns(None, data_dir, args, env)
    }

    /// Starts `vmkit-gateway` on `data_dir`, inside the network namespace `netns`
    /// when given (its VMMs, TAPs and rules then live there too).
    pub fn start_in_netns(
        netns: Option<&str>,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("daemon.log"))
            .unwrap();
        let mut cmd = match netns {
            // `nsenter --net`, not `ip netns exec`: the latter also remounts /sys,
            // which hides the cgroup hierarchies a confining daemon needs.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg(env!("CARGO_BIN_EXE_vmkit-gateway"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_vmkit-gateway")),
        };
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env_remove("VMKIT_DATA_DIR")
            .env_remove("VMKIT_SOCKET")
            .env("VMKIT_LOG", "info,vmkit_core=debug")
            // Tests that want a network run the daemon in a namespace of their own and
            // switch it on; no test touches the host's bridges or rules.
            .env("VMKIT_NETWORK_ENABLED", "false")
            // VMs boot the tiny image unless a test names another: the base image is
            // for the tests that check it.
            .env("VMKIT_DEFAULT_IMAGE", "tiny")
            // The SSH lobby is on by default at 0.0.0.0:2222: off here, so that daemons
            // in parallel tests do not fight for that port; a test that wants it sets
            // its own address.
            .env("VMKIT_SSH_LISTEN", "")
            // So is the HTTPS edge, at 0.0.0.0:8443.
            .env("VMKIT_HTTPS_LISTEN", "")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let socket = data_dir.join("vmkit.sock");
        let mut daemon = Daemon {
            child,
            reap_vmms: true,
            data_dir: data_dir.to_owned(),
            socket,
            _tmp: None,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited early with {status}:\n{}", self.log());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, b"")
    }

    /// Runs the CLI with `stdin` as its standard input.
    pub fn cli_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(cli_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Starts the CLI against this daemon without waiting for it.
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.cli_spawn_with(args, Stdio::null(), Stdio::null())
    }

    /// Starts the CLI against this daemon with its stdout and stderr piped, to read
    /// what it prints while it runs.
    pub fn cli_spawn_piped(&self, args: &[&str]) -> Child {
        self.cli_spawn_with(args, Stdio::piped(), Stdio::piped())
    }

    fn cli_spawn_with(&self, args: &[&str], stdout: Stdio, stderr: Stdio) -> Child {
        Command::new(cli_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    /// SIGKILLs the daemon, as a crash would, leaving its VMs as they are.
    pub fn crash(mut self) {
        self.reap_vmms = false;
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.reap_vmms = false;
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // VMs outlive their daemon by design; a test that failed half-way must not
        // leave its QEMUs behind. Kill every VMM whose pid file is in this data dir.
        if self.reap_vmms {
            kill_vmms_under(&self.data_dir.join("run"));
        }
    }
}

/// Kills the QEMU processes recorded (`vmkit-vmm.id`: pid and start time) under
/// `run_dir` and removes their cgroups (recorded in `vmkit-qemu.json`): the test's
/// data directory goes with it, so no reconcile would ever find them.
pub fn kill_vmms_under(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    let entries: Vec<_> = entries.flatten().collect();
    for entry in &entries {
        let Ok(text) = std::fs::read_to_string(entry.path().join("vmkit-vmm.id")) else {
            continue;
        };
        let Some(Ok(pid)) = text.split_whitespace().next().map(str::parse::<i32>) else {
            continue;
        };
        // Only a process whose command line names this run directory.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&*entry.path().to_string_lossy()) {
            // SAFETY: kill(2) on a QEMU this test's daemon started, checked above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for entry in &entries {
        remove_recorded_cgroups(&entry.path());
    }
}

/// Removes the cgroup directories a run directory records, waiting (up to 10 s) for
/// the killed VMM in them to be gone.
pub fn remove_recorded_cgroups(run_dir: &Path) {
    let Ok(text) = std::fs::read(run_dir.join("vmkit-qemu.json")) else {
        return;
    };
    let Ok(state) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return;
    };
    let dirs = state["cgroup"].as_array().cloned().unwrap_or_default();
    for dir in dirs.iter().filter_map(|d| d.as_str()) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(dir).exists() && std::fs::remove_dir(dir).is_err() {
            if Instant::now() > deadline {
                eprintln!("cannot remove the cgroup {dir} of a test's VMM");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The directory of the test images (`$VMKIT_TEST_DATA/images`, by default
/// `target/vmkit-test/images`); fails with what to run when the tiny image is missing.
pub fn test_images() -> PathBuf {
    let dir = match std::env::var_os("VMKIT_TEST_DATA") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/vmkit-test"),
    }
    .join("images");
    assert!(
        dir.join("tiny/manifest.json").exists(),
        "the tiny test image is missing in {}; run `scripts/test-assets.sh` (the README's test command does)",
        dir.display()
    );
    dir
}

/// Links the tiny test image into `data_dir/images`.
pub fn link_tiny_image(data_dir: &Path) {
    std::fs::create_dir_all(data_dir.join("images")).unwrap();
    std::os::unix::fs::symlink(test_images().join("tiny"), data_dir.join("images/tiny")).unwrap();
}

/// One HTTP/1.1 request on a fresh connection to the daemon's socket, blocking;
/// returns the status code and the body.
pub fn http(socket: &Path, method: &str, uri: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "{method} {uri} HTTP/1.1\r\nhost: vmkit\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Parses stdout as JSON.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            stdout(o),
            stderr(o)
        )
    })
}

/// The real OpenSSH client against the daemon's SSH lobby on `port`, as the user
/// `carol` signed in with `key`; `dir` keeps its known hosts.
pub fn ssh(dir: &std::path::Path, port: u16, key: &std::path::Path, command: &[&str]) -> Output {
    std::process::Command::new("ssh")
        .args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "LogLevel=error",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            dir.join("known_hosts").display()
        ))
        .arg("carol@127.0.0.1")
        .args(command)
        .output()
        .unwrap()
}

/// A new ed25519 key pair at `path` (and `path.pub`) for `comment`: its public file.
pub fn ssh_key(path: &Path, comment: &str) -> PathBuf {
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    path.with_extension("pub")
}
