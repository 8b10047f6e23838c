//! Choosing the accelerator: KVM when the host really runs guests under it, TCG
//! otherwise.
//!
//! Opening `/dev/kvm` is not enough: some hosts expose a KVM that emulates
//! instructions in software, on which a stock kernel dies with "KVM internal error ...
//! emulation failure" (or crawls). So the probe boots a payload of our own under
//! `-accel kvm -cpu host`, the way VMs will run, and asks for proof of work: the
//! 64 KiB flat BIOS image built from `kvm_probe.S` goes from the reset vector to long
//! mode, uses the instructions a kernel needs early (CPUID, `lock cmpxchg16b`, SSE2),
//! writes 16 MiB of RAM and runs a 2^24-round loop, then exits QEMU through
//! `isa-debug-exit` with a known status. Only that status within [`PROBE_TIMEOUT`]
//! counts as KVM working.

use std::fmt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

/// How long the probe may take. A working KVM needs a few hundred milliseconds, most
/// of it QEMU's own start.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// QEMU's exit status when the payload's checks pass: `(0x2a << 1) | 1`.
pub(crate) const EXIT_OK: i32 = 85;
/// QEMU's exit status when a check computed a wrong result: `(0x15 << 1) | 1`.
const EXIT_WRONG: i32 = 43;

/// The payload's code, which the image holds from offset 0 (address 0xf0000).
/// Assembled from `kvm_probe.S` beside this file.
const PAYLOAD_CODE: &[u8] = &[
    0xfa, 0xfc, 0x31, 0xc0, 0x8e, 0xc0, 0x8c, 0xc8, 0x8e, 0xd8, 0xbe, 0x80, 0x01, 0xbf, 0x00, 0x06,
    0xb9, 0x20, 0x00, 0xf3, 0xa4, 0x31, 0xc0, 0x8e, 0xd8, 0xc7, 0x06, 0xf8, 0x05, 0x1f, 0x00, 0x66,
    0xc7, 0x06, 0xfa, 0x05, 0x00, 0x06, 0x00, 0x00, 0x66, 0x0f, 0x01, 0x16, 0xf8, 0x05, 0x0f, 0x20,
    0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x40, 0x00, 0x0f, 0x00, 0x08, 0x00,
    0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x90, 0x00, 0x00, 0x31,
    0xc0, 0xbf, 0x00, 0x10, 0x00, 0x00, 0xb9, 0x00, 0x0c, 0x00, 0x00, 0xf3, 0xab, 0xc7, 0x05, 0x00,
    0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x20, 0x00, 0x00, 0x03, 0x30, 0x00,
    0x00, 0xbf, 0x00, 0x30, 0x00, 0x00, 0xb8, 0x83, 0x00, 0x00, 0x00, 0xb9, 0x20, 0x00, 0x00, 0x00,
    0x89, 0x07, 0x05, 0x00, 0x00, 0x20, 0x00, 0x83, 0xc7, 0x08, 0xe2, 0xf4, 0xb8, 0x00, 0x10, 0x00,
    0x00, 0x0f, 0x22, 0xd8, 0x0f, 0x20, 0xe0, 0x0d, 0x20, 0x02, 0x00, 0x00, 0x0f, 0x22, 0xe0, 0xb9,
    0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0,
    0x0d, 0x00, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0xea, 0xbf, 0x00, 0x0f, 0x00, 0x18, 0x00, 0x66,
    0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xd0, 0x48, 0xc7, 0xc4, 0x00, 0x90, 0x00, 0x00, 0xb8, 0x01,
    0x00, 0x00, 0x00, 0x0f, 0xa2, 0x0f, 0xba, 0xe1, 0x0d, 0x73, 0x40, 0x48, 0xc7, 0x04, 0x25, 0x00,
    0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x04, 0x25, 0x08, 0x80, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x31, 0xc0, 0x31, 0xd2, 0xbb, 0x11, 0x11, 0x00, 0x00, 0xb9, 0x22, 0x22, 0x00,
    0x00, 0xf0, 0x48, 0x0f, 0xc7, 0x0c, 0x25, 0x00, 0x80, 0x00, 0x00, 0x75, 0x68, 0x48, 0x81, 0x3c,
    0x25, 0x00, 0x80, 0x00, 0x00, 0x11, 0x11, 0x00, 0x00, 0x75, 0x5a, 0xb8, 0x5a, 0x5a, 0x00, 0x00,
    0x66, 0x48, 0x0f, 0x6e, 0xc0, 0x66, 0x0f, 0xd4, 0xc0, 0x66, 0x48, 0x0f, 0x7e, 0xc0, 0x48, 0x3d,
    0xb4, 0xb4, 0x00, 0x00, 0x75, 0x3f, 0x49, 0xc7, 0xc0, 0x04, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc7,
    0x00, 0x00, 0x00, 0x02, 0x48, 0xc7, 0xc1, 0x00, 0x10, 0x00, 0x00, 0x48, 0x01, 0x0f, 0x48, 0x81,
    0xc7, 0x00, 0x10, 0x00, 0x00, 0xe2, 0xf4, 0x49, 0xff, 0xc8, 0x75, 0xe1, 0x48, 0xc7, 0xc1, 0x00,
    0x00, 0x00, 0x01, 0x48, 0x31, 0xc0, 0x48, 0x01, 0xc8, 0x48, 0xc1, 0xc0, 0x03, 0xe2, 0xf7, 0xb0,
    0x2a, 0xe6, 0xf4, 0xeb, 0x04, 0xb0, 0x15, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0x8d, 0xb4, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00,
];
/// `jmp start16` (rel16 = 0x000d), at the reset vector: offset 0xfff0.
const RESET_JUMP: [u8; 3] = [0xe9, 0x0d, 0x00];
const RESET_OFFSET: usize = 0xfff0;
/// QEMU requires a BIOS image to be a multiple of 64 KiB.
const IMAGE_SIZE: usize = 0x10000;

/// The probe's BIOS image.
pub(crate) fn payload() -> Vec<u8> {
    let mut image = vec![0u8; IMAGE_SIZE];
    image[..PAYLOAD_CODE.len()].copy_from_slice(PAYLOAD_CODE);
    image[RESET_OFFSET..RESET_OFFSET + RESET_JUMP.len()].copy_from_slice(&RESET_JUMP);
    image
}

/// How QEMU accelerates the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Accel {
    /// KVM when the probe shows that it runs guests, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualisation through `/dev/kvm`, with `-cpu host`.
    Kvm,
    /// QEMU's binary translator, with `-cpu max`: slower, runs anywhere.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator a [`Qemu`](super::Qemu) uses, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccelChoice {
    /// [`Accel::Kvm`] or [`Accel::Tcg`], never [`Accel::Auto`].
    pub accel: Accel,
    /// Why: the configuration, or what the probe found.
    pub reason: String,
}

impl AccelChoice {
    fn new(accel: Accel, reason: impl Into<String>) -> Self {
        Self {
            accel,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.accel, self.reason)
    }
}

/// What one run of the payload under an accelerator came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PayloadRun {
    /// Every check passed, in this time (QEMU's start included).
    Passed(Duration),
    /// QEMU could not be started.
    Spawn(String),
    /// QEMU stopped the guest: KVM could not execute an instruction.
    EmulationFailure(String),
    /// QEMU exited with another status; its stderr.
    Failed {
        /// Exit status, if it exited normally.
        status: Option<i32>,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The payload did not finish in time.
    Timeout,
}

/// Runs the payload under `-accel <accel>` (`kvm` with `-cpu host`, `tcg` with
/// `-cpu max`) and reports what happened.
pub(crate) async fn run_payload(binary: &Path, accel: Accel, timeout: Duration) -> PayloadRun {
    let file = match write_payload() {
        Ok(f) => f,
        Err(e) => return PayloadRun::Spawn(format!("cannot write the probe image: {e}")),
    };
    let (accel_arg, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg | Accel::Auto => ("tcg", "max"),
    };
    let mut command = tokio::process::Command::new(binary);
    command
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-M", "q35", "-accel", accel_arg, "-cpu", cpu, "-m", "64M"])
        .arg("-bios")
        .arg(file.path())
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return PayloadRun::Spawn(format!("cannot run {}: {e}", binary.display())),
    };
    let Some(stderr) = child.stderr.take() else {
        return PayloadRun::Spawn("QEMU's stderr was not captured".to_owned());
    };
    let mut lines = BufReader::new(stderr).lines();
    let mut collected = Vec::new();
    let outcome = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            // On an emulation failure QEMU stops the guest and waits: no exit to see.
            let fatal = line.contains("KVM internal error") || line.contains("emulation failure");
            collected.push(line);
            if fatal {
                return None;
            }
        }
        child.wait().await.ok()
    })
    .await;
    let stderr = collected.join("\n").trim().to_owned();
    match outcome {
        Ok(Some(status)) if status.code() == Some(EXIT_OK) => PayloadRun::Passed(started.elapsed()),
        Ok(Some(status)) => PayloadRun::Failed {
            status: status.code(),
            stderr,
        },
        Ok(None) => {
            let _ = child.kill().await;
            PayloadRun::EmulationFailure(stderr)
        }
        Err(_) => {
            let _ = child.kill().await;
            PayloadRun::Timeout
        }
    }
}

fn write_payload() -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write as _;
    let mut file = tempfile::Builder::new()
        .prefix("vmkit-kvm-probe-")
        .suffix(".bin")
        .tempfile()?;
    file.write_all(&payload())?;
    file.flush()?;
    Ok(file)
}

/// Decides between KVM and TCG for `binary` on this host.
pub(crate) async fn probe(binary: &Path) -> AccelChoice {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return AccelChoice::new(Accel::Tcg, "no /dev/kvm on this host");
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return AccelChoice::new(
                Accel::Tcg,
                "cannot open /dev/kvm: permission denied (add the user to the kvm group)",
            );
        }
        Err(e) => return AccelChoice::new(Accel::Tcg, format!("cannot open /dev/kvm: {e}")),
    }
    let run = run_payload(binary, Accel::Kvm, PROBE_TIMEOUT).await;
    let choice = match run {
        PayloadRun::Passed(took) => AccelChoice::new(
            Accel::Kvm,
            format!(
                "KVM ran the probe guest (long mode, cmpxchg16b, SSE2, 16 MiB, 2^24 loop) in {} ms",
                took.as_millis()
            ),
        ),
        PayloadRun::Spawn(msg) => AccelChoice::new(Accel::Tcg, format!("KVM probe not run: {msg}")),
        PayloadRun::EmulationFailure(stderr) => AccelChoice::new(
            Accel::Tcg,
            format!(
                "/dev/kvm exists but cannot run a stock guest: the probe guest hit a KVM \
                 emulation failure ({})",
                first_line(&stderr)
            ),
        ),
        PayloadRun::Failed {
            status: Some(EXIT_WRONG),
            ..
        } => AccelChoice::new(
            Accel::Tcg,
            "/dev/kvm exists but the probe guest computed wrong results under it",
        ),
        PayloadRun::Failed { status, stderr } => AccelChoice::new(
            Accel::Tcg,
            format!(
                "/dev/kvm exists but the probe guest failed under it (QEMU exit status {}{}{})",
                status.map_or_else(|| "none".to_owned(), |s| s.to_string()),
                if stderr.is_empty() { "" } else { ": " },
                first_line(&stderr)
            ),
        ),
        PayloadRun::Timeout => AccelChoice::new(
            Accel::Tcg,
            format!(
                "/dev/kvm exists but the probe guest did not finish within {PROBE_TIMEOUT:?} \
                 under it (KVM without hardware virtualisation is slower than TCG)"
            ),
        ),
    };
    tracing::info!(accel = %choice.accel, reason = %choice.reason, "QEMU accelerator chosen");
    choice
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("no message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_a_64k_image_with_the_reset_jump_at_the_reset_vector() {
        let image = payload();
        assert_eq!(image.len(), 0x10000);
        assert_eq!(&image[0xfff0..0xfff3], &[0xe9, 0x0d, 0x00]);
        // The jump lands on offset 0: 0xfff3 + 0x000d wraps to 0x0000.
        assert_eq!((0xfff3u16).wrapping_add(0x000d), 0);
    }

    /// The payload's checks pass under TCG, so a KVM that fails them fails for its
    /// own reasons, not for a bug in the payload.
    #[tokio::test]
    async fn payload_passes_every_check_under_tcg() {
        let run = run_payload(
            Path::new("qemu-system-x86_64"),
            Accel::Tcg,
            Duration::from_secs(60),
        )
        .await;
        assert!(matches!(run, PayloadRun::Passed(_)), "{run:?}");
    }
}
