//! `tart doctor` on this host: what it reports must match what the host offers, checked here
//! independently, and missing tools must be named with their Debian package.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

mod common;
use common::Home;

/// Runs `command` (a `tart` with its arguments up to `doctor`) with `--format json`: its exit
/// status and report.
fn doctor_json(command: &mut Command) -> (i32, serde_json::Value) {
    let out = command.args(["--format", "json"]).output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn cpu_has_vmx_or_svm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .any(|line| line.starts_with("flags") && line.split_whitespace().any(|flag| flag == "vmx" || flag == "svm"))
}

#[test]
fn doctor_describes_this_host() {
    let home = Home::empty();
    let (code, report) = doctor_json(home.tart().arg("doctor"));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["can_run_vms"], true);
    let problems: Vec<_> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|check| check["status"] == "problem")
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");

    let accel = check(&report, "accelerator");
    let message = accel["message"].as_str().unwrap();
    if kvm_opens() && !cpu_has_vmx_or_svm() {
        // This project's machines: PVM, which stock guests cannot use.
        assert_eq!(accel["status"], "warning", "{accel}");
        assert!(
            message.contains("paravirtual KVM") && message.contains("TCG"),
            "{message}"
        );
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert!(message.contains("PVM (module kvm_pvm)"), "{message}");
        }
    } else if kvm_opens() {
        assert!(message.starts_with("KVM"), "{message}");
    } else {
        assert!(message.contains("TCG"), "{message}");
    }

    let vsock = check(&report, "vsock");
    if Path::new("/dev/vhost-vsock").exists() {
        assert_eq!(vsock["status"], "ok", "{vsock}");
    } else {
        assert_eq!(vsock["status"], "warning", "{vsock}");
        assert!(
            vsock["message"].as_str().unwrap().contains("userspace fallback")
                && vsock["message"].as_str().unwrap().contains("vhost-device-vsock"),
            "{vsock}"
        );
        assert_eq!(vsock["fix"], "modprobe vhost_vsock");
    }
    for name in [
        "QEMU",
        "UEFI firmware",
        "network tools",
        "TART_HOME",
        "subnet",
        "CAP_NET_ADMIN",
    ] {
        assert_eq!(check(&report, name)["status"], "ok", "{name}: {report:#}");
    }

    // The text form: one line per check, its fix under it, a verdict at the end.
    let out = home.tart().arg("doctor").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().any(|line| line.starts_with("warning  vsock ")) || Path::new("/dev/vhost-vsock").exists());
    assert!(lines.iter().all(|line| ["ok ", "warning ", "problem ", " "]
        .iter()
        .any(|start| line.starts_with(start))
        || line.starts_with("This host can run VMs")));
    assert!(lines.last().unwrap().starts_with("This host can run VMs"), "{text}");
}

/// A `PATH` with the programs tart needs but `left_out`.
fn path_without(dir: &Path, left_out: &[&str]) -> String {
    // setpriv: the unprivileged case runs tart through it.
    for program in [
        "qemu-system-x86_64",
        "qemu-system-aarch64",
        "ip",
        "nft",
        "dnsmasq",
        "dhcp_release",
        "setpriv",
    ] {
        if left_out.contains(&program) {
            continue;
        }
        let found = tart_qemu::find_in_path(program, std::env::var_os("PATH").as_deref())
            .unwrap_or_else(|| panic!("{program} is not installed (scripts/setup installs it)"));
        symlink(found, dir.join(program)).unwrap();
    }
    dir.to_str().unwrap().to_owned()
}

#[test]
fn missing_network_tools_name_their_packages() {
    let home = Home::empty();
    let bin = tempfile::tempdir().unwrap();
    let path = path_without(bin.path(), &["dnsmasq", "nft"]);

    // As root the shared network is the default: tart run would fail.
    let (code, report) = doctor_json(home.tart().env("PATH", &path).arg("doctor"));
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["can_run_vms"], false);
    let tools = check(&report, "network tools");
    assert_eq!(tools["status"], "problem");
    assert_eq!(tools["fix"], "apt-get install nftables dnsmasq-base");
    let message = tools["message"].as_str().unwrap();
    assert!(
        message.contains("dnsmasq not found in PATH: install Debian's dnsmasq-base package")
            && message.contains("nft not found in PATH: install Debian's nftables package"),
        "{message}"
    );
    let out = home.tart().env("PATH", &path).arg("doctor").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("fix: apt-get install nftables dnsmasq-base"), "{text}");
    assert!(
        text.contains("This host cannot run VMs: fix the 1 problem(s) above"),
        "{text}"
    );

    // Without CAP_NET_ADMIN VMs use user-mode networking: only a warning.
    let (code, report) = doctor_json(home.tart_without_net_admin().env("PATH", &path).arg("doctor"));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(check(&report, "network tools")["status"], "warning");
    assert_eq!(check(&report, "CAP_NET_ADMIN")["status"], "warning");

    // No QEMU for the host's architecture: nothing can run.
    let bin = tempfile::tempdir().unwrap();
    let path = path_without(bin.path(), &["qemu-system-x86_64"]);
    let (code, report) = doctor_json(home.tart().env("PATH", &path).arg("doctor"));
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "QEMU")["fix"], "apt-get install qemu-system-x86");
}

/// A `network.json` subnet that the host routes through another interface is a problem, with a
/// free subnet in the fix; shown in a network namespace with a bridge holding it.
#[test]
fn subnet_clashing_with_a_host_route() {
    let home = Home::empty();
    let tart_home = home.dir.path().join("home");
    std::fs::create_dir_all(&tart_home).unwrap();
    std::fs::write(tart_home.join("network.json"), r#"{"subnet": "10.77.0.0/24"}"#).unwrap();
    let tart = home.tart();
    let mut doctor = Command::new("unshare");
    doctor
        .args(["--net", "sh", "-c"])
        .arg(
            "ip link add clash0 type bridge && ip addr add 10.77.0.9/16 dev clash0 && ip link set clash0 up && \
             exec \"$0\" \"$@\"",
        )
        .arg(tart.get_program())
        .arg("doctor");
    for (key, value) in tart.get_envs() {
        doctor.env(key, value.unwrap());
    }
    let (code, report) = doctor_json(&mut doctor);
    assert_eq!(code, 1, "{report:#}");
    let subnet = check(&report, "subnet");
    assert_eq!(subnet["status"], "problem");
    assert_eq!(
        subnet["message"],
        "the shared network's subnet 10.77.0.0/24 clashes with the host's route to 10.77.0.0/16 via clash0"
    );
    assert_eq!(
        subnet["fix"],
        format!(
            "echo '{{\"subnet\": \"192.168.64.0/24\"}}' >{}",
            tart_home.join("network.json").display()
        )
    );

    std::fs::write(tart_home.join("network.json"), r#"{"subnet": "8.8.8.0/24"}"#).unwrap();
    let (code, report) = doctor_json(home.tart().arg("doctor"));
    assert_eq!(code, 1, "{report:#}");
    let subnet = check(&report, "subnet");
    assert!(
        subnet["message"]
            .as_str()
            .unwrap()
            .contains("not a private (RFC 1918) network"),
        "{subnet}"
    );
}
