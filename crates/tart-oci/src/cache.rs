use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tart_home::prune::{self, Candidate};
use tart_home::{TartHome, VmDir};

use crate::{Reference, RemoteName};

/// Marks an image pulled by digest, which GC keeps although no tag points to it.
pub(crate) const EXPLICITLY_PULLED: &str = ".explicitly-pulled";

/// The OCI image cache, `cache/OCIs/<host>/<namespace…>/{sha256:<hex>/, <tag> -> sha256:<hex>}`.
#[derive(Clone, Debug)]
pub struct OciCache {
    root: PathBuf,
}

/// One image in the cache as `tart list` shows it: a tag symlink or a digest directory.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    pub name: String,
    pub vm: VmDir,
    /// Tags are symlinks; only digest directories hold data (and are what pruning deletes).
    pub is_tag: bool,
}

impl OciCache {
    pub fn new(root: PathBuf) -> Self {
        OciCache { root }
    }

    /// Where `name` lives in the cache. Only the host's `:` is percent-encoded, as in Tart.
    pub fn path_for(&self, name: &RemoteName) -> PathBuf {
        let mut path = self.root.join(name.host.replace(':', "%3A"));
        path.extend(name.namespace.split('/'));
        path.push(name.reference.value());
        path
    }

    /// The cached image for `name`, if it is there and complete.
    pub fn open(&self, name: &RemoteName) -> Option<VmDir> {
        let vm = VmDir::new(self.path_for(name));
        vm.is_initialized().then_some(vm)
    }

    /// `tart fqn`: the digest a cached tag points to, as a full name.
    pub fn fqn(&self, name: &RemoteName) -> Result<RemoteName, String> {
        if let Reference::Digest(_) = name.reference {
            return Ok(name.clone());
        }
        let not_digest = || format!("OCI storage error: {name} is not a digest and doesn't point to a digest");
        let target = fs::read_link(self.path_for(name)).map_err(|_| not_digest())?;
        let digest = target
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.starts_with("sha256:"))
            .ok_or_else(not_digest)?;
        Ok(name.with_digest(digest))
    }

    /// Every tag and digest entry whose image is complete, sorted by name.
    pub fn entries(&self) -> io::Result<Vec<CacheEntry>> {
        let mut entries = Vec::new();
        for host in read_dir_or_empty(&self.root)? {
            let host_name = host.file_name().to_string_lossy().replace("%3A", ":");
            collect_entries(&host.path(), &host_name, &mut entries)?;
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Digest directories, the only cache entries that hold data, as pruning candidates.
    pub fn prune_candidates(&self) -> io::Result<Vec<Candidate<PathBuf>>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|entry| !entry.is_tag)
            .map(|entry| Candidate {
                accessed: entry.vm.access_date(),
                allocated_bytes: entry.vm.allocated_bytes().unwrap_or(0),
                key: entry.vm.path().to_owned(),
            })
            .collect())
    }

    /// Deletes the given digest directories, then the tags left dangling.
    pub fn remove_images(&self, digest_dirs: &[PathBuf]) -> io::Result<()> {
        let _lock = self.lock()?;
        for dir in digest_dirs {
            remove_dir_if_present(dir)?;
        }
        self.gc_locked()
    }

    /// Serialises the changes to which images are reachable: an image moved into the cache
    /// and its tag link are made under this lock, and garbage collection runs under it, so
    /// another process's collection never sees (and deletes) an image whose tag is not made
    /// yet. Held for moments only.
    pub(crate) fn lock(&self) -> io::Result<tart_home::FileLock> {
        fs::create_dir_all(&self.root)?;
        tart_home::FileLock::exclusive(&self.root).map_err(io::Error::other)
    }

    /// Automatic pruning (§6.3): makes room for `required` bytes by deleting the least recently
    /// used images, never `initiator` (the image being cloned or pulled).
    pub fn reclaim_if_needed(&self, required: u64, initiator: Option<&Path>) -> io::Result<Vec<PathBuf>> {
        let free = prune::free_bytes(&self.root)?;
        let candidates: Vec<_> = self
            .prune_candidates()?
            .into_iter()
            .filter(|c| Some(c.key.as_path()) != initiator)
            .collect();
        let doomed = prune::to_reclaim(&candidates, required, free);
        self.remove_images(&doomed)?;
        Ok(doomed)
    }

    /// For each blob digest listed in a cached manifest from `host`, the repositories that hold
    /// it there: a push can ask the registry to mount such blobs instead of uploading them.
    pub fn blob_sources(&self, host: &str) -> HashMap<String, Vec<String>> {
        let host_dir = self.root.join(host.replace(':', "%3A"));
        let mut sources: HashMap<String, Vec<String>> = HashMap::new();
        let _ = walk_cache(&host_dir, &mut |path, meta| {
            if meta.is_symlink() {
                return Ok(());
            }
            let Ok(bytes) = fs::read(path.join("manifest.json")) else {
                return Ok(());
            };
            let Ok(crate::manifest::TartManifest {
                disk: crate::manifest::DiskLayers::V2(layers),
                ..
            }) = crate::manifest::TartManifest::parse(&bytes)
            else {
                return Ok(());
            };
            let namespace = path
                .parent()
                .and_then(|p| p.strip_prefix(&host_dir).ok())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            for layer in layers {
                let holders = sources.entry(layer.descriptor.digest().to_string()).or_default();
                if !holders.contains(&namespace) {
                    holders.push(namespace.clone());
                }
            }
            Ok(())
        });
        sources
    }

    /// `push --populate-cache`: stores a copy of the pushed VM as the image `digest_name`, with
    /// its manifest, and points `tags` at it.
    pub fn populate(
        &self,
        home: &TartHome,
        vm: &VmDir,
        digest_name: &RemoteName,
        manifest: &[u8],
        tags: &[RemoteName],
    ) -> anyhow::Result<()> {
        let image_dir = self.path_for(digest_name);
        let staged = if VmDir::new(image_dir.clone()).is_initialized() {
            None
        } else {
            let staging = home.staging_dir()?;
            vm.copy_files_into(staging.path(), false)?;
            fs::write(staging.path().join("manifest.json"), manifest)?;
            Some(staging)
        };
        let _lock = self.lock()?;
        if let Some(staging) = staged {
            match staging.persist(&image_dir, false) {
                Ok(()) | Err(tart_home::Error::VmAlreadyExists(_)) => {}
                Err(err) => return Err(err.into()),
            }
        }
        anyhow::ensure!(
            VmDir::new(image_dir.clone()).is_initialized(),
            "{digest_name} was removed from the cache by another tart process before it could be tagged"
        );
        for tag in tags.iter().filter(|t| matches!(t.reference, Reference::Tag(_))) {
            crate::pull::link(&self.path_for(tag), &image_dir)?;
        }
        VmDir::new(image_dir).set_access_date(tart_home::AccessDate::Now)?;
        Ok(())
    }

    /// Removes a tag or a digest entry, then collects what became unreachable.
    pub fn delete(&self, name: &RemoteName) -> io::Result<bool> {
        let path = self.path_for(name);
        let _lock = self.lock()?;
        let removed = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&path).map(|_| true)?,
            Ok(_) => fs::remove_file(&path).map(|_| true)?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            Err(err) => return Err(err),
        };
        self.gc_locked()?;
        Ok(removed)
    }

    /// Tart's cache GC: drop dangling tag symlinks, then every digest directory that no tag
    /// points to and that was not pulled explicitly by digest.
    pub fn gc(&self) -> io::Result<()> {
        let _lock = self.lock()?;
        self.gc_locked()
    }

    /// [`OciCache::gc`] for callers that hold [`OciCache::lock`]. Entries that vanish while it
    /// looks (another process's temporary tag link, renamed into place) are passed over.
    pub(crate) fn gc_locked(&self) -> io::Result<()> {
        let mut digest_dirs = Vec::new();
        let mut incoming: HashMap<PathBuf, usize> = HashMap::new();
        walk_cache(&self.root, &mut |path, meta| {
            if meta.is_symlink() {
                match fs::canonicalize(path) {
                    Ok(target) => *incoming.entry(target).or_default() += 1,
                    Err(_) => match fs::remove_file(path) {
                        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                        _ => {}
                    },
                }
            } else if is_digest_dir(path) {
                digest_dirs.push(path.to_owned());
            }
            Ok(())
        })?;
        for dir in digest_dirs {
            let linked = fs::canonicalize(&dir).is_ok_and(|real| incoming.contains_key(&real));
            if !linked && !dir.join(EXPLICITLY_PULLED).exists() {
                remove_dir_if_present(&dir)?;
            }
        }
        Ok(())
    }
}

fn is_digest_dir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("sha256:"))
}

fn remove_dir_if_present(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        result => result,
    }
}

fn read_dir_or_empty(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.collect(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

/// Visits tag symlinks and digest directories below `dir`, descending through namespace
/// directories but never following symlinks.
fn walk_cache(dir: &Path, visit: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    for entry in read_dir_or_empty(dir)? {
        let path = entry.path();
        let meta = match fs::symlink_metadata(&path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            meta => meta?,
        };
        if meta.is_symlink() || is_digest_dir(&path) {
            visit(&path, &meta)?;
        } else if meta.is_dir() {
            walk_cache(&path, visit)?;
        }
    }
    Ok(())
}

fn collect_entries(host_dir: &Path, host: &str, entries: &mut Vec<CacheEntry>) -> io::Result<()> {
    walk_cache(host_dir, &mut |path, meta| {
        let vm = VmDir::new(path.to_owned());
        if !vm.is_initialized() {
            return Ok(());
        }
        let relative = path
            .strip_prefix(host_dir)
            .expect("walk stays below the host directory");
        let reference = relative.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let namespace = relative
            .parent()
            .unwrap_or(Path::new(""))
            .to_string_lossy()
            .into_owned();
        let separator = if is_digest_dir(path) { '@' } else { ':' };
        entries.push(CacheEntry {
            name: format!("{host}/{namespace}{separator}{reference}"),
            vm,
            is_tag: meta.is_symlink(),
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_image(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for file in ["config.json", "disk.img", "nvram.bin"] {
            fs::write(dir.join(file), b"x").unwrap();
        }
    }

    #[test]
    fn lists_resolves_and_collects_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = OciCache::new(tmp.path().to_owned());
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        let tagged: RemoteName = "localhost:5000/org/vm:v1".parse().unwrap();
        let digest_dir = cache.path_for(&tagged.with_digest(&d1));
        fake_image(&digest_dir);
        std::os::unix::fs::symlink(&digest_dir, cache.path_for(&tagged)).unwrap();
        let orphan = cache.path_for(&tagged.with_digest(&d2));
        fake_image(&orphan);

        assert!(digest_dir.starts_with(tmp.path().join("localhost%3A5000/org/vm")));
        let names: Vec<String> = cache.entries().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "localhost:5000/org/vm:v1".to_string(),
                format!("localhost:5000/org/vm@{d1}"),
                format!("localhost:5000/org/vm@{d2}"),
            ]
        );
        assert_eq!(
            cache.fqn(&tagged).unwrap().to_string(),
            format!("localhost:5000/org/vm@{d1}")
        );

        cache.gc().unwrap();
        assert!(!orphan.exists(), "unreferenced digest dir is collected");
        assert!(digest_dir.exists());

        assert!(cache.delete(&tagged).unwrap());
        assert!(!digest_dir.exists(), "deleting the last tag collects its image");
        assert!(cache.entries().unwrap().is_empty());
    }
}
