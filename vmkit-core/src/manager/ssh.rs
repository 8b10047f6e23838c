//! SSH into VMs: the keys the guest agent installs, what the agent says of the
//! guest's SSH server, and the wait for that server at create and start (a VM is
//! ready when SSH into it works).
//!
//! Three kinds of keys open a VM's sshd, all installed by the agent at every start:
//! the owner's keys and those of users the VM is shared with for SSH (for
//! `ssh -J gateway NAME.domain`, which reaches the VM's sshd end to end), and the
//! gateway's key for that VM alone ([`VmKeys`](crate::VmKeys)), with which the gateway
//! signs in on behalf of a user it authenticated (`ssh NAME@gateway`). The guest's
//! host keys come from the agent over its own channel, never from the network: the
//! gateway checks the VM's sshd against them.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use vmkit_guest::{GuestSession, SessionRequest, SshInfo};

use super::*;
use crate::gateway::GUEST_SSH_PORT;
use crate::share::{Access, ShareTarget};
use crate::user::SshPublicKey;
use crate::view::VmView;
use crate::vm_keys::VmKey;

/// How a gateway reaches a VM's own SSH server ([`Commands::ssh_target`]).
///
/// [`Commands::ssh_target`]: super::Commands::ssh_target
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SshTarget {
    /// The VM.
    pub vm: VmView,
    /// The guest's SSH server, when the VM has a network address.
    pub address: Option<SocketAddr>,
    /// Whether the guest has an SSH server at all (an image without one is reached
    /// through its agent: [`Commands::session`](super::Commands::session)).
    pub sshd: bool,
    /// The guest SSH server's host keys, as its agent reported them in this boot:
    /// a server that shows another key is not this VM.
    pub host_keys: Vec<SshPublicKey>,
    /// The user `ssh NAME@...` signs in as (the image's default user); `None` when
    /// the image has only root.
    pub default_user: Option<String>,
    /// The gateway's key for this VM, installed for the default user and root.
    pub client_key: VmKey,
}

impl Manager {
    /// The key a gateway signs in to the SSH server of VM `vm` with; its public
    /// half is installed in the guest at every start.
    pub fn vm_key(&self, vm: VmId) -> VmKey {
        self.inner.vm_keys.for_vm(vm)
    }

    /// The keys of the users a VM's sshd lets in by their own keys: its owner and
    /// the users it is shared with for SSH.
    async fn guest_login_keys(&self, vm: &VmRecord) -> Result<Vec<SshPublicKey>, ManagerError> {
        let store = &self.inner.backends.store;
        let mut keys = store.ssh_keys(vm.owner).await?;
        for share in store.shares(vm.id).await? {
            if let (ShareTarget::User(user), Access::Ssh) = (&share.target, share.access)
                && *user != vm.owner
            {
                keys.extend(store.ssh_keys(*user).await?);
            }
        }
        Ok(keys)
    }

    /// Installs the keys that open the guest's SSH server (with no SSH server,
    /// the owner's keys all the same: the image may get one), learns what the
    /// agent says of that server, and waits until it answers. Idempotent: runs at
    /// every start.
    pub(super) async fn configure_ssh(
        &self,
        vm: &VmRecord,
        client: &Client,
    ) -> Result<(), ManagerError> {
        let agent_error = |e: vmkit_guest::ClientError| ManagerError::agent(&vm.name, &e);
        // An agent too old to say is taken for one of a guest without sshd.
        let info = match client.ssh_info().await {
            Ok(info) => Some(info),
            Err(e) => {
                warn!(vm = %vm.name, error = %ErrorChain(&e), "the agent does not say whether the guest has an SSH server");
                None
            }
        };
        let gateway = self.vm_key(vm.id).public_key();
        let mut keys = self.guest_login_keys(vm).await?;
        keys.push(gateway.clone());
        // Also with no keys of users: that removes the ones removed since.
        client
            .install_ssh_keys(None, keys.iter().map(|k| k.to_openssh()))
            .await
            .map_err(agent_error)?;
        let Some(info) = info else {
            return Ok(());
        };
        // `root+NAME@gateway`: root takes the gateway's key only (the image's
        // default user is root when it names none: it has them all already).
        if info.sshd && info.default_user.as_deref().is_some_and(|u| u != "root") {
            client
                .install_ssh_keys(Some("root"), [gateway.to_openssh()])
                .await
                .map_err(agent_error)?;
        }
        self.remember_ssh(vm.id, info.clone());
        if let (true, Some(ip)) = (info.sshd, vm.ip()) {
            self.wait_ssh(vm, ip).await;
        }
        Ok(())
    }

    fn remember_ssh(&self, vm: VmId, info: SshInfo) {
        let mut boots = self.inner.boots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(boot) = boots.get_mut(&vm) {
            boot.ssh = Some(info);
        }
    }

    /// Waits until the guest's SSH server at `ip` greets (bounded by
    /// [`ManagerConfig::ssh_ready_timeout`]); one that does not is warned about.
    async fn wait_ssh(&self, vm: &VmRecord, ip: Ipv4Addr) {
        let started = Instant::now();
        let deadline = started + self.inner.config.ssh_ready_timeout;
        let address = SocketAddr::from((ip, GUEST_SSH_PORT));
        loop {
            if ssh_greets(address).await {
                info!(vm = %vm.name, after = ?started.elapsed(), "the guest's SSH server answers");
                return;
            }
            if Instant::now() >= deadline {
                warn!(vm = %vm.name, %address, timeout = ?self.inner.config.ssh_ready_timeout,
                    "the guest's SSH server did not answer in time; the VM is up without it");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the agent of a running VM says of its SSH server, asked once per boot.
    async fn ssh_info(&self, vm: &VmRecord) -> Result<SshInfo, ManagerError> {
        if let Some(info) = self.boot(vm.id).and_then(|b| b.ssh) {
            return Ok(info);
        }
        let client = self.agent(vm).await?;
        let info = client
            .ssh_info()
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))?;
        self.remember_ssh(vm.id, info.clone());
        Ok(info)
    }

    /// How to reach the SSH server of the running VM `name` (for a gateway).
    pub async fn ssh_target(&self, name: &VmName) -> Result<SshTarget, ManagerError> {
        let vm = self.get(name).await?;
        self.require(&vm, "ssh into", RUNNING)?;
        let info = self.ssh_info(&vm).await?;
        let host_keys = info
            .host_keys
            .iter()
            .filter_map(|line| match SshPublicKey::parse(line) {
                Ok(key) => Some(key),
                Err(e) => {
                    warn!(vm = %vm.name, error = %e, "the agent reported a host key vmkit cannot read");
                    None
                }
            })
            .collect();
        Ok(SshTarget {
            address: vm.ip().map(|ip| SocketAddr::from((ip, GUEST_SSH_PORT))),
            sshd: info.sshd,
            host_keys,
            default_user: info.default_user.clone(),
            client_key: self.vm_key(vm.id),
            vm: VmView::of(&vm, &crate::access::Caller::operator()),
        })
    }

    /// Starts an interactive session in a running VM through its agent: a shell
    /// with a terminal, or a command with its input streamed (for images without
    /// an SSH server, and `vmkit vm shell`).
    pub async fn session(
        &self,
        name: &VmName,
        request: SessionRequest,
    ) -> Result<GuestSession, ManagerError> {
        let (vm, client) = self.running_agent(name, "session").await?;
        client
            .session(request)
            .await
            .map_err(|e| ManagerError::agent(&vm.name, &e))
    }
}

impl Manager {
    /// A byte stream to `port` on the loopback of running VM `name`, through its
    /// agent (a [`SessionRequest::connect`] session): how a front door reaches an
    /// app bound only to the guest's `127.0.0.1`. Dropping the stream ends the
    /// connection. Deciding whether the caller may is the door's.
    pub async fn connect_guest_port(
        &self,
        name: &VmName,
        port: u16,
    ) -> Result<tokio::io::DuplexStream, ManagerError> {
        use tokio::io::AsyncWriteExt;
        use vmkit_guest::ExecEvent;
        let session = self.session(name, SessionRequest::connect(port)).await?;
        let (writer, mut events) = session.split();
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (mut from_door, mut to_door) = tokio::io::split(theirs);
        tokio::spawn(async move {
            let up = async {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match from_door.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = writer.close_stdin().await;
                            break;
                        }
                        Ok(n) => {
                            if writer.send(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                // The end of the door's input does not end the connection at once:
                // the app may still answer. It has a minute; then nobody reads.
                tokio::time::sleep(Duration::from_secs(60)).await
            };
            let down = async {
                while let Some(event) = events.next().await {
                    match event {
                        Ok(ExecEvent::Stdout(data)) => {
                            if to_door.write_all(&data).await.is_err() {
                                break;
                            }
                        }
                        Ok(ExecEvent::Exit(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let _ = to_door.shutdown().await;
            };
            // Once the app's side is done, so is the connection: no half-open
            // session is left behind in the guest.
            tokio::select! {
                () = up => {}
                () = down => {}
            }
            let _ = writer.hang_up().await;
        });
        Ok(ours)
    }
}

/// Whether an SSH server at `address` sends its greeting (`SSH-...`) within a few
/// seconds.
async fn ssh_greets(address: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let mut greeting = [0u8; 4];
        stream.read_exact(&mut greeting).await.ok()?;
        Some(&greeting == b"SSH-")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(true))
    )
}
