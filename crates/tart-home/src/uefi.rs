use std::path::PathBuf;

use crate::{Arch, Error, Result};

/// Distribution paths of the empty UEFI variable store that `tart create --linux` copies into
/// `nvram.bin`, for the firmware builds QEMU boots (Debian's `ovmf` / `qemu-efi-aarch64` first).
fn candidates(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Amd64 => &[
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
            "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
            "/usr/share/edk2/ovmf/OVMF_VARS.fd",
        ],
        Arch::Arm64 => &[
            "/usr/share/AAVMF/AAVMF_VARS.fd",
            "/usr/share/edk2/aarch64/vars-template-pflash.raw",
            "/usr/share/edk2/aarch64/QEMU_VARS.fd",
        ],
    }
}

/// The UEFI variable store template for `arch`: `$TART_UEFI_VARS` if set, else the first
/// distribution path that exists.
pub fn vars_template(arch: Arch) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TART_UEFI_VARS").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    candidates(arch)
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .ok_or_else(|| Error::MissingFirmware {
            arch: arch.as_str(),
            package: match arch {
                Arch::Amd64 => "ovmf",
                Arch::Arm64 => "qemu-efi-aarch64",
            },
        })
}
