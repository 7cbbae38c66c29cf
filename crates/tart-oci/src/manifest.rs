//! Tart's image manifest: reading any Tart-shaped manifest strictly, and writing ours the way
//! Swift's `JSONEncoder` writes Tart's (sorted keys, compact, `\/`).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use oci_spec::image::{Descriptor, Digest, ImageManifest, MediaType};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::media;

/// A validated Tart image manifest.
#[derive(Clone, Debug)]
pub struct TartManifest {
    pub config: Descriptor,
    pub disk: DiskLayers,
    pub nvram: Descriptor,
    /// `uncompressed-disk-size`, used to make room before pulling.
    pub uncompressed_disk_size: Option<u64>,
}

#[derive(Clone, Debug)]
pub enum DiskLayers {
    /// Current format: independently compressed 512 MiB chunks with their uncompressed digests.
    V2(Vec<DiskLayer>),
    /// Tart < 2.0: one compressed stream cut into pieces, to be concatenated.
    V1(Vec<Descriptor>),
}

#[derive(Clone, Debug)]
pub struct DiskLayer {
    pub descriptor: Descriptor,
    pub uncompressed_size: u64,
    pub uncompressed_digest: String,
    /// Where the chunk goes in `disk.img`: the sum of the sizes of the chunks before it.
    pub offset: u64,
    pub codec: DiskCodec,
}

/// How a disk layer is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCodec {
    /// Tart: Apple's `bv41` LZ4 stream.
    AppleLz4,
    /// vetu: one standard LZ4 frame.
    Lz4Frame,
}

/// Small blobs are held in memory; a manifest claiming more than this is refused rather than
/// trusted with our memory.
pub(crate) const MAX_SMALL_BLOB: u64 = 256 << 20;

impl TartManifest {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let manifest: ImageManifest =
            serde_json::from_slice(bytes).context("the registry sent a manifest that is not an OCI image manifest")?;
        let mut configs = Vec::new();
        let mut nvrams = Vec::new();
        let mut v2 = Vec::new();
        let mut v1 = Vec::new();
        let mut offset = 0u64;
        for layer in manifest.layers() {
            check_descriptor(layer)?;
            match layer.media_type().to_string().as_str() {
                media::VM_CONFIG => configs.push(layer.clone()),
                media::NVRAM => nvrams.push(layer.clone()),
                media::DISK_V1 => v1.push(layer.clone()),
                media::DISK_V2 => {
                    let annotation = |key: &str| layer.annotations().as_ref().and_then(|a| a.get(key)).cloned();
                    let size: u64 = annotation(media::UNCOMPRESSED_SIZE)
                        .with_context(|| {
                            format!(
                                "disk layer {} lacks the {} annotation",
                                layer.digest(),
                                media::UNCOMPRESSED_SIZE
                            )
                        })?
                        .parse()
                        .with_context(|| {
                            format!(
                                "disk layer {} has a malformed {}",
                                layer.digest(),
                                media::UNCOMPRESSED_SIZE
                            )
                        })?;
                    let digest = annotation(media::UNCOMPRESSED_CONTENT_DIGEST).with_context(|| {
                        format!(
                            "disk layer {} lacks the {} annotation",
                            layer.digest(),
                            media::UNCOMPRESSED_CONTENT_DIGEST
                        )
                    })?;
                    check_digest(&digest)?;
                    ensure!(
                        size <= media::DISK_CHUNK_SIZE * 4,
                        "disk layer {} claims {size} uncompressed bytes, more than any Tart chunk",
                        layer.digest()
                    );
                    v2.push(DiskLayer {
                        descriptor: layer.clone(),
                        uncompressed_size: size,
                        uncompressed_digest: digest,
                        offset,
                        codec: DiskCodec::AppleLz4,
                    });
                    offset += size;
                }
                other => bail!("unexpected layer media type {other:?}: this is not a Tart VM image"),
            }
        }
        ensure!(
            configs.len() == 1,
            "a Tart image has exactly one VM config layer, this one has {}",
            configs.len()
        );
        ensure!(
            nvrams.len() == 1,
            "a Tart image has exactly one NVRAM layer, this one has {}",
            nvrams.len()
        );
        let disk = match (v2.is_empty(), v1.is_empty()) {
            (false, true) => DiskLayers::V2(v2),
            (true, false) => DiskLayers::V1(v1),
            (true, true) => bail!("the image has no disk layers"),
            (false, false) => bail!("the image mixes disk.v1 and disk.v2 layers"),
        };
        for small in [&configs[0], &nvrams[0]] {
            ensure!(
                small.size() <= MAX_SMALL_BLOB,
                "layer {} claims an implausible size of {} bytes",
                small.digest(),
                small.size()
            );
        }
        let uncompressed_disk_size = manifest
            .annotations()
            .as_ref()
            .and_then(|a| a.get(media::UNCOMPRESSED_DISK_SIZE))
            .and_then(|s| s.parse().ok());
        Ok(TartManifest {
            config: configs.remove(0),
            disk,
            nvram: nvrams.remove(0),
            uncompressed_disk_size,
        })
    }

    /// Compressed bytes to download for the disk.
    pub fn disk_compressed_size(&self) -> u64 {
        match &self.disk {
            DiskLayers::V2(layers) => layers.iter().map(|l| l.descriptor.size()).sum(),
            DiskLayers::V1(layers) => layers.iter().map(|l| l.size()).sum(),
        }
    }
}

pub(crate) fn check_descriptor(descriptor: &Descriptor) -> Result<()> {
    check_digest(descriptor.digest().as_ref())
}

/// We only trust what we can verify: sha256 digests, well formed.
pub fn check_digest(digest: &str) -> Result<()> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest:?}: only sha256 is supported"))?;
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "malformed digest {digest:?}"
    );
    Ok(())
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

pub fn descriptor(media_type: &str, bytes_len: u64, digest: &str, annotations: HashMap<String, String>) -> Descriptor {
    let mut descriptor = Descriptor::new(
        MediaType::Other(media_type.to_owned()),
        bytes_len,
        Digest::from_str(digest).expect("digests we computed are well formed"),
    );
    descriptor.set_annotations(Some(annotations));
    descriptor
}

/// The manifest Tart pushes: config, disk layers, NVRAM, with Tart's annotations.
pub fn build_manifest(
    oci_config: &Descriptor,
    layers: &[Descriptor],
    uncompressed_disk_size: u64,
    upload_time: &str,
) -> Vec<u8> {
    let mut oci_config = oci_config.clone();
    oci_config.set_annotations(None);
    let layers: Vec<Value> = layers
        .iter()
        .map(|l| serde_json::to_value(l).expect("descriptors serialise"))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::MANIFEST,
        "config": oci_config,
        "layers": layers,
        "annotations": {
            media::UNCOMPRESSED_DISK_SIZE: uncompressed_disk_size.to_string(),
            media::UPLOAD_TIME: upload_time,
        },
    });
    swift_sorted_json(&manifest)
}

/// The stub OCI config Tart pushes "for Docker Hub compatibility", carrying the labels.
pub fn oci_config_blob(architecture: &str, os: &str, labels: &BTreeMap<String, String>) -> Vec<u8> {
    swift_sorted_json(&serde_json::json!({
        "architecture": architecture,
        "os": os,
        "config": { "Labels": labels },
    }))
}

/// Compact JSON with keys sorted and `/` escaped, like `JSONEncoder` with `.sortedKeys`. Sorting
/// is done here rather than relying on serde_json's map type, which a feature elsewhere in the
/// dependency graph could switch to insertion order.
pub fn swift_sorted_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_sorted(value, &mut out);
    out
}

fn write_sorted(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_sorted(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_string(s, out),
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // serde_json never emits a `/` inside an escape sequence, so a plain replace is exact.
    let quoted = serde_json::to_string(s).expect("strings serialise");
    out.extend_from_slice(quoted.replace('/', "\\/").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn layer(media_type: &str, c: char, annotations: &[(&str, &str)]) -> Descriptor {
        descriptor(
            media_type,
            10,
            &digest(c),
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn writes_tart_shaped_manifests_and_reads_them_back() {
        let d1 = digest('d');
        let layers = vec![
            layer(media::VM_CONFIG, 'a', &[]),
            layer(
                media::DISK_V2,
                'b',
                &[
                    (media::UNCOMPRESSED_SIZE, "536870912"),
                    (media::UNCOMPRESSED_CONTENT_DIGEST, &d1),
                ],
            ),
            layer(
                media::DISK_V2,
                'c',
                &[
                    (media::UNCOMPRESSED_SIZE, "100"),
                    (media::UNCOMPRESSED_CONTENT_DIGEST, &d1),
                ],
            ),
            layer(media::NVRAM, 'e', &[]),
        ];
        let oci_config = layer(media::OCI_CONFIG, 'f', &[]);
        let bytes = build_manifest(&oci_config, &layers, 536871012, "2026-05-12T21:45:18Z");
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(r#"{"annotations":{"org.cirruslabs.tart.uncompressed-disk-size":"536871012","org.cirruslabs.tart.upload-time":"2026-05-12T21:45:18Z"},"config":{"digest":"sha256:ffff"#), "{text}");
        assert!(
            text.contains(r#""mediaType":"application\/vnd.oci.image.config.v1+json","size":10}"#),
            "{text}"
        );
        assert!(text.contains(r#"{"annotations":{},"digest":"sha256:aaaa"#), "{text}");
        assert!(
            text.ends_with(r#""mediaType":"application\/vnd.oci.image.manifest.v1+json","schemaVersion":2}"#),
            "{text}"
        );

        let parsed = TartManifest::parse(&bytes).unwrap();
        let DiskLayers::V2(disk) = &parsed.disk else {
            panic!("v2 expected")
        };
        assert_eq!(disk.iter().map(|l| l.offset).collect::<Vec<_>>(), [0, 536870912]);
        assert_eq!(parsed.uncompressed_disk_size, Some(536871012));
        assert_eq!(parsed.disk_compressed_size(), 20);
    }

    #[test]
    fn refuses_manifests_that_are_not_tart_images() {
        let oci_config = layer(media::OCI_CONFIG, 'f', &[]);
        let config = layer(media::VM_CONFIG, 'a', &[]);
        let nvram = layer(media::NVRAM, 'e', &[]);
        let unannotated = layer(media::DISK_V2, 'b', &[]);
        let cases: Vec<(Vec<Descriptor>, &str)> = vec![
            (vec![config.clone(), nvram.clone()], "no disk layers"),
            (
                vec![config.clone(), unannotated, nvram.clone()],
                "lacks the org.cirruslabs.tart.uncompressed-size",
            ),
            (
                vec![config.clone(), layer(media::DISK_V1, 'b', &[])],
                "exactly one NVRAM layer",
            ),
            (
                vec![layer("application/vnd.docker.image.rootfs.diff.tar.gzip", 'b', &[])],
                "unexpected layer media type",
            ),
        ];
        for (layers, expected) in cases {
            let bytes = build_manifest(&oci_config, &layers, 0, "now");
            let err = format!("{:#}", TartManifest::parse(&bytes).unwrap_err());
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
        let v1 = build_manifest(&oci_config, &[config, layer(media::DISK_V1, 'b', &[]), nvram], 0, "now");
        assert!(matches!(TartManifest::parse(&v1).unwrap().disk, DiskLayers::V1(_)));
        assert!(TartManifest::parse(b"{\"schemaVersion\":2}").is_err());
    }
}
