//! VMs from cloud images (`create --from-image`) and their cloud-init seeds (`--user-data`,
//! new identities for clones, the CIDATA disk of `tart run`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use tart_cloudinit::{validate_user_data, write_cidata_image, Seed};
use tart_home::{Error, StagingDir, VmDir};
use tart_image::{check_disk_size, convert_to_raw, download, inspect, DownloadCache, ImageInfo};
use tart_qemu::{DiskOptions, DiskSource, ExtraDisk, ImageFormat};

use super::Context;
use crate::cli::CreateArgs;
use crate::progress::CliProgress;

const GB: u64 = 1_000_000_000;

/// The image of `create --from-image`, checked and (for a URL) downloaded, before anything is
/// staged: a bad one never gets as far as a VM directory.
pub struct SourceImage {
    path: PathBuf,
    info: ImageInfo,
    size: Option<u64>,
}

impl SourceImage {
    pub fn open(ctx: &Context, args: &CreateArgs, location: &str) -> Result<SourceImage> {
        // Before a download that may take minutes, not after.
        if !args.force && ctx.home.local_vm(&args.name)?.path().exists() {
            return Err(Error::VmAlreadyExists(args.name.clone()).into());
        }
        let path = if Path::new(location).exists() {
            if let Some(expected) = &args.sha256 {
                tart_image::check_sha256(Path::new(location), expected)?;
            }
            PathBuf::from(location)
        } else if location.contains("://") {
            let cache = DownloadCache {
                images: ctx.home.root().join("cache").join("images"),
                tmp: ctx.home.tmp_dir(),
            };
            download(&cache, location, args.sha256.as_deref(), &CliProgress::new())?
        } else {
            bail!("{location}: no such file (--from-image takes a file or an http(s) URL)");
        };
        let info = inspect(&path)?;
        let size = args.disk_size.map(|gb| u64::from(gb) * GB);
        if let Some(size) = size {
            check_disk_size(&info, size)?;
        }
        Ok(SourceImage { path, info, size })
    }

    /// The VM's sparse raw disk at `target`, converted from the image.
    pub fn write_disk(&self, target: &Path) -> Result<()> {
        Ok(convert_to_raw(&self.path, &self.info, target, self.size)?)
    }
}

/// User-data from a file, refused unless cloud-init would run it.
pub fn read_user_data(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    validate_user_data(&path.display().to_string(), &bytes)?;
    Ok(bytes)
}

/// `tart set --user-data`: new user-data is a new instance to cloud-init, which is what makes
/// it run the per-instance parts (users, `runcmd`) again. A VM without a seed (or with a broken
/// one) gets a new seed.
pub fn set_user_data(vm: &VmDir, name: &str, user_data: Vec<u8>) -> Result<()> {
    let seed = match Seed::load(&vm.seed_dir()) {
        Ok(Some(seed)) => Seed { user_data, ..seed }.renewed(name),
        Ok(None) | Err(tart_cloudinit::Error::Incomplete { .. }) => Seed::new(user_data, name),
        Err(err) => return Err(err.into()),
    };
    Ok(seed.save(&vm.seed_dir())?)
}

/// A clone is a new machine to cloud-init: new instance-id, its own hostname.
pub fn renew_identity(staged: &VmDir, name: &str) -> Result<()> {
    if let Some(seed) = Seed::load(&staged.seed_dir())? {
        seed.renewed(name).save(&staged.seed_dir())?;
    }
    Ok(())
}

/// The VM's seed as a read-only CIDATA disk for `tart run`, built in a staging directory that
/// lives as long as the returned guard (and is collected by the next command if we are killed).
pub fn seed_disk(ctx: &Context, vm: &VmDir) -> Result<Option<(ExtraDisk, StagingDir)>> {
    let Some(seed) = Seed::load(&vm.seed_dir())? else {
        return Ok(None);
    };
    let staging = ctx.home.staging_dir()?;
    let path = staging.path().join("cidata.img");
    write_cidata_image(&seed, &path)?;
    let disk = ExtraDisk {
        source: DiskSource::Image {
            path,
            format: ImageFormat::Raw,
        },
        options: DiskOptions {
            read_only: true,
            ..DiskOptions::default()
        },
    };
    Ok(Some((disk, staging)))
}
