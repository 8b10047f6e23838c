//! TAP names and TAP creation (`TUNSETIFF` on `/dev/net/tun`).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use vmkit_core::{NetworkError, VmId};

use crate::error::{io_error, request};

/// Every vmkit TAP name starts with this.
pub const TAP_PREFIX: &str = "vm";

const DIGITS: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";
const TAP_DIGITS: usize = 13;

/// The TAP name of `vm`: `vm` and the id's 64 bits in 13 base-32 digits
/// (`0-9a-v`, most significant first), 15 bytes: the longest name Linux allows.
///
/// The encoding is lossless so that [`vm_of_tap`] recovers the full id: twelve hex
/// digits (48 bits) would not, and two VMs whose ids agree in those bits would share
/// a TAP.
pub fn tap_name(vm: VmId) -> String {
    let v = vm.as_u64();
    let mut name = String::with_capacity(TAP_PREFIX.len() + TAP_DIGITS);
    name.push_str(TAP_PREFIX);
    for i in (0..TAP_DIGITS).rev() {
        let digit = (u128::from(v) >> (5 * i)) & 31;
        name.push(char::from(DIGITS[digit as usize]));
    }
    name
}

/// The VM whose TAP is called `name`, if `name` is a vmkit TAP name.
pub fn vm_of_tap(name: &str) -> Option<VmId> {
    let digits = name.strip_prefix(TAP_PREFIX)?;
    if digits.len() != TAP_DIGITS {
        return None;
    }
    let mut v: u128 = 0;
    for b in digits.bytes() {
        let d = DIGITS.iter().position(|&x| x == b)?;
        v = (v << 5) | d as u128;
    }
    u64::try_from(v).ok().map(VmId::from_u64)
}

/// Creates the persistent TAP `name` owned by `owner`, with the flags QEMU and
/// cloud-hypervisor open it with (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, one queue),
/// in the calling thread's network namespace. Fails if it exists.
pub(crate) fn create_tap(name: &str, owner: u32) -> Result<(), NetworkError> {
    let op = format!("creating TAP {name}");
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| io_error(format!("{op}: opening /dev/net/tun"), e))?;
    let fd = tun.as_raw_fd();

    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and
    // arrays); all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(request(op, "the name must have 1 to 15 bytes"));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;

    // SAFETY: `fd` is an open /dev/net/tun file for the whole call, and TUNSETIFF
    // reads and writes one `ifreq`, which `ifr` is, NUL-terminated by the check above.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
    check(rc, &op, "TUNSETIFF")?;
    // SAFETY: TUNSETOWNER takes the uid by value; `fd` is attached to the new TAP.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOWNER, libc::c_ulong::from(owner)) };
    check(rc, &op, "TUNSETOWNER")?;
    // SAFETY: TUNSETPERSIST takes a flag by value; `fd` is attached to the new TAP.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    check(rc, &op, "TUNSETPERSIST")?;
    // Closing the file leaves the persistent TAP behind, without carrier until the
    // hypervisor opens it by name.
    Ok(())
}

fn check(rc: libc::c_int, op: &str, what: &str) -> Result<(), NetworkError> {
    if rc >= 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            Err(NetworkError::Permission(format!("{op} ({what})")))
        }
        Some(libc::EBUSY) => Err(request(
            op,
            format!("{what}: a device with this name already exists"),
        )),
        _ => Err(io_error(format!("{op} ({what})"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_round_trip_and_fit_ifnamsiz() {
        for v in [0, 1, 31, 32, u64::MAX, 1 << 63, 0x8123_4567_89ab_cdef] {
            let vm = VmId::from_u64(v);
            let name = tap_name(vm);
            assert_eq!(name.len(), 15, "{name}");
            assert_eq!(vm_of_tap(&name), Some(vm), "{name}");
        }
        for _ in 0..1000 {
            let vm = VmId::generate();
            assert_eq!(vm_of_tap(&tap_name(vm)), Some(vm));
        }
    }

    #[test]
    fn ids_that_share_their_low_48_bits_get_different_taps() {
        let a = VmId::from_u64(0x8000_1234_5678_9abc);
        let b = VmId::from_u64(0x9000_1234_5678_9abc);
        assert_ne!(tap_name(a), tap_name(b));
    }

    #[test]
    fn other_names_are_not_vmkit_taps() {
        for name in [
            "vmnet8",
            "eth0",
            "br-vmkit",
            "vm0000000000000x",
            "vm00000000000w0",
            "vmw000000000000",
            // 13 base-32 digits hold 65 bits; a leading digit over 'f' overflows u64.
            "vmg000000000000",
        ] {
            assert_eq!(vm_of_tap(name), None, "{name}");
        }
        assert_eq!(vm_of_tap("vm0000000000000"), Some(VmId::from_u64(0)));
    }
}
