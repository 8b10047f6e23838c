//! Brings hot-added CPUs and memory online, as udev rules do on distributions that
//! ship them.
//!
//! When the host grows a running VM (QEMU `device_add`, cloud-hypervisor
//! `vm.resize`), Linux registers the new CPUs and memory blocks but leaves CPUs
//! offline, and memory too unless the kernel was built or booted to online it. The
//! agent listens for the kernel's uevents and writes `1` to the new device's
//! `online` attribute. At start it onlines what is present and offline, which covers
//! devices added before it listened.

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recvfrom, socket,
};

/// The netlink multicast group the kernel sends its uevents to.
const KERNEL_GROUP: u32 = 1;

/// A device the agent onlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hotplugged {
    /// `cpuN` under `/sys/devices/system/cpu`.
    Cpu(u32),
    /// `memoryN` under `/sys/devices/system/memory`.
    Memory(u32),
}

impl Hotplugged {
    /// The device for a sysfs device path (`/devices/system/cpu/cpu3`), if it is one
    /// the agent onlines.
    fn from_devpath(devpath: &str) -> Option<Self> {
        let number = |rest: &str| {
            (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
                .then(|| rest.parse().ok())
                .flatten()
        };
        if let Some(rest) = devpath.strip_prefix("/devices/system/cpu/cpu") {
            number(rest).map(Self::Cpu)
        } else if let Some(rest) = devpath.strip_prefix("/devices/system/memory/memory") {
            number(rest).map(Self::Memory)
        } else {
            None
        }
    }

    /// Its `online` attribute under the sysfs root `sys`.
    fn online_attr(&self, sys: &Path) -> PathBuf {
        match self {
            Self::Cpu(n) => sys.join(format!("devices/system/cpu/cpu{n}/online")),
            Self::Memory(n) => sys.join(format!("devices/system/memory/memory{n}/online")),
        }
    }

    /// Onlines it under the sysfs root `sys` if it is offline. Returns whether it
    /// was. CPU 0 and CPUs that cannot go offline have no `online` attribute: there
    /// is nothing to do for them.
    pub(crate) fn online(&self, sys: &Path) -> io::Result<bool> {
        let attr = self.online_attr(sys);
        match std::fs::read_to_string(&attr) {
            Ok(state) if state.trim() == "0" => {
                std::fs::write(&attr, "1")?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The device a kernel uevent adds, if it is one the agent onlines. The message is
/// `ACTION@DEVPATH` followed by NUL-separated `KEY=value` pairs.
pub(crate) fn added(message: &[u8]) -> Option<Hotplugged> {
    let mut fields = message
        .split(|&b| b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok());
    let header = fields.next()?;
    let (action, devpath) = header.split_once('@')?;
    if action != "add" {
        return None;
    }
    let device = Hotplugged::from_devpath(devpath)?;
    // The header and the DEVPATH field must agree; a message where they do not is
    // not the kernel's.
    fields
        .any(|f| f.strip_prefix("DEVPATH=") == Some(devpath))
        .then_some(device)
}

/// Every CPU and memory block under the sysfs root `sys`.
pub(crate) fn present(sys: &Path) -> Vec<Hotplugged> {
    let mut found = Vec::new();
    for (dir, prefix) in [
        ("devices/system/cpu", "cpu"),
        ("devices/system/memory", "memory"),
    ] {
        let Ok(entries) = std::fs::read_dir(sys.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(prefix)
                && let Some(device) = Hotplugged::from_devpath(&format!("/{dir}/{name}"))
            {
                found.push(device);
            }
        }
    }
    found
}

fn online_logged(device: &Hotplugged, sys: &Path) {
    match device.online(sys) {
        Ok(true) => tracing::info!(?device, "brought a hot-added device online"),
        Ok(false) => {}
        Err(e) => tracing::warn!(?device, error = %e, "cannot bring a hot-added device online"),
    }
}

/// Onlines the CPUs and memory blocks that are offline now, then starts a thread that
/// onlines every one the kernel adds later. Returns an error when the kernel's uevents
/// cannot be listened to (the guest then still works; hot-added devices stay offline).
pub fn online_hotplugged() -> io::Result<()> {
    let sys = Path::new("/sys");
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, KERNEL_GROUP),
    )?;
    // Listening first, then scanning: a device added in between is seen twice, which
    // is harmless, rather than not at all.
    for device in present(sys) {
        online_logged(&device, sys);
    }
    std::thread::Builder::new()
        .name("hotplug".into())
        .spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                match recvfrom::<NetlinkAddr>(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf) {
                    // Only the kernel (port 0) speaks for the hardware.
                    Ok((len, Some(from))) if from.pid() == 0 => {
                        if let Some(device) = added(&buf[..len]) {
                            online_logged(&device, sys);
                        }
                    }
                    Ok(_) => {}
                    // The socket's buffer overflowed: events were lost, so look again.
                    Err(nix::errno::Errno::ENOBUFS) => {
                        for device in present(sys) {
                            online_logged(&device, sys);
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "stopped listening for hot-added devices");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uevent(action: &str, devpath: &str, subsystem: &str) -> Vec<u8> {
        format!(
            "{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0SEQNUM=1\0"
        )
        .into_bytes()
    }

    #[test]
    fn adds_of_cpus_and_memory_are_recognised() {
        assert_eq!(
            added(&uevent("add", "/devices/system/cpu/cpu3", "cpu")),
            Some(Hotplugged::Cpu(3))
        );
        assert_eq!(
            added(&uevent("add", "/devices/system/memory/memory40", "memory")),
            Some(Hotplugged::Memory(40))
        );
    }

    #[test]
    fn other_events_and_devices_are_ignored() {
        for message in [
            uevent("remove", "/devices/system/cpu/cpu3", "cpu"),
            uevent("online", "/devices/system/cpu/cpu3", "cpu"),
            uevent("add", "/devices/system/cpu/cpufreq", "cpu"),
            uevent("add", "/devices/system/cpu/cpu3/cache", "cpu"),
            uevent("add", "/devices/system/cpu/cpu../../x", "cpu"),
            uevent("add", "/devices/virtual/net/eth0", "net"),
            b"libudev\0garbage".to_vec(),
            b"add@/devices/system/cpu/cpu1".to_vec(),
            Vec::new(),
        ] {
            assert_eq!(
                added(&message),
                None,
                "{:?}",
                String::from_utf8_lossy(&message)
            );
        }
        // The header and DEVPATH disagree.
        let forged = b"add@/devices/system/cpu/cpu1\0DEVPATH=/devices/system/cpu/cpu2\0".to_vec();
        assert_eq!(added(&forged), None);
    }

    /// A sysfs tree with cpu0 (no `online` attribute, as on x86), cpu1 online, cpu2
    /// offline and memory block 7 offline.
    fn fake_sysfs() -> tempfile::TempDir {
        let sys = tempfile::tempdir().unwrap();
        let cpu = sys.path().join("devices/system/cpu");
        std::fs::create_dir_all(cpu.join("cpu0")).unwrap();
        std::fs::create_dir_all(cpu.join("cpufreq")).unwrap();
        for (n, state) in [(1, "1\n"), (2, "0\n")] {
            std::fs::create_dir_all(cpu.join(format!("cpu{n}"))).unwrap();
            std::fs::write(cpu.join(format!("cpu{n}/online")), state).unwrap();
        }
        std::fs::write(cpu.join("online"), "0-1\n").unwrap();
        let memory = sys.path().join("devices/system/memory/memory7");
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::write(memory.join("online"), "0\n").unwrap();
        sys
    }

    fn read(sys: &Path, attr: &str) -> String {
        std::fs::read_to_string(sys.join(attr)).unwrap()
    }

    #[test]
    fn offline_devices_are_onlined_and_others_left_alone() {
        let sys = fake_sysfs();
        let sys = sys.path();
        let mut found = present(sys);
        found.sort_by_key(|d| format!("{d:?}"));
        assert_eq!(
            found,
            [
                Hotplugged::Cpu(0),
                Hotplugged::Cpu(1),
                Hotplugged::Cpu(2),
                Hotplugged::Memory(7)
            ]
        );
        let onlined: Vec<bool> = found.iter().map(|d| d.online(sys).unwrap()).collect();
        assert_eq!(onlined, [false, false, true, true]);
        assert_eq!(read(sys, "devices/system/cpu/cpu1/online"), "1\n");
        assert_eq!(read(sys, "devices/system/cpu/cpu2/online"), "1");
        assert_eq!(read(sys, "devices/system/memory/memory7/online"), "1");
        // A second pass changes nothing.
        assert!(found.iter().all(|d| !d.online(sys).unwrap()));
    }
}
