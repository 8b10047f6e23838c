#![allow(clippy::unwrap_used)]
//! Daemon and CLI end to end over the Unix socket, on the fake backends.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use support::{Daemon, json, ssh, ssh_key, stderr, stdout};

fn fake_daemon() -> Daemon {
    Daemon::start(&["--fake-backends"], &[])
}

#[test]
fn api_socket_is_private_to_its_owner() {
    let d = fake_daemon();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn vm_lifecycle_through_the_cli() {
    let d = fake_daemon();
    let out = d.cli(&[
        "--json", "vm", "create", "web", "--cpus", "2", "--disk", "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let vm = json(&out);
    assert_eq!(vm["name"], "web");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["spec"]["vcpus"], 2);

    let out = d.cli(&["--json", "vm", "ls"]);
    assert!(out.status.success());
    assert_eq!(json(&out).as_array().unwrap().len(), 1);

    let out = d.cli(&["vm", "ls"]);
    assert!(stdout(&out).contains("web") && stdout(&out).contains("running"));

    let out = d.cli(&["--json", "vm", "stop", "web"]);
    assert_eq!(json(&out)["state"], "stopped");
    let out = d.cli(&["--json", "vm", "start", "web"]);
    assert_eq!(json(&out)["state"], "running");
    let out = d.cli(&["--json", "vm", "restart", "web"]);
    assert_eq!(json(&out)["state"], "running");
    let out = d.cli(&["--json", "vm", "show", "web"]);
    assert_eq!(json(&out)["name"], "web");

    let out = d.cli(&["vm", "exec", "web", "--", "echo", "hello", "world"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello world\n");

    let out = d.cli(&["vm", "rm", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["--json", "vm", "ls"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 0);
}

#[test]
fn exec_exits_with_the_commands_status_and_passes_stdin() {
    let d = fake_daemon();
    assert!(d.cli(&["vm", "create", "box"]).status.success());
    let out = d.cli(&["vm", "exec", "box", "--", "exit", "7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = d.cli(&["vm", "exec", "box", "--", "nosuchcmd"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(stderr(&out).contains("command not found"));
    let out = d.cli_with_stdin(&["vm", "exec", "-i", "box", "--", "cat"], b"piped data");
    assert_eq!(stdout(&out), "piped data");
    let out = d.cli(&["vm", "exec", "box", "--timeout", "0.2", "--", "sleep", "5"]);
    assert_eq!(
        out.status.code(),
        Some(124),
        "a timed-out command exits 124"
    );
}

/// `vm shell` runs through the session route: piped input streams to the command
/// and its end closes the command's input; the exit status is the command's.
#[test]
fn vm_shell_streams_input_and_exits_with_the_commands_status() {
    let d = fake_daemon();
    assert!(d.cli(&["vm", "create", "box"]).status.success());
    let out = d.cli(&["vm", "shell", "box", "--", "echo", "hello", "there"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello there\n");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = d.cli_with_stdin(&["vm", "shell", "box", "--", "cat"], &big);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, big, "300 kB through the session, in order");
    let out = d.cli(&["vm", "shell", "box", "--", "nosuchcmd"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        stderr(&out).contains("nosuchcmd: not found"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["vm", "shell", "ghost", "--", "echo"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ghost"), "{}", stderr(&out));
    assert!(d.cli(&["vm", "stop", "box"]).status.success());
    let out = d.cli(&["vm", "shell", "box", "--", "echo"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("stopped"), "{}", stderr(&out));
}

#[test]
fn duplicate_name_gets_a_specific_error() {
    let d = fake_daemon();
    assert!(d.cli(&["vm", "create", "web"]).status.success());
    let out = d.cli(&["vm", "create", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = d.cli(&["--json", "vm", "create", "web"]);
    assert_eq!(json(&out)["error"]["code"], "name_taken");
}

#[test]
fn vm_rename_moves_the_vm_and_refuses_a_taken_or_invalid_name() {
    let d = fake_daemon();
    assert!(d.cli(&["vm", "create", "web"]).status.success());
    assert!(d.cli(&["vm", "create", "db"]).status.success());

    let renamed = d.cli(&["--json", "vm", "rename", "web", "blog"]);
    let taken = d.cli(&["--json", "vm", "rename", "blog", "db"]);
    let invalid = d.cli(&["--json", "vm", "rename", "blog", "Bad_Name"]);
    let listed = d.cli(&["--json", "vm", "ls"]);

    assert!(renamed.status.success(), "{}", stderr(&renamed));
    assert_eq!(json(&renamed)["name"], "blog");
    assert_eq!(json(&taken)["error"]["code"], "name_taken");
    assert_eq!(json(&invalid)["error"]["code"], "invalid_name");
    let names: Vec<String> = json(&listed)
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["blog", "db"]);
}

#[test]
fn invalid_name_and_oversize_spec_are_refused_with_the_reason() {
    let d = fake_daemon();
    let out = d.cli(&["--json", "vm", "create", "Bad_Name"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "invalid_name");
    let out = d.cli(&["vm", "create", "big", "--cpus", "500"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("vcpus"), "{}", stderr(&out));
    let out = d.cli(&["--json", "vm", "ls"]);
    assert_eq!(
        json(&out).as_array().unwrap().len(),
        0,
        "nothing was created"
    );
}

#[test]
fn quota_exceeded_is_reported() {
    let d = Daemon::start(&["--fake-backends"], &[("VMKIT_QUOTA_MAX_VMS", "1")]);
    assert!(d.cli(&["vm", "create", "one"]).status.success());
    let out = d.cli(&["--json", "vm", "create", "two"]);
    assert_eq!(json(&out)["error"]["code"], "quota_exceeded");
    let out = d.cli(&["vm", "create", "two"]);
    assert!(stderr(&out).contains("quota exceeded"), "{}", stderr(&out));
}

#[test]
fn unknown_vm_and_wrong_state_are_reported() {
    let d = fake_daemon();
    let out = d.cli(&["--json", "vm", "stop", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "not_found");
    assert!(d.cli(&["vm", "create", "web"]).status.success());
    let out = d.cli(&["vm", "start", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot start VM web: it is running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn cli_says_when_the_daemon_is_not_running() {
    let d = fake_daemon();
    let socket = d.socket.clone();
    assert!(d.terminate().success(), "SIGTERM shuts down cleanly");
    assert!(!socket.exists(), "the socket is removed on shutdown");
    let out = std::process::Command::new(support::cli_bin())
        .args(["--socket", socket.to_str().unwrap(), "vm", "ls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is vmkit-gateway running?"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_exit_2() {
    let d = fake_daemon();
    assert_eq!(d.cli(&["vm", "frobnicate"]).status.code(), Some(2));
    assert_eq!(d.cli(&["vm", "exec", "web"]).status.code(), Some(2));
}

#[test]
fn events_record_every_state_change() {
    let d = fake_daemon();
    assert!(d.cli(&["vm", "create", "web"]).status.success());
    assert!(d.cli(&["vm", "stop", "web"]).status.success());
    let out = d.cli(&["--json", "events"]);
    let kinds: Vec<String> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| e["kind"]["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "creating",
            "state_changed",
            "state_changed",
            "state_changed"
        ]
    );
}

/// The event numbers in `--json events` output.
fn event_seqs(out: &std::process::Output) -> Vec<u64> {
    assert!(out.status.success(), "{}", stderr(out));
    stdout(out)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn events_show_the_newest_and_page_with_after_and_limit() {
    let d = fake_daemon();
    for command in ["create", "stop", "start"] {
        assert!(d.cli(&["vm", command, "web"]).status.success());
    }
    assert_eq!(
        event_seqs(&d.cli(&["--json", "events"])),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        event_seqs(&d.cli(&["--json", "events", "--limit", "2"])),
        [5, 6]
    );
    assert_eq!(
        event_seqs(&d.cli(&["--json", "events", "--after", "1", "-n", "2"])),
        [2, 3]
    );
    let out = d.cli(&["events", "-n", "2"]);
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
    assert!(
        stderr(&out).contains("older events: `vmkit events --after 2 --limit 2`"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["events", "--after", "1", "-n", "2"]);
    assert!(
        stderr(&out).contains("more events may follow: `vmkit events --after 3 --limit 2`"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["--json", "events", "--limit", "20000"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "invalid_query");
}

/// With `[events] max_count = 4` the log keeps the newest four of six events: the
/// listing says where its history starts, and a read from before it is refused
/// with that place rather than starting later.
#[test]
fn events_say_where_the_kept_history_starts() {
    let d = Daemon::start(&["--fake-backends"], &[("VMKIT_EVENTS_MAX_COUNT", "4")]);
    for command in ["create", "stop", "start"] {
        assert!(d.cli(&["vm", command, "web"]).status.success());
    }
    assert_eq!(event_seqs(&d.cli(&["--json", "events"])), [3, 4, 5, 6]);
    let out = d.cli(&["events"]);
    assert!(
        stderr(&out).contains("the history starts at event 3"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["events", "-n", "2"]);
    assert!(
        stderr(&out).contains("older events: `vmkit events --after 2 --limit 2`"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["--json", "events", "--after", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "history_trimmed");
    let out = d.cli(&["events", "--follow", "--after", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("starts at event 3") && stderr(&out).contains("after=2"),
        "{}",
        stderr(&out)
    );
}

/// Runs `rounds` stops and starts of each of `vms` at once, one thread per VM,
/// through the API socket.
fn stop_start_at_once(d: &Daemon, vms: &[String], rounds: usize) {
    std::thread::scope(|scope| {
        for vm in vms {
            scope.spawn(move || {
                for _ in 0..rounds {
                    for op in ["stop", "start"] {
                        let (status, body) =
                            support::http(&d.socket, "POST", &format!("/v1/vms/{vm}/{op}"), "");
                        assert_eq!(status, 200, "{op} {vm}: {body}");
                    }
                }
            });
        }
    });
}

#[test]
fn follow_prints_a_long_backlog_and_changes_of_many_vms_at_once_each_once_in_order() {
    let d = fake_daemon();
    let vms: Vec<String> = (0..8).map(|i| format!("vm-{i}")).collect();
    for vm in &vms {
        assert!(d.cli(&["vm", "create", vm]).status.success());
    }
    // 8 creates of 2 events, then 8 × 32 rounds of 4: a backlog of 1040.
    stop_start_at_once(&d, &vms, 32);
    let mut follow = d.cli_spawn_piped(&["--json", "events", "--follow", "--after", "0"]);
    let lines = lines_of(&mut follow);
    // While it follows, every VM changes at once: 8 × 4 rounds of 4 events more.
    stop_start_at_once(&d, &vms, 4);
    let last = 1040 + 128;
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("the follow stalled after {} events", seen.len()));
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        seen.push(event["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, (1..=last).collect::<Vec<u64>>());
    assert!(
        lines.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing is printed twice"
    );
    follow.kill().unwrap();
    follow.wait().unwrap();
}

/// The lines `child` prints on stdout, as it prints them.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn follow_ends_when_the_daemon_stops_and_says_where_to_resume() {
    let d = fake_daemon();
    assert!(d.cli(&["vm", "create", "web"]).status.success());
    let mut follow = d.cli_spawn_piped(&["events", "--follow"]);
    let lines = lines_of(&mut follow);
    for _ in 0..2 {
        lines.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    assert!(
        d.terminate().success(),
        "the daemon stops although a follow is open"
    );
    let out = follow.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("resume with `vmkit events --follow --after 2`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn rm_keep_data_prints_where_the_data_volume_went() {
    let d = fake_daemon();
    for vm in ["one", "two"] {
        assert!(d.cli(&["vm", "create", vm, "--disk", "1"]).status.success());
    }
    let out = d.cli(&["vm", "rm", "--keep-data", "one"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("deleted one; kept the data volume at /fake/kept/"),
        "{}",
        stdout(&out)
    );
    let out = d.cli(&["--json", "vm", "rm", "--keep-data", "two"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deleted = json(&out);
    assert_eq!(deleted["deleted"], "two");
    assert!(
        deleted["kept_data"]
            .as_str()
            .unwrap()
            .starts_with("/fake/kept/"),
        "{deleted}"
    );
    let out = d.cli(&["events", "-n", "2"]);
    assert!(
        stdout(&out).contains("kept the data volume at /fake/kept/"),
        "the event log records it: {}",
        stdout(&out)
    );
}

/// An ed25519 key made by ssh-keygen; its fingerprint holds a `/`.
const CAROL: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDEarYz70Byb4F3tObLPQOH7OcIbLkodxbuDcfZAAi+t carol@example";
const CAROL_FP: &str = "SHA256:KzM679Yuc/e1EFD2JStDlL8a8O5S280Jkl5hJDN5wfk";

#[test]
fn a_key_added_with_the_cli_reaches_the_guests_and_leaves_them_when_removed() {
    let d = fake_daemon();
    let pub_file = d.data_dir.join("carol.pub");
    std::fs::write(&pub_file, format!("{CAROL}\n")).unwrap();
    let out = d.cli(&["--json", "key", "add", pub_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["fingerprint"], CAROL_FP);
    let out = d.cli_with_stdin(&["key", "add", "-"], CAROL.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is registered already"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["key", "ls"]);
    assert!(
        stdout(&out).contains(CAROL_FP) && stdout(&out).contains("carol@example"),
        "{}",
        stdout(&out)
    );

    assert!(d.cli(&["vm", "create", "web"]).status.success());
    // The users' keys; the gateway's own key for the VM is installed beside them.
    let authorized_keys = || {
        let out = d.cli(&[
            "vm",
            "exec",
            "web",
            "--",
            "cat",
            "/root/.ssh/authorized_keys",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let keys = stdout(&out);
        let gateway: Vec<&str> = keys
            .lines()
            .filter(|k| k.ends_with(" vmkit-gateway"))
            .collect();
        assert_eq!(gateway.len(), 1, "{keys}");
        keys.lines()
            .filter(|k| !k.ends_with(" vmkit-gateway"))
            .map(|k| format!("{k}\n"))
            .collect::<String>()
    };
    assert_eq!(
        authorized_keys(),
        format!("{CAROL}\n"),
        "the guest has the key"
    );

    let out = d.cli(&["--json", "key", "rm", CAROL_FP]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["removed"], CAROL_FP);
    assert_eq!(
        json(&d.cli(&["--json", "key", "ls"])),
        serde_json::json!([])
    );
    assert!(d.cli(&["vm", "restart", "web"]).status.success());
    assert_eq!(authorized_keys(), "", "the restarted guest lost the key");
    let out = d.cli(&["--json", "key", "rm", CAROL_FP]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "ssh_key_not_found");
}

#[test]
fn key_add_refuses_what_is_not_a_public_key_and_never_sends_a_private_one() {
    let d = fake_daemon();
    let out = d.cli_with_stdin(&["--json", "key", "add", "-"], b"hello");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "invalid_ssh_key");
    let private = d.data_dir.join("id_ed25519");
    std::fs::write(
        &private,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = d.cli(&["key", "add", private.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is a private key; give the public one"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&d.cli(&["key", "ls"])).contains("no SSH keys"));
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let d = fake_daemon();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmkit-gateway"))
        .args(["--fake-backends", "--data-dir"])
        .arg(&d.data_dir)
        .env("VMKIT_SSH_LISTEN", "")
        .env("VMKIT_HTTPS_LISTEN", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another vmkit-gateway"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn logs_show_the_console_or_a_guest_unit_or_file_and_follow_them() {
    let d = fake_daemon();
    assert!(d.cli(&["vm", "create", "web"]).status.success());

    let out = d.cli(&["vm", "logs", "web"]);
    assert!(stdout(&out).contains("fake boot of web"), "the console");
    let out = d.cli(&["vm", "logs", "web", "--unit", "ssh", "-n", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ssh: fake line 2\nssh: fake line 3\n");
    let out = d.cli(&["vm", "logs", "web", "--file", "/etc/hostname"]);
    assert_eq!(stdout(&out), "web\n");
    let out = d.cli(&["vm", "logs", "web", "--file", "/no such file"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("No such file"), "{}", stderr(&out));
    let out = d.cli(&["vm", "logs", "web", "--follow"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--follow needs --unit or --file"));

    let mut follow = d.cli_spawn_piped(&["vm", "logs", "web", "--unit", "ssh", "-f"]);
    let lines = lines_of(&mut follow);
    for i in 1..=3 {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the followed lines arrive");
        assert_eq!(line, format!("ssh: fake line {i}"));
    }
    assert!(
        lines
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "and it stays open for more"
    );
    assert_eq!(follow.try_wait().unwrap(), None, "still following");
    follow.kill().unwrap();
    follow.wait().unwrap();

    assert!(d.cli(&["vm", "stop", "web"]).status.success());
    let out = d.cli(&["vm", "logs", "web"]);
    assert!(
        stdout(&out).contains("fake boot of web"),
        "a stopped VM's console is kept"
    );
    let out = d.cli(&["vm", "logs", "web", "--unit", "ssh"]);
    assert!(
        !out.status.success() && stderr(&out).contains("running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn users_and_invites_through_the_cli() {
    let d = fake_daemon();
    let pub_file = d.data_dir.join("carol.pub");
    std::fs::write(&pub_file, format!("{CAROL}\n")).unwrap();

    let out = d.cli(&[
        "--json",
        "user",
        "add",
        "carol",
        "--key",
        pub_file.to_str().unwrap(),
        "--email",
        "carol@example.com",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let carol = json(&out);
    assert_eq!(carol["handle"], "carol");
    assert_eq!(carol["role"], "user");
    assert_eq!(carol["ssh_keys"][0]["fingerprint"], CAROL_FP);
    let out = d.cli(&["user", "add", "dan", "--admin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["--json", "user", "add", "Dan"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "invalid_handle");

    let out = d.cli(&["user", "ls"]);
    let listing = stdout(&out);
    assert!(
        listing.contains("carol") && listing.contains("dan") && listing.contains("admin"),
        "{listing}"
    );
    let out = d.cli(&["--json", "user", "suspend", "carol"]);
    assert_eq!(json(&out)["status"], "suspended");
    let out = d.cli(&["--json", "user", "resume", "carol"]);
    assert_eq!(json(&out)["status"], "active");

    let out = d.cli(&["invite", "new", "--ttl", "2h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let code = stdout(&out)
        .split_whitespace()
        .find(|w| w.starts_with("vmi_"))
        .unwrap()
        .to_owned();
    let out = d.cli(&["--json", "invite", "ls"]);
    let invites = json(&out);
    assert_eq!(invites.as_array().unwrap().len(), 1);
    assert!(!stdout(&out).contains(&code), "the code is shown only once");
    let id = invites[0]["id"].as_str().unwrap().to_owned();
    assert!(d.cli(&["invite", "rm", &id]).status.success());
    let out = d.cli(&["--json", "invite", "rm", &id]);
    assert_eq!(json(&out)["error"]["code"], "invite_not_found");

    let out = d.cli(&["user", "rm", "carol"]);
    assert_eq!(out.status.code(), Some(2), "say what becomes of the VMs");
    let out = d.cli(&["user", "rm", "carol", "--hand-over", "dan"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["user", "rm", "dan", "--delete-vms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json(&d.cli(&["--json", "user", "ls"])),
        serde_json::json!([])
    );
    let out = d.cli(&["events"]);
    assert!(
        stdout(&out).contains("user carol removed"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_user_the_operator_added_makes_a_vm_through_the_ssh_lobby_and_it_is_theirs() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        &["--fake-backends"],
        &[
            ("VMKIT_SSH_LISTEN", &listen),
            ("VMKIT_SSH_DOMAIN", "vm.test"),
        ],
    );
    let key = d.data_dir.join("carol_id");
    let public = ssh_key(&key, "carol");

    let refused = ssh(&d.data_dir, port, &key, &["whoami"]);
    assert!(!refused.status.success(), "an unknown key gets nothing");

    let out = d.cli(&["user", "add", "carol", "--key", public.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ssh(&d.data_dir, port, &key, &["new", "--name", "web", "--json"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let made = json(&out);
    assert_eq!(made["vm"]["name"], "web", "{made}");
    let out = ssh(&d.data_dir, port, &key, &["ls", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = json(&out);
    assert_eq!(listed[0]["name"], "web", "{listed}");
    assert!(
        listed[0].get("resources").is_none(),
        "a user's view: {listed}"
    );

    // The operator sees the VM, owned by carol, with its host side.
    let carol = json(&d.cli(&["--json", "user", "ls"]))[0]["id"].clone();
    let shown = json(&d.cli(&["--json", "vm", "show", "web"]));
    assert_eq!(shown["owner"], carol, "{shown}");
    assert!(shown["resources"]["vmm"]["pid"].is_u64(), "{shown}");

    let out = ssh(&d.data_dir, port, &key, &["rm", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["--json", "vm", "ls"]);
    assert_eq!(json(&out), serde_json::json!([]));
}

#[test]
fn vmkit_ca_prints_the_certificate_the_https_edge_is_trusted_with() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        &["--fake-backends"],
        &[
            ("VMKIT_HTTPS_LISTEN", &listen),
            ("VMKIT_SSH_DOMAIN", "vm.test"),
        ],
    );
    let out = d.cli(&["ca"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pem = String::from_utf8(out.stdout).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let ca = d.data_dir.join("trusted-ca.crt");
    std::fs::write(&ca, &pem).unwrap();
    // curl trusts the edge with it, and the apex says how to sign in.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("vm.test:{port}:127.0.0.1"))
        .arg(format!("https://vm.test:{port}/"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains("browser"), "{page}");
    // A daemon without HTTPS says how to turn it on.
    let off = fake_daemon();
    let out = off.cli(&["ca"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("[https] listen"), "{}", stderr(&out));
}

#[test]
fn the_dns_server_answers_for_the_vms_as_they_come_and_go() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        &["--fake-backends"],
        &[
            ("VMKIT_DNS_LISTEN", &listen),
            ("VMKIT_DNS_ADDRESSES", "192.0.2.7"),
            ("VMKIT_SSH_DOMAIN", "vm.test"),
        ],
    );
    let dig = |name: &str| {
        let out = std::process::Command::new("dig")
            .args([
                "+short",
                "+time=5",
                "+tries=2",
                "-p",
                &port.to_string(),
                "@127.0.0.1",
                name,
                "A",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "dig: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(dig("vm.test"), "192.0.2.7\n");
    assert_eq!(dig("web.vm.test"), "", "no VM yet");
    let out = d.cli(&["vm", "create", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dig("web.vm.test"), "192.0.2.7\n");
    assert_eq!(dig("web--8080.vm.test"), "192.0.2.7\n");
    let out = d.cli(&["vm", "rm", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dig("web.vm.test"), "");
}

#[test]
fn acme_without_the_dns_server_is_refused_with_what_to_set() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmkit-gateway"))
        .args(["--fake-backends", "--data-dir"])
        .arg(tmp.path())
        .env("VMKIT_SSH_LISTEN", "")
        .env("VMKIT_HTTPS_LISTEN", "127.0.0.1:0")
        .env("VMKIT_HTTPS_TLS", "acme")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("[dns] listen"), "{}", stderr(&out));
}

#[path = "../../../vmkit-net/tests/support/dnsmasq.rs"]
mod dnsmasq;

/// `curl` of `url` trusting only `ca`, the hosts given resolved to 127.0.0.1 at
/// `port`, with a cookie jar in `jar`; `extra` arguments after.
fn curl_https(ca: &std::path::Path, port: u16, hosts: &[&str], extra: &[&str]) -> Output {
    let mut command = std::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca);
    for host in hosts {
        command
            .arg("--resolve")
            .arg(format!("{host}:{port}:127.0.0.1"));
    }
    command.args(extra).output().unwrap()
}

#[test]
fn a_custom_domain_proven_in_real_dns_reaches_its_vm_over_https_until_detached() {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (ssh_port, https_port, dns_port) = (free(), free(), free());
    // The owner's DNS: app.example.test is a CNAME to the VM's name.
    let cname = [
        "--local=/example.test/".to_owned(),
        "--host-record=web.vm.test,127.0.0.1".to_owned(),
        "--cname=app.example.test,web.vm.test".to_owned(),
    ];
    let dns = dnsmasq::Dnsmasq::start_on(dns_port, &cname);
    let d = Daemon::start(
        &["--fake-backends"],
        &[
            ("VMKIT_SSH_LISTEN", &format!("127.0.0.1:{ssh_port}")),
            ("VMKIT_HTTPS_LISTEN", &format!("127.0.0.1:{https_port}")),
            ("VMKIT_SSH_DOMAIN", "vm.test"),
            (
                "VMKIT_HTTPS_DOMAIN_RESOLVERS",
                &format!("127.0.0.1:{dns_port}"),
            ),
        ],
    );
    let key = d.data_dir.join("carol_id");
    let public = ssh_key(&key, "carol");
    let out = d.cli(&["user", "add", "carol", "--key", public.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lobby = |args: &[&str]| ssh(&d.data_dir, ssh_port, &key, args);
    let out = lobby(&["new", "--name", "web"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    // The fake guest's web server listens on its loopback at 8000.
    let out = lobby(&["share", "web", "port", "8000"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = lobby(&["domain", "add", "web", "app.example.test"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let url = format!("https://app.example.test:{https_port}/");
    assert!(stdout(&out).contains(&url), "{}", stdout(&out));

    let ca = d.data_dir.join("trusted-ca.crt");
    std::fs::write(&ca, d.cli(&["ca"]).stdout).unwrap();
    // Private: the custom host sends its visitor to sign in on the apex; the TLS
    // handshake validates the host name against the local CA.
    let out = curl_https(
        &ca,
        https_port,
        &["app.example.test"],
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &url,
        ],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let seen = stdout(&out);
    assert!(
        seen.starts_with("303 ")
            && seen.contains(&format!(
                "https://vm.test:{https_port}/__vmkit/auth?host=app.example.test"
            )),
        "{seen}"
    );

    // Signed in with the lobby's link, the browser (curl with a cookie jar) goes
    // through the apex and back with a ticket, and gets the page while it is
    // private.
    let out = lobby(&["browser", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let link = json(&out)["url"].as_str().unwrap().to_owned();
    let jar = d.data_dir.join("cookies.txt");
    let jar = jar.to_str().unwrap();
    let hosts = ["vm.test", "app.example.test"];
    let out = curl_https(
        &ca,
        https_port,
        &hosts,
        &["-c", jar, "-b", jar, "-o", "/dev/null", &link],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = curl_https(&ca, https_port, &hosts, &["-L", "-c", jar, "-b", jar, &url]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    // The fake app echoes the identity it was told before its body.
    assert_eq!(
        stdout(&out),
        "x-vmkit-user-id: 1\nx-vmkit-user: carol\nloopback app on port 8000"
    );

    // Shared with everyone: anyone gets it.
    let out = lobby(&["share", "web", "public"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = curl_https(&ca, https_port, &["app.example.test"], &[&url]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(stdout(&out), "loopback app on port 8000", "no identity");

    // A second name without a proof: refused with the TXT record to publish.
    let out = lobby(&["domain", "add", "web", "www.example.test", "--json"]);
    assert!(!out.status.success());
    let error = json(&out);
    assert_eq!(error["code"], "domain_unproven", "{error}");
    let message = error["error"].as_str().unwrap().to_owned();
    let at = message.find("vmkit-verify=").expect("the TXT value");
    let value = &message[at..at + "vmkit-verify=".len() + 40];
    assert!(
        message.contains("_vmkit-challenge.www.example.test"),
        "{message}"
    );
    // Published (the owner's DNS restarted with it), it attaches.
    drop(dns);
    let mut records = cname.to_vec();
    records.push(format!(
        "--txt-record=_vmkit-challenge.www.example.test,{value}"
    ));
    let _dns = dnsmasq::Dnsmasq::start_on(dns_port, &records);
    let out = lobby(&["domain", "add", "web", "www.example.test", "--json"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let out = lobby(&["domain", "ls", "--json"]);
    let hosts: Vec<String> = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["host"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hosts, ["app.example.test", "www.example.test"]);
    // The operator's CLI sees them, and its `domain add` says what to publish too.
    let out = d.cli(&["--json", "domain", "ls", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out).as_array().unwrap().len(), 2, "{}", stdout(&out));
    let out = d.cli(&["domain", "add", "web", "new.example.test"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("_vmkit-challenge.new.example.test"),
        "{}",
        stderr(&out)
    );

    // Detached: the host is no longer served (no certificate names it now).
    let out = lobby(&["domain", "rm", "app.example.test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = curl_https(
        &ca,
        https_port,
        &["app.example.test"],
        &["-o", "/dev/null", "-w", "%{http_code}", &url],
    );
    let refused = !out.status.success() || stdout(&out) == "421";
    assert!(refused, "{} {}", stdout(&out), stderr(&out));

    // Deleting the VM takes its domains with it; the events say what happened.
    let out = lobby(&["rm", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = lobby(&["domain", "ls", "--json"]);
    assert_eq!(json(&out), serde_json::json!([]));
    let events = stdout(&d.cli(&["events", "--limit", "100"]));
    assert!(
        events.contains("custom domain app.example.test attached (proven by cname)")
            && events.contains("custom domain www.example.test attached (proven by txt)")
            && events.contains("custom domain app.example.test detached"),
        "{events}"
    );
}

/// aiosmtpd (Debian `python3-aiosmtpd`) on 127.0.0.1: a real SMTP server that keeps
/// what it gets in a maildir; killed on drop.
struct SmtpSink {
    child: std::process::Child,
    port: u16,
    maildir: std::path::PathBuf,
}

impl SmtpSink {
    fn start(dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let maildir = dir.join("maildir");
        // Debian's python3, where the package installs the module.
        let child = std::process::Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("aiosmtpd runs (scripts/install-deps.sh installs python3-aiosmtpd)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "aiosmtpd did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            maildir,
        }
    }

    /// The messages received so far, as text.
    fn messages(&self) -> Vec<String> {
        std::fs::read_dir(self.maildir.join("new"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_sign_in_link_by_email_reaches_only_a_users_address_and_signs_the_browser_in() {
    let https_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let smtp_dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start(smtp_dir.path());
    let d = Daemon::start(
        &["--fake-backends"],
        &[
            ("VMKIT_HTTPS_LISTEN", &format!("127.0.0.1:{https_port}")),
            ("VMKIT_SSH_DOMAIN", "vm.test"),
            (
                "VMKIT_HTTPS_SMTP_RELAY",
                &format!("127.0.0.1:{}", sink.port),
            ),
            ("VMKIT_HTTPS_SMTP_TLS", "none"),
            ("VMKIT_HTTPS_SMTP_FROM", "vmkit <vmkit@vm.test>"),
        ],
    );
    let out = d.cli(&["user", "add", "ada", "--email", "ada@example.test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ca = d.data_dir.join("trusted-ca.crt");
    std::fs::write(&ca, d.cli(&["ca"]).stdout).unwrap();
    let apex = format!("https://vm.test:{https_port}/");
    let post = |email: &str, origin: Option<&str>| {
        let mut args = vec![
            "-X".to_owned(),
            "POST".to_owned(),
            "--data-urlencode".to_owned(),
            format!("email={email}"),
            "-w".to_owned(),
            "\n%{http_code}".to_owned(),
        ];
        if let Some(origin) = origin {
            args.push("-H".into());
            args.push(format!("Origin: {origin}"));
        }
        args.push(format!("{apex}__vmkit/email"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = curl_https(&ca, https_port, &["vm.test"], &args);
        assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
        stdout(&out)
    };

    // The sign-in page offers the form.
    let out = curl_https(&ca, https_port, &["vm.test"], &[&apex]);
    assert!(
        stdout(&out).contains("action=\"/__vmkit/email\""),
        "{}",
        stdout(&out)
    );

    // The same answer for a user's address and for one nobody has.
    let known = post(
        "Ada@Example.test",
        Some(&format!("https://vm.test:{https_port}")),
    );
    let unknown = post("nobody@example.test", None);
    assert!(
        known.ends_with("\n200") && unknown.ends_with("\n200"),
        "{known}\n{unknown}"
    );
    assert_eq!(
        known.replace("Ada@Example.test", "X"),
        unknown.replace("nobody@example.test", "X")
    );
    // Asked again at once: the same answer, and no second message.
    assert!(post("ada@example.test", None).ends_with("\n200"));
    // A form posted from another site is refused.
    assert!(post("ada@example.test", Some("https://evil.test")).ends_with("\n403"));

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sink.messages().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no mail within 30 s:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Time for any other message to arrive: there must be none.
    std::thread::sleep(Duration::from_secs(2));
    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let message = &messages[0];
    assert!(
        message.contains("To: Ada@Example.test") || message.contains("To: ada@example.test"),
        "{message}"
    );
    // Soft line breaks of quoted-printable undone, then the link.
    let text = message
        .replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=");
    let at = text.find("https://").expect("a link in the mail");
    let link: String = text[at..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    assert!(
        link.starts_with(&format!(
            "https://vm.test:{https_port}/__vmkit/login?token="
        )),
        "{link}"
    );

    // The link signs the browser in, once.
    let jar = d.data_dir.join("ada.jar");
    let jar = jar.to_str().unwrap();
    let out = curl_https(
        &ca,
        https_port,
        &["vm.test"],
        &["-c", jar, "-b", jar, "-L", &link],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ada"), "{}", stdout(&out));
    let again = curl_https(
        &ca,
        https_port,
        &["vm.test"],
        &["-o", "/dev/null", "-w", "%{http_code}", &link],
    );
    assert_eq!(stdout(&again), "400", "a link works once");
}

#[test]
fn api_keys_are_made_in_the_ssh_lobby_and_the_cli_shown_once_listed_and_revoked() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        &["--fake-backends"],
        &[
            ("VMKIT_SSH_LISTEN", &listen),
            ("VMKIT_SSH_DOMAIN", "vm.test"),
        ],
    );
    let key = d.data_dir.join("carol_id");
    let public = ssh_key(&key, "carol");
    let out = d.cli(&["user", "add", "carol", "--key", public.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lobby = |args: &[&str]| ssh(&d.data_dir, port, &key, args);
    let out = lobby(&["new", "--name", "web"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());

    // Made in the lobby: the secret is in this answer and no other.
    let out = lobby(&[
        "api-key",
        "new",
        "--label",
        "ci",
        "--expires",
        "30d",
        "--read-only",
        "--vm",
        "web",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key_made = json(&out);
    let secret = key_made["secret"].as_str().unwrap().to_owned();
    let id = key_made["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with(&format!("vmk_{id}_")), "{key_made}");
    assert_eq!(key_made["scope"], "read_only", "{key_made}");
    assert_eq!(key_made["vm"], "web", "{key_made}");
    assert!(key_made["expires_at"].is_u64(), "{key_made}");
    let out = lobby(&["api-key", "ls"]);
    let text = stdout(&out);
    assert!(
        text.contains(&id) && text.contains("read-only, VM web, expires"),
        "{text}"
    );
    assert!(text.contains("never used"), "{text}");
    assert!(!text.contains(&secret), "ls never shows the secret: {text}");
    let listed = json(&lobby(&["api-key", "ls", "--json"]));
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert!(listed[0].get("secret").is_none(), "{listed}");
    assert!(listed[0].get("hash").is_none(), "{listed}");

    // A key for a VM carol does not have is refused, as the VM not existing.
    let out = lobby(&["api-key", "new", "--vm", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));

    let out = lobby(&["api-key", "rm", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("revoked {id}")));
    let out = lobby(&["api-key", "rm", &id, "--json"]);
    assert!(!out.status.success(), "revoked already");
    assert!(
        stdout(&out).contains("api_key_not_found"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        json(&lobby(&["api-key", "ls", "--json"])),
        serde_json::json!([])
    );

    // The operator's own keys through the CLI.
    let out = d.cli(&["api-key", "new", "--label", "backup"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("full, never expires"), "{text}");
    assert!(text.contains("shown this once"), "{text}");
    let secret = text.lines().last().unwrap().to_owned();
    assert!(secret.starts_with("vmk_"), "{text}");
    let listed = json(&d.cli(&["--json", "api-key", "ls"]));
    assert_eq!(listed[0]["label"], "backup", "{listed}");
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    assert!(
        !stdout(&d.cli(&["api-key", "ls"])).contains(&secret),
        "ls never shows the secret"
    );
    let out = d.cli(&["api-key", "rm", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json(&d.cli(&["--json", "api-key", "ls"])),
        serde_json::json!([])
    );
    // An expiry that is not a lifetime is refused before anything is made.
    let out = d.cli(&["api-key", "new", "--expires", "soon"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("lifetime"), "{}", stderr(&out));
}

/// A fake daemon with the SSH lobby and the HTTPS edge under `domain`, and the user
/// carol, who made VM `web` in the lobby: the daemon, the lobby's port, the edge's
/// port and carol's key.
fn carol_with_a_vm(domain: &str) -> (Daemon, u16, u16, std::path::PathBuf) {
    carol_with_a_vm_and(domain, &[])
}

/// [`carol_with_a_vm`] with more of the daemon's environment.
fn carol_with_a_vm_and(
    domain: &str,
    env: &[(&str, &str)],
) -> (Daemon, u16, u16, std::path::PathBuf) {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (ssh_port, https_port) = (free(), free());
    let (ssh_listen, https_listen) = (
        format!("127.0.0.1:{ssh_port}"),
        format!("127.0.0.1:{https_port}"),
    );
    let mut all = vec![
        ("VMKIT_SSH_LISTEN", ssh_listen.as_str()),
        ("VMKIT_HTTPS_LISTEN", https_listen.as_str()),
        ("VMKIT_SSH_DOMAIN", domain),
    ];
    all.extend_from_slice(env);
    let d = Daemon::start(&["--fake-backends"], &all);
    let key = d.data_dir.join("carol_id");
    let public = ssh_key(&key, "carol");
    let out = d.cli(&["user", "add", "carol", "--key", public.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ssh(&d.data_dir, ssh_port, &key, &["new", "--name", "web"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    (d, ssh_port, https_port, key)
}

#[test]
fn the_rest_api_over_https_takes_keys_and_keeps_their_limits() {
    // A small burst and a slow refill, so that the limit shows whatever the load.
    let (d, ssh_port, https_port, key) = carol_with_a_vm_and(
        "vm.test",
        &[
            ("VMKIT_HTTPS_API_BURST", "20"),
            ("VMKIT_HTTPS_API_REQUESTS_PER_MINUTE", "1"),
        ],
    );
    let lobby = |args: &[&str]| ssh(&d.data_dir, ssh_port, &key, args);
    let new_key = |args: &[&str]| {
        let mut all = vec!["api-key", "new"];
        all.extend_from_slice(args);
        all.push("--json");
        let out = lobby(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        json(&out)["secret"].as_str().unwrap().to_owned()
    };
    let full = new_key(&["--label", "full"]);
    let read_only = new_key(&["--read-only"]);
    let ca = d.data_dir.join("trusted-ca.crt");
    std::fs::write(&ca, d.cli(&["ca"]).stdout).unwrap();
    let api = format!("https://vm.test:{https_port}/api");
    // curl with `key` (if any): the status, then the body.
    let call = |key: Option<&str>, method: &str, path: &str, body: Option<&str>| {
        let mut args = vec![
            "-X".to_owned(),
            method.to_owned(),
            "-w".to_owned(),
            "\n%{http_code}".to_owned(),
        ];
        if let Some(key) = key {
            args.push("-H".into());
            args.push(format!("Authorization: Bearer {key}"));
        }
        if let Some(body) = body {
            args.extend(["-H".into(), "Content-Type: application/json".into()]);
            args.extend(["--data".into(), body.to_owned()]);
        }
        args.push(format!("{api}{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = curl_https(&ca, https_port, &["vm.test"], &args);
        assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
        let text = stdout(&out);
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse::<u16>().unwrap(), body.to_owned())
    };

    // carol's key lists carol's VMs, and only hers.
    let (code, body) = call(Some(&full), "GET", "/v1/vms", None);
    assert_eq!(code, 200, "{body}");
    let vms: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(vms[0]["name"], "web");
    // No key, a wrong one: 401 with the error codes the socket uses.
    for key in [None, Some("vmk_nobody_secret")] {
        let (code, body) = call(key, "GET", "/v1/vms", None);
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("sign_in_required"), "{body}");
    }
    // A read-only key reads but does not write.
    assert_eq!(call(Some(&read_only), "GET", "/v1/vms/web", None).0, 200);
    let (code, body) = call(Some(&read_only), "POST", "/v1/vms/web/stop", None);
    assert_eq!(code, 403, "{body}");
    // A full key writes: the VM it makes is carol's.
    let (code, body) = call(
        Some(&full),
        "POST",
        "/v1/vms",
        Some(r#"{"name":"api-made","spec":{"image":"tiny"}}"#),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let shown = json(&d.cli(&["--json", "vm", "show", "api-made"]));
    let carol = json(&d.cli(&["--json", "user", "ls"]))[0]["id"].clone();
    assert_eq!(shown["owner"], carol, "{shown}");
    // Revoked: refused at once.
    let listed = json(&lobby(&["api-key", "ls", "--json"]));
    let id = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == "full")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(lobby(&["api-key", "rm", &id]).status.success());
    assert_eq!(call(Some(&full), "GET", "/v1/vms", None).0, 401);

    // A key makes its burst of requests (20 here), then is told to wait: it gets one
    // more a minute.
    let burst = new_key(&["--label", "burst"]);
    let url = format!("{api}/v1/whoami");
    let headers = d.data_dir.join("headers.txt");
    let mut args = vec![
        "-H".to_owned(),
        format!("Authorization: Bearer {burst}"),
        "-w".to_owned(),
        "%{http_code}\n".to_owned(),
        "-D".to_owned(),
        headers.display().to_string(),
    ];
    // One connection, 25 requests; each body thrown away (`-o` is per URL).
    for _ in 0..25 {
        args.extend(["-o".to_owned(), "/dev/null".to_owned(), url.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl_https(&ca, https_port, &["vm.test"], &args);
    let codes: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(codes.len(), 25, "{}", stderr(&out));
    assert!(codes[..20].iter().all(|c| c == "200"), "{codes:?}");
    // The 21st may have a token back if the burst took over a minute; no more.
    assert!(codes[21..].iter().all(|c| c == "429"), "{codes:?}");
    let headers = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("retry-after: "), "{headers}");
}

#[test]
fn the_cli_drives_a_remote_gateway_with_an_api_key() {
    // `localhost` resolves without help, so the CLI can dial the apex by name.
    let (d, ssh_port, https_port, key) = carol_with_a_vm("localhost");
    let lobby = |args: &[&str]| ssh(&d.data_dir, ssh_port, &key, args);
    let out = lobby(&["api-key", "new", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = json(&out)["secret"].as_str().unwrap().to_owned();
    let key_file = d.data_dir.join("carol.key");
    std::fs::write(&key_file, format!("{secret}\n")).unwrap();
    let ca = d.data_dir.join("trusted-ca.crt");
    std::fs::write(&ca, d.cli(&["ca"]).stdout).unwrap();
    let url = format!("https://localhost:{https_port}");
    // The CLI elsewhere: no socket, only the URL, the key and the CA.
    let remote = |args: &[&str]| {
        std::process::Command::new(support::cli_bin())
            .env_remove("VMKIT_SOCKET")
            .env_remove("VMKIT_API_KEY")
            .args(["--socket", "/nonexistent/vmkit.sock", "--url", &url])
            .arg("--key-file")
            .arg(&key_file)
            .arg("--ca-file")
            .arg(&ca)
            .args(args)
            .output()
            .unwrap()
    };

    let out = remote(&["--json", "vm", "ls"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let listed = json(&out);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "web");
    let out = remote(&["vm", "stop", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = json(&d.cli(&["--json", "vm", "show", "web"]));
    assert_eq!(shown["state"], "stopped", "{shown}");

    // Without the CA the gateway is not trusted; with a wrong key it refuses.
    let out = std::process::Command::new(support::cli_bin())
        .args(["--url", &url, "vm", "ls"])
        .env("VMKIT_API_KEY", &secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let wrong = d.data_dir.join("wrong.key");
    std::fs::write(&wrong, "vmk_nobody_secret").unwrap();
    let out = std::process::Command::new(support::cli_bin())
        .args(["--url", &url, "--ca-file"])
        .arg(&ca)
        .arg("--key-file")
        .arg(&wrong)
        .args(["vm", "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown, revoked or expired"),
        "{}",
        stderr(&out)
    );
}
