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
use std::str::FromStr;

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
pub struct RootDiskOptions {
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

impl RootDiskOptions {
    /// Parses Tart's comma-separated list: `ro`, `sync=none|fsync|full`,
    /// `caching=automatic|cached|uncached`. Empty items are skipped; anything else is an error
    /// that names it (Tart would silently ignore a typo like `caching=uncahced`).
    pub fn parse(text: &str) -> Result<Self> {
        let mut options = RootDiskOptions::default();
        for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let invalid = |what: String| Error::InvalidRootDiskOptions(what);
            match item.split_once('=') {
                None if item == "ro" => options.read_only = true,
                Some(("sync", value)) => {
                    options.sync = match value {
                        "none" => SyncMode::None,
                        "fsync" => SyncMode::Fsync,
                        "full" => SyncMode::Full,
                        _ => {
                            return Err(invalid(format!(
                                "unknown sync mode {value:?} (expected none, fsync or full)"
                            )))
                        }
                    }
                }
                Some(("caching", value)) => {
                    options.caching = match value {
                        "automatic" => CachingMode::Automatic,
                        "cached" => CachingMode::Cached,
                        "uncached" => CachingMode::Uncached,
                        _ => {
                            return Err(invalid(format!(
                                "unknown caching mode {value:?} (expected automatic, cached or uncached)"
                            )))
                        }
                    }
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown option {item:?} (expected ro, sync=<mode> or caching=<mode>)"
                    )))
                }
            }
        }
        Ok(options)
    }

    pub fn qemu_cache(&self) -> QemuCache {
        QemuCache {
            direct: self.caching == CachingMode::Uncached,
            no_flush: self.sync == SyncMode::None,
        }
    }
}

impl FromStr for RootDiskOptions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        RootDiskOptions::parse(s)
    }
}

impl fmt::Display for RootDiskOptions {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tart_option_strings() {
        assert_eq!(RootDiskOptions::parse("").unwrap(), RootDiskOptions::default());
        let all = RootDiskOptions::parse("ro,sync=none,caching=uncached").unwrap();
        assert_eq!(
            all,
            RootDiskOptions {
                read_only: true,
                sync: SyncMode::None,
                caching: CachingMode::Uncached
            }
        );
        assert_eq!(all.to_string(), "ro,sync=none,caching=uncached");
        assert_eq!(RootDiskOptions::parse("sync=fsync,").unwrap().sync, SyncMode::Fsync);
        assert_eq!(
            "caching=cached".parse::<RootDiskOptions>().unwrap().caching,
            CachingMode::Cached
        );
        // Later items win, as with repeated flags.
        assert_eq!(
            RootDiskOptions::parse("sync=none,sync=full").unwrap().sync,
            SyncMode::Full
        );
    }

    #[test]
    fn errors_name_the_offending_item() {
        let err = |s: &str| RootDiskOptions::parse(s).unwrap_err().to_string();
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
        let cache = |s: &str| RootDiskOptions::parse(s).unwrap().qemu_cache().drive_option();
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
