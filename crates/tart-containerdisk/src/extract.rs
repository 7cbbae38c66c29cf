//! Applying an image's layers in order and keeping only what lies under `/disk`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tar::EntryType;

use crate::layer::{decompressed, Bounded, Budget, Compression, Hashing};
use crate::member::{write_sparse, Checksum};
use crate::names::{entry_path, is_within, link_target, parent, whiteout, Whiteout, DISK_DIR};

/// Decompressed bytes a layer may have beyond its disk files: tar headers and padding, and the
/// files outside `/disk` that images based on something other than `scratch` carry (a legacy
/// `container-disk-v1alpha` base is a few MB, a distribution base a few hundred). Disk files
/// are bounded by their own stated sizes, each checked against the space free for it.
pub const NON_DISK_ALLOWANCE: u64 = 1 << 30;

/// Prefix of the files disk candidates are written to in the staging directory.
const PART_PREFIX: &str = "containerdisk-";

/// A file written from a layer.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    /// Of its bytes, when the image states one for its disk.
    checksum: Option<String>,
}

#[derive(Clone, Debug)]
enum Node {
    File(Arc<Part>),
    Symlink(String),
    /// A hard link to a file outside `/disk`, whose bytes were not kept.
    LinkOutside(String),
}

/// The `/disk` directory of an image, built up layer by layer.
pub struct Extractor {
    staging: PathBuf,
    layers: usize,
    /// Every path below `/disk`, with the index of the layer that made it.
    nodes: BTreeMap<String, (usize, Node)>,
    /// Every file written, to be removed unless it is the disk.
    parts: Vec<PathBuf>,
    /// The disk's checksum as the image's `shasum` label states it.
    shasum: Option<String>,
    /// [`NON_DISK_ALLOWANCE`], smaller in unit tests.
    pub(crate) allowance: u64,
}

impl Extractor {
    /// Extracts into `staging`, removing what an earlier, interrupted attempt left there.
    pub fn new(staging: &Path) -> Result<Extractor> {
        let leftovers = fs::read_dir(staging).with_context(|| format!("failed to list {}", staging.display()))?;
        for entry in leftovers {
            let path = entry
                .with_context(|| format!("failed to list {}", staging.display()))?
                .path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(PART_PREFIX) || name == "disk.img" {
                fs::remove_file(&path).with_context(|| format!("failed to remove {}", path.display()))?;
            }
        }
        Ok(Extractor {
            staging: staging.to_owned(),
            layers: 0,
            nodes: BTreeMap::new(),
            parts: Vec::new(),
            shasum: None,
            allowance: NON_DISK_ALLOWANCE,
        })
    }

    /// Checks the disk against `shasum` (the label kubevirt/containerdisks sets to the upstream
    /// checksum of the disk file: SHA-256, or SHA-512 for Debian). A label that is no such
    /// checksum (another tool's `shasum`) is ignored, and so is `None`.
    pub fn check_shasum(&mut self, shasum: Option<&str>) {
        self.shasum = shasum
            .filter(|value| Checksum::for_label(value).is_some())
            .map(str::to_owned);
    }

    /// Applies the next layer, read from `layer` (its compressed bytes) to the end of its
    /// compressed stream, checked against `diff_id` (the image config's digest of the layer's
    /// uncompressed tar) when given: a layer's blob digest vouches only for what the publisher
    /// compressed, and zstd frames carry no checksum of their own by default.
    pub fn apply_layer(&mut self, layer: &mut dyn Read, compression: Compression, diff_id: Option<&str>) -> Result<()> {
        let budget = Budget::new(self.allowance);
        let bounded = Bounded {
            inner: Hashing::new(decompressed(layer, compression)?),
            budget: budget.clone(),
        };
        let mut archive = tar::Archive::new(bounded);
        let applied = self.apply_entries(&mut archive, &budget).and_then(|()| {
            // The zero blocks after the tar's end belong to the uncompressed digest too.
            let mut rest = archive.into_inner();
            io::copy(&mut rest, &mut io::sink()).map_err(tar_error)?;
            let actual = rest.inner.digest();
            match diff_id {
                Some(expected) if expected != actual => bail!(
                    "its uncompressed content has digest {actual}, but the image config says {expected} \
                     (rootfs.diff_ids): the image is corrupt"
                ),
                _ => Ok(()),
            }
        });
        self.layers += 1;
        if budget.exceeded() {
            bail!(
                "the layer decompresses to more than {} bytes, past what its disk files state plus {} MiB \
                 for everything else: a decompression bomb or a broken image; refusing it",
                budget.limit(),
                self.allowance >> 20
            );
        }
        applied
    }

    fn apply_entries<R: Read>(&mut self, archive: &mut tar::Archive<R>, budget: &Rc<Budget>) -> Result<()> {
        let layer = self.layers;
        for entry in archive.entries().map_err(tar_error)? {
            let mut entry = entry.map_err(tar_error)?;
            let path = entry_path(&String::from_utf8_lossy(&entry.path_bytes()))?;
            let kind = entry.header().entry_type();
            let link = match kind {
                EntryType::Symlink | EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|name| String::from_utf8_lossy(&name).into_owned())
                        .unwrap_or_default();
                    let base = if kind == EntryType::Symlink { parent(&path) } else { "" };
                    let resolved = link_target(base, &target).ok_or_else(|| {
                        anyhow!("/{path} links to {target:?}, outside the image root; refusing the image")
                    })?;
                    Some(resolved)
                }
                _ => None,
            };
            if let Some(hidden) = whiteout(&path) {
                self.hide(hidden, layer);
                continue;
            }
            if !is_within(&path, DISK_DIR) || path == DISK_DIR {
                continue;
            }
            // A directory merges with what lower layers have below it; anything else replaces
            // what was at its path, in any layer, and whatever was below it.
            if kind == EntryType::Directory {
                self.nodes.remove(&path);
            } else {
                self.nodes.retain(|existing, _| !is_within(existing, &path));
            }
            let node = match (kind, link) {
                (EntryType::Regular | EntryType::Continuous, _) => {
                    let size = entry.size();
                    let free = tart_home::prune::free_bytes(&self.staging)
                        .with_context(|| format!("failed to read the free space of {}", self.staging.display()))?;
                    // Checked against its header and the free space before most of it is read.
                    budget.allow(size);
                    let part = self.staging.join(format!("{PART_PREFIX}{}.part", self.parts.len()));
                    self.parts.push(part.clone());
                    let checksum = self.shasum.as_deref().and_then(Checksum::for_label);
                    let checksum = write_sparse(&mut entry, size, &path, &part, free, checksum)?;
                    Node::File(Arc::new(Part { path: part, checksum }))
                }
                (EntryType::Symlink, Some(target)) => Node::Symlink(target),
                (EntryType::Link, Some(target)) if is_within(&target, DISK_DIR) => {
                    let (_, node) = self
                        .nodes
                        .get(&target)
                        .ok_or_else(|| anyhow!("/{path} is a hard link to /{target}, which the image does not have"))?;
                    node.clone()
                }
                (EntryType::Link, Some(target)) => Node::LinkOutside(target),
                // Directories need no node: paths below them are kept for themselves. Devices
                // and FIFOs cannot be disks, and GNU sparse files are not what image tools write.
                _ => continue,
            };
            self.nodes.insert(path, (layer, node));
        }
        Ok(())
    }

    /// Applies a whiteout of `layer`: it hides only what layers below it made.
    fn hide(&mut self, hidden: Whiteout, layer: usize) {
        self.nodes.retain(|path, (made_by, _)| {
            let hides = match &hidden {
                Whiteout::Path(hidden) => is_within(path, hidden),
                Whiteout::Contents(dir) => is_within(path, dir) && path != dir,
            };
            !(hides && *made_by < layer)
        });
    }

    /// The disk file of the image, as `(path in the image, file in the staging directory)`:
    /// `wanted` (a path from [`crate::disk_file`]) when given, else the only file in `/disk`
    /// (KubeVirt's rule). Every other file written is removed.
    pub fn into_disk(mut self, wanted: Option<&str>) -> Result<(String, PathBuf)> {
        let mut disks: Vec<(&str, &Arc<Part>)> = Vec::new();
        let mut unusable = Vec::new();
        for (path, (_, node)) in &self.nodes {
            match self.resolve(node) {
                Ok(part) if !disks.iter().any(|(_, known)| Arc::ptr_eq(known, part)) => disks.push((path, part)),
                Ok(_) => {}
                Err(why) => unusable.push(format!("/{path} {why}")),
            }
        }
        let listed = |disks: &[(&str, &Arc<Part>)]| {
            disks
                .iter()
                .map(|(path, _)| format!("/{path}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let chosen = match (wanted, disks.as_slice()) {
            (Some(wanted), disks) => match disks.iter().find(|(path, _)| *path == wanted) {
                Some((path, part)) => Ok((path.to_string(), Arc::clone(part))),
                None => Err(anyhow!(
                    "the image has no disk file /{wanted}; its files in /disk: {}",
                    if disks.is_empty() { "none".to_owned() } else { listed(disks) }
                )),
            },
            (None, [(path, part)]) => Ok((path.to_string(), Arc::clone(part))),
            (None, []) if unusable.is_empty() => Err(anyhow!(
                "no file found in folder /disk, no disk present: this is not a containerDisk (it holds its VM disk under /disk/)"
            )),
            (None, []) => Err(anyhow!(
                "no file found in folder /disk, no disk present: {}",
                unusable.join("; ")
            )),
            (None, several) => Err(anyhow!(
                "more than one file found in folder /disk, only one disk is allowed: {} \
                 (choose one with --containerdisk-path)",
                listed(several)
            )),
        };
        let chosen = chosen.and_then(|(path, part)| match (&self.shasum, &part.checksum) {
            (Some(expected), Some(actual)) if expected != actual => Err(anyhow!(
                "/{path} has checksum {actual}, but the image's shasum label says {expected}: \
                 it is not the disk its publisher built the image from; refusing it"
            )),
            _ => Ok((path, part.path.clone())),
        });
        if let Ok((_, kept)) = &chosen {
            self.parts.retain(|part| part != kept);
        }
        chosen
    }

    /// The file a node in `/disk` stands for, following symlinks inside `/disk`.
    fn resolve<'a>(&'a self, mut node: &'a Node) -> std::result::Result<&'a Arc<Part>, String> {
        // Linux's limit on symlinks followed in one lookup.
        const MAX_HOPS: usize = 40;
        for _ in 0..MAX_HOPS {
            match node {
                Node::File(part) => return Ok(part),
                Node::LinkOutside(target) => {
                    return Err(format!(
                        "is a hard link to /{target}, outside /disk, which tart does not read"
                    ))
                }
                Node::Symlink(target) => match self.nodes.get(target) {
                    Some((_, next)) => node = next,
                    None if is_within(target, DISK_DIR) => {
                        return Err(format!("is a symlink to /{target}, which does not exist"))
                    }
                    None => {
                        return Err(format!(
                            "is a symlink to /{target}, outside /disk, which tart does not read"
                        ))
                    }
                },
            }
        }
        Err(format!("is a symlink in a loop of more than {MAX_HOPS}"))
    }
}

/// Whatever went wrong, the files written for candidates that were not chosen do not stay.
impl Drop for Extractor {
    fn drop(&mut self) {
        for part in &self.parts {
            let _ = fs::remove_file(part);
        }
    }
}

/// Decompression errors reach us through the tar reader as I/O errors, like its own.
fn tar_error(err: std::io::Error) -> anyhow::Error {
    anyhow!("its data is corrupt or truncated ({err}): the image is broken")
}
