//! A directory held open by file descriptor, in which every operation is relative
//! to that descriptor and never follows a symbolic link.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, RenameFlags, openat, renameat2};
use nix::sys::signal::kill;
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstatat};
use nix::unistd::{Pid, UnlinkatFlags, fsync, unlinkat};

/// Prefix of files being written; they are renamed into place when complete.
pub(super) const TEMP_PREFIX: &str = ".tmp-";

/// What a directory entry is, looked at without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EntryKind {
    /// A regular file of this many bytes.
    File(u64),
    /// A symbolic link.
    Symlink,
    /// Anything else (directory, device, socket, ...).
    Other,
}

/// A directory of the storage root, opened once with `O_NOFOLLOW` so that a link
/// planted later in its place cannot redirect vmkit.
#[derive(Debug)]
pub(super) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Creates `parent/name` if needed, opens it (refusing a link) and gives it
    /// `mode`, also when it existed with another.
    pub(super) fn open_child(parent: &Path, name: &str, mode: u32) -> io::Result<Self> {
        let path = parent.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let fd = nix::fcntl::open(
            &path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(io::Error::from)?;
        Ok(Self { fd, path })
    }

    /// The absolute path of entry `name`.
    pub(super) fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The directory's own path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens entry `name` with `flags`, never following a link (`ELOOP` if it is
    /// one).
    pub(super) fn open(&self, name: &str, flags: OFlag) -> io::Result<File> {
        let fd = openat(
            &self.fd,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        Ok(File::from(fd))
    }

    /// Creates a fresh temporary file (mode 0600) whose name starts with `stem`
    /// and ends with `suffix`; it is removed when the guard drops unless persisted.
    pub(super) fn create_temp(&self, stem: &str, suffix: &str) -> io::Result<TempFile<'_>> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{TEMP_PREFIX}{stem}-{}-{n}{suffix}", std::process::id());
        let fd = openat(
            &self.fd,
            name.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io::Error::from)?;
        Ok(TempFile {
            dir: self,
            name,
            file: Some(File::from(fd)),
        })
    }

    /// What entry `name` is, or `None` if it does not exist.
    pub(super) fn entry(&self, name: &str) -> io::Result<Option<EntryKind>> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(kind_of(&st))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes entry `name` (a link itself, never its target). Returns whether it
    /// existed.
    pub(super) fn unlink(&self, name: &str) -> io::Result<bool> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to` unless `to` exists (`EEXIST` then).
    pub(super) fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()> {
        renameat2(&self.fd, from, &self.fd, to, RenameFlags::RENAME_NOREPLACE)
            .map_err(io::Error::from)
    }

    /// Moves `from` to `to` in directory `dest` (on the same filesystem) unless `to`
    /// exists there (`EEXIST` then).
    pub(super) fn move_noreplace(&self, from: &str, dest: &Dir, to: &str) -> io::Result<()> {
        renameat2(&self.fd, from, &dest.fd, to, RenameFlags::RENAME_NOREPLACE)
            .map_err(io::Error::from)
    }

    /// Flushes the directory itself, so that renames and removals are durable.
    pub(super) fn sync(&self) -> io::Result<()> {
        fsync(&self.fd).map_err(io::Error::from)
    }

    /// Names of the entries (without `.` and `..`).
    pub(super) fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            names.push(entry?.file_name());
        }
        names.sort();
        Ok(names)
    }

    /// Removes temporary files left by a process that stopped mid-write. A
    /// temporary file names the process writing it; files of processes still
    /// running (another `FileStorage` on this root, say `vmkit doctor` beside the
    /// daemon) are left alone.
    pub(super) fn remove_stale_temps(&self) -> io::Result<()> {
        for name in self.names()? {
            let Some(name) = name.to_str().filter(|n| n.starts_with(TEMP_PREFIX)) else {
                continue;
            };
            if temp_writer(name).is_some_and(process_alive) {
                continue;
            }
            tracing::info!(path = %self.path_of(name).display(), "removing a leftover temporary file");
            self.unlink(name)?;
        }
        Ok(())
    }
}

/// The process id in a temporary file name `.tmp-<stem>-<pid>-<n>[.<ext>]`.
fn temp_writer(name: &str) -> Option<i32> {
    let core = name.strip_prefix(TEMP_PREFIX)?.split('.').next()?;
    let mut parts = core.rsplitn(3, '-');
    let _counter = parts.next()?;
    parts.next()?.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    pid > 0 && !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn kind_of(st: &FileStat) -> EntryKind {
    let format = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if format == SFlag::S_IFREG {
        EntryKind::File(u64::try_from(st.st_size).unwrap_or(0))
    } else if format == SFlag::S_IFLNK {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    }
}

/// A temporary file in a [`Dir`], removed on drop unless [`TempFile::persist`]ed.
#[derive(Debug)]
pub(super) struct TempFile<'a> {
    dir: &'a Dir,
    name: String,
    file: Option<File>,
}

impl TempFile<'_> {
    /// The open file.
    pub(super) fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("the file is only taken by persist, which consumes the guard")
    }

    /// Its absolute path, for helper programs.
    pub(super) fn path(&self) -> PathBuf {
        self.dir.path_of(&self.name)
    }

    /// Sets its permission bits.
    pub(super) fn chmod(&self, mode: u32) -> io::Result<()> {
        fchmod(self.file(), Mode::from_bits_truncate(mode)).map_err(io::Error::from)
    }

    /// Flushes it and renames it to `name`, failing with `EEXIST` if `name` exists
    /// (the temporary file is then removed).
    pub(super) fn persist(mut self, name: &str) -> io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        self.dir.rename_noreplace(&self.name, name)?;
        self.name.clear();
        self.dir.sync()
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        if let Err(e) = self.dir.unlink(&self.name) {
            tracing::warn!(path = %self.dir.path_of(&self.name).display(), error = %e, "cannot remove a temporary file");
        }
    }
}
