//! The lobby's commands: one command line in, its output and exit status out.
//!
//! Every command goes through the caller's [`Commands`], so the lobby decides nothing
//! itself: the access policy in the core does. Parsing is clap's; its errors (an
//! unknown command, a missing argument) are answered as the lobby's own errors.

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use vmkit_core::{
    Access, ApiKeyScope, ApiKeyView, CloneSource, Commands, CreateRequest, DeleteOptions,
    ErrorChain, ErrorKind, Handle, Manager, ManagerError, Registration, RegistrationPolicy,
    ResizeRequest, ShareView, ShareWith, ShareWithView, SnapshotView, SshPublicKey, UserId, VmName,
    VmSpec, VmView,
};

/// What a command answered: what goes to stdout and stderr, and the exit status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Written to the channel's stdout.
    pub stdout: String,
    /// Written to the channel's stderr.
    pub stderr: String,
    /// The exit status (0: success).
    pub status: u32,
    /// Whether the session should end (`exit`).
    pub exit: bool,
}

impl Output {
    fn ok(stdout: String) -> Self {
        Self {
            stdout,
            ..Self::default()
        }
    }

    /// A failure: `message` on stderr (or `{"error", "code"}` on stdout with
    /// `json`), exit status 1.
    pub fn failure(message: impl Into<String>, code: &str, json: bool) -> Self {
        let message = message.into();
        match json {
            true => Self {
                stdout: json_line(&ErrorBody {
                    error: &message,
                    code,
                }),
                status: 1,
                ..Self::default()
            },
            false => Self {
                stderr: format!("error: {message}\n"),
                status: 1,
                ..Self::default()
            },
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: &'a str,
}

/// What the lobby needs to know about the host it runs on.
#[derive(Clone, Debug)]
pub struct LobbyContext {
    /// The domain VMs are reached under (`NAME.domain`).
    pub domain: String,
    /// The SSH port the lobby listens on, as clients dial it (22 is left out of
    /// the printed commands).
    pub port: u16,
    /// The gateway's host name as clients dial it, for the commands the lobby
    /// prints (`ssh NAME@HOST`, `ssh-config`).
    pub public_host: String,
    /// The fingerprint of the key the session signed in with (`whoami` marks it).
    pub current_key: Option<String>,
    /// The HTTPS port of the VMs' and the sign-in URLs (443 is left out); `None`
    /// when no HTTPS edge serves them (`browser` then says so).
    pub https_port: Option<u16>,
}

/// A session signed in with a key nobody registered, under a registration policy
/// that lets it register ([`run_unregistered`]).
#[derive(Clone, Debug)]
pub struct Unregistered {
    /// The key the session signed in with: the one `register` registers.
    pub key: SshPublicKey,
    /// The invite code given as the SSH user name (`ssh vmi_CODE@HOST`), if any.
    pub invite: Option<String>,
    /// The host's registration policy.
    pub policy: RegistrationPolicy,
}

/// What to run to register, as the policy allows: `ssh [-p PORT] HOST register
/// HANDLE`, and under `invite` the form with the code as the user name.
pub fn register_hint(port: u16, policy: RegistrationPolicy) -> String {
    let port = match port {
        22 => String::new(),
        port => format!("-p {port} "),
    };
    match policy {
        RegistrationPolicy::Invite => format!(
            "`ssh {port}HOST register HANDLE`, with the invite code you were given as the user \
             name: `ssh {port}vmi_CODE@HOST register HANDLE`"
        ),
        _ => format!("`ssh {port}HOST register HANDLE`"),
    }
}

impl LobbyContext {
    /// `-p PORT ` for a port other than 22, else nothing.
    fn port_option(&self) -> String {
        match self.port {
            22 => String::new(),
            port => format!("-p {port} "),
        }
    }

    /// The command that reaches VM `name` over SSH through the gateway.
    pub fn ssh_command(&self, name: &str) -> String {
        format!("ssh {}{name}@{}", self.port_option(), self.public_host)
    }

    /// `https://host[:port]`.
    fn origin(&self, host: &str) -> String {
        match self.https_port {
            Some(443) | None => format!("https://{host}"),
            Some(port) => format!("https://{host}:{port}"),
        }
    }

    /// The HTTPS address VM `name` has.
    pub fn https_url(&self, name: &VmName) -> String {
        format!("{}/", self.origin(&format!("{name}.{}", self.domain)))
    }

    /// The HTTPS address of port `port` of VM `name` (`NAME--PORT.domain`).
    pub fn https_port_url(&self, name: &VmName, port: Option<u16>) -> String {
        match port {
            Some(port) => format!(
                "{}/",
                self.origin(&format!("{name}--{port}.{}", self.domain))
            ),
            None => self.https_url(name),
        }
    }

    /// The URL that signs a browser in with a sign-in link's secret.
    pub fn sign_in_url(&self, secret: &str) -> String {
        format!("{}/__vmkit/login?token={secret}", self.origin(&self.domain))
    }

    /// The OpenSSH client configuration with which `ssh NAME.domain` reaches VM
    /// `NAME`'s own sshd, jumping through the gateway.
    pub fn ssh_config(&self) -> String {
        let jump = match self.port {
            22 => self.public_host.clone(),
            port => format!("{}:{port}", self.public_host),
        };
        // A gateway named under the domain must not jump through itself.
        let except = match self.public_host.ends_with(&format!(".{}", self.domain)) {
            true => format!(" !{}", self.public_host),
            false => String::new(),
        };
        format!(
            "# vmkit: `ssh NAME.{domain}` reaches the sshd of your VM NAME end to end,\n\
             # jumping through this gateway. Add these lines to ~/.ssh/config.\n\
             # `User` is the base image's default user; another image may have another.\n\
             Host *.{domain}{except}\n    ProxyJump {jump}\n    User vmkit\n",
            domain = self.domain,
        )
    }

    /// `NAME` of `NAME` or `NAME.domain`.
    fn vm_name(&self, raw: &str) -> Result<VmName, ManagerError> {
        let raw = raw.trim_end_matches('.');
        let label = raw
            .strip_suffix(self.domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .unwrap_or(raw);
        Ok(VmName::new(label)?)
    }
}

const HELP: &str = "\
vmkit lobby: manage your VMs over SSH.

Commands:
  help                         this text
  whoami [--json]              who you are signed in as, and your keys
  ls [-l] [--json]             your VMs (-l: image, size, address, created)
  new [--name N] [--image I] [--cpus N] [--memory MIB] [--disk GIB] [--json]
                               make a VM; prints how to reach it
  rm NAME...                   delete VMs
  start NAME | stop NAME | restart NAME
  rename OLD NEW               rename a VM (its SSH name and URL change too)
  cp SRC [NEW] [--from-snapshot]
                               copy a VM (or make one from a snapshot)
  resize NAME [--cpus N] [--memory MIB] [--disk GIB]
                               change a VM's size (disks only grow)
  snapshot NAME SNAP           snapshot a VM as SNAP
  restore NAME SNAP            restore a VM from the snapshot SNAP
  snapshots [--json]           your snapshots
  rm-snapshot SNAP             delete a snapshot
  logs NAME [--bytes N]        the tail of a VM's console (control characters
                               are shown escaped, e.g. \\x1b)
  share NAME                   a VM's shares
  share NAME public [--access A]
                               share with everyone
  share NAME private           take back the shares with everyone
  share NAME add HANDLE [--access A]
                               share with the user HANDLE
  share NAME rm HANDLE         take back the shares with the user HANDLE
  share NAME link [--access A] make a link; it is printed once
  share NAME port [PORT]       the port https://NAME.domain reaches (80)
                               (--port P on public, private, add and link:
                               port P only, at https://NAME--P.domain)
  domain add NAME HOST         serve the VM at https://HOST/ too, once DNS
                               proves HOST yours (it says what to publish: a
                               TXT record, or HOST as a CNAME to NAME.domain)
  domain ls [NAME] | domain rm HOST
                               your custom domains; detach one
  browser [--sign-out]         a one-time link that signs your browser in
                               (--sign-out: sign every browser out)
  ssh-key ls|add|rm            your SSH keys (add reads the key line from an
                               argument or from stdin)
  api-key new [--label L] [--expires 30d] [--read-only] [--vm NAME]
                               make an API key (vmk_...); it is printed once
                               (--read-only: it may only read; --vm: it sees
                               and acts on that VM only)
  api-key ls | api-key rm ID   your API keys; revoke one (at once)
  ssh-config                   the ~/.ssh/config lines for `ssh NAME.domain`
  exit                         leave the lobby (or ^D)

NAME is a VM name or NAME.domain. Every command takes --json (errors are then
{\"error\": ..., \"code\": ...}). A share's access A is http (the default: its
web ports), ssh or manage (its lifecycle).

At the prompt (ssh -t HOST): tab completes commands and VM names; up and down
(^P, ^N) recall earlier lines; ^A ^E ^B ^F and the arrows move; ^U ^K ^W cut;
^L clears the screen; ^C drops the line.

Examples:
  ssh HOST new --name web
  ssh HOST ls -l
  ssh HOST ssh-key add < ~/.ssh/id_ed25519.pub
  ssh HOST api-key new --label ci --expires 30d --read-only
  ssh HOST rm web
  ssh HOST rename web blog
  ssh HOST ssh-config >> ~/.ssh/config
  ssh HOST cp web web2
  ssh HOST cp before-upgrade web3 --from-snapshot
  ssh HOST resize web --cpus 4 --memory 4096 --disk 20
  ssh HOST snapshot web before-upgrade
  ssh HOST restore web before-upgrade
  ssh HOST snapshots
  ssh HOST rm-snapshot before-upgrade
  ssh HOST logs web --bytes 4096
  ssh HOST share web public
  ssh HOST share web add bob --access ssh
  ssh HOST share web link
  ssh HOST share web public --port 8080
  ssh HOST share web port 3000
  ssh HOST browser
";

#[derive(Parser, Debug)]
#[command(
    name = "vmkit",
    no_binary_name = true,
    disable_help_subcommand = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct LobbyArgs {
    #[command(subcommand)]
    command: LobbyCommand,
}

#[derive(Subcommand, Debug)]
enum LobbyCommand {
    /// Prints the commands and examples.
    Help {
        #[arg(long)]
        json: bool,
    },
    /// Who you are.
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// Lists your VMs.
    Ls {
        #[arg(short = 'l')]
        long: bool,
        #[arg(long)]
        json: bool,
    },
    /// Makes a VM.
    New {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        disk: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Deletes VMs.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Starts a VM.
    Start {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stops a VM.
    Stop {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Restarts a VM.
    Restart {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Copies a VM, or makes one from a snapshot.
    Cp {
        source: String,
        new: Option<String>,
        #[arg(long)]
        from_snapshot: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resizes a VM.
    Resize {
        name: String,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        disk: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Snapshots a VM.
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
    /// Restores a VM from a snapshot.
    Restore {
        name: String,
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
    /// Lists your snapshots.
    Snapshots {
        #[arg(long)]
        json: bool,
    },
    /// Deletes a snapshot.
    #[command(name = "rm-snapshot")]
    RmSnapshot {
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
    /// The tail of a VM's console.
    Logs {
        name: String,
        #[arg(long, default_value_t = DEFAULT_LOG_BYTES)]
        bytes: usize,
        #[arg(long)]
        json: bool,
    },
    /// A VM's shares: shows them, or changes them.
    Share {
        name: String,
        #[command(subcommand)]
        action: Option<ShareCommand>,
        #[arg(long, global = true)]
        json: bool,
    },
    /// Your SSH keys.
    #[command(name = "ssh-key", subcommand)]
    SshKey(SshKeyCommand),
    /// Your API keys.
    #[command(name = "api-key", subcommand)]
    ApiKey(ApiKeyCommand),
    /// Renames a VM.
    Rename {
        old: String,
        new: String,
        #[arg(long)]
        json: bool,
    },
    /// Custom domains: `https://HOST/` reaching a VM.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// A one-time link that signs your browser in.
    Browser {
        /// Signs every browser out instead.
        #[arg(long)]
        sign_out: bool,
        #[arg(long)]
        json: bool,
    },
    /// The OpenSSH client configuration for `ssh NAME.domain`.
    #[command(name = "ssh-config")]
    SshConfig {
        #[arg(long)]
        json: bool,
    },
    /// Leaves the lobby.
    Exit {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SshKeyCommand {
    /// Lists your keys.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Adds a key: the public key line as arguments, or on stdin.
    Add {
        #[arg(allow_hyphen_values = true)]
        key: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Removes a key by fingerprint (`SHA256:...`).
    Rm {
        fingerprint: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ApiKeyCommand {
    /// Makes an API key; its secret is printed once.
    New {
        /// What you call it.
        #[arg(long, default_value = "")]
        label: String,
        /// It stops working after this long (90m, 12h, 30d, 8w); never if not given.
        #[arg(long, value_parser = vmkit_core::parse_lifetime)]
        expires: Option<std::time::Duration>,
        /// It may only read (list, details, logs, metrics, shares).
        #[arg(long)]
        read_only: bool,
        /// It sees and acts on this VM only.
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Lists your API keys (never their secrets).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revokes an API key by id: it stops working at once.
    Rm {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DomainCommand {
    /// Attaches HOST to a VM once DNS proves it yours (else says what to publish).
    Add {
        name: String,
        host: String,
        #[arg(long)]
        json: bool,
    },
    /// Your custom domains (one VM's when named).
    Ls {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Detaches HOST from its VM.
    Rm {
        host: String,
        #[arg(long)]
        json: bool,
    },
}

/// What a share grants, as `--access` names it.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
enum AccessArg {
    /// The VM's web ports over HTTPS.
    #[default]
    Http,
    /// SSH into the VM.
    Ssh,
    /// Its lifecycle.
    Manage,
}

impl From<AccessArg> for Access {
    fn from(access: AccessArg) -> Self {
        match access {
            AccessArg::Http => Access::Http,
            AccessArg::Ssh => Access::Ssh,
            AccessArg::Manage => Access::Manage,
        }
    }
}

#[derive(Subcommand, Debug)]
enum ShareCommand {
    /// Shares the VM with everyone.
    Public {
        #[arg(long, value_enum, default_value_t)]
        access: AccessArg,
        /// One web port only.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Takes back the shares with everyone.
    Private {
        /// Only those of one web port.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Shares the VM with a user.
    Add {
        handle: String,
        #[arg(long, value_enum, default_value_t)]
        access: AccessArg,
        /// One web port only.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Takes back the shares with a user.
    Rm { handle: String },
    /// Makes a link; its secret is printed once.
    Link {
        #[arg(long, value_enum, default_value_t)]
        access: AccessArg,
        /// One web port only.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Shows, or sets, the port `https://NAME.domain` reaches (80 by default).
    Port { port: Option<u16> },
}

/// How much of the console `logs` prints unless `--bytes` says otherwise.
const DEFAULT_LOG_BYTES: usize = 16 * 1024;

/// The most of the console `logs` prints.
const MAX_LOG_BYTES: usize = 1024 * 1024;

/// `text` made safe for a terminal: control characters other than newline and tab
/// are written as escapes (`\x1b`, `\u{9b}`), so that nothing a guest wrote to its
/// console can move the cursor, retitle the window or talk to the terminal. A
/// carriage return before a newline (a serial console's line end) is dropped.
pub fn escape_control(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\t' => escaped.push(c),
            c if c.is_control() && (c as u32) < 0x80 => {
                escaped.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() || is_format_control(c) => {
                escaped.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => escaped.push(c),
        }
    }
    escaped
}

/// Invisible characters that reorder or hide text (bidirectional overrides and
/// isolates, zero-width characters).
fn is_format_control(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Splits a command line into words: whitespace separates, single and double
/// quotes group, a backslash escapes the next character.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"') | None, '\\') => {
                let next = chars.next().ok_or("a backslash ends the line")?;
                word.push(next);
                in_word = true;
            }
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("a quote is not closed".into());
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Whether `line` (a command line as the client sent it) asks for JSON output.
fn wants_json(words: &[String]) -> bool {
    words.iter().any(|w| w == "--json")
}

/// Whether the command reads its input from stdin (`ssh-key add` without a key).
pub fn reads_stdin(words: &[String]) -> bool {
    let plain: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| !w.starts_with("--"))
        .collect();
    plain == ["ssh-key", "add"]
}

/// What the prompt can complete the last of `words` (the words before the cursor,
/// the last one being typed) to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// One of these words.
    Words(Vec<String>),
    /// The name of one of the caller's VMs.
    VmName,
    /// Nothing the lobby knows.
    Nothing,
}

/// The commands that take a VM's name as their first argument (`rm`: every one).
const VM_COMMANDS: &[&str] = &[
    "rm", "start", "stop", "restart", "rename", "cp", "resize", "snapshot", "restore", "logs",
    "share",
];

/// What the last of `words` can be completed to: a command, a subcommand, an
/// option of the command, or a VM's name. `registered`: the session's key is a
/// user's (else only the registration commands).
pub fn completion(words: &[String], registered: bool) -> Completion {
    use clap::CommandFactory;
    let command = match registered {
        true => LobbyArgs::command(),
        false => UnregisteredArgs::command(),
    };
    let names = |command: &clap::Command| -> Vec<String> {
        command
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect()
    };
    let (Some(typed), Some(first)) = (words.last(), words.first()) else {
        return Completion::Nothing;
    };
    if words.len() == 1 {
        return Completion::Words(names(&command));
    }
    let Some(sub) = command.find_subcommand(first) else {
        return Completion::Nothing;
    };
    if typed.starts_with('-') {
        // The options of `api-key new`, not of `api-key`.
        let sub = match words.get(1).and_then(|w| sub.find_subcommand(w)) {
            Some(nested) if words.len() > 2 => nested,
            _ => sub,
        };
        return Completion::Words(
            sub.get_arguments()
                .filter_map(|a| a.get_long())
                .map(|long| format!("--{long}"))
                .collect(),
        );
    }
    // The position of the word being typed among the arguments that are not options.
    let position = words[1..words.len() - 1]
        .iter()
        .filter(|w| !w.starts_with('-'))
        .count();
    match (first.as_str(), position) {
        ("ssh-key", 0) | ("api-key", 0) => Completion::Words(names(sub)),
        ("api-key", _) if registered && words[words.len() - 2] == "--vm" => Completion::VmName,
        ("share", 1) | ("domain", 0) => Completion::Words(names(sub)),
        ("domain", 1) if registered && words.get(1).is_some_and(|w| w != "rm") => {
            Completion::VmName
        }
        ("rm", _) if registered => Completion::VmName,
        (command, 0) if registered && VM_COMMANDS.contains(&command) => Completion::VmName,
        _ => Completion::Nothing,
    }
}

/// A line to show before `words` runs, for a command that takes a while (`new`:
/// a VM boots); `None` for the others and in `--json` mode.
pub fn progress(words: &[String]) -> Option<String> {
    match words.first().map(String::as_str) {
        Some("new") if !wants_json(words) => {
            Some("making a VM; it is ready when it has booted...\n".to_owned())
        }
        Some("cp") if !wants_json(words) => {
            Some("copying; the copy is ready when it has booted...\n".to_owned())
        }
        _ => None,
    }
}

/// The help, its examples naming this host as clients dial it.
fn help(context: &LobbyContext) -> String {
    HELP.replace(
        "ssh HOST ",
        &format!("ssh {}{} ", context.port_option(), context.public_host),
    )
}

/// Runs one command line for the caller of `commands`; `stdin` is what the client
/// sent on the channel (read for `ssh-key add` without a key argument).
///
/// `users` looks users up by handle for `share NAME add|rm HANDLE` (the command
/// surface takes a user id) and names them in `share NAME`; it is asked only after
/// the command surface has let the caller see the VM's shares.
pub async fn run(
    commands: &Commands,
    users: &Manager,
    context: &LobbyContext,
    words: &[String],
    stdin: &str,
) -> Output {
    let json = wants_json(words);
    if words.is_empty() {
        return Output::ok(help(context));
    }
    // Before parsing, so that no error message ever repeats a private key.
    if words.iter().any(|w| w.contains("PRIVATE KEY")) {
        return Output::failure(PRIVATE_KEY_REFUSED, "private_key_refused", json);
    }
    let args = match LobbyArgs::try_parse_from(words) {
        Ok(args) => args,
        Err(e) => {
            let message = e.to_string();
            let message = message
                .trim()
                .trim_start_matches("error: ")
                .lines()
                .filter(|l| !l.trim_start().starts_with("Usage:") && !l.contains("--help"))
                .collect::<Vec<_>>()
                .join("\n");
            let message = format!("{}; `help` lists the commands", message.trim());
            return Output::failure(message, "invalid_command", json);
        }
    };
    match execute(commands, users, context, args.command, stdin).await {
        Ok(output) => output,
        Err(LobbyError::Manager(e)) => error_output(commands, &e, json),
        Err(LobbyError::Lobby { message, code }) => Output::failure(message, code, json),
    }
}

fn error_output(commands: &Commands, e: &ManagerError, json: bool) -> Output {
    Output::failure(error_message(commands, e), e.code(), json)
}

/// What the caller reads of `e`: the whole chain for an admin, the public message
/// for others, nothing of an internal error (it is logged).
fn error_message(commands: &Commands, e: &ManagerError) -> String {
    if e.kind() == ErrorKind::Internal {
        tracing::error!(error = ?e, "internal error in the SSH lobby");
        "internal error; the host's log has the details".to_owned()
    } else if commands.caller().is_admin() {
        ErrorChain(e).to_string()
    } else {
        e.public_message()
    }
}

/// `value` as pretty JSON and a newline. The JSON encoder escapes only the control
/// characters below 0x20; the others (DEL, the C1 controls some terminals obey)
/// and the invisible reordering ones are written as `\uXXXX` escapes too, so that
/// `--json` shown in a terminal is as safe as the text (a JSON reader decodes them
/// back to the same string).
fn json_line<T: Serialize + ?Sized>(value: &T) -> String {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            let mut safe = String::with_capacity(text.len() + 1);
            for c in text.chars() {
                match (c as u32) >= 0x20 && (c.is_control() || is_format_control(c)) {
                    true => safe.push_str(&format!("\\u{:04x}", c as u32)),
                    false => safe.push(c),
                }
            }
            safe.push('\n');
            safe
        }
        Err(e) => format!("{{\"error\": \"could not encode the answer: {e}\"}}\n"),
    }
}

/// `at` as a UTC date and time to the minute (`2026-12-02T03:58Z`).
fn utc_minute(at: vmkit_core::Timestamp) -> String {
    let minutes = at.0 / 60_000;
    let (days, minute_of_day) = (minutes / 1440, minutes % 1440);
    // Days since 1970-01-01 to a civil date, counting in 400-year eras of
    // 146097 days that start on 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = match month_from_march < 10 {
        true => month_from_march + 3,
        false => month_from_march - 9,
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}Z",
        minute_of_day / 60,
        minute_of_day % 60
    )
}

/// `ls -l`: a header and one aligned row per VM.
fn long_listing(vms: &[VmView]) -> String {
    let mut rows = vec![
        [
            "NAME", "STATE", "IMAGE", "CPUS", "MEMORY", "DISK", "IP", "CREATED",
        ]
        .map(str::to_owned),
    ];
    for vm in vms {
        rows.push([
            vm.name.to_string(),
            vm.state.as_str().to_owned(),
            vm.spec.image.clone(),
            vm.spec.vcpus.to_string(),
            format!("{} MiB", vm.spec.memory_mib),
            match vm.spec.disk_gib {
                0 => "-".to_owned(),
                gib => format!("{gib} GiB"),
            },
            vm.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
            utc_minute(vm.created_at),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            match i {
                7 => line.push_str(cell),
                _ => line.push_str(&format!("{cell:width$}  ")),
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

async fn lifecycle(
    commands: &Commands,
    context: &LobbyContext,
    verb: &str,
    name: &str,
    json: bool,
) -> Result<Output, ManagerError> {
    let name = context.vm_name(name)?;
    let vm = match verb {
        "start" => commands.start(&name).await?,
        "stop" => commands.stop(&name).await?,
        _ => commands.restart(&name).await?,
    };
    Ok(Output::ok(match json {
        true => json_line(&vm),
        false => format!("{} is {}\n", vm.name, vm.state.as_str()),
    }))
}

/// Why a command failed: the command surface refused, or the lobby itself did.
#[derive(Debug)]
enum LobbyError {
    Manager(ManagerError),
    Lobby { message: String, code: &'static str },
}

impl From<ManagerError> for LobbyError {
    fn from(e: ManagerError) -> Self {
        Self::Manager(e)
    }
}

const PRIVATE_KEY_REFUSED: &str = "that is a PRIVATE key: it never leaves your machine, and \
     whoever saw it can sign in as you (make a new one). Give the public key instead: the \
     one line of the .pub file, e.g. `ssh HOST ssh-key add < ~/.ssh/id_ed25519.pub`";

/// Refuses a private key pasted where a public one belongs.
fn public_key(line: &str) -> Result<SshPublicKey, LobbyError> {
    if line.contains("PRIVATE KEY") {
        return Err(LobbyError::Lobby {
            message: PRIVATE_KEY_REFUSED.into(),
            code: "private_key_refused",
        });
    }
    SshPublicKey::parse(line).map_err(|e| LobbyError::Manager(e.into()))
}

async fn execute(
    commands: &Commands,
    users: &Manager,
    context: &LobbyContext,
    command: LobbyCommand,
    stdin: &str,
) -> Result<Output, LobbyError> {
    Ok(match command {
        LobbyCommand::Help { json: false } => Output::ok(help(context)),
        LobbyCommand::Help { json: true } => {
            Output::ok(json_line(&serde_json::json!({ "help": help(context) })))
        }
        LobbyCommand::Exit { json } => Output {
            stdout: match json {
                true => json_line(&serde_json::json!({ "exit": true })),
                false => "bye\n".into(),
            },
            exit: true,
            ..Output::default()
        },
        LobbyCommand::Rename { old, new, json } => {
            let old = context.vm_name(&old)?;
            let new = context.vm_name(&new)?;
            let vm = commands.rename(&old, new).await?;
            match json {
                true => json_line(&serde_json::json!({
                    "vm": vm,
                    "ssh": context.ssh_command(vm.name.as_str()),
                    "https": context.https_url(&vm.name),
                })),
                false => format!(
                    "renamed {old} to {}\n{}\n{}\n",
                    vm.name,
                    context.ssh_command(vm.name.as_str()),
                    context.https_url(&vm.name)
                ),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Domain(command) => domain(commands, context, command).await?,
        LobbyCommand::ApiKey(command) => api_key(commands, context, command).await?,
        LobbyCommand::Browser { sign_out, json } => if sign_out {
            let ended = commands.sign_out_everywhere().await?;
            match json {
                true => json_line(&serde_json::json!({ "signed_out": ended })),
                false => format!("signed out of every browser ({ended} sessions ended)\n"),
            }
        } else if context.https_port.is_none() {
            return Err(LobbyError::Lobby {
                message: "this host serves no HTTPS; its operator turns it on with \
                              [https] listen"
                    .into(),
                code: "https_off",
            });
        } else {
            let secret = commands.sign_in_link().await?;
            let url = context.sign_in_url(&secret);
            match json {
                true => json_line(&serde_json::json!({ "url": url, "expires_in_secs": 600 })),
                false => format!(
                    "Open this link within 10 minutes to sign your browser in (it works \
                         once):\n{url}\n"
                ),
            }
        }
        .pipe(Output::ok),
        LobbyCommand::SshConfig { json } => {
            // Only a signed-in user can use it: ask who they are first.
            commands.whoami().await?;
            match json {
                true => json_line(&serde_json::json!({
                    "ssh_config": context.ssh_config(),
                    "host": context.public_host,
                    "port": context.port,
                    "domain": context.domain,
                })),
                false => context.ssh_config(),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Whoami { json } => {
            let whoami = commands.whoami().await?;
            let keys = commands.ssh_keys().await.unwrap_or_default();
            match json {
                true => json_line(&serde_json::json!({
                    "whoami": whoami,
                    "ssh_keys": keys.iter().map(|k| serde_json::json!({
                        "fingerprint": k.fingerprint(),
                        "key": k.to_openssh(),
                        "current": context.current_key.as_deref() == Some(k.fingerprint().as_str()),
                    })).collect::<Vec<_>>(),
                })),
                false => {
                    let mut text = match &whoami.user {
                        Some(user) => format!("user: {} (id {})\n", user.handle, user.id.0),
                        None => format!("principal: {:?}\n", whoami.principal),
                    };
                    if whoami.admin {
                        text.push_str("role: admin\n");
                    }
                    for key in &keys {
                        let fingerprint = key.fingerprint();
                        let current = match context.current_key.as_deref() {
                            Some(current) if current == fingerprint => " (this session)",
                            _ => "",
                        };
                        text.push_str(&format!("key: {fingerprint} {}{current}\n", key.comment()));
                    }
                    text
                }
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Ls { long, json } => {
            let vms = commands.list().await?;
            match json {
                true => json_line(&vms),
                false if vms.is_empty() => "no VMs yet; make one with `new`\n".to_owned(),
                false if long => long_listing(&vms),
                false => vms
                    .iter()
                    .map(|vm| format!("{}\t{}\n", vm.name, vm.state.as_str()))
                    .collect(),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::New {
            name,
            image,
            cpus,
            memory,
            disk,
            json,
        } => {
            let defaults = commands.default_spec();
            let spec = VmSpec::new(image.unwrap_or(defaults.image.clone()))
                .vcpus(cpus.unwrap_or(defaults.vcpus))
                .memory_mib(memory.unwrap_or(defaults.memory_mib))
                .disk_gib(disk.unwrap_or(defaults.disk_gib));
            let owner = commands
                .caller()
                .owner()
                .unwrap_or(vmkit_core::UserId::LOCAL);
            let mut request = CreateRequest::new(owner, spec);
            request.name = name.map(|n| context.vm_name(&n)).transpose()?;
            let vm = commands.create(request).await?;
            let (ssh, https) = (
                context.ssh_command(vm.name.as_str()),
                context.https_url(&vm.name),
            );
            match json {
                true => json_line(&serde_json::json!({ "vm": vm, "ssh": ssh, "https": https })),
                false => format!(
                    "made {} ({}, {}, {} vCPU, {} MiB)\n\nreach it with:\n  {ssh}\n  {https}\n",
                    vm.name, vm.state, vm.spec.image, vm.spec.vcpus, vm.spec.memory_mib
                ),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Rm { names, json } => {
            // One failure does not stop the others; the status tells if any failed.
            let mut deleted = Vec::new();
            let mut failed = Vec::new();
            for raw in &names {
                let result = match context.vm_name(raw) {
                    Ok(name) => commands
                        .delete(&name, DeleteOptions::default())
                        .await
                        .map(|_| name),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(name) => deleted.push(name),
                    Err(e) => failed.push((raw.clone(), error_message(commands, &e), e.code())),
                }
            }
            let mut output = match json {
                true => Output::ok(json_line(&serde_json::json!({
                    "deleted": deleted,
                    "failed": failed
                        .iter()
                        .map(|(name, error, code)| serde_json::json!({
                            "name": name, "error": error, "code": code,
                        }))
                        .collect::<Vec<_>>(),
                }))),
                false => Output {
                    stdout: deleted.iter().map(|n| format!("deleted {n}\n")).collect(),
                    stderr: failed
                        .iter()
                        .map(|(name, error, _)| format!("error: {name}: {error}\n"))
                        .collect(),
                    ..Output::default()
                },
            };
            output.status = u32::from(!failed.is_empty());
            output
        }
        LobbyCommand::Start { name, json } => {
            lifecycle(commands, context, "start", &name, json).await?
        }
        LobbyCommand::Stop { name, json } => {
            lifecycle(commands, context, "stop", &name, json).await?
        }
        LobbyCommand::Restart { name, json } => {
            lifecycle(commands, context, "restart", &name, json).await?
        }
        LobbyCommand::Cp {
            source,
            new,
            from_snapshot,
            json,
        } => {
            let source_name = context.vm_name(&source)?;
            let source = match from_snapshot {
                true => CloneSource::Snapshot(source_name.clone()),
                false => CloneSource::Vm(source_name.clone()),
            };
            let new = new.map(|n| context.vm_name(&n)).transpose()?;
            let vm = commands.clone_vm(source, new, None).await?;
            match json {
                true => json_line(&serde_json::json!({ "vm": vm })),
                false => format!("copied {source_name} to {} ({})\n", vm.name, vm.state),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Resize {
            name,
            cpus,
            memory,
            disk,
            json,
        } => {
            if cpus.is_none() && memory.is_none() && disk.is_none() {
                return Err(LobbyError::Lobby {
                    message: "resize: say what to change: --cpus, --memory or --disk; \
                              `help` lists the commands"
                        .into(),
                    code: "invalid_command",
                });
            }
            let name = context.vm_name(&name)?;
            let mut request = ResizeRequest::new();
            request.vcpus = cpus;
            request.memory_mib = memory;
            request.disk_gib = disk;
            let vm = commands.resize(&name, request).await?;
            match json {
                true => json_line(&serde_json::json!({ "vm": vm })),
                false => format!(
                    "{}: {} vCPU, {} MiB, {} GiB disk ({})\n",
                    vm.name, vm.spec.vcpus, vm.spec.memory_mib, vm.spec.disk_gib, vm.state
                ),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Snapshot {
            name,
            snapshot,
            json,
        } => {
            let name = context.vm_name(&name)?;
            let snapshot = VmName::new(snapshot).map_err(ManagerError::from)?;
            let taken = commands.snapshot(&name, snapshot).await?;
            match json {
                true => json_line(&serde_json::json!({ "snapshot": taken })),
                false => format!("snapshot {} of {} taken\n", taken.name, taken.vm_name),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Restore {
            name,
            snapshot,
            json,
        } => {
            let name = context.vm_name(&name)?;
            let snapshot = VmName::new(snapshot).map_err(ManagerError::from)?;
            let vm = commands.restore(&name, &snapshot, None).await?;
            match json {
                true => json_line(&serde_json::json!({ "vm": vm })),
                false => format!("restored {} from {snapshot} ({})\n", vm.name, vm.state),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Snapshots { json } => {
            let snapshots = commands.snapshots().await?;
            match json {
                true => json_line(&snapshots),
                false if snapshots.is_empty() => {
                    "no snapshots yet; take one with `snapshot NAME SNAP`\n".to_owned()
                }
                false => snapshots.iter().map(snapshot_line).collect(),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::RmSnapshot { snapshot, json } => {
            let snapshot = VmName::new(snapshot).map_err(ManagerError::from)?;
            commands.delete_snapshot(&snapshot).await?;
            match json {
                true => json_line(&serde_json::json!({ "deleted": snapshot })),
                false => format!("deleted snapshot {snapshot}\n"),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Logs { name, bytes, json } => {
            let name = context.vm_name(&name)?;
            let console = commands.console(&name, bytes.min(MAX_LOG_BYTES)).await?;
            match json {
                true => json_line(&serde_json::json!({ "vm": name, "console": console })),
                false => {
                    let mut text = escape_control(&console);
                    if !text.is_empty() && !text.ends_with('\n') {
                        text.push('\n');
                    }
                    text
                }
            }
            .pipe(Output::ok)
        }
        LobbyCommand::Share { name, action, json } => {
            let name = context.vm_name(&name)?;
            share(commands, context, users, &name, action, json).await?
        }
        LobbyCommand::SshKey(SshKeyCommand::Ls { json }) => {
            let keys = commands.ssh_keys().await?;
            match json {
                true => json_line(
                    &keys
                        .iter()
                        .map(|k| {
                            serde_json::json!({
                                "fingerprint": k.fingerprint(),
                                "key": k.to_openssh(),
                            })
                        })
                        .collect::<Vec<_>>(),
                ),
                false => keys
                    .iter()
                    .map(|k| format!("{} {}\n", k.fingerprint(), k.to_openssh()))
                    .collect(),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::SshKey(SshKeyCommand::Add { key, json }) => {
            let line = match key.is_empty() {
                true => stdin.to_owned(),
                false => key.join(" "),
            };
            let key = public_key(&line)?;
            commands.add_ssh_key(&key).await?;
            match json {
                true => json_line(&serde_json::json!({ "added": key.fingerprint() })),
                false => format!("added {}\n", key.fingerprint()),
            }
            .pipe(Output::ok)
        }
        LobbyCommand::SshKey(SshKeyCommand::Rm { fingerprint, json }) => {
            commands.remove_ssh_key(&fingerprint).await?;
            match json {
                true => json_line(&serde_json::json!({ "removed": fingerprint })),
                false => format!("removed {fingerprint}\n"),
            }
            .pipe(Output::ok)
        }
    })
}

fn snapshot_line(snapshot: &SnapshotView) -> String {
    format!(
        "{}\tof {}\t{} vCPU\t{} MiB\t{}\t{}\n",
        snapshot.name,
        snapshot.vm_name,
        snapshot.spec.vcpus,
        snapshot.spec.memory_mib,
        match snapshot.memory {
            true => "memory and disks",
            false => "disks",
        },
        snapshot.created_at,
    )
}

fn access_name(access: Access) -> &'static str {
    match access {
        Access::Http => "http",
        Access::Ssh => "ssh",
        Access::Manage => "manage",
        _ => "other",
    }
}

/// The user with `handle`, as the share commands name them.
async fn user_id(users: &Manager, handle: &str) -> Result<UserId, ManagerError> {
    let handle = Handle::new(handle)?;
    Ok(users.user(&handle).await?.id)
}

/// `, port P: URL` for a share of one port.
fn port_note(context: &LobbyContext, name: &VmName, port: Option<u16>) -> String {
    match port {
        Some(p) => format!(", port {p}: {}", context.https_port_url(name, Some(p))),
        None => String::new(),
    }
}

/// `api-key new|ls|rm`.
async fn api_key(
    commands: &Commands,
    context: &LobbyContext,
    command: ApiKeyCommand,
) -> Result<Output, LobbyError> {
    let output = match command {
        ApiKeyCommand::New {
            label,
            expires,
            read_only,
            vm,
            json,
        } => {
            let vm = vm.map(|vm| context.vm_name(&vm)).transpose()?;
            let scope = match read_only {
                true => ApiKeyScope::ReadOnly,
                false => ApiKeyScope::Full,
            };
            let key = commands
                .create_api_key(&label, expires, scope, vm.as_ref())
                .await?;
            match json {
                true => json_line(&key),
                false => format!(
                    "made API key {} ({}); it is shown this once, keep it now:\n{}\n",
                    key.id,
                    api_key_terms(&key),
                    key.secret.as_deref().unwrap_or_default()
                ),
            }
        }
        ApiKeyCommand::Ls { json } => {
            let keys = commands.api_keys().await?;
            match json {
                true => json_line(&keys),
                false if keys.is_empty() => "no API keys; `api-key new` makes one\n".to_owned(),
                false => keys
                    .iter()
                    .map(|k| {
                        let label = match k.label.is_empty() {
                            true => "-".to_owned(),
                            false => escape_control(&k.label),
                        };
                        let used = match k.last_used_at {
                            Some(at) => format!("used {}", utc_minute(at)),
                            None => "never used".to_owned(),
                        };
                        format!("{}\t{label}\t{}\t{used}\n", k.id, api_key_terms(k))
                    })
                    .collect(),
            }
        }
        ApiKeyCommand::Rm { id, json } => {
            commands.revoke_api_key(&id).await?;
            match json {
                true => json_line(&serde_json::json!({ "revoked": id })),
                false => format!("revoked {id}\n"),
            }
        }
    };
    Ok(Output::ok(output))
}

/// What an API key may do and until when: `read-only, VM web, expires
/// 2027-01-01T00:00Z`.
fn api_key_terms(key: &ApiKeyView) -> String {
    let mut terms = vec![key.scope.to_string()];
    if let Some(vm) = &key.vm {
        terms.push(format!("VM {vm}"));
    }
    terms.push(match key.expires_at {
        Some(at) if key.expired => format!("expired {}", utc_minute(at)),
        Some(at) => format!("expires {}", utc_minute(at)),
        None => "never expires".to_owned(),
    });
    terms.join(", ")
}

/// `domain add|ls|rm`.
async fn domain(
    commands: &Commands,
    context: &LobbyContext,
    command: DomainCommand,
) -> Result<Output, LobbyError> {
    let url = |host: &str| format!("{}/", context.origin(host));
    let output = match command {
        DomainCommand::Add { name, host, json } => {
            let name = context.vm_name(&name)?;
            let added = commands.add_domain(&name, &host).await?;
            match json {
                true => json_line(&serde_json::json!({
                    "domain": added,
                    "https": url(&added.host),
                })),
                false => format!(
                    "{host} now reaches {vm}: {url}\n(its DNS must point {host} at this host: \
                     an A record, or a CNAME to {vm}.{domain}; it is private or shared as \
                     {vm}'s web port is: `share {vm} public` opens it)\n",
                    host = added.host,
                    vm = added.vm,
                    url = url(&added.host),
                    domain = context.domain,
                ),
            }
        }
        DomainCommand::Ls { name, json } => {
            let name = name.map(|n| context.vm_name(&n)).transpose()?;
            let domains = commands.domains(name.as_ref()).await?;
            match json {
                true => json_line(&domains),
                false => domains
                    .iter()
                    .map(|d| {
                        format!(
                            "{}	{}	{}
",
                            d.host,
                            d.vm,
                            url(&d.host)
                        )
                    })
                    .collect(),
            }
        }
        DomainCommand::Rm { host, json } => {
            commands.remove_domain(&host).await?;
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            match json {
                true => json_line(&serde_json::json!({ "removed": host })),
                false => format!("detached {host}\n"),
            }
        }
    };
    Ok(Output::ok(output))
}

/// `share NAME [ACTION]`.
async fn share(
    commands: &Commands,
    context: &LobbyContext,
    users: &Manager,
    name: &VmName,
    action: Option<ShareCommand>,
    json: bool,
) -> Result<Output, LobbyError> {
    // First the command surface decides whether the caller may share the VM at all,
    // so that a stranger learns nothing of users (nor of the VM) through `share`.
    let current = commands.shares(name).await?;
    let output = match action {
        None => {
            let handles = match current
                .iter()
                .any(|s| matches!(s.with, ShareWithView::User(_)))
            {
                true => users.users().await?,
                false => Vec::new(),
            };
            let who = |share: &ShareView| match &share.with {
                ShareWithView::User(id) => match handles.iter().find(|u| u.id == *id) {
                    Some(user) => format!("user {}", user.handle),
                    None => format!("user id {}", id.0),
                },
                ShareWithView::Link(short) => format!("link {short}"),
                ShareWithView::Public => "public".to_owned(),
                _ => "other".to_owned(),
            };
            match json {
                true => json_line(&current),
                false if current.is_empty() => {
                    format!("{name} is not shared; `share {name} public` shares it\n")
                }
                false => current
                    .iter()
                    .map(|s| match s.port {
                        Some(port) => {
                            format!("{}\t{}\tport {port}\n", who(s), access_name(s.access))
                        }
                        None => format!("{}\t{}\n", who(s), access_name(s.access)),
                    })
                    .collect(),
            }
        }
        Some(ShareCommand::Public { access, port }) => {
            let view = commands
                .share_port(name, ShareWith::Public, access.into(), port)
                .await?;
            match json {
                true => json_line(&view),
                false => format!(
                    "{name} is shared with everyone ({}{})\n",
                    access_name(view.access),
                    port_note(context, name, port)
                ),
            }
        }
        Some(ShareCommand::Private { port }) => {
            let removed = commands
                .unshare_port(name, &ShareWithView::Public, None, port)
                .await?;
            match json {
                true => json_line(&serde_json::json!({ "vm": name, "removed": removed })),
                false => format!("{name} is not shared with everyone ({removed} taken back)\n"),
            }
        }
        Some(ShareCommand::Add {
            handle,
            access,
            port,
        }) => {
            let user = user_id(users, &handle).await?;
            let view = commands
                .share_port(name, ShareWith::User(user), access.into(), port)
                .await?;
            match json {
                true => json_line(&view),
                false => format!(
                    "{name} is shared with {handle} ({}{})\n",
                    access_name(view.access),
                    port_note(context, name, port)
                ),
            }
        }
        Some(ShareCommand::Rm { handle }) => {
            let user = user_id(users, &handle).await?;
            let removed = commands
                .unshare(name, &ShareWithView::User(user), None)
                .await?;
            match json {
                true => json_line(&serde_json::json!({ "vm": name, "removed": removed })),
                false => format!("{name}: {removed} shares with {handle} taken back\n"),
            }
        }
        Some(ShareCommand::Link { access, port }) => {
            let view = commands
                .share_port(name, ShareWith::Link, access.into(), port)
                .await?;
            let secret = view.secret.clone().unwrap_or_default();
            let url = match view.access {
                Access::Http => Some(format!(
                    "{}?share={secret}",
                    context.https_port_url(name, port)
                )),
                _ => None,
            };
            match (json, url) {
                (true, url) => {
                    let mut value = serde_json::to_value(&view).unwrap_or_default();
                    if let Some(url) = url {
                        value["url"] = serde_json::Value::String(url);
                    }
                    json_line(&value)
                }
                (false, Some(url)) => format!(
                    "link to {name} ({}), shown only now:\n{url}\n",
                    access_name(view.access)
                ),
                (false, None) => format!(
                    "link secret for {name} ({}), shown only now: {secret}\n",
                    access_name(view.access)
                ),
            }
        }
        Some(ShareCommand::Port { port }) => {
            let view = match port {
                Some(port) => commands.set_http_port(name, Some(port)).await?,
                None => commands.get(name).await?,
            };
            let port = view.http_port;
            match json {
                true => json_line(&serde_json::json!({
                    "vm": name,
                    "port": port,
                    "url": context.https_url(name),
                })),
                false => format!(
                    "{} reaches port {port} of {name}\n",
                    context.https_url(name)
                ),
            }
        }
    };
    Ok(Output::ok(output))
}

const UNREGISTERED_HELP: &str = "\
vmkit lobby: this SSH key is not registered yet.

Commands:
  help                               this text
  whoami [--json]                    the key this session signed in with
  register HANDLE [--email E] [--json]
                                     register with this key as HANDLE; then
                                     connect again to use the lobby
";

/// The commands of a session signed in with an unregistered key.
#[derive(Parser, Debug)]
#[command(
    name = "vmkit",
    no_binary_name = true,
    disable_help_subcommand = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct UnregisteredArgs {
    #[command(subcommand)]
    command: UnregisteredCommand,
}

#[derive(Subcommand, Debug)]
enum UnregisteredCommand {
    /// Prints the commands.
    Help {
        #[arg(long)]
        json: bool,
    },
    /// The key of this session.
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// Registers the session's key.
    Register {
        handle: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Leaves the lobby.
    Exit {
        #[arg(long)]
        json: bool,
    },
}

/// Runs one command line in a session signed in with a key nobody registered:
/// only `help`, `whoami`, `register` (and `exit` at the prompt) work; anything
/// else answers how to register, with a non-zero status.
pub async fn run_unregistered(
    commands: &Commands,
    context: &LobbyContext,
    unregistered: &Unregistered,
    words: &[String],
) -> Output {
    let json = wants_json(words);
    let hint = register_hint(context.port, unregistered.policy);
    let not_registered = || {
        Output::failure(
            format!("this key is not registered: run {hint}"),
            "not_registered",
            json,
        )
    };
    let known = ["help", "whoami", "register", "exit"];
    match words.first() {
        None => return Output::ok(UNREGISTERED_HELP.to_owned()),
        Some(first) if !known.contains(&first.as_str()) => return not_registered(),
        Some(_) => {}
    }
    let args = match UnregisteredArgs::try_parse_from(words) {
        Ok(args) => args,
        Err(e) => {
            let message = e.to_string();
            let message = message
                .trim()
                .trim_start_matches("error: ")
                .lines()
                .filter(|l| !l.trim_start().starts_with("Usage:") && !l.contains("--help"))
                .collect::<Vec<_>>()
                .join("\n");
            let message = format!("{}; `help` lists the commands", message.trim());
            return Output::failure(message, "invalid_command", json);
        }
    };
    let fingerprint = unregistered.key.fingerprint();
    match args.command {
        UnregisteredCommand::Help { json: false } => Output::ok(UNREGISTERED_HELP.to_owned()),
        UnregisteredCommand::Help { json: true } => {
            Output::ok(json_line(&serde_json::json!({ "help": UNREGISTERED_HELP })))
        }
        UnregisteredCommand::Exit { json } => Output {
            stdout: match json {
                true => json_line(&serde_json::json!({ "exit": true })),
                false => "bye\n".into(),
            },
            exit: true,
            ..Output::default()
        },
        UnregisteredCommand::Whoami { json: true } => Output::ok(json_line(&serde_json::json!({
            "registered": false,
            "ssh_key": {
                "fingerprint": fingerprint,
                "key": unregistered.key.to_openssh(),
                "current": true,
            },
        }))),
        UnregisteredCommand::Whoami { json: false } => Output::ok(format!(
            "not registered: key {fingerprint} (this session)\nregister it: {hint}\n"
        )),
        UnregisteredCommand::Register {
            handle,
            email,
            json,
        } => {
            let handle = match Handle::new(handle) {
                Ok(handle) => handle,
                Err(e) => return error_output(commands, &e.into(), json),
            };
            let mut registration = Registration::new(handle, unregistered.key.clone());
            if let Some(email) = email {
                registration = registration.email(email);
            }
            if let Some(code) = &unregistered.invite {
                registration = registration.invite(code.clone());
            }
            match commands.register(registration).await {
                Ok(user) => Output::ok(match json {
                    true => json_line(&serde_json::json!({ "user": user })),
                    false => format!(
                        "registered {}; connect again to use the lobby\n",
                        user.handle
                    ),
                }),
                Err(e @ ManagerError::InviteRequired) => Output::failure(
                    format!("{}: run {hint}", error_message(commands, &e)),
                    e.code(),
                    json,
                ),
                Err(e) => error_output(commands, &e, json),
            }
        }
    }
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}

impl Pipe for String {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_split_with_quotes_and_escapes() {
        assert_eq!(
            split_words(r#"new --name web  'a b' "c \"d\"" e\ f"#).unwrap(),
            vec!["new", "--name", "web", "a b", "c \"d\"", "e f"]
        );
        assert!(split_words("new 'open").is_err());
        assert_eq!(split_words("   ").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn ssh_key_add_without_a_key_reads_stdin() {
        let words = |s: &str| split_words(s).unwrap();
        assert!(reads_stdin(&words("ssh-key add")));
        assert!(reads_stdin(&words("ssh-key add --json")));
        assert!(!reads_stdin(&words("ssh-key add ssh-ed25519 AAAA")));
        assert!(!reads_stdin(&words("ls")));
    }

    #[test]
    fn a_pasted_private_key_is_refused() {
        let err = public_key("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n").unwrap_err();
        assert!(
            matches!(
                &err,
                LobbyError::Lobby {
                    code: "private_key_refused",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn the_register_hint_names_the_port_and_under_invite_the_code() {
        assert_eq!(
            register_hint(22, RegistrationPolicy::Open),
            "`ssh HOST register HANDLE`"
        );
        assert!(
            register_hint(2222, RegistrationPolicy::Invite)
                .contains("`ssh -p 2222 vmi_CODE@HOST register HANDLE`")
        );
    }

    #[tokio::test]
    async fn an_unregistered_session_answers_other_commands_with_how_to_register() {
        let host = vmkit_core::testing::FakeHost::new().await;
        let commands = host
            .manager
            .commands(vmkit_core::Caller::anonymous(vmkit_core::Door::Ssh));
        let key = SshPublicKey::parse(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFBuHpZWFVVHKfVgVzKIWNVlPsXU+J5hJbUgg9MVFq5 k",
        )
        .unwrap();
        let unregistered = Unregistered {
            key,
            invite: None,
            policy: RegistrationPolicy::Open,
        };
        let context = LobbyContext {
            domain: "vm.test".into(),
            port: 2222,
            public_host: "vm.test".into(),
            current_key: None,
            https_port: Some(443),
        };
        let words = |s: &str| split_words(s).unwrap();

        let ls = run_unregistered(&commands, &context, &unregistered, &words("ls -l")).await;
        let help = run_unregistered(&commands, &context, &unregistered, &words("help")).await;

        assert_eq!(ls.status, 1);
        assert_eq!(
            ls.stderr,
            "error: this key is not registered: run `ssh -p 2222 HOST register HANDLE`\n"
        );
        assert_eq!(help.status, 0);
    }

    #[test]
    fn control_characters_are_escaped_but_newlines_and_tabs_kept() {
        assert_eq!(
            escape_control("a\x1b[2Jb\tc\r\nd\re\u{9b}f\u{202e}g\x07\n"),
            "a\\x1b[2Jb\tc\nd\\x0de\\u{9b}f\\u{202e}g\\x07\n"
        );
        assert_eq!(
            escape_control("plain text, ünïcode\n"),
            "plain text, ünïcode\n"
        );
    }

    #[test]
    fn json_escapes_the_control_characters_the_encoder_leaves() {
        let text = "a\x1b\u{9b}\u{7f}\u{202e}\"\nb";
        let line = json_line(&serde_json::json!({ "console": text }));
        assert!(
            !line.contains(['\x1b', '\u{9b}', '\u{7f}', '\u{202e}']),
            "{line:?}"
        );
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["console"], text);
    }

    #[test]
    fn the_new_commands_parse_in_their_documented_forms() {
        let parse = |s: &str| LobbyArgs::try_parse_from(split_words(s).unwrap()).map(|a| a.command);
        assert!(matches!(
            parse("share web").unwrap(),
            LobbyCommand::Share {
                action: None,
                json: false,
                ..
            }
        ));
        assert!(matches!(
            parse("share web --json").unwrap(),
            LobbyCommand::Share {
                action: None,
                json: true,
                ..
            }
        ));
        assert!(matches!(
            parse("share web public --access ssh --json").unwrap(),
            LobbyCommand::Share {
                action: Some(ShareCommand::Public {
                    access: AccessArg::Ssh,
                    port: None,
                }),
                json: true,
                ..
            }
        ));
        assert!(matches!(
            parse("share web add bob").unwrap(),
            LobbyCommand::Share {
                action: Some(ShareCommand::Add {
                    access: AccessArg::Http,
                    ..
                }),
                ..
            }
        ));
        assert!(parse("share web public --access root").is_err());
        assert!(matches!(
            parse("cp snap copy --from-snapshot").unwrap(),
            LobbyCommand::Cp {
                from_snapshot: true,
                new: Some(_),
                ..
            }
        ));
        assert!(matches!(
            parse("cp web").unwrap(),
            LobbyCommand::Cp { new: None, .. }
        ));
        assert!(matches!(
            parse("logs web").unwrap(),
            LobbyCommand::Logs {
                bytes: DEFAULT_LOG_BYTES,
                ..
            }
        ));
        assert!(parse("snapshot web").is_err());
        assert!(parse("rm-snapshot snap --json").is_ok());
    }

    #[test]
    fn every_command_is_in_the_help() {
        for command in [
            "cp SRC",
            "resize NAME",
            "snapshot NAME SNAP",
            "restore NAME SNAP",
            "snapshots",
            "rm-snapshot SNAP",
            "logs NAME",
            "share NAME public",
            "share NAME private",
            "share NAME add HANDLE",
            "share NAME rm HANDLE",
            "share NAME link",
            "rename OLD NEW",
            "ssh-config",
        ] {
            assert!(HELP.contains(&format!("  {command}")), "{command}");
        }
        assert!(!HELP.contains('\x1b'));
    }

    #[test]
    fn timestamps_are_shown_as_utc_dates() {
        use vmkit_core::Timestamp;
        assert_eq!(utc_minute(Timestamp(0)), "1970-01-01T00:00Z");
        // 2000-02-29 12:34 UTC, a leap day.
        assert_eq!(utc_minute(Timestamp(951_827_640_000)), "2000-02-29T12:34Z");
        // 2026-12-31 23:59 UTC.
        assert_eq!(
            utc_minute(Timestamp(1_798_761_540_000)),
            "2026-12-31T23:59Z"
        );
    }

    #[test]
    fn completion_offers_commands_subcommands_options_and_vm_names() {
        let words = |s: &[&str]| s.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let Completion::Words(commands) = completion(&words(&["re"]), true) else {
            panic!("commands")
        };
        for command in ["rename", "restart", "resize", "restore", "rm", "ssh-config"] {
            assert!(commands.iter().any(|c| c == command), "{command}");
        }
        assert_eq!(completion(&words(&["stop", "w"]), true), Completion::VmName);
        assert_eq!(
            completion(&words(&["rm", "a", "b"]), true),
            Completion::VmName
        );
        assert_eq!(
            completion(&words(&["rename", "web", ""]), true),
            Completion::Nothing
        );
        let Completion::Words(keys) = completion(&words(&["ssh-key", ""]), true) else {
            panic!("ssh-key")
        };
        assert_eq!(keys, ["ls", "add", "rm"]);
        let Completion::Words(api_keys) = completion(&words(&["api-key", ""]), true) else {
            panic!("api-key")
        };
        assert_eq!(api_keys, ["new", "ls", "rm"]);
        assert_eq!(
            completion(&words(&["api-key", "new", "--vm", "w"]), true),
            Completion::VmName
        );
        let Completion::Words(options) = completion(&words(&["api-key", "new", "--"]), true) else {
            panic!("api-key options")
        };
        for option in ["--label", "--expires", "--read-only", "--vm", "--json"] {
            assert!(options.contains(&option.to_owned()), "{options:?}");
        }
        let Completion::Words(share) = completion(&words(&["share", "web", "p"]), true) else {
            panic!("share")
        };
        assert!(share.contains(&"public".to_owned()), "{share:?}");
        let Completion::Words(domain) = completion(&words(&["domain", ""]), true) else {
            panic!("domain")
        };
        assert_eq!(domain, ["add", "ls", "rm"]);
        assert_eq!(
            completion(&words(&["domain", "add", "w"]), true),
            Completion::VmName
        );
        assert_eq!(
            completion(&words(&["domain", "rm", "a"]), true),
            Completion::Nothing
        );
        let Completion::Words(options) = completion(&words(&["new", "--c"]), true) else {
            panic!("options")
        };
        assert!(options.contains(&"--cpus".to_owned()), "{options:?}");
        let Completion::Words(unregistered) = completion(&words(&[""]), false) else {
            panic!("unregistered")
        };
        assert!(unregistered.contains(&"register".to_owned()));
        assert!(!unregistered.contains(&"new".to_owned()));
        assert_eq!(
            completion(&words(&["stop", ""]), false),
            Completion::Nothing
        );
    }

    #[test]
    fn ssh_config_jumps_through_the_public_host() {
        let mut context = LobbyContext {
            domain: "vm.example.com".into(),
            port: 2222,
            public_host: "vm.example.com".into(),
            current_key: None,
            https_port: Some(443),
        };
        let config = context.ssh_config();
        assert!(config.contains("Host *.vm.example.com\n"), "{config}");
        assert!(
            config.contains("    ProxyJump vm.example.com:2222\n"),
            "{config}"
        );
        context.public_host = "gw.vm.example.com".into();
        context.port = 22;
        let config = context.ssh_config();
        assert!(
            config.contains("Host *.vm.example.com !gw.vm.example.com\n"),
            "a gateway under the domain does not jump through itself: {config}"
        );
        assert!(
            config.contains("    ProxyJump gw.vm.example.com\n"),
            "{config}"
        );
    }

    #[test]
    fn only_slow_commands_print_progress_and_never_in_json() {
        let words = |s: &str| split_words(s).unwrap();
        assert!(progress(&words("new --name web")).is_some());
        assert!(progress(&words("new --json")).is_none());
        assert!(progress(&words("ls")).is_none());
    }

    #[test]
    fn names_accept_the_domain_suffix() {
        let context = LobbyContext {
            domain: "vm.example.com".into(),
            port: 22,
            public_host: "vm.example.com".into(),
            current_key: None,
            https_port: Some(443),
        };
        assert_eq!(context.vm_name("web").unwrap().as_str(), "web");
        assert_eq!(
            context.vm_name("web.vm.example.com").unwrap().as_str(),
            "web"
        );
        assert!(context.vm_name("web.other.com").is_err());
    }
}
