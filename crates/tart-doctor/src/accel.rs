//! The accelerator `tart run` will use, and why not KVM when it is not.

use std::path::Path;

use tart_home::Arch;
use tart_qemu::{Accel, HostInfo, ACCEL_ENV};

use crate::Check;

const NAME: &str = "accelerator";

pub fn checks(host: &HostInfo) -> Vec<Check> {
    let choice = match host.choose_accel(host.arch) {
        Ok(choice) => choice,
        Err(err) => return vec![Check::problem(NAME, err.to_string(), format!("unset {ACCEL_ENV}"))],
    };
    if choice.accel == Accel::Kvm {
        return vec![Check::ok(NAME, format!("KVM ({})", choice.reason)), nested(host.arch)];
    }
    if host.accel_override.is_some() {
        return vec![Check::ok(NAME, format!("TCG ({})", choice.reason))];
    }
    let tcg = "VMs run under TCG, QEMU's emulator, many times slower than KVM";
    let check = match &host.kvm_device {
        // KVM is there but cannot run stock guests: a PVM-like paravirtual /dev/kvm.
        Ok(()) => {
            let kind = if Path::new("/sys/module/kvm_pvm").exists() {
                "PVM (module kvm_pvm), a paravirtual KVM"
            } else {
                "a paravirtual KVM"
            };
            Check::warning(
                NAME,
                format!("/dev/kvm is {kind} on a CPU without vmx/svm: stock guest kernels hang under it, so {tcg}"),
                "run tart on bare metal or on a cloud VM with nested virtualization (vmx or svm in /proc/cpuinfo)",
            )
        }
        Err(reason) if !host.hardware_virtualization => Check::warning(
            NAME,
            format!("no KVM ({reason}) and the CPU has no vmx/svm: {tcg}"),
            "enable VT-x/AMD-V in the firmware setup, or nested virtualization for this cloud VM",
        ),
        Err(reason) => Check::warning(
            NAME,
            format!("the CPU has hardware virtualization but KVM is not usable ({reason}): {tcg}"),
            if reason.contains("ermission denied") {
                "usermod -aG kvm $USER (then log in again)".to_owned()
            } else {
                format!("modprobe {}", kvm_module())
            },
        ),
    };
    vec![check]
}

/// `kvm_intel` or `kvm_amd`, from the CPU vendor.
fn kvm_module() -> &'static str {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo.contains("AuthenticAMD") {
        "kvm_amd"
    } else {
        "kvm_intel"
    }
}

/// Whether KVM lets guests run their own hypervisor (`tart run --nested`).
fn nested(arch: Arch) -> Check {
    const NESTED: &str = "nested";
    if arch == Arch::Arm64 {
        return Check::ok(
            NESTED,
            "arm64 guests get EL2 with tart run --nested where the host CPU has it",
        );
    }
    let module = kvm_module();
    let parameter = Path::new("/sys/module").join(module).join("parameters/nested");
    match std::fs::read_to_string(&parameter).map(|value| value.trim().to_owned()) {
        Ok(value) if value == "Y" || value == "1" => Check::ok(NESTED, "enabled: tart run --nested works"),
        _ => Check::warning(
            NESTED,
            format!(
                "nested virtualization is off ({}): tart run --nested cannot be used",
                parameter.display()
            ),
            format!(
                "echo \"options {module} nested=1\" >/etc/modprobe.d/tart-nested.conf && modprobe -r {module} && \
                 modprobe {module}"
            ),
        ),
    }
}
