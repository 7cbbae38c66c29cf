//! What an image file is, and its conversion to a sparse raw disk, both by `qemu-img`.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use crate::{io_context, refused, Result};

/// What cloud images come as. QEMU reads more (vpc, vdi, dmg, ...), none of which a
/// distribution ships its cloud images in.
const FORMATS: [&str; 4] = ["qcow2", "raw", "vmdk", "vhdx"];

/// An image file that tart will convert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// qemu-img's name of the format, one of qcow2, raw, vmdk, vhdx.
    pub format: String,
    /// Bytes the guest sees.
    pub virtual_size: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QemuImgInfo {
    format: String,
    virtual_size: u64,
    backing_filename: Option<String>,
}

/// Tells what `path` is, refusing anything but an intact qcow2, vmdk or vhdx image or a raw
/// disk: qemu-img takes any file for a raw image, so a raw one must at least start with a
/// partition table (an HTML error page or a tarball does not).
pub fn inspect(path: &Path) -> Result<ImageInfo> {
    let shown = path.display();
    let output = qemu_img(&["info", "--output=json"], path)?;
    if !output.status.success() {
        return Err(refused(format!(
            "{shown} is not a disk image tart can read ({})",
            last_line(&output.stderr)
        )));
    }
    let info: QemuImgInfo = serde_json::from_slice(&output.stdout)
        .map_err(|err| refused(format!("qemu-img info {shown} gave output tart cannot parse: {err}")))?;
    if !FORMATS.contains(&info.format.as_str()) {
        return Err(refused(format!(
            "{shown} is a {} image; tart takes qcow2, raw, vmdk or vhdx images",
            info.format
        )));
    }
    // A downloaded image naming a backing file could make qemu-img read any file of the host.
    if let Some(backing) = info.backing_filename {
        return Err(refused(format!(
            "{shown} is an overlay on {backing}; convert it to a standalone image first (qemu-img convert)"
        )));
    }
    if info.format == "raw" {
        if !has_partition_table(path)? {
            return Err(refused(format!(
                "{shown} is not a disk image: not qcow2, vmdk or vhdx, and no partition table as a raw disk has"
            )));
        }
    } else {
        let check = qemu_img(&["check", "-q", "-f", &info.format], path)?;
        // 0: clean; 3: leaked clusters only, which lose no data; 63: no check for this format.
        if !matches!(check.status.code(), Some(0 | 3 | 63)) {
            return Err(refused(format!(
                "{shown} is damaged or truncated (qemu-img check -f {} finds errors); get it again",
                info.format
            )));
        }
    }
    Ok(ImageInfo {
        format: info.format,
        virtual_size: info.virtual_size,
    })
}

/// Refuses a disk size smaller than what the image holds: the end of the guest's filesystem
/// would be cut off.
pub fn check_disk_size(info: &ImageInfo, size: u64) -> Result<()> {
    const GB: u64 = 1_000_000_000;
    if size < info.virtual_size {
        return Err(refused(format!(
            "--disk-size {} is smaller than the image's virtual size of {:.2} GB: pass --disk-size {} or more",
            size / GB,
            info.virtual_size as f64 / GB as f64,
            info.virtual_size.div_ceil(GB)
        )));
    }
    Ok(())
}

/// Converts the image at `source` into a new sparse raw disk at `target` (holes stay holes),
/// grown to `size` bytes when given. Made in a staging directory, whose move into place syncs it.
pub fn convert_to_raw(source: &Path, info: &ImageInfo, target: &Path, size: Option<u64>) -> Result<()> {
    if let Some(size) = size {
        check_disk_size(info, size)?;
    }
    let output = Command::new("qemu-img")
        .args(["convert", "-f", &info.format, "-O", "raw", "-S", "4k"])
        .arg(source)
        .arg(target)
        .output()
        .map_err(qemu_img_missing)?;
    if !output.status.success() {
        return Err(refused(format!(
            "failed to convert {}: {}",
            source.display(),
            last_line(&output.stderr).trim_start_matches("qemu-img: ")
        )));
    }
    let context = || format!("failed to write {}", target.display());
    let disk = OpenOptions::new()
        .write(true)
        .open(target)
        .map_err(io_context(context()))?;
    if let Some(size) = size.filter(|&size| size > info.virtual_size) {
        disk.set_len(size).map_err(io_context(context()))?;
    }
    Ok(())
}

fn qemu_img(args: &[&str], path: &Path) -> Result<std::process::Output> {
    Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .map_err(qemu_img_missing)
}

fn qemu_img_missing(err: std::io::Error) -> crate::Error {
    if err.kind() == std::io::ErrorKind::NotFound {
        refused("qemu-img is missing: install it (Debian: apt install qemu-utils)")
    } else {
        io_context("failed to run qemu-img")(err)
    }
}

/// An MBR boot signature: what both MBR- and GPT-partitioned disks have in their first sector.
fn has_partition_table(path: &Path) -> Result<bool> {
    let mut sector = [0u8; 512];
    let mut file = File::open(path).map_err(io_context(format!("failed to open {}", path.display())))?;
    match file.read_exact(&mut sector) {
        Ok(()) => Ok(sector[510..] == [0x55, 0xaa]),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(err) => Err(io_context(format!("failed to read {}", path.display()))(err)),
    }
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no reason given")
        .trim()
        .to_owned()
}
