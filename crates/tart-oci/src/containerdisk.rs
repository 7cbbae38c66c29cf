//! Pulling a KubeVirt containerDisk: each tar layer streamed through the verified, resumable
//! blob download of the Tart path into `tart_containerdisk`, which keeps only the disk.

use std::fs;
use std::io;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageManifest};
use tart_containerdisk::{
    boot_firmware, disk_file, make_raw_disk, write_vm_files, Compression, Extractor, ImageConfig,
};
use tart_home::{Arch, BootFirmware, ImageFormat};
use tokio::sync::mpsc;

use crate::channel_reader::ChannelReader;
use crate::media::CONTAINER_LAYERS;
use crate::progress::Progress;
use crate::pull::{fetch_small_blob, stream_blob};
use crate::registry::Registry;
use crate::RemoteName;

/// The image config as the registry has it (labels such as `shasum`, instancetype hints), kept
/// beside the VM's own `config.json`.
const IMAGE_CONFIG: &str = "oci-config.json";

/// Which file of the image became the cached image's disk.
const CHOSEN_DISK: &str = "image-disk-path";

/// `--containerdisk-path` as the extractor names files (`disk/…`), after refusing it where it
/// cannot be honoured: for images of other formats, and for an image already cached with
/// another of its files as the disk (the cache holds one VM per image).
pub(crate) fn check_disk_choice(
    name: &RemoteName,
    format: ImageFormat,
    wanted: Option<&str>,
    cached_image: &Path,
) -> Result<Option<String>> {
    let Some(wanted) = wanted else { return Ok(None) };
    if format != ImageFormat::ContainerDisk {
        bail!(
            "--containerdisk-path is for KubeVirt containerDisks, and {name} is a {} image",
            format.as_str()
        );
    }
    let wanted = disk_file(wanted)?;
    if let Ok(cached) = fs::read_to_string(cached_image.join(CHOSEN_DISK)) {
        let cached = cached.trim();
        if cached.trim_start_matches('/') != wanted {
            bail!("{name} is cached with {cached} as its disk; to use /{wanted}, delete it first: tart delete {name}");
        }
    }
    Ok(Some(wanted))
}

/// Fills `staging` with a Tart-shaped VM directory made from the containerDisk whose image
/// manifest (Docker v2 or OCI, one platform) is `manifest_bytes`.
///
/// Layers are applied in manifest order, all of them, including those after the one holding the
/// disk: a later layer may white the disk out or replace it. Each layer's digest is checked
/// when its last byte arrives, its uncompressed digest at the end of its tar; a mismatch fails
/// the pull, the files written from the layers are removed, and nothing reaches the cache.
pub(crate) async fn download(
    registry: &Registry,
    manifest_bytes: &[u8],
    chosen_disk: Option<&str>,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let manifest = ImageManifest::from_reader(manifest_bytes).context("the containerDisk's manifest is not valid")?;
    for layer in manifest.layers() {
        let media_type = layer.media_type().to_string();
        if !CONTAINER_LAYERS.contains(&media_type.as_str()) {
            bail!(
                "the containerDisk has a layer of type {media_type}, which is not a tar layer ({})",
                CONTAINER_LAYERS.join(", ")
            );
        }
    }
    let config_path = staging.join(IMAGE_CONFIG);
    fetch_small_blob(registry, manifest.config(), &config_path).await?;
    let config = ImageConfig::parse(
        &fs::read(&config_path).with_context(|| format!("failed to read {}", config_path.display()))?,
    )?;
    let diff_ids = config.layer_diff_ids(manifest.layers().len())?;
    // Before the download, so that a missing firmware package is said at once.
    let firmware = tart_qemu::firmware::find_firmware(config.arch)?;

    let compressed: u64 = manifest.layers().iter().map(|layer| layer.size()).sum();
    progress.line(&format!(
        "pulling containerDisk ({:.1} GB compressed)...",
        compressed as f64 / 1e9
    ));
    progress.begin(compressed);
    let extracted = extract_layers(registry, manifest.layers(), &diff_ids, &config, staging, progress).await;
    progress.end();
    let extractor = extracted?;

    progress.line("converting the disk to a sparse raw disk.img...");
    let staging = staging.to_owned();
    let manifest_bytes = manifest_bytes.to_vec();
    let chosen_disk = chosen_disk.map(str::to_owned);
    let arch = config.arch;
    let (image_path, boot) = tokio::task::spawn_blocking(move || -> Result<(String, Option<BootFirmware>)> {
        let (image_path, file) = extractor.into_disk(chosen_disk.as_deref())?;
        fs::write(staging.join(CHOSEN_DISK), format!("/{image_path}\n"))
            .with_context(|| format!("failed to write {CHOSEN_DISK}"))?;
        make_raw_disk(&staging, &image_path, &file)?;
        let disk = staging.join("disk.img");
        let boot = boot_firmware(&disk).with_context(|| format!("failed to read {}", disk.display()))?;
        // UEFI wherever the disk has an ESP (the distributions' cloud disks have both an ESP and
        // a BIOS boot partition); BIOS, as KubeVirt's default firmware on amd64, where it only
        // has a legacy boot loader.
        let bios = boot == Some(BootFirmware::Bios) && arch == Arch::Amd64;
        write_vm_files(
            &staging,
            arch,
            bios.then_some(BootFirmware::Bios),
            &firmware.vars_template,
            &manifest_bytes,
        )?;
        Ok((image_path, boot))
    })
    .await??;
    match boot {
        Some(BootFirmware::Uefi) => {}
        Some(BootFirmware::Bios) if arch == Arch::Amd64 => progress.line(&format!(
            "/{image_path} has no EFI system partition but a BIOS boot loader: the VM boots with BIOS (SeaBIOS)"
        )),
        // Pulled all the same: the disk may be meant as a data disk (`tart run --disk`).
        _ => progress.line(&format!(
            "warning: /{image_path} has no EFI system partition{}, so the VM will not boot from this disk",
            if arch == Arch::Amd64 {
                " and no BIOS boot loader"
            } else {
                " (BIOS boot exists on amd64 only)"
            }
        )),
    }
    Ok(())
}

async fn extract_layers(
    registry: &Registry,
    layers: &[Descriptor],
    diff_ids: &[Option<&str>],
    config: &ImageConfig,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<Extractor> {
    let mut extractor = Extractor::new(staging)?;
    extractor.check_shasum(config.shasum.as_deref());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let diff_id = diff_id.map(str::to_owned);
        let compression = Compression::of_media_type(layer.media_type().as_ref());
        let (sender, receiver) = mpsc::channel::<Bytes>(4);
        let worker = tokio::task::spawn_blocking(move || {
            let mut reader = ChannelReader::new(receiver);
            let applied = extractor.apply_layer(&mut reader, compression, diff_id.as_deref());
            // The rest of the blob still has to arrive for its digest to be checked, also when
            // the layer was refused: a refusal of data the registry garbled is no refusal.
            let _ = io::copy(&mut reader, &mut io::sink());
            (extractor, applied)
        });
        let streamed = stream_blob(registry, layer, &sender, &|n| progress.advance(n)).await;
        drop(sender);
        let (returned, applied) = worker.await?;
        streamed?;
        applied.with_context(|| format!("containerDisk layer {}", layer.digest()))?;
        extractor = returned;
    }
    Ok(extractor)
}
