use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::io_context;
use crate::{Error, PidLock, Result, VmConfig};

/// A VM directory: a local VM under `vms/` or an image under `cache/OCIs/`.
#[derive(Clone, Debug)]
pub struct VmDir {
    path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Running,
    Suspended,
    Stopped,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Suspended => "suspended",
            VmState::Stopped => "stopped",
        }
    }
}

/// The files that make a directory a VM, in the order they are copied.
pub(crate) const VM_FILES: [&str; 3] = ["config.json", "nvram.bin", "disk.img"];

/// Name of the empty file whose mtime records when the VM was last used. `atime` cannot do this
/// job on Linux: `relatime`/`noatime` mounts update it rarely or never, and merely listing a
/// directory may bump it.
const ACCESS_MARKER: &str = ".tart-accessed";

/// Files of VMs that boot their own kernel (from vetu images), copied along when present.
const BOOT_FILES: [&str; 2] = ["kernel", "initramfs"];

impl VmDir {
    pub fn new(path: PathBuf) -> Self {
        VmDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.json")
    }

    pub fn disk_path(&self) -> PathBuf {
        self.path.join("disk.img")
    }

    pub fn nvram_path(&self) -> PathBuf {
        self.path.join("nvram.bin")
    }

    /// Gives the VM an empty UEFI variable store: a copy of the firmware's template.
    pub fn write_fresh_nvram(&self, template: &Path) -> Result<()> {
        fs::copy(template, self.nvram_path()).map_err(io_context(format!(
            "failed to copy the UEFI variable store template {}",
            template.display()
        )))?;
        Ok(())
    }

    /// The VM's own kernel, for direct kernel boot (VMs from vetu images).
    pub fn kernel_path(&self) -> PathBuf {
        self.path.join(BOOT_FILES[0])
    }

    pub fn initramfs_path(&self) -> PathBuf {
        self.path.join(BOOT_FILES[1])
    }

    pub fn state_path(&self) -> PathBuf {
        self.path.join("state.vzvmsave")
    }

    /// A new, sparse, all-zero `disk.img` of `size` bytes.
    pub fn create_empty_disk(&self, size: u64) -> Result<()> {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.disk_path())
            .and_then(|disk| disk.set_len(size))
            .map_err(io_context("failed to create disk.img"))
    }

    /// The VM's cloud-init NoCloud seed (`user-data`, `meta-data`, ...), if it has one.
    pub fn seed_dir(&self) -> PathBuf {
        self.path.join("cloud-init")
    }

    pub fn is_initialized(&self) -> bool {
        VM_FILES.iter().all(|file| self.path.join(file).is_file())
    }

    pub fn config(&self) -> Result<VmConfig> {
        let path = self.config_path();
        let bytes = fs::read(&path).map_err(io_context(format!("failed to read {}", path.display())))?;
        VmConfig::from_json(&bytes, &path)
    }

    /// Rewrites `config.json` in place rather than by rename: a running `tart run` holds its
    /// lock on this inode, and replacing the file would make the VM look stopped.
    pub fn save_config(&self, config: &VmConfig) -> Result<()> {
        let path = self.config_path();
        let context = || format!("failed to write {}", path.display());
        let json = config.to_pretty_json();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_context(context()))?;
        file.write_all(&json).map_err(io_context(context()))?;
        file.set_len(json.len() as u64).map_err(io_context(context()))?;
        file.sync_all().map_err(io_context(context()))
    }

    /// The PID of the `tart run` process that holds this VM, if any.
    pub fn running_pid(&self) -> Option<libc::pid_t> {
        PidLock::holder(&self.config_path())
    }

    pub fn state(&self) -> VmState {
        if self.running_pid().is_some() {
            VmState::Running
        } else if self.state_path().exists() {
            VmState::Suspended
        } else {
            VmState::Stopped
        }
    }

    /// Takes the running lock, or says the VM is running. Whoever holds the returned lock may
    /// delete or replace the VM without a `tart run` appearing in the middle.
    pub fn lock_not_running(&self, name: &str) -> Result<PidLock> {
        let path = self.config_path();
        match PidLock::try_acquire(&path) {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => Err(Error::VmIsRunning(name.to_owned())),
            Err(err) => Err(io_context(format!("failed to lock {}", path.display()))(err)),
        }
    }

    /// Sum of the logical sizes of the VM's files.
    pub fn size_bytes(&self) -> Result<u64> {
        self.sum_files(|meta| meta.len())
    }

    /// Sum of the space the VM's files occupy on disk (sparse holes and shared extents excluded
    /// or counted as the filesystem reports them).
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.sum_files(|meta| meta.blocks() * 512)
    }

    fn sum_files(&self, size: impl Fn(&fs::Metadata) -> u64) -> Result<u64> {
        let required = VM_FILES.iter().try_fold(0u64, |total, file| {
            let path = self.path.join(file);
            let meta = fs::metadata(&path).map_err(io_context(format!("failed to stat {}", path.display())))?;
            Ok::<_, Error>(total + size(&meta))
        })?;
        let boot: u64 = BOOT_FILES
            .iter()
            .filter_map(|file| fs::metadata(self.path.join(file)).ok())
            .map(|meta| size(&meta))
            .sum();
        Ok(required + boot)
    }

    pub fn access_date(&self) -> SystemTime {
        let marker = self.path.join(ACCESS_MARKER);
        fs::metadata(&marker)
            .or_else(|_| fs::metadata(&self.path))
            .and_then(|meta| meta.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Records a use of the VM for the LRU ordering of `tart prune` and automatic pruning.
    pub fn set_access_date(&self, date: AccessDate) -> Result<()> {
        let marker = self.path.join(ACCESS_MARKER);
        let when = match date {
            AccessDate::Now => SystemTime::now(),
            AccessDate::At(when) => when,
        };
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&marker)
            .map_err(io_context(format!(
                "failed to record access to {}",
                self.path.display()
            )))?;
        file.set_times(FileTimes::new().set_modified(when).set_accessed(when))
            .map_err(io_context(format!(
                "failed to record access to {}",
                self.path.display()
            )))
    }

    /// Copies the VM's files into the (empty) directory `target`, reflinked where possible; the
    /// saved machine state too when `with_state` and there is one, and the cloud-init seed.
    pub fn copy_files_into(&self, target: &Path, with_state: bool) -> Result<()> {
        let mut files = vec![self.config_path(), self.nvram_path(), self.disk_path()];
        if with_state && self.state_path().exists() {
            files.push(self.state_path());
        }
        files.extend(
            BOOT_FILES
                .iter()
                .map(|name| self.path.join(name))
                .filter(|path| path.exists()),
        );
        for file in &files {
            let name = file.file_name().expect("VM file paths have names");
            crate::clone_file(file, &target.join(name))
                .map_err(io_context(format!("failed to copy {}", file.display())))?;
        }
        let seed = self.seed_dir();
        if let Ok(entries) = fs::read_dir(&seed) {
            let target_seed = target.join("cloud-init");
            fs::create_dir(&target_seed).map_err(io_context(format!("failed to create {}", target_seed.display())))?;
            for entry in entries {
                let file = entry
                    .map_err(io_context(format!("failed to list {}", seed.display())))?
                    .path();
                let name = file.file_name().expect("directory entries have names");
                crate::clone_file(&file, &target_seed.join(name))
                    .map_err(io_context(format!("failed to copy {}", file.display())))?;
            }
        }
        Ok(())
    }

    /// Removes the VM. It is first renamed into `tmp_dir`, so an interrupted delete never leaves
    /// a half-deleted VM under `vms/` (tmp GC finishes the job).
    pub fn remove(self, tmp_dir: &Path) -> Result<()> {
        let doomed = tmp_dir.join(format!("deleted-{}", uuid::Uuid::new_v4()));
        fs::rename(&self.path, &doomed).map_err(io_context(format!("failed to delete {}", self.path.display())))?;
        crate::home::remove_path(&doomed).map_err(io_context(format!("failed to delete {}", doomed.display())))
    }
}

#[derive(Clone, Copy, Debug)]
pub enum AccessDate {
    Now,
    At(SystemTime),
}
