//! Building vmkit-core's network types.

use std::net::Ipv4Addr;

use vmkit_core::{IpLease, NetAttachment, NetworkCapabilities, NetworkError, VmId};

/// The attachment of `vm` on `tap` for `lease`, with `dns` as its name servers.
pub(crate) fn attachment(
    vm: VmId,
    tap: String,
    lease: &IpLease,
    dns: Vec<Ipv4Addr>,
) -> Result<NetAttachment, NetworkError> {
    if lease.vm != vm {
        return Err(NetworkError::ForeignLease(lease.ip));
    }
    Ok(NetAttachment::new(lease, tap, dns))
}

/// Capabilities with every field given.
pub(crate) fn capabilities(
    isolation: bool,
    nat: bool,
    anti_spoof: bool,
) -> Result<NetworkCapabilities, NetworkError> {
    let mut c = NetworkCapabilities::default();
    c.isolation = isolation;
    c.nat = nat;
    c.anti_spoof = anti_spoof;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_core::IpPool;

    #[test]
    fn attachment_carries_the_lease_and_refuses_another_vms() {
        let c = capabilities(true, true, false).unwrap();
        assert!(c.isolation && c.nat && !c.anti_spoof);
        let pool = IpPool::new("10.88.0.0/16".parse().unwrap()).unwrap();
        let vm = VmId::generate();
        let lease = IpLease::new(vm, Ipv4Addr::new(10, 88, 0, 2), &pool);
        let a = attachment(vm, "tap".into(), &lease, vec![pool.host_address()]).unwrap();
        assert_eq!(
            (a.vm, a.ip, a.mac, a.gateway),
            (vm, lease.ip, lease.mac, lease.gateway)
        );
        assert!(attachment(VmId::generate(), "tap".into(), &lease, vec![]).is_err());
    }
}
