//! `tart run`, `stop`, `suspend` with real QEMU (TCG here) booting the test guest from
//! `scripts/guest/build-test-guest`, whose serial console prints a boot marker and a tick a second.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::prelude::*;

mod common;
use common::{fails_with, finish, qemu_runs, wait_for, Home};

#[test]
fn run_suspend_resume_and_stop() {
    let home = Home::with_guest();
    let run = home.run_with(1, &["--suspendable"]);
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
    let qemu_running = || qemu_runs(&disk);
    assert!(qemu_running(), "QEMU runs the VM's disk");
    let qemu = Command::new("pgrep")
        .args(["-af", &format!("file={}", disk.display())])
        .output()
        .unwrap();
    let qemu = String::from_utf8_lossy(&qemu.stdout).into_owned();
    let runtime_dir = qemu
        .split([' ', ','])
        .find_map(|word| word.strip_prefix("path=")?.strip_suffix("/qmp.sock"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no QMP socket in {qemu}"));
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu_running() {
        assert!(Instant::now() < deadline, "QEMU outlived a SIGKILLed tart run");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(home.state(), "stopped");
    // Its runtime directory (sockets, helper logs) goes when the next VM starts.
    assert!(runtime_dir.exists());
    let next = home.run(2);
    // QEMU creates the serial file: by then the start has collected stale directories.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !home.serial(2).exists() {
        assert!(Instant::now() < deadline, "the next tart run did not start QEMU");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!runtime_dir.exists(), "{} is left", runtime_dir.display());
    home.ok(&["stop", "guest"]);
    let (code, stdout, stderr) = finish(next);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// A QEMU that no longer answers (SIGSTOPped) cannot be powered off politely: `tart stop
/// --timeout` kills `tart run`, and QEMU dies with it.
#[test]
fn stop_timeout_ends_a_hung_vm() {
    let home = Home::with_guest();
    let run = home.run(1);
    wait_for(&home.serial(1), "TART-TEST-GUEST: booted");
    let qemu = Command::new("pgrep")
        .args(["-P", &run.id().to_string()])
        .output()
        .unwrap();
    let qemu: libc::pid_t = String::from_utf8_lossy(&qemu.stdout)
        .lines()
        .find_map(|line| line.trim().parse().ok())
        .expect("QEMU is a child of tart run");
    // SAFETY: signalling a process we started (through tart).
    assert_eq!(unsafe { libc::kill(qemu, libc::SIGSTOP) }, 0);
    let started = Instant::now();
    home.ok(&["stop", "--timeout", "2", "guest"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let (code, _, _) = finish(run);
    assert_eq!(code, -1, "tart run was killed");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Gone, or a zombie waiting for whoever inherited it to reap it.
    let alive = || {
        fs::read_to_string(format!("/proc/{qemu}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    };
    while alive() {
        assert!(Instant::now() < deadline, "QEMU outlived tart run");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(home.state(), "stopped");
}

#[test]
fn bad_run_flags_get_clear_errors() {
    let home = Home::empty();
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
    let fails = |args: &[&str], message: &str| {
        let stderr = fails_with(
            home.tart().args(["run", "--net-user"]).args(args).arg("guest"),
            1,
            message,
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    };
    let scratch = home.dir.path();
    let file = scratch.join("file.img");
    fs::write(&file, vec![0u8; 4096]).unwrap();
    let file = file.to_str().unwrap();
    fails(&["--dir", file], "is not a directory");
    fails(&["--dir", "/nonexistent-dir"], "No such file or directory");
    fails(
        &["--dir", "a:/tmp", "--dir", "/tmp"],
        "each one of them should be named",
    );
    fails(
        &["--dir", "/tmp", "--suspendable"],
        "--dir cannot be used with a suspendable VM",
    );
    fails(
        &["--disk", "/nonexistent.img"],
        "/nonexistent.img: No such file or directory",
    );
    fails(
        &["--disk", &format!("{file}:ro,caching=sometimes")],
        "unknown caching mode",
    );
    fails(&["--disk", "nbds://127.0.0.1/x"], "NBD over TLS");
    fails(&["--disk", "ghcr.io/cirruslabs/ubuntu:latest"], "pull it first");
    fails(
        &["--disk", scratch.join("ubuntu-arm64.iso").to_str().unwrap()],
        "No such file",
    );
    fs::write(scratch.join("ubuntu-arm64.iso"), b"").unwrap();
    fails(
        &["--disk", scratch.join("ubuntu-arm64.iso").to_str().unwrap()],
        "Seems you have a disk targeting arm64 architecture",
    );
    // A writable disk that another process holds is refused, as in Tart.
    let holder = fs::File::open(file).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&holder), libc::LOCK_EX) },
        0
    );
    fails(&["--disk", file], "seems to be already in use");
    drop(holder);
    fails(&["--nested"], "nested virtualization is not available");
    let out = home
        .tart()
        .env("PATH", scratch)
        .args(["run", "--net-user", "guest"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qemu-system-x86_64 not found in PATH: install Debian's qemu-system-x86 package (apt-get install qemu-system-x86)\n"
    );
    home.tart().args(["run", "ghost"]).assert().code(2);
    home.tart()
        .args(["suspend", "guest"])
        .assert()
        .code(2)
        .stderr("VM \"guest\" is not running\n");
}

/// A `--disk` image read-only, an NBD export from `qemu-nbd`, an unnamed read-only share under
/// its own tag and two named shares under the default tag: the guest prints what it sees.
#[test]
fn extra_disks_and_directory_shares_reach_the_guest() {
    let home = Home::with_guest();
    let scratch = home.dir.path();
    let image = scratch.join("extra.img");
    let mut data = b"TART-EXTRA-DISK".to_vec();
    data.resize(1 << 20, 0);
    fs::write(&image, &data).unwrap();
    let exported = scratch.join("exported.img");
    let mut data = b"TART-NBD-EXPORT".to_vec();
    data.resize(1 << 20, 0);
    fs::write(&exported, &data).unwrap();
    let nbd_socket = scratch.join("nbd.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["--format", "raw", "--persistent", "--socket"])
        .arg(&nbd_socket)
        .arg(&exported)
        .spawn()
        .expect("qemu-nbd (Debian's qemu-utils, installed by scripts/setup)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nbd_socket.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let share = |name: &str, file: &str, text: &str| {
        let dir = scratch.join(name);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(file), text).unwrap();
        dir.to_str().unwrap().to_owned()
    };
    let solo = share("solo", "solo.txt", "read-only share content\n");
    let src = share("src", "hello.txt", "hello from src\n");
    let out = share("out", "note.txt", "named out share\n");
    let run = home.run_with(
        1,
        &[
            "--disk",
            &format!("{}:ro", image.display()),
            "--disk",
            &format!("nbd+unix:///?socket={}", nbd_socket.display()),
            "--dir",
            &format!("{solo}:ro,tag=tart-test"),
            "--dir",
            &format!("src:{src}"),
            "--dir",
            &format!("out:{out}:ro"),
        ],
    );
    let log = wait_for(&home.serial(1), "TART-TEST-GUEST: booted");
    home.ok(&["stop", "guest"]);
    let (code, stdout, stderr) = finish(run);
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    for expected in [
        "disk vdb ro=1 serial=tart-disk0 head=TART-EXTRA-DISK",
        "disk vdc ro=0 serial=tart-disk1 head=TART-NBD-EXPORT",
        "share tart-test writable=0",
        "share tart-test solo.txt: read-only share content",
        "share com.apple.virtio-fs.automount src/hello.txt: hello from src",
        "share com.apple.virtio-fs.automount out/note.txt: named out share",
    ] {
        assert!(
            log.contains(&format!("TART-TEST-GUEST: {expected}")),
            "no {expected:?}:\n{log}"
        );
    }
    // Named shares are bind mounts in virtiofsd's own namespace: none is left on the host.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&src), "{mounts}");
}

/// `tart exec` and `tart ip --resolver agent` through `control.sock`, `vhost-device-vsock` and
/// our `tart-guest-agent` in the test guest.
#[test]
fn exec_and_ip_talk_to_the_guest_agent() {
    let home = Home::with_image(tart_testkit::test_guest_image_with_agent());
    let run = home.run(1);
    let log = wait_for(&home.serial(1), "TART-TEST-GUEST: booted");
    let socket = home.dir.path().join("home/vms/guest/control.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only the owner may reach the agent");

    let kernel = log
        .lines()
        .find_map(|line| line.trim().strip_prefix("TART-TEST-GUEST: kernel "))
        .expect("the guest prints its kernel release")
        .to_owned();
    // The agent starts with the guest; give it until the first answer.
    let ip = home.ok(&["ip", "--resolver", "agent", "--wait", "60", "guest"]);
    let ip = ip.trim();
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{ip:?}");
    let log = wait_for(&home.serial(1), "TART-TEST-GUEST: ip eth0 ");
    assert!(
        log.contains(&format!("TART-TEST-GUEST: ip eth0 {ip}")),
        "{ip} is not the guest's:\n{log}"
    );

    assert_eq!(home.ok(&["exec", "guest", "uname", "-r"]).trim(), kernel);
    let out = home
        .tart()
        .args(["exec", "guest", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_cmd::Command::from_std(home.tart())
        .args(["exec", "-i", "guest", "cat"])
        .write_stdin("hi\n")
        .assert()
        .success()
        .stdout("hi\n");

    // 1 MiB of binary stdin comes back byte for byte.
    let mut data = vec![0u8; 1 << 20];
    let mut state = 0x2545_f491_u32;
    for byte in data.iter_mut() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        *byte = state as u8;
    }
    let out = assert_cmd::Command::from_std(home.tart())
        .args(["exec", "-i", "guest", "cat"])
        .write_stdin(data.clone())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data, "{} bytes came back, differing", out.stdout.len());

    // An interactive shell on a remote PTY, driven through a local one (script(1)).
    let tart = assert_cmd::cargo::cargo_bin("tart");
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!("{} exec -i -t guest sh", tart.display()))
        .arg("/dev/null")
        .env("TART_HOME", home.dir.path().join("home"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"tty; echo answer-$((6 * 7))\nexit 3\n")?;
            drop(stdin);
            child.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("answer-42") && text.contains("/dev/pts/"), "{text}");

    home.ok(&["stop", "guest"]);
    let (code, stdout, stderr) = finish(run);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!socket.exists(), "control.sock is removed when the VM stops");
    let out = home.tart().args(["exec", "guest", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "VM \"guest\" is not running\n");
}
