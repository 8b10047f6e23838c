#![allow(clippy::unwrap_used)]
//! `ssh NAME@host` and `ssh -J host NAME.domain` into real VMs, with the real
//! OpenSSH client (ssh, scp, sftp) against the daemon's SSH gateway. The daemon, its
//! QEMUs, bridge and rules run inside a network namespace this test creates, and so
//! do the clients (`nsenter --net`): traffic stays inside it.
//!
//! One test, in steps, so that the slow part (booting the base image under TCG)
//! happens once.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::netns::Netns;
use support::{Daemon, json, stderr, stdout};

const SUBNET: &str = "10.78.0.0/24";
const PORT: &str = "2222";
const DOMAIN: &str = "vm.test";

/// An SSH client in the namespace, with its own key and config.
struct Client {
    ns: String,
    key: PathBuf,
    config: PathBuf,
}

impl Client {
    fn new(ns: &Netns, dir: &Path, handle: &str) -> Client {
        let key = dir.join(format!("{handle}_ed25519"));
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", handle, "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(made.success());
        let config = dir.join(format!("{handle}_config"));
        let common = format!(
            "  IdentityFile {key}\n  IdentitiesOnly yes\n  BatchMode yes\n  \
             StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel error\n  \
             ConnectTimeout 60\n",
            key = key.display()
        );
        std::fs::write(
            &config,
            format!(
                "Host gw\n  HostName 127.0.0.1\n  Port {PORT}\n  User {handle}\n{common}\
                 Host *.{DOMAIN}\n  User vmkit\n  Port 22\n  ProxyJump gw\n{common}"
            ),
        )
        .unwrap();
        Client {
            ns: ns.name.clone(),
            key,
            config,
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(program)
            .arg("-F")
            .arg(&self.config);
        c
    }

    /// `ssh -F config DEST ARGS...`
    fn ssh(&self, dest: &str, args: &[&str]) -> Output {
        self.ssh_opts(&[], dest, args)
    }

    /// `ssh -F config OPTIONS... DEST ARGS...`
    fn ssh_opts(&self, options: &[&str], dest: &str, args: &[&str]) -> Output {
        self.command("ssh")
            .args(options)
            .arg(dest)
            .args(args)
            .output()
            .unwrap()
    }

    /// The ssh command line, for tmux.
    fn ssh_line(&self, dest: &str) -> String {
        format!(
            "nsenter --net=/run/netns/{} ssh -F {} -tt {dest}",
            self.ns,
            self.config.display()
        )
    }

    fn ssh_stdin(&self, dest: &str, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command("ssh")
            .arg(dest)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// An interactive session in tmux: `stty size` follows the window's size.
fn interactive_terminal_resizes(client: &Client, dest: &str) {
    let session = format!("vmkit-ssh-{}", std::process::id());
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux").args(args).output().unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", stderr(&out));
        stdout(&out)
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "80",
        "-y",
        "24",
        &client.ssh_line(dest),
    ]);
    let screen_shows = |text: &str| {
        for _ in 0..300 {
            let screen = tmux(&["capture-pane", "-p", "-t", &session]);
            if screen.contains(text) {
                return screen;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "the screen never showed {text:?}: {}",
            tmux(&["capture-pane", "-p", "-t", &session])
        );
    };
    // The size, then after a resize the new size (the markers are computed, so
    // the typed line does not show them).
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "stty size; echo done-$((40+2))",
        "Enter",
    ]);
    let screen = screen_shows("done-42");
    assert!(screen.contains("24 80"), "{screen}");
    tmux(&["resize-window", "-t", &session, "-x", "100", "-y", "30"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "stty size; echo done-$((40+3))",
        "Enter",
    ]);
    let screen = screen_shows("done-43");
    assert!(screen.contains("30 100"), "{screen}");
    tmux(&["send-keys", "-t", &session, "exit", "Enter"]);
    for _ in 0..100 {
        // Its "no server running" on stderr is the answer, not noise for the log.
        let alive = Command::new("tmux")
            .args(["has-session", "-t", &session])
            .output()
            .unwrap();
        if !alive.status.success() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    tmux(&["kill-session", "-t", &session]);
    panic!("the session did not end at `exit`");
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn ok(out: &Output, what: &str, d: &Daemon) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}\n{}",
        out.status,
        stdout(out),
        stderr(out),
        d.log()
    );
}

#[test]
fn ssh_into_real_vms_through_the_gateway_shell_scp_sftp_forwarding_and_jump() {
    let tmp = tempfile::Builder::new()
        .prefix("vmk")
        .tempdir_in("/tmp")
        .unwrap();
    support::link_tiny_image(tmp.path());
    std::os::unix::fs::symlink(
        support::test_images().join("base"),
        tmp.path().join("images/base"),
    )
    .unwrap();
    let ns = Netns::new();
    let d = support::netns::qemu_daemon(
        &ns,
        tmp.path(),
        SUBNET,
        &[
            ("VMKIT_SSH_LISTEN", "127.0.0.1:2222"),
            ("VMKIT_HTTPS_LISTEN", "127.0.0.1:8443"),
            ("VMKIT_SSH_DOMAIN", DOMAIN),
            ("VMKIT_TIMEOUTS_BOOT_SECS", "180"),
        ],
    );
    let alice = Client::new(&ns, tmp.path(), "alice");
    let bob = Client::new(&ns, tmp.path(), "bob");
    for (handle, client) in [("alice", &alice), ("bob", &bob)] {
        let pubkey = client.key.with_extension("pub");
        let out = d.cli(&["user", "add", handle, "--key", pubkey.to_str().unwrap()]);
        ok(&out, "user add", &d);
    }

    // Alice makes a VM of the base image through the lobby; it is ready when SSH
    // into it works.
    let out = alice.ssh(
        "alice@gw",
        &[
            "new", "--name", "home", "--image", "base", "--memory", "512",
        ],
    );
    ok(&out, "new", &d);

    // A command, with its exit status.
    let out = alice.ssh("home@gw", &["hostname"]);
    ok(&out, "ssh home@gw hostname", &d);
    assert_eq!(stdout(&out), "home\n");
    let out = alice.ssh("home@gw", &["exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    // The image's default user, or root when asked.
    assert_eq!(stdout(&alice.ssh("home@gw", &["id", "-un"])), "vmkit\n");
    assert_eq!(stdout(&alice.ssh("root+home@gw", &["id", "-un"])), "root\n");
    assert_eq!(stdout(&alice.ssh("home+root@gw", &["id", "-un"])), "root\n");

    // stdin streams in, with backpressure: 20 MB through sha256sum.
    let blob = tmp.path().join("blob");
    let made = Command::new("head")
        .args(["-c", "20000000", "/dev/urandom"])
        .stdout(std::fs::File::create(&blob).unwrap())
        .status()
        .unwrap();
    assert!(made.success());
    let digest = sha256(&blob);
    let out = alice.ssh_stdin("home@gw", &["sha256sum"], &std::fs::read(&blob).unwrap());
    ok(&out, "ssh sha256sum < blob", &d);
    assert_eq!(&stdout(&out)[..64], digest);

    // scp in and out, the same bytes.
    let out = alice
        .command("scp")
        .arg(&blob)
        .arg("home@gw:/tmp/blob")
        .output()
        .unwrap();
    ok(&out, "scp in", &d);
    let back = tmp.path().join("blob.back");
    let out = alice
        .command("scp")
        .arg("home@gw:/tmp/blob")
        .arg(&back)
        .output()
        .unwrap();
    ok(&out, "scp out", &d);
    assert_eq!(sha256(&back), digest);

    // sftp in batch mode.
    let batch = tmp.path().join("batch");
    std::fs::write(
        &batch,
        "mkdir /tmp/sftp-dir\nput /etc/hostname /tmp/sftp-dir/h\nls /tmp/sftp-dir\n",
    )
    .unwrap();
    let out = alice
        .command("sftp")
        .arg("-b")
        .arg(&batch)
        .arg("home@gw")
        .output()
        .unwrap();
    ok(&out, "sftp -b", &d);
    assert!(stdout(&out).contains("/tmp/sftp-dir/h"), "{}", stdout(&out));

    // A terminal: `tty` names one, and a window change reaches it.
    let out = alice.ssh_opts(&["-tt"], "home@gw", &["tty; stty size"]);
    ok(&out, "ssh -tt", &d);
    let text = stdout(&out);
    assert!(text.contains("/dev/pts/"), "{text}");
    interactive_terminal_resizes(&alice, "home@gw");

    // -L: a port on the VM's side (its own sshd), on the client's.
    let forward = alice
        .command("ssh")
        .args(["-N", "-L", "127.0.0.1:18088:127.0.0.1:22", "home@gw"])
        .spawn()
        .unwrap();
    let mut greeted = String::new();
    for _ in 0..100 {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args(["busybox", "nc", "-w", "3", "127.0.0.1", "18088"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        greeted = stdout(&out);
        if greeted.starts_with("SSH-2.0-OpenSSH") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut forward = forward;
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(
        greeted.starts_with("SSH-2.0-OpenSSH"),
        "-L to the VM's own sshd greets: {greeted:?}"
    );

    // -J: end to end to the VM's own sshd, with alice's own key (which the agent
    // installed), through the gateway.
    let out = alice.ssh(&format!("home.{DOMAIN}"), &["hostname"]);
    ok(&out, "ssh -J", &d);
    assert_eq!(stdout(&out), "home\n");

    // Bob is told about alice's VM exactly as about one that does not exist, both
    // as a user name and as a jump.
    let theirs = bob.ssh("home@gw", &["hostname"]);
    let missing = bob.ssh("nowhere@gw", &["hostname"]);
    assert_eq!(theirs.status.code(), missing.status.code());
    assert_eq!(
        stderr(&theirs).replace("home", "NAME"),
        stderr(&missing).replace("nowhere", "NAME")
    );
    assert!(!theirs.status.success());
    let theirs = bob.ssh(&format!("home.{DOMAIN}"), &["hostname"]);
    let missing = bob.ssh(&format!("nowhere.{DOMAIN}"), &["hostname"]);
    assert!(!theirs.status.success() && !missing.status.success());
    assert_eq!(
        stderr(&theirs).replace("home", "NAME"),
        stderr(&missing).replace("nowhere", "NAME")
    );

    // A VM whose host key changed is refused with a clear message.
    let out = alice.ssh(
        "root+home@gw",
        &["rm -f /etc/ssh/ssh_host_*; ssh-keygen -q -A; systemctl restart ssh"],
    );
    ok(&out, "new host keys", &d);
    let out = alice.ssh("home@gw", &["hostname"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("host key") && stderr(&out).contains("restart"),
        "{}",
        stderr(&out)
    );
    // A stopped VM is started by its owner's connection, and at that boot its
    // agent reports the new host keys.
    ok(&alice.ssh("alice@gw", &["stop", "home"]), "stop", &d);
    let out = alice.ssh("home@gw", &["hostname"]);
    ok(&out, "woken", &d);
    assert_eq!(stdout(&out), "home\n");
    assert!(stderr(&out).contains("starting home"), "{}", stderr(&out));

    // An image without sshd: a shell and commands through the agent.
    let out = alice.ssh("alice@gw", &["new", "--name", "small", "--image", "tiny"]);
    ok(&out, "new tiny", &d);
    let out = alice.ssh("small@gw", &["hostname"]);
    ok(&out, "tiny hostname", &d);
    assert_eq!(stdout(&out), "small\n");
    let out = alice.ssh_stdin("small@gw", &["cat"], b"through the agent\n");
    assert_eq!(stdout(&out), "through the agent\n");
    let out = alice.ssh("small@gw", &["exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let out = alice.ssh_opts(&["-tt"], "small@gw", &["tty"]);
    assert!(stdout(&out).contains("/dev/pts/"), "{}", stdout(&out));
    interactive_terminal_resizes(&alice, "small@gw");
    let out = alice
        .command("sftp")
        .arg("-b")
        .arg(&batch)
        .arg("small@gw")
        .output()
        .unwrap();
    assert!(!out.status.success());

    // The CLI's own way in, through the agent.
    let out = d.cli(&[
        "vm",
        "shell",
        "small",
        "--",
        "sh",
        "-c",
        "echo $((6*7)); exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42\n");
    let out = d.cli(&["vm", "shell", "small", "-t", "--", "tty"]);
    assert!(stdout(&out).contains("/dev/pts/"), "{}", stdout(&out));

    https_into_a_real_vm(&d, &alice, &bob, &ns, tmp.path());

    let out = d.cli(&["--json", "vm", "ls"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 2);
}

/// `curl` in the namespace trusting the daemon's local CA, the VM hosts resolved to
/// the edge, with the cookie jar `jar`; prints the headers, then the body.
fn curl(ns: &Netns, ca: &Path, jar: &Path, args: &[&str]) -> Output {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", ns.name))
        .args(["curl", "-sS", "-i", "--max-time", "240", "--cacert"])
        .arg(ca)
        .arg("-c")
        .arg(jar)
        .arg("-b")
        .arg(jar);
    for host in [DOMAIN, "small.vm.test", "small--8081.vm.test"] {
        c.arg("--resolve").arg(format!("{host}:8443:127.0.0.1"));
    }
    c.args(args).output().unwrap()
}

/// The status of the last response curl printed.
fn status(out: &Output) -> u16 {
    stdout(out)
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {}{}", stdout(out), stderr(out)))
}

/// The web server of a real VM through the HTTPS edge: private to its owner, who
/// signs in with `ssh HOST browser`; shared; a helpful 502; woken by its owner.
fn https_into_a_real_vm(d: &Daemon, alice: &Client, bob: &Client, ns: &Netns, dir: &Path) {
    let out = d.cli(&["ca"]);
    ok(&out, "vmkit ca", d);
    let ca = dir.join("vmkit-ca.crt");
    std::fs::write(&ca, stdout(&out)).unwrap();
    let out = alice.ssh(
        "small@gw",
        &["mkdir -p /www && echo hello from small > /www/index.html && busybox httpd -p 80 -h /www"],
    );
    ok(&out, "httpd in the VM", d);
    let url = "https://small.vm.test:8443/";

    // Private: a stranger is sent to sign in, a client with a token gets 401.
    let stranger = dir.join("stranger.jar");
    let out = curl(ns, &ca, &stranger, &[url]);
    assert_eq!(status(&out), 303, "{}", stdout(&out));
    let out = curl(ns, &ca, &stranger, &["-H", "Authorization: Bearer x", url]);
    assert_eq!(status(&out), 401);

    // Alice signs in with the link the lobby prints, and reaches her VM.
    let out = alice.ssh("alice@gw", &["browser"]);
    ok(&out, "browser", d);
    let link = stdout(&out)
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap()
        .to_owned();
    assert!(
        link.starts_with("https://vm.test:8443/__vmkit/login?token="),
        "{link}"
    );
    let jar = dir.join("alice.jar");
    let out = curl(ns, &ca, &jar, &[&link]);
    assert_eq!(status(&out), 303, "{}", stdout(&out));
    let out = curl(ns, &ca, &jar, &["-L", "-H", "X-Vmkit-User-Id: 99", url]);
    assert_eq!(status(&out), 200, "{}{}", stdout(&out), d.log());
    assert!(
        stdout(&out).ends_with("hello from small\n"),
        "{}",
        stdout(&out)
    );

    // Nothing on port 8081: alice is told what to do.
    let out = curl(ns, &ca, &jar, &["-L", "https://small--8081.vm.test:8443/"]);
    assert_eq!(status(&out), 502, "{}", stdout(&out));
    assert!(
        stdout(&out).contains("nothing answers on port <b>8081</b>"),
        "{}",
        stdout(&out)
    );

    // Shared with everyone: the stranger gets the page, nothing about anyone.
    ok(
        &alice.ssh("alice@gw", &["share", "small", "public", "--port", "80"]),
        "share",
        d,
    );
    let out = curl(ns, &ca, &stranger, &[url]);
    assert_eq!(status(&out), 200, "{}", stdout(&out));
    assert!(stdout(&out).ends_with("hello from small\n"));
    // Bob's browser too, and port 8081 stays private.
    let bobs = dir.join("bob.jar");
    let out = curl(ns, &ca, &bobs, &["https://small--8081.vm.test:8443/"]);
    assert_eq!(status(&out), 303);
    let _ = bob;

    // Stopped, the VM is started by its owner's request (its httpd is gone after
    // the boot: the owner's 502 page then says so).
    ok(&alice.ssh("alice@gw", &["stop", "small"]), "stop", d);
    let out = curl(ns, &ca, &stranger, &[url]);
    assert_eq!(
        status(&out),
        503,
        "a stranger does not wake it: {}",
        stdout(&out)
    );
    let out = curl(ns, &ca, &jar, &["-L", url]);
    assert_eq!(status(&out), 502, "{}{}", stdout(&out), d.log());
    let shown = json(&d.cli(&["--json", "vm", "show", "small"]));
    assert_eq!(shown["state"], "running", "{shown}");
}
