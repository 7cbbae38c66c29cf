//! Multi-platform images (OCI image index, Docker manifest list): picking the manifest of one
//! platform before anything else is fetched.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use oci_spec::image::{Arch as OciArch, Descriptor, ImageIndex, Os, Platform};
use serde::Deserialize;
use tart_home::Arch;

use crate::manifest::check_digest;
use crate::media;
use crate::progress::Progress;
use crate::registry::Registry;

/// The image manifest `reference` names, and its digest: the manifest itself, or the one for
/// `arch` (the host's by default) when `reference` names an index.
pub(crate) async fn resolve(
    registry: &Registry,
    reference: &str,
    arch: Option<Arch>,
    progress: &dyn Progress,
) -> Result<(Bytes, String)> {
    let fetch = |reference: String| {
        registry.with_retries("pulling manifest", move || {
            let reference = reference.clone();
            async move { registry.manifest(&reference).await }
        })
    };
    let (bytes, digest) = fetch(reference.to_owned()).await?;
    if !is_index(&bytes) {
        return Ok((bytes, digest));
    }
    let arch = arch.unwrap_or_else(Arch::host);
    let chosen = choose(&bytes, arch)?;
    progress.line(&format!(
        "using the linux/{} image of the index: {chosen}",
        arch.as_str()
    ));
    let (bytes, digest) = fetch(chosen).await?;
    if is_index(&bytes) {
        bail!(
            "the index entry for linux/{} is another index; nested indexes are not supported",
            arch.as_str()
        );
    }
    Ok((bytes, digest))
}

fn describe(platform: &Platform) -> String {
    match platform.variant() {
        Some(variant) => format!("{}/{}/{variant}", platform.os(), platform.architecture()),
        None => format!("{}/{}", platform.os(), platform.architecture()),
    }
}

/// Entries such as buildx's attestation manifests (`unknown/unknown`) describe no platform one
/// can run.
fn is_runnable(platform: &Platform) -> bool {
    platform.os() != &Os::Other("unknown".into()) && platform.architecture() != &OciArch::Other("unknown".into())
}

/// Whether `manifest` is an index (OCI) or a manifest list (Docker) rather than one image.
pub fn is_index(manifest: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Kind {
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Kind>(manifest) {
        Ok(kind) => match kind.media_type.as_deref() {
            Some(media::OCI_INDEX | media::DOCKER_MANIFEST_LIST) => true,
            // The OCI index's `mediaType` is optional; `manifests` is what only an index has.
            None => kind.manifests.is_some(),
            Some(_) => false,
        },
        Err(_) => false,
    }
}

/// The digest of the index entry for `linux/<arch>`. Without one, the error lists the platforms
/// the index has, so the user can pick one with `--arch`.
pub fn choose(index: &[u8], arch: Arch) -> Result<String> {
    let index = ImageIndex::from_reader(index).context("the registry sent a malformed image index")?;
    let entries = index.manifests();
    let runnable: Vec<(&Descriptor, &Platform)> = entries
        .iter()
        .filter_map(|entry| entry.platform().as_ref().map(|platform| (entry, platform)))
        .filter(|(_, platform)| is_runnable(platform))
        .collect();
    let wanted = OciArch::from(arch.as_str());
    let chosen = runnable
        .iter()
        .find(|(_, platform)| platform.os() == &Os::Linux && platform.architecture() == &wanted);
    match chosen {
        Some((entry, _)) => {
            let digest = entry.digest().to_string();
            check_digest(&digest)?;
            Ok(digest)
        }
        None if runnable.is_empty() => bail!(
            "the image index lists no platform that can run (only {} entries without one, such as attestations)",
            entries.len()
        ),
        None => {
            let available: Vec<String> = runnable.iter().map(|(_, platform)| describe(platform)).collect();
            bail!(
                "the image has no linux/{} variant; it has {} (pick one with --arch)",
                arch.as_str(),
                available.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, char)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, c)| {
                serde_json::json!({
                    "mediaType": media::MANIFEST,
                    "digest": format!("sha256:{}", c.to_string().repeat(64)),
                    "size": 1,
                    "platform": {"os": os, "architecture": arch},
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests})).unwrap()
    }

    #[test]
    fn picks_the_platform_and_skips_attestations() {
        let bytes = index(&[
            ("unknown", "unknown", 'a'),
            ("linux", "arm64", 'b'),
            ("linux", "amd64", 'c'),
        ]);
        assert!(is_index(&bytes));
        assert_eq!(
            choose(&bytes, Arch::Amd64).unwrap(),
            format!("sha256:{}", "c".repeat(64))
        );
        assert_eq!(
            choose(&bytes, Arch::Arm64).unwrap(),
            format!("sha256:{}", "b".repeat(64))
        );
        assert!(!is_index(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#
        ));
    }

    #[test]
    fn a_missing_platform_names_those_that_exist() {
        let bytes = index(&[
            ("unknown", "unknown", 'a'),
            ("linux", "s390x", 'b'),
            ("linux", "amd64", 'c'),
        ]);
        let err = choose(&bytes, Arch::Arm64).unwrap_err().to_string();
        assert_eq!(
            err,
            "the image has no linux/arm64 variant; it has linux/s390x, linux/amd64 (pick one with --arch)"
        );
        let attestations_only = index(&[("unknown", "unknown", 'a')]);
        assert!(choose(&attestations_only, Arch::Amd64)
            .unwrap_err()
            .to_string()
            .contains("no platform that can run"));
    }
}
