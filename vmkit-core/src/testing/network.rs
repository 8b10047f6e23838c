//! An in-memory network backend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::faults::Faults;
use crate::address::{IpLease, IpPool};
use crate::network::{NetAttachment, Network, NetworkCapabilities, NetworkError};
use crate::vm::VmId;

/// A complete in-memory [`Network`]: TAPs are table entries named like the real
/// backend's, leases must come from its pool.
#[derive(Debug, Clone)]
pub struct FakeNetwork {
    pool: IpPool,
    state: Arc<Mutex<State>>,
    faults: Faults,
}

#[derive(Debug, Default)]
struct State {
    set_up: bool,
    taps: BTreeMap<VmId, NetAttachment>,
}

impl FakeNetwork {
    /// A fake over `pool` that fails nothing.
    pub fn new(pool: IpPool) -> Self {
        Self::with_faults(pool, Faults::new())
    }

    /// A fake over `pool` whose calls count towards `faults`.
    pub fn with_faults(pool: IpPool, faults: Faults) -> Self {
        Self {
            pool,
            state: Arc::default(),
            faults,
        }
    }

    /// The TAP names that exist.
    pub fn taps(&self) -> Vec<String> {
        self.lock().taps.values().map(|a| a.tap.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, op: &'static str) -> Result<(), NetworkError> {
        self.faults.check(op).map_err(|f| NetworkError::Request {
            operation: op.to_owned(),
            message: f.to_string(),
        })
    }
}

#[async_trait]
impl Network for FakeNetwork {
    fn capabilities(&self) -> NetworkCapabilities {
        NetworkCapabilities {
            isolation: false,
            nat: false,
            anti_spoof: false,
        }
    }

    fn pool(&self) -> IpPool {
        self.pool
    }

    async fn setup_host(&self) -> Result<(), NetworkError> {
        self.lock().set_up = true;
        Ok(())
    }

    async fn attach(&self, vm: VmId, lease: &IpLease) -> Result<NetAttachment, NetworkError> {
        self.check("network.attach")?;
        let mut s = self.lock();
        if !s.set_up {
            return Err(NetworkError::NotSetUp);
        }
        if !self.pool.subnet.contains(lease.ip) || lease.ip == self.pool.host_address() {
            return Err(NetworkError::ForeignLease(lease.ip));
        }
        let attachment = NetAttachment {
            vm,
            tap: format!("vmk{:012x}", vm.as_u64() & 0xffff_ffff_ffff),
            mac: lease.mac,
            ip: lease.ip,
            prefix: lease.prefix,
            gateway: lease.gateway,
            dns: vec![lease.gateway],
        };
        s.taps.insert(vm, attachment.clone());
        Ok(attachment)
    }

    async fn detach(&self, vm: VmId) -> Result<(), NetworkError> {
        self.check("network.detach")?;
        self.lock().taps.remove(&vm);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VmId>, NetworkError> {
        Ok(self.lock().taps.keys().copied().collect())
    }
}
