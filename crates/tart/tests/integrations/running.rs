//! `tart run` under the integrations, with the test guest under QEMU (TCG), each test in a network
//! lab of its own: the integrations pass no network flag, so tart puts the VM on its shared NAT
//! network.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tart_testkit::NetLab;

use super::common::{finish, qemu_runs, Home};
use super::{fails, json, listed, ok, vetu, Out};

/// QEMU of the VM whose disk is `disk` is gone within 10 s, and so is its tap once a tart
/// command has run (each one collects what a killed `tart run` left; the kernel removes the tap
/// itself a moment after its last descriptor, QEMU's, is closed).
fn assert_vm_gone(home: &Home, lab: &NetLab, vm: &str) {
    let disk = home.dir.path().join(format!("home/vms/{vm}/disk.img"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu_runs(&disk) {
        assert!(Instant::now() < deadline, "QEMU of {vm} outlived tart run");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&mut home.tart(), &["list", "--quiet"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let links = lab.output_in(&lab.host, "ip", &["-o", "link"]);
        if !links.contains("tarttap") {
            break;
        }
        assert!(Instant::now() < deadline, "a tap outlived the VM: {links}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tart ip` as the integrations read it: one IPv4 address alone on stdout, nothing on stderr.
fn ip_alone(command: &mut Command, args: &[&str]) -> Ipv4Addr {
    let out = Out::of(command.args(args));
    assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    assert!(
        out.stdout.ends_with('\n') && out.stdout.lines().count() == 1,
        "{:?}",
        out.stdout
    );
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an address: {:?}", out.stdout))
}

/// Starts `command` as gitlab-tart-executor starts `tart run`: a session of its own (setsid),
/// stdout and stderr appended to `log`, and its parent gone at once (`Process.Release()` and
/// the `prepare` stage exits). Returns its pid. The test process becomes a child subreaper, so
/// the orphan is reparented to it and its exit status can be read.
fn start_detached(command: &Command, log: &Path) -> libc::pid_t {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg("log=$1; shift; setsid \"$@\" >>\"$log\" 2>&1 </dev/null & echo $!")
        .arg("sh")
        .arg(log)
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => shell.env(key, value),
            None => shell.env_remove(key),
        };
    }
    let out = shell.output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Waits up to `timeout` for the reparented `pid` to exit; its exit code, or `-signal`.
fn reap(pid: libc::pid_t, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own (adopted) child with a valid status pointer.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -libc::WTERMSIG(status)
            };
        }
        assert!(Instant::now() < deadline, "pid {pid} still runs after {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A connection to `host:port` made from the lab's host namespace, where tart runs (its VNC
/// server listens on that namespace's 127.0.0.1).
fn connect_in(lab: &NetLab, host: &str, port: u16) -> TcpStream {
    let namespace = fs::File::open(format!("/var/run/netns/{}", lab.host)).unwrap();
    let host = host.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setns only moves this short-lived thread into the namespace; the socket keeps
        // the namespace it was made in after the thread ends.
        let rc = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        TcpStream::connect((host.as_str(), port)).unwrap()
    })
    .join()
    .unwrap()
}

fn guest_home(lab: &NetLab, vm: &str) -> Home {
    let home = Home::empty().in_lab(lab);
    home.add_vm(vm, tart_testkit::test_guest_image());
    home
}

/// gitlab-tart-executor: `tart run` detached with the build and cache shares keeps running after
/// its parent is gone; `tart ip` gives the address alone; cleanup's `tart stop` ends it (status
/// 0, `Stopping VM...` in the log that prepare tails), and so do SIGINT and SIGKILL; `tart
/// delete` leaves nothing.
#[test]
fn gitlab_detached_run_outlives_its_parent_and_stops_three_ways() {
    let lab = NetLab::new();
    let vm = "gitlab-4243";
    let home = guest_home(&lab, vm);
    let builds = home.dir.path().join("tart-executor-host-dir-4243/builds");
    let cache = home.dir.path().join("tart-executor-host-dir-4243/cache");
    fs::create_dir_all(&builds).unwrap();
    fs::create_dir_all(&cache).unwrap();
    ok(&mut home.tart(), &["set", "--random-mac", vm]);
    let log = home.dir.path().join(format!("{vm}-tart-run-output.log"));
    let mut run = home.tart();
    run.args(["run", "--no-graphics"])
        .arg("--dir")
        .arg(format!("{}:tag=tart.virtiofs.buildsdir.4243", builds.display()))
        .arg("--dir")
        .arg(format!("{}:tag=tart.virtiofs.cachedir.4243", cache.display()))
        .arg(vm);
    let pid = start_detached(&run, &log);

    let ip = ip_alone(&mut home.tart(), &["ip", "--wait", "60", "--resolver", "dhcp", vm]);
    assert!(ip.is_private(), "{ip}");
    let config = home.dir.path().join(format!("home/vms/{vm}/config.json"));
    assert_eq!(
        tart_home::PidLock::holder(&config),
        Some(pid),
        "the detached process runs the VM"
    );
    // SAFETY: getsid has no memory-safety preconditions.
    assert_eq!(unsafe { libc::getsid(pid) }, pid, "a session of its own");
    let info = json(&ok(&mut home.tart(), &["get", "--format", "json", vm]));
    assert_eq!(
        (info["OS"].as_str(), info["State"].as_str()),
        (Some("linux"), Some("running"))
    );
    fails(&mut home.tart(), &["delete", vm], 2, &format!("VM \"{vm}\" is running"));

    ok(&mut home.tart(), &["stop", vm]);
    assert_eq!(reap(pid, Duration::from_secs(30)), 0);
    assert_vm_gone(&home, &lab, vm);

    // Started the same way and ended by a signal: SIGINT powers the VM off as `tart stop` does
    // (the background job inherits SIGINT ignored, which tart run must undo), SIGKILL takes QEMU
    // along.
    let disk = home.dir.path().join(format!("home/vms/{vm}/disk.img"));
    for (signal, status) in [(libc::SIGINT, 0), (libc::SIGKILL, -libc::SIGKILL)] {
        let pid = start_detached(&run, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while tart_home::PidLock::holder(&config) != Some(pid) || !qemu_runs(&disk) {
            assert!(
                Instant::now() < deadline,
                "the VM did not start: {}",
                fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: signalling the process we started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        assert_eq!(reap(pid, Duration::from_secs(30)), status, "after signal {signal}");
        assert_vm_gone(&home, &lab, vm);
    }
    let log = fs::read_to_string(&log).unwrap();
    assert_eq!(log.matches("Stopping VM...").count(), 2, "tart stop and SIGINT: {log}");
    ok(&mut home.tart(), &["delete", vm]);
    assert!(
        builds.is_dir() && cache.is_dir(),
        "the host's shares are the executor's to remove"
    );
}

/// packer-plugin-tart: `tart run <vm> --graphics --vnc-experimental` prints the URL its regex
/// reads, the server there asks for VNC password authentication, and SIGINT (its cleanup without
/// a communicator) stops the VM: `Stopping VM...`, status 0, no QEMU left.
#[test]
fn packer_run_prints_the_vnc_url_and_sigint_stops_the_vm() {
    let lab = NetLab::new();
    let home = guest_home(&lab, "packer-vm");
    let mut run: Child = home
        .tart()
        .args(["run", "packer-vm", "--graphics", "--vnc-experimental"])
        .env("CI", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("vnc://") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "tart run ended without a vnc:// line"
        );
    }
    // vnc://.*:(.*)@(.*):([0-9]{1,5})
    let url = &line[line.find("vnc://").unwrap() + "vnc://".len()..].trim_end();
    let (credentials, address) = url.rsplit_once('@').unwrap();
    let password = credentials.rsplit_once(':').unwrap().1;
    let (host, port) = address.rsplit_once(':').unwrap();
    assert!(!password.is_empty() && port.len() <= 5, "{line}");
    let mut vnc = connect_in(&lab, host, port.parse().unwrap());
    vnc.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut version = [0u8; 12];
    vnc.read_exact(&mut version).unwrap();
    assert!(version.starts_with(b"RFB 003."), "{version:?}");
    vnc.write_all(b"RFB 003.008\n").unwrap();
    let mut count = [0u8; 1];
    vnc.read_exact(&mut count).unwrap();
    let mut types = vec![0u8; count[0] as usize];
    vnc.read_exact(&mut types).unwrap();
    assert_eq!(types, [2], "VNC Authentication, which go-vnc's PasswordAuth speaks");
    drop(vnc);

    let ip = ip_alone(&mut home.tart(), &["ip", "--wait", "120", "packer-vm"]);
    // `{{ .HTTPIP }}`: the first address of the host interface whose subnet holds the VM's.
    let host_addresses = lab.output_in(&lab.host, "ip", &["-o", "-4", "addr"]);
    let [a, b, c, _] = ip.octets();
    let gateway = format!("inet {a}.{b}.{c}.1/24");
    assert!(
        host_addresses.contains(&gateway),
        "no {gateway} for {ip}: {host_addresses}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.id() as libc::pid_t, libc::SIGINT) };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(rest.contains("Stopping VM..."), "{rest}");
    assert_vm_gone(&home, &lab, "packer-vm");
    ok(&mut home.tart(), &["delete", "packer-vm"]);
}

/// Orchard's worker on Linux through `vetu`: clone, set, `vetu run <odn>` as its foreground
/// child, `vetu ip --wait 60`; deleting the VM cancels the run with SIGKILL (Go's
/// CommandContext), and QEMU dies with it; `vetu delete` then succeeds.
#[test]
fn orchard_worker_drives_vetu_and_sigkill_takes_qemu_along() {
    let lab = NetLab::new();
    let home = guest_home(&lab, "image");
    let odn = "orchard-vm-0-5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a-0";
    ok(&mut vetu(&home), &["clone", "image", odn]);
    ok(&mut vetu(&home), &["set", "--memory", "512", odn]);
    ok(&mut vetu(&home), &["set", "--cpu", "1", odn]);
    let mut run = vetu(&home)
        .args(["run", odn])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ip = ip_alone(&mut vetu(&home), &["ip", "--wait", "60", odn]);
    assert!(ip.is_private(), "{ip}");
    let entry = listed(&ok(&mut vetu(&home), &["list", "--format", "json"]), odn).unwrap();
    assert_eq!(
        (entry["State"].as_str(), entry["Running"].as_bool()),
        (Some("running"), Some(true))
    );
    fails(&mut vetu(&home), &["run", odn], 1, "is already running");

    run.kill().unwrap();
    let (code, _, stderr) = finish(run);
    assert_eq!(code, -1, "killed: {stderr}");
    assert_vm_gone(&home, &lab, odn);
    ok(&mut vetu(&home), &["delete", odn]);
    assert!(!home.dir.path().join(format!("home/vms/{odn}")).exists());
}
