//! The russh side: the listener loop, limits, sign-in and the session channels.
//!
//! Callbacks only record what the client asked for and reply; every command runs in
//! a task of its own, which owns the channel and answers on it (russh #149).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::Algorithm;
use russh::server::{
    Auth, ChannelOpenHandle, Config, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect, MethodKind,
    MethodSet, Preferred,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use vmkit_core::{
    Action, Caller, Credential, Door, Gateway, Manager, RegistrationPolicy, RouteTarget,
    SshPublicKey,
};

use super::line::{Key, LineEditor};
use super::lobby::{self, Completion, LobbyContext, Output, Unregistered};
use super::relay::{self, VmLink, VmTarget};
use super::{SshError, SshGateway};

/// What a client reads before it signs in under the `closed` policy. Sent to every
/// client (SSH sends the banner before the client names a key), so it says what to
/// do if the key is not registered without claiming that it is not.
const CLOSED_BANNER: &str = "vmkit: sign in with a registered SSH key. If yours is refused, ask \
the host's operator to register it: vmkit user add HANDLE --key FILE (FILE: your .pub file).\r\n";

/// The banner under `policy`: under `open` and `invite` an unknown key signs in to a
/// session that can only register it, so the banner says how.
fn banner(policy: RegistrationPolicy, port: u16) -> String {
    match policy {
        RegistrationPolicy::Open | RegistrationPolicy::Invite => format!(
            "vmkit: sign in with your SSH key. New here? Register your key with {}.\r\n",
            lobby::register_hint(port, policy)
        ),
        _ => CLOSED_BANNER.to_owned(),
    }
}

/// Whether `policy` lets an unknown key sign in to register itself.
fn registers(policy: RegistrationPolicy) -> bool {
    matches!(
        policy,
        RegistrationPolicy::Open | RegistrationPolicy::Invite
    )
}

/// The most stdin a command reads (`ssh-key add`).
const MAX_INPUT: usize = 16 * 1024;

/// The most the prompt keeps of what the client typed while a command ran; more
/// is dropped.
const MAX_TYPEAHEAD: usize = 64 * 1024;

/// Messages a channel holds unread before its client waits.
const CHANNEL_BUFFER: usize = 16;

/// What every connection shares.
pub(super) struct Shared {
    pub(super) manager: Manager,
    pub(super) gateway: Arc<dyn Gateway>,
    lobby: LobbyContext,
    /// The manager's registration policy.
    policy: RegistrationPolicy,
    russh: Arc<Config>,
    auth_timeout: Duration,
    max_connections_per_ip: usize,
    max_channels: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl Shared {
    /// A slot for one more connection from `ip`, or `None` when it has as many
    /// open as allowed.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= self.max_connections_per_ip {
            return None;
        }
        *count += 1;
        Some(Slot {
            shared: self.clone(),
            ip,
        })
    }
}

/// One open connection from an address; given back when dropped.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// russh's configuration: public keys only, modern algorithms only.
fn russh_config(gateway: &SshGateway) -> Config {
    let preferred = Preferred {
        kex: Cow::Borrowed(&[
            russh::kex::CURVE25519,
            russh::kex::CURVE25519_PRE_RFC_8731,
            russh::kex::EXTENSION_SUPPORT_AS_SERVER,
            russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]),
        key: Cow::Borrowed(&[Algorithm::Ed25519]),
        cipher: Cow::Borrowed(&[
            russh::cipher::CHACHA20_POLY1305,
            russh::cipher::AES_256_GCM,
            russh::cipher::AES_128_GCM,
        ]),
        // Only used with a cipher that has no MAC of its own; none offered has.
        mac: Cow::Borrowed(&[russh::mac::HMAC_SHA512_ETM, russh::mac::HMAC_SHA256_ETM]),
        compression: Cow::Borrowed(&[russh::compression::NONE]),
        ..Preferred::default()
    };

    let mut config = Config::default();
    config.server_id = russh::SshId::Standard(Cow::Borrowed("SSH-2.0-vmkit"));
    config.methods = MethodSet::from(&[MethodKind::PublicKey][..]);
    config.keys = vec![gateway.host_key.clone()];
    config.preferred = preferred;
    config.max_auth_attempts = gateway.config.max_auth_attempts;
    // OpenSSH asks with "none" first to learn the methods: no need to make it wait.
    config.auth_rejection_time_initial = Some(Duration::ZERO);
    config.inactivity_timeout = Some(gateway.config.inactivity_timeout);
    // What a channel's task has not read yet is held in a queue of this many
    // messages; a client that sends more waits (its connection's loop does). Small,
    // as lobby commands read little: at most 64 channels x 16 packets per
    // connection.
    config.channel_buffer_size = CHANNEL_BUFFER;
    config.nodelay = true;
    config
}

pub(super) async fn serve(
    gateway: SshGateway,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SshError> {
    let local = listener.local_addr().map_err(|source| SshError::Io {
        what: "reading the listener's address".into(),
        source,
    })?;
    let shared = Arc::new(Shared {
        lobby: LobbyContext {
            domain: gateway.config.domain.clone(),
            port: gateway.config.public_port.unwrap_or(local.port()),
            public_host: gateway.config.public_host.clone(),
            current_key: None,
            https_port: gateway.config.https_port,
        },
        policy: gateway.manager.config().registration,
        russh: Arc::new(russh_config(&gateway)),
        auth_timeout: gateway.config.auth_timeout,
        max_connections_per_ip: gateway.config.max_connections_per_ip,
        max_channels: gateway.config.max_channels,
        open: Mutex::new(HashMap::new()),
        manager: gateway.manager,
        gateway: gateway.gateway,
    });
    info!(address = %local, "SSH gateway listening");
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = shared.admit(peer.ip()) else {
                        debug!(%peer, "too many SSH connections from this address; closed");
                        continue;
                    };
                    connections.spawn(connection(shared.clone(), stream, peer, slot, closing.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(error = %e, "accepting an SSH connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    mut closing: watch::Receiver<bool>,
) {
    let authenticated = Arc::new(AtomicBool::new(false));
    let handler = Connection {
        shared: shared.clone(),
        peer,
        caller: None,
        lobby: shared.lobby.clone(),
        unregistered: None,
        candidate: None,
        authenticated: authenticated.clone(),
        channels: HashMap::new(),
        vm: None,
        link: None,
        relayed: HashSet::new(),
        open_channels: Arc::new(()),
        widths: HashMap::new(),
    };
    // One deadline from the accept to the sign-in, the greeting included.
    let sign_in_by = tokio::time::Instant::now() + shared.auth_timeout;
    let started = tokio::time::timeout_at(
        sign_in_by,
        russh::server::run_stream(shared.russh.clone(), stream, handler),
    )
    .await;
    let mut session = match started {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "SSH handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "no SSH greeting in time; closed");
            return;
        }
    };
    let handle = session.handle();
    let deadline = tokio::spawn({
        let handle = handle.clone();
        async move {
            tokio::time::sleep_until(sign_in_by).await;
            if !authenticated.load(Ordering::SeqCst) {
                debug!(%peer, "no sign-in in time; closing");
                let _ = handle
                    .disconnect(
                        Disconnect::ByApplication,
                        "sign-in took too long".into(),
                        String::new(),
                    )
                    .await;
            }
        }
    });
    let result = tokio::select! {
        result = &mut session => result,
        _ = closing.changed() => {
            let _ = handle
                .disconnect(
                    Disconnect::ByApplication,
                    "the gateway is shutting down".into(),
                    String::new(),
                )
                .await;
            match tokio::time::timeout(Duration::from_secs(5), &mut session).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "SSH session ended with an error");
    }
    deadline.abort();
    drop(slot);
}

/// A channel the client opened and has not yet said what to run in.
struct Pending {
    channel: Channel<Msg>,
    pty: bool,
    /// The terminal's width in columns, as the pty request and window changes say.
    width: Arc<AtomicU32>,
    /// Counts the channel as open ([`Connection::open_channels`]) until dropped.
    _open: Arc<()>,
}

/// One connection's handler.
///
/// # Unknown keys under `open` and `invite`
///
/// An unknown key may sign in to a registration-only session, but a key the client
/// offers later that IS registered must still win, and SSH never says how many keys
/// the client has left. So the first unknown key is accepted on offer (the client
/// then signs with it), and once russh verified that signature it becomes the
/// *candidate* and the attempt is refused with "partial success". OpenSSH answers a
/// partial success by offering its keys again from the one after the candidate
/// (its list rotates, each tried key going to the end), so it offers every other
/// key before the candidate comes round again: any registered one signs in as its
/// user (other unknown ones are refused), and the candidate offered a second time
/// means the client has no other key, so it signs in to register. A partial
/// success does not count as a failed attempt. A client that starts its list over
/// from the first key after a partial success would come back to the candidate at
/// once and register it even with a registered key further down its list; one that
/// gives up on a partial success cannot register (its registered keys still work).
struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    caller: Option<Caller>,
    /// The lobby's context for this session (the key it signed in with).
    lobby: LobbyContext,
    /// Set when the session signed in with a key nobody registered.
    unregistered: Option<Unregistered>,
    /// The fingerprint of the first unknown key whose signature was verified.
    candidate: Option<String>,
    authenticated: Arc<AtomicBool>,
    channels: HashMap<ChannelId, Pending>,
    /// The VM the SSH user name named (`NAME@host`): every session of the
    /// connection is relayed to it instead of the lobby.
    vm: Option<VmTarget>,
    /// The way into that VM, made at the first channel.
    link: Option<Arc<VmLink>>,
    /// The channels relayed to the VM, whose requests are answered at once (the
    /// relay tells the client if the VM then refuses one).
    relayed: HashSet<ChannelId>,
    /// One clone per open channel (pending, or held by its task): the
    /// count of open channels, capped at [`SshConfig::max_channels`](super::SshConfig).
    open_channels: Arc<()>,
    /// The terminal widths of channels with a pty, for window changes; an entry
    /// whose channel ended is dropped at the next pty request.
    widths: HashMap<ChannelId, Arc<AtomicU32>>,
}

/// `key` as vmkit keeps keys; `None` for a type it does not register (DSA, a
/// security key...).
fn vmkit_key(key: &russh::keys::PublicKey) -> Option<SshPublicKey> {
    let line = key.to_openssh().ok()?;
    SshPublicKey::parse(&line).ok()
}

impl Connection {
    /// The caller `key` identifies, if anyone.
    async fn identify(&self, key: &russh::keys::PublicKey) -> Result<Option<Caller>, russh::Error> {
        let Some(key) = vmkit_key(key) else {
            return Ok(None);
        };
        match self
            .shared
            .gateway
            .identify(Credential::SshKey(&key), Door::Ssh)
            .await
        {
            Ok(caller) => Ok(caller),
            Err(e) => {
                warn!(peer = %self.peer, error = %vmkit_core::ErrorChain(&e), "identifying an SSH key failed");
                Ok(None)
            }
        }
    }

    /// The VM `user` (the SSH user name) names, if `caller` may see it:
    /// `NAME`, `NAME+USER` or `USER+NAME` (the user to land as in the guest). A
    /// name that is no VM the caller may see is for the lobby.
    async fn route_vm(&self, caller: &Caller, user: &str) -> Option<VmTarget> {
        let mut names = vec![user.to_owned()];
        if let Some((first, second)) = user.split_once('+') {
            names.push(format!("{second}+{first}"));
        }
        for name in names {
            let routed = match self.shared.gateway.route(RouteTarget::SshUser(&name)).await {
                Ok(Some(routed)) => routed,
                Ok(None) => continue,
                Err(e) => {
                    warn!(peer = %self.peer, error = %vmkit_core::ErrorChain(&e), "routing an SSH user name failed");
                    return None;
                }
            };
            if self
                .shared
                .gateway
                .authorize(caller, Action::Get, &routed)
                .is_ok()
            {
                return Some(VmTarget {
                    name: routed.upstream.name.clone(),
                    guest_user: routed.upstream.guest_user.clone(),
                });
            }
        }
        None
    }

    /// The way into the VM this connection is for, made on first use.
    fn link(&mut self, session: &Session) -> Option<Arc<VmLink>> {
        if self.link.is_none() {
            let (Some(target), Some(caller)) = (self.vm.clone(), self.caller.clone()) else {
                return None;
            };
            self.link = Some(VmLink::new(
                self.shared.clone(),
                caller,
                target,
                session.handle(),
            ));
        }
        self.link.clone()
    }

    /// Answers a request on a relayed channel: yes (the relay tells the client if
    /// the VM refuses it). `None` when the channel is not relayed.
    fn answer_relayed(
        &self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Option<Result<(), russh::Error>> {
        self.relayed
            .contains(&channel)
            .then(|| session.channel_success(channel))
    }

    /// Takes the pending channel `id` for a task to run in, and tells the client
    /// the request succeeded.
    fn start(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<Option<(Pending, Signed)>, russh::Error> {
        match (self.channels.remove(&id), self.caller.clone()) {
            (Some(pending), Some(caller)) => {
                session.channel_success(id)?;
                let signed = Signed {
                    shared: self.shared.clone(),
                    context: self.lobby.clone(),
                    caller,
                    unregistered: self.unregistered.clone(),
                };
                Ok(Some((pending, signed)))
            }
            _ => {
                session.channel_failure(id)?;
                Ok(None)
            }
        }
    }
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(Some(banner(self.shared.policy, self.shared.lobby.port)))
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Refusing here makes the client offer its next key: every key is tried.
        if self.identify(offer.public_key).await?.is_some() {
            return Ok(Auth::Accept);
        }
        debug!(peer = %self.peer, "an SSH key nobody registered was offered");
        if !registers(self.shared.policy) || vmkit_key(offer.public_key).is_none() {
            return Ok(Auth::reject());
        }
        // The first unknown key, to have it signed; then only that one again (the
        // client came round to it: it has no other key). See [`Connection`].
        let fingerprint = fingerprint(offer.public_key);
        Ok(match &self.candidate {
            None => Auth::Accept,
            Some(candidate) if *candidate == fingerprint => Auth::Accept,
            Some(_) => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // The client proved it holds the key; identify it again (the record may
        // have changed since the offer).
        let fingerprint = fingerprint(key.public_key);
        let caller = match self.identify(key.public_key).await? {
            Some(caller) => caller,
            None => {
                let Some(vmkit_key) = vmkit_key(key.public_key) else {
                    return Ok(Auth::reject());
                };
                if !registers(self.shared.policy) {
                    return Ok(Auth::reject());
                }
                match &self.candidate {
                    None => {
                        // Ask the client for its other keys first: a partial success.
                        self.candidate = Some(fingerprint);
                        return Ok(Auth::Reject {
                            proceed_with_methods: None,
                            partial_success: true,
                        });
                    }
                    Some(candidate) if *candidate == fingerprint => {}
                    Some(_) => return Ok(Auth::reject()),
                }
                info!(peer = %self.peer, key = %fingerprint, "an unregistered SSH key signed in to register");
                self.unregistered = Some(Unregistered {
                    key: vmkit_key,
                    invite: user.starts_with("vmi_").then(|| user.to_owned()),
                    policy: self.shared.policy,
                });
                Caller::anonymous(Door::Ssh)
            }
        };
        if self.unregistered.is_none() {
            self.vm = self.route_vm(&caller, user).await;
            info!(peer = %self.peer, user, principal = ?caller.principal, vm = ?self.vm.as_ref().map(|v| v.name.to_string()), "signed in over SSH");
        }
        self.caller = Some(caller);
        self.lobby.current_key = Some(fingerprint);
        self.authenticated.store(true, Ordering::SeqCst);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.caller.is_none() {
            // Dropping the reply refuses the channel.
            return Ok(());
        }
        let open = Arc::strong_count(&self.open_channels) - 1;
        if open >= self.shared.max_channels {
            debug!(peer = %self.peer, open, "too many channels on one connection; refused");
            reply
                .reject(russh::ChannelOpenFailure::Other {
                    // SSH_OPEN_RESOURCE_SHORTAGE
                    code: 4,
                    reason: format!(
                        "too many channels open on this connection (at most {}); close some",
                        self.shared.max_channels
                    ),
                })
                .await;
            return Ok(());
        }
        if let Some(link) = self.link(session) {
            self.relayed.insert(channel.id());
            reply.accept().await;
            let open = self.open_channels.clone();
            tokio::spawn(async move {
                let _open = open;
                link.session(channel).await;
            });
            return Ok(());
        }
        self.channels.insert(
            channel.id(),
            Pending {
                channel,
                pty: false,
                width: Arc::new(AtomicU32::new(0)),
                _open: self.open_channels.clone(),
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // A channel closed before it ran anything no longer counts as open.
        self.channels.remove(&channel);
        self.relayed.remove(&channel);
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(width) = self.widths.get(&channel) {
            width.store(col_width, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(answered) = self.answer_relayed(channel, session) {
            return answered;
        }
        match self.channels.get_mut(&channel) {
            Some(pending) => {
                pending.pty = true;
                pending.width.store(col_width, Ordering::Relaxed);
                self.widths.retain(|_, width| Arc::strong_count(width) > 1);
                self.widths.insert(channel, pending.width.clone());
                session.channel_success(channel)
            }
            None => session.channel_failure(channel),
        }
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(answered) = self.answer_relayed(channel, session) {
            return answered;
        }
        if let Some((pending, signed)) = self.start(channel, session)? {
            let line = String::from_utf8_lossy(data).into_owned();
            tokio::spawn(exec(signed, pending, line));
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(answered) = self.answer_relayed(channel, session) {
            return answered;
        }
        if let Some((pending, signed)) = self.start(channel, session)? {
            tokio::spawn(shell(signed, pending));
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(answered) = self.answer_relayed(channel, session) {
            return answered;
        }
        session.channel_failure(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The lobby takes no environment; a VM's sshd decides what it accepts.
        match self.answer_relayed(channel, session) {
            Some(answered) => answered,
            None => session.channel_failure(channel),
        }
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.relayed.contains(&channel))
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(caller) = self.caller.clone().filter(|_| self.unregistered.is_none()) else {
            return Ok(());
        };
        if Arc::strong_count(&self.open_channels) > self.shared.max_channels {
            debug!(peer = %self.peer, "too many channels on one connection; a forward refused");
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        let open = self.open_channels.clone();
        if let Some(link) = self.link(session) {
            // `ssh -L` in `ssh NAME@host`: from the VM's side.
            reply.accept().await;
            let forward = link.forward_local(
                channel,
                host_to_connect.to_owned(),
                port_to_connect,
                (originator_address.to_owned(), originator_port),
            );
            tokio::spawn(async move {
                let _open = open;
                forward.await;
            });
            return Ok(());
        }
        // `ssh -J host NAME.domain`.
        let jump = relay::jump(
            self.shared.clone(),
            caller,
            host_to_connect.to_owned(),
            port_to_connect,
            reply,
            channel,
        );
        tokio::spawn(async move {
            let _open = open;
            jump.await;
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self.unregistered.is_some() {
            return Ok(false);
        }
        let Some(link) = self.link(session) else {
            return Ok(false);
        };
        // One round trip to the VM's sshd (bounded); the client waits for it anyway.
        Ok(match link.forward_remote(address, *port).await {
            Some(bound) => {
                if *port == 0 {
                    *port = bound;
                }
                true
            }
            None => false,
        })
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(match &self.link {
            Some(link) => link.cancel_forward_remote(address, port).await,
            None => false,
        })
    }
}

/// Writes `output` on the channel; with a pty, stderr goes with stdout (a terminal
/// shows both) and lines end in CR LF.
async fn write_output(channel: &ChannelWriteHalf<Msg>, output: &Output, pty: bool) {
    if pty {
        let text = format!("{}{}", output.stdout, output.stderr).replace('\n', "\r\n");
        let _ = channel.data_bytes(text.into_bytes()).await;
        return;
    }
    if !output.stdout.is_empty() {
        let _ = channel.data_bytes(output.stdout.clone().into_bytes()).await;
    }
    if !output.stderr.is_empty() {
        let _ = channel
            .extended_data_bytes(1, output.stderr.clone().into_bytes())
            .await;
    }
}

async fn finish(channel: &ChannelWriteHalf<Msg>, status: u32) {
    let _ = channel.exit_status(status).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// What the client sends on the channel until it closes its side (bounded).
async fn read_stdin(channel: &mut Channel<Msg>) -> String {
    let mut input = Vec::new();
    while let Some(message) = channel.wait().await {
        match message {
            ChannelMsg::Data { data } => {
                input.extend_from_slice(&data);
                if input.len() > MAX_INPUT {
                    break;
                }
            }
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => {}
        }
    }
    String::from_utf8_lossy(&input).into_owned()
}

/// A signed-in session, as a command task needs it.
struct Signed {
    shared: Arc<Shared>,
    context: LobbyContext,
    caller: Caller,
    /// Set when the session signed in with a key nobody registered.
    unregistered: Option<Unregistered>,
}

impl Signed {
    /// Runs one command line: the lobby's, or the registration-only session's.
    async fn run(&self, words: &[String], stdin: &str) -> Output {
        let commands = self.shared.manager.commands(self.caller.clone());
        match &self.unregistered {
            Some(unregistered) => {
                lobby::run_unregistered(&commands, &self.context, unregistered, words).await
            }
            None => lobby::run(&commands, &self.shared.manager, &self.context, words, stdin).await,
        }
    }
}

/// A sha256 fingerprint of `key` (`SHA256:...`).
fn fingerprint(key: &russh::keys::PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

/// `ssh HOST CMD`: one command, then the exit status.
async fn exec(signed: Signed, pending: Pending, line: String) {
    let Pending {
        mut channel,
        pty,
        _open,
        ..
    } = pending;
    let words = lobby::split_words(&line);
    let stdin = match &words {
        Ok(words) if signed.unregistered.is_none() && lobby::reads_stdin(words) => {
            read_stdin(&mut channel).await
        }
        _ => String::new(),
    };
    // From here on nothing reads what the client sends: drop it as it comes, so that
    // a client writing more than the command reads cannot stall its connection
    // (russh's loop waits while a channel's queue is full).
    let (read, write) = channel.split();
    let drain = tokio::spawn(discard(read));
    let output = match words {
        Err(e) => Output::failure(e, "invalid_command", false),
        Ok(words) => {
            if let Some(note) = lobby::progress(&words).filter(|_| signed.unregistered.is_none()) {
                let progress = Output {
                    stderr: note,
                    ..Output::default()
                };
                write_output(&write, &progress, pty).await;
            }
            signed.run(&words, &stdin).await
        }
    };
    write_output(&write, &output, pty).await;
    finish(&write, output.status).await;
    drain.abort();
}

/// Reads the channel to its end, dropping what comes.
async fn discard(mut read: ChannelReadHalf) {
    while read.wait().await.is_some() {}
}

/// What the client typed and the prompt has not taken yet: read as it comes, also
/// while a command runs, and kept up to [`MAX_TYPEAHEAD`] bytes.
#[derive(Default)]
struct Typed {
    bytes: Mutex<Vec<u8>>,
    /// The client closed its side (EOF or close).
    ended: AtomicBool,
    more: tokio::sync::Notify,
}

impl Typed {
    /// Reads the channel into `self` until its end.
    async fn read(self: Arc<Self>, mut read: ChannelReadHalf) {
        while let Some(message) = read.wait().await {
            match message {
                ChannelMsg::Data { data } => {
                    let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
                    let room = MAX_TYPEAHEAD.saturating_sub(bytes.len());
                    bytes.extend_from_slice(&data[..data.len().min(room)]);
                    drop(bytes);
                    self.more.notify_one();
                }
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
        self.ended.store(true, Ordering::SeqCst);
        self.more.notify_one();
    }

    /// What was typed since the last call, waiting for some; `None` once the
    /// client ended and everything was taken.
    async fn take(&self) -> Option<Vec<u8>> {
        loop {
            let bytes = std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|e| e.into_inner()));
            if !bytes.is_empty() {
                return Some(bytes);
            }
            if self.ended.load(Ordering::SeqCst) {
                return None;
            }
            self.more.notified().await;
        }
    }
}

const PROMPT: &str = "vmkit> ";

/// `ssh HOST` (`-t`): a prompt with line editing, one command per line, until
/// `exit`, `^D` or the end of input. Without a pty, plain lines and no echo.
async fn shell(signed: Signed, pending: Pending) {
    let Pending {
        channel,
        pty,
        width,
        _open,
    } = pending;
    let (read, write) = channel.split();
    let channel = &write;
    let typed = Arc::new(Typed::default());
    let reader = tokio::spawn(typed.clone().read(read));
    let mut editor = LineEditor::new(PROMPT, pty);
    let say = |text: &str| match pty {
        true => text.replace('\n', "\r\n"),
        false => text.to_owned(),
    };
    let greeting = welcome(&signed).await;
    let mut out = say(&greeting).into_bytes();
    editor.start(&mut out);
    let _ = channel.data_bytes(out).await;
    let mut status = 0;
    'session: while let Some(data) = typed.take().await {
        editor.set_width(width.load(Ordering::Relaxed));
        let mut rest: &[u8] = &data;
        loop {
            let mut out = Vec::new();
            let Some((key, used)) = editor.feed(rest, &mut out) else {
                if !out.is_empty() {
                    let _ = channel.data_bytes(out).await;
                }
                break;
            };
            rest = &rest[used..];
            match key {
                Key::Line(text) => {
                    if !out.is_empty() {
                        let _ = channel.data_bytes(out).await;
                    }
                    let output = match lobby::split_words(&text) {
                        Ok(words) if words.is_empty() => Output::default(),
                        Ok(words) => {
                            if let Some(note) =
                                lobby::progress(&words).filter(|_| signed.unregistered.is_none())
                            {
                                let _ = channel.data_bytes(say(&note).into_bytes()).await;
                            }
                            signed.run(&words, "").await
                        }
                        Err(e) => Output::failure(e, "invalid_command", false),
                    };
                    write_output(channel, &output, pty).await;
                    status = output.status;
                    if output.exit {
                        status = 0;
                        break 'session;
                    }
                    let mut out = Vec::new();
                    editor.start(&mut out);
                    let _ = channel.data_bytes(out).await;
                }
                Key::Complete => {
                    let candidates = complete(&signed, &editor.completing()).await;
                    editor.complete(&candidates, &mut out);
                    let _ = channel.data_bytes(out).await;
                }
                Key::Eof => {
                    if pty {
                        let _ = channel.data_bytes(&b"\r\n"[..]).await;
                    }
                    break 'session;
                }
            }
        }
    }
    finish(channel, status).await;
    reader.abort();
}

/// The greeting at the prompt: for a user with no VM yet, how to make one.
async fn welcome(signed: &Signed) -> String {
    if signed.unregistered.is_some() {
        return "Welcome to vmkit: this key is not registered yet; `register HANDLE` \
                registers it, `exit` leaves.\n"
            .to_owned();
    }
    let commands = signed.shared.manager.commands(signed.caller.clone());
    let mut text =
        "Welcome to the vmkit lobby: `help` lists the commands, tab completes, `exit` leaves.\n"
            .to_owned();
    if let Ok(vms) = commands.list().await
        && vms.is_empty()
    {
        text.push_str(&format!(
            "You have no VMs yet: `new` makes one (`new --name NAME` to name it); \
             then `{}` gets you in.\n",
            signed.context.ssh_command("NAME")
        ));
    }
    text
}

/// The words the word being typed may become (`words`: those before the cursor).
async fn complete(signed: &Signed, words: &[String]) -> Vec<String> {
    match lobby::completion(words, signed.unregistered.is_none()) {
        Completion::Words(words) => words,
        Completion::VmName => {
            let commands = signed.shared.manager.commands(signed.caller.clone());
            commands
                .list()
                .await
                .map(|vms| vms.into_iter().map(|vm| vm.name.to_string()).collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}
