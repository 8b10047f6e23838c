//! Replacing the agent binary: receive it over the channel,
//! check its SHA-256 and that it runs, rename it over the installed one, and exit so that
//! the supervisor starts it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::files::{Owner, Staged};
use super::{SystemHandler, tool};
use crate::ops::{UpgradeReport, UpgradeRequest, UpgradeSource};
use crate::server::InputStream;

/// The largest agent binary accepted.
pub(super) const MAX_AGENT_SIZE: u64 = 256 << 20;
/// How long the new binary's `--version` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Delay between answering and exiting, so the answer gets out.
const RESTART_DELAY: Duration = Duration::from_millis(500);
/// The exit status that asks the supervisor for a restart (EX_TEMPFAIL): systemd restarts
/// on it with `Restart=always` or `on-failure`, busybox init respawns on any exit.
const RESTART_EXIT_CODE: i32 = 75;

/// 64 hex digits, lowercased.
pub(super) fn parse_sha256(hash: &str) -> Result<String, String> {
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hash.to_ascii_lowercase())
    } else {
        Err(format!("`{hash}` is not a SHA-256 (64 hex digits)"))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The path of the running executable (which `/proc/self/exe` marks deleted once it has
/// been replaced).
fn current_exe() -> Result<PathBuf, String> {
    let path = std::fs::read_link("/proc/self/exe")
        .map_err(|err| format!("cannot find the running agent binary: {err}"))?;
    let text = path.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(original) => PathBuf::from(original),
        None => path,
    })
}

/// The SHA-256 of a file, or an empty string when it cannot be read.
fn sha256_of(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return hex(&hasher.finalize()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return String::new(),
        }
    }
}

pub(super) async fn upgrade(
    handler: &SystemHandler,
    req: UpgradeRequest,
    mut input: InputStream,
) -> Result<UpgradeReport, String> {
    let expected = parse_sha256(&req.sha256)?;
    let _one_at_a_time = handler
        .upgrading
        .try_lock()
        .map_err(|_| "another upgrade is in progress".to_owned())?;
    let target = match &handler.agent_path {
        Some(path) => path.clone(),
        None => current_exe()?,
    };
    let shown = target.display().to_string();
    let previous_sha256 = {
        let target = target.clone();
        tokio::task::spawn_blocking(move || sha256_of(&target))
            .await
            .unwrap_or_default()
    };
    let owner = std::fs::metadata(&target).ok().map(|m| Owner {
        uid: m.uid(),
        gid: m.gid(),
    });

    let (staged, file) = Staged::create(&target)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    match &req.source {
        UpgradeSource::Upload { size: announced } => {
            if *announced > MAX_AGENT_SIZE {
                return Err(format!(
                    "an agent of {announced} bytes is over the limit of {MAX_AGENT_SIZE} bytes"
                ));
            }
            while let Some(chunk) = input
                .next_chunk()
                .await
                .map_err(|err| format!("receiving the new agent failed: {err}"))?
            {
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|err| format!("cannot write the new agent beside {shown}: {err}"))?;
                size += chunk.len() as u64;
            }
        }
    }
    file.flush()
        .await
        .map_err(|err| format!("cannot write the new agent beside {shown}: {err}"))?;

    let sha256 = hex(&hasher.finalize());
    if sha256 != expected {
        return Err(format!(
            "SHA-256 mismatch: the new agent hashes to {sha256}, not the expected {expected}; \
             the installed agent at {shown} is unchanged"
        ));
    }
    let file = file.into_std().await;
    staged.seal(file, 0o755, owner)?;
    probe(staged.path()).await.map_err(|err| {
        format!("the new agent does not run ({err}); the installed agent at {shown} is unchanged")
    })?;
    tokio::task::spawn_blocking(move || staged.install())
        .await
        .map_err(|err| format!("installing the new agent failed: {err}"))??;
    tracing::info!(path = %shown, %sha256, "installed a new agent");

    let restarting = handler.restart_after_upgrade;
    if restarting {
        tokio::spawn(async {
            tokio::time::sleep(RESTART_DELAY).await;
            tracing::info!("exiting so that the new agent starts");
            std::process::exit(RESTART_EXIT_CODE);
        });
    }
    Ok(UpgradeReport {
        path: shown,
        previous_sha256,
        sha256,
        size,
        restarting,
    })
}

/// Runs `binary --version`; it must exit 0.
async fn probe(binary: &Path) -> Result<(), String> {
    let mut attempts = 0;
    loop {
        let mut command = tool(&binary.display().to_string());
        command
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        match command.spawn() {
            Ok(mut child) => {
                let status = tokio::time::timeout(PROBE_TIMEOUT, child.wait())
                    .await
                    .map_err(|_| {
                        format!("`--version` took longer than {}s", PROBE_TIMEOUT.as_secs())
                    })?
                    .map_err(|err| format!("waiting for it failed: {err}"))?;
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("`--version` failed ({status})"))
                };
            }
            // Another thread's fork may briefly hold the file open for writing.
            Err(err) if err.raw_os_error() == Some(nix::libc::ETXTBSY) && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => return Err(format!("cannot start it: {err}")),
        }
    }
}
