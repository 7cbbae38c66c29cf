//! Which of the image formats tart pulls a manifest is in, told by its layers' media types the
//! way vetu tells them apart (vetu-format.md §1): a vetu config layer makes a vetu image, else a
//! Tart config layer a Tart image, else container layers a KubeVirt containerDisk.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tart_home::ImageFormat;

use crate::manifest::{DiskLayer, DiskLayers, TartManifest};
use crate::media;
use crate::vetu::VetuManifest;

/// A manifest of one of the supported formats, validated.
pub enum ImageManifest {
    Tart(Box<TartManifest>),
    Vetu(Box<VetuManifest>),
    /// Validated by the containerDisk puller, which reads its layers itself.
    ContainerDisk,
}

#[derive(Deserialize)]
struct Layers {
    #[serde(default)]
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layer {
    media_type: String,
}

/// The format of the image manifest `bytes`.
pub fn classify(bytes: &[u8]) -> Result<ImageFormat> {
    let manifest: Layers =
        serde_json::from_slice(bytes).context("the registry sent a manifest that is not an image manifest")?;
    let has = |wanted: &[&str]| manifest.layers.iter().any(|l| wanted.contains(&l.media_type.as_str()));
    if has(&[media::VETU_CONFIG]) {
        Ok(ImageFormat::Vetu)
    } else if has(&[media::VM_CONFIG]) {
        Ok(ImageFormat::Tart)
    } else if has(&media::CONTAINER_LAYERS) {
        Ok(ImageFormat::ContainerDisk)
    } else {
        let mut types: Vec<&str> = manifest.layers.iter().map(|l| l.media_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        bail!(
            "unsupported image: its layers ({}) are none of the formats tart pulls: Tart VM images, \
             vetu VM images and KubeVirt containerDisks",
            if types.is_empty() {
                "none".to_owned()
            } else {
                types.join(", ")
            }
        )
    }
}

impl ImageManifest {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        Ok(match classify(bytes)? {
            ImageFormat::Tart => ImageManifest::Tart(Box::new(TartManifest::parse(bytes)?)),
            ImageFormat::Vetu => ImageManifest::Vetu(Box::new(VetuManifest::parse(bytes)?)),
            ImageFormat::ContainerDisk => ImageManifest::ContainerDisk,
        })
    }

    pub fn format(&self) -> ImageFormat {
        match self {
            ImageManifest::Tart(_) => ImageFormat::Tart,
            ImageManifest::Vetu(_) => ImageFormat::Vetu,
            ImageManifest::ContainerDisk => ImageFormat::ContainerDisk,
        }
    }

    /// The disk's size as the manifest states it, to make room before pulling.
    pub fn uncompressed_disk_size(&self) -> Option<u64> {
        match self {
            ImageManifest::Tart(manifest) => manifest.uncompressed_disk_size,
            ImageManifest::Vetu(manifest) => Some(manifest.disk_uncompressed_size()),
            ImageManifest::ContainerDisk => None,
        }
    }

    /// Disk chunks known by their uncompressed digest, which any image holding the same chunk
    /// can supply: Tart's v2 layers and vetu's layers. containerDisk layers are tars whose
    /// manifests say nothing about the disk's content.
    pub fn disk_layers(&self) -> Vec<DiskLayer> {
        match self {
            ImageManifest::Tart(manifest) => match &manifest.disk {
                DiskLayers::V2(layers) => layers.clone(),
                DiskLayers::V1(_) => Vec::new(),
            },
            ImageManifest::Vetu(manifest) => manifest.all_disk_layers().cloned().collect(),
            ImageManifest::ContainerDisk => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(types: &[&str]) -> Vec<u8> {
        let layers: Vec<serde_json::Value> = types
            .iter()
            .map(|t| serde_json::json!({"mediaType": t, "digest": format!("sha256:{}", "a".repeat(64)), "size": 1}))
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "layers": layers})).unwrap()
    }

    #[test]
    fn tells_the_formats_apart() {
        assert_eq!(
            classify(&manifest(&[media::VM_CONFIG, media::DISK_V2])).unwrap(),
            ImageFormat::Tart
        );
        // A vetu config wins, as in vetu.
        assert_eq!(
            classify(&manifest(&[media::VM_CONFIG, media::VETU_CONFIG])).unwrap(),
            ImageFormat::Vetu
        );
        assert_eq!(
            classify(&manifest(&["application/vnd.docker.image.rootfs.diff.tar.gzip"])).unwrap(),
            ImageFormat::ContainerDisk
        );
        let err = classify(&manifest(&[
            "application/vnd.example.model.v1",
            "application/vnd.example.model.v1",
        ]))
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "unsupported image: its layers (application/vnd.example.model.v1) are none of the formats tart \
             pulls: Tart VM images, vetu VM images and KubeVirt containerDisks"
        );
    }
}
