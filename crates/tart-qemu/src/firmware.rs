//! UEFI firmware (OVMF on x86_64, AAVMF on arm64) and the VM's variable store.
//!
//! QEMU boots a VM from two pflash devices: the firmware code, shared and read-only, and a
//! per-VM writable variable store (boot entries, Secure Boot keys...). A Linux VM made by our
//! `tart create` has `nvram.bin` = a copy of the firmware's empty store, and QEMU uses it
//! directly. A VM made by macOS Tart has Apple's `VZEFIVariableStore` format in `nvram.bin`,
//! which OVMF cannot read: we then leave `nvram.bin` untouched (it goes back to the registry on
//! push as it came) and boot with [`QEMU_NVRAM_FILE`] beside it, made from the firmware's template
//! the first time and kept after that, so boot entries the guest writes persist across runs.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tart_home::Arch;

use crate::error::io_context;
use crate::{Error, Result};

/// Our own UEFI variable store, used instead of a `nvram.bin` that is not one.
pub const QEMU_NVRAM_FILE: &str = "nvram.qemu.bin";

/// Overrides for the firmware code image and the variable store template. `TART_UEFI_VARS` is
/// also what `tart create` copies into `nvram.bin` (see `tart_home::vars_template`).
pub const CODE_ENV: &str = "TART_UEFI_CODE";
pub const VARS_ENV: &str = "TART_UEFI_VARS";

/// Offset and value of the signature of the EFI firmware volume header (`EFI_FIRMWARE_VOLUME_HEADER`:
/// 16-byte zero vector, 16-byte file system GUID, 8-byte length, then `_FVH`) that starts every
/// OVMF/AAVMF variable store.
const FV_SIGNATURE_OFFSET: usize = 40;
const FV_SIGNATURE: &[u8; 4] = b"_FVH";

/// A matching pair of firmware code and variable store template (they must come from the same
/// build: the store's size and layout are baked into the code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// Distribution paths, best first: Debian's `ovmf` (the 4 MiB builds are the default since
/// bookworm; the plain, non-secboot code image needs no SMM) and `qemu-efi-aarch64`, then Fedora
/// and Arch layouts.
fn candidates(arch: Arch) -> &'static [(&'static str, &'static str)] {
    match arch {
        Arch::Amd64 => &[
            ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
            ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
            ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
            (
                "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
                "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
            ),
        ],
        Arch::Arm64 => &[
            ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
            (
                "/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw",
                "/usr/share/edk2/aarch64/vars-template-pflash.raw",
            ),
        ],
    }
}

/// The Debian package that ships the UEFI firmware for `arch`.
pub fn firmware_package(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "ovmf",
        Arch::Arm64 => "qemu-efi-aarch64",
    }
}

/// The firmware for `arch`: `$TART_UEFI_CODE` / `$TART_UEFI_VARS` where set, else the first
/// distribution pair whose files exist.
pub fn find_firmware(arch: Arch) -> Result<Firmware> {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    find_firmware_in(arch, candidates(arch), env(CODE_ENV), env(VARS_ENV))
}

fn find_firmware_in(
    arch: Arch,
    candidates: &[(&str, &str)],
    code_override: Option<PathBuf>,
    vars_override: Option<PathBuf>,
) -> Result<Firmware> {
    let pair = candidates
        .iter()
        .map(|(code, vars)| (PathBuf::from(code), PathBuf::from(vars)))
        .find(|(code, vars)| {
            (code_override.is_some() || code.is_file()) && (vars_override.is_some() || vars.is_file())
        });
    let missing = || Error::MissingFirmware {
        arch: arch.as_str(),
        package: firmware_package(arch),
        looked_for: candidates.iter().map(|(code, _)| *code).collect::<Vec<_>>().join(", "),
    };
    let firmware = match (code_override, vars_override, pair) {
        (Some(code), Some(vars_template), _) => Firmware { code, vars_template },
        (code, vars, Some((default_code, default_vars))) => Firmware {
            code: code.unwrap_or(default_code),
            vars_template: vars.unwrap_or(default_vars),
        },
        (_, _, None) => return Err(missing()),
    };
    for path in [&firmware.code, &firmware.vars_template] {
        if !path.is_file() {
            return Err(Error::InvalidSpec(format!(
                "UEFI firmware file {} does not exist",
                path.display()
            )));
        }
    }
    Ok(firmware)
}

/// What a `nvram.bin` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NvramFormat {
    /// A variable store this firmware can use (same size as its template, firmware volume header).
    UefiVars,
    /// Anything else, e.g. Apple's `VZEFIVariableStore` from a VM made by macOS Tart; why.
    Foreign(String),
}

/// Classifies a variable store from its length and first bytes (at least 44 of them), against the
/// length of the firmware's template.
pub fn nvram_format(len: u64, head: &[u8], template_len: u64) -> NvramFormat {
    if len != template_len {
        return NvramFormat::Foreign(format!("{len} bytes, the firmware's variable store has {template_len}"));
    }
    if head.get(FV_SIGNATURE_OFFSET..FV_SIGNATURE_OFFSET + FV_SIGNATURE.len()) != Some(FV_SIGNATURE) {
        return NvramFormat::Foreign("no UEFI firmware volume header".into());
    }
    NvramFormat::UefiVars
}

fn file_nvram_format(path: &Path, template_len: u64) -> io::Result<NvramFormat> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut head = Vec::with_capacity(64);
    file.by_ref().take(64).read_to_end(&mut head)?;
    Ok(nvram_format(len, &head, template_len))
}

/// The variable store a VM boots with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvramChoice {
    /// The file QEMU gets as its writable pflash.
    pub path: PathBuf,
    /// Set when `nvram.bin` could not be used and [`QEMU_NVRAM_FILE`] is used instead: why.
    pub substituted: Option<String>,
}

/// Picks the variable store for a VM whose Tart store is `nvram_bin`: the file itself when it is
/// a store of this firmware, else [`QEMU_NVRAM_FILE`] in the same directory (created from the
/// template when missing or unusable, kept otherwise). `nvram_bin` is never written.
pub fn prepare_nvram(nvram_bin: &Path, firmware: &Firmware) -> Result<NvramChoice> {
    let template_len = fs::metadata(&firmware.vars_template)
        .map_err(io_context(format!(
            "failed to read {}",
            firmware.vars_template.display()
        )))?
        .len();
    let reason = match file_nvram_format(nvram_bin, template_len) {
        Ok(NvramFormat::UefiVars) => {
            return Ok(NvramChoice {
                path: nvram_bin.to_owned(),
                substituted: None,
            })
        }
        Ok(NvramFormat::Foreign(reason)) => reason,
        Err(e) if e.kind() == io::ErrorKind::NotFound => "missing".into(),
        Err(e) => return Err(io_context(format!("failed to read {}", nvram_bin.display()))(e)),
    };
    let substitute = nvram_bin.with_file_name(QEMU_NVRAM_FILE);
    let usable = matches!(file_nvram_format(&substitute, template_len), Ok(NvramFormat::UefiVars));
    if !usable {
        let tmp = nvram_bin.with_file_name(format!(".{QEMU_NVRAM_FILE}.tmp"));
        fs::copy(&firmware.vars_template, &tmp)
            .and_then(|_| File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &substitute))
            .map_err(io_context(format!("failed to create {}", substitute.display())))?;
    }
    Ok(NvramChoice {
        path: substitute,
        substituted: Some(format!(
            "{} is not a UEFI variable store of this firmware ({reason}); booting with {} instead",
            nvram_bin.display(),
            QEMU_NVRAM_FILE
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ovmf_like(len: usize) -> Vec<u8> {
        let mut bytes = vec![0xff; len];
        bytes[..40].fill(0);
        bytes[40..44].copy_from_slice(b"_FVH");
        bytes
    }

    #[test]
    fn detects_stores_by_size_and_volume_header() {
        let store = ovmf_like(4096);
        assert_eq!(nvram_format(4096, &store, 4096), NvramFormat::UefiVars);
        // Apple's VZEFIVariableStore: other size, no FV header.
        let apple = b"VZEFIVariableStore\0\0\0\0".repeat(4);
        assert!(
            matches!(nvram_format(apple.len() as u64, &apple, 4096), NvramFormat::Foreign(r) if r.contains("bytes"))
        );
        // Right size, wrong content.
        let zeros = vec![0u8; 4096];
        assert_eq!(
            nvram_format(4096, &zeros, 4096),
            NvramFormat::Foreign("no UEFI firmware volume header".into())
        );
        // Too short to even hold the header.
        assert!(matches!(nvram_format(10, &zeros[..10], 10), NvramFormat::Foreign(_)));
    }

    #[test]
    fn debian_ovmf_template_is_recognised() {
        let template = Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
        if !template.is_file() {
            return; // ovmf not installed: covered by the synthetic cases above
        }
        let len = fs::metadata(template).unwrap().len();
        assert_eq!(file_nvram_format(template, len).unwrap(), NvramFormat::UefiVars);
    }

    fn firmware_in(dir: &Path) -> Firmware {
        let firmware = Firmware {
            code: dir.join("CODE.fd"),
            vars_template: dir.join("VARS.fd"),
        };
        fs::write(&firmware.code, b"code").unwrap();
        fs::write(&firmware.vars_template, ovmf_like(8192)).unwrap();
        firmware
    }

    #[test]
    fn own_store_is_used_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let firmware = firmware_in(dir.path());
        let nvram = dir.path().join("nvram.bin");
        let mut store = ovmf_like(8192);
        store[100] = 7; // the guest wrote variables
        fs::write(&nvram, &store).unwrap();
        let choice = prepare_nvram(&nvram, &firmware).unwrap();
        assert_eq!(
            choice,
            NvramChoice {
                path: nvram,
                substituted: None
            }
        );
        assert!(!dir.path().join(QEMU_NVRAM_FILE).exists());
    }

    #[test]
    fn foreign_store_is_left_alone_and_a_substitute_kept_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let firmware = firmware_in(dir.path());
        let nvram = dir.path().join("nvram.bin");
        let apple = b"apple nvram".repeat(100);
        fs::write(&nvram, &apple).unwrap();

        let choice = prepare_nvram(&nvram, &firmware).unwrap();
        let substitute = dir.path().join(QEMU_NVRAM_FILE);
        assert_eq!(choice.path, substitute);
        let reason = choice.substituted.unwrap();
        assert!(
            reason.contains("is not a UEFI variable store") && reason.contains("1100 bytes"),
            "{reason}"
        );
        assert_eq!(fs::read(&nvram).unwrap(), apple);
        assert_eq!(fs::read(&substitute).unwrap(), ovmf_like(8192));

        // The guest's writes to the substitute survive the next run.
        let mut written = ovmf_like(8192);
        written[200] = 1;
        fs::write(&substitute, &written).unwrap();
        assert_eq!(prepare_nvram(&nvram, &firmware).unwrap().path, substitute);
        assert_eq!(fs::read(&substitute).unwrap(), written);

        // A broken substitute is replaced by a fresh template copy.
        fs::write(&substitute, b"junk").unwrap();
        prepare_nvram(&nvram, &firmware).unwrap();
        assert_eq!(fs::read(&substitute).unwrap(), ovmf_like(8192));
    }

    #[test]
    fn firmware_lookup_reports_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("c.fd").to_str().unwrap().to_owned();
        let vars = dir.path().join("v.fd").to_str().unwrap().to_owned();
        let pairs = [(code.as_str(), vars.as_str())];
        let err = find_firmware_in(Arch::Arm64, &pairs, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("no UEFI firmware for arm64 VMs (looked for ")
                && err.ends_with("install Debian's qemu-efi-aarch64 package (apt-get install qemu-efi-aarch64)"),
            "{err}"
        );
        fs::write(&code, b"c").unwrap();
        fs::write(&vars, b"v").unwrap();
        let found = find_firmware_in(Arch::Arm64, &pairs, None, None).unwrap();
        assert_eq!(found.code, Path::new(&code));
        let other_vars = dir.path().join("mine.fd");
        fs::write(&other_vars, b"v").unwrap();
        let found = find_firmware_in(Arch::Arm64, &pairs, None, Some(other_vars.clone())).unwrap();
        assert_eq!(
            (found.code.as_path(), found.vars_template),
            (Path::new(&code), other_vars)
        );
    }
}
