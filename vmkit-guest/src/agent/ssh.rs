//! The guest's SSH facts: sshd, its host keys, the image's default user.

use std::path::Path;

use super::system::{check_key, image_default_user};
use super::{SystemHandler, TOOL_TIMEOUT, run_tool, systemd_is_init};
use crate::ops::SshInfo;

/// The OpenSSH server; its presence is what "sshd installed" means.
const SSHD: &str = "/usr/sbin/sshd";
/// Where sshd keeps its host keys.
const SSH_DIR: &str = "/etc/ssh";
/// The base image's first-boot unit that makes the host keys before ssh.service.
const KEYGEN_UNIT: &str = "vmkit-ssh-keygen.service";
/// Where systemd may find that unit.
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];
/// The most host keys reported (OpenSSH makes four types).
const MAX_HOST_KEYS: usize = 16;
/// The largest `.pub` file read.
const MAX_PUB_FILE: u64 = 16 << 10;

/// Reports sshd, its host keys (made first when sshd has none) and the default user.
pub(super) async fn info(handler: &SystemHandler) -> Result<SshInfo, String> {
    let default_user = image_default_user(handler);
    let sshd = handler.path(SSHD).exists();
    if !sshd {
        return Ok(SshInfo::new(Vec::new(), default_user, false));
    }
    let mut keys = host_keys(handler)?;
    if keys.is_empty() {
        // One generation at a time from the agent; the unit serialises with boot's.
        let _edit = handler.edits.lock().await;
        keys = host_keys(handler)?;
        if keys.is_empty() {
            generate(handler).await?;
            keys = host_keys(handler)?;
        }
    }
    Ok(SshInfo::new(keys, default_user, true))
}

/// The public host keys in `/etc/ssh/ssh_host_*_key.pub`, by file name; files that do
/// not hold one OpenSSH public key line are skipped.
fn host_keys(handler: &SystemHandler) -> Result<Vec<String>, String> {
    let dir = handler.path(SSH_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("cannot list {}: {err}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("ssh_host_") && name.ends_with("_key.pub"))
        .collect();
    names.sort();
    let mut keys = Vec::new();
    for name in names.iter().take(MAX_HOST_KEYS) {
        let path = dir.join(name);
        match read_key(&path) {
            Ok(key) => keys.push(key),
            Err(err) => tracing::warn!(path = %path.display(), error = %err, "host key skipped"),
        }
    }
    Ok(keys)
}

fn read_key(path: &Path) -> Result<String, String> {
    let size = std::fs::metadata(path)
        .map_err(|err| err.to_string())?
        .len();
    if size > MAX_PUB_FILE {
        return Err(format!("{size} bytes is too large for a public key"));
    }
    let text = std::fs::read_to_string(path).map_err(|err| err.to_string())?;
    let key = text.lines().next().unwrap_or_default().trim().to_owned();
    check_key(&key)?;
    Ok(key)
}

/// Makes the missing host keys: through the base image's unit when systemd runs the
/// system (systemd runs a unit once at a time, so a start while boot runs it waits for
/// that run instead of writing the same files at once), else with `ssh-keygen -A`.
async fn generate(handler: &SystemHandler) -> Result<(), String> {
    if !handler.is_live() {
        let root = handler.root.to_string_lossy().into_owned();
        std::fs::create_dir_all(handler.path(SSH_DIR))
            .map_err(|err| format!("cannot create {SSH_DIR}: {err}"))?;
        run_tool("ssh-keygen", &["-A", "-f", &root], TOOL_TIMEOUT).await?;
        return Ok(());
    }
    let has_unit = UNIT_DIRS
        .iter()
        .any(|dir| Path::new(dir).join(KEYGEN_UNIT).exists());
    if has_unit && systemd_is_init() {
        run_tool("systemctl", &["start", KEYGEN_UNIT], TOOL_TIMEOUT).await?;
    } else {
        run_tool("ssh-keygen", &["-A"], TOOL_TIMEOUT).await?;
    }
    Ok(())
}
