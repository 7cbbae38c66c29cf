use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::io_context;
use crate::{validate_local_name, Error, FileLock, Result, VmDir};

/// `$TART_HOME` (default `~/.tart`): `vms/`, `cache/OCIs/` and `tmp/`.
#[derive(Clone, Debug)]
pub struct TartHome {
    root: PathBuf,
}

impl TartHome {
    /// Uses `$TART_HOME`, else `$HOME/.tart`, creating the tree as needed.
    pub fn from_env() -> Result<Self> {
        let root = match std::env::var_os("TART_HOME") {
            Some(home) if !home.is_empty() => PathBuf::from(home),
            _ => {
                let home = std::env::var_os("HOME")
                    .filter(|home| !home.is_empty())
                    .ok_or_else(|| Error::HomeNotCreatable {
                        path: PathBuf::from("~/.tart"),
                        source: io::Error::other("neither TART_HOME nor HOME is set"),
                    })?;
                PathBuf::from(home).join(".tart")
            }
        };
        Self::open(root)
    }

    pub fn open(root: PathBuf) -> Result<Self> {
        if root.exists() && !root.is_dir() {
            return Err(Error::HomeNotDirectory(root));
        }
        let home = TartHome { root };
        for dir in [home.vms_dir(), home.oci_cache_dir(), home.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(|source| match dir.parent().filter(|p| p.is_file()) {
                Some(file) => Error::HomeNotDirectory(file.to_owned()),
                None => Error::HomeNotCreatable {
                    path: dir.clone(),
                    source,
                },
            })?;
        }
        Ok(home)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn oci_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("OCIs")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The lock Tart takes around clone, import and the MAC check at the start of `run`.
    pub fn global_lock(&self) -> Result<FileLock> {
        FileLock::exclusive(&self.root)
    }

    /// The local VM called `name`, which may not exist yet.
    pub fn local_vm(&self, name: &str) -> Result<VmDir> {
        validate_local_name(name)?;
        Ok(VmDir::new(self.vms_dir().join(name)))
    }

    /// The local VM called `name`, which must exist and be complete.
    pub fn existing_local_vm(&self, name: &str) -> Result<VmDir> {
        let vm = self.local_vm(name)?;
        if !vm.path().exists() {
            return Err(Error::VmDoesNotExist(name.to_owned()));
        }
        if !vm.is_initialized() {
            return Err(Error::VmNotInitialized(vm.path().to_owned()));
        }
        Ok(vm)
    }

    /// Every complete local VM, sorted by name. Anything else under `vms/` is ignored, as Tart does.
    pub fn local_vms(&self) -> Result<Vec<(String, VmDir)>> {
        let vms_dir = self.vms_dir();
        let entries = fs::read_dir(&vms_dir).map_err(io_context(format!("failed to list {}", vms_dir.display())))?;
        let mut vms: Vec<(String, VmDir)> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let vm = VmDir::new(entry.path());
                vm.is_initialized().then_some((name, vm))
            })
            .collect();
        vms.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vms)
    }

    /// A fresh, locked directory under `tmp/` to build something in before it moves into place.
    pub fn staging_dir(&self) -> Result<StagingDir> {
        StagingDir::create(self.tmp_dir().join(uuid::Uuid::new_v4().to_string()))
    }

    /// Deletes every entry of `tmp/` that nobody holds a lock on: leftovers of killed commands.
    pub fn gc_tmp(&self) -> Result<()> {
        let tmp = self.tmp_dir();
        let entries = fs::read_dir(&tmp).map_err(io_context(format!("failed to list {}", tmp.display())))?;
        for entry in entries.filter_map(|entry| entry.ok()) {
            let path = entry.path();
            if is_young_pull_staging(&entry) {
                continue;
            }
            let Ok(Some(_lock)) = FileLock::try_exclusive(&path) else {
                continue;
            };
            remove_path(&path).map_err(io_context(format!("failed to remove {}", path.display())))?;
        }
        Ok(())
    }
}

/// Interrupted pulls are resumed from `tmp/pull-<digest>`, image downloads from
/// `tmp/download-<key>`. Tart lets any other command collect them at once; we keep them for a
/// day so that running `tart list` between two attempts does not throw away gigabytes.
fn is_young_pull_staging(entry: &fs::DirEntry) -> bool {
    const KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    let name = entry.file_name();
    let name = name.to_string_lossy();
    (name.starts_with(PULL_STAGING_PREFIX) || name.starts_with(DOWNLOAD_STAGING_PREFIX))
        && entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified.elapsed().unwrap_or_default() < KEEP)
}

/// Name prefix of pull staging directories under `tmp/`.
pub const PULL_STAGING_PREFIX: &str = "pull-";
/// Name prefix of image download staging directories under `tmp/`.
pub const DOWNLOAD_STAGING_PREFIX: &str = "download-";

/// Removes a file or a directory tree; gone already is fine.
pub(crate) fn remove_path(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) => Err(err),
    };
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A directory under `tmp/`, locked against tmp GC while we build in it, removed when dropped
/// unless it was moved into place with [`StagingDir::persist`].
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    lock: Option<FileLock>,
    /// Resumable work (a pull) keeps what it staged when it fails; the next attempt goes on.
    keep_on_drop: bool,
}

impl StagingDir {
    /// Creates the directory and locks it; it is removed when dropped unless persisted.
    pub fn create(path: PathBuf) -> Result<Self> {
        Self::lock_dir(path, || {}, false)
    }

    /// Creates or reuses a staging directory for resumable work keyed by its content, calling
    /// `on_wait` first if another process holds it, so the user learns why nothing happens.
    /// Unlike [`StagingDir::create`], a dropped one keeps its contents for the next attempt.
    pub fn resumable(path: PathBuf, on_wait: impl FnOnce()) -> Result<Self> {
        Self::lock_dir(path, on_wait, true)
    }

    /// The lock is only kept once it is known to be on the directory now at `path`: a previous
    /// holder may have renamed or removed it while we waited.
    fn lock_dir(path: PathBuf, on_wait: impl FnOnce(), keep_on_drop: bool) -> Result<Self> {
        let mut on_wait = Some(on_wait);
        loop {
            match fs::create_dir(&path) {
                Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(io_context(format!("failed to create {}", path.display()))(err));
                }
                _ => {}
            }
            let busy = match FileLock::try_exclusive(&path) {
                // Its holder moved it into place (or removed it) since we looked: start over.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                busy => busy.map_err(io_context(format!("failed to lock {}", path.display())))?,
            };
            let lock = match busy {
                Some(lock) => lock,
                None => {
                    if let Some(notify) = on_wait.take() {
                        notify();
                    }
                    match FileLock::exclusive(&path) {
                        Ok(lock) => lock,
                        Err(_) if !path.exists() => continue,
                        Err(err) => return Err(err),
                    }
                }
            };
            if lock.is_at(&path) {
                return Ok(StagingDir {
                    path,
                    lock: Some(lock),
                    keep_on_drop,
                });
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the staged directory to `target` in one rename. Without `replace` an existing
    /// `target` is an error (checked atomically by the kernel); with it the old directory is
    /// swapped out atomically and then deleted, so `target` is never missing or half-made.
    ///
    /// Durable: the staged files and directories are synced before the rename, missing parents
    /// of `target` are created synced, and the directory that receives `target` is synced after
    /// it, so after a power loss `target` is either absent (or the old one) or complete.
    pub fn persist(mut self, target: &Path, replace: bool) -> Result<()> {
        let context = || format!("failed to move {} into place", target.display());
        let parent = target.parent().unwrap_or(Path::new("/"));
        crate::copy::sync_tree(&self.path).map_err(io_context(format!("failed to sync {}", self.path.display())))?;
        crate::copy::create_dirs_durably(parent)
            .map_err(io_context(format!("failed to create {}", parent.display())))?;
        if replace && target.exists() {
            renameat2(&self.path, target, libc::RENAME_EXCHANGE).map_err(io_context(context()))?;
            // `self.path` now holds the replaced VM; dropping `self` deletes it.
            self.keep_on_drop = false;
        } else {
            match renameat2(&self.path, target, libc::RENAME_NOREPLACE) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                    let name = target.file_name().unwrap_or_default().to_string_lossy().into_owned();
                    return Err(Error::VmAlreadyExists(name));
                }
                Err(err) => return Err(io_context(context())(err)),
            }
            self.lock = None;
            self.path = PathBuf::new();
        }
        crate::copy::sync_dir(parent).map_err(io_context(format!("failed to sync {}", parent.display())))
    }
}

impl StagingDir {
    /// Removes the directory now, whatever kind it is.
    pub fn discard(mut self) {
        self.keep_on_drop = false;
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.keep_on_drop && !self.path.as_os_str().is_empty() {
            let _ = remove_path(&self.path);
        }
        self.lock = None;
    }
}

/// `renameat2(2)`: the flags give us the atomic no-clobber and swap that `rename(2)` lacks.
pub(crate) fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_moves_into_place_once_and_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let home = TartHome::open(dir.path().join("home")).unwrap();
        let target = home.vms_dir().join("vm");

        let first = home.staging_dir().unwrap();
        fs::write(first.path().join("marker"), "first").unwrap();
        first.persist(&target, false).unwrap();

        let second = home.staging_dir().unwrap();
        let second_path = second.path().to_owned();
        fs::write(second.path().join("marker"), "second").unwrap();
        let err = second.persist(&target, false).unwrap_err();
        assert!(matches!(err, Error::VmAlreadyExists(_)), "{err}");
        assert!(!second_path.exists(), "a failed staging dir is cleaned up");
        assert_eq!(fs::read_to_string(target.join("marker")).unwrap(), "first");

        let third = home.staging_dir().unwrap();
        fs::write(third.path().join("marker"), "third").unwrap();
        third.persist(&target, true).unwrap();
        assert_eq!(fs::read_to_string(target.join("marker")).unwrap(), "third");
        assert_eq!(fs::read_dir(home.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn tmp_gc_spares_locked_entries() {
        let dir = tempfile::tempdir().unwrap();
        let home = TartHome::open(dir.path().to_owned()).unwrap();
        let busy = home.staging_dir().unwrap();
        let abandoned = home.tmp_dir().join("abandoned");
        fs::create_dir(&abandoned).unwrap();
        fs::write(home.tmp_dir().join("run-disk-x"), b"x").unwrap();
        home.gc_tmp().unwrap();
        assert!(busy.path().exists());
        assert!(!abandoned.exists());
        assert!(!home.tmp_dir().join("run-disk-x").exists());
    }

    #[test]
    fn home_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = TartHome::open(file).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }
}
