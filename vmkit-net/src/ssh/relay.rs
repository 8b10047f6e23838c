//! `ssh NAME@host` and `ssh -J host NAME.domain`: the ways into a VM.
//!
//! `NAME@host` ends at the gateway. Each channel the client opens is relayed on a
//! connection of the gateway's own to the VM's sshd, one per client connection,
//! signed in with the VM's gateway key ([`vmkit_core::VmKey`]) as the image's
//! default user (or the user the client named: `NAME+USER@host` or
//! `USER+NAME@host`), and trusted only if the server shows a host key the VM's agent
//! reported ([`vmkit_core::SshTarget::host_keys`]). Session channels carry their
//! requests (pty, env, shell, exec, subsystem, window changes, signals, agent
//! forwarding) and their data both ways with the exit status; `-L` opens a
//! `direct-tcpip` channel from the VM's side; `-R` asks the VM's sshd to listen and
//! relays what connects; the VM's agent-forwarding channels reach the client's
//! agent. An image without sshd gets a session through the guest agent instead (a
//! shell with a terminal, or a command), so `ssh NAME@host` works in any VM.
//!
//! `-J host NAME.domain` is a `direct-tcpip` channel of a lobby connection to
//! `NAME.domain:22`: once the policy lets the caller SSH into the VM, it becomes a
//! plain TCP relay to the VM's sshd, end to end encrypted between the client and
//! the VM (the client checks the VM's own host key; the VM checks the user's key,
//! which its agent installed).
//!
//! Every relay is bounded: each direction reads the next message only once the
//! previous one was written, and writes wait for the other side's SSH window, so a
//! slow reader slows the writer instead of filling memory. A VM the caller may not
//! reach is answered like one that does not exist; a stopped VM is started by a
//! connection of one who may start it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::server::Msg as DownMsg;
use russh::{Channel, ChannelMsg, ChannelWriteHalf, Sig, client, server};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};
use vmkit_core::guest::{ExecEvent, SessionRequest};
use vmkit_core::{
    Action, Caller, Commands, GUEST_SSH_PORT, ManagerError, RouteTarget, SshTarget, VmName, VmState,
};

use super::server::Shared;

/// How long connecting and signing in to a VM's sshd may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes a relayed byte stream (a forwarded port, the agent) moves at once.
const COPY_BUFFER: usize = 64 * 1024;
/// Input a guest session keeps before the command starts (`ssh NAME@host cmd < file`
/// sends it at once).
const EARLY_INPUT: usize = 64 * 1024;

/// What a signed-in client named in its SSH user name: a VM and the user to land
/// as in it.
#[derive(Clone, Debug)]
pub(super) struct VmTarget {
    /// The VM.
    pub name: VmName,
    /// The guest user the client named, if any.
    pub guest_user: Option<String>,
}

/// The way into the VM of one client connection.
pub(super) struct VmLink {
    shared: Arc<Shared>,
    caller: Caller,
    target: VmTarget,
    /// The client's connection.
    down: server::Handle,
    /// The connection to the VM's sshd, once made.
    upstream: tokio::sync::Mutex<Option<Arc<Upstream>>>,
    /// The client asked for agent forwarding on one of its sessions.
    agent_forwarding: Arc<AtomicBool>,
}

/// A connection to a VM's sshd.
struct Upstream {
    handle: client::Handle<UpHandler>,
}

/// How a channel reaches the VM.
enum Way {
    /// Through the VM's sshd.
    Sshd(Arc<Upstream>),
    /// Through its agent (no sshd in the image).
    Agent,
}

/// A refusal to show the client.
type Refusal = String;

impl VmLink {
    pub(super) fn new(
        shared: Arc<Shared>,
        caller: Caller,
        target: VmTarget,
        down: server::Handle,
    ) -> Arc<Self> {
        Arc::new(Self {
            shared,
            caller,
            target,
            down,
            upstream: tokio::sync::Mutex::new(None),
            agent_forwarding: Arc::new(AtomicBool::new(false)),
        })
    }

    fn commands(&self) -> Commands {
        self.shared.manager.commands(self.caller.clone())
    }

    /// The VM's way in: starts it first when it is stopped and the caller may
    /// start it (saying so on `say`), connects to its sshd once per connection.
    async fn reach(&self, say: Option<&ChannelWriteHalf<DownMsg>>) -> Result<Way, Refusal> {
        let mut upstream = self.upstream.lock().await;
        if let Some(up) = upstream.as_ref().filter(|up| !up.handle.is_closed()) {
            return Ok(Way::Sshd(up.clone()));
        }
        let commands = self.commands();
        let name = &self.target.name;
        let target = match commands.ssh_target(name).await {
            Err(ManagerError::WrongState {
                state: VmState::Stopped,
                ..
            }) => {
                if let Some(say) = say {
                    let line = format!("vmkit: starting {name}...\r\n");
                    let _ = say.extended_data_bytes(1, line.into_bytes()).await;
                }
                info!(vm = %name, "starting a stopped VM for an SSH connection");
                commands.start(name).await.map_err(|e| refusal(&e))?;
                commands.ssh_target(name).await.map_err(|e| refusal(&e))?
            }
            other => other.map_err(|e| refusal(&e))?,
        };
        let Some(address) = target.address.filter(|_| target.sshd) else {
            return Ok(Way::Agent);
        };
        let up = Arc::new(self.connect(&target, address).await?);
        *upstream = Some(up.clone());
        Ok(Way::Sshd(up))
    }

    /// Connects and signs in to the VM's sshd.
    async fn connect(&self, target: &SshTarget, address: SocketAddr) -> Result<Upstream, Refusal> {
        let name = &self.target.name;
        let user = self
            .target
            .guest_user
            .clone()
            .or_else(|| target.default_user.clone())
            .unwrap_or_else(|| "root".to_owned());
        let refused_key = Arc::new(Mutex::new(None));
        let handler = UpHandler {
            host_keys: target
                .host_keys
                .iter()
                .filter_map(|k| russh::keys::PublicKey::from_openssh(&k.to_openssh()).ok())
                .collect(),
            refused_key: refused_key.clone(),
            down: self.down.clone(),
            agent_forwarding: self.agent_forwarding.clone(),
        };
        let config = Arc::new(client::Config {
            nodelay: true,
            ..client::Config::default()
        });
        let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            target.client_key.seed(),
        ));
        let attempt = async {
            let mut handle = client::connect(config, address, handler).await?;
            let auth = handle
                .authenticate_publickey(&user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
                .await?;
            Ok::<_, russh::Error>((handle, auth.success()))
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            Ok(Ok((handle, true))) => {
                debug!(vm = %name, %user, "signed in to the VM's SSH server");
                Ok(Upstream { handle })
            }
            Ok(Ok((_, false))) => Err(format!(
                "VM {name} does not let the gateway in as {user}: vmkit installs its key for the \
                 image's default user and root only (ssh {name}@HOST, or {name}+root@HOST)"
            )),
            Ok(Err(e)) => {
                if let Some(shown) = refused_key.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    warn!(vm = %name, key = %shown, "a VM's SSH server showed a host key its agent did not report");
                    return Err(format!(
                        "VM {name}'s SSH server shows a host key ({shown}) its agent did not report \
                         at boot; vmkit does not connect to it. If the VM's host keys were changed on \
                         purpose, restart it (ssh HOST restart {name}) so that its agent reports them."
                    ));
                }
                warn!(vm = %name, error = %e, "cannot reach a VM's SSH server");
                Err(format!(
                    "cannot reach the SSH server of VM {name} ({e}); is sshd running in it?"
                ))
            }
            Err(_) => Err(format!(
                "the SSH server of VM {name} did not answer within {} s; is sshd running in it?",
                UPSTREAM_TIMEOUT.as_secs()
            )),
        }
    }

    /// Relays one session channel the client opened.
    pub(super) async fn session(self: Arc<Self>, down: Channel<DownMsg>) {
        let (down_read, down_write) = down.split();
        match self.reach(Some(&down_write)).await {
            Ok(Way::Sshd(up)) => match up.handle.channel_open_session().await {
                Ok(up_channel) => {
                    relay_session(down_read, down_write, up_channel, self.down.clone(), &self).await
                }
                Err(e) => {
                    refuse(&down_write, &format!("the VM refused a session ({e})")).await;
                }
            },
            Ok(Way::Agent) => self.agent_session(down_read, down_write).await,
            Err(refusal) => refuse(&down_write, &refusal).await,
        }
    }

    /// `-L`: a `direct-tcpip` channel opened from the VM's side.
    pub(super) async fn forward_local(
        self: Arc<Self>,
        down: Channel<DownMsg>,
        host: String,
        port: u32,
        originator: (String, u32),
    ) {
        let up = match self.reach(None).await {
            Ok(Way::Sshd(up)) => up,
            Ok(Way::Agent) | Err(_) => {
                let _ = down.close().await;
                return;
            }
        };
        match up
            .handle
            .channel_open_direct_tcpip(host, port, originator.0, originator.1)
            .await
        {
            Ok(up_channel) => copy_channels(down, up_channel).await,
            Err(e) => {
                debug!(vm = %self.target.name, error = %e, "the VM refused a forwarded connection");
                let _ = down.close().await;
            }
        }
    }

    /// `-R`: asks the VM's sshd to listen on `address:port`; the port it listens on.
    pub(super) async fn forward_remote(&self, address: &str, port: u32) -> Option<u32> {
        let Ok(Way::Sshd(up)) = self.reach(None).await else {
            return None;
        };
        up.handle.tcpip_forward(address, port).await.ok()
    }

    /// Stops a `-R` listener.
    pub(super) async fn cancel_forward_remote(&self, address: &str, port: u32) -> bool {
        let up = self.upstream.lock().await.clone();
        match up {
            Some(up) => up.handle.cancel_tcpip_forward(address, port).await.is_ok(),
            None => false,
        }
    }

    /// A session through the guest agent: collects the pty and environment
    /// requests, starts at `shell` or `exec`, then relays.
    async fn agent_session(
        &self,
        mut down_read: russh::ChannelReadHalf,
        down_write: ChannelWriteHalf<DownMsg>,
    ) {
        let name = &self.target.name;
        let mut pty = None;
        let mut env = Vec::new();
        let mut early = Vec::new();
        let mut early_eof = false;
        let argv = loop {
            match down_read.wait().await {
                Some(ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    ..
                }) => pty = Some((term, cols(col_width), cols(row_height))),
                Some(ChannelMsg::SetEnv {
                    variable_name,
                    variable_value,
                    ..
                }) => env.push((variable_name, variable_value)),
                Some(ChannelMsg::RequestShell { .. }) => break Vec::new(),
                Some(ChannelMsg::Exec { command, .. }) => {
                    break vec![
                        "/bin/sh".to_owned(),
                        "-c".to_owned(),
                        String::from_utf8_lossy(&command).into_owned(),
                    ];
                }
                Some(ChannelMsg::RequestSubsystem {
                    name: subsystem, ..
                }) => {
                    let text = format!(
                        "VM {name} has no SSH server (its image has none), so `{subsystem}` (sftp, \
                         scp) cannot run; a shell and commands work: ssh {name}@HOST [COMMAND]"
                    );
                    refuse(&down_write, &text).await;
                    return;
                }
                Some(ChannelMsg::Data { data }) if early.len() + data.len() <= EARLY_INPUT => {
                    early.extend_from_slice(&data)
                }
                Some(ChannelMsg::Eof) => early_eof = true,
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            }
        };
        let mut request = SessionRequest::new(argv);
        if let Some((term, width, height)) = pty {
            request = request.pty(term, width, height);
        }
        for (key, value) in env {
            request = request.env(key, value);
        }
        if let Some(user) = &self.target.guest_user {
            request = request.user(user.clone());
        }
        let session = match self.commands().session(name, request).await {
            Ok(session) => session,
            Err(e) => {
                refuse(&down_write, &refusal(&e)).await;
                return;
            }
        };
        let (input, mut events) = session.split();
        if !early.is_empty() {
            let _ = input.send(&early).await;
        }
        if early_eof {
            let _ = input.close_stdin().await;
        }
        let to_guest = {
            let input = input.clone();
            async move {
                while let Some(message) = down_read.wait().await {
                    let sent = match message {
                        ChannelMsg::Data { data } => input.send(&data).await,
                        ChannelMsg::Eof => input.close_stdin().await,
                        ChannelMsg::WindowChange {
                            col_width,
                            row_height,
                            ..
                        } => input.resize(cols(col_width), cols(row_height)).await,
                        ChannelMsg::Signal { signal } => input.signal(&signal_name(&signal)).await,
                        ChannelMsg::Close => break,
                        _ => Ok(()),
                    };
                    if sent.is_err() {
                        break;
                    }
                }
            }
        };
        let from_guest = async {
            while let Some(event) = events.next().await {
                match event {
                    Ok(ExecEvent::Stdout(data)) => {
                        if down_write.data_bytes(data).await.is_err() {
                            return;
                        }
                    }
                    Ok(ExecEvent::Stderr(data)) => {
                        if down_write.extended_data_bytes(1, data).await.is_err() {
                            return;
                        }
                    }
                    Ok(ExecEvent::Exit(status)) => {
                        match (status.code, status.signal) {
                            (_, Some(signal)) => {
                                let _ = self
                                    .down
                                    .exit_signal_request(
                                        down_write.id(),
                                        sig_of(signal),
                                        false,
                                        String::new(),
                                        String::new(),
                                    )
                                    .await;
                            }
                            (code, None) => {
                                let code = code.map_or(255, |c| u32::try_from(c).unwrap_or(255));
                                let _ = down_write.exit_status(code).await;
                            }
                        }
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let text = format!("vmkit: the session in VM {name} broke: {e}\r\n");
                        let _ = down_write.extended_data_bytes(1, text.into_bytes()).await;
                        let _ = down_write.exit_status(255).await;
                        return;
                    }
                }
            }
        };
        tokio::select! {
            () = from_guest => {}
            () = to_guest => {
                // The client went away: hang up the guest's side.
                let _ = input.hang_up().await;
            }
        }
        let _ = down_write.eof().await;
        let _ = down_write.close().await;
    }
}

/// Relays a session channel between the client (`down_*`) and the VM's sshd (`up`).
async fn relay_session(
    mut down_read: russh::ChannelReadHalf,
    down_write: ChannelWriteHalf<DownMsg>,
    up: Channel<client::Msg>,
    down_handle: server::Handle,
    link: &VmLink,
) {
    let id = down_write.id();
    let (mut up_read, up_write) = up.split();
    // The requests sent with a reply wanted, oldest first: the VM answers in order.
    let pending: Arc<Mutex<VecDeque<&'static str>>> = Arc::default();
    let to_vm = {
        let pending = pending.clone();
        let agent_forwarding = link.agent_forwarding.clone();
        async move {
            let expect = |what: &'static str| {
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(what)
            };
            while let Some(message) = down_read.wait().await {
                let sent = match message {
                    ChannelMsg::Data { data } => up_write.data_bytes(data).await,
                    ChannelMsg::Eof => up_write.eof().await,
                    ChannelMsg::Close => break,
                    ChannelMsg::RequestPty {
                        term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        terminal_modes,
                        ..
                    } => {
                        expect("a terminal");
                        up_write
                            .request_pty(
                                true,
                                &term,
                                col_width,
                                row_height,
                                pix_width,
                                pix_height,
                                &terminal_modes,
                            )
                            .await
                    }
                    ChannelMsg::SetEnv {
                        variable_name,
                        variable_value,
                        ..
                    } => up_write.set_env(false, variable_name, variable_value).await,
                    ChannelMsg::RequestShell { .. } => {
                        expect("a shell");
                        up_write.request_shell(true).await
                    }
                    ChannelMsg::Exec { command, .. } => {
                        expect("the command");
                        up_write.exec(true, command).await
                    }
                    ChannelMsg::RequestSubsystem { name, .. } => {
                        expect("the subsystem");
                        up_write.request_subsystem(true, name).await
                    }
                    ChannelMsg::WindowChange {
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                    } => {
                        up_write
                            .window_change(col_width, row_height, pix_width, pix_height)
                            .await
                    }
                    ChannelMsg::Signal { signal } => up_write.signal(signal).await,
                    ChannelMsg::AgentForward { .. } => {
                        agent_forwarding.store(true, Ordering::SeqCst);
                        up_write.agent_forward(false).await
                    }
                    _ => Ok(()),
                };
                if sent.is_err() {
                    break;
                }
            }
            let _ = up_write.close().await;
        }
    };
    let from_vm = async {
        while let Some(message) = up_read.wait().await {
            let sent = match message {
                ChannelMsg::Data { data } => down_write.data_bytes(data).await,
                ChannelMsg::ExtendedData { data, ext } => {
                    down_write.extended_data_bytes(ext, data).await
                }
                ChannelMsg::Eof => down_write.eof().await,
                ChannelMsg::ExitStatus { exit_status } => down_write.exit_status(exit_status).await,
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    let _ = down_handle
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await;
                    Ok(())
                }
                ChannelMsg::Success => {
                    pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front();
                    Ok(())
                }
                ChannelMsg::Failure => {
                    let what = pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front();
                    let what = what.unwrap_or("a request");
                    let text = format!("vmkit: the VM's SSH server refused {what}\r\n");
                    let _ = down_write.extended_data_bytes(1, text.into_bytes()).await;
                    if what != "a terminal" {
                        let _ = down_write.exit_status(1).await;
                        break;
                    }
                    Ok(())
                }
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
    };
    // Whichever side ends first ends the channel; the other is dropped.
    tokio::select! {
        () = from_vm => {}
        () = to_vm => {}
    }
    let _ = down_write.eof().await;
    let _ = down_write.close().await;
}

/// Tells the client why its channel cannot go on, and ends it with status 1.
async fn refuse(down: &ChannelWriteHalf<DownMsg>, text: &str) {
    let line = format!("vmkit: {text}\r\n");
    let _ = down.extended_data_bytes(1, line.into_bytes()).await;
    let _ = down.exit_status(1).await;
    let _ = down.eof().await;
    let _ = down.close().await;
}

/// What the client is told of `error`: the same for a VM it may not reach as for
/// one that does not exist (the command surface answers both as not found).
fn refusal(error: &ManagerError) -> Refusal {
    error.public_message()
}

/// Copies bytes both ways between two channels until both sides are done.
async fn copy_channels<A, B>(a: Channel<A>, b: Channel<B>)
where
    A: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
    B: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let mut a = a.into_stream();
    let mut b = b.into_stream();
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER).await;
    let _ = a.shutdown().await;
    let _ = b.shutdown().await;
}

/// `-J host NAME.domain`: a `direct-tcpip` channel of a lobby connection to a VM's
/// sshd, relayed to it over TCP once the policy lets the caller in.
pub(super) async fn jump(
    shared: Arc<Shared>,
    caller: Caller,
    host: String,
    port: u32,
    reply: server::ChannelOpenHandle,
    down: Channel<DownMsg>,
) {
    match jump_address(&shared, &caller, &host, port).await {
        Ok(address) => {
            match tokio::time::timeout(UPSTREAM_TIMEOUT, tokio::net::TcpStream::connect(address))
                .await
            {
                Ok(Ok(mut tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    let mut channel = down.into_stream();
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut channel,
                        &mut tcp,
                        COPY_BUFFER,
                        COPY_BUFFER,
                    )
                    .await;
                    let _ = channel.shutdown().await;
                }
                _ => {
                    debug!(%host, %address, "cannot connect to a VM's SSH server for a jump");
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                }
            }
        }
        Err(reason) => {
            debug!(%host, port, reason, "jump refused");
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
    }
}

/// Where a jump to `host:port` goes, if the caller may go there.
async fn jump_address(
    shared: &Shared,
    caller: &Caller,
    host: &str,
    port: u32,
) -> Result<SocketAddr, &'static str> {
    if port != u32::from(GUEST_SSH_PORT) {
        return Err("only port 22 is reachable by a jump");
    }
    let routed = shared
        .gateway
        .route(RouteTarget::SshJump {
            host,
            port: GUEST_SSH_PORT,
        })
        .await
        .map_err(|_| "not a VM host")?
        .ok_or("no such VM")?;
    shared
        .gateway
        .authorize(caller, Action::UseSsh, &routed)
        .map_err(|_| "not allowed")?;
    let name = routed.upstream.name.clone();
    let commands = shared.manager.commands(caller.clone());
    if !routed.upstream.running {
        // Woken by one who may start it, as `ssh NAME@host` is.
        commands.start(&name).await.map_err(|_| "stopped")?;
    }
    let target = commands
        .ssh_target(&name)
        .await
        .map_err(|_| "unreachable")?;
    target.address.ok_or("the VM has no network address")
}

/// The gateway's side of a connection to a VM's sshd.
struct UpHandler {
    /// The host keys the VM's agent reported.
    host_keys: Vec<russh::keys::PublicKey>,
    /// A host key shown that is none of those.
    refused_key: Arc<Mutex<Option<String>>>,
    /// The client's connection, for the channels the VM opens towards it.
    down: server::Handle,
    agent_forwarding: Arc<AtomicBool>,
}

impl client::Handler for UpHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        shown: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = shown else {
            return Ok(false);
        };
        if self
            .host_keys
            .iter()
            .any(|k| k.key_data() == key.key_data())
        {
            return Ok(true);
        }
        *self.refused_key.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(key.fingerprint(russh::keys::HashAlg::Sha256).to_string());
        Ok(false)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let down = self.down.clone();
        let (address, originator) = (connected_address.to_owned(), originator_address.to_owned());
        reply.accept().await;
        tokio::spawn(async move {
            match down
                .channel_open_forwarded_tcpip(address, connected_port, originator, originator_port)
                .await
            {
                Ok(down_channel) => copy_channels(down_channel, channel).await,
                Err(_) => {
                    let _ = channel.close().await;
                }
            }
        });
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Only for a client that asked to forward its agent.
        if !self.agent_forwarding.load(Ordering::SeqCst) {
            return Ok(());
        }
        let down = self.down.clone();
        reply.accept().await;
        tokio::spawn(async move {
            match down.channel_open_agent().await {
                Ok(down_channel) => copy_channels(down_channel, channel).await,
                Err(_) => {
                    let _ = channel.close().await;
                }
            }
        });
        Ok(())
    }
}

/// A terminal dimension as the agent takes it.
fn cols(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(u16::MAX)
}

/// The SSH name of `signal` (`INT`, ...).
fn signal_name(signal: &Sig) -> String {
    match signal {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    }
    .to_owned()
}

/// The SSH signal of a Linux signal number.
fn sig_of(signal: i32) -> Sig {
    match signal {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        other => Sig::Custom(format!("SIG{other}")),
    }
}
