use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors whose text is what the user sees: `tart` prints them verbatim, as Tart does.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the specified VM \"{0}\" does not exist")]
    VmDoesNotExist(String),
    #[error("VM \"{0}\" is running")]
    VmIsRunning(String),
    #[error("VM \"{0}\" is not running")]
    VmNotRunning(String),
    #[error("VM \"{0}\" is already running!")]
    VmAlreadyRunning(String),
    #[error("VM \"{0}\" already exists; delete it first or pass --force to replace it")]
    VmAlreadyExists(String),
    #[error("invalid VM name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("VM is missing some of its files (config.json, disk.img or nvram.bin): {}", .0.display())]
    VmNotInitialized(PathBuf),
    #[error("failed to parse {}: {source}", path.display())]
    InvalidConfig { path: PathBuf, source: serde_json::Error },
    #[error("invalid config {}: {reason}", path.display())]
    ConfigConstraint { path: PathBuf, reason: String },
    #[error("TART_HOME is invalid: {} does not exist, yet we can't create it: {source}", path.display())]
    HomeNotCreatable { path: PathBuf, source: io::Error },
    #[error("TART_HOME is invalid: {} is not a directory", .0.display())]
    HomeNotDirectory(PathBuf),
    #[error("new disk size of {}GB should be larger than the current disk size of {}GB", .requested / 1_000_000_000, .current / 1_000_000_000)]
    DiskShrink { requested: u64, current: u64 },
    #[error("{} is not a usable .tvm archive: {reason}", path.display())]
    InvalidArchive { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Archive {
        path: PathBuf,
        source: apple_archive::Error,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl Error {
    /// Tart's exit codes: 2 for the "wrong VM state" family that scripts test for, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::VmDoesNotExist(_) | Error::VmIsRunning(_) | Error::VmNotRunning(_) | Error::VmAlreadyRunning(_) => 2,
            _ => 1,
        }
    }
}

/// Wraps an I/O error with what we were doing, so the one stderr line says what failed and where.
pub(crate) fn io_context<C: Into<String>>(context: C) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io {
        context: context.into(),
        source,
    }
}
