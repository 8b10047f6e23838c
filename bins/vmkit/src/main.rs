//! vmkit: the operator CLI, a thin client of the vmkit-gateway API.
//!
//! Exit codes: 0 success, 1 failure, 2 usage. `vmkit vm exec` exits with the
//! command's own status (128 + signal when killed, 124 on timeout).

mod client;
mod image;
mod shell;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde::Serialize;
use vmkit_core::api::{
    AddUser, CreateVm, CreatedInvite, ExecBody, ExecLine, InviteInfo, NameBody, NewApiKey,
    NewInvite, SshKeyInfo, UserInfo, decode_bytes, encode_bytes,
};
use vmkit_core::{
    ApiKeyView, Deleted, Event, EventKind, MetricsView, Role, SnapshotView, VmName, VmView,
};

use crate::client::{Api, CallError};

/// Instant Linux VMs on hosts you own.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// The daemon's data directory [env: VMKIT_DATA_DIR; default /var/lib/vmkit as root].
    #[arg(long, global = true, env = "VMKIT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The daemon's API socket [default: DATA_DIR/vmkit.sock].
    #[arg(long, global = true, env = "VMKIT_SOCKET")]
    socket: Option<PathBuf>,
    /// A remote gateway's HTTPS address (`https://DOMAIN[:PORT]`), to drive it with an
    /// API key instead of the local socket.
    #[arg(long, global = true, env = "VMKIT_URL")]
    url: Option<String>,
    /// A file holding the API key for --url (the VMKIT_API_KEY variable takes its
    /// place when set).
    #[arg(long, global = true, env = "VMKIT_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for --url besides the system's: a gateway
    /// with a local CA (`vmkit ca` there prints it).
    #[arg(long, global = true, env = "VMKIT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list and drive VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Build and list images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List and delete snapshots (take them with `vmkit vm snapshot`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Register, list and remove your SSH public keys. VMs get your keys when they
    /// are created or started, so a change reaches a running VM at its next start.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Make, list and revoke your API keys (`vmk_...`), for programs that call
    /// vmkit on your behalf.
    #[command(name = "api-key", subcommand)]
    ApiKey(ApiKeyCommand),
    /// Serve a VM at a domain of its owner's too (`https://HOST/`), once DNS proves
    /// the name theirs; list and detach them.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Add, list, suspend and remove the host's users (the operator's).
    #[command(subcommand)]
    User(UserCommand),
    /// Make, list and withdraw invite codes: with `[users] registration = "invite"`
    /// in the daemon's configuration, each lets one person register.
    #[command(subcommand)]
    Invite(InviteCommand),
    /// Print the certificate of the HTTPS edge's local CA (PEM), for browsers and
    /// tools to trust: `vmkit ca > vmkit-ca.crt`, then add it to the system's or
    /// the browser's trust store, or `curl --cacert vmkit-ca.crt`.
    Ca,
    /// Check this host: KVM, cloud-hypervisor, QEMU, network permissions, disk; and
    /// which hypervisor `auto` picks.
    Doctor {
        /// The cloud-hypervisor program to look for.
        #[arg(long, default_value = "cloud-hypervisor")]
        cloud_hypervisor: PathBuf,
        /// The QEMU program to look for.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
    },
    /// Show the event log: the newest events, like `tail`.
    ///
    /// Events are numbered from 1 (SEQ, the first column). Without options this
    /// prints the newest 1000, oldest first; page with --after and --limit
    /// (`--after 0` starts at the first event). With --follow it then prints every
    /// new event as it happens, none skipped or printed twice, until interrupted.
    Events {
        /// After the stored events, keep printing new ones as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Start after the event numbered SEQ instead of at the newest ones.
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        /// How many stored events to print: the newest N, or the first N after
        /// --after (at most 10000). With --follow and no --after: start at the
        /// newest N (0: print only new events).
        #[arg(long, short = 'n', value_name = "N", default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Create a VM and wait until it is ready.
    Create(CreateArgs),
    /// List VMs.
    Ls,
    /// Show one VM.
    Show {
        /// VM name.
        name: String,
    },
    /// Delete a VM and everything it holds.
    Rm {
        /// VM name.
        name: String,
        /// Keep the data volume: vmkit hands it over (prints where it went) and
        /// never deletes it.
        #[arg(long)]
        keep_data: bool,
    },
    /// Start a stopped VM.
    Start {
        /// VM name.
        name: String,
    },
    /// Stop a running VM (graceful, then forced).
    Stop {
        /// VM name.
        name: String,
    },
    /// Restart a VM.
    Restart {
        /// VM name.
        name: String,
    },
    /// Pause a running VM's vCPUs.
    Pause {
        /// VM name.
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM name.
        name: String,
    },
    /// Run a command in a VM; its output streams and its exit status is returned.
    Exec(ExecArgs),
    /// A shell in a VM through its agent (any image, with or without sshd): a login
    /// shell, or COMMAND; with a terminal when this one is.
    ///
    /// Example: `vmkit vm shell web`, `vmkit vm shell web --user vmkit -- top`,
    /// `tar c dir | vmkit vm shell web -- tar x -C /srv`.
    Shell {
        /// VM name.
        name: String,
        /// The user in the guest (root by default).
        #[arg(long, short)]
        user: Option<String>,
        /// Give the command a terminal even when this is none.
        #[arg(short = 't', conflicts_with = "no_tty")]
        tty: bool,
        /// No terminal, even when this is one: standard input is piped.
        #[arg(short = 'T')]
        no_tty: bool,
        /// Extra environment, KEY=VALUE (repeatable).
        #[arg(long, short, value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// The command and its arguments (the user's login shell when none).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Change a VM's vCPUs, memory or data disk (a running VM only what its
    /// hypervisor can change live; disks grow while the VM is stopped).
    Resize {
        /// VM name.
        name: String,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// Data disk in GiB (grow only).
        #[arg(long)]
        disk: Option<u64>,
    },
    /// Rename a VM (settled: running, paused or stopped); a running guest is
    /// told its new host name.
    Rename {
        /// VM name.
        name: String,
        /// Its new name.
        new: String,
    },
    /// Print the tail of a VM's console.
    Logs {
        /// VM name.
        name: String,
        /// How much of the end of the console, in bytes.
        #[arg(long, default_value_t = 64 << 10)]
        bytes: usize,
        /// Show this systemd unit's journal in the guest instead of the console.
        #[arg(long, conflicts_with = "file")]
        unit: Option<String>,
        /// Show this file in the guest (an absolute path) instead of the console.
        #[arg(long)]
        file: Option<String>,
        /// How many of the last lines of the unit or file (at most 5000).
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: u32,
        /// Keep printing the unit's or file's new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Show what a VM uses: vCPUs and memory from its VMM, CPU, memory, disk, load
    /// and uptime from its agent.
    Metrics {
        /// VM name.
        name: String,
    },
    /// Take a named snapshot of a VM (a running VM is paused for it).
    Snapshot {
        /// VM name.
        name: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Restore a VM to one of its snapshots; it keeps its name, address and MAC.
    Restore {
        /// VM name.
        name: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Copy a VM (or a snapshot, with --from-snapshot) into a new VM with its own
    /// name, address, MAC and host name.
    Cp {
        /// The VM (or snapshot) to copy.
        source: String,
        /// The new VM's name; generated when omitted.
        name: Option<String>,
        /// SOURCE names a snapshot.
        #[arg(long)]
        from_snapshot: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// List snapshots.
    Ls,
    /// Delete a snapshot.
    Rm {
        /// Snapshot name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Register an SSH public key.
    Add {
        /// The public key file (one OpenSSH key line), `-` for standard input
        /// [default: ~/.ssh/id_ed25519.pub, else ~/.ssh/id_rsa.pub].
        file: Option<PathBuf>,
    },
    /// List your SSH public keys.
    Ls,
    /// Remove an SSH public key.
    Rm {
        /// Its fingerprint, `SHA256:...` as `vmkit key ls` or `ssh-keygen -l` shows it.
        fingerprint: String,
    },
}

#[derive(Subcommand, Debug)]
enum DomainCommand {
    /// Attach HOST to VM NAME; without a proof in DNS, says what to publish (a TXT
    /// record `_vmkit-challenge.HOST`, or HOST as a CNAME to NAME.DOMAIN).
    Add {
        /// The VM.
        name: String,
        /// The host name, such as app.example.com.
        host: String,
    },
    /// List custom domains (one VM's when named).
    Ls {
        /// The VM.
        name: Option<String>,
    },
    /// Detach HOST from its VM.
    Rm {
        /// The host name.
        host: String,
    },
}

#[derive(Subcommand, Debug)]
enum ApiKeyCommand {
    /// Make an API key; its secret is printed this once.
    New {
        /// What you call it.
        #[arg(long, value_name = "L", default_value = "")]
        label: String,
        /// It stops working after this long, such as 90m, 12h, 30d or 8w [default:
        /// never].
        #[arg(long, value_name = "LIFETIME", value_parser = vmkit_core::parse_lifetime)]
        expires: Option<std::time::Duration>,
        /// It may only read: lists, details, logs, metrics, shares.
        #[arg(long)]
        read_only: bool,
        /// It sees and acts on this VM only.
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
    },
    /// List your API keys (never their secrets).
    Ls,
    /// Revoke an API key: it stops working at once.
    Rm {
        /// Its id, as `vmkit api-key ls` shows it.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a user, whatever the registration policy.
    Add {
        /// Their handle: 1 to 32 lowercase letters, digits or hyphens.
        handle: String,
        /// Their first SSH public key: a .pub file, `-` for standard input.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Their email address.
        #[arg(long, value_name = "E")]
        email: Option<String>,
        /// Make them an administrator.
        #[arg(long)]
        admin: bool,
    },
    /// List users.
    Ls,
    /// Remove a user, their SSH keys, API keys and quota, and delete or hand over
    /// their VMs and snapshots (one of the two options is required).
    #[command(group(clap::ArgGroup::new("vms").required(true).args(["delete_vms", "hand_over"])))]
    Rm {
        /// The user's handle.
        handle: String,
        /// Delete their VMs and snapshots.
        #[arg(long)]
        delete_vms: bool,
        /// Give their VMs and snapshots to this user (even past that user's quota).
        #[arg(long, value_name = "HANDLE")]
        hand_over: Option<String>,
    },
    /// Suspend a user: they are refused at sign-in; their VMs keep running.
    Suspend {
        /// The user's handle.
        handle: String,
    },
    /// Let a suspended user back in.
    Resume {
        /// The user's handle.
        handle: String,
    },
}

#[derive(Subcommand, Debug)]
enum InviteCommand {
    /// Make an invite and print its code, once: only its hash is kept.
    New {
        /// How long it counts: a number with s, m, h, d or w (`90m`, `7d`).
        #[arg(long, default_value = "7d", value_parser = parse_ttl)]
        ttl: u64,
        /// The person who registers with it is an administrator.
        #[arg(long)]
        admin: bool,
    },
    /// List invites (never their codes).
    Ls,
    /// Withdraw an invite: its code no longer counts.
    Rm {
        /// Its id, as `vmkit invite ls` shows it.
        id: String,
    },
}

/// A lifetime such as `90m` or `7d`, in seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(unit_at);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a lifetime such as 90m, 12h or 7d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "{s:?}: give the unit, one of s, m, h, d, w (such as 7d)"
            ));
        }
    };
    match number.checked_mul(scale) {
        Some(0) => Err("an invite must last at least one second".to_owned()),
        Some(secs) => Ok(secs),
        None => Err(format!("{s:?} is too long")),
    }
}

/// `secs` as the largest whole unit: `7d`, `12h`, `90m`.
fn format_duration(secs: u64) -> String {
    match secs {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Name (DNS label); a readable one is generated when omitted.
    name: Option<String>,
    /// Image to boot.
    #[arg(long)]
    image: Option<String>,
    /// vCPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// Data disk in GiB.
    #[arg(long)]
    disk: Option<u64>,
    /// Root disk in GiB [default: the daemon's default_root_gib; 0 keeps the image's
    /// size].
    #[arg(long)]
    root: Option<u64>,
}

#[derive(Args, Debug)]
struct ExecArgs {
    /// VM name.
    name: String,
    /// Pass this process's standard input to the command.
    #[arg(long, short)]
    interactive: bool,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Extra environment, KEY=VALUE (repeatable).
    #[arg(long, short, value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build an image from its recipe (rebuilt only when the recipe changes).
    Build {
        /// Image name (`tiny`).
        name: String,
        /// The static vmkit-agent binary to put in the image.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Rebuild even if the recipe did not change.
        #[arg(long)]
        force: bool,
    },
    /// List built images.
    Ls,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmkit: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            report(&e, json);
            ExitCode::FAILURE
        }
    }
}

fn report(e: &anyhow::Error, json: bool) {
    if json {
        let (code, message) = match e.downcast_ref::<CallError>() {
            Some(CallError::Api { body, .. }) => (body.code.clone(), body.message.clone()),
            Some(CallError::Unreachable { .. }) => ("unreachable".to_owned(), e.to_string()),
            _ => ("error".to_owned(), format!("{e:#}")),
        };
        println!(
            "{}",
            serde_json::json!({ "error": { "code": code, "message": message } })
        );
    } else {
        eprintln!("vmkit: {e:#}");
    }
}

fn data_dir(cli: &Cli) -> PathBuf {
    cli.data_dir
        .clone()
        .unwrap_or_else(vmkit_core::api::default_data_dir)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = data_dir(&cli);
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| vmkit_core::api::socket_path(&dir));
    let api = match &cli.url {
        Some(url) => {
            let key = match std::env::var("VMKIT_API_KEY") {
                Ok(key) => key,
                Err(_) => {
                    let file = cli.key_file.as_ref().context(
                        "--url needs an API key: --key-file FILE or the VMKIT_API_KEY variable",
                    )?;
                    std::fs::read_to_string(file)
                        .with_context(|| format!("reading the API key from {}", file.display()))?
                }
            };
            Api::remote(url, &key, cli.ca_file.as_deref())?
        }
        None => Api::new(&socket),
    };
    let json = cli.json;
    match cli.command {
        Command::Vm(cmd) => vm(&api, cmd, json).await,
        Command::Snapshot(cmd) => snapshots(&api, cmd, json).await,
        Command::Key(cmd) => keys(&api, cmd, json).await,
        Command::ApiKey(cmd) => api_keys(&api, cmd, json).await,
        Command::Domain(cmd) => domains(&api, cmd, json).await,
        Command::User(cmd) => users(&api, cmd, json).await,
        Command::Invite(cmd) => invites(&api, cmd, json).await,
        Command::Image(ImageCommand::Build { name, agent, force }) => {
            if !image::recipes().any(|r| r == name) {
                anyhow::bail!(
                    "no recipe for image {name:?}; known images: {}",
                    image::recipes().collect::<Vec<_>>().join(", ")
                );
            }
            let agent = image::find_agent(agent.as_deref())?;
            let outcome = image::build(&image::BuildOptions {
                name: name.clone(),
                images_dir: dir.join("images"),
                cache_dir: dir.join("cache"),
                agent,
                force,
            })?;
            if json {
                print_json(&serde_json::json!({
                    "name": name,
                    "manifest": outcome.manifest_path,
                    "rebuilt": outcome.rebuilt,
                }))?;
            } else if outcome.rebuilt {
                println!("built image {name}: {}", outcome.manifest_path.display());
            } else {
                println!(
                    "image {name} is up to date: {}",
                    outcome.manifest_path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image(ImageCommand::Ls) => {
            let names: Vec<String> = api.json(Method::GET, "/v1/images", None::<&()>).await?;
            if json {
                print_json(&names)?;
            } else {
                for n in names {
                    println!("{n}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca => {
            let pem = api.text(Method::GET, "/v1/https/ca").await?;
            if json {
                print_json(&serde_json::json!({ "certificate": pem }))?;
            } else {
                print!("{pem}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor {
            cloud_hypervisor,
            qemu,
        } => doctor(&dir, cloud_hypervisor, qemu, json).await,
        Command::Events {
            follow,
            after,
            limit,
        } => events(&api, follow, after, limit, json).await,
    }
}

async fn events(
    api: &Api,
    follow: bool,
    after: Option<u64>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut path = format!("/v1/events?limit={limit}&follow={follow}");
    if let Some(after) = after {
        path.push_str(&format!("&after={after}"));
    }
    let (mut first, mut last, mut count) = (None, None, 0usize);
    // Where the kept history starts: the daemon's retention rule removed older events.
    let mut kept_from = 1u64;
    let streamed = api
        .lines_with_headers(
            Method::GET,
            &path,
            None::<&()>,
            |headers| {
                kept_from = headers
                    .get(vmkit_core::api::FIRST_EVENT_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
            },
            |e: Event| {
                first.get_or_insert(e.seq);
                last = Some(e.seq);
                count += 1;
                if json {
                    print_json(&e)
                } else {
                    println!("{}", event_line(&e));
                    Ok(std::io::stdout().flush()?)
                }
            },
        )
        .await;
    if follow {
        // A follow ends only when something broke; say where to pick it up.
        let resume = match last.or(after) {
            Some(seq) => format!("vmkit events --follow --after {seq}"),
            None => "vmkit events --follow".to_owned(),
        };
        let ended = format!("the event stream ended; resume with `{resume}`");
        return Err(match streamed {
            Err(e @ (CallError::Api { .. } | CallError::Unreachable { .. })) => e.into(),
            Err(e) => anyhow::Error::new(e).context(ended),
            Ok(()) => anyhow::anyhow!("{ended} (did the daemon stop?)"),
        });
    }
    streamed?;
    if !json {
        // Hints on stderr: stdout holds only events.
        match (after, first, last) {
            (None, Some(first), _) if first > kept_from => eprintln!(
                "(older events: `vmkit events --after {} --limit {limit}`)",
                (first - 1)
                    .saturating_sub(limit as u64)
                    .max(kept_from.saturating_sub(1))
            ),
            (None, Some(first), _) if first > 1 => eprintln!(
                "(the history starts at event {first}: older ones were removed by the \
                 daemon's retention rule, [events] in its configuration)"
            ),
            (Some(_), _, Some(last)) if count == limit => {
                eprintln!("(more events may follow: `vmkit events --after {last} --limit {limit}`)")
            }
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn vm(api: &Api, cmd: VmCommand, json: bool) -> anyhow::Result<ExitCode> {
    let show = |vm: &VmView| -> anyhow::Result<()> {
        if json {
            print_json(vm)
        } else {
            print_vm(vm);
            Ok(())
        }
    };
    match cmd {
        VmCommand::Create(args) => {
            let mut body = CreateVm::default();
            body.name = args.name;
            body.image = args.image;
            body.vcpus = args.cpus;
            body.memory_mib = args.memory;
            body.disk_gib = args.disk;
            body.root_gib = args.root;
            if !json {
                eprintln!("creating VM (this waits until it has booted)...");
            }
            let vm: VmView = api.json(Method::POST, "/v1/vms", Some(&body)).await?;
            show(&vm)?;
            if !json {
                println!("\nnext: vmkit vm exec {} -- uname -a", vm.name);
            }
        }
        VmCommand::Ls => {
            let vms: Vec<VmView> = api.json(Method::GET, "/v1/vms", None::<&()>).await?;
            if json {
                print_json(&vms)?;
            } else {
                print_table(&vms);
            }
        }
        VmCommand::Show { name } => {
            let vm: VmView = api
                .json(Method::GET, &format!("/v1/vms/{name}"), None::<&()>)
                .await?;
            show(&vm)?;
        }
        VmCommand::Rm { name, keep_data } => {
            let path = format!("/v1/vms/{name}?keep_data={keep_data}");
            // Only a delete that keeps the data answers, with where it went.
            let kept = if keep_data {
                let deleted: Deleted = api.json(Method::DELETE, &path, None::<&()>).await?;
                deleted.kept_data
            } else {
                api.send(Method::DELETE, &path, None::<&()>).await?;
                None
            };
            if json {
                print_json(&serde_json::json!({ "deleted": name, "kept_data": kept }))?;
            } else {
                match (kept, keep_data) {
                    (Some(path), _) => {
                        println!("deleted {name}; kept the data volume at {}", path.display())
                    }
                    (None, true) => println!("deleted {name}; it had no data volume to keep"),
                    (None, false) => println!("deleted {name}"),
                }
            }
        }
        VmCommand::Start { name } => {
            let vm: VmView = api
                .json(Method::POST, &format!("/v1/vms/{name}/start"), None::<&()>)
                .await?;
            show(&vm)?;
        }
        VmCommand::Stop { name } => {
            let vm: VmView = api
                .json(Method::POST, &format!("/v1/vms/{name}/stop"), None::<&()>)
                .await?;
            show(&vm)?;
        }
        VmCommand::Restart { name } => {
            let vm: VmView = api
                .json(
                    Method::POST,
                    &format!("/v1/vms/{name}/restart"),
                    None::<&()>,
                )
                .await?;
            show(&vm)?;
        }
        VmCommand::Pause { name } => {
            let vm: VmView = api
                .json(Method::POST, &format!("/v1/vms/{name}/pause"), None::<&()>)
                .await?;
            show(&vm)?;
        }
        VmCommand::Resume { name } => {
            let vm: VmView = api
                .json(Method::POST, &format!("/v1/vms/{name}/resume"), None::<&()>)
                .await?;
            show(&vm)?;
        }
        VmCommand::Exec(args) => return exec(api, args, json).await,
        VmCommand::Shell {
            name,
            user,
            tty,
            no_tty,
            env,
            command,
        } => {
            let tty = match (tty, no_tty) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let args = shell::ShellArgs {
                name,
                user,
                tty,
                env,
                command,
            };
            return shell::shell(api, args).await;
        }
        VmCommand::Resize {
            name,
            cpus,
            memory,
            disk,
        } => {
            let mut body = vmkit_core::ResizeRequest::new();
            body.vcpus = cpus;
            body.memory_mib = memory;
            body.disk_gib = disk;
            let vm: VmView = api
                .json(Method::POST, &format!("/v1/vms/{name}/resize"), Some(&body))
                .await?;
            show(&vm)?;
        }
        VmCommand::Rename { name, new } => {
            let vm: VmView = api
                .json(
                    Method::POST,
                    &format!("/v1/vms/{name}/rename"),
                    Some(&serde_json::json!({ "name": new })),
                )
                .await?;
            show(&vm)?;
        }
        VmCommand::Logs {
            name,
            bytes,
            unit,
            file,
            lines,
            follow,
        } => {
            let source = match (&unit, &file) {
                (Some(unit), _) => Some(format!("unit={}", client::path_segment(unit))),
                (None, Some(file)) => Some(format!("file={}", client::path_segment(file))),
                (None, None) if follow => anyhow::bail!(
                    "--follow needs --unit or --file: the console can only be shown, not followed"
                ),
                (None, None) => None,
            };
            if let Some(source) = source {
                guest_log(api, &name, &source, lines, follow, json).await?;
            } else {
                let text = api
                    .text(Method::GET, &format!("/v1/vms/{name}/logs?bytes={bytes}"))
                    .await?;
                if json {
                    print_json(&serde_json::json!({ "console": text }))?;
                } else {
                    print!("{}", for_terminal(&text));
                }
            }
        }
        VmCommand::Metrics { name } => {
            let m: MetricsView = api
                .json(Method::GET, &format!("/v1/vms/{name}/metrics"), None::<&()>)
                .await?;
            if json {
                print_json(&m)?;
            } else {
                print_metrics(&m);
            }
        }
        VmCommand::Snapshot { name, snapshot } => {
            let body = NameBody::new(Some(snapshot));
            let taken: SnapshotView = api
                .json(
                    Method::POST,
                    &format!("/v1/vms/{name}/snapshots"),
                    Some(&body),
                )
                .await?;
            if json {
                print_json(&taken)?;
            } else {
                let kind = if taken.memory {
                    "disks and memory"
                } else {
                    "disks"
                };
                println!(
                    "snapshot {} of {} taken ({kind})",
                    taken.name, taken.vm_name
                );
            }
        }
        VmCommand::Restore { name, snapshot } => {
            let body = NameBody::new(Some(snapshot));
            let vm: VmView = api
                .json(
                    Method::POST,
                    &format!("/v1/vms/{name}/restore"),
                    Some(&body),
                )
                .await?;
            show(&vm)?;
        }
        VmCommand::Cp {
            source,
            name,
            from_snapshot,
        } => {
            let path = if from_snapshot {
                format!("/v1/snapshots/{source}/clone")
            } else {
                format!("/v1/vms/{source}/clone")
            };
            if !json {
                eprintln!("copying {source} (this waits until the copy has booted)...");
            }
            let vm: VmView = api
                .json(Method::POST, &path, Some(&NameBody::new(name)))
                .await?;
            show(&vm)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn snapshots(api: &Api, cmd: SnapshotCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Ls => {
            let all: Vec<SnapshotView> =
                api.json(Method::GET, "/v1/snapshots", None::<&()>).await?;
            if json {
                print_json(&all)?;
            } else {
                println!("{:<24} {:<24} {:<8} CREATED", "NAME", "VM", "MEMORY");
                for s in all {
                    println!(
                        "{:<24} {:<24} {:<8} {}",
                        s.name,
                        s.vm_name,
                        if s.memory { "yes" } else { "no" },
                        s.created_at
                    );
                }
            }
        }
        SnapshotCommand::Rm { name } => {
            api.send(
                Method::DELETE,
                &format!("/v1/snapshots/{name}"),
                None::<&()>,
            )
            .await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted snapshot {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn keys(api: &Api, cmd: KeyCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        KeyCommand::Add { file } => {
            let (text, from) = read_public_key(file)?;
            let key: SshKeyInfo = api
                .json_from_text(Method::POST, "/v1/keys", text)
                .await
                .with_context(|| format!("adding the key from {from}"))?;
            if json {
                print_json(&key)?;
            } else {
                println!("added SSH key {} {}", key.fingerprint, key.comment);
                println!("VMs get it when they are next created or started");
            }
        }
        KeyCommand::Ls => {
            let keys: Vec<SshKeyInfo> = api.json(Method::GET, "/v1/keys", None::<&()>).await?;
            if json {
                print_json(&keys)?;
            } else if keys.is_empty() {
                println!("no SSH keys; add yours with `vmkit key add`");
            } else {
                println!("{:<51} {:<20} COMMENT", "FINGERPRINT", "TYPE");
                for k in keys {
                    println!("{:<51} {:<20} {}", k.fingerprint, k.algorithm, k.comment);
                }
            }
        }
        KeyCommand::Rm { fingerprint } => {
            let path = format!("/v1/keys/{}", client::path_segment(&fingerprint));
            api.send(Method::DELETE, &path, None::<&()>).await?;
            if json {
                print_json(&serde_json::json!({ "removed": fingerprint }))?;
            } else {
                println!("removed SSH key {fingerprint}");
                println!("VMs lose it when they are next started");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn api_keys(api: &Api, cmd: ApiKeyCommand, json: bool) -> anyhow::Result<ExitCode> {
    let terms = |k: &ApiKeyView| -> String {
        let now = vmkit_core::Timestamp::now();
        let mut terms = vec![k.scope.to_string()];
        if let Some(vm) = &k.vm {
            terms.push(format!("VM {vm}"));
        }
        terms.push(match k.expires_at {
            Some(_) if k.expired => "expired".to_owned(),
            Some(at) => format!(
                "expires in {}",
                format_duration(at.0.saturating_sub(now.0) / 1000)
            ),
            None => "never expires".to_owned(),
        });
        terms.join(", ")
    };
    match cmd {
        ApiKeyCommand::New {
            label,
            expires,
            read_only,
            vm,
        } => {
            let vm = vm
                .map(|v| VmName::new(&v).with_context(|| format!("{v:?} is not a VM name")))
                .transpose()?;
            let mut body = NewApiKey::default();
            body.label = label;
            body.expires_in_secs = expires.map(|d| d.as_secs());
            body.read_only = read_only;
            body.vm = vm;
            let key: ApiKeyView = api.json(Method::POST, "/v1/api-keys", Some(&body)).await?;
            if json {
                print_json(&key)?;
            } else {
                println!("made API key {} ({})", key.id, terms(&key));
                println!("it is shown this once; keep it now:");
                println!("{}", key.secret.as_deref().unwrap_or_default());
            }
        }
        ApiKeyCommand::Ls => {
            let keys: Vec<ApiKeyView> = api.json(Method::GET, "/v1/api-keys", None::<&()>).await?;
            if json {
                print_json(&keys)?;
            } else if keys.is_empty() {
                println!("no API keys; make one with `vmkit api-key new`");
            } else {
                println!("{:<12} {:<20} TERMS", "ID", "LABEL");
                for k in keys {
                    let label = if k.label.is_empty() { "-" } else { &k.label };
                    println!("{:<12} {:<20} {}", k.id, label, terms(&k));
                }
            }
        }
        ApiKeyCommand::Rm { id } => {
            let path = format!("/v1/api-keys/{}", client::path_segment(&id));
            api.send(Method::DELETE, &path, None::<&()>).await?;
            if json {
                print_json(&serde_json::json!({ "revoked": id }))?;
            } else {
                println!("revoked API key {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn domains(api: &Api, cmd: DomainCommand, json: bool) -> anyhow::Result<ExitCode> {
    let name = |n: &str| VmName::new(n).with_context(|| format!("{n:?} is not a VM name"));
    match cmd {
        DomainCommand::Add { name: vm, host } => {
            let vm = name(&vm)?;
            let path = format!("/v1/vms/{}/domains", client::path_segment(vm.as_str()));
            let body = vmkit_core::api::DomainBody::new(host);
            let added: vmkit_core::DomainView = api.json(Method::POST, &path, Some(&body)).await?;
            if json {
                print_json(&added)?;
            } else {
                println!("{} now reaches {}", added.host, added.vm);
            }
        }
        DomainCommand::Ls { name: vm } => {
            let path = match vm {
                Some(vm) => format!(
                    "/v1/domains?vm={}",
                    client::path_segment(name(&vm)?.as_str())
                ),
                None => "/v1/domains".to_owned(),
            };
            let domains: Vec<vmkit_core::DomainView> =
                api.json(Method::GET, &path, None::<&()>).await?;
            if json {
                print_json(&domains)?;
            } else if domains.is_empty() {
                println!("no custom domains; attach one with `vmkit domain add NAME HOST`");
            } else {
                for d in domains {
                    println!("{}\t{}", d.host, d.vm);
                }
            }
        }
        DomainCommand::Rm { host } => {
            let path = format!("/v1/domains/{}", client::path_segment(&host));
            api.send(Method::DELETE, &path, None::<&()>).await?;
            if json {
                print_json(&serde_json::json!({ "removed": host }))?;
            } else {
                println!("detached {host}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn users(api: &Api, cmd: UserCommand, json: bool) -> anyhow::Result<ExitCode> {
    let show = |user: &UserInfo| -> anyhow::Result<()> {
        if json {
            print_json(user)
        } else {
            println!(
                "{} ({}, {}){}",
                user.handle,
                user.role,
                user.status,
                user.email
                    .as_deref()
                    .map(|e| format!(" <{e}>"))
                    .unwrap_or_default()
            );
            for key in &user.ssh_keys {
                println!("  {} {}", key.fingerprint, key.comment);
            }
            Ok(())
        }
    };
    match cmd {
        UserCommand::Add {
            handle,
            key,
            email,
            admin,
        } => {
            let mut body = AddUser::new(handle);
            body.email = email;
            body.role = Some(if admin { Role::Admin } else { Role::User });
            let from = match key {
                Some(file) => {
                    let (text, from) = read_public_key(Some(file))?;
                    body.ssh_key = Some(text);
                    Some(from)
                }
                None => None,
            };
            let added: Result<UserInfo, _> = api.json(Method::POST, "/v1/users", Some(&body)).await;
            let user = match from {
                Some(from) => {
                    added.with_context(|| format!("adding the user with the key from {from}"))?
                }
                None => added?,
            };
            show(&user)?;
        }
        UserCommand::Ls => {
            let users: Vec<UserInfo> = api.json(Method::GET, "/v1/users", None::<&()>).await?;
            if json {
                print_json(&users)?;
            } else if users.is_empty() {
                println!("no users; add one with `vmkit user add HANDLE --key FILE`");
            } else {
                println!(
                    "{:<33} {:<6} {:<10} {:<5} EMAIL",
                    "HANDLE", "ROLE", "STATUS", "KEYS"
                );
                for u in users {
                    println!(
                        "{:<33} {:<6} {:<10} {:<5} {}",
                        u.handle,
                        u.role,
                        u.status,
                        u.ssh_keys.len(),
                        u.email.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        UserCommand::Rm {
            handle,
            delete_vms,
            hand_over,
        } => {
            let query = match &hand_over {
                Some(to) => format!("hand_over={}", client::path_segment(to)),
                None if delete_vms => "vms=delete".to_owned(),
                None => anyhow::bail!("give --delete-vms or --hand-over HANDLE"),
            };
            let path = format!("/v1/users/{}?{query}", client::path_segment(&handle));
            api.send(Method::DELETE, &path, None::<&()>).await?;
            if json {
                print_json(&serde_json::json!({ "removed": handle, "hand_over": hand_over }))?;
            } else {
                match hand_over {
                    Some(to) => {
                        println!("removed user {handle}; their VMs and snapshots are {to}'s now")
                    }
                    None => println!("removed user {handle} with their VMs and snapshots"),
                }
            }
        }
        UserCommand::Suspend { handle } => {
            let path = format!("/v1/users/{}/suspend", client::path_segment(&handle));
            show(&api.json(Method::POST, &path, None::<&()>).await?)?;
        }
        UserCommand::Resume { handle } => {
            let path = format!("/v1/users/{}/resume", client::path_segment(&handle));
            show(&api.json(Method::POST, &path, None::<&()>).await?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn invites(api: &Api, cmd: InviteCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        InviteCommand::New { ttl, admin } => {
            let mut body = NewInvite::default();
            body.ttl_secs = Some(ttl);
            body.role = Some(if admin { Role::Admin } else { Role::User });
            let created: CreatedInvite = api.json(Method::POST, "/v1/invites", Some(&body)).await?;
            if json {
                print_json(&created)?;
            } else {
                println!(
                    "invite {} for a new {}, valid for {}:\n\n    {}\n",
                    created.invite.id,
                    created.invite.role,
                    format_duration(ttl),
                    created.code
                );
                println!(
                    "this code is shown only now; give it to the person you invite. It counts \
                     once, while the daemon's [users] registration is \"invite\" or \"open\""
                );
            }
        }
        InviteCommand::Ls => {
            let invites: Vec<InviteInfo> =
                api.json(Method::GET, "/v1/invites", None::<&()>).await?;
            if json {
                print_json(&invites)?;
            } else if invites.is_empty() {
                println!("no invites; make one with `vmkit invite new`");
            } else {
                let now = vmkit_core::Timestamp::now();
                println!("{:<12} {:<6} EXPIRES", "ID", "ROLE");
                for i in invites {
                    let expires = if i.expired {
                        "expired".to_owned()
                    } else {
                        format!(
                            "in {}",
                            format_duration(i.expires_at.0.saturating_sub(now.0) / 1000)
                        )
                    };
                    println!("{:<12} {:<6} {expires}", i.id, i.role);
                }
            }
        }
        InviteCommand::Rm { id } => {
            let path = format!("/v1/invites/{}", client::path_segment(&id));
            api.send(Method::DELETE, &path, None::<&()>).await?;
            if json {
                print_json(&serde_json::json!({ "removed": id }))?;
            } else {
                println!("withdrew invite {id}: its code no longer counts");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The text of the public key file `file` (`-`: standard input; none: the user's
/// default key) and where it came from.
fn read_public_key(file: Option<PathBuf>) -> anyhow::Result<(String, String)> {
    let path = match file {
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the key from standard input")?;
            return Ok((text, "standard input".to_owned()));
        }
        Some(path) => path,
        None => {
            let home = std::env::var_os("HOME")
                .context("HOME is not set; give the public key file: `vmkit key add FILE`")?;
            default_public_key(std::path::Path::new(&home))?
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the public key file {}", path.display()))?;
    // Never send a private key anywhere, not even to the local daemon.
    if text.contains("PRIVATE KEY") {
        anyhow::bail!(
            "{} is a private key; give the public one (its .pub file)",
            path.display()
        );
    }
    Ok((text, path.display().to_string()))
}

/// `HOME/.ssh/id_ed25519.pub`, else `HOME/.ssh/id_rsa.pub`.
fn default_public_key(home: &std::path::Path) -> anyhow::Result<PathBuf> {
    let ssh = home.join(".ssh");
    let candidates = [ssh.join("id_ed25519.pub"), ssh.join("id_rsa.pub")];
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no public key at {} or {}; give the file (`vmkit key add FILE`, `-` for \
                 standard input) or make a key with `ssh-keygen -t ed25519`",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

fn print_metrics(m: &MetricsView) {
    println!("{}: {}", m.name, m.state);
    println!("  vmm:   {} vCPUs, {} MiB", m.vmm.vcpus, m.vmm.memory_mib);
    match &m.guest {
        Some(g) => {
            println!("  cpu:   {:.1}%", g.cpu_pct);
            println!(
                "  mem:   {:.1}% of {} MiB",
                g.mem_pct,
                g.mem_total_bytes >> 20
            );
            println!("  disk:  {:.1}%", g.disk_pct);
            if let Some(d) = g.data_disk_pct {
                println!("  data:  {d:.1}%");
            }
            println!(
                "  load:  {:.2} {:.2} {:.2}",
                g.load[0], g.load[1], g.load[2]
            );
            println!("  up:    {} s", g.uptime_secs);
        }
        None => println!("  guest: no answer (paused)"),
    }
}

async fn exec(api: &Api, args: ExecArgs, json: bool) -> anyhow::Result<ExitCode> {
    let mut body = ExecBody::new(args.command);
    body.env = args.env;
    body.cwd = args.cwd;
    body.timeout_ms = args.timeout.map(|s| (s * 1000.0) as u64);
    if args.interactive {
        let mut input = Vec::new();
        if std::io::stdin().is_terminal() {
            eprintln!("vmkit: reading standard input until end of file (Ctrl-D)");
        }
        std::io::stdin()
            .read_to_end(&mut input)
            .context("reading standard input")?;
        body.stdin = encode_bytes(&input);
    }
    let mut code = None;
    let mut failure = None;
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    api.lines(
        Method::POST,
        &format!("/v1/vms/{}/exec", args.name),
        Some(&body),
        |line: ExecLine| {
            if json {
                return print_json(&line);
            }
            match line {
                ExecLine::Stdout(b) => {
                    stdout.write_all(&decode_bytes(&b)?)?;
                    stdout.flush()?;
                }
                ExecLine::Stderr(b) => {
                    stderr.write_all(&decode_bytes(&b)?)?;
                    stderr.flush()?;
                }
                ExecLine::Exit(status) => {
                    code = Some(if status.timed_out {
                        124
                    } else if let Some(sig) = status.signal {
                        128 + sig
                    } else {
                        status.code.unwrap_or(1)
                    });
                }
                ExecLine::Error(e) => failure = Some(e.message),
                _ => {}
            }
            Ok(())
        },
    )
    .await?;
    if let Some(message) = failure {
        anyhow::bail!("exec failed: {message}");
    }
    match code {
        Some(c) => Ok(ExitCode::from(c.clamp(0, 255) as u8)),
        None if json => Ok(ExitCode::SUCCESS),
        None => anyhow::bail!("the command's exit status never arrived (agent disconnected?)"),
    }
}

async fn doctor(
    data_dir: &std::path::Path,
    cloud_hypervisor: PathBuf,
    qemu: PathBuf,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use vmkit_hv::probe::{self, Backend, BinaryReport, Preference, ProbeOptions};
    let options = ProbeOptions::new(data_dir)
        .cloud_hypervisor(cloud_hypervisor)
        .qemu(qemu);
    let report = probe::probe_host_with_boot(&options).await;
    let choice = probe::choose_backend(Preference::Auto, &report);
    let qemu_program = report
        .qemu
        .path
        .clone()
        .unwrap_or_else(|| report.qemu.requested.clone());
    let confinement =
        tokio::task::spawn_blocking(move || vmkit_hv::probe_confinement(&qemu_program)).await?;
    let picked = match choice.backend {
        Backend::CloudHypervisor => "cloud-hypervisor",
        _ => "qemu",
    };
    if json {
        print_json(&serde_json::json!({
            "report": report,
            "auto": { "backend": picked, "reason": choice.reason, "problems": choice.problems },
            "confinement": {
                "root": confinement.root,
                "cgroups": confinement.cgroups.as_ref().ok(),
                "cgroups_problem": confinement.cgroups.as_ref().err(),
                "qemu_sandbox": confinement.qemu_sandbox,
                "qemu_ready": confinement.qemu_ready(),
            },
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    let kvm = match (&report.kvm.api_version, &report.kvm.problem) {
        (Some(v), _) => format!("{} opens (API {v})", report.kvm.device.display()),
        (None, Some(p)) => format!("unusable: {p}"),
        (None, None) => "unusable".to_owned(),
    };
    println!("KVM device:        {kvm}");
    match &report.kvm_guest_boot {
        Some(check) => println!("KVM standard guest: {} ({})", yes(check.ok), check.detail),
        None => println!("KVM standard guest: not tried (no usable KVM device or no QEMU)"),
    }
    let binary = |b: &BinaryReport| match (&b.path, &b.problem) {
        (Some(path), _) => format!(
            "{} ({})",
            path.display(),
            b.version.as_deref().unwrap_or("version unknown")
        ),
        (None, Some(problem)) => format!("not usable: {problem}"),
        (None, None) => format!("{} not found", b.requested.display()),
    };
    println!("cloud-hypervisor:  {}", binary(&report.cloud_hypervisor));
    println!("QEMU:              {}", binary(&report.qemu));
    println!(
        "network:           root {}, CAP_NET_ADMIN {} -> {}",
        yes(report.network.root),
        yes(report.network.cap_net_admin),
        if report.network.may_configure() {
            "may create bridges, TAPs and nftables rules"
        } else {
            "cannot create bridges or nftables rules: run the daemon as root"
        }
    );
    println!(
        "nftables:          {}",
        if report.nft.found() {
            binary(&report.nft)
        } else {
            format!(
                "{}; guest networking needs it (Debian: apt-get install nftables)",
                binary(&report.nft)
            )
        }
    );
    match (report.disk.free_bytes, &report.disk.problem) {
        (Some(free), _) => println!(
            "disk:              {:.1} GiB free for {}",
            free as f64 / f64::from(1u32 << 30),
            report.disk.data_dir.display()
        ),
        (None, problem) => println!(
            "disk:              unknown for {} ({})",
            report.disk.data_dir.display(),
            problem.as_deref().unwrap_or("no detail")
        ),
    }
    for tool in &report.tools {
        let name = tool.program.requested.display().to_string();
        let line = if tool.program.found() {
            binary(&tool.program)
        } else {
            format!(
                "{}; {} needs it (Debian: apt-get install {})",
                binary(&tool.program),
                tool.needed_for,
                tool.package
            )
        };
        println!("{:<19}{line}", format!("{name}:"));
    }
    println!(
        "cgroups:           {}",
        match &confinement.cgroups {
            Ok(found) => found.clone(),
            Err(problem) => format!("unusable: {problem}"),
        }
    );
    println!(
        "QEMU sandbox:      {}",
        if confinement.qemu_sandbox {
            "yes (-sandbox with seccomp)"
        } else {
            "no: this QEMU was built without seccomp"
        }
    );
    println!(
        "confinement:       {}",
        if confinement.qemu_ready() {
            "VMMs run as their VM's uid, in their cgroup, under seccomp"
        } else if !confinement.root {
            "not possible: run the daemon as root (or set [confinement] enabled = \"off\")"
        } else {
            "not possible here: see cgroups and QEMU sandbox above (or set [confinement] enabled = \"off\")"
        }
    );
    println!("auto picks:        {picked} ({})", choice.reason);
    for problem in &choice.problems {
        println!("problem:           {problem}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a unit's journal or a file of a guest (`source` is the query naming it),
/// following it when asked.
async fn guest_log(
    api: &Api,
    name: &str,
    source: &str,
    lines: u32,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let path = format!("/v1/vms/{name}/logs?{source}&lines={lines}&follow={follow}");
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    api.lines(
        Method::GET,
        &path,
        None::<&()>,
        |item: serde_json::Value| {
            if json {
                return print_json(&item);
            }
            if let Some(line) = item["line"].as_str() {
                writeln!(stdout, "{}", for_terminal(line))?;
                stdout.flush()?;
            } else if let Some(error) = item["error"].as_str() {
                failed = Some(error.to_owned());
            }
            Ok(())
        },
    )
    .await?;
    match failed {
        Some(error) => anyhow::bail!("reading the log failed: {error}"),
        None => Ok(()),
    }
}

/// `text` from a guest, made safe for the operator's terminal when stdout is one:
/// control characters (escape sequences a hostile guest could send to retitle the
/// window, move the cursor or worse) are shown escaped; newlines and tabs stay.
fn for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    use std::io::IsTerminal;
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !std::io::stdout().is_terminal() || !text.chars().any(unsafe_char) {
        return text.into();
    }
    text.chars()
        .map(|c| match c {
            '\r' => String::new(),
            c if unsafe_char(c) => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect::<String>()
        .into()
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn print_vm(vm: &VmView) {
    println!("name:    {}", vm.name);
    println!("id:      {}", vm.id);
    println!("state:   {}", vm.state);
    if let Some(reason) = &vm.quarantined {
        println!(
            "QUARANTINED: {reason}\n         only `vmkit vm rm {}` is accepted",
            vm.name
        );
    }
    println!("image:   {}", vm.spec.image);
    println!("vcpus:   {}", vm.spec.vcpus);
    println!("memory:  {} MiB", vm.spec.memory_mib);
    println!("disk:    {} GiB", vm.spec.disk_gib);
    if let Some(root) = vm.root_bytes {
        println!("root:    {:.1} GiB", root as f64 / f64::from(1u32 << 30));
    }
    if let Some(ip) = vm.ip {
        println!("ip:      {ip}");
    }
    if let Some(vmm) = vm.resources.as_ref().and_then(|r| r.vmm.as_ref()) {
        println!("vmm:     {} pid {}", vmm.backend, vmm.pid);
    } else if let Some(hypervisor) = &vm.hypervisor {
        println!("vmm:     {hypervisor} (none running)");
    }
    match &vm.health {
        vmkit_core::Health::Healthy => println!("health:  agent answers"),
        vmkit_core::Health::Unhealthy { reason } => println!("health:  UNHEALTHY: {reason}"),
        _ => {}
    }
}

fn print_table(vms: &[VmView]) {
    if vms.is_empty() {
        println!("no VMs; create one with `vmkit vm create`");
        return;
    }
    let width = vms
        .iter()
        .map(|v| v.name.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<11} {:<8} {:>5} {:>8} {:>6}  IP",
        "NAME", "STATE", "IMAGE", "VCPUS", "MEMORY", "DISK"
    );
    for vm in vms {
        println!(
            "{:<width$}  {:<11} {:<8} {:>5} {:>5}MiB {:>3}GiB  {}",
            vm.name.as_str(),
            // Its state is moot: only a delete is accepted.
            if vm.quarantined.is_some() {
                "quarantined"
            } else {
                vm.state.as_str()
            },
            vm.spec.image,
            vm.spec.vcpus,
            vm.spec.memory_mib,
            vm.spec.disk_gib,
            vm.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    if vms.iter().any(|vm| vm.quarantined.is_some()) {
        println!(
            "quarantined: vmkit could not settle the VM after a restart; `vmkit vm show NAME` \
             says why, and only `vmkit vm rm NAME` is accepted"
        );
    }
}

fn event_line(e: &Event) -> String {
    let what = match &e.kind {
        EventKind::StateChanged { from, to } => format!("{from} -> {to}"),
        EventKind::CreateFailed { error } => format!("create failed: {error}"),
        EventKind::OperationFailed { operation, error } => format!("{operation} failed: {error}"),
        EventKind::Reconciled { action } => format!("reconciled: {action}"),
        EventKind::ReconcileFailed { action, error } => {
            format!("reconcile could not {action}: {error}")
        }
        EventKind::HealthChanged { health } => format!("health: {health:?}").to_lowercase(),
        EventKind::Resized { spec } => format!(
            "resized: {} vCPUs, {} MiB, {} GiB disk",
            spec.vcpus, spec.memory_mib, spec.disk_gib
        ),
        EventKind::SnapshotTaken { snapshot } => format!("snapshot {snapshot} taken"),
        EventKind::SnapshotDeleted { snapshot } => format!("snapshot {snapshot} deleted"),
        EventKind::Restored { snapshot } => format!("restored to snapshot {snapshot}"),
        EventKind::Renamed { from } => format!("renamed (was {from})"),
        EventKind::DomainAdded { host, proven_by } => {
            format!("custom domain {host} attached (proven by {proven_by:?})").to_lowercase()
        }
        EventKind::DomainRemoved { host } => format!("custom domain {host} detached"),
        EventKind::DataKept { path } => format!("kept the data volume at {}", path.display()),
        EventKind::GuestRebooted => "the guest rebooted".to_owned(),
        EventKind::GuestPoweredOff => "the guest powered off".to_owned(),
        EventKind::GuestPanicked => {
            "the guest kernel panicked (its console: vmkit vm logs)".to_owned()
        }
        EventKind::VmmExited => "the VMM ended unexpectedly".to_owned(),
        EventKind::UserAdded { user, role } => format!("user {user} added ({role})"),
        EventKind::UserRemoved { user } => format!("user {user} removed"),
        EventKind::UserSuspended { user } => format!("user {user} suspended"),
        EventKind::UserResumed { user } => format!("user {user} resumed"),
        EventKind::UserRoleChanged { user, role } => format!("user {user} is now {role}"),
        EventKind::CertificateIssued { names, expires } => format!(
            "certificate for {} issued, expires {}",
            names.join(", "),
            expires
        ),
        EventKind::CertificateFailed {
            names,
            error,
            retry_in_secs,
        } => format!(
            "certificate for {} failed ({error}); trying again in {retry_in_secs} s",
            names.join(", ")
        ),
        other => format!("{other:?}").to_lowercase(),
    };
    let vm = e
        .vm_name
        .as_ref()
        .map(|n| n.to_string())
        .unwrap_or_else(|| "-".into());
    format!("{:>6}  {}  {:<20} {}", e.seq, e.at, vm, what)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser as _;

    use super::{
        ApiKeyCommand, Cli, Command, InviteCommand, UserCommand, default_public_key, parse_ttl,
    };

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmkit").chain(args.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn user_add_takes_a_handle_and_optionally_a_key_file_an_email_and_admin() {
        match parse(&[
            "user", "add", "ada", "--key", "-", "--email", "a@b", "--admin",
        ])
        .unwrap()
        {
            Command::User(UserCommand::Add {
                handle,
                key,
                email,
                admin,
            }) => {
                assert_eq!(handle, "ada");
                assert_eq!(key.unwrap().to_str(), Some("-"));
                assert_eq!(email.as_deref(), Some("a@b"));
                assert!(admin);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["user", "add", "bea"]).unwrap() {
            Command::User(UserCommand::Add { key, admin, .. }) => {
                assert!(
                    key.is_none() && !admin,
                    "no key and a plain user by default"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["user", "add"]).is_err(), "the handle is required");
    }

    #[test]
    fn user_rm_needs_exactly_one_of_delete_vms_and_hand_over() {
        assert!(matches!(
            parse(&["user", "rm", "ada", "--delete-vms"]).unwrap(),
            Command::User(UserCommand::Rm {
                delete_vms: true,
                hand_over: None,
                ..
            })
        ));
        assert!(matches!(
            parse(&["user", "rm", "ada", "--hand-over", "bea"]).unwrap(),
            Command::User(UserCommand::Rm { delete_vms: false, hand_over: Some(h), .. }) if h == "bea"
        ));
        for args in [
            &["user", "rm", "ada"][..],
            &["user", "rm", "ada", "--delete-vms", "--hand-over", "bea"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?} is a usage error");
        }
    }

    #[test]
    fn user_ls_suspend_and_resume_parse() {
        assert!(matches!(
            parse(&["user", "ls"]).unwrap(),
            Command::User(UserCommand::Ls)
        ));
        assert!(matches!(
            parse(&["--json", "user", "suspend", "ada"]).unwrap(),
            Command::User(UserCommand::Suspend { handle }) if handle == "ada"
        ));
        assert!(matches!(
            parse(&["user", "resume", "ada"]).unwrap(),
            Command::User(UserCommand::Resume { handle }) if handle == "ada"
        ));
    }

    #[test]
    fn invite_new_lasts_seven_days_unless_told_and_invite_rm_takes_an_id() {
        assert!(matches!(
            parse(&["invite", "new"]).unwrap(),
            Command::Invite(InviteCommand::New {
                ttl: 604_800,
                admin: false
            })
        ));
        assert!(matches!(
            parse(&["invite", "new", "--ttl", "90m", "--admin"]).unwrap(),
            Command::Invite(InviteCommand::New {
                ttl: 5400,
                admin: true
            })
        ));
        assert!(parse(&["invite", "new", "--ttl", "7"]).is_err());
        assert!(matches!(
            parse(&["invite", "rm", "abc123"]).unwrap(),
            Command::Invite(InviteCommand::Rm { id }) if id == "abc123"
        ));
        assert!(matches!(
            parse(&["invite", "ls"]).unwrap(),
            Command::Invite(InviteCommand::Ls)
        ));
    }

    #[test]
    fn api_key_new_is_full_and_forever_unless_told() {
        assert!(matches!(
            parse(&["api-key", "new"]).unwrap(),
            Command::ApiKey(ApiKeyCommand::New {
                expires: None,
                read_only: false,
                vm: None,
                ..
            })
        ));
        assert!(matches!(
            parse(&["api-key", "new", "--label", "ci", "--expires", "30d", "--read-only", "--vm", "web"])
                .unwrap(),
            Command::ApiKey(ApiKeyCommand::New { label, expires: Some(d), read_only: true, vm: Some(vm) })
                if label == "ci" && d.as_secs() == 30 * 86_400 && vm == "web"
        ));
        assert!(parse(&["api-key", "new", "--expires", "0d"]).is_err());
        assert!(matches!(
            parse(&["api-key", "rm", "abc"]).unwrap(),
            Command::ApiKey(ApiKeyCommand::Rm { id }) if id == "abc"
        ));
    }

    #[test]
    fn lifetimes_take_a_unit_and_are_never_zero() {
        assert_eq!(parse_ttl("45s"), Ok(45));
        assert_eq!(parse_ttl("2h"), Ok(7200));
        assert_eq!(parse_ttl("1w"), Ok(604_800));
        assert!(parse_ttl("7").unwrap_err().contains("give the unit"));
        assert!(parse_ttl("0d").unwrap_err().contains("at least one second"));
        assert!(parse_ttl("d").is_err());
        assert!(parse_ttl("99999999999999999999w").is_err());
    }

    #[test]
    fn the_default_key_is_ed25519_else_rsa_else_an_error_saying_what_to_do() {
        let home = tempfile::tempdir().unwrap();
        let ssh = home.path().join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        let error = default_public_key(home.path()).unwrap_err().to_string();
        assert!(error.contains("id_ed25519.pub"), "{error}");
        assert!(error.contains("ssh-keygen -t ed25519"), "{error}");
        std::fs::write(ssh.join("id_rsa.pub"), "").unwrap();
        assert_eq!(
            default_public_key(home.path()).unwrap(),
            ssh.join("id_rsa.pub")
        );
        std::fs::write(ssh.join("id_ed25519.pub"), "").unwrap();
        assert_eq!(
            default_public_key(home.path()).unwrap(),
            ssh.join("id_ed25519.pub")
        );
    }
}
