//! vmkit-core: instant Linux VMs on hosts you own, as a library.
//!
//! This crate holds the domain types, the four backend seams —
//! [`Hypervisor`], [`Storage`], [`Network`] and [`Gateway`] — the [`StateStore`]
//! interface, and the [`Manager`] that owns every VM's lifecycle. It has no backend
//! dependencies: the QEMU and cloud-hypervisor backends live in `vmkit-hv`, the
//! bridge network in `vmkit-net`, and the redb store and volume backends in
//! `vmkit-store`. Integrators pick backends at construction; nothing is chosen by
//! `cfg`.
//!
//! # Lifecycle
//!
//! `create` = check quota → name → a VMM uid (when [`ManagerConfig::confinement`] is
//! set) → clone root volume + data volume → lease IP/MAC + TAP → start the VMM
//! (confined: as that uid, in its own cgroup) → wait for the agent's hello → record. Each step is written to
//! the VM's record as soon as it exists, and a failure undoes the steps taken in
//! reverse order. `delete` is the reverse. Operations on one VM are serialised;
//! operations on different VMs run in parallel.
//!
//! # One command surface
//!
//! Every door (the root-only socket's REST API, and the SSH lobby, HTTPS API, MCP
//! server and dashboard to come) is a thin adapter over [`Manager::commands`]: the
//! operations taken on behalf of a [`Caller`] (a principal and the [`Door`] they came
//! through), each an [`Action`] of one catalogue that says what it needs and in which
//! states it is allowed, decided by one [`AccessPolicy`] ([`Policy`] unless an
//! integrator supplies theirs), and answered with views ([`VmView`], ...), never the
//! internal records. The [`Gateway`] seam gives the front doors identity (credential
//! to caller), routing (SSH user name, jump target, HTTP host to an [`Upstream`]) and
//! the same policy. `Manager`'s own methods (`create`, `start`, ...) check nothing:
//! they are for the embedding program itself.
//!
//! # Example
//!
//! With the in-memory fakes of the `testing` feature:
//!
//! ```
//! use vmkit_core::testing::FakeHost;
//! use vmkit_core::{CreateRequest, DeleteOptions, UserId, VmName, VmSpec, VmState};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), vmkit_core::ManagerError> {
//! let host = FakeHost::new().await;
//! let name = VmName::new("web")?;
//! let request = CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny").vcpus(2)).name(name.clone());
//! let vm = host.manager.create(request).await?;
//! assert_eq!(vm.state, VmState::Running);
//! host.manager.delete(&name, DeleteOptions::default()).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod access;
mod address;
pub mod api;
mod confine;
mod domain;
mod error;
mod event;
mod files;
mod gateway;
mod hypervisor;
mod image;
mod invite;
mod manager;
mod name;
mod network;
mod quota;
mod secret_box;
mod share;
mod snapshot;
mod spec;
mod state_store;
mod storage;
mod time;
mod token;
mod user;
mod view;
mod vm;
mod vm_keys;
mod vm_state;
mod web;

#[cfg(feature = "testing")]
pub mod testing;

pub use access::{
    AccessPolicy, Action, Caller, Denied, Door, Grant, KeyLimits, Needs, Policy, Principal,
};
pub use address::{IpLease, IpPool, Ipv4Net, MacAddr, MacParseError, NetParseError};
pub use confine::{CgroupLimits, Confinement, ConfinementConfig, UidRange};
pub use domain::{
    CHALLENGE_LABEL, CHALLENGE_PREFIX, CustomDomain, CustomDomains, DnsLookup, DomainError,
    DomainProof, LookupError, ProvenBy, check_custom_host,
};
pub use error::{ErrorChain, ErrorKind, ManagerError};
pub use event::{Event, EventKind, EventRetention, NewEvent};
pub use files::write_file_atomic;
pub use gateway::{
    Credential, DEFAULT_HTTP_PORT, GUEST_SSH_PORT, Gateway, GatewayCapabilities, GatewayError,
    RouteTarget, Routed, StoreGateway, Upstream,
};
pub use hypervisor::{
    AgentIo, AgentStream, DiskConfig, Hypervisor, HypervisorCapabilities, HypervisorError,
    MachineConfig, NicConfig, Resize, VmmEvents, VmmExit, VmmHandle, VmmInfo, VmmState, VmmWatch,
    VmmWatchSender,
};
pub use image::{DirImageCatalog, Image, ImageCatalog, ImageError, ImageManifest, MANIFEST_FORMAT};
pub use invite::{INVITE_PREFIX, Invite};
pub use manager::{
    ApiKeyView, Backends, CloneSource, Commands, CreateRequest, DeleteOptions, Deleted, DomainView,
    EventFeed, ExitPolicy, MAX_API_KEY_LABEL_LEN, Manager, ManagerConfig, NewUser,
    ReconcileFailure, ReconcileReport, Registration, RegistrationPolicy, ResizeRequest, ShareView,
    ShareWith, ShareWithView, SshTarget, VmDisposition, VmMetrics, Whoami,
};
pub use name::{MAX_NAME_LEN, NameError, RESERVED_NAMES, VmName};
pub use network::{NetAttachment, Network, NetworkCapabilities, NetworkError};
pub use quota::{Quota, QuotaExceeded, QuotaResource, Usage};
pub use secret_box::{SecretBox, SecretBoxError};
pub use share::{Access, Share, ShareTarget};
pub use snapshot::Snapshot;
pub use spec::{DEFAULT_IMAGE, SpecError, SpecLimits, VmSpec};
pub use state_store::{StateStore, StoreCapabilities, StoreError};
pub use storage::{
    BaseImage, CloneMethod, DiskFormat, Storage, StorageCapabilities, StorageError, Volume,
    VolumeKind,
};
pub use time::{LifetimeError, Timestamp, parse_lifetime};
pub use token::{TokenHash, TokenHashError, new_secret};
pub use user::{
    ApiKey, ApiKeyScope, Handle, HandleError, MAX_HANDLE_LEN, RESERVED_HANDLES, Role, SshKeyError,
    SshPublicKey, User, UserId, UserStatus,
};
pub use view::{MetricsView, SnapshotView, VmView, VmmView};
pub use vm::{Health, Idempotency, VmId, VmIdParseError, VmRecord, VmResources};
pub use vm_keys::{VM_KEYS_FILE, VmKey, VmKeys};
pub use vm_state::VmState;
pub use web::{WebSessions, WebToken, WebTokenKind, WebTtls};

/// The attribute the backend traits are declared with, re-exported so that a backend
/// implements them with the same version.
pub use async_trait::async_trait;
/// The guest agent protocol crate, re-exported at the version vmkit-core uses.
pub use vmkit_guest as guest;
