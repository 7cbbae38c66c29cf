//! The on-disk state of Tart: the `TART_HOME` tree, local VM directories and their `config.json`,
//! the locks that keep concurrent `tart` processes apart, copy-on-write cloning and pruning.
//!
//! Every VM that appears under `vms/` was fully built in `tmp/` first and moved into place with a
//! single rename, so readers never see a half-made VM.

mod config;
mod copy;
mod error;
mod home;
mod lifecycle;
mod lock;
mod mac;
mod name;
pub mod prune;
mod tvm;
mod vm;

pub use config::{
    tart_compact_json, tart_pretty_json, Arch, BootFirmware, DiskFormat, Display, DisplayUnit, ImageFormat, Os,
    VmConfig,
};
pub use copy::{clone_file, copy_sparse_range, seek_data, sync_dir};
pub use error::{Error, Result};
pub use home::{StagingDir, TartHome, DOWNLOAD_STAGING_PREFIX, PULL_STAGING_PREFIX};
pub use lifecycle::grow_disk;
pub use lock::{FileLock, PidLock};
pub use mac::MacAddress;
pub use name::validate_local_name;
pub use vm::{AccessDate, VmDir, VmState};
