//! The rest of the Tart VM directory around a containerDisk's disk.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tart_cloudinit::{default_user_data, invoking_user_ssh_keys, Seed};
use tart_home::{Arch, BootFirmware, VmConfig, VmDir};

/// What tart reads from a container image's config.
pub struct ImageConfig {
    /// `architecture` (Go's names, as in an index's platforms), which the VM must be.
    pub arch: Arch,
    /// `rootfs.diff_ids`: each layer's uncompressed digest, in manifest order.
    pub diff_ids: Vec<String>,
    /// `config.Labels.shasum`: kubevirt/containerdisks' upstream checksum of the disk file.
    pub shasum: Option<String>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig> {
        #[derive(serde::Deserialize)]
        struct Config {
            architecture: Option<String>,
            rootfs: Option<Rootfs>,
            config: Option<Settings>,
        }
        #[derive(serde::Deserialize)]
        struct Settings {
            #[serde(rename = "Labels", default)]
            labels: Option<std::collections::HashMap<String, String>>,
        }
        #[derive(serde::Deserialize)]
        struct Rootfs {
            #[serde(default)]
            diff_ids: Vec<String>,
        }
        let config: Config =
            serde_json::from_slice(bytes).context("the image config is not a container image config (JSON)")?;
        let arch = match config.architecture.as_deref() {
            Some("amd64") => Arch::Amd64,
            Some("arm64") => Arch::Arm64,
            // A config without it says nothing about its disk: the host's is the best guess.
            None | Some("") => Arch::host(),
            Some(other) => bail!("the image's disk is for {other}; tart runs amd64 and arm64 VMs"),
        };
        Ok(ImageConfig {
            arch,
            diff_ids: config.rootfs.map(|rootfs| rootfs.diff_ids).unwrap_or_default(),
            shasum: config
                .config
                .and_then(|settings| settings.labels)
                .and_then(|mut labels| labels.remove("shasum")),
        })
    }

    /// The `diff_id` of each of `layers` layers; none when the config lists none (it is
    /// optional in practice), an error when it lists another number of layers.
    pub fn layer_diff_ids(&self, layers: usize) -> Result<Vec<Option<&str>>> {
        match self.diff_ids.len() {
            0 => Ok(vec![None; layers]),
            n if n == layers => Ok(self.diff_ids.iter().map(|id| Some(id.as_str())).collect()),
            n => bail!(
                "the image config lists {n} layer digests (rootfs.diff_ids) for {layers} layers: the image is broken"
            ),
        }
    }
}

/// Writes `config.json`, `nvram.bin` (a copy of the UEFI firmware's `vars_template`) and the
/// cloud-init seed of a VM around the `disk.img` in `staging`, and keeps the image's manifest
/// as `manifest.json`.
pub fn write_vm_files(
    staging: &Path,
    arch: Arch,
    boot_firmware: Option<BootFirmware>,
    vars_template: &Path,
    manifest: &[u8],
) -> Result<()> {
    let vm = VmDir::new(staging.to_owned());
    // Also for BIOS VMs: every Tart VM has an nvram.bin (`tart push` sends it).
    vm.write_fresh_nvram(vars_template)?;
    // These disks have no login of their own (spec: every image needs a NoCloud seed): the
    // seed of `tart create --from-image`, which clones carry along with a new instance-id.
    Seed::new(default_user_data(&invoking_user_ssh_keys()), "containerdisk").save(&vm.seed_dir())?;
    let mut config = VmConfig::new_linux(arch);
    config.boot_firmware = boot_firmware;
    vm.save_config(&config)?;
    fs::write(staging.join("manifest.json"), manifest).context("failed to write manifest.json")
}
