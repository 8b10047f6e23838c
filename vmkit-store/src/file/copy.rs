//! Copying images: reflinks (`FICLONE`) and sparse copies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::{Whence, lseek};

use super::dir::Dir;

/// Bytes read at a time by a sparse copy.
const CHUNK: usize = 1 << 20;
/// Granularity at which a sparse copy skips zeros: a filesystem block.
const BLOCK: usize = 4096;

/// Makes `dst` share all of `src`'s extents (`ioctl(FICLONE)`). Both must be on
/// one filesystem that supports reflinks (btrfs, XFS with `reflink=1`).
pub(super) fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE's argument is the source descriptor as a plain int, not a
    // pointer; both descriptors are borrowed from `File`s that stay open for the
    // whole call, so the kernel reads no memory of ours and no descriptor dangles.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a `FICLONE` failure means "this filesystem (or this pair of files)
/// cannot reflink", as opposed to a real I/O error.
pub(super) fn reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Whether the filesystem under `dir` can reflink: clones a small temporary file.
pub(super) fn probe_reflink(dir: &Dir) -> io::Result<bool> {
    let src = dir.create_temp("probe-src", "")?;
    src.file().write_all_at(&[0x5a; BLOCK], 0)?;
    let dst = dir.create_temp("probe-dst", "")?;
    match reflink(src.file(), dst.file()) {
        Ok(()) => Ok(true),
        Err(e) if reflink_unsupported(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copies `src` into the empty `dst` keeping it sparse: only the data ranges of
/// `src` (`SEEK_DATA`/`SEEK_HOLE`) are read, and blocks of zeros in them are not
/// written. `dst` ends up as long as `src`. Returns the bytes written.
pub(super) fn sparse_copy(src: &File, dst: &File) -> io::Result<u64> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek(src, pos, Whence::SeekData)? else {
            break;
        };
        let end = seek(src, start, Whence::SeekHole)?.unwrap_or(len).min(len);
        written += copy_range(src, dst, start, end, &mut buf)?;
        pos = end;
    }
    Ok(written)
}

/// `lseek` that answers `None` past the last data (`ENXIO`).
fn seek(file: &File, offset: u64, whence: Whence) -> io::Result<Option<u64>> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match lseek(file, offset, whence) {
        Ok(o) => Ok(Some(u64::try_from(o).unwrap_or(0))),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn copy_range(src: &File, dst: &File, start: u64, end: u64, buf: &mut [u8]) -> io::Result<u64> {
    let mut written = 0;
    let mut off = start;
    while off < end {
        let n = usize::try_from(end - off).map_or(buf.len(), |left| left.min(buf.len()));
        let chunk = &mut buf[..n];
        src.read_exact_at(chunk, off)?;
        written += write_nonzero(dst, chunk, off)?;
        off += n as u64;
    }
    Ok(written)
}

/// Writes the runs of non-zero blocks of `chunk` at `offset` in `dst`.
fn write_nonzero(dst: &File, chunk: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0;
    let mut run: Option<usize> = None;
    for (i, block) in chunk.chunks(BLOCK).enumerate() {
        let zero = is_zero(block);
        match (run, zero) {
            (None, false) => run = Some(i * BLOCK),
            (Some(s), true) => {
                dst.write_all_at(&chunk[s..i * BLOCK], offset + s as u64)?;
                written += (i * BLOCK - s) as u64;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        dst.write_all_at(&chunk[s..], offset + s as u64)?;
        written += (chunk.len() - s) as u64;
    }
    Ok(written)
}

fn is_zero(block: &[u8]) -> bool {
    // OR-folding 64 bytes at a time vectorises, and still stops at the first
    // non-zero piece of a data block.
    block
        .chunks(64)
        .all(|piece| piece.iter().fold(0, |acc, &b| acc | b) == 0)
}

/// Opens a base image or volume for reading without following links.
pub(super) fn open_read(dir: &Dir, name: &str) -> io::Result<File> {
    dir.open(name, OFlag::O_RDONLY)
}
