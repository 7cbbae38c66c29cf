//! What the host offers: which QEMU binary runs a VM of a given architecture and with which
//! accelerator.
//!
//! KVM is chosen only when `/dev/kvm` answers *and* the CPU has hardware virtualisation (`vmx` or
//! `svm` in `/proc/cpuinfo` on x86). The second check matters: PVM hosts (KVM as a paravirtual
//! kernel module inside a cloud VM) have a working `/dev/kvm` without VMX, and an ordinary guest
//! kernel under `-accel kvm` there hangs right after the firmware. `TART_ACCEL=kvm|tcg` overrides
//! the choice. A VM of another architecture than the host always runs under TCG.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use tart_home::Arch;

use crate::{Error, Result};

/// Name of the variable that forces the accelerator.
pub const ACCEL_ENV: &str = "TART_ACCEL";

/// Where tart's Debian package puts the helper daemons it ships (`virtiofsd`,
/// `vhost-device-vsock`): outside `PATH`, so they never clash with a distribution's own packages
/// of them.
pub const HELPER_DIR: &str = "/usr/libexec/tart";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The facts about the host that decide how a VM is run. [`HostInfo::detect`] reads them from the
/// running system; tests build them with [`HostInfo::from_parts`].
#[derive(Clone, Debug)]
pub struct HostInfo {
    pub arch: Arch,
    /// `Ok` when `/dev/kvm` can be opened read-write and speaks the stable KVM API, else why not.
    pub kvm_device: Result<(), String>,
    /// Whether the CPU has hardware virtualisation (x86: `vmx`/`svm` flags; always true on arm64,
    /// where `/dev/kvm` only exists when the kernel runs at EL2).
    pub hardware_virtualization: bool,
    /// `TART_ACCEL`, if set and not empty.
    pub accel_override: Option<String>,
    /// `PATH`, where the QEMU binaries and helpers (`passt`) are looked up.
    pub path: Option<OsString>,
}

/// How a VM will be run on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    /// The VM's architecture is not the host's: QEMU emulates every instruction.
    pub emulated: bool,
    /// One line for the user, set when the choice makes the VM much slower than they may expect.
    pub warning: Option<String>,
    /// Why this accelerator, for logs.
    pub reason: String,
}

impl HostInfo {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let accel_override = std::env::var(ACCEL_ENV).ok();
        HostInfo::from_parts(
            Arch::host(),
            kvm_device_status(),
            &cpuinfo,
            accel_override.as_deref(),
            std::env::var_os("PATH"),
        )
    }

    pub fn from_parts(
        arch: Arch,
        kvm_device: Result<(), String>,
        cpuinfo: &str,
        accel_override: Option<&str>,
        path: Option<OsString>,
    ) -> Self {
        HostInfo {
            arch,
            kvm_device,
            hardware_virtualization: match arch {
                Arch::Amd64 => cpuinfo_has_hardware_virtualization(cpuinfo),
                Arch::Arm64 => true,
            },
            accel_override: accel_override.filter(|value| !value.is_empty()).map(str::to_owned),
            path,
        }
    }

    /// Picks the accelerator for a VM of `vm_arch` (pure: everything comes from `self`).
    pub fn choose_accel(&self, vm_arch: Arch) -> Result<AccelChoice> {
        let emulated = vm_arch != self.arch;
        let emulation_warning = || {
            format!(
                "warning: this is an {} VM on an {} host: QEMU emulates every instruction (TCG), expect it to be \
                 many times slower than a native VM",
                vm_arch.as_str(),
                self.arch.as_str()
            )
        };
        let tcg = |reason: String| AccelChoice {
            accel: Accel::Tcg,
            emulated,
            warning: emulated.then(emulation_warning),
            reason,
        };
        match self.accel_override.as_deref() {
            Some("kvm") => {
                if emulated {
                    return Err(Error::KvmUnavailable(format!(
                        "the VM is {} and the host {}; KVM only runs VMs of the host's architecture",
                        vm_arch.as_str(),
                        self.arch.as_str()
                    )));
                }
                self.kvm_device.clone().map_err(Error::KvmUnavailable)?;
                Ok(AccelChoice {
                    accel: Accel::Kvm,
                    emulated,
                    warning: None,
                    reason: format!("{ACCEL_ENV}=kvm"),
                })
            }
            Some("tcg") => Ok(tcg(format!("{ACCEL_ENV}=tcg"))),
            Some(other) => Err(Error::InvalidAccelOverride(other.to_owned())),
            None if emulated => Ok(tcg(format!(
                "{} VM on an {} host",
                vm_arch.as_str(),
                self.arch.as_str()
            ))),
            None => match (&self.kvm_device, self.hardware_virtualization) {
                (Ok(()), true) => Ok(AccelChoice {
                    accel: Accel::Kvm,
                    emulated,
                    warning: None,
                    reason: "/dev/kvm is usable and the CPU has hardware virtualization".into(),
                }),
                (Ok(()), false) => Ok(tcg(format!(
                    "/dev/kvm exists but the CPU has no vmx/svm (paravirtualized KVM such as PVM hangs \
                     ordinary guests); set {ACCEL_ENV}=kvm to try it anyway"
                ))),
                (Err(reason), _) => Ok(tcg(format!("no KVM: {reason}"))),
            },
        }
    }

    /// The QEMU system emulator for VMs of `vm_arch`, from `PATH`.
    pub fn qemu_binary(&self, vm_arch: Arch) -> Result<PathBuf> {
        let (binary, package) = qemu_binary_name(vm_arch);
        find_in_path(binary, self.path.as_deref()).ok_or(Error::MissingQemu { binary, package })
    }

    /// A helper program (e.g. `passt`) from `PATH`.
    pub fn find_program(&self, name: &str) -> Option<PathBuf> {
        find_in_path(name, self.path.as_deref())
    }

    /// A helper daemon tart starts; see [`find_helper`].
    pub fn find_helper(&self, name: &str) -> Option<PathBuf> {
        find_helper(name, self.path.as_deref())
    }
}

/// A helper daemon tart starts (`virtiofsd`, `vhost-device-vsock`): from `path` first, so an
/// admin's own build wins, else the copy that tart's package ships in [`HELPER_DIR`].
pub fn find_helper(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    find_in_path(name, path).or_else(|| find_in_path(name, Some(OsStr::new(HELPER_DIR))))
}

/// The system emulator binary for `arch` and the Debian package that ships it.
pub fn qemu_binary_name(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::Amd64 => ("qemu-system-x86_64", "qemu-system-x86"),
        Arch::Arm64 => ("qemu-system-aarch64", "qemu-system-arm"),
    }
}

/// Whether any `flags` line of an x86 `/proc/cpuinfo` lists `vmx` (Intel VT-x) or `svm` (AMD-V).
pub fn cpuinfo_has_hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|line| {
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        key.trim() == "flags" && value.split_whitespace().any(|flag| flag == "vmx" || flag == "svm")
    })
}

/// Checks that `/dev/kvm` opens read-write and reports the stable API version (12).
pub fn kvm_device_status() -> Result<(), String> {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let version = unsafe { libc::ioctl(device.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    match version {
        12 => Ok(()),
        -1 => Err(format!("/dev/kvm: {}", std::io::Error::last_os_error())),
        other => Err(format!("/dev/kvm speaks KVM API version {other}, not 12")),
    }
}

/// The first executable `name` in the directories of `path` (a `PATH` value).
pub fn find_in_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVM_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr pae \
                               mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss syscall nx \
                               pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid \
                               tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt \
                               aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch\nbugs\t\t: \
                               spectre_v1\n";
    const VMX_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr vmx smx est tm2 ssse3\n\
                               vmx flags\t: vnmi preemption_timer invvpid ept_x_only\n";
    const SVM_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de svm extapic cr8_legacy abm\n";

    fn host(arch: Arch, kvm: Result<(), String>, cpuinfo: &str, accel: Option<&str>) -> HostInfo {
        HostInfo::from_parts(arch, kvm, cpuinfo, accel, None)
    }

    #[test]
    fn cpuinfo_flags_are_matched_as_words() {
        assert!(!cpuinfo_has_hardware_virtualization(PVM_CPUINFO));
        assert!(cpuinfo_has_hardware_virtualization(VMX_CPUINFO));
        assert!(cpuinfo_has_hardware_virtualization(SVM_CPUINFO));
        // "vmx flags" is its own key and "svmx" is not "svm".
        assert!(!cpuinfo_has_hardware_virtualization(
            "flags\t: fpu svmx\nvmx flags\t: ept\n"
        ));
        assert!(!cpuinfo_has_hardware_virtualization(""));
    }

    #[test]
    fn kvm_needs_the_device_and_vmx_or_svm() {
        let choice = host(Arch::Amd64, Ok(()), VMX_CPUINFO, None)
            .choose_accel(Arch::Amd64)
            .unwrap();
        assert_eq!(
            (choice.accel, choice.emulated, choice.warning),
            (Accel::Kvm, false, None)
        );
        let choice = host(Arch::Amd64, Ok(()), SVM_CPUINFO, None)
            .choose_accel(Arch::Amd64)
            .unwrap();
        assert_eq!(choice.accel, Accel::Kvm);

        // PVM: /dev/kvm works, no vmx/svm -> TCG, and the reason says so.
        let choice = host(Arch::Amd64, Ok(()), PVM_CPUINFO, None)
            .choose_accel(Arch::Amd64)
            .unwrap();
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("no vmx/svm"), "{}", choice.reason);
        assert_eq!(choice.warning, None);

        let choice = host(
            Arch::Amd64,
            Err("cannot open /dev/kvm: No such file".into()),
            VMX_CPUINFO,
            None,
        )
        .choose_accel(Arch::Amd64)
        .unwrap();
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("No such file"), "{}", choice.reason);

        // arm64 has no cpuinfo flag for it: the device decides.
        let choice = host(Arch::Arm64, Ok(()), "Features\t: fp asimd\n", None)
            .choose_accel(Arch::Arm64)
            .unwrap();
        assert_eq!(choice.accel, Accel::Kvm);
    }

    #[test]
    fn tart_accel_forces_the_choice() {
        let pvm = host(Arch::Amd64, Ok(()), PVM_CPUINFO, Some("kvm"));
        assert_eq!(pvm.choose_accel(Arch::Amd64).unwrap().accel, Accel::Kvm);
        let vmx = host(Arch::Amd64, Ok(()), VMX_CPUINFO, Some("tcg"));
        assert_eq!(vmx.choose_accel(Arch::Amd64).unwrap().accel, Accel::Tcg);
        let empty = host(Arch::Amd64, Ok(()), VMX_CPUINFO, Some(""));
        assert_eq!(empty.choose_accel(Arch::Amd64).unwrap().accel, Accel::Kvm);

        let no_device = host(
            Arch::Amd64,
            Err("cannot open /dev/kvm: denied".into()),
            VMX_CPUINFO,
            Some("kvm"),
        );
        let err = no_device.choose_accel(Arch::Amd64).unwrap_err().to_string();
        assert_eq!(
            err,
            "TART_ACCEL=kvm, but KVM cannot be used: cannot open /dev/kvm: denied"
        );

        let bogus = host(Arch::Amd64, Ok(()), VMX_CPUINFO, Some("hvf"));
        let err = bogus.choose_accel(Arch::Amd64).unwrap_err().to_string();
        assert_eq!(err, "TART_ACCEL must be \"kvm\" or \"tcg\", not \"hvf\"");
    }

    #[test]
    fn other_architectures_are_emulated_with_a_warning() {
        let x86 = host(Arch::Amd64, Ok(()), VMX_CPUINFO, None);
        let choice = x86.choose_accel(Arch::Arm64).unwrap();
        assert_eq!((choice.accel, choice.emulated), (Accel::Tcg, true));
        let warning = choice.warning.unwrap();
        assert!(
            warning.starts_with("warning: this is an arm64 VM on an amd64 host"),
            "{warning}"
        );
        assert!(!warning.contains('\n'));

        let forced = host(Arch::Amd64, Ok(()), VMX_CPUINFO, Some("kvm"));
        let err = forced.choose_accel(Arch::Arm64).unwrap_err().to_string();
        assert!(err.contains("KVM only runs VMs of the host's architecture"), "{err}");
        assert!(host(Arch::Amd64, Ok(()), VMX_CPUINFO, Some("tcg"))
            .choose_accel(Arch::Arm64)
            .unwrap()
            .warning
            .is_some());
    }

    #[test]
    fn missing_qemu_names_the_debian_package() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostInfo::from_parts(Arch::Amd64, Ok(()), "", None, Some(dir.path().as_os_str().to_owned()));
        let err = host.qemu_binary(Arch::Arm64).unwrap_err().to_string();
        assert_eq!(
            err,
            "qemu-system-aarch64 not found in PATH: install Debian's qemu-system-arm package \
             (apt-get install qemu-system-arm)"
        );
        let err = host.qemu_binary(Arch::Amd64).unwrap_err().to_string();
        assert!(err.contains("qemu-system-x86 package"), "{err}");

        let binary = dir.path().join("qemu-system-x86_64");
        std::fs::write(&binary, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(host.qemu_binary(Arch::Amd64).unwrap(), binary);
    }
}
