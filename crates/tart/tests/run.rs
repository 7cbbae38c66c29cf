//! `tart run`, `stop`, `suspend` with real QEMU (TCG here) booting the test guest from
//! `scripts/guest/build-test-guest`, whose serial console prints a boot marker and a tick a second.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::prelude::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    /// A TART_HOME with the test guest imported as VM `guest`.
    fn with_guest() -> Home {
        let home = Home {
            dir: tempfile::tempdir().unwrap(),
        };
        home.ok(&["create", "--linux", "--disk-size", "1", "guest"]);
        home.ok(&[
            "set",
            "guest",
            "--disk",
            tart_testkit::test_guest_image().to_str().unwrap(),
            "--cpu",
            "1",
            "--memory",
            "512",
        ]);
        home
    }

    fn tart(&self) -> Command {
        let mut cmd = Command::cargo_bin("tart").unwrap();
        cmd.env("TART_HOME", self.dir.path().join("home")).env("CI", "1");
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.tart().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tart {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn serial(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("serial-{n}.log"))
    }

    fn run(&self, n: u32) -> Child {
        self.tart()
            .args([
                "run",
                "--no-graphics",
                "--serial-path",
                self.serial(n).to_str().unwrap(),
                "guest",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn state(&self) -> String {
        let json: serde_json::Value = serde_json::from_str(&self.ok(&["get", "guest", "--format", "json"])).unwrap();
        json["State"].as_str().unwrap().to_owned()
    }
}

fn wait_for(serial: &Path, text: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let log = String::from_utf8_lossy(&fs::read(serial).unwrap_or_default()).into_owned();
        if log.contains(text) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {text:?} on the serial console:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_suspend_resume_and_stop() {
    let home = Home::with_guest();
    let run = home.run(1);
    wait_for(&home.serial(1), "TART-TEST-GUEST: tick 3");
    assert_eq!(home.state(), "running");
    let second = home.tart().args(["run", "--no-graphics", "guest"]).output().unwrap();
    assert_eq!(second.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&second.stderr),
        "VM \"guest\" is already running!\n"
    );
    home.tart().args(["delete", "guest"]).assert().code(2);

    home.ok(&["suspend", "guest"]);
    let (code, stdout, stderr) = finish(run);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("snapshot created successfully! shutting down the VM..."),
        "{stdout}"
    );
    assert_eq!(home.state(), "suspended");

    let resumed = home.run(2);
    let log = wait_for(&home.serial(2), "TART-TEST-GUEST: tick");
    let first_tick: u32 = log
        .lines()
        .find_map(|line| line.trim().strip_prefix("TART-TEST-GUEST: tick "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        first_tick >= 4,
        "a resumed guest goes on counting, got tick {first_tick}:\n{log}"
    );
    assert!(!log.contains("booted"), "resumed, not booted again:\n{log}");
    assert_eq!(home.state(), "running", "the state file is consumed");

    home.ok(&["stop", "guest"]);
    let (code, stdout, _) = finish(resumed);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("restoring VM state from a snapshot...") && stdout.contains("Stopping VM..."),
        "{stdout}"
    );
    assert_eq!(home.state(), "stopped");
}

#[test]
fn guest_shutdown_on_sigusr2_ends_run_with_exit_zero() {
    let home = Home::with_guest();
    let run = home.run(1);
    wait_for(&home.serial(1), "TART-TEST-GUEST: booted");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.id() as libc::pid_t, libc::SIGUSR2) };
    let (code, stdout, stderr) = finish(run);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("Requesting guest OS to stop..."), "{stdout}");
    assert!(stdout.contains("guest has stopped the virtual machine"), "{stdout}");
    wait_for(&home.serial(1), "TART-TEST-GUEST: powering off");
}

#[test]
fn killing_tart_run_takes_qemu_with_it() {
    let home = Home::with_guest();
    let mut run = home.run(1);
    wait_for(&home.serial(1), "TART-TEST-GUEST: booted");
    let disk = home.dir.path().join("home/vms/guest/disk.img");
    let qemu_running = || {
        Command::new("pgrep")
            .args(["-f", &format!("file={}", disk.display())])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(qemu_running(), "QEMU runs the VM's disk");
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu_running() {
        assert!(Instant::now() < deadline, "QEMU outlived a SIGKILLed tart run");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(home.state(), "stopped");
}

#[test]
fn bad_run_flags_get_clear_errors() {
    let home = Home {
        dir: tempfile::tempdir().unwrap(),
    };
    home.ok(&["create", "--linux", "--disk-size", "1", "guest"]);
    home.tart()
        .args(["run", "--vnc", "--vnc-experimental", "guest"])
        .assert()
        .code(64);
    let out = home
        .tart()
        .args(["run", "--root-disk-opts", "caching=sometimes", "guest"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sometimes"));
    home.tart()
        .args(["run", "--dir", "/tmp", "guest"])
        .assert()
        .code(1)
        .stderr("not implemented yet: tart run --dir\n");
    home.tart().args(["run", "ghost"]).assert().code(2);
    home.tart()
        .args(["suspend", "guest"])
        .assert()
        .code(2)
        .stderr("VM \"guest\" is not running\n");
}
