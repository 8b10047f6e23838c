//! Logs: a unit's journal through `journalctl`, or the end of a text file; both can
//! follow.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::files::absolute;
use super::tool;
use crate::ops::{LogSource, LogsRequest, MAX_LOG_LINE};
use crate::server::OutputSink;

/// How far back from the end of a file the last lines are looked for.
const MAX_TAIL_SCAN: u64 = 64 << 20;
/// Bytes read at a time when scanning a file backwards or following it.
const BLOCK: usize = 64 << 10;
/// How often a followed file is checked for growth.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Lines collected before a batch is sent while following.
const FOLLOW_BATCH: usize = 256;
/// How long to wait for more lines before sending a partial batch while following.
const FOLLOW_LINGER: Duration = Duration::from_millis(20);

/// Checks a unit name: systemd's characters only, so it cannot pass an option.
fn check_unit(unit: &str) -> Result<(), String> {
    let ok = !unit.is_empty()
        && unit.len() <= 256
        && !unit.starts_with('-')
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.@-\\".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("`{unit}` is not a systemd unit name"))
    }
}

pub(super) async fn send(req: LogsRequest, out: &OutputSink) -> Result<(), String> {
    let lines = req.effective_lines();
    match &req.source {
        LogSource::Unit(unit) => journal(unit, lines, req.follow, out).await,
        LogSource::File(path) => file(path, lines, req.follow, out).await,
    }
}

fn closed(err: impl std::fmt::Display) -> String {
    format!("sending the log failed: {err}")
}

/// A line of bytes as text, without its line end.
fn text_of(mut line: &[u8]) -> String {
    if let Some(rest) = line.strip_suffix(b"\n") {
        line = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    String::from_utf8_lossy(&line[..line.len().min(MAX_LOG_LINE)]).into_owned()
}

async fn journal(unit: &str, lines: u32, follow: bool, out: &OutputSink) -> Result<(), String> {
    check_unit(unit)?;
    let count = lines.to_string();
    let mut command = tool("journalctl");
    command
        .args([
            "--unit",
            unit,
            "--lines",
            &count,
            "--no-pager",
            "--output",
            "short-iso",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if follow {
        command.arg("--follow");
    }
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot run journalctl (is this a systemd guest?): {err}"))?;
    let stdout = child.stdout.take().ok_or("journalctl has no stdout")?;
    let mut stderr = child.stderr.take().ok_or("journalctl has no stderr")?;
    let mut reader = BufReader::new(stdout);

    if follow {
        let mut batch = Vec::new();
        loop {
            let line = match read_line(&mut reader).await {
                Some(line) => line,
                None => break,
            };
            batch.push(line);
            while batch.len() < FOLLOW_BATCH {
                match tokio::time::timeout(FOLLOW_LINGER, read_line(&mut reader)).await {
                    Ok(Some(line)) => batch.push(line),
                    Ok(None) | Err(_) => break,
                }
            }
            out.lines(&batch).await.map_err(closed)?;
            batch.clear();
        }
    } else {
        let mut all = Vec::new();
        while let Some(line) = read_line(&mut reader).await {
            all.push(line);
        }
        // At most what was asked for ("-- No entries --" included).
        let skip = all.len().saturating_sub(lines as usize);
        out.lines(&all[skip..]).await.map_err(closed)?;
    }
    let status = child
        .wait()
        .await
        .map_err(|err| format!("waiting for journalctl failed: {err}"))?;
    if !status.success() {
        let mut message = Vec::new();
        let _ = (&mut stderr).take(4096).read_to_end(&mut message).await;
        return Err(format!(
            "journalctl failed ({status}): {}",
            String::from_utf8_lossy(&message).trim()
        ));
    }
    Ok(())
}

/// The next line of a reader (at most [`MAX_LOG_LINE`] bytes kept), or `None` at its end.
async fn read_line<R>(reader: &mut BufReader<R>) -> Option<String>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut line = Vec::new();
    // A line longer than the cap is read in full and cut; bound the memory anyway.
    let mut limited = reader.take(4 * MAX_LOG_LINE as u64);
    match limited.read_until(b'\n', &mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(text_of(&line)),
    }
}

/// The complete lines at the end of a file: at most `count` of them, and the offset just
/// after the last complete line. With `partial`, an unfinished last line counts too.
pub(super) fn tail(
    file: &mut File,
    count: u32,
    partial: bool,
) -> std::io::Result<(Vec<String>, u64)> {
    let size = file.metadata()?.len();
    let floor = size.saturating_sub(MAX_TAIL_SCAN);
    let mut pos = size;
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut line_ends = 0usize;
    // Stop once the blocks hold `count` + 1 line ends (the first one bounds the lines).
    while pos > floor && line_ends <= count as usize {
        let len = (pos - floor).min(BLOCK as u64);
        pos -= len;
        let mut block = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut block)?;
        line_ends += block.iter().filter(|b| **b == b'\n').count();
        blocks.push(block);
    }
    let data: Vec<u8> = blocks.into_iter().rev().flatten().collect();
    let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let end = size - (data.len() - complete) as u64;
    let body = if partial {
        &data[..]
    } else {
        &data[..complete]
    };
    let mut lines: Vec<&[u8]> = body.split_inclusive(|b| *b == b'\n').collect();
    // The first piece may be the end of a line that starts before what was read.
    if pos > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(count as usize);
    Ok((lines[skip..].iter().map(|l| text_of(l)).collect(), end))
}

async fn file(path: &str, count: u32, follow: bool, out: &OutputSink) -> Result<(), String> {
    let path = absolute(path)?.to_path_buf();
    let shown = path.display().to_string();
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut file = File::open(&path)?;
            if file.metadata()?.is_dir() {
                return Err(std::io::Error::other("it is a directory"));
            }
            let (lines, end) = tail(&mut file, count, !follow)?;
            Ok((file, lines, end))
        })
        .await
        .map_err(|err| format!("reading {shown} failed: {err}"))?
        .map_err(|err| format!("cannot read {shown}: {err}"))?
    };
    let (mut file, lines, mut offset) = opened;
    out.lines(&lines).await.map_err(closed)?;
    if !follow {
        return Ok(());
    }
    let mut inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        // Rotated (a new file at the path) or truncated: start over at its beginning.
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.ino() != inode {
                if let Ok(reopened) = File::open(&path) {
                    file = reopened;
                    inode = meta.ino();
                    offset = 0;
                    pending.clear();
                }
            } else if meta.len() < offset {
                offset = 0;
                pending.clear();
            }
        }
        let (grown, read_to) = {
            let mut chunk = Vec::new();
            let read = file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| (&mut file).take(16 * BLOCK as u64).read_to_end(&mut chunk));
            match read {
                Ok(n) => (chunk, offset + n as u64),
                Err(err) => return Err(format!("cannot read {shown}: {err}")),
            }
        };
        offset = read_to;
        if grown.is_empty() {
            continue;
        }
        pending.extend_from_slice(&grown);
        let mut lines = Vec::new();
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            lines.push(text_of(&pending[..=end]));
            pending.drain(..=end);
        }
        if pending.len() > MAX_LOG_LINE {
            lines.push(text_of(&pending));
            pending.clear();
        }
        if !lines.is_empty() {
            out.lines(&lines).await.map_err(closed)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_with(text: &str) -> File {
        let mut file = tempfile_in_tmp();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!(
            "vmkit-logs-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let mut file = file_with("a\nb\nc\nd\n");
        let (lines, end) = tail(&mut file, 2, false).unwrap();
        assert_eq!(lines, ["c", "d"]);
        assert_eq!(end, 8);
    }

    #[test]
    fn tail_of_a_short_file_returns_all_of_it() {
        let mut file = file_with("a\nb\n");
        assert_eq!(tail(&mut file, 10, false).unwrap().0, ["a", "b"]);
    }

    #[test]
    fn tail_keeps_an_unfinished_line_only_when_asked() {
        let mut file = file_with("a\nb\npart");
        assert_eq!(tail(&mut file, 2, true).unwrap().0, ["b", "part"]);
        let (lines, end) = tail(&mut file, 2, false).unwrap();
        assert_eq!(lines, ["a", "b"]);
        assert_eq!(end, 4);
    }

    #[test]
    fn tail_spans_blocks() {
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let mut file = file_with(&text);
        let (lines, _) = tail(&mut file, 3, false).unwrap();
        assert_eq!(lines, ["line 19997", "line 19998", "line 19999"]);
    }

    #[test]
    fn unit_names_cannot_be_options() {
        assert!(check_unit("ssh.service").is_ok());
        assert!(check_unit("getty@ttyS0.service").is_ok());
        assert!(check_unit("--since=today").is_err());
        assert!(check_unit("a b").is_err());
    }
}
