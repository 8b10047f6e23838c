//! QEMU's side of the VMM process: with `-daemonize` QEMU forks and reports its pid
//! only through the pid file. Identity, signals and waiting are in
//! [`crate::process`].

use std::io;
use std::path::Path;

/// Reads a pid file as QEMU writes it (the pid and a newline).
pub(crate) fn read_pidfile(path: &Path) -> io::Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
