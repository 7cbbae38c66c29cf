//! Unix socket paths longer than `sockaddr_un` can hold.
//!
//! VM directories live under `$TART_HOME`, which can be deep enough that a socket in a VM's directory
//! exceeds the 107 bytes `sun_path` holds. The kernel resolves the path given to `connect`/`bind`
//! like any other, so going through `/proc/self/fd/<directory fd>/<file name>` reaches the same
//! socket with a short path.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// `sun_path` is 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// A path usable for `connect`/`bind` whatever the original path's length, valid as long as this
/// value lives.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    // The directory the short path goes through; closing it would dangle `path`.
    _dir: Option<OwnedFd>,
}

impl SocketPath {
    /// `path` itself when short enough, else a `/proc/self/fd/...` path through its directory.
    pub fn new(path: &Path) -> io::Result<SocketPath> {
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(SocketPath {
                path: path.to_owned(),
                _dir: None,
            });
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a usable socket path", path.display()),
            ));
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let dir = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open directory {}: {e}", dir.display())))?;
        let short = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name);
        if short.as_os_str().len() > SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("socket file name {name:?} is too long for a Unix socket address; use a shorter name"),
            ));
        }
        Ok(SocketPath {
            path: short,
            _dir: Some(dir),
        })
    }

    pub fn as_path(&self) -> &Path {
        &self.path
    }
}
