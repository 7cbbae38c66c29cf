//! `packaging/tart@.service`, the unit for long-living VMs: its ExecStart and ExecStop command
//! lines, expanded as systemd does, driven here against the test guest (systemd is not PID 1
//! on the machines the tests run on), with its KillSignal as systemd would send it. The unit
//! itself is checked by `systemd-analyze verify` in the package test.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{finish, wait_for, Home};

/// The `[Unit]` and `[Service]` settings of the template unit.
fn unit() -> HashMap<String, String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/tart@.service"))
        .unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// A unit command line as systemd runs it for instance `vm`: words split at spaces outside
/// single quotes, `%I` the instance, a `$VAR` word the variable's words, `$$` a `$`.
fn command_line(line: &str, vm: &str, env: &HashMap<&str, String>) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars().chain([' ']) {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                match word.strip_prefix('$').filter(|name| !name.starts_with('$')) {
                    Some(name) => words.extend(env.get(name).into_iter().flat_map(|v| v.split_whitespace().map(str::to_owned))),
                    None if !word.is_empty() => words.push(word.replace("%I", vm).replace("$$", "$")),
                    None => {}
                }
                word.clear();
            }
            c => word.push(c),
        }
    }
    words
}

fn command(home: &Home, words: &[String]) -> Command {
    let tart = home.tart();
    let program = if words[0] == "/usr/bin/tart" {
        tart.get_program().to_owned()
    } else {
        words[0].clone().into()
    };
    let mut command = Command::new(program);
    command.args(&words[1..]);
    for (key, value) in tart.get_envs() {
        command.env(key, value.unwrap());
    }
    command
}

fn qemu_running(home: &Home) -> bool {
    let disk = home.dir.path().join("home/vms/guest/disk.img");
    Command::new("pgrep")
        .args(["-f", &format!("file={}", disk.display())])
        .status()
        .unwrap()
        .success()
}

fn start(home: &Home, unit: &HashMap<String, String>, serial: &Path) -> Child {
    let flags = HashMap::from([("TART_RUN_FLAGS", format!("--serial-path {} --net-user", serial.display()))]);
    let run = command(home, &command_line(&unit["ExecStart"], "guest", &flags))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(serial, "TART-TEST-GUEST: booted");
    run
}

fn exec_stop(home: &Home, unit: &HashMap<String, String>, run: &Child, timeout: Option<&str>) -> Duration {
    let words = command_line(&unit["ExecStop"], "guest", &HashMap::new());
    let mut stop = command(home, &words);
    stop.env("MAINPID", run.id().to_string());
    if let Some(timeout) = timeout {
        stop.env("TART_SHUTDOWN_TIMEOUT", timeout);
    }
    let started = Instant::now();
    let status = stop.status().unwrap();
    assert!(status.success(), "ExecStop {words:?}: {status}");
    started.elapsed()
}

#[test]
fn unit_settings_bound_restarts_and_stops() {
    let unit = unit();
    assert_eq!(unit["KillSignal"], "SIGINT", "tart run powers the VM off on SIGINT, like tart stop");
    assert_eq!(unit["KillMode"], "mixed", "SIGINT to tart run only, the final SIGKILL to QEMU too");
    assert!(unit["TimeoutStopSec"].parse::<u32>().unwrap() > 60, "above the default graceful shutdown time");
    assert!(unit["StartLimitBurst"].parse::<u32>().unwrap() > 0);
    assert_eq!(unit["Restart"], "on-failure");
    assert_eq!(
        command_line(&unit["ExecStart"], "my vm", &HashMap::new()),
        ["/usr/bin/tart", "run", "--no-graphics", "my vm"]
    );
}

/// A unit for a VM that does not exist fails with tart's one line, and with the exit status
/// the unit does not restart on.
#[test]
fn unit_for_a_missing_vm_fails_once() {
    let unit = unit();
    let home = Home::empty();
    let words = command_line(&unit["ExecStart"], "missing", &HashMap::new());
    let (code, stdout, stderr) = finish(command(&home, &words).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap());
    assert_eq!(stderr, "the specified VM \"missing\" does not exist\n", "{stdout}");
    assert!(
        unit["RestartPreventExitStatus"].split_whitespace().any(|status| status == code.to_string()),
        "exit status {code} would restart the unit"
    );
}

#[test]
fn unit_stops_a_vm_gracefully_or_by_its_kill_signal_and_leaves_no_qemu() {
    let unit = unit();
    let home = Home::with_guest();

    // ExecStop asks the guest to shut down and returns once tart run has ended.
    let run = start(&home, &unit, &home.serial(1));
    exec_stop(&home, &unit, &run, None);
    let (code, stdout, stderr) = finish(run);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("Requesting guest OS to stop..."), "{stdout}");
    wait_for(&home.serial(1), "TART-TEST-GUEST: powering off");
    assert!(!qemu_running(&home), "QEMU outlived tart run");

    // A guest that does not answer: ExecStop gives up after TART_SHUTDOWN_TIMEOUT, then the
    // unit's KillSignal powers the VM off.
    let run = start(&home, &unit, &home.serial(2));
    let qemu = Command::new("pgrep").args(["-P", &run.id().to_string()]).output().unwrap();
    let qemu: libc::pid_t = String::from_utf8_lossy(&qemu.stdout)
        .lines()
        .find_map(|line| line.trim().parse().ok())
        .expect("QEMU is a child of tart run");
    // SAFETY: signalling processes this test started.
    assert_eq!(unsafe { libc::kill(qemu, libc::SIGSTOP) }, 0);
    let waited = exec_stop(&home, &unit, &run, Some("3"));
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(20),
        "ExecStop took {waited:?}"
    );
    unsafe { libc::kill(qemu, libc::SIGCONT) };
    let signal = match unit["KillSignal"].as_str() {
        "SIGINT" => libc::SIGINT,
        other => panic!("unexpected KillSignal {other}"),
    };
    unsafe { libc::kill(run.id() as libc::pid_t, signal) };
    let (code, stdout, stderr) = finish(run);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!qemu_running(&home), "QEMU outlived tart run");
    assert_eq!(home.state(), "stopped");
}
