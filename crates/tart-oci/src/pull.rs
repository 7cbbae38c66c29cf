//! Pulling a Tart image into the OCI cache: every blob checked against its digest, every disk
//! chunk against its uncompressed digest, resumable from a staging directory keyed by the
//! manifest digest (so two images can never mix), with layers fetched in parallel.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{anyhow, bail, ensure, Context, Result};
use apple_lz4::PushDecoder;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::Descriptor;
use sha2::{Digest as _, Sha256};
use tart_home::{AccessDate, Arch, ImageFormat, StagingDir, TartHome, VmDir, PULL_STAGING_PREFIX};
use tokio::sync::mpsc;

use crate::cache::EXPLICITLY_PULLED;
use crate::format::ImageManifest;
use crate::manifest::{sha256_digest, DiskCodec, DiskLayer, DiskLayers, TartManifest};
use crate::platform;
use crate::progress::Progress;
use crate::registry::Registry;
use crate::retry::Retries;
use crate::reuse::{copy_verified, is_zero_chunk, LocalChunks};
use crate::sink::DiskImage;
use crate::{OciCache, Reference, RemoteName};

#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Layers downloaded at once.
    pub concurrency: usize,
    /// Make room in the cache before pulling (unless `TART_NO_AUTO_PRUNE`).
    pub auto_prune: bool,
    /// The platform taken from a multi-arch index (`--arch`); the host's when `None`.
    pub arch: Option<Arch>,
    /// The file of a containerDisk to use as the disk (`--containerdisk-path`), where it has
    /// several.
    pub containerdisk_path: Option<String>,
}

/// Room kept free beyond the image itself, as Tart does.
const PRUNE_RESERVE: u64 = 128 << 20;

/// Pulls `name` into the cache and returns the cached image.
pub async fn pull(
    home: &TartHome,
    cache: &OciCache,
    registry: &Registry,
    name: &RemoteName,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<VmDir> {
    // An index names one manifest per platform: the image is that manifest, cached under its
    // digest, which the tag then points to.
    let (manifest_bytes, digest) = platform::resolve(registry, name.reference.value(), options.arch, progress).await?;
    let manifest = ImageManifest::parse(&manifest_bytes)?;
    let digest_name = name.with_digest(&digest);
    let image_dir = cache.path_for(&digest_name);
    let by_tag = matches!(name.reference, Reference::Tag(_));
    let tag_path = cache.path_for(name);
    let chosen_disk = crate::containerdisk::check_disk_choice(
        &digest_name,
        manifest.format(),
        options.containerdisk_path.as_deref(),
        &image_dir,
    )?;

    let cached = |dir: &Path| VmDir::new(dir.to_owned()).is_initialized();
    // Taken before the image moves into the cache, so that no other process's garbage
    // collection sees it untagged.
    let mut cache_lock = None;
    if cached(&image_dir) && (!by_tag || fs::canonicalize(&tag_path).ok() == fs::canonicalize(&image_dir).ok()) {
        progress.line(&format!("{digest_name} image is already cached and linked!"));
    } else if cached(&image_dir) {
        progress.line(&format!("{digest_name} image is already cached! creating a symlink..."));
    } else {
        let staging_path = staging_path(home, &digest);
        // The staging directory's lock is the per-image lock: a second pull of the same image
        // waits here, then finds it cached; pulls of other images go on in parallel.
        let staging = tokio::task::spawn_blocking(move || {
            StagingDir::resumable(staging_path, || eprintln!("waiting for lock..."))
        })
        .await??;
        if cached(&image_dir) {
            // Another pull finished it while we waited for its lock.
            staging.discard();
            progress.line(&format!("{digest_name} image is already cached! creating a symlink..."));
        } else {
            if by_tag {
                // The image the tag pointed to so far goes first when space is needed.
                if let Ok(previous) = fs::canonicalize(&tag_path) {
                    let _ = VmDir::new(previous).set_access_date(AccessDate::At(SystemTime::UNIX_EPOCH));
                }
            }
            if options.auto_prune {
                if let Some(size) = manifest.uncompressed_disk_size() {
                    cache
                        .reclaim_if_needed(size + PRUNE_RESERVE, None)
                        .context("failed to prune the OCI cache")?;
                }
            }
            match &manifest {
                ImageManifest::Tart(tart) => {
                    download(
                        registry,
                        cache,
                        tart,
                        &manifest_bytes,
                        staging.path(),
                        options,
                        progress,
                    )
                    .await?
                }
                ImageManifest::Vetu(vetu) => {
                    crate::vetu::download(
                        registry,
                        cache,
                        vetu,
                        &manifest_bytes,
                        staging.path(),
                        options,
                        progress,
                    )
                    .await?
                }
                ImageManifest::ContainerDisk => {
                    crate::containerdisk::download(
                        registry,
                        &manifest_bytes,
                        chosen_disk.as_deref(),
                        staging.path(),
                        progress,
                    )
                    .await?
                }
            }
            adopt_config(staging.path(), manifest.format(), progress)?;
            cache_lock = Some(cache.lock().context("OCI storage error")?);
            match staging.persist(&image_dir, false) {
                Ok(()) | Err(tart_home::Error::VmAlreadyExists(_)) => {}
                Err(err) => return Err(err.into()),
            }
        }
    }

    let _cache_lock = match cache_lock {
        Some(lock) => lock,
        None => cache.lock().context("OCI storage error")?,
    };
    ensure!(
        cached(&image_dir),
        "{digest_name} was removed from the cache (pruned by another tart process?) before it could be linked; pull it again"
    );
    let image = VmDir::new(image_dir.clone());
    if by_tag {
        link(&tag_path, &image_dir)?;
        cache.gc_locked().context("OCI storage error")?;
    } else {
        File::create(image_dir.join(EXPLICITLY_PULLED)).context("failed to mark the image as pulled by digest")?;
    }
    image.set_access_date(AccessDate::Now)?;
    Ok(image)
}

/// Points the tag at the image with one rename, so the tag is never missing.
pub(crate) fn link(tag_path: &Path, image_dir: &Path) -> Result<()> {
    let temporary = tag_path.with_file_name(format!(".{}.link-{}", file_name(tag_path), std::process::id()));
    let _ = fs::remove_file(&temporary);
    std::os::unix::fs::symlink(image_dir, &temporary)
        .and_then(|()| fs::rename(&temporary, tag_path))
        .with_context(|| format!("failed to link {}", tag_path.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// Records in the pulled VM's config which format it came in (`tart list`/`get` show it; Tart's
/// own configs stay as pushed), and says so when the VM will run emulated.
fn adopt_config(staging: &Path, format: ImageFormat, progress: &dyn Progress) -> Result<()> {
    let vm = VmDir::new(staging.to_owned());
    let mut config = vm.config()?;
    if format != ImageFormat::Tart && config.image_format != Some(format) {
        config.image_format = Some(format);
        vm.save_config(&config)?;
    }
    let host = Arch::host();
    if config.arch != host {
        progress.line(&format!(
            "note: this is an {} VM; on this {} host it will run under emulation (QEMU's TCG), much slower than natively",
            config.arch.as_str(),
            host.as_str()
        ));
    }
    Ok(())
}

async fn download(
    registry: &Registry,
    cache: &OciCache,
    manifest: &TartManifest,
    manifest_bytes: &[u8],
    staging: &Path,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<()> {
    fetch_small_blob(registry, &manifest.config, &staging.join("config.json")).await?;
    let disk = async {
        match &manifest.disk {
            DiskLayers::V2(layers) => pull_disk_v2(registry, cache, layers, staging, options, progress).await,
            DiskLayers::V1(layers) => pull_disk_v1(registry, layers, staging, progress).await,
        }
    };
    with_disk_progress(progress, manifest.disk_compressed_size(), disk).await?;
    progress.line("pulling NVRAM...");
    fetch_small_blob(registry, &manifest.nvram, &staging.join("nvram.bin")).await?;
    fs::write(staging.join("manifest.json"), manifest_bytes).context("failed to write manifest.json")?;
    Ok(())
}

/// Config and NVRAM: downloaded into memory (resumed like disk layers) and verified; kept from
/// an earlier attempt if intact.
pub(crate) async fn fetch_small_blob(registry: &Registry, descriptor: &Descriptor, path: &Path) -> Result<()> {
    let digest = descriptor.digest().to_string();
    if fs::read(path).is_ok_and(|bytes| sha256_digest(&bytes) == digest) {
        return Ok(());
    }
    let (sender, mut receiver) = mpsc::channel::<Bytes>(4);
    let collector = tokio::spawn(async move {
        let mut data = Vec::new();
        while let Some(piece) = receiver.recv().await {
            data.extend_from_slice(&piece);
        }
        data
    });
    let streamed = stream_blob(registry, descriptor, &sender, &|_| {}).await;
    drop(sender);
    let data = collector.await?;
    streamed?;
    fs::write(path, data).with_context(|| format!("failed to write {}", path.display()))
}

/// Indices of disk layers already written, verified and synced by an earlier attempt.
struct Journal {
    file: Mutex<File>,
    done: BTreeSet<usize>,
}

impl Journal {
    fn open(path: &Path) -> Result<Self> {
        let done = match File::open(path) {
            Ok(file) => BufReader::new(file)
                .lines()
                .map_while(|line| line.ok())
                .filter_map(|line| line.trim().parse().ok())
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        Ok(Journal {
            file: Mutex::new(file),
            done,
        })
    }

    fn record(&self, index: usize) -> Result<()> {
        let mut file = self.file.lock().expect("journal lock poisoned");
        writeln!(file, "{index}")?;
        file.sync_data()?;
        Ok(())
    }
}

/// Runs a disk download under Tart's `pulling disk (… GB compressed)...` line and a progress
/// count of its compressed bytes.
pub(crate) async fn with_disk_progress(
    progress: &dyn Progress,
    compressed: u64,
    transfer: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    progress.line(&format!(
        "pulling disk ({:.1} GB compressed)...",
        compressed as f64 / 1e9
    ));
    progress.begin(compressed);
    let result = transfer.await;
    progress.end();
    result
}

/// Disk layers known by their uncompressed digests (Tart's v2, vetu's) into `disk.img`.
pub(crate) async fn pull_disk_v2(
    registry: &Registry,
    cache: &OciCache,
    layers: &[DiskLayer],
    staging: &Path,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let total: u64 = layers.iter().map(|l| l.uncompressed_size).sum();
    let disk_path = staging.join("disk.img");
    let journal_path = staging.join("disk-layers.done");
    if !disk_path.exists() {
        // A journal without its disk (a power loss took the disk's name) records nothing.
        let _ = fs::remove_file(&journal_path);
    }
    let disk = open_disk(&disk_path, Some(total))?;
    let journal = Journal::open(&journal_path)?;
    // Journal entries are only as good as the names of the files they speak of.
    tart_home::sync_dir(staging).with_context(|| format!("failed to sync {}", staging.display()))?;
    for (index, layer) in layers.iter().enumerate() {
        if journal.done.contains(&index) {
            progress.advance(layer.descriptor.size());
        }
    }
    let local = LocalChunks::scan(cache);
    let reused = std::sync::atomic::AtomicU64::new(0);
    futures_util::stream::iter(layers.iter().enumerate().filter(|(i, _)| !journal.done.contains(i)))
        .map(|(index, layer)| {
            let disk = disk.clone();
            let journal = &journal;
            let local = &local;
            let reused = &reused;
            async move {
                if obtain_locally(layer, &disk, local, progress).await? {
                    reused.fetch_add(layer.descriptor.size(), std::sync::atomic::Ordering::Relaxed);
                } else {
                    let (size, digest) = pull_layer(
                        registry,
                        &layer.descriptor,
                        disk.clone(),
                        layer.offset,
                        Some(layer.uncompressed_size),
                        layer.codec,
                        progress,
                    )
                    .await?;
                    ensure!(
                        size == layer.uncompressed_size,
                        "disk layer {} decompressed to {size} bytes, the manifest declares {}",
                        layer.descriptor.digest(),
                        layer.uncompressed_size
                    );
                    ensure!(
                        digest == layer.uncompressed_digest,
                        "disk layer {} failed verification: its content has digest {digest}, the manifest declares {}",
                        layer.descriptor.digest(),
                        layer.uncompressed_digest
                    );
                }
                disk.sync_data().context("failed to sync disk.img")?;
                journal.record(index)
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    let reused = reused.into_inner();
    if reused > 0 {
        progress.line(&format!(
            "avoided fetching {:.1} GB: those disk chunks were all zeros or already in local images",
            reused as f64 / 1e9
        ));
    }
    Ok(())
}

/// Fills a chunk without the network when it is all zeros or a cached image has it.
async fn obtain_locally(
    layer: &DiskLayer,
    disk: &Arc<DiskImage>,
    local: &LocalChunks,
    progress: &dyn Progress,
) -> Result<bool> {
    let source = local.find(layer).map(|(path, offset)| (path.to_owned(), offset));
    let layer_copy = layer.clone();
    let disk = disk.clone();
    let obtained = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        if is_zero_chunk(&layer_copy) {
            disk.punch_hole(layer_copy.offset, layer_copy.uncompressed_size)?;
            return Ok(true);
        }
        match source {
            Some((path, offset)) => copy_verified(&path, offset, disk.file(), &layer_copy),
            None => Ok(false),
        }
    })
    .await?
    .with_context(|| {
        format!(
            "failed to reuse a local copy of disk layer {}",
            layer.descriptor.digest()
        )
    })?;
    if obtained {
        progress.advance(layer.descriptor.size());
    }
    Ok(obtained)
}

/// Tart < 2.0 images: one compressed stream cut into layers, decoded in order.
async fn pull_disk_v1(
    registry: &Registry,
    layers: &[Descriptor],
    staging: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let path = staging.join("disk.img");
    let _ = fs::remove_file(&path);
    let disk = open_disk(&path, None)?;
    let (sender, worker) = spawn_decoder(disk.clone(), 0, None, DiskCodec::AppleLz4);
    let mut sender = Some(sender);
    for layer in layers {
        let tx = sender.as_ref().expect("sender lives until all layers are sent");
        if let Err(err) = stream_blob(registry, layer, tx, &|n| progress.advance(n)).await {
            drop(sender.take());
            return Err(first_cause(err, worker.await?.err()));
        }
    }
    drop(sender);
    let (size, _) = worker.await??;
    disk.set_len(size).context("failed to size disk.img")?;
    disk.sync_data().context("failed to sync disk.img")
}

fn open_disk(path: &Path, size: Option<u64>) -> Result<Arc<DiskImage>> {
    let disk = DiskImage::open(path, size).with_context(|| match size {
        Some(size) => format!("failed to create {} of {size} bytes", path.display()),
        None => format!("failed to open {}", path.display()),
    })?;
    Ok(Arc::new(disk))
}

/// One disk layer: downloaded (resuming with `Range` after transport errors), verified against
/// its compressed digest, decompressed and written. Returns the uncompressed size and digest.
async fn pull_layer(
    registry: &Registry,
    descriptor: &Descriptor,
    disk: Arc<DiskImage>,
    offset: u64,
    uncompressed_size: Option<u64>,
    codec: DiskCodec,
    progress: &dyn Progress,
) -> Result<(u64, String)> {
    let (sender, worker) = spawn_decoder(disk, offset, uncompressed_size, codec);
    let streamed = stream_blob(registry, descriptor, &sender, &|n| progress.advance(n)).await;
    drop(sender);
    let decoded = worker.await?;
    match (streamed, decoded) {
        (Ok(()), Ok((end, digest))) => Ok((end - offset, digest)),
        (Err(err), decoded) => Err(first_cause(err, decoded.err())),
        (Ok(()), Err(err)) => Err(err.context(format!("failed to decompress disk layer {}", descriptor.digest()))),
    }
}

/// Sending to the decoder failed because the decoder stopped; its own error says why.
#[derive(Debug, thiserror::Error)]
#[error("decompression stopped")]
struct DecoderStopped;

/// When both the download and the decoder failed, the one that failed first is the cause: a
/// download cut short makes the decoder see a truncated stream, and a stopped decoder makes
/// the download fail to hand over data.
fn first_cause(download: anyhow::Error, decode: Option<anyhow::Error>) -> anyhow::Error {
    match decode {
        Some(decode) if download.is::<DecoderStopped>() => decode.context("failed to decompress disk"),
        _ => download,
    }
}

type DecodeResult = Result<(u64, String)>;

/// Decompression and disk writes run on a blocking thread fed through a small bounded channel,
/// so memory stays bounded however fast the network is.
fn spawn_decoder(
    disk: Arc<DiskImage>,
    offset: u64,
    uncompressed_size: Option<u64>,
    codec: DiskCodec,
) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<DecodeResult>) {
    let (sender, mut receiver) = mpsc::channel::<Bytes>(4);
    let worker = tokio::task::spawn_blocking(move || -> DecodeResult {
        let mut sink = crate::sink::LayerSink::new(disk, offset, uncompressed_size);
        match codec {
            DiskCodec::AppleLz4 => {
                let mut decoder = PushDecoder::new();
                while let Some(chunk) = receiver.blocking_recv() {
                    decoder.feed(&chunk, &mut sink)?;
                }
                decoder.finish()?;
            }
            DiskCodec::Lz4Frame => crate::lz4frame::decode(receiver, &mut sink)?,
        }
        Ok(sink.finish()?)
    });
    (sender, worker)
}

/// Sends a blob's bytes to `sender` in order, exactly once each, resuming with `Range` after a
/// transport error, and checks the whole against its digest and declared size.
pub(crate) async fn stream_blob(
    registry: &Registry,
    descriptor: &Descriptor,
    sender: &mpsc::Sender<Bytes>,
    advance: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let digest = descriptor.digest().to_string();
    let size = descriptor.size();
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    // Bytes received but not yet handed to the decoder: the body arrives in pieces of a few KiB,
    // and one channel hand-over (and decoder wake-up) per piece cost more CPU than the copy.
    let mut batch = BytesMut::with_capacity(HANDOVER);
    let mut retries = Retries::new(registry.retry_policy());
    loop {
        let before = received;
        let result = async {
            let (mut stream, ranged) = registry.blob_stream(&digest, size, received).await?;
            let mut skip = if ranged { 0 } else { received };
            while let Some(chunk) = stream.next().await {
                let mut chunk = chunk.with_context(|| format!("failed to download blob {digest}"))?;
                if skip > 0 {
                    let dropped = skip.min(chunk.len() as u64);
                    chunk = chunk.slice(dropped as usize..);
                    skip -= dropped;
                }
                if chunk.is_empty() {
                    continue;
                }
                if received + chunk.len() as u64 > size {
                    bail!("the registry sent more than the {size} bytes the manifest declares for blob {digest}");
                }
                hasher.update(&chunk);
                received += chunk.len() as u64;
                advance(chunk.len() as u64);
                // Handed over before a piece would overflow the buffer: growing it would copy
                // the whole batch once more (a tenth of the pull's copying, measured).
                if !batch.is_empty() && batch.len() + chunk.len() > batch.capacity() {
                    sender
                        .send(batch.split().freeze())
                        .await
                        .map_err(|_| anyhow!(DecoderStopped))?;
                    // One allocation per hand-over, not a chain of regrowths as pieces arrive.
                    batch.reserve(HANDOVER.max(chunk.len()));
                }
                batch.extend_from_slice(&chunk);
            }
            if received < size {
                return Err(anyhow::Error::from(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the connection ended after {received} of {size} bytes of blob {digest}"),
                )));
            }
            Ok(())
        }
        .await;
        // Whatever was counted as received goes to the decoder, also before a retry resumes
        // after it.
        if !batch.is_empty() {
            sender
                .send(batch.split().freeze())
                .await
                .map_err(|_| anyhow!(DecoderStopped))?;
        }
        match result {
            Ok(()) => break,
            // Every declared byte is here (the connection failed after them, e.g. the registry
            // announced more): asking for more could only get a 416. The digest decides.
            Err(_) if received == size => break,
            Err(err) => retries.after_failure("pulling image", err, received > before).await?,
        }
    }
    let actual = format!("sha256:{:x}", hasher.finalize());
    ensure!(
        actual == digest,
        "blob {digest} failed verification: the registry sent content with digest {actual}"
    );
    Ok(())
}

/// Bytes handed to a layer's decoder at once.
const HANDOVER: usize = 1 << 20;

/// Where a pull of the image with this manifest digest stages its work.
fn staging_path(home: &TartHome, manifest_digest: &str) -> PathBuf {
    home.tmp_dir().join(format!(
        "{PULL_STAGING_PREFIX}{}",
        manifest_digest.trim_start_matches("sha256:")
    ))
}
