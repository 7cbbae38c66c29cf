//! VMs from cloud images (`create --from-image`) and their cloud-init seeds (`--user-data`,
//! new identities for clones, the CIDATA disk of `tart run`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use tart_cloudinit::{default_user_data, invoking_user_ssh_keys, validate_user_data, write_cidata_image, Seed};
use tart_home::{Arch, Error, StagingDir, VmDir};
use tart_image::{check_disk_size, convert_to_raw, download, inspect, DownloadCache};
use tart_qemu::{DiskOptions, DiskSource, ExtraDisk, ImageFormat};

use super::Context;
use crate::cli::CreateArgs;
use crate::progress::CliProgress;

const GB: u64 = 1_000_000_000;

/// `tart create --from-image`: the image (a file, or a URL downloaded into the cache) becomes the
/// VM's sparse raw disk, and the VM gets a seed. Everything is checked before the VM is staged.
pub fn create(ctx: &Context, args: &CreateArgs, location: &str) -> Result<()> {
    if !args.force && ctx.home.local_vm(&args.name)?.path().exists() {
        return Err(Error::VmAlreadyExists(args.name.clone()).into());
    }
    let user_data = match &args.user_data {
        Some(path) => read_user_data(path)?,
        None => default_user_data(&invoking_user_ssh_keys()),
    };
    let image = if Path::new(location).exists() {
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
    let info = inspect(&image)?;
    let size = args.disk_size.map(|gb| u64::from(gb) * GB);
    if let Some(size) = size {
        check_disk_size(&info, size)?;
    }
    let firmware = tart_qemu::firmware::find_firmware(Arch::host())?;
    ctx.home
        .create_linux_vm_with(&args.name, &firmware.vars_template, args.force, |staged| -> Result<()> {
            convert_to_raw(&image, &info, &staged.disk_path(), size)?;
            Seed::new(user_data, &args.name).save(&staged.seed_dir())?;
            Ok(())
        })
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
