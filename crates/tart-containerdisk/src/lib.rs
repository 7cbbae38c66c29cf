//! KubeVirt containerDisks: an ordinary container image (Docker v2 or OCI, tar layers) whose
//! filesystem holds one VM disk under `/disk` (`../shared/spec/containerdisk.md`).
//!
//! The layers are applied in manifest order as a container runtime would, whiteouts included,
//! but only as far as `/disk` is concerned: each layer is decompressed and read as a stream,
//! files elsewhere are read past, and only the bytes of files under `/disk` reach the disk,
//! sparsely. Exactly one file must remain there (KubeVirt's rule); its format is read from its
//! content (`disk.img` is often qcow2), and a qcow2, vmdk or vhdx file becomes the sparse raw
//! `disk.img` Tart VMs have. Each layer's uncompressed bytes are checked against the image
//! config's `rootfs.diff_ids`; its compressed bytes are the caller's to verify.
//!
//! Bounds, so that a small hostile layer cannot cost unbounded time, memory or disk: memory is
//! a few MiB of buffers whatever the image (a zstd window within libzstd's default limit of
//! 128 MiB); a disk file may not state more bytes than are free (a qcow2 file: its virtual
//! size), a qcow2 file's stated size must fit its own header's virtual size plus metadata, and
//! each layer's decompressed bytes may not exceed its disk files' stated sizes plus
//! [`NON_DISK_ALLOWANCE`] (tar headers and files outside `/disk`): decompression stops at that
//! bound. Paths with `..` and links that climb out of the image root are refused.

mod boot;
mod extract;
mod layer;
mod member;
mod names;
mod vm;

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

pub use boot::boot_firmware;
pub use extract::{Extractor, NON_DISK_ALLOWANCE};
pub use layer::Compression;
pub use names::disk_file;
pub use vm::{write_vm_files, ImageConfig};

/// Turns the disk file that [`Extractor::into_disk`] chose into the VM's sparse raw `disk.img`
/// in `staging`.
pub fn make_raw_disk(staging: &Path, image_path: &str, file: &Path) -> Result<()> {
    let disk = staging.join("disk.img");
    let made = tart_image::inspect(file)
        .and_then(|info| match info.format.as_str() {
            "raw" => fs::rename(file, &disk).map_err(|source| tart_image::Error::Io {
                context: format!("failed to rename {} to disk.img", file.display()),
                source,
            }),
            _ => tart_image::convert_to_raw(file, &info, &disk, None),
        })
        .with_context(|| format!("/{image_path} in the image"));
    // Converted, refused or moved: the file taken from the layers is not needed any more.
    let _ = fs::remove_file(file);
    made
}

#[cfg(test)]
mod tests;
