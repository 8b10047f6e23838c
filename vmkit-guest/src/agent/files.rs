//! Reading files, and writing them atomically: a temporary file in the same directory,
//! flushed, renamed over the target, then the directory flushed.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::SystemHandler;
use super::system::{lookup_group, lookup_user};
use crate::ops::WriteFileRequest;
use crate::server::{InputStream, OutputSink};

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 64 << 10;
/// The mode of a new file when the request names none.
const DEFAULT_MODE: u32 = 0o644;

/// A file's owner as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Owner {
    pub(super) uid: u32,
    pub(super) gid: u32,
}

/// Checks that a path from the host is absolute and has no NUL.
pub(super) fn absolute(path: &str) -> Result<&Path, String> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(format!("`{path}` is not an absolute path"));
    }
    Ok(Path::new(path))
}

/// Streams the file at `path` to the host; refuses one of more than `limit` bytes.
pub(super) async fn read(path: &str, limit: u64, out: &OutputSink) -> Result<u64, String> {
    let path = absolute(path)?;
    let shown = path.display();
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|err| format!("cannot open {shown}: {err}"))?;
    let meta = file
        .metadata()
        .await
        .map_err(|err| format!("cannot stat {shown}: {err}"))?;
    if meta.is_dir() {
        return Err(format!("{shown} is a directory"));
    }
    if meta.is_file() && meta.len() > limit {
        return Err(format!(
            "{shown} is {} bytes, over the limit of {limit} bytes",
            meta.len()
        ));
    }
    let mut buf = vec![0u8; READ_CHUNK];
    let mut sent: u64 = 0;
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|err| format!("cannot read {shown}: {err}"))?;
        if n == 0 {
            return Ok(sent);
        }
        sent += n as u64;
        if sent > limit {
            return Err(format!(
                "{shown} grew past the limit of {limit} bytes while it was read"
            ));
        }
        out.data(&buf[..n])
            .await
            .map_err(|err| format!("sending {shown} failed: {err}"))?;
    }
}

/// Writes the request's body to its path atomically, with its mode and owner.
pub(super) async fn write(
    handler: &SystemHandler,
    req: WriteFileRequest,
    mut input: InputStream,
) -> Result<u64, String> {
    let target = absolute(&req.path)?.to_path_buf();
    let existing = fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(format!("{} is a directory", target.display()));
    }
    let mode = req
        .mode
        .or_else(|| existing.as_ref().map(|m| m.mode()))
        .unwrap_or(DEFAULT_MODE)
        & 0o7777;
    let owner = match &req.owner {
        Some(spec) => Some(resolve_owner(&handler.root, spec)?),
        None => existing.as_ref().map(|m| Owner {
            uid: m.uid(),
            gid: m.gid(),
        }),
    };
    let (staged, file) = Staged::create(&target)?;
    let shown = target.display();
    let mut file = tokio::fs::File::from_std(file);
    let mut written: u64 = 0;
    while let Some(chunk) = input
        .next_chunk()
        .await
        .map_err(|err| format!("writing {shown} failed: {err}"))?
    {
        file.write_all(&chunk)
            .await
            .map_err(|err| format!("cannot write {shown}: {err}"))?;
        written += chunk.len() as u64;
    }
    file.flush()
        .await
        .map_err(|err| format!("cannot write {shown}: {err}"))?;
    let file = file.into_std().await;
    tokio::task::spawn_blocking(move || staged.commit(file, mode, owner))
        .await
        .map_err(|err| format!("writing {shown} failed: {err}"))??;
    Ok(written)
}

/// Writes `data` to `target` atomically: for the agent's own configuration files.
pub(super) async fn write_bytes(
    target: PathBuf,
    data: Vec<u8>,
    mode: u32,
    owner: Option<Owner>,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        let (staged, mut file) = Staged::create(&target)?;
        file.write_all(&data)
            .map_err(|err| format!("cannot write {}: {err}", target.display()))?;
        staged.commit(file, mode, owner)
    })
    .await
    .map_err(|err| format!("writing a file failed: {err}"))?
}

/// Resolves `user` or `user:group` (names or numbers) with the passwd and group files
/// under `root`. Without a group, the user's primary group.
pub(super) fn resolve_owner(root: &Path, spec: &str) -> Result<Owner, String> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, lookup_user(root, user)?.map_or(uid, |u| u.gid)),
        Err(_) => {
            let found = lookup_user(root, user)?.ok_or_else(|| format!("no user `{user}`"))?;
            (found.uid, found.gid)
        }
    };
    let gid = match group {
        None => primary,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup_group(root, group)?
                .map(|g| g.gid)
                .ok_or_else(|| format!("no group `{group}`"))?,
        },
    };
    Ok(Owner { uid, gid })
}

/// A temporary file beside its target, removed unless committed.
pub(super) struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    /// Creates the temporary file (mode 0600 until committed).
    pub(super) fn create(target: &Path) -> Result<(Staged, File), String> {
        let shown = target.display();
        let dir = target
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .ok_or_else(|| format!("{shown} has no parent directory"))?;
        let name = target
            .file_name()
            .ok_or_else(|| format!("{shown} does not name a file"))?
            .to_string_lossy();
        let mut attempt = 0u32;
        loop {
            let tmp = dir.join(format!(
                ".{name}.vmkit-{}-{}",
                std::process::id(),
                unique(attempt)
            ));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(file) => {
                    let staged = Staged {
                        tmp,
                        target: target.to_path_buf(),
                        committed: false,
                    };
                    return Ok((staged, file));
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(err) => {
                    return Err(format!(
                        "cannot create a temporary file in {}: {err}",
                        dir.display()
                    ));
                }
            }
        }
    }

    /// Sets the owner and mode, flushes the file, renames it over the target and flushes
    /// the directory.
    pub(super) fn commit(self, file: File, mode: u32, owner: Option<Owner>) -> Result<(), String> {
        self.seal(file, mode, owner)?;
        self.install()
    }

    /// The temporary file's path.
    pub(super) fn path(&self) -> &Path {
        &self.tmp
    }

    /// Sets the owner and mode, flushes the file to disk and closes it.
    pub(super) fn seal(&self, file: File, mode: u32, owner: Option<Owner>) -> Result<(), String> {
        let shown = self.target.display();
        if let Some(Owner { uid, gid }) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(|err| format!("cannot give {shown} to {uid}:{gid}: {err}"))?;
        }
        // After the chown, which clears set-id bits.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|err| format!("cannot set the mode of {shown}: {err}"))?;
        file.sync_all()
            .map_err(|err| format!("cannot flush {shown} to disk: {err}"))
    }

    /// Renames the sealed file over the target and flushes the directory.
    pub(super) fn install(mut self) -> Result<(), String> {
        let shown = self.target.display().to_string();
        fs::rename(&self.tmp, &self.target)
            .map_err(|err| format!("cannot rename into {shown}: {err}"))?;
        self.committed = true;
        if let Some(dir) = self.target.parent() {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|err| format!("cannot flush {} to disk: {err}", dir.display()))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A name part that differs between attempts and between quick successive calls.
fn unique(attempt: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos:08x}{attempt}")
}
