//! Pushing a VM as a Tart image: config, the disk in independently compressed 512 MiB chunks
//! (compressed and uploaded in parallel, skipped when the registry already has them), NVRAM, the
//! stub OCI config and the manifest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::Descriptor;
use sha2::{Digest as _, Sha256};
use tart_home::VmDir;

use crate::manifest::{build_manifest, descriptor, oci_config_blob, sha256_digest};
use crate::media;
use crate::progress::Progress;
use crate::registry::Registry;

#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Disk chunks compressed and uploaded at once.
    pub concurrency: usize,
    /// Upload in PATCH requests of this many bytes; 0 for one PUT per blob.
    pub chunk_size: usize,
    /// OCI config labels (`--label`).
    pub labels: BTreeMap<String, String>,
    /// Blob digest → other repositories on the same registry known to hold it (from the local
    /// cache), to mount from instead of uploading.
    pub mount_from: HashMap<String, Vec<String>>,
    /// Where compressed chunks wait for their upload (`tmp/`), in unnamed files.
    pub spill_dir: PathBuf,
}

/// What was pushed.
pub struct Pushed {
    pub manifest: Bytes,
    pub digest: String,
}

/// Pushes `vm` and tags the manifest with every reference in `references`.
pub async fn push_vm(
    registry: &Registry,
    vm: &VmDir,
    references: &[String],
    options: &PushOptions,
    progress: &dyn Progress,
) -> Result<Pushed> {
    registry.authenticate(oci_client::RegistryOperation::Push).await?;
    let mut config = vm.config()?;
    // What is pushed is a Tart image, whatever format the VM was pulled in.
    config.image_format = None;

    progress.line("pushing config...");
    let config_bytes = tart_home::tart_compact_json(&config);
    let config_layer = push_small_blob(registry, media::VM_CONFIG, config_bytes, options).await?;

    progress.line("pushing disk... this will take a while...");
    let disk_path = vm.disk_path();
    let disk = Arc::new(File::open(&disk_path).with_context(|| format!("failed to open {}", disk_path.display()))?);
    let disk_size = disk.metadata()?.len();
    progress.begin(disk_size);
    let chunks = disk_size.div_ceil(media::DISK_CHUNK_SIZE);
    let claimed = &Mutex::new(HashSet::new());
    // Unordered: with an ordered window, the chunks after a slow one (data, while its
    // neighbours are zeros or already uploaded) waited for it, and a disk whose data is spread
    // out was compressed one chunk at a time.
    let disk_layers: Result<Vec<(u64, Descriptor)>> = futures_util::stream::iter(0..chunks)
        .map(|index| {
            let disk = disk.clone();
            async move {
                push_disk_chunk(registry, disk, index, disk_size, options, claimed, progress)
                    .await
                    .map(|layer| (index, layer))
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await;
    progress.end();
    let mut disk_layers = disk_layers?;
    disk_layers.sort_unstable_by_key(|(index, _)| *index);
    let disk_layers = disk_layers.into_iter().map(|(_, layer)| layer);

    progress.line("pushing NVRAM...");
    let nvram = std::fs::read(vm.nvram_path()).context("failed to read nvram.bin")?;
    let nvram_layer = push_small_blob(registry, media::NVRAM, nvram, options).await?;

    let mut labels = options.labels.clone();
    labels.insert(media::DISK_FORMAT_LABEL.into(), config.disk_format.as_str().into());
    let oci_config = oci_config_blob(config.arch.as_str(), config.os.as_str(), &labels);
    let oci_config_layer = push_small_blob(registry, media::OCI_CONFIG, oci_config, options).await?;

    let mut layers = vec![config_layer];
    layers.extend(disk_layers);
    layers.push(nvram_layer);
    let manifest = Bytes::from(build_manifest(&oci_config_layer, &layers, disk_size, &upload_time()));
    for reference in references {
        progress.line(&format!("pushing manifest for {reference}..."));
        registry
            .with_retries("pushing manifest", || {
                registry.push_manifest(reference, manifest.clone())
            })
            .await?;
    }
    Ok(Pushed {
        digest: sha256_digest(&manifest),
        manifest,
    })
}

/// Re-tags an image the target repository already has: fetch its manifest by digest and put
/// it under each new reference, byte for byte.
pub async fn retag(registry: &Registry, digest: &str, references: &[String], progress: &dyn Progress) -> Result<()> {
    let (manifest, _) = registry
        .with_retries("pulling manifest", || registry.manifest(digest))
        .await?;
    for reference in references {
        progress.line(&format!("pushing manifest for {reference}..."));
        registry
            .with_retries("pushing manifest", || {
                registry.push_manifest(reference, manifest.clone())
            })
            .await?;
    }
    Ok(())
}

fn upload_time() -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::now_utc()
        .format(format)
        .expect("a fixed format always formats")
}

async fn push_small_blob(
    registry: &Registry,
    media_type: &str,
    data: Vec<u8>,
    options: &PushOptions,
) -> Result<Descriptor> {
    let digest = sha256_digest(&data);
    let data = Bytes::from(data);
    registry
        .with_retries("pushing blob", || {
            registry.push_blob(data.clone(), &digest, options.chunk_size)
        })
        .await?;
    Ok(descriptor(media_type, data.len() as u64, &digest, HashMap::new()))
}

/// `claimed`: digests another chunk of this push already uploads, so identical chunks (all-zero
/// ones above all) go up once.
async fn push_disk_chunk(
    registry: &Registry,
    disk: Arc<File>,
    index: u64,
    disk_size: u64,
    options: &PushOptions,
    claimed: &Mutex<HashSet<String>>,
    progress: &dyn Progress,
) -> Result<Descriptor> {
    let offset = index * media::DISK_CHUNK_SIZE;
    let length = media::DISK_CHUNK_SIZE.min(disk_size - offset);
    let spill_dir = options.spill_dir.clone();
    let (compressed, uncompressed_digest) =
        tokio::task::spawn_blocking(move || compress_chunk(&disk, offset, length, &spill_dir))
            .await?
            .with_context(|| format!("failed to compress disk.img at offset {offset}"))?;
    let digest = compressed.digest.clone();
    let first = claimed.lock().expect("claim set poisoned").insert(digest.clone());
    registry
        .with_retries("pushing disk", || async {
            if !first {
                return Ok(());
            }
            if registry.blob_exists(&digest).await? {
                return Ok(());
            }
            for namespace in options
                .mount_from
                .get(&digest)
                .into_iter()
                .flatten()
                .filter(|ns| *ns != registry.namespace())
            {
                if registry.mount(&digest, namespace).await && registry.blob_exists(&digest).await? {
                    return Ok(());
                }
            }
            registry
                .push_blob_file(compressed.file.clone(), compressed.len, &digest, options.chunk_size)
                .await
        })
        .await?;
    progress.advance(length);
    let annotations = HashMap::from([
        (media::UNCOMPRESSED_SIZE.to_owned(), length.to_string()),
        (media::UNCOMPRESSED_CONTENT_DIGEST.to_owned(), uncompressed_digest),
    ]);
    Ok(descriptor(media::DISK_V2, compressed.len, &digest, annotations))
}

/// A compressed chunk waiting for its upload in an unnamed file of `tmp/` (gone when closed,
/// also when tart is killed): an incompressible chunk is as large as the disk chunk, and
/// `--concurrency` of them in memory would cost gigabytes.
struct Spilled {
    file: Arc<File>,
    len: u64,
    digest: String,
}

/// Counts and hashes what passes through to the spill file.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hasher.update(&data[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads one chunk in pieces, hashing and compressing as it goes into a spill file in
/// `spill_dir`. Holes are not read (zeros come from memory), and a chunk that is all hole is
/// the same precomputed blob every time: most of a VM disk is holes.
fn compress_chunk(disk: &File, offset: u64, length: u64, spill_dir: &Path) -> std::io::Result<(Spilled, String)> {
    let spill = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(spill_dir)?;
    let mut output = Hashing {
        inner: BufWriter::with_capacity(1 << 20, spill),
        hasher: Sha256::new(),
        len: 0,
    };
    let mut data_at = tart_home::seek_data(disk, offset)?;
    let uncompressed_digest = if length == media::DISK_CHUNK_SIZE && data_at >= offset + length {
        let (compressed, digest) = zero_chunk();
        output.write_all(compressed)?;
        digest.clone()
    } else {
        let mut encoder = apple_lz4::Encoder::new(&mut output);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; PIECE];
        let mut done = 0u64;
        while done < length {
            let position = offset + done;
            let n = (length - done).min(PIECE as u64) as usize;
            if data_at < position {
                data_at = tart_home::seek_data(disk, position)?;
            }
            let piece = if data_at >= position + n as u64 {
                &ZEROS[..n]
            } else {
                disk.read_exact_at(&mut buffer[..n], position)?;
                &buffer[..n]
            };
            hasher.update(piece);
            encoder.write_all(piece)?;
            done += n as u64;
        }
        encoder.finish()?;
        format!("sha256:{:x}", hasher.finalize())
    };
    let Hashing { inner, hasher, len } = output;
    let spilled = Spilled {
        file: Arc::new(inner.into_inner().map_err(|err| err.into_error())?),
        len,
        digest: format!("sha256:{:x}", hasher.finalize()),
    };
    Ok((spilled, uncompressed_digest))
}

const PIECE: usize = 4 << 20;
static ZEROS: [u8; PIECE] = [0; PIECE];

/// The compressed blob and uncompressed digest of a 512 MiB all-zero chunk.
fn zero_chunk() -> &'static (Vec<u8>, String) {
    static ZERO_CHUNK: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    ZERO_CHUNK.get_or_init(|| {
        let mut encoder = apple_lz4::Encoder::new(Vec::new());
        for _ in 0..media::DISK_CHUNK_SIZE / PIECE as u64 {
            encoder.write_all(&ZEROS).expect("writing to memory cannot fail");
        }
        let compressed = encoder.finish().expect("writing to memory cannot fail");
        (compressed, crate::reuse::ZEROS_512_MIB.to_owned())
    })
}
