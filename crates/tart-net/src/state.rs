//! Where the networks keep their run-time state: dnsmasq's leases, pid and log, the DHCP
//! reservations of Softnet and host-only VMs, and the attachment records of running VMs.
//!
//! The bridge, taps and rules belong to the host (one network namespace), not to a `TART_HOME`,
//! so neither does this directory: `/run/tart/network` by default (gone at reboot, with the
//! interfaces it describes), or `$TART_NETWORK_DIR` (one per network namespace, e.g. in tests).

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tart_home::FileLock;

use crate::{io_context, Result};

pub const STATE_DIR_ENV: &str = "TART_NETWORK_DIR";
const DEFAULT_STATE_DIR: &str = "/run/tart/network";

#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn locate() -> StateDir {
        let path = std::env::var_os(STATE_DIR_ENV)
            .filter(|dir| !dir.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
        StateDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// dnsmasq's lease file, what `tart ip --resolver dhcp` reads.
    pub fn lease_file(&self) -> PathBuf {
        self.path.join("dnsmasq.leases")
    }

    pub(crate) fn pid_file(&self) -> PathBuf {
        self.path.join("dnsmasq.pid")
    }

    pub(crate) fn log_file(&self) -> PathBuf {
        self.path.join("dnsmasq.log")
    }

    /// `--dhcp-hostsdir`: one `<mac>,<ip>` file per reserved address, read by dnsmasq as it
    /// appears.
    pub(crate) fn hosts_dir(&self) -> PathBuf {
        self.path.join("hosts")
    }

    pub(crate) fn attachments_dir(&self) -> PathBuf {
        self.path.join("attachments")
    }

    /// Creates the directory tree and takes its lock, which serialises every change to the
    /// networks. Readable by all: dnsmasq, which runs as `nobody`, reads the reservations, and
    /// unprivileged `tart ip` the leases.
    pub(crate) fn lock(&self) -> Result<FileLock> {
        for dir in [self.path.clone(), self.hosts_dir(), self.attachments_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dir)
                .map_err(io_context(format!("failed to create {}", dir.display())))?;
        }
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755))
            .map_err(io_context(format!("failed to make {} readable", self.path.display())))?;
        let lock = self.path.join("lock");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(io_context(format!("failed to create {}", lock.display())))?;
        Ok(FileLock::exclusive(&lock)?)
    }

    /// The dnsmasq serving this state directory, if it runs: its pid and arguments.
    pub(crate) fn running_dnsmasq(&self) -> Option<(libc::pid_t, Vec<String>)> {
        let pid: libc::pid_t = std::fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .skip(1)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let ours = format!("--dhcp-leasefile={}", self.lease_file().display());
        args.contains(&ours).then_some((pid, args))
    }
}
