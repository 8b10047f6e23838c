//! cloud-hypervisor's side of the VMM process: a detached spawn with its logs and the
//! tail of its stderr. Identity, signals and waiting are in [`crate::process`].

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vmkit_core::HypervisorError;

use super::body::RunPaths;
use crate::spawn::{self, Credentials, Launch, Spawned};

fn open_log(path: &Path) -> Result<File, HypervisorError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| HypervisorError::io(format!("opening {}", path.display()), e))
}

/// Starts `binary args` detached (see [`crate::spawn`]), in the run directory, with
/// its stdout and stderr in files there, confined with `credentials` if given.
///
/// Blocking: call it from a blocking thread.
pub(crate) fn spawn_detached(
    binary: &Path,
    args: &[OsString],
    paths: &RunPaths,
    credentials: Option<&Credentials>,
) -> Result<Spawned, HypervisorError> {
    spawn::spawn_detached(Launch {
        binary,
        args,
        cwd: &paths.dir,
        stdout: open_log(&paths.stdout)?,
        stderr: open_log(&paths.stderr)?,
        keep: &[],
        arg0: None,
        credentials,
    })
}

/// The last lines the VMM wrote to stderr, for error messages.
pub(crate) fn stderr_tail(paths: &RunPaths) -> String {
    const MAX: u64 = 2048;
    let read = || -> io::Result<String> {
        let mut file = File::open(&paths.stderr)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_owned())
    };
    match read() {
        Ok(text) if !text.is_empty() => text,
        _ => "(no output on stderr)".to_owned(),
    }
}
