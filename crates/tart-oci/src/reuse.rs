//! Disk chunks that need no download: all-zero chunks, and chunks that an image already in the
//! cache holds (§4.9 of the spec). Matching is by *uncompressed* digest and size, so it works
//! across images compressed by different tools (Apple's and our LZ4 bytes differ) and across
//! formats (a vetu image's chunk from a Tart image and back, where their chunks cut the disk at
//! the same places); every reused chunk is verified against the manifest before it counts.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::format::ImageManifest;
use crate::manifest::DiskLayer;
use crate::OciCache;

/// Digest of 512 MiB of zeros, the chunk every sparse disk is mostly made of.
pub(crate) const ZEROS_512_MIB: &str = "sha256:9acca8e8c22201155389f65abbf6bc9723edc7384ead80503839f49dcc56d767";

/// Whether the chunk is all zeros, decided from the manifest alone.
pub fn is_zero_chunk(layer: &DiskLayer) -> bool {
    // LZ4 shrinks zeros about 250-fold; anything less compressible cannot be all zeros, and
    // this spares hashing zeros for every ordinary chunk.
    if layer.descriptor.size().saturating_mul(100) > layer.uncompressed_size {
        return false;
    }
    if layer.uncompressed_size == crate::media::DISK_CHUNK_SIZE {
        return layer.uncompressed_digest == ZEROS_512_MIB;
    }
    let zeros = vec![0u8; 1 << 20];
    let mut hasher = Sha256::new();
    let mut left = layer.uncompressed_size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        hasher.update(&zeros[..n]);
        left -= n as u64;
    }
    format!("sha256:{:x}", hasher.finalize()) == layer.uncompressed_digest
}

/// Chunks held by cached images, by (uncompressed digest, size).
pub struct LocalChunks {
    chunks: HashMap<(String, u64), (PathBuf, u64)>,
}

impl LocalChunks {
    /// Indexes every cached image that has a stored manifest.
    pub fn scan(cache: &OciCache) -> Self {
        let mut chunks = HashMap::new();
        for entry in cache.entries().unwrap_or_default().into_iter().filter(|e| !e.is_tag) {
            let Ok(bytes) = std::fs::read(entry.vm.path().join("manifest.json")) else {
                continue;
            };
            let Ok(manifest) = ImageManifest::parse(&bytes) else {
                continue;
            };
            for layer in manifest.disk_layers() {
                chunks
                    .entry((layer.uncompressed_digest, layer.uncompressed_size))
                    .or_insert((entry.vm.disk_path(), layer.offset));
            }
        }
        LocalChunks { chunks }
    }

    pub fn find(&self, layer: &DiskLayer) -> Option<(&Path, u64)> {
        self.chunks
            .get(&(layer.uncompressed_digest.clone(), layer.uncompressed_size))
            .map(|(path, offset)| (path.as_path(), *offset))
    }
}

/// Copies a chunk from a local image into `disk` (a reflink where the filesystem can) and
/// checks it against the manifest. `false` means it did not match and the range was cleared.
pub fn copy_verified(source: &Path, source_offset: u64, disk: &File, layer: &DiskLayer) -> std::io::Result<bool> {
    crate::sink::punch_hole(disk, layer.offset, layer.uncompressed_size)?;
    let source = File::open(source)?;
    tart_home::copy_sparse_range(&source, source_offset, disk, layer.offset, layer.uncompressed_size)?;
    if range_digest(disk, layer.offset, layer.uncompressed_size)? == layer.uncompressed_digest {
        return Ok(true);
    }
    crate::sink::punch_hole(disk, layer.offset, layer.uncompressed_size)?;
    Ok(false)
}

fn range_digest(file: &File, offset: u64, len: u64) -> std::io::Result<String> {
    let mut buffer = vec![0u8; 4 << 20];
    let mut hasher = Sha256::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buffer.len() as u64) as usize;
        file.read_exact_at(&mut buffer[..n], offset + done)?;
        hasher.update(&buffer[..n]);
        done += n as u64;
    }
    Ok(format!("sha256:{:x}", hasher.finalize()))
}
