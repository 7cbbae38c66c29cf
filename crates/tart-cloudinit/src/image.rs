//! The `CIDATA` disk: a FAT filesystem image holding the seed's files, written in-process, so
//! neither root (mounts, loop devices) nor dosfstools/mtools are needed to make it.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use crate::{io_context, Result, Seed, META_DATA, NETWORK_CONFIG, USER_DATA};

/// The label NoCloud looks for (FAT labels are 11 bytes, space-padded).
const LABEL: [u8; 11] = *b"CIDATA     ";
/// FAT12 needs a few hundred KiB of its own; user-data scripts are rarely more than that.
const MIN_SIZE: u64 = 1 << 20;

/// Writes `seed` as a new FAT image at `path` (which must not exist).
pub fn write_cidata_image(seed: &Seed, path: &Path) -> Result<()> {
    let context = || format!("failed to write the cloud-init seed disk {}", path.display());
    let mut files: Vec<(&str, &[u8])> = vec![(USER_DATA, &seed.user_data), (META_DATA, &seed.meta_data)];
    if let Some(config) = &seed.network_config {
        files.push((NETWORK_CONFIG, config));
    }
    let payload: u64 = files.iter().map(|(_, bytes)| bytes.len() as u64).sum();
    // Room for the payload twice over (cluster slack, directory entries), in whole MiB.
    let size = (2 * payload + MIN_SIZE).div_ceil(MIN_SIZE) * MIN_SIZE;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_context(context()))?;
    let write = |file: &mut std::fs::File| -> io::Result<()> {
        file.set_len(size)?;
        fatfs::format_volume(&mut *file, fatfs::FormatVolumeOptions::new().volume_label(LABEL))?;
        let fs = fatfs::FileSystem::new(&mut *file, fatfs::FsOptions::new())?;
        let root = fs.root_dir();
        for (name, bytes) in &files {
            root.create_file(name)?.write_all(bytes)?;
        }
        drop(root);
        fs.unmount()?;
        file.sync_all()
    };
    write(&mut file).map_err(io_context(context()))
}
