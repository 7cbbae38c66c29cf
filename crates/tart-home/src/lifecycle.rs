//! Making local VMs: every one is assembled in a staging directory and renamed into place.

use std::fs::{self, OpenOptions};
use std::path::Path;

use crate::error::io_context;
use crate::{clone_file, AccessDate, Arch, Error, Result, TartHome, VmConfig, VmDir, VmState};

impl TartHome {
    /// `tart create --linux`: an empty UEFI VM with a sparse raw disk of `disk_size` bytes.
    pub fn create_linux_vm(&self, name: &str, disk_size: u64, nvram_template: &Path, force: bool) -> Result<()> {
        self.create_linux_vm_with(name, nvram_template, force, |staged| {
            staged.create_empty_disk(disk_size)
        })
    }

    /// A new UEFI VM whose disk (and whatever else it needs) `fill` makes in the staging
    /// directory; nothing appears under `vms/` unless `fill` succeeds.
    pub fn create_linux_vm_with<E: From<Error>>(
        &self,
        name: &str,
        nvram_template: &Path,
        force: bool,
        fill: impl FnOnce(&VmDir) -> Result<(), E>,
    ) -> Result<(), E> {
        let target = self.vacant_target(name, force)?;
        let staging = self.staging_dir()?;
        let staged = VmDir::new(staging.path().to_owned());
        staged.write_fresh_nvram(nvram_template)?;
        fill(&staged)?;
        staged.save_config(&VmConfig::new_linux(Arch::host()))?;
        staged.set_access_date(AccessDate::Now)?;
        Ok(self.move_into_place(staging, &target, name, force)?)
    }

    /// Copies a VM (local, or an image from the OCI cache) to a new local VM. Files are reflinked
    /// where possible; the MAC address is regenerated when another local VM already uses it.
    /// `adapt` changes the staged copy before it moves into place (a new cloud-init identity).
    pub fn clone_vm<E: From<Error>>(
        &self,
        source: &VmDir,
        target_name: &str,
        force: bool,
        adapt: impl FnOnce(&VmDir) -> Result<(), E>,
    ) -> Result<(), E> {
        let target = self.vacant_target(target_name, force)?;
        let staging = self.staging_dir()?;
        let staged = VmDir::new(staging.path().to_owned());
        source.copy_files_into(staging.path(), true)?;
        adapt(&staged)?;
        let suspended = source.state() == VmState::Suspended;
        Ok(self.adopt_staged_vm(staging, &target, target_name, force, suspended)?)
    }

    /// Moves a VM assembled in `staging` to `target`, with a new MAC address if another local
    /// VM has its MAC, unless `keep_mac` (a suspended VM's saved state has the MAC baked in,
    /// so Tart keeps it even if shared).
    pub(crate) fn adopt_staged_vm(
        &self,
        staging: crate::StagingDir,
        target: &VmDir,
        name: &str,
        force: bool,
        keep_mac: bool,
    ) -> Result<()> {
        let staged = VmDir::new(staging.path().to_owned());
        let _global = self.global_lock()?;
        let mut config = staged.config()?;
        if !keep_mac && self.mac_in_use(&config, None)? {
            config.mac_address = crate::MacAddress::random();
            let _ = fs::remove_file(staged.state_path());
            staged.save_config(&config)?;
        }
        staged.set_access_date(AccessDate::Now)?;
        self.move_into_place(staging, target, name, force)
    }

    /// Whether a local VM other than `except` has the MAC address of `config`.
    pub fn mac_in_use(&self, config: &VmConfig, except: Option<&str>) -> Result<bool> {
        for (name, vm) in self.local_vms()? {
            if Some(name.as_str()) == except {
                continue;
            }
            if vm.config().is_ok_and(|other| other.mac_address == config.mac_address) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Replaces the VM's disk with a copy of `image` (`tart set --disk`), atomically.
    pub fn replace_disk(&self, vm: &VmDir, image: &Path) -> Result<()> {
        let staging = self.staging_dir()?;
        let staged_disk = staging.path().join("disk.img");
        clone_file(image, &staged_disk).map_err(io_context(format!("failed to copy {}", image.display())))?;
        fs::rename(&staged_disk, vm.disk_path()).map_err(io_context("failed to replace disk.img"))
    }

    /// Moves a VM to a new name; an existing VM of that name is never replaced.
    pub fn rename_vm(&self, source: &VmDir, target: &VmDir) -> Result<()> {
        match crate::home::renameat2(source.path(), target.path(), libc::RENAME_NOREPLACE) {
            Ok(()) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Err(Error::VmAlreadyExists(
                target
                    .path()
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            )),
            Err(err) => Err(io_context(format!("failed to rename {}", source.path().display()))(err)),
        }
    }

    pub(crate) fn vacant_target(&self, name: &str, force: bool) -> Result<VmDir> {
        let target = self.local_vm(name)?;
        if !force && target.path().exists() {
            return Err(Error::VmAlreadyExists(name.to_owned()));
        }
        Ok(target)
    }

    fn move_into_place(&self, staging: crate::StagingDir, target: &VmDir, name: &str, force: bool) -> Result<()> {
        // Replacing a VM that a `tart run` holds would pull the disk from under the guest.
        let _not_running = if force && target.config_path().exists() {
            Some(target.lock_not_running(name)?)
        } else {
            None
        };
        staging.persist(target.path(), force)
    }
}

/// Grows a raw disk image to `new_size` bytes; shrinking would destroy guest data.
pub fn grow_disk(disk: &Path, new_size: u64) -> Result<()> {
    let current = fs::metadata(disk)
        .map_err(io_context(format!("failed to stat {}", disk.display())))?
        .len();
    if new_size < current {
        return Err(Error::DiskShrink {
            requested: new_size,
            current,
        });
    }
    if new_size == current {
        return Ok(());
    }
    OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|file| file.set_len(new_size))
        .map_err(io_context(format!(
            "failed to grow {} to {new_size} bytes",
            disk.display()
        )))
}
