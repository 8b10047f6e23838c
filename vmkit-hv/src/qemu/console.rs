//! The serial console: a size-capped log file fed by a pump task.
//!
//! QEMU's serial port is a `socket` chardev in server mode; the pump connects to it
//! and appends what it reads to `console.log`. The file never exceeds its cap: when a
//! write would pass it, the newest bytes (half the cap, or more when the chunk is
//! larger) are written to a temporary file that is renamed over the log, so readers
//! always see a whole file and each byte is rewritten O(1) times on average. While no
//! pump is connected (the daemon is down), QEMU drops the output instead of blocking
//! the guest; `attach` reconnects a pump.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// A log file capped at a number of bytes, keeping the newest.
#[derive(Debug)]
pub(crate) struct ConsoleLog {
    path: PathBuf,
    cap: u64,
    file: Option<tokio::fs::File>,
    size: u64,
}

impl ConsoleLog {
    /// Opens (or creates) the log at `path`, trimming it if it is over `cap` already.
    pub async fn open(path: &Path, cap: u64) -> std::io::Result<Self> {
        let mut log = Self {
            path: path.to_owned(),
            cap,
            file: None,
            size: 0,
        };
        let size = match tokio::fs::metadata(path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        log.size = size;
        if size > cap {
            log.rewrite(&[]).await?;
        } else {
            log.reopen().await?;
        }
        Ok(log)
    }

    /// Appends `data`, dropping the oldest output if the log would exceed its cap.
    pub async fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.size + data.len() as u64 <= self.cap {
            let file = match &mut self.file {
                Some(f) => f,
                None => {
                    self.reopen().await?;
                    self.file
                        .as_mut()
                        .ok_or_else(|| std::io::Error::other("the console log did not open"))?
                }
            };
            file.write_all(data).await?;
            file.flush().await?;
            self.size += data.len() as u64;
            return Ok(());
        }
        self.rewrite(data).await
    }

    async fn reopen(&mut self) -> std::io::Result<()> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await?;
        self.size = file.metadata().await?.len();
        self.file = Some(file);
        Ok(())
    }

    /// Replaces the log with its newest bytes followed by `data`, at most `cap` bytes.
    async fn rewrite(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file = None;
        let keep = (self.cap / 2).max((data.len() as u64).min(self.cap));
        let from_data = (data.len() as u64).min(keep);
        let from_old = (keep - from_data).min(self.size);
        let mut content = read_tail(&self.path, from_old).await?;
        content.extend_from_slice(&data[data.len() - from_data as usize..]);
        let tmp = self.path.with_extension("log.tmp");
        tokio::fs::write(&tmp, &content).await?;
        tokio::fs::rename(&tmp, &self.path).await?;
        self.reopen().await
    }
}

/// The last `max` bytes of the file at `path` (fewer if it is shorter; none if it
/// does not exist).
pub(crate) async fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata().await?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start)).await?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    file.take(max).read_to_end(&mut buf).await?;
    Ok(buf)
}

/// `bytes` as text, without a partial UTF-8 sequence at the start (the cut of a tail)
/// and with invalid sequences replaced.
pub(crate) fn tail_text(bytes: &[u8]) -> String {
    let skip = bytes
        .iter()
        .take(3)
        .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
        .count();
    String::from_utf8_lossy(&bytes[skip..]).into_owned()
}

/// Copies everything readable from `stream` into `log` until the stream ends.
/// Write errors (a full disk) drop output rather than stall the guest.
pub(crate) async fn pump(mut stream: tokio::net::UnixStream, mut log: ConsoleLog) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut warned = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Err(e) = log.append(&buf[..n]).await
            && !warned
        {
            tracing::warn!(path = %log.path.display(), error = %e, "cannot write the console log; dropping output");
            warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    #[tokio::test]
    async fn the_log_never_exceeds_its_cap_and_keeps_the_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::open(&path, 100).await.unwrap();
        let mut written = Vec::new();
        for i in 0..500u32 {
            let chunk = format!("line {i}\n");
            log.append(chunk.as_bytes()).await.unwrap();
            written.extend_from_slice(chunk.as_bytes());
            assert!(size(&path) <= 100, "over the cap after line {i}");
        }
        let content = std::fs::read(&path).unwrap();
        assert!(content.len() >= 50, "at least half the cap is kept");
        assert!(written.ends_with(&content), "the log is the newest output");
    }

    #[tokio::test]
    async fn a_chunk_larger_than_the_cap_keeps_its_last_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::open(&path, 10).await.unwrap();
        log.append(b"0123456789abcdefghij").await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdefghij");
    }

    #[tokio::test]
    async fn reopening_an_oversized_log_trims_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'x'; 1000]).unwrap();
        let mut log = ConsoleLog::open(&path, 64).await.unwrap();
        assert!(size(&path) <= 64);
        log.append(b"tail").await.unwrap();
        assert!(std::fs::read(&path).unwrap().ends_with(b"xtail"));
    }

    #[tokio::test]
    async fn a_zero_cap_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::open(&path, 0).await.unwrap();
        log.append(b"hello").await.unwrap();
        assert_eq!(size(&path), 0);
    }

    #[test]
    fn a_tail_cut_inside_a_character_drops_the_fragment() {
        let text = "héllo";
        let bytes = &text.as_bytes()[2..]; // starts inside 'é'
        assert_eq!(tail_text(bytes), "llo");
    }
}
