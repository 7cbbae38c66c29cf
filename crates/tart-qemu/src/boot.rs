//! How a VM starts: UEFI firmware, or its own kernel (VMs from vetu images keep `kernel`,
//! `initramfs` and a command line, and vetu boots them with Cloud Hypervisor's `--kernel`; QEMU's
//! `-kernel/-initrd/-append` do the same, vetu-format.md §6).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use tart_home::{VmConfig, VmDir};

use crate::error::io_context;
use crate::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// UEFI from pflash: the firmware code (read-only) and the writable variable store.
    Uefi { code: PathBuf, vars: PathBuf },
    /// SeaBIOS (QEMU's default x86 firmware, used when no pflash is given) booting the disk's
    /// MBR boot loader.
    Bios,
    /// Direct kernel boot: no firmware of ours runs, the command line is passed verbatim.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// What the first bytes of a VM's `kernel` file are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// Something QEMU's `-kernel` loads: x86 bzImage, arm64 `Image`, ELF (PVH) — or a format
    /// we do not know, which QEMU then judges.
    Linux,
    /// An EDK2 firmware volume: vetu VMs made from Tart images carry Cloud Hypervisor's UEFI
    /// firmware as their "kernel", which QEMU cannot use; such VMs boot with QEMU's own UEFI.
    Firmware,
}

/// Magic numbers of vetu-format.md §6.
pub fn kernel_kind(head: &[u8]) -> KernelKind {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0x28, b"_FVH") && !at(0x202, b"HdrS") && !at(0x38, b"ARM\x64") && !at(0, b"\x7fELF") {
        KernelKind::Firmware
    } else {
        KernelKind::Linux
    }
}

/// The direct kernel boot of `vm`, if it has a kernel of its own that is not firmware.
pub(crate) fn direct_kernel(vm: &VmDir, config: &VmConfig) -> Result<Option<Boot>> {
    let kernel = vm.kernel_path();
    let head = match read_head(&kernel) {
        Ok(head) => head,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_context(format!("failed to read {}", kernel.display()))(err)),
    };
    if kernel_kind(&head) == KernelKind::Firmware {
        return Ok(None);
    }
    let initrd = vm.initramfs_path();
    Ok(Some(Boot::Kernel {
        kernel,
        initrd: initrd.is_file().then_some(initrd),
        cmdline: config.kernel_command_line.clone().unwrap_or_default(),
    }))
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(0x240);
    File::open(path)?.take(0x240).read_to_end(&mut head)?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; 0x240];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    #[test]
    fn tells_kernels_from_firmware() {
        assert_eq!(kernel_kind(&with(0x202, b"HdrS")), KernelKind::Linux);
        assert_eq!(kernel_kind(&with(0x38, b"ARM\x64")), KernelKind::Linux);
        assert_eq!(kernel_kind(&with(0, b"\x7fELF")), KernelKind::Linux);
        assert_eq!(kernel_kind(&with(0x28, b"_FVH")), KernelKind::Firmware);
        assert_eq!(kernel_kind(b"short"), KernelKind::Linux);
    }
}
