//! The Debian package (`scripts/package`), made from this build's `tart`, installed with
//! `apt-get install ./tart_*.deb` in a clean Debian root made by mmdebstrap, and used there: in a
//! chroot without /dev/kvm and then without its firmware, and in a container booted with a real
//! systemd (`systemd-nspawn`), where `tart@.service` runs, stops and kills the test guest.
//!
//! The base root (Debian's `apt` variant, the package's dependencies, systemd) is cached under
//! `build/package-test/`, keyed by the suite and the package list; each test installs into an
//! overlay of it, so the cache stays clean.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
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

/// The package of this build's tart, made once for all tests.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let stdout = output(
            Command::new(repo_root().join("scripts/package"))
                .arg("--tart-binary")
                .arg(assert_cmd::cargo::cargo_bin("tart"))
                .arg("--out")
                .arg(Path::new(env!("CARGO_TARGET_TMPDIR")).join("package")),
        );
        PathBuf::from(stdout.lines().last().expect("scripts/package prints the .deb's path"))
    })
}

fn depends() -> String {
    output(Command::new("dpkg-deb").arg("-f").arg(package()).arg("Depends"))
        .trim()
        .to_owned()
}

/// The cached root with the package's dependencies, systemd (and procps, for pgrep) made once.
fn base_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
        let suite = os_release
            .lines()
            .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
            .expect("VERSION_CODENAME in /etc/os-release");
        let depends = depends();
        let mut packages: Vec<&str> = depends
            .split(',')
            .map(|item| item.split_whitespace().next().unwrap())
            .chain(["systemd", "procps"])
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
                .args(["--mount", "--propagation", "private", "mmdebstrap", "--quiet"])
                .args(["--mode=root", "--variant=apt"])
                .arg(format!("--include={}", packages.join(",")))
                .arg(suite)
                .arg(&target),
        );
        // Concurrent runs on one machine: the first to finish wins, the others use its root.
        let _ = std::fs::rename(&target, &root);
        root
    })
}

/// One `step LABEL COMMAND...` of a script: its exit status and output.
struct Step {
    label: String,
    status: i32,
    output: String,
}

/// Runs `body` (sh, with `$root` and `step`) in a private mount namespace where `$root` is an
/// overlay of the base root holding the package and `files` in /root. Returns the steps.
fn in_root(files: &[&Path], body: &str) -> Vec<Step> {
    let work = tempfile::tempdir().unwrap();
    let preamble = r#"
set -eu
base=$1 work=$2 deb=$3
shift 3
root=$work/root
mkdir "$work/upper" "$work/work" "$root"
mount -t overlay overlay -o "lowerdir=$base,upperdir=$work/upper,workdir=$work/work" "$root"
cp "$deb" "$root/root/tart.deb"
for file; do cp --sparse=always "$file" "$root/root/"; done
set +e
step() { label=$1; shift; out=$("$@" 2>&1); rc=$?; printf '### %s %s\n%s\n' "$label" "$rc" "$out"; }
"#;
    let stdout = output(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{preamble}{body}"))
            .arg("sh")
            .arg(base_root())
            .arg(work.path())
            .arg(package())
            .args(files),
    );
    stdout
        .split("### ")
        .skip(1)
        .map(|section| {
            let (head, body) = section.split_once('\n').unwrap_or((section, ""));
            let (label, status) = head.rsplit_once(' ').unwrap();
            Step {
                label: label.to_owned(),
                status: status.parse().unwrap(),
                output: body.to_owned(),
            }
        })
        .collect()
}

fn step<'a>(steps: &'a [Step], label: &str) -> &'a Step {
    steps
        .iter()
        .find(|step| step.label == label)
        .unwrap_or_else(|| panic!("no step {label}"))
}

/// The output of a step that must succeed.
fn ok(steps: &[Step], label: &str) -> String {
    let step = step(steps, label);
    assert_eq!(step.status, 0, "{label}: {}", step.output);
    step.output.clone()
}

/// In a chroot: a /dev of its own without kvm, the host's /proc and /sys.
const CHROOT: &str = r#"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -t tmpfs -o mode=755 tmpfs "$root/dev"
mkdir "$root/dev/net" "$root/dev/pts"
for node in null zero full random urandom tty net/tun; do
  touch "$root/dev/$node"
  mount --bind "/dev/$node" "$root/dev/$node"
done
inside() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
step install inside apt-get install -y --no-install-recommends /root/tart.deb
step version inside tart --version
step create inside tart create --linux vm
step list inside tart list --quiet
step doctor inside tart doctor
step helpers inside sh -c '/usr/libexec/tart/virtiofsd --version && /usr/libexec/tart/vhost-device-vsock --version && /usr/lib/tart/tart-guest-agent --version'
step executor inside sh -c 'tart-gitlab-executor --version && CUSTOM_ENV_CI_JOB_ID=1 tart-gitlab-executor cleanup'
step files inside ls /usr/share/man/man1/tart.1.gz /usr/share/bash-completion/completions/tart /usr/share/zsh/vendor-completions/_tart /usr/share/fish/vendor_completions.d/tart.fish /etc/default/tart
step verify inside systemd-analyze verify --man=no /usr/lib/systemd/system/tart@vm.service
step remove-firmware inside dpkg --remove --force-depends ovmf
step doctor-without-firmware inside tart doctor --format json
"#;

#[test]
fn package_installs_and_works_in_a_clean_debian_root() {
    let depends = depends();
    for needed in [
        "qemu-system-x86",
        "qemu-utils",
        "ovmf",
        "dnsmasq-base",
        "nftables",
        "libc6",
    ] {
        assert!(
            depends
                .split(", ")
                .any(|item| item.split_whitespace().next() == Some(needed)),
            "Depends: {depends}"
        );
    }
    let steps = in_root(&[], CHROOT);
    ok(&steps, "install");
    let version = ok(&steps, "version");
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    ok(&steps, "create");
    assert_eq!(ok(&steps, "list").trim(), "vm");
    ok(&steps, "helpers");
    // The GitLab executor runs the tart beside it: cleanup of a job that made no VM.
    let executor = ok(&steps, "executor");
    assert!(executor.contains("nothing to delete"), "{executor}");
    ok(&steps, "files");
    let verify = ok(&steps, "verify");
    assert!(
        !verify.contains("tart@"),
        "systemd-analyze complains about the unit:\n{verify}"
    );

    // No /dev/kvm in the root: TCG, and why; the package's own helpers are found.
    let doctor = ok(&steps, "doctor");
    let accel = doctor.lines().find(|line| line.contains(" accelerator ")).unwrap();
    assert!(
        accel.starts_with("warning") && accel.contains("/dev/kvm") && accel.contains("TCG"),
        "{doctor}"
    );
    assert!(
        doctor.contains("/usr/libexec/tart/virtiofsd: tart run --dir works"),
        "{doctor}"
    );
    assert!(
        doctor.contains("/usr/libexec/tart/vhost-device-vsock") || doctor.contains("kernel vhost-vsock"),
        "{doctor}"
    );
    assert!(doctor.trim_end().ends_with("warning(s))."), "{doctor}");

    let without_firmware = step(&steps, "doctor-without-firmware");
    assert_eq!(without_firmware.status, 1, "{}", without_firmware.output);
    let report: serde_json::Value = serde_json::from_str(&without_firmware.output).unwrap();
    let firmware = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "UEFI firmware")
        .unwrap();
    assert_eq!(firmware["status"], "problem", "{report:#}");
    assert_eq!(firmware["fix"], "apt-get install ovmf");
}

/// A container booted with systemd (no network of its own: --private-network); the test guest
/// as VM `guest`, whose unit gets the documented kind of drop-in: its serial console in a file,
/// and short stop timeouts so that the test need not wait for the defaults.
const SYSTEMD: &str = r#"
systemd-nspawn --quiet --register=no --keep-unit --private-network -D "$root" --boot >"$work/console.log" 2>&1 &
nspawn=$!
leader=
for _ in $(seq 100); do leader=$(pgrep -P "$nspawn" | head -n 1); [ -n "$leader" ] && break; sleep 0.1; done
inside() { nsenter --target "$leader" --all env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
for _ in $(seq 300); do
  case "$(inside systemctl is-system-running 2>/dev/null)" in running|degraded) break ;; esac
  sleep 0.2
done
step boot inside systemctl is-system-running
step install inside apt-get install -y -q --no-install-recommends /root/tart.deb
step create inside sh -c 'tart create --linux --disk-size 1 guest && tart set guest --disk /root/test.img --cpu 1 --memory 512'
mkdir -p "$root/etc/systemd/system/tart@guest.service.d"
printf '[Service]\nEnvironment="TART_RUN_FLAGS=--net-user --serial-path /root/serial.log"\nEnvironment=TART_SHUTDOWN_TIMEOUT=10\nTimeoutStopSec=10\n' \
  >"$root/etc/systemd/system/tart@guest.service.d/test.conf"
inside systemctl daemon-reload
booted() {
  for _ in $(seq 900); do grep -q "TART-TEST-GUEST: booted" "$root/root/serial.log" 2>/dev/null && return 0; sleep 0.2; done
  return 1
}
stop() { inside sh -c 'start=$(date +%s); systemctl stop tart@guest; echo $(( $(date +%s) - start ))'; }

step start inside systemctl start tart@guest
step booted booted
step qemu inside pgrep -c qemu-system
step stop stop
step qemu-after-stop inside pgrep -c qemu-system
step journal inside journalctl -u tart@guest --no-pager -o cat
step serial cat "$root/root/serial.log"

rm "$root/root/serial.log"
step restart inside systemctl start tart@guest
step rebooted booted
step hang inside pkill -STOP -x qemu-system-x86
step stop-hung stop
step qemu-after-hung-stop inside pgrep -c qemu-system
step state-after-hung-stop inside systemctl show -p Result tart@guest

inside systemctl start tart@missing
# Type=exec: the unit is active once tart runs; it fails a moment later, when tart exits.
inside sh -c 'for _ in $(seq 100); do systemctl is-active -q tart@missing || exit 0; sleep 0.1; done'
step missing-state inside systemctl show -p ActiveState -p Result -p NRestarts tart@missing
step missing-journal inside journalctl -u tart@missing --no-pager -o cat

inside systemctl start poweroff.target --job-mode=replace-irreversibly --no-block
wait "$nspawn"
"#;

#[test]
fn unit_runs_stops_and_kills_a_vm_under_systemd() {
    let steps = in_root(&[tart_testkit::test_guest_image()], SYSTEMD);
    let boot = step(&steps, "boot");
    assert!(
        ["running", "degraded"].contains(&boot.output.trim()),
        "the container's systemd did not boot: {}",
        boot.output
    );
    ok(&steps, "install");
    ok(&steps, "create");
    ok(&steps, "start");
    ok(&steps, "booted");
    assert_eq!(ok(&steps, "qemu").trim(), "1");

    // Stopping asks the guest to shut down, and it does.
    let seconds: u32 = ok(&steps, "stop").trim().parse().unwrap();
    assert!(seconds < 10, "a guest that shuts down took {seconds} s to stop");
    assert_eq!(step(&steps, "qemu-after-stop").output.trim(), "0");
    let journal = ok(&steps, "journal");
    assert!(
        journal.contains("Requesting guest OS to stop...") && journal.contains("Deactivated successfully"),
        "{journal}"
    );
    assert!(ok(&steps, "serial").contains("TART-TEST-GUEST: powering off"));

    // A guest that never answers: the shutdown wait, SIGINT, then SIGKILL for all that is left.
    ok(&steps, "restart");
    ok(&steps, "rebooted");
    ok(&steps, "hang");
    let seconds: u32 = ok(&steps, "stop-hung").trim().parse().unwrap();
    assert!((10..60).contains(&seconds), "a hung VM took {seconds} s to stop");
    assert_eq!(
        step(&steps, "qemu-after-hung-stop").output.trim(),
        "0",
        "QEMU outlived its unit"
    );
    assert_eq!(ok(&steps, "state-after-hung-stop").trim(), "Result=timeout");

    // A VM that does not exist: tart's line in the journal, failed at once, never restarted.
    let state = ok(&steps, "missing-state");
    for line in ["ActiveState=failed", "Result=exit-code", "NRestarts=0"] {
        assert!(state.lines().any(|l| l == line), "{state}");
    }
    let journal = ok(&steps, "missing-journal");
    assert!(
        journal.contains("the specified VM \"missing\" does not exist"),
        "{journal}"
    );
}
