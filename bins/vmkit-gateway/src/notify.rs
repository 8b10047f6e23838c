//! Readiness for systemd (`Type=notify`): the `sd_notify` protocol, written out. A
//! service tells the manager it is ready by sending the datagram `READY=1` to the
//! Unix socket named in `$NOTIFY_SOCKET`; a name starting with `@` is in the abstract
//! namespace. Without the variable (not started by systemd) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Tells systemd the daemon is ready; call it once the API socket is bound and the
/// state store open. A failure is logged: systemd then gives up on the start after
/// its timeout, which the log explains.
pub fn ready() {
    match notify_env("READY=1") {
        Ok(true) => tracing::info!("told systemd the daemon is ready"),
        Ok(false) => {}
        Err(error) => tracing::error!(%error, "cannot tell systemd the daemon is ready"),
    }
}

/// Tells systemd the daemon is shutting down.
pub fn stopping() {
    if let Err(error) = notify_env("STOPPING=1") {
        tracing::warn!(%error, "cannot tell systemd the daemon is stopping");
    }
}

fn notify_env(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` (newline-separated `KEY=value` assignments) to the notification
/// socket `socket`: a path, or `@name` for an abstract socket.
pub fn notify(socket: &OsStr, state: &str) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NOTIFY_SOCKET={} is neither an absolute path nor an abstract name (@...)",
                    socket.to_string_lossy()
                ),
            ));
        }
    };
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(state.as_bytes(), &address)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "only {sent} of {} bytes of the notification went out",
                state.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn notification_reaches_a_socket_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn notification_reaches_an_abstract_socket() {
        let name = format!("vmkit-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_relative_socket_name_is_refused_with_the_reason() {
        let err = notify(OsStr::new("notify.sock"), "READY=1").unwrap_err();
        assert!(err.to_string().contains("absolute path"), "{err}");
    }
}
