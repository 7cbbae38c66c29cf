//! The Debian package (`scripts/package`), made from this build's `tart`, installed with
//! `apt-get install ./tart_*.deb` in a clean Debian root made by mmdebstrap, and used there: on
//! a "host" without /dev/kvm, with the package's own helpers, and without its firmware.
//!
//! The base root (Debian's `apt` variant plus the package's dependencies) is cached under
//! `build/package-test/`, keyed by the suite and the dependency list; each run installs into an
//! overlay of it, so the cache stays clean.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn output(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn build_package(out: &Path) -> PathBuf {
    let stdout = output(
        Command::new(repo_root().join("scripts/package"))
            .arg("--tart-binary")
            .arg(assert_cmd::cargo::cargo_bin("tart"))
            .arg("--out")
            .arg(out),
    );
    PathBuf::from(stdout.lines().last().expect("scripts/package prints the .deb's path"))
}

/// The cached root with the package's dependencies (and systemd, for `systemd-analyze`).
fn base_root(depends: &str) -> PathBuf {
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let suite = os_release
        .lines()
        .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
        .expect("VERSION_CODENAME in /etc/os-release");
    let mut packages: Vec<&str> = depends
        .split(',')
        .map(|item| item.split_whitespace().next().unwrap())
        .chain(["systemd"])
        .collect();
    packages.sort();
    let key = format!("{suite} {}", packages.join(","));
    let digest = output(Command::new("sh").args(["-c", "printf %s \"$0\" | sha256sum", &key]));
    let cache = repo_root().join("build/package-test");
    let root = cache.join(format!("base-{suite}-{}", &digest[..16]));
    if root.join("usr/bin/apt-get").exists() {
        return root;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let staging = tempfile::tempdir_in(&cache).unwrap();
    let target = staging.path().join("root");
    // Its own mount namespace: mmdebstrap's root mode mounts /proc and /dev in the target.
    output(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "mmdebstrap", "--quiet", "--mode=root", "--variant=apt"])
            .arg(format!("--include={}", packages.join(",")))
            .arg(suite)
            .arg(&target),
    );
    // Concurrent runs: the first to finish wins, the others use its root.
    let _ = std::fs::rename(&target, &root);
    root
}

/// Runs `script` (sh) chrooted into an overlay of `base` with the package at /tmp/tart.deb, a
/// /dev without kvm and the host's /proc and /sys. Returns its output, split at `### ` markers.
fn in_root(base: &Path, deb: &Path, script: &str) -> Vec<(String, i32, String)> {
    let work = tempfile::tempdir().unwrap();
    let outer = r#"
set -eu
base=$1 work=$2 deb=$3
mkdir "$work/upper" "$work/work" "$work/root"
root=$work/root
mount -t overlay overlay -o "lowerdir=$base,upperdir=$work/upper,workdir=$work/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -t tmpfs -o mode=755 tmpfs "$root/dev"
mkdir "$root/dev/net" "$root/dev/pts"
for node in null zero full random urandom tty net/tun; do
  touch "$root/dev/$node"
  mount --bind "/dev/$node" "$root/dev/$node"
done
cp "$deb" "$root/tmp/tart.deb"
exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  DEBIAN_FRONTEND=noninteractive /bin/sh -c "$4"
"#;
    let steps = format!(
        "step() {{ label=$1; shift; out=$(\"$@\" 2>&1); rc=$?; printf '### %s %s\\n%s\\n' \"$label\" \"$rc\" \"$out\"; }}\n{script}"
    );
    let stdout = output(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", outer, "sh"])
            .arg(base)
            .arg(work.path())
            .arg(deb)
            .arg(steps),
    );
    stdout
        .split("### ")
        .skip(1)
        .map(|section| {
            let (head, body) = section.split_once('\n').unwrap_or((section, ""));
            let (label, rc) = head.rsplit_once(' ').unwrap();
            (label.to_owned(), rc.parse().unwrap(), body.to_owned())
        })
        .collect()
}

#[test]
fn package_installs_and_works_in_a_clean_debian_root() {
    let out = tempfile::tempdir().unwrap();
    let deb = build_package(out.path());
    let depends = output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"));
    for needed in ["qemu-system-x86", "qemu-utils", "ovmf", "dnsmasq-base", "nftables", "libc6"] {
        assert!(
            depends.split(", ").any(|item| item.split_whitespace().next() == Some(needed)),
            "Depends: {depends}"
        );
    }
    let base = base_root(depends.trim());

    let steps = in_root(
        &base,
        &deb,
        "step install apt-get install -y --no-install-recommends /tmp/tart.deb
         step version tart --version
         step create tart create --linux vm
         step list tart list --quiet
         step doctor tart doctor
         step helpers sh -c '/usr/libexec/tart/virtiofsd --version && /usr/libexec/tart/vhost-device-vsock --version && /usr/lib/tart/tart-guest-agent --version'
         step files ls /usr/share/man/man1/tart.1.gz /usr/share/bash-completion/completions/tart /usr/share/zsh/vendor-completions/_tart /usr/share/fish/vendor_completions.d/tart.fish /etc/default/tart
         step verify systemd-analyze verify --man=no /usr/lib/systemd/system/tart@vm.service
         step remove-firmware dpkg --remove --force-depends ovmf
         step doctor-without-firmware tart doctor --format json",
    );
    let step = |label: &str| {
        steps
            .iter()
            .find(|(name, _, _)| name == label)
            .unwrap_or_else(|| panic!("no step {label} in {steps:#?}"))
    };
    let ok = |label: &str| {
        let (_, rc, out) = step(label);
        assert_eq!(*rc, 0, "{label}: {out}");
        out.clone()
    };
    ok("install");
    let version = ok("version");
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    ok("create");
    assert_eq!(ok("list").trim(), "vm");
    ok("helpers");
    ok("files");
    let verify = ok("verify");
    assert!(!verify.contains("tart@"), "systemd-analyze complains about the unit:\n{verify}");

    // No /dev/kvm in the root: TCG, and why; the package's own helpers are found.
    let doctor = ok("doctor");
    let accel = doctor.lines().find(|line| line.contains(" accelerator ")).unwrap();
    assert!(accel.starts_with("warning") && accel.contains("/dev/kvm") && accel.contains("TCG"), "{doctor}");
    assert!(doctor.contains("/usr/libexec/tart/virtiofsd: tart run --dir works"), "{doctor}");
    assert!(doctor.contains("/usr/libexec/tart/vhost-device-vsock") || doctor.contains("kernel vhost-vsock"), "{doctor}");
    assert!(doctor.trim_end().ends_with("warning(s))."), "{doctor}");

    let (_, rc, json) = step("doctor-without-firmware");
    assert_eq!(*rc, 1, "{json}");
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    let firmware = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "UEFI firmware")
        .unwrap();
    assert_eq!(firmware["status"], "problem", "{report:#}");
    assert_eq!(firmware["fix"], "apt-get install ovmf");
}
