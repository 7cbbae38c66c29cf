//! The local-VM commands, run as the real binary against a temporary TART_HOME.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use assert_cmd::prelude::*;
use predicates::prelude::*;
use serde_json::Value;

struct Home {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Home {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tart-home");
        Home { _dir: dir, root }
    }

    fn tart(&self) -> Command {
        let mut cmd = Command::cargo_bin("tart").unwrap();
        cmd.env("TART_HOME", &self.root).env_remove("TART_NO_AUTO_PRUNE");
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.tart().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tart {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn vm(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    fn config(&self, name: &str) -> Value {
        serde_json::from_slice(&fs::read(self.vm(name).join("config.json")).unwrap()).unwrap()
    }

    fn vm_names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root.join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn tmp_entries(&self) -> usize {
        fs::read_dir(self.root.join("tmp")).unwrap().count()
    }
}

fn write_pattern(path: &Path, offset: u64, len: usize, byte: u8) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    let chunk = vec![byte; 1 << 20];
    let mut written = 0;
    while written < len {
        let n = chunk.len().min(len - written);
        std::os::unix::fs::FileExt::write_all_at(&file, &chunk[..n], offset + written as u64).unwrap();
        written += n;
    }
}

#[test]
fn create_clone_set_get_list_rename_delete() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "20", "base"]);
    let config = home.config("base");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["cpuCount"], 4);
    assert_eq!(config["memorySize"], 4u64 << 30);
    assert_eq!(
        config["arch"],
        if cfg!(target_arch = "aarch64") {
            "arm64"
        } else {
            "amd64"
        }
    );
    let disk = fs::metadata(home.vm("base").join("disk.img")).unwrap();
    assert_eq!(disk.len(), 20_000_000_000);
    assert!(disk.blocks() < 64, "a new disk is sparse");
    assert!(fs::metadata(home.vm("base").join("nvram.bin")).unwrap().len() > 0);

    home.ok(&["clone", "base", "work"]);
    assert_ne!(
        home.config("work")["macAddress"],
        config["macAddress"],
        "MAC in use: regenerated"
    );

    home.ok(&[
        "set",
        "work",
        "--cpu",
        "2",
        "--memory",
        "2048",
        "--display",
        "1280x800px",
        "--disk-size",
        "25",
    ]);
    let json: Value = serde_json::from_str(&home.ok(&["get", "work", "--format", "json"])).unwrap();
    assert_eq!(json["OS"], "linux");
    assert_eq!(json["CPU"], 2);
    assert_eq!(json["Memory"], 2048);
    assert_eq!(json["Disk"], 25);
    assert_eq!(json["DiskFormat"], "raw");
    assert_eq!(json["Display"], "1280x800px");
    assert_eq!(json["Running"], false);
    assert_eq!(json["State"], "stopped");
    assert_eq!(json["CloudInit"], false);
    assert_eq!(json["Format"], "tart", "a VM made locally");
    let text = home.ok(&["get", "work"]);
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        [
            "OS",
            "CPU",
            "Memory",
            "Disk",
            "DiskFormat",
            "Size",
            "Display",
            "State",
            "CloudInit",
            "Format"
        ]
    );
    assert_eq!(lines.next().unwrap().split_whitespace().next(), Some("linux"));

    let list: Value = serde_json::from_str(&home.ok(&["list", "--format", "json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "work"]);
    assert_eq!(list[0]["Source"], "local");
    assert!(list[0]["Accessed"].as_str().unwrap().ends_with('Z'));
    assert!(home.ok(&["list"]).starts_with("Source Name Disk Size Accessed"));
    assert_eq!(home.ok(&["list", "-q", "--source", "local"]), "base\nwork\n");
    assert_eq!(home.ok(&["list", "--source", "oci", "-q"]), "");

    home.ok(&["rename", "work", "renamed"]);
    assert_eq!(home.vm_names(), ["base", "renamed"]);
    home.tart()
        .args(["rename", "renamed", "base"])
        .assert()
        .code(1)
        .stderr("failed to rename VM renamed, target VM base already exists, delete it first!\n");
    home.tart()
        .args(["rename", "ghost", "x"])
        .assert()
        .code(1)
        .stderr("failed to rename a non-existent local VM: ghost\n");

    home.ok(&["delete", "renamed", "base"]);
    assert!(home.vm_names().is_empty());
    assert_eq!(home.tmp_entries(), 0);
    home.tart()
        .args(["delete", "base"])
        .assert()
        .code(2)
        .stderr("the specified VM \"base\" does not exist\n");
}

#[test]
fn existing_targets_are_kept_unless_forced() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "1", "a"]);
    home.ok(&["create", "--linux", "--disk-size", "2", "b"]);
    let b_config = fs::read(home.vm("b").join("config.json")).unwrap();
    for args in [&["create", "--linux", "b"][..], &["clone", "a", "b"][..]] {
        home.tart()
            .args(args)
            .assert()
            .code(1)
            .stderr(predicate::str::contains("VM \"b\" already exists").and(predicate::str::contains("--force")));
        assert_eq!(fs::read(home.vm("b").join("config.json")).unwrap(), b_config);
        assert_eq!(
            fs::metadata(home.vm("b").join("disk.img")).unwrap().len(),
            2_000_000_000
        );
    }
    home.ok(&["clone", "--force", "a", "b"]);
    assert_eq!(
        fs::metadata(home.vm("b").join("disk.img")).unwrap().len(),
        1_000_000_000
    );
    assert_eq!(home.vm_names(), ["a", "b"]);
    assert_eq!(home.tmp_entries(), 0);
}

#[test]
fn clone_keeps_mac_when_unique_and_keeps_suspended_state() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "1", "a"]);
    fs::write(home.vm("a").join("state.vzvmsave"), b"saved machine state").unwrap();
    home.ok(&["clone", "a", "b"]);
    // The saved state has the MAC baked in, so a suspended source keeps it even though shared.
    assert_eq!(home.config("a")["macAddress"], home.config("b")["macAddress"]);
    assert_eq!(
        fs::read(home.vm("b").join("state.vzvmsave")).unwrap(),
        b"saved machine state"
    );
    let json: Value = serde_json::from_str(&home.ok(&["get", "b", "--format", "json"])).unwrap();
    assert_eq!(json["State"], "suspended");

    // `stop` of a suspended VM discards the saved state.
    home.ok(&["stop", "b"]);
    assert!(!home.vm("b").join("state.vzvmsave").exists());
    home.tart()
        .args(["stop", "b"])
        .assert()
        .code(2)
        .stderr("VM \"b\" is not running\n");

    home.ok(&["set", "b", "--random-mac"]);
    assert_ne!(home.config("a")["macAddress"], home.config("b")["macAddress"]);
}

#[test]
fn twenty_gb_sparse_disk_clones_without_allocating_it() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "20", "big"]);
    let disk = home.vm("big").join("disk.img");
    write_pattern(&disk, 0, 4 << 20, 0x11);
    write_pattern(&disk, 10_000_000_000, 4 << 20, 0x22);
    write_pattern(&disk, 20_000_000_000 - (1 << 20), 1 << 20, 0x33);
    home.ok(&["clone", "big", "copy"]);
    let copy = home.vm("copy").join("disk.img");
    let meta = fs::metadata(&copy).unwrap();
    assert_eq!(meta.len(), 20_000_000_000);
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "clone allocated {} bytes",
        meta.blocks() * 512
    );
    let read_at = |path: &Path, offset: u64| {
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&File::open(path).unwrap(), &mut buf, offset).unwrap();
        buf
    };
    for (offset, byte) in [
        (0, 0x11),
        (10_000_000_000 + 4096, 0x22),
        (19_999_999_000, 0x33),
        (5_000_000_000, 0),
    ] {
        assert_eq!(read_at(&copy, offset), [byte; 4], "offset {offset}");
    }
}

/// A separate process standing in for `tart run`: this test binary re-executed in helper mode.
fn spawn_lock_holder(config: &Path, ignore_sigint: bool) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_holder_helper", "--nocapture", "--test-threads=1"])
        .env("TART_TEST_LOCK_HOLDER", config)
        .env("TART_TEST_IGNORE_SIGINT", if ignore_sigint { "1" } else { "0" })
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if lock_holder_pid(config).is_some() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("lock holder did not take the lock");
}

fn lock_holder_pid(config: &Path) -> Option<libc::pid_t> {
    tart_home::PidLock::holder(config)
}

#[test]
fn lock_holder_helper() {
    let Some(config) = std::env::var_os("TART_TEST_LOCK_HOLDER") else {
        return;
    };
    if std::env::var("TART_TEST_IGNORE_SIGINT").as_deref() == Ok("1") {
        unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    }
    // The lock `tart run` holds: a POSIX write lock on config.json.
    let _lock = tart_home::PidLock::try_acquire(Path::new(&config)).unwrap().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_running_vm_cannot_be_deleted_renamed_or_replaced() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "1", "busy"]);
    home.ok(&["create", "--linux", "--disk-size", "1", "other"]);
    let config = home.vm("busy").join("config.json");
    let mut holder = spawn_lock_holder(&config, false);

    home.tart()
        .args(["delete", "busy"])
        .assert()
        .code(2)
        .stderr("VM \"busy\" is running\n");
    home.tart()
        .args(["rename", "busy", "moved"])
        .assert()
        .code(2)
        .stderr("VM \"busy\" is running\n");
    home.tart().args(["clone", "--force", "other", "busy"]).assert().code(2);
    let json: Value = serde_json::from_str(&home.ok(&["get", "busy", "--format", "json"])).unwrap();
    assert_eq!(json["Running"], true);
    assert_eq!(json["State"], "running");
    // `set` rewrites config.json in place, so the running VM keeps its lock.
    home.ok(&["set", "busy", "--cpu", "3"]);
    assert_eq!(lock_holder_pid(&config), Some(holder.id() as libc::pid_t));
    home.ok(&["prune", "--entries", "vms", "--space-budget", "0"]);
    assert_eq!(home.vm_names(), ["busy"], "prune skips running VMs");

    let started = Instant::now();
    home.ok(&["stop", "busy"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = holder.wait();
    assert_eq!(lock_holder_pid(&config), None);
    home.ok(&["delete", "busy"]);
}

#[test]
fn stop_escalates_to_sigkill_after_the_timeout() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "1", "stubborn"]);
    let config = home.vm("stubborn").join("config.json");
    let mut holder = spawn_lock_holder(&config, true);
    let started = Instant::now();
    home.ok(&["stop", "--timeout", "1", "stubborn"]);
    let status = holder.wait().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
}

#[test]
fn clone_killed_halfway_leaves_nothing_under_vms() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "2", "src"]);
    write_pattern(&home.vm("src").join("disk.img"), 0, 1 << 30, 0xab);

    let mut clone = home.tart().args(["clone", "src", "dst"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let staged_disk = loop {
        let staged = fs::read_dir(home.root.join("tmp"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("disk.img"))
            .find(|p| p.exists());
        if let Some(disk) = staged {
            break disk;
        }
        assert!(Instant::now() < deadline, "clone never started copying");
        std::thread::sleep(Duration::from_millis(1));
    };
    clone.kill().unwrap();
    clone.wait().unwrap();
    assert!(staged_disk.exists(), "killed mid-copy: the staging dir is still there");
    assert_eq!(home.vm_names(), ["src"], "no half-made VM under vms/");

    // Any later command (but pull/clone) collects the abandoned staging directory.
    home.ok(&["list"]);
    assert_eq!(home.tmp_entries(), 0);
}

#[test]
fn full_disk_during_clone_fails_cleanly() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and needs root");
    let dir = tempfile::tempdir().unwrap();
    let tart = assert_cmd::cargo::cargo_bin("tart");
    // A 64 MiB tmpfs in a private mount namespace holds the source (40 MiB of data) but not a copy.
    let script = r#"
        set -e
        mount -t tmpfs -o size=64m tart-test "$1"
        export TART_HOME="$1/home"
        "$2" create --linux --disk-size 1 src
        dd if=/dev/urandom of="$TART_HOME/vms/src/disk.img" bs=1M count=40 conv=notrunc status=none
        sum_before=$(md5sum "$TART_HOME/vms/src/disk.img")
        set +e
        "$2" clone src dst
        echo "clone-exit=$?"
        set -e
        ls "$TART_HOME/vms"
        echo "tmp-entries=$(ls -A "$TART_HOME/tmp" | wc -l)"
        [ "$sum_before" = "$(md5sum "$TART_HOME/vms/src/disk.img")" ] && echo source-intact
    "#;
    let (stdout, stderr) = tart_testkit::in_private_mounts(script, &[dir.path().as_os_str(), tart.as_os_str()]);
    assert!(stdout.contains("clone-exit=1"), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(
        stderr.contains("failed to copy") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(stdout.contains("src\ntmp-entries=0\nsource-intact"), "{stdout}");
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "1", "vm"]);

    let long = "x".repeat(256);
    for name in ["", "a/b", "..", ".", long.as_str()] {
        let out = home.tart().args(["create", "--linux", name]).output().unwrap();
        assert_ne!(out.status.code(), Some(0), "{name}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("invalid VM name") || stderr.contains("failed to parse remote name"),
            "{stderr}"
        );
    }

    home.tart()
        .args(["set", "vm", "--disk-size", "0"])
        .assert()
        .code(1)
        .stderr("new disk size of 0GB should be larger than the current disk size of 1GB\n");
    home.tart().args(["set", "vm", "--display", "wide"]).assert().code(64);
    home.tart()
        .args(["set", "vm", "--disk", "/nonexistent/disk.img"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("does not exist"));

    // A disk that cannot grow: the file size limit stands in for a filesystem that refuses.
    let mut set = home.tart();
    set.args(["set", "vm", "--disk-size", "3"]);
    unsafe {
        set.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 2_000_000_000,
                rlim_max: 2_000_000_000,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            Ok(())
        });
    }
    set.assert().code(1).stderr(predicate::str::contains("failed to grow"));
    assert_eq!(
        fs::metadata(home.vm("vm").join("disk.img")).unwrap().len(),
        1_000_000_000
    );

    let config = home.vm("vm").join("config.json");
    let original = fs::read(&config).unwrap();
    fs::write(&config, b"{ not json").unwrap();
    home.tart()
        .args(["get", "vm"])
        .assert()
        .code(1)
        .stderr(predicate::str::starts_with("failed to parse").and(predicate::str::contains("config.json")));
    fs::write(&config, br#"{"version":1,"os":"linux"}"#).unwrap();
    home.tart()
        .args(["clone", "vm", "copy"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("missing field `cpuCountMin`"));
    assert_eq!(home.vm_names(), ["vm"]);
    assert_eq!(home.tmp_entries(), 0);
    fs::write(&config, original).unwrap();

    let file_home = home.root.join("vms/vm/nvram.bin");
    let mut not_a_dir = Command::cargo_bin("tart").unwrap();
    not_a_dir
        .env("TART_HOME", &file_home)
        .arg("list")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("TART_HOME is invalid").and(predicate::str::contains("is not a directory")));

    home.tart()
        .args(["create", "vm2"])
        .assert()
        .code(64)
        .stderr(predicate::str::contains(
            "Error: Please specify either a --from-ipsw or --linux option!",
        ));
    home.tart()
        .args(["create", "--from-ipsw", "latest", "mac"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("macOS guests need a macOS host"));
    home.tart().args(["frobnicate"]).assert().code(64);
    home.tart().args(["clone", "vm", "a/b"]).assert().code(64);
    home.tart()
        .args(["ip", "--resolver", "agent", "vm"])
        .assert()
        .code(1)
        .stderr(
            "no IP address found, is your VM running? (also make sure that Guest agent for Tart is running inside of a VM)\n",
        );
    home.tart()
        .args(["ip", "--resolver", "arp", "vm"])
        .assert()
        .code(1)
        .stderr(
        "no IP address found, is your VM running? (not all Linux distributions are compatible with the ARP resolver)\n",
    );
    home.tart()
        .args(["exec", "vm", "true"])
        .assert()
        .code(2)
        .stderr("VM \"vm\" is not running\n");
    home.tart().args(["exec", "vm"]).assert().code(64);
    assert_eq!(home.vm_names(), ["vm"]);
}

fn set_access(vm: &Path, days_ago: u64) {
    let when = SystemTime::now() - Duration::from_secs(days_ago * 86_400);
    let marker = File::create(vm.join(".tart-accessed")).unwrap();
    marker
        .set_times(fs::FileTimes::new().set_modified(when).set_accessed(when))
        .unwrap();
}

#[test]
fn prune_vms_by_age_and_by_budget() {
    let home = Home::new();
    for (name, days_ago, mib) in [
        ("fresh", 0, 300),
        ("week", 7, 700),
        ("month", 30, 100),
        ("year", 365, 100),
    ] {
        home.ok(&["create", "--linux", "--disk-size", "2", name]);
        write_pattern(&home.vm(name).join("disk.img"), 0, mib << 20, 0x5a);
        set_access(&home.vm(name), days_ago);
    }
    home.ok(&["prune", "--entries", "vms", "--older-than", "100"]);
    assert_eq!(home.vm_names(), ["fresh", "month", "week"]);
    // 1 GiB budget, newest first: fresh (300 MiB) fits, week (700) fits, month (100) no longer does.
    home.ok(&["prune", "--entries", "vms", "--space-budget", "1"]);
    assert_eq!(home.vm_names(), ["fresh", "week"]);
    home.tart()
        .args(["prune", "--entries", "vms"])
        .assert()
        .code(64)
        .stderr(predicate::str::contains(
            "at least one pruning criteria must be specified",
        ));
    home.tart()
        .args(["prune", "--entries", "disks", "--gc"])
        .assert()
        .code(64);
}

#[test]
fn oci_cache_entries_list_resolve_and_delete() {
    let home = Home::new();
    home.ok(&["create", "--linux", "--disk-size", "1", "seed"]);
    let digest = format!("sha256:{}", "c".repeat(64));
    let repo = home.root.join("cache/OCIs/localhost%3A5000/ns/image");
    fs::create_dir_all(&repo).unwrap();
    let image = repo.join(&digest);
    fs::create_dir(&image).unwrap();
    for file in ["config.json", "disk.img", "nvram.bin"] {
        fs::copy(home.vm("seed").join(file), image.join(file)).unwrap();
    }
    std::os::unix::fs::symlink(&image, repo.join("v1")).unwrap();

    let listed = home.ok(&["list", "--source", "oci", "-q"]);
    assert_eq!(
        listed,
        format!("localhost:5000/ns/image:v1\nlocalhost:5000/ns/image@{digest}\n")
    );
    assert_eq!(
        home.ok(&["fqn", "localhost:5000/ns/image:v1"]),
        format!("localhost:5000/ns/image@{digest}\n")
    );
    assert_eq!(home.ok(&["fqn", "seed"]), "seed\n");

    // A cached image clones without contacting any registry.
    home.ok(&["clone", "localhost:5000/ns/image:v1", "from-cache"]);
    assert!(home.vm("from-cache").join("disk.img").exists());

    home.ok(&["delete", "localhost:5000/ns/image:v1"]);
    assert!(!image.exists(), "deleting the only tag collects its image");
    home.tart()
        .args(["delete", "localhost:5000/ns/image:v1"])
        .assert()
        .code(2)
        .stderr("the specified VM \"localhost:5000/ns/image:v1\" does not exist\n");
}

#[test]
fn completions_and_man_page() {
    let home = Home::new();
    for shell in ["bash", "zsh", "fish"] {
        assert!(home.ok(&["completions", shell]).contains("clone"));
    }
    assert!(home.ok(&["manpage"]).contains(".TH tart"));
    let help = home.ok(&["--help"]);
    for command in [
        "create", "clone", "run", "set", "get", "list", "login", "logout", "ip", "exec", "pull", "push", "import",
        "export", "prune", "rename", "stop", "delete", "suspend",
    ] {
        assert!(help.contains(&format!("  {command} ")), "{command} missing from --help");
    }
    assert!(!help.contains("fqn"));
    home.ok(&["list"]);
    let mut stale = File::create(home.root.join("tmp/stale")).unwrap();
    stale.write_all(b"x").unwrap();
    home.ok(&["list"]);
    assert_eq!(home.tmp_entries(), 0, "tmp GC runs before list");
}
