//! Real Linux guests: the Debian 12 cloud image of `scripts/guest/build-debian-image`, served
//! over HTTP on 127.0.0.1, made into VMs by `create --from-image`, configured by real cloud-init
//! from tart's seed, reached by real sshd on tart's shared NAT network (inside a [`NetLab`]),
//! cloned, given new user-data, pushed to a real registry and cloned back. Then every kind of bad
//! input, none of which may leave anything under `vms/` or `cache/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use tart_testkit::{FileServer, NetLab, Registry};

mod common;
use common::{fails_with, stop, Home};

/// Boot to "cloud-init done" under TCG on a loaded 2-core machine takes 1–2 minutes.
const CLOUD_INIT_TIMEOUT: Duration = Duration::from_secs(600);

fn output_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `tart` in this process's network namespace (where the test's HTTP server and registry
/// listen), with `HOME` holding the invoking user's SSH keys.
fn tart_here(home: &Home, user_home: &Path) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("tart"));
    cmd.env("TART_HOME", home.dir.path().join("home"))
        .env("CI", "1")
        .env("HOME", user_home)
        .env_remove("SUDO_USER");
    cmd
}

fn succeed(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `tart run` that is stopped however the test ends: a failed assertion must not leave a VM
/// running for the rest of the suite.
struct Running<'a> {
    home: &'a Home,
    vm: &'static str,
    run: Option<Child>,
}

impl<'a> Running<'a> {
    fn start(home: &'a Home, vm: &'static str) -> Running<'a> {
        let run = Some(home.run_vm(vm, 1, &[]));
        Running { home, vm, run }
    }

    /// `tart stop`, after which `tart run` must exit with 0.
    fn stop(mut self) {
        stop(self.home, self.vm, self.run.take().unwrap());
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(mut run) = self.run.take() {
            let _ = self.home.tart().args(["stop", "--timeout", "10", self.vm]).output();
            let _ = run.kill();
            let _ = run.wait();
        }
    }
}

/// `sh -c script` in the guest through the agent; its stdout, which must be a success.
fn guest(home: &Home, vm: &str, script: &str) -> String {
    succeed(home.tart().args(["exec", vm, "sh", "-c", script]))
        .trim()
        .to_owned()
}

/// Waits for the agent, then for cloud-init to finish; its status must be `done`.
fn wait_for_cloud_init(home: &Home, vm: &str) {
    let started = Instant::now();
    home.ok(&[
        "ip",
        "--resolver",
        "agent",
        "--wait",
        &CLOUD_INIT_TIMEOUT.as_secs().to_string(),
        vm,
    ]);
    let out = home
        .tart()
        .args(["exec", vm, "cloud-init", "status", "--wait"])
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(text.contains("status: done"), "cloud-init in {vm}: {text}");
    eprintln!("{vm}: cloud-init done {:.0?} after tart run", started.elapsed());
}

/// A user's home with an SSH key pair, `~/.ssh/id_ed25519{,.pub}`.
fn user_with_key() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join(".ssh")).unwrap();
    succeed(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "tester", "-f"])
            .arg(dir.path().join(".ssh/id_ed25519")),
    );
    dir
}

/// `ssh admin@ip command` from the lab's host namespace, with the key, or with the password
/// `admin` when `key` is `None`.
fn ssh(lab: &NetLab, key: Option<&Path>, ip: &str, command: &str) -> Output {
    let mut cmd = match key {
        Some(_) => lab.command_in(&lab.host, "ssh"),
        None => {
            let mut cmd = lab.command_in(&lab.host, "sshpass");
            cmd.args(["-p", "admin", "ssh", "-o", "PubkeyAuthentication=no"]);
            cmd
        }
    };
    if let Some(key) = key {
        cmd.arg("-i").arg(key).args(["-o", "PasswordAuthentication=no"]);
    }
    cmd.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=30",
        "-o",
        "BatchMode=no",
        &format!("admin@{ip}"),
        command,
    ])
    .output()
    .unwrap()
}

/// The guest's root filesystem was grown to the disk of `disk_bytes` (ext4 and the ESP take
/// their share: within 10 %).
fn assert_root_filesystem_fills(home: &Home, vm: &str, disk_bytes: u64) {
    let size: u64 = guest(home, vm, "df -B1 --output=size / | tail -n 1").parse().unwrap();
    assert!(
        (disk_bytes / 10 * 9..=disk_bytes).contains(&size),
        "{vm}: a root filesystem of {size} bytes on a disk of {disk_bytes}"
    );
}

fn instance_id(home: &Home, vm: &str) -> String {
    let path = home.dir.path().join(format!("home/vms/{vm}/cloud-init/meta-data"));
    let text = fs::read_to_string(path).unwrap();
    text.lines()
        .find(|line| line.starts_with("instance-id:"))
        .unwrap()
        .to_owned()
}

/// The whole life of a real guest. Three boots share the work: the image as created from a
/// URL; a clone of it with new user-data and a bigger disk (new identity, same data, grown root
/// filesystem); the clone pushed to a registry and cloned back into a fresh TART_HOME.
#[test]
fn debian_cloud_image_from_url_to_registry_and_back() {
    let image = tart_testkit::debian_image();
    let served = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(image, served.path().join("debian.qcow2")).unwrap();
    let server = FileServer::start(served.path());
    let user = user_with_key();
    let key = user.path().join(".ssh/id_ed25519");
    let lab = NetLab::new();
    let home = Home::empty().in_lab(&lab);

    let started = Instant::now();
    succeed(tart_here(&home, user.path()).args([
        "create",
        "--from-image",
        &server.url("debian.qcow2"),
        "--disk-size",
        "4",
        "deb",
    ]));
    eprintln!("create --from-image (download + convert): {:.1?}", started.elapsed());
    home.ok(&["set", "deb", "--cpu", "2", "--memory", "1024"]);
    let info: serde_json::Value = serde_json::from_str(&home.ok(&["get", "deb", "--format", "json"])).unwrap();
    assert_eq!(info["CloudInit"], true);
    assert_eq!(info["Disk"], 4);

    // First boot: the seed's user, key, password, sudo; the root filesystem grown to the disk.
    let run = Running::start(&home, "deb");
    wait_for_cloud_init(&home, "deb");
    let ip = home.ok(&["ip", "--wait", "60", "deb"]).trim().to_owned();
    let out = ssh(&lab, Some(&key), &ip, "sudo -n true && hostname");
    assert!(out.status.success(), "ssh with the key: {}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "deb");
    let out = ssh(&lab, None, &ip, "true");
    assert!(out.status.success(), "ssh with the password: {}", output_text(&out));
    assert_root_filesystem_fills(&home, "deb", 4_000_000_000);
    guest(&home, "deb", "echo data-of-deb >/var/tmp/data && sync");
    let machine_id = guest(&home, "deb", "cat /etc/machine-id");
    let host_key = guest(&home, "deb", "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub");
    run.stop();

    // A clone of the booted VM, with user-data of its own: a new machine with the same data.
    home.ok(&["clone", "deb", "deb2"]);
    assert_ne!(instance_id(&home, "deb"), instance_id(&home, "deb2"));
    let user_data = home.dir.path().join("user-data");
    fs::write(
        &user_data,
        "#cloud-config\nruncmd:\n  - [sh, -c, 'echo runcmd-ran >/var/tmp/marker']\n",
    )
    .unwrap();
    home.ok(&[
        "set",
        "deb2",
        "--user-data",
        user_data.to_str().unwrap(),
        "--disk-size",
        "5",
    ]);
    let run = Running::start(&home, "deb2");
    wait_for_cloud_init(&home, "deb2");
    assert_root_filesystem_fills(&home, "deb2", 5_000_000_000);
    assert_eq!(guest(&home, "deb2", "cat /var/tmp/marker"), "runcmd-ran");
    assert_eq!(guest(&home, "deb2", "cat /var/tmp/data"), "data-of-deb");
    assert_eq!(guest(&home, "deb2", "hostname"), "deb2");
    assert_ne!(guest(&home, "deb2", "cat /etc/machine-id"), machine_id);
    assert_ne!(
        guest(&home, "deb2", "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"),
        host_key
    );
    let ip2 = home.ok(&["ip", "--wait", "60", "deb2"]).trim().to_owned();
    assert_ne!(ip2, ip, "a clone has a DHCP identity of its own");
    let out = ssh(&lab, Some(&key), &ip2, "true");
    assert!(out.status.success(), "ssh into the clone: {}", output_text(&out));
    run.stop();

    // Through a registry into a fresh TART_HOME: it still boots, with its data.
    let registry = Registry::anonymous();
    let name = format!("{}/guests/debian:test", registry.host());
    succeed(tart_here(&home, user.path()).args(["push", "--insecure", "deb2", &name]));
    let fresh = Home::empty();
    fresh.ok(&["clone", "--insecure", &name, "back"]);
    fresh.ok(&["set", "back", "--cpu", "2", "--memory", "1024"]);
    let run = Running::start(&fresh, "back");
    fresh.ok(&[
        "ip",
        "--resolver",
        "agent",
        "--wait",
        &CLOUD_INIT_TIMEOUT.as_secs().to_string(),
        "back",
    ]);
    assert_eq!(guest(&fresh, "back", "cat /var/tmp/data"), "data-of-deb");
    // Without a seed cloud-init falls back to no datasource: a new instance all the same, whose
    // SSH host keys sshd waits for.
    assert_eq!(
        guest(
            &fresh,
            "back",
            "cloud-init status --wait >/dev/null; systemctl is-active ssh"
        ),
        "active"
    );
    run.stop();
}

/// A small, valid qcow2 image (no guest in it) for the refusals, which never boot.
fn small_qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    succeed(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg(size),
    );
    path
}

fn entries(dir: PathBuf) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Nothing under `vms/` or in the image cache, and no download left to resume.
fn assert_nothing_made(home: &Home) {
    let root = home.dir.path().join("home");
    assert_eq!(entries(root.join("vms")), Vec::<String>::new());
    assert_eq!(entries(root.join("cache/images")), Vec::<String>::new());
    let tmp = entries(root.join("tmp"));
    assert!(!tmp.iter().any(|name| name.starts_with("download-")), "{tmp:?}");
}

fn create_from(home: &Home, image: &str, extra: &[&str]) -> Command {
    let mut cmd = home.tart();
    cmd.args(["create", "--from-image", image]).args(extra).arg("vm");
    cmd
}

#[test]
fn files_that_are_not_intact_disk_images_are_refused() {
    let home = Home::empty();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    fs::write(&text, "just some text\n").unwrap();
    let stderr = fails_with(
        &mut create_from(&home, text.to_str().unwrap(), &[]),
        1,
        "is not a disk image",
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let truncated = dir.path().join("truncated.qcow2");
    let mut whole = fs::File::open(tart_testkit::debian_image()).unwrap();
    std::io::copy(
        &mut std::io::Read::take(&mut whole, 20 << 20),
        &mut fs::File::create(&truncated).unwrap(),
    )
    .unwrap();
    fails_with(
        &mut create_from(&home, truncated.to_str().unwrap(), &[]),
        1,
        "is damaged or truncated",
    );

    let big = small_qcow2(dir.path(), "big.qcow2", "3G");
    fails_with(
        &mut create_from(&home, big.to_str().unwrap(), &["--disk-size", "2"]),
        1,
        "--disk-size 2 is smaller than the image's virtual size of 3.22 GB",
    );
    fails_with(&mut create_from(&home, "/nonexistent.qcow2", &[]), 1, "no such file");
    assert_nothing_made(&home);
}

/// Raw (with a partition table), vmdk and vhdx images become the same raw disk.
#[test]
fn raw_vmdk_and_vhdx_images_are_converted() {
    let home = Home::empty();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    fs::write(&raw, b"").unwrap();
    fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&raw)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), b"label: gpt\nstart=2048, type=L\n").unwrap();
    assert!(sfdisk.wait().unwrap().success());
    use std::os::unix::fs::FileExt;
    fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(b"payload", 20 << 20)
        .unwrap();
    let expected = fs::read(&raw).unwrap();
    for format in ["raw", "vmdk", "vhdx"] {
        let image = dir.path().join(format!("disk.{format}"));
        if format != "raw" {
            succeed(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-f", "raw", "-O", format])
                    .arg(&raw)
                    .arg(&image),
            );
        }
        home.ok(&["create", "--from-image", image.to_str().unwrap(), format]);
        let disk = fs::read(home.dir.path().join(format!("home/vms/{format}/disk.img"))).unwrap();
        assert!(disk == expected, "{format}: the disk differs from the image");
    }
}

#[test]
fn bad_downloads_are_refused_and_never_cached() {
    let home = Home::empty();
    let dir = tempfile::tempdir().unwrap();
    small_qcow2(dir.path(), "small.qcow2", "64M");
    fs::write(dir.path().join("page.qcow2"), "<html>not found</html>").unwrap();
    let server = FileServer::start(dir.path());

    fails_with(
        &mut create_from(&home, &server.url("missing.qcow2"), &[]),
        1,
        "HTTP 404 Not Found",
    );
    fails_with(
        &mut create_from(&home, &server.url(""), &[]),
        1,
        "returned an HTML page",
    );
    // Served as an image but holding an error page: refused by what it is.
    fails_with(
        &mut create_from(&home, &server.url("page.qcow2"), &[]),
        1,
        "is not a disk image",
    );
    let wrong = "0".repeat(64);
    fails_with(
        &mut create_from(&home, &server.url("small.qcow2"), &["--sha256", &wrong]),
        1,
        "checksum mismatch",
    );
    fails_with(
        &mut create_from(&home, &server.url("small.qcow2"), &["--sha256", "abc"]),
        1,
        "--sha256 must be 64 hexadecimal digits",
    );
    assert_nothing_made(&home);
    // The mismatching download was not kept to be resumed.
    assert_eq!(server.gets("small.qcow2"), [None]);
}

#[test]
fn downloads_resume_and_are_reused() {
    let home = Home::empty();
    let dir = tempfile::tempdir().unwrap();
    let image = small_qcow2(dir.path(), "small.qcow2", "64M");
    let len = fs::metadata(&image).unwrap().len();
    let sha256 = String::from_utf8(succeed(Command::new("sha256sum").arg(&image)).into_bytes()).unwrap();
    let sha256 = sha256.split_whitespace().next().unwrap().to_owned();
    let server = FileServer::start(dir.path());
    let url = server.url("small.qcow2");

    server.cut_after(1000, 1);
    fails_with(
        &mut create_from(&home, &url, &[]),
        1,
        &format!("broke off after 1000 of {len} bytes; run the command again to resume it"),
    );
    assert_eq!(entries(home.dir.path().join("home/vms")), Vec::<String>::new());
    assert_eq!(entries(home.dir.path().join("home/cache/images")), Vec::<String>::new());

    home.ok(&["create", "--from-image", &url, "--sha256", &sha256, "first"]);
    assert_eq!(server.gets("small.qcow2"), [None, Some("bytes=1000-".to_owned())]);
    // The second VM from that URL is made from the cache.
    home.ok(&["create", "--from-image", &url, "--sha256", &sha256, "second"]);
    assert_eq!(server.gets("small.qcow2").len(), 2);
    let disk = home.dir.path().join("home/vms/second/disk.img");
    assert_eq!(fs::metadata(disk).unwrap().len(), 64 << 20);
}

#[test]
fn user_data_and_seeds_are_checked() {
    let home = Home::empty();
    let dir = tempfile::tempdir().unwrap();
    let image = small_qcow2(dir.path(), "small.qcow2", "64M");
    let image = image.to_str().unwrap();
    let yaml = dir.path().join("user-data.yaml");
    fs::write(&yaml, "runcmd: [true]\n").unwrap();
    let yaml = yaml.to_str().unwrap();
    fails_with(
        &mut create_from(&home, image, &["--user-data", yaml]),
        1,
        "is not cloud-init user-data: it must start with \"#cloud-config\"",
    );
    assert_nothing_made(&home);

    home.ok(&["create", "--from-image", image, "vm"]);
    let seed = home.dir.path().join("home/vms/vm/cloud-init");
    let before = fs::read(seed.join("user-data")).unwrap();
    assert!(before.starts_with(b"#cloud-config\n"));
    fails_with(
        home.tart().args(["set", "vm", "--user-data", yaml]),
        1,
        "is not cloud-init user-data",
    );
    assert_eq!(fs::read(seed.join("user-data")).unwrap(), before);

    // New user-data is a new instance; so is a clone, which also gets its own hostname.
    let script = dir.path().join("script.sh");
    fs::write(&script, "#!/bin/sh\ntouch /done\n").unwrap();
    let id = instance_id(&home, "vm");
    home.ok(&["set", "vm", "--user-data", script.to_str().unwrap()]);
    assert_eq!(fs::read(seed.join("user-data")).unwrap(), b"#!/bin/sh\ntouch /done\n");
    assert_ne!(instance_id(&home, "vm"), id);
    home.ok(&["clone", "vm", "my_clone"]);
    let meta = fs::read_to_string(home.dir.path().join("home/vms/my_clone/cloud-init/meta-data")).unwrap();
    assert!(meta.contains("local-hostname: \"my-clone\""), "{meta}");
    assert_ne!(instance_id(&home, "my_clone"), instance_id(&home, "vm"));

    // A seed missing a file is refused before anything starts.
    fs::remove_file(seed.join("meta-data")).unwrap();
    fails_with(
        home.tart().args(["run", "--no-graphics", "--net-user", "vm"]),
        1,
        "has no meta-data: restore it, or write a new seed",
    );
    // `tart create --linux` without --user-data has no seed.
    home.ok(&["create", "--linux", "--disk-size", "1", "plain"]);
    let info: serde_json::Value = serde_json::from_str(&home.ok(&["get", "plain", "--format", "json"])).unwrap();
    assert_eq!(info["CloudInit"], false);
}
