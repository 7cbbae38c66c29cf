//! `--root-disk-opts`: Tart's options for the root disk and how they map onto QEMU.
//!
//! Tart (Virtualization.framework) has two independent knobs; QEMU's block layer has the same two
//! underneath its named cache modes (`cache.direct` = bypass the host page cache with O_DIRECT,
//! `cache.no-flush` = ignore the guest's flush requests). The guest always sees a volatile write
//! cache (writeback), as with VZ.
//!
//! | `caching=` \ `sync=`      | `full` (default), `fsync`          | `none`                                  |
//! |---------------------------|------------------------------------|-----------------------------------------|
//! | `automatic` (default), `cached` | `cache=writeback`            | `cache=unsafe`                          |
//! | `uncached`                | `cache=none` (O_DIRECT)            | `cache.direct=on,cache.no-flush=on`     |
//!
//! * `sync=full` and `sync=fsync` are the same on Linux: a guest flush becomes `fdatasync(2)`,
//!   which already flushes the drive's cache (macOS needs `F_FULLFSYNC` for that, hence two modes).
//! * `caching=automatic` lets the host decide; on Linux that is the page cache, as `cached`.
//! * `uncached` needs a filesystem with O_DIRECT (not tmpfs); QEMU refuses to start otherwise.
//! * `ro` attaches the disk read-only (`readonly=on`); the guest sees a read-only virtio-blk.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tart_home::Arch;

use crate::error::io_context;
use crate::{Error, Result};

/// What a guest flush request does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// Ignored: fast, and the guest's data is lost if the host crashes.
    None,
    /// `fsync(2)` on Linux (macOS: `fsync` without `F_FULLFSYNC`).
    Fsync,
    /// Data reaches stable storage (Linux: `fdatasync`, which flushes the drive cache).
    #[default]
    Full,
}

/// Whether the disk image goes through the host page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachingMode {
    #[default]
    Automatic,
    Cached,
    Uncached,
}

/// Options of the root disk, as `tart run --root-disk-opts` gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    pub read_only: bool,
    pub sync: SyncMode,
    pub caching: CachingMode,
}

/// The QEMU block-layer cache settings for a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QemuCache {
    /// `cache.direct`: O_DIRECT, bypass the host page cache.
    pub direct: bool,
    /// `cache.no-flush`: drop the guest's flush requests.
    pub no_flush: bool,
}

impl QemuCache {
    /// The `-drive` option text: QEMU's named mode where there is one.
    pub fn drive_option(self) -> &'static str {
        match (self.direct, self.no_flush) {
            (false, false) => "cache=writeback",
            (false, true) => "cache=unsafe",
            (true, false) => "cache=none",
            (true, true) => "cache.direct=on,cache.no-flush=on",
        }
    }
}

impl DiskOptions {
    /// Parses Tart's comma-separated list: `ro`, `sync=none|fsync|full`,
    /// `caching=automatic|cached|uncached`. Empty items are skipped; anything else is an error
    /// that names it (Tart would silently ignore a typo like `caching=uncahced`).
    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_items(text).map_err(Error::InvalidDiskOptions)
    }

    fn parse_items(text: &str) -> Result<Self, String> {
        let mut options = DiskOptions::default();
        for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            match item.split_once('=') {
                None if item == "ro" => options.read_only = true,
                Some(("sync", value)) => {
                    options.sync = match value {
                        "none" => SyncMode::None,
                        "fsync" => SyncMode::Fsync,
                        "full" => SyncMode::Full,
                        _ => return Err(format!("unknown sync mode {value:?} (expected none, fsync or full)")),
                    }
                }
                Some(("caching", value)) => {
                    options.caching = match value {
                        "automatic" => CachingMode::Automatic,
                        "cached" => CachingMode::Cached,
                        "uncached" => CachingMode::Uncached,
                        _ => {
                            return Err(format!(
                                "unknown caching mode {value:?} (expected automatic, cached or uncached)"
                            ))
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown option {item:?} (expected ro, sync=<mode> or caching=<mode>)"
                    ))
                }
            }
        }
        Ok(options)
    }

    /// Whether `component` (the last `:`-separated part of a `--disk` argument) holds options
    /// rather than a piece of the path: Tart's rule is "at least one recognised option".
    fn are_options(component: &str) -> bool {
        component
            .split(',')
            .map(str::trim)
            .any(|item| item == "ro" || item.starts_with("sync=") || item.starts_with("caching="))
    }

    pub fn qemu_cache(&self) -> QemuCache {
        QemuCache {
            direct: self.caching == CachingMode::Uncached,
            no_flush: self.sync == SyncMode::None,
        }
    }
}

impl FromStr for DiskOptions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        DiskOptions::parse(s)
    }
}

impl fmt::Display for DiskOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.read_only {
            f.write_str("ro,")?;
        }
        let sync = match self.sync {
            SyncMode::None => "none",
            SyncMode::Fsync => "fsync",
            SyncMode::Full => "full",
        };
        let caching = match self.caching {
            CachingMode::Automatic => "automatic",
            CachingMode::Cached => "cached",
            CachingMode::Uncached => "uncached",
        };
        write!(f, "sync={sync},caching={caching}")
    }
}

/// An additional disk of `tart run --disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraDisk {
    pub source: DiskSource,
    pub options: DiskOptions,
}

/// Where an extra disk's blocks come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// A disk image file, raw or qcow2 (told by its header, so QEMU never guesses).
    Image { path: PathBuf, format: ImageFormat },
    /// An ISO 9660 installer, attached read-only as a CD-ROM the firmware can boot when the root
    /// disk has nothing bootable yet.
    Iso(PathBuf),
    /// A host block device (`/dev/sdb`, `/dev/nvme1n1`, an LVM volume).
    BlockDevice(PathBuf),
    /// An NBD export as a QEMU URL: `nbd://host[:port]/export`, `nbd+unix:///export?socket=path`.
    Nbd(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Keeps an extra disk to this run: a `flock` on a writable image (as Tart, so two VMs never
/// write one image) or an `O_EXCL` descriptor of a block device (which fails while it is mounted,
/// and keeps it from being mounted while the VM runs). Released when dropped.
#[derive(Debug)]
pub struct DiskClaim {
    _file: File,
}

/// How `--disk` names a cached remote VM image: `Ok(None)` when `location` is not the name of a
/// remote VM, `Ok(Some(path))` for a private copy of its disk to attach, `Err(message)` when it
/// is one but cannot be used (not pulled yet, copy failed).
pub type RemoteDiskResolver<'a> = &'a mut dyn FnMut(&str) -> std::result::Result<Option<PathBuf>, String>;

const NBD_SCHEMES: [&str; 4] = ["nbd", "nbds", "nbd+unix", "nbds+unix"];

impl ExtraDisk {
    /// Reads a `--disk` argument as Tart does: options (`ro`, `sync=`, `caching=`) in the last
    /// `:`-separated component if it has at least one of them, then, in this order, an NBD URL, a
    /// block device, the name of a remote VM in the OCI cache (only when no file has that path:
    /// Tart would take `images/disk.img` for a remote name), an image file. The disk is checked
    /// and claimed ([`DiskClaim`]) here, so a bad one is refused before QEMU starts.
    pub fn open(
        argument: &str,
        vm_arch: Arch,
        remote_disk: RemoteDiskResolver,
    ) -> Result<(ExtraDisk, Option<DiskClaim>)> {
        let invalid = |reason: String| Error::InvalidDisk {
            argument: argument.to_owned(),
            reason,
        };
        let (location, options) = match argument.rsplit_once(':') {
            Some((rest, last)) if DiskOptions::are_options(last) => {
                (rest, DiskOptions::parse_items(last).map_err(invalid)?)
            }
            _ => (argument, DiskOptions::default()),
        };
        if location.is_empty() {
            return Err(invalid("no path".into()));
        }
        if let Some((scheme, _)) = location.split_once("://") {
            if NBD_SCHEMES.contains(&scheme) {
                if scheme.starts_with("nbds") {
                    return Err(invalid(
                        "NBD over TLS (nbds://) is not supported; use nbd:// on a trusted network or nbd+unix://"
                            .into(),
                    ));
                }
                return Ok((
                    ExtraDisk {
                        source: DiskSource::Nbd(location.to_owned()),
                        options,
                    },
                    None,
                ));
            }
        }
        let path = expand_tilde(location);
        let metadata = std::fs::metadata(&path);
        if metadata.as_ref().is_ok_and(|m| m.file_type().is_block_device()) {
            let claim = claim_block_device(&path, options.read_only)?;
            let source = DiskSource::BlockDevice(path);
            return Ok((ExtraDisk { source, options }, Some(claim)));
        }
        if metadata.is_err() {
            if let Some(copy) = remote_disk(location).map_err(invalid)? {
                let claim = claim_image(&copy)?;
                let source = DiskSource::Image {
                    path: copy,
                    format: ImageFormat::Raw,
                };
                return Ok((ExtraDisk { source, options }, Some(claim)));
            }
        }
        let metadata = metadata.map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        if !metadata.is_file() {
            return Err(invalid(format!(
                "{} is not a disk image file or block device",
                path.display()
            )));
        }
        if is_iso(&path) {
            check_iso_arch(&path, vm_arch).map_err(invalid)?;
            let options = DiskOptions {
                read_only: true,
                ..options
            };
            return Ok((
                ExtraDisk {
                    source: DiskSource::Iso(path),
                    options,
                },
                None,
            ));
        }
        let format = image_format(&path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let claim = if options.read_only {
            None
        } else {
            Some(claim_image(&path)?)
        };
        Ok((
            ExtraDisk {
                source: DiskSource::Image { path, format },
                options,
            },
            claim,
        ))
    }
}

fn expand_tilde(location: &str) -> PathBuf {
    match (location.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(location),
    }
}

fn is_iso(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("iso"))
}

/// Tart refuses `*-amd64.iso` on Apple silicon: an installer for the other architecture boots to
/// nothing (the firmware ignores it) and users wonder why.
fn check_iso_arch(path: &Path, vm_arch: Arch) -> std::result::Result<(), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let targets = |suffixes: &[&str]| suffixes.iter().any(|suffix| name.ends_with(suffix));
    let (other, suffix) = match vm_arch {
        Arch::Arm64 if targets(&["-amd64.iso", "-x86_64.iso"]) => ("x86", "-amd64.iso"),
        Arch::Amd64 if targets(&["-arm64.iso", "-aarch64.iso"]) => ("arm64", "-arm64.iso"),
        _ => return Ok(()),
    };
    Err(format!(
        "Seems you have a disk targeting {other} architecture (filename ends with {suffix}), \
         but the VM is {}; use the installer for the VM's architecture",
        vm_arch.as_str()
    ))
}

fn image_format(path: &Path) -> io::Result<ImageFormat> {
    let file = File::open(path)?;
    let mut magic = [0u8; 4];
    Ok(match file.read_exact_at(&mut magic, 0) {
        Ok(()) if &magic == b"QFI\xfb" => ImageFormat::Qcow2,
        Ok(()) => ImageFormat::Raw,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => ImageFormat::Raw,
        Err(e) => return Err(e),
    })
}

fn claim_image(path: &Path) -> Result<DiskClaim> {
    let file = File::open(path).map_err(io_context(format!("failed to open disk {}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(Error::DiskInUse(format!(
                "disk {} seems to be already in use, stop the VM or program that uses it first \
                 (or attach it read-only with :ro)",
                path.display()
            )));
        }
        return Err(io_context(format!("failed to lock disk {}", path.display()))(err));
    }
    Ok(DiskClaim { _file: file })
}

fn claim_block_device(path: &Path, read_only: bool) -> Result<DiskClaim> {
    let opened = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(path);
    match opened {
        Ok(file) => Ok(DiskClaim { _file: file }),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::DiskInUse(format!(
            "failed to open block device {}: already in use, try unmounting it via \"umount\" \
             (and check it is not part of a mounted RAID, LVM or swap)",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Error::DiskInUse(format!(
            "failed to open block device {}: permission denied, consider changing the disk's owner \
             using \"sudo chown $USER {}\" or adding yourself to the \"disk\" group",
            path.display(),
            path.display()
        ))),
        Err(e) => Err(io_context(format!("failed to open block device {}", path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tart_option_strings() {
        assert_eq!(DiskOptions::parse("").unwrap(), DiskOptions::default());
        let all = DiskOptions::parse("ro,sync=none,caching=uncached").unwrap();
        assert_eq!(
            all,
            DiskOptions {
                read_only: true,
                sync: SyncMode::None,
                caching: CachingMode::Uncached
            }
        );
        assert_eq!(all.to_string(), "ro,sync=none,caching=uncached");
        assert_eq!(DiskOptions::parse("sync=fsync,").unwrap().sync, SyncMode::Fsync);
        assert_eq!(
            "caching=cached".parse::<DiskOptions>().unwrap().caching,
            CachingMode::Cached
        );
        // Later items win, as with repeated flags.
        assert_eq!(DiskOptions::parse("sync=none,sync=full").unwrap().sync, SyncMode::Full);
    }

    #[test]
    fn errors_name_the_offending_item() {
        let err = |s: &str| DiskOptions::parse(s).unwrap_err().to_string();
        assert_eq!(
            err("ro,caching=uncahced"),
            "invalid --root-disk-opts: unknown caching mode \"uncahced\" (expected automatic, cached or uncached)"
        );
        assert_eq!(
            err("sync=always"),
            "invalid --root-disk-opts: unknown sync mode \"always\" (expected none, fsync or full)"
        );
        assert_eq!(
            err("rw"),
            "invalid --root-disk-opts: unknown option \"rw\" (expected ro, sync=<mode> or caching=<mode>)"
        );
        assert!(err("ro=yes").contains("unknown option \"ro=yes\""));
    }

    #[test]
    fn maps_onto_qemu_cache_modes() {
        let cache = |s: &str| DiskOptions::parse(s).unwrap().qemu_cache().drive_option();
        assert_eq!(cache(""), "cache=writeback");
        assert_eq!(cache("caching=automatic,sync=full"), "cache=writeback");
        assert_eq!(cache("caching=cached,sync=fsync"), "cache=writeback");
        assert_eq!(cache("sync=none"), "cache=unsafe");
        assert_eq!(cache("caching=cached,sync=none"), "cache=unsafe");
        assert_eq!(cache("caching=uncached"), "cache=none");
        assert_eq!(cache("caching=uncached,sync=fsync"), "cache=none");
        assert_eq!(cache("caching=uncached,sync=none"), "cache.direct=on,cache.no-flush=on");
    }
}
