//! The command seam of the LVM backend.

use std::fmt;
use std::io;
use std::process::Stdio;

use async_trait::async_trait;

/// How a command ended and what it printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandOutput {
    /// Exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CommandOutput {
    /// An output with the given exit code and texts.
    pub fn new(code: Option<i32>, stdout: impl Into<String>, stderr: impl Into<String>) -> Self {
        Self {
            code,
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    /// A successful run that printed `stdout`.
    pub fn ok(stdout: impl Into<String>) -> Self {
        Self::new(Some(0), stdout, "")
    }

    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs the commands of the LVM backend: the lvm2 tools (`lvs`, `lvcreate`,
/// `lvchange`, `lvextend`, `lvrename`, `lvremove`) and the helpers `dd` and `mkfs.ext4`.
///
/// `argv[0]` is the program. An `Err` means the program could not be run at all;
/// a run that fails is an `Ok` whose [`CommandOutput::success`] is false.
#[async_trait]
pub trait LvmRunner: Send + Sync + fmt::Debug {
    /// Runs `argv` to completion.
    async fn run(&self, argv: &[String]) -> io::Result<CommandOutput>;
}

/// The real [`LvmRunner`]: runs the programs from `PATH`, with `LC_ALL=C` so that
/// messages are in English, and `LVM_SUPPRESS_FD_WARNINGS=1`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemLvmRunner;

#[async_trait]
impl LvmRunner for SystemLvmRunner {
    async fn run(&self, argv: &[String]) -> io::Result<CommandOutput> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command line"))?;
        let output = tokio::process::Command::new(program)
            .args(args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        Ok(CommandOutput::new(
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ))
    }
}
