use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong preparing, starting and driving a VM. The texts are meant to be
/// printed as they are by `tart run`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{binary} not found in PATH: install Debian's {package} package (apt-get install {package})")]
    MissingQemu {
        binary: &'static str,
        package: &'static str,
    },
    #[error(
        "no UEFI firmware for {arch} VMs (looked for {looked_for}): install Debian's {package} package \
         (apt-get install {package})"
    )]
    MissingFirmware {
        arch: &'static str,
        package: &'static str,
        looked_for: String,
    },
    #[error("TART_ACCEL must be \"kvm\" or \"tcg\", not {0:?}")]
    InvalidAccelOverride(String),
    #[error("TART_ACCEL=kvm, but KVM cannot be used: {0}")]
    KvmUnavailable(String),
    #[error("invalid --root-disk-opts: {0}")]
    InvalidDiskOptions(String),
    #[error("invalid --disk {argument:?}: {reason}")]
    InvalidDisk { argument: String, reason: String },
    #[error("invalid --dir {argument:?}: {reason}")]
    InvalidDirectoryShare { argument: String, reason: String },
    #[error("{0}")]
    DiskInUse(String),
    #[error("{program} not found in PATH: {hint}")]
    MissingHelper { program: &'static str, hint: &'static str },
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("path is not valid UTF-8, QEMU cannot be given it: {}", .0.display())]
    NonUtf8Path(PathBuf),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("QEMU exited while starting ({status}){}", fmt_stderr(.stderr))]
    QemuStartFailed { status: ExitStatus, stderr: String },
    #[error("{helper} exited while starting ({status}){}", fmt_stderr(.stderr))]
    HelperStartFailed {
        helper: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    #[error("QEMU did not {what} within {seconds} s")]
    Timeout { what: &'static str, seconds: u64 },
    #[error("QMP: {0}")]
    Qmp(#[from] crate::qmp::QmpError),
    #[error(
        "{} is not a VM state saved by QEMU (a suspended VM from macOS Tart cannot be resumed here); \
         delete it (tart stop) to boot the VM from its disk",
        .0.display()
    )]
    NotAQemuState(PathBuf),
    #[error(
        "QEMU refused the saved VM state {}: {reason}; the state file and the VM are left as they were \
         (a state saved by another QEMU version, accelerator or VM configuration cannot be restored; \
         tart stop discards it)",
        path.display()
    )]
    StateRejected { path: PathBuf, reason: String },
    #[error("failed to save the VM state: {0}")]
    SaveFailed(String),
    #[error("the VM is not running")]
    NotRunning,
}

fn fmt_stderr(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!(": {trimmed}")
    }
}

pub(crate) fn io_context<C: Into<String>>(context: C) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io {
        context: context.into(),
        source,
    }
}
