//! `/proc/sys/net` settings. They belong to the network namespace of the thread that
//! opens the file, so these run on the namespace thread.

use vmkit_core::NetworkError;

use crate::error::io_error;

fn write(path: &str, value: &str) -> Result<(), NetworkError> {
    std::fs::write(path, value).map_err(|e| io_error(format!("writing {value} to {path}"), e))
}

/// Turns IPv4 forwarding on for the namespace.
pub(crate) fn enable_ip_forward() -> Result<(), NetworkError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let current =
        std::fs::read_to_string(path).map_err(|e| io_error(format!("reading {path}"), e))?;
    if current.trim() == "1" {
        return Ok(());
    }
    write(path, "1")
}

/// Disables IPv6 on `ifname` (no link-local address, no IPv6 traffic to or from the
/// host through it). A kernel without IPv6 has nothing to disable.
pub(crate) fn disable_ipv6(ifname: &str) -> Result<(), NetworkError> {
    if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    write(
        &format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    )
}
