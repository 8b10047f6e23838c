//! The serial console log and its cap.
//!
//! cloud-hypervisor opens the serial file itself (`File::create`, no `O_APPEND`) and
//! writes at its own offset, so the file cannot be truncated or rotated under it:
//! the next write would land at the old offset. Instead the backend keeps the file's
//! *disk usage* under `MachineConfig::console_limit` by punching a hole over
//! everything older than the last `console_limit` bytes (`fallocate` with
//! `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`). The writer's offset and the file's
//! length are untouched, the dropped bytes read back as zeros, and
//! [`tail`](tail) never returns more than the cap. A background task checks each
//! running VM's log every `ChConfig::console_check_interval`, and every
//! `console_tail` call checks it too. On a filesystem without hole punching the log
//! is not shortened (a warning is logged) and only reads are capped.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Hole punching works in whole filesystem blocks; a cap is met to within one.
const BLOCK: u64 = 4096;

/// The last `max_bytes` of the log at `path` as text ("" when there is no log).
/// Bytes dropped by [`compact`] (zeros) are left out, and so is a partial UTF-8
/// character at the start.
pub(crate) fn tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    // Never through a link: a confined VMM can write in its run directory.
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let take = len.min(max_bytes);
    file.seek(SeekFrom::Start(len - take))?;
    let mut buf = Vec::new();
    file.take(take).read_to_end(&mut buf)?;
    let start = buf
        .iter()
        .position(|&b| b != 0 && (b & 0xC0) != 0x80)
        .unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[start..]).into_owned())
}

/// Frees the disk blocks of everything older than the last `limit` bytes of the log
/// at `path`, if it uses more than `limit` plus one block. Returns the bytes freed
/// from the start of the file (0 when nothing was done).
pub(crate) fn compact(path: &Path, limit: u64) -> io::Result<u64> {
    let file = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let used = meta.blocks().saturating_mul(512);
    if used <= limit.saturating_add(BLOCK) {
        return Ok(0);
    }
    let punch_end = meta.len().saturating_sub(limit) / BLOCK * BLOCK;
    if punch_end == 0 {
        return Ok(0);
    }
    let len = libc::off_t::try_from(punch_end).map_err(|_| io::Error::other("log too long"))?;
    // SAFETY: fallocate on an open descriptor we own, over a range inside the file;
    // KEEP_SIZE leaves the length (and so the writer's offset) alone.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(punch_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_is_capped_and_skips_dropped_bytes_and_broken_characters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(b"\0\0\0\0\xa9tail \xc3\xa9t\xc3\xa9\n")
            .expect("write");
        assert_eq!(tail(&path, 1 << 20).expect("tail"), "tail \u{e9}t\u{e9}\n");
        assert_eq!(tail(&path, 4).expect("tail"), "t\u{e9}\n");
        assert_eq!(tail(&dir.path().join("none"), 10).expect("tail"), "");
    }

    #[test]
    fn compact_frees_old_blocks_while_a_writer_keeps_its_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        // A writer like cloud-hypervisor's: no O_APPEND, its own offset.
        let mut writer = std::fs::File::create(&path).expect("create");
        let line = [b'x'; 1023];
        for _ in 0..256 {
            writer.write_all(&line).expect("write");
            writer.write_all(b"\n").expect("write");
        }
        writer.sync_all().expect("sync");
        let limit = 16 * 1024;
        let freed = compact(&path, limit).expect("compact");
        assert!(freed >= 256 * 1024 - limit - BLOCK, "freed {freed}");
        writer.write_all(b"after\n").expect("write");
        writer.sync_all().expect("sync");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), 256 * 1024 + 6, "the length is kept");
        assert!(
            meta.blocks() * 512 <= limit + 2 * BLOCK,
            "disk use {} is within the cap",
            meta.blocks() * 512
        );
        assert!(tail(&path, 6).expect("tail").ends_with("after\n"));
        assert_eq!(
            compact(&path, limit).expect("again"),
            0,
            "nothing more to do"
        );
    }
}
