use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::io_context;
use crate::Result;

/// An exclusive `flock(2)` on a file or directory, released when dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock is ours.
    pub fn exclusive(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_context(format!("failed to open {} for locking", path.display())))?;
        flock(&file, libc::LOCK_EX).map_err(io_context(format!("failed to lock {}", path.display())))?;
        Ok(FileLock { _file: file })
    }

    /// Whether the locked file is (still) the one at `path`.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self._file.metadata(), std::fs::metadata(path)) {
            (Ok(ours), Ok(there)) => ours.dev() == there.dev() && ours.ino() == there.ino(),
            _ => false,
        }
    }

    /// `None` when another process holds it.
    pub fn try_exclusive(path: &Path) -> io::Result<Option<Self>> {
        let file = File::open(path)?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(err) if err.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The "VM is running" lock: a POSIX `fcntl` write lock on the whole of `config.json`, the
/// mechanism macOS Tart uses, so `F_GETLK` tells other processes who holds it.
///
/// POSIX record locks belong to the process and vanish when *any* descriptor of the file is
/// closed by it, so the holder must not open and close `config.json` while holding one.
#[derive(Debug)]
pub struct PidLock {
    _file: File,
}

impl PidLock {
    /// `None` when another process holds the lock.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut lock = whole_file_lock(libc::F_WRLCK);
        // SAFETY: fcntl with a valid flock struct on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &mut lock) } == 0 {
            return Ok(Some(PidLock { _file: file }));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EAGAIN) => Ok(None),
            _ => Err(err),
        }
    }

    /// The PID of the process holding the lock, if any. Linux reports "no conflict" by setting
    /// `l_type` to `F_UNLCK` (leaving `l_pid` as passed), so that is what we test.
    pub fn holder(path: &Path) -> Option<libc::pid_t> {
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        let mut lock = whole_file_lock(libc::F_RDLCK);
        // SAFETY: as above.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) } != 0 {
            return None;
        }
        (lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid)
    }
}

fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero means "from offset 0 to the end of the file".
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}
