//! The programs and files `tart run` starts or loads: QEMU, the UEFI firmware, virtiofsd, the
//! shared network's tools, and the host firewall they must get past.

use std::path::Path;
use std::process::Command;

use tart_home::Arch;
use tart_qemu::{firmware, qemu_binary_name, HostInfo};

use crate::Check;

/// The QEMU release tart is developed and tested with (Debian 12's).
const TESTED_QEMU: (u32, u32) = (7, 2);

/// The host architecture's emulator (a problem when missing or unfit), and the other
/// architecture's (a warning: only those VMs need it).
pub fn qemu(host: &HostInfo) -> Vec<Check> {
    let other = match host.arch {
        Arch::Amd64 => Arch::Arm64,
        Arch::Arm64 => Arch::Amd64,
    };
    let native = emulator(host, host.arch);
    let foreign = match host.qemu_binary(other) {
        Ok(binary) => Check::ok(
            "QEMU (emulated)",
            format!("{} VMs: {}", other.as_str(), binary.display()),
        ),
        Err(_) => {
            let (binary, package) = qemu_binary_name(other);
            Check::warning(
                "QEMU (emulated)",
                format!("no {binary}: {} VMs cannot run", other.as_str()),
                format!("apt-get install {package} {}", firmware::firmware_package(other)),
            )
        }
    };
    vec![native, foreign]
}

fn emulator(host: &HostInfo, arch: Arch) -> Check {
    const NAME: &str = "QEMU";
    let (_, package) = qemu_binary_name(arch);
    let install = format!("apt-get install {package}");
    let binary = match host.qemu_binary(arch) {
        Ok(binary) => binary,
        Err(err) => return Check::problem(NAME, err.to_string(), install),
    };
    let version = output(&binary, &["--version"]);
    let Some((major, minor, text)) = version.as_deref().ok().and_then(parse_version) else {
        return Check::problem(
            NAME,
            format!(
                "{} does not run: {}",
                binary.display(),
                version
                    .err()
                    .unwrap_or_else(|| "no version in its --version output".into())
            ),
            format!("apt-get install --reinstall {package}"),
        );
    };
    let machine = match arch {
        Arch::Amd64 => "q35",
        Arch::Arm64 => "virt",
    };
    let machines = output(&binary, &["-machine", "help"]).unwrap_or_default();
    if !machines
        .lines()
        .any(|line| line.split_whitespace().next() == Some(machine))
    {
        return Check::problem(
            NAME,
            format!(
                "{} {text} has no machine type {machine}, which tart's VMs use",
                binary.display()
            ),
            install,
        );
    }
    let message = format!("{} {text}, machine {machine}", binary.display());
    if (major, minor) < TESTED_QEMU {
        return Check::warning(
            NAME,
            format!(
                "{message}: older than {}.{}, which tart is tested with",
                TESTED_QEMU.0, TESTED_QEMU.1
            ),
            format!("apt-get install -t <newer release> {package}"),
        );
    }
    Check::ok(NAME, message)
}

/// "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)" -> (7, 2, "7.2.19").
fn parse_version(output: &str) -> Option<(u32, u32, String)> {
    let text = output.lines().next()?.strip_prefix("QEMU emulator version ")?;
    let text = text.split_whitespace().next()?;
    let mut parts = text.split('.').map(str::parse::<u32>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?, text.to_owned()))
}

/// Standard output of `program args`, or why it failed.
fn output(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn firmware(arch: Arch) -> Check {
    const NAME: &str = "UEFI firmware";
    match firmware::find_firmware(arch) {
        Ok(found) => Check::ok(
            NAME,
            format!("{} and {}", found.code.display(), found.vars_template.display()),
        ),
        Err(err) => Check::problem(
            NAME,
            err.to_string(),
            format!("apt-get install {}", firmware::firmware_package(arch)),
        ),
    }
}

pub fn virtiofsd() -> Check {
    const NAME: &str = "virtiofsd";
    match tart_qemu::find_virtiofsd() {
        Some(path) => Check::ok(NAME, format!("{}: tart run --dir works", path.display())),
        None => Check::warning(
            NAME,
            "not found: tart run --dir cannot share directories",
            "cargo install --locked --root /usr/local virtiofsd (Debian 13: apt-get install virtiofsd)",
        ),
    }
}

/// `ip`, `nft`, `dnsmasq` and `dhcp_release`, which the shared network runs.
pub fn network_tools(net_admin: bool) -> Check {
    const NAME: &str = "network tools";
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut packages = Vec::new();
    for (program, package) in tart_net::SHARED_NETWORK_PROGRAMS {
        match tart_net::program(program, package) {
            Ok(path) => found.push(path.display().to_string()),
            Err(err) => {
                missing.push(err.to_string());
                packages.push(package);
            }
        }
    }
    if missing.is_empty() {
        return Check::ok(NAME, found.join(", "));
    }
    Check::needed(
        net_admin,
        NAME,
        format!("the shared network cannot start: {}", missing.join("; ")),
        format!("apt-get install {}", packages.join(" ")),
    )
}

/// Forwarded VM traffic must pass every netfilter base chain, iptables' too: Docker sets the
/// FORWARD policy to DROP, and with `br_netfilter` even traffic between VMs on the bridge goes
/// through it.
pub fn firewall() -> Check {
    const NAME: &str = "firewall";
    let bridge_calls_iptables =
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").is_ok_and(|value| value.trim() == "1");
    let br_netfilter = if bridge_calls_iptables {
        "br_netfilter passes bridged traffic through iptables"
    } else {
        "br_netfilter does not filter bridged traffic"
    };
    let Some(iptables) = tart_qemu::find_in_path("iptables", std::env::var_os("PATH").as_deref()) else {
        return Check::ok(NAME, format!("no iptables rules can drop VM traffic; {br_netfilter}"));
    };
    let rules = match output(&iptables, &["-S", "FORWARD"]) {
        Ok(rules) => rules,
        Err(err) => {
            return Check::ok(
                NAME,
                format!("cannot read iptables' FORWARD chain ({err}); {br_netfilter}"),
            )
        }
    };
    if !rules.lines().any(|line| line.trim() == "-P FORWARD DROP") {
        return Check::ok(NAME, format!("iptables' FORWARD policy accepts; {br_netfilter}"));
    }
    let chain = if output(&iptables, &["-S", "DOCKER-USER"]).is_ok() {
        "DOCKER-USER"
    } else {
        "FORWARD"
    };
    Check::warning(
        NAME,
        format!(
            "iptables' FORWARD policy is DROP (Docker sets it): VMs on the shared network cannot reach beyond the \
             host{}",
            if bridge_calls_iptables {
                ", and br_netfilter drops traffic between VMs too"
            } else {
                ""
            }
        ),
        format!("iptables -I {chain} -i tart0 -j ACCEPT && iptables -I {chain} -o tart0 -j ACCEPT"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_are_parsed() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright"),
            Some((7, 2, "7.2.19".to_owned()))
        );
        assert_eq!(
            parse_version("QEMU emulator version 10.0.0\n"),
            Some((10, 0, "10.0.0".to_owned()))
        );
        assert_eq!(parse_version("qemu-img version 7.2.19"), None);
    }
}
