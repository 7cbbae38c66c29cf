//! vetu VM images (vetu-format.md §2–5): a vetu config, a kernel, an optional initramfs and
//! disk layers that are standard LZ4 frames of arbitrary uncompressed size. They are pulled into
//! a Tart-shaped VM directory: `config.json` in Tart's format (the kernel command line in
//! `kernelCommandLine`), `kernel`, `initramfs`, `disk.img`, and a fresh UEFI variable store as
//! `nvram.bin` (unused by a directly booted kernel, but a Tart VM has one, and `tart push` needs
//! it). The disk goes through the same engine as
//! Tart's (`pull_disk_v2`): digests verified, resumable, chunks reused.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use oci_spec::image::{Descriptor, ImageManifest};
use serde::Deserialize;
use tart_home::{Arch, MacAddress, VmConfig, VmDir};

use crate::manifest::{check_descriptor, check_digest, DiskCodec, DiskLayer, MAX_SMALL_BLOB};
use crate::media;
use crate::progress::Progress;
use crate::pull::{fetch_small_blob, pull_disk_v2, with_disk_progress, PullOptions};
use crate::registry::Registry;
use crate::OciCache;

/// A validated vetu image manifest.
#[derive(Clone, Debug)]
pub struct VetuManifest {
    pub config: Descriptor,
    pub kernel: Descriptor,
    pub initramfs: Option<Descriptor>,
    /// Disk layers in manifest order, with the name of the disk each belongs to; offsets run
    /// per disk.
    pub disks: Vec<(String, DiskLayer)>,
}

impl VetuManifest {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let manifest: ImageManifest =
            serde_json::from_slice(bytes).context("the registry sent a manifest that is not an OCI image manifest")?;
        let mut configs = Vec::new();
        let mut kernels = Vec::new();
        let mut initramfs = Vec::new();
        let mut disks = Vec::new();
        let mut offsets: HashMap<String, u64> = HashMap::new();
        for layer in manifest.layers() {
            check_descriptor(layer)?;
            match layer.media_type().to_string().as_str() {
                media::VETU_CONFIG => configs.push(layer.clone()),
                media::VETU_KERNEL => kernels.push(layer.clone()),
                media::VETU_INITRAMFS => initramfs.push(layer.clone()),
                media::VETU_DISK => {
                    let (name, layer) = disk_layer(layer, &mut offsets)?;
                    disks.push((name, layer));
                }
                // vetu itself picks layers by type and ignores the rest.
                _ => {}
            }
        }
        let exactly_one = |found: &mut Vec<Descriptor>, what: &str, media_type: &str| -> Result<Descriptor> {
            ensure!(
                found.len() == 1,
                "a vetu image has exactly one {what} layer ({media_type}), this one has {}",
                found.len()
            );
            Ok(found.remove(0))
        };
        let config = exactly_one(&mut configs, "VM config", media::VETU_CONFIG)?;
        let kernel = exactly_one(&mut kernels, "kernel", media::VETU_KERNEL)?;
        ensure!(
            initramfs.len() <= 1,
            "a vetu image has at most one initramfs layer, this one has {}",
            initramfs.len()
        );
        let initramfs = initramfs.pop();
        for small in [Some(&config), Some(&kernel), initramfs.as_ref()].into_iter().flatten() {
            ensure!(
                small.size() <= MAX_SMALL_BLOB,
                "layer {} claims an implausible size of {} bytes",
                small.digest(),
                small.size()
            );
        }
        Ok(VetuManifest {
            config,
            kernel,
            initramfs,
            disks,
        })
    }

    /// The disk layers of the (only) disk named in `config`.
    fn disk_layers(&self, config: &VetuConfig) -> Result<Vec<DiskLayer>> {
        let names: Vec<&str> = config.disks.iter().map(|disk| disk.name.as_str()).collect();
        if let Some((name, layer)) = self.disks.iter().find(|(name, _)| !names.contains(&name.as_str())) {
            bail!(
                "disk layer {} belongs to disk {name:?}, which the image's VM config does not list (it lists {})",
                layer.descriptor.digest(),
                names.join(", ")
            );
        }
        Ok(self.disks.iter().map(|(_, layer)| layer.clone()).collect())
    }

    /// Every disk layer, for finding chunks to reuse.
    pub fn all_disk_layers(&self) -> impl Iterator<Item = &DiskLayer> {
        self.disks.iter().map(|(_, layer)| layer)
    }

    pub fn disk_uncompressed_size(&self) -> u64 {
        self.all_disk_layers().map(|layer| layer.uncompressed_size).sum()
    }
}

fn disk_layer(layer: &Descriptor, offsets: &mut HashMap<String, u64>) -> Result<(String, DiskLayer)> {
    let annotation = |key: &str| -> Result<String> {
        layer
            .annotations()
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
            .with_context(|| format!("vetu disk layer {} lacks the {key} annotation", layer.digest()))
    };
    let name = annotation(media::VETU_DISK_NAME)?;
    let size_text = annotation(media::VETU_UNCOMPRESSED_SIZE)?;
    let size: u64 = size_text.parse().with_context(|| {
        format!(
            "vetu disk layer {} has a malformed {} {size_text:?} (a decimal byte count)",
            layer.digest(),
            media::VETU_UNCOMPRESSED_SIZE
        )
    })?;
    let digest = annotation(media::VETU_UNCOMPRESSED_DIGEST)?;
    check_digest(&digest)?;
    let offset = offsets.entry(name.clone()).or_default();
    let disk_layer = DiskLayer {
        descriptor: layer.clone(),
        uncompressed_size: size,
        uncompressed_digest: digest,
        offset: *offset,
        codec: DiskCodec::Lz4Frame,
    };
    *offset = offset
        .checked_add(size)
        .with_context(|| format!("the disk layers of {name:?} add up to more than 2^64 bytes"))?;
    Ok((name, disk_layer))
}

/// vetu's `config.json` (§5), the keys a VM needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VetuConfig {
    version: u32,
    #[serde(default)]
    arch: String,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    disks: Vec<VetuDisk>,
    #[serde(default)]
    cpu_count: u8,
    #[serde(default)]
    memory_size: u64,
    #[serde(default)]
    mac_address: String,
}

#[derive(Deserialize)]
struct VetuDisk {
    name: String,
}

impl VetuConfig {
    fn parse(bytes: &[u8]) -> Result<Self> {
        let config: VetuConfig = serde_json::from_slice(bytes).context("the image's vetu VM config is malformed")?;
        ensure!(
            config.version == 1,
            "the image's vetu VM config has version {}; only version 1 is supported",
            config.version
        );
        for disk in &config.disks {
            let name = &disk.name;
            let allowed = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            ensure!(
                allowed && !name.is_empty() && !name.starts_with('.') && !name.ends_with('.'),
                "the image's vetu VM config names a disk {name:?}: disk names are made of [A-Za-z0-9-_.] \
                 and neither start nor end with a dot"
            );
        }
        match config.disks.len() {
            1 => {}
            0 => bail!("the image's vetu VM config lists no disk"),
            n => bail!(
                "the image's vetu VM has {n} disks ({}): tart VMs have one disk, so such images cannot be pulled",
                config
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
        Ok(config)
    }

    fn arch(&self) -> Result<Arch> {
        match self.arch.as_str() {
            "amd64" => Ok(Arch::Amd64),
            "arm64" => Ok(Arch::Arm64),
            "" => bail!("the image's vetu VM config has no \"arch\""),
            other => bail!("the image is a VM for {other:?}; tart runs amd64 and arm64 VMs"),
        }
    }

    /// The Tart config of the VM: vetu's CPU, memory and MAC where set, Tart's defaults where not.
    fn to_tart(&self) -> Result<VmConfig> {
        let mut config = VmConfig::new_linux(self.arch()?);
        if self.cpu_count > 0 {
            config.cpu_count = u32::from(self.cpu_count);
            config.cpu_count_min = config.cpu_count.min(config.cpu_count_min);
        }
        if self.memory_size > 0 {
            config.memory_size = self.memory_size;
            config.memory_size_min = config.memory_size.min(config.memory_size_min);
        }
        if let Ok(mac) = self.mac_address.parse::<MacAddress>() {
            config.mac_address = mac;
        }
        config.kernel_command_line = Some(self.cmdline.clone());
        Ok(config)
    }
}

/// Where the image's own vetu config is kept (next to the Tart `config.json` made from it), so a
/// resumed pull need not fetch it again.
const VETU_CONFIG_FILE: &str = "vetu-config.json";

/// Fills `staging` with the VM directory of the vetu image `manifest`.
pub(crate) async fn download(
    registry: &Registry,
    cache: &OciCache,
    manifest: &VetuManifest,
    manifest_bytes: &[u8],
    staging: &Path,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let vetu_config_path = staging.join(VETU_CONFIG_FILE);
    fetch_small_blob(registry, &manifest.config, &vetu_config_path).await?;
    let vetu_config = VetuConfig::parse(&fs::read(&vetu_config_path).context("failed to read the vetu config")?)?;
    let layers = manifest.disk_layers(&vetu_config)?;
    let config = vetu_config.to_tart()?;
    // Before the download, so that a missing firmware package is said at once.
    let firmware = tart_qemu::firmware::find_firmware(config.arch)?;
    fs::write(staging.join("config.json"), config.to_pretty_json()).context("failed to write config.json")?;

    progress.line("pulling kernel...");
    fetch_small_blob(registry, &manifest.kernel, &staging.join("kernel")).await?;
    if let Some(initramfs) = &manifest.initramfs {
        progress.line("pulling initramfs...");
        fetch_small_blob(registry, initramfs, &staging.join("initramfs")).await?;
    }
    let compressed = layers.iter().map(|layer| layer.descriptor.size()).sum();
    let disk = pull_disk_v2(registry, cache, &layers, staging, options, progress);
    with_disk_progress(progress, compressed, disk).await?;
    VmDir::new(staging.to_owned()).write_fresh_nvram(&firmware.vars_template)?;
    fs::write(staging.join("manifest.json"), manifest_bytes).context("failed to write manifest.json")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::descriptor;

    fn layer(media_type: &str, c: char, annotations: &[(&str, &str)]) -> serde_json::Value {
        let annotations = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        serde_json::to_value(descriptor(
            media_type,
            10,
            &format!("sha256:{}", c.to_string().repeat(64)),
            annotations,
        ))
        .unwrap()
    }

    fn manifest(layers: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::MANIFEST,
            "config": layer(media::OCI_CONFIG, 'f', &[]),
            "layers": layers,
        }))
        .unwrap()
    }

    fn disk(c: char, name: &str, size: &str) -> serde_json::Value {
        let digest = format!("sha256:{}", "d".repeat(64));
        layer(
            media::VETU_DISK,
            c,
            &[
                (media::VETU_DISK_NAME, name),
                (media::VETU_UNCOMPRESSED_SIZE, size),
                (media::VETU_UNCOMPRESSED_DIGEST, &digest),
            ],
        )
    }

    #[test]
    fn reads_vetu_manifests_with_offsets_per_disk() {
        let bytes = manifest(vec![
            layer(media::VETU_CONFIG, 'a', &[]),
            layer(media::VETU_KERNEL, 'b', &[]),
            layer(media::VETU_INITRAMFS, 'c', &[]),
            disk('1', "disk.img", "1000"),
            disk('2', "disk.img", "24"),
        ]);
        let parsed = VetuManifest::parse(&bytes).unwrap();
        assert!(parsed.initramfs.is_some());
        let offsets: Vec<u64> = parsed.all_disk_layers().map(|l| l.offset).collect();
        assert_eq!(offsets, [0, 1000]);
        assert_eq!(parsed.disk_uncompressed_size(), 1024);
        assert!(parsed.all_disk_layers().all(|l| l.codec == DiskCodec::Lz4Frame));

        let config = VetuConfig::parse(br#"{"version":1,"arch":"amd64","cmdline":"console=ttyS0","disks":[{"name":"disk.img"}],"cpuCount":2,"memorySize":1073741824,"macAddress":"a6:1f:3c:22:90:0e"}"#).unwrap();
        assert_eq!(parsed.disk_layers(&config).unwrap().len(), 2);
        let tart = config.to_tart().unwrap();
        assert_eq!((tart.cpu_count, tart.memory_size), (2, 1 << 30));
        assert_eq!(tart.mac_address.to_string(), "a6:1f:3c:22:90:0e");
        assert_eq!(tart.kernel_command_line.as_deref(), Some("console=ttyS0"));

        let other = VetuConfig::parse(br#"{"version":1,"arch":"amd64","disks":[{"name":"root.img"}]}"#).unwrap();
        let err = parsed.disk_layers(&other).unwrap_err().to_string();
        assert!(
            err.contains("belongs to disk \"disk.img\", which the image's VM config does not list"),
            "{err}"
        );
    }

    #[test]
    fn refuses_broken_vetu_images() {
        let config = layer(media::VETU_CONFIG, 'a', &[]);
        let kernel = layer(media::VETU_KERNEL, 'b', &[]);
        let cases = [
            (
                vec![config.clone(), disk('1', "disk.img", "1")],
                "exactly one kernel layer",
            ),
            (
                vec![config.clone(), kernel.clone(), layer(media::VETU_DISK, '1', &[])],
                "lacks the org.cirruslabs.vetu.name annotation",
            ),
            (
                vec![config.clone(), kernel.clone(), disk('1', "disk.img", "12x")],
                "malformed org.cirruslabs.vetu.uncompressed-size \"12x\"",
            ),
        ];
        for (layers, expected) in cases {
            let err = format!("{:#}", VetuManifest::parse(&manifest(layers)).unwrap_err());
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
        for (json, expected) in [
            (
                r#"{"version":2,"arch":"amd64","disks":[{"name":"d"}]}"#,
                "only version 1",
            ),
            (
                r#"{"version":1,"arch":"amd64","disks":[{"name":"/disk.img"}]}"#,
                "disk names are made of",
            ),
            (
                r#"{"version":1,"arch":"amd64","disks":[{"name":"a"},{"name":"b"}]}"#,
                "2 disks (a, b)",
            ),
        ] {
            let err = VetuConfig::parse(json.as_bytes())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
        let riscv = VetuConfig::parse(br#"{"version":1,"arch":"riscv64","disks":[{"name":"d"}]}"#).unwrap();
        assert!(riscv.to_tart().is_err());
    }
}
