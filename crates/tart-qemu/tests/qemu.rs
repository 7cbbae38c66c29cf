//! Real QEMU (TCG here: this machine's KVM is PVM, see /work/shared/notes/environment.md) running
//! the test guest from `scripts/guest/build-test-guest`, whose serial console contract is in
//! `scripts/guest/README.md`. Each boot takes ~12 s under TCG; the tests run in parallel.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tart_home::{Arch, VmConfig, VmDir};
use tart_qemu::{Error, ExitReason, HostInfo, NetworkAttachment, RunOptions, RunningVm, SerialPort, VmSpec};

const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

/// A VM directory like `tart create`/`clone` leave: config.json, disk.img (a copy of the test
/// guest: it writes its boot counter), nvram.bin (the firmware's empty store).
struct TestVm {
    dir: tempfile::TempDir,
    vm: VmDir,
    config: VmConfig,
}

impl TestVm {
    fn new(name: &str) -> TestVm {
        let dir = tempfile::tempdir().unwrap();
        let vm = VmDir::new(dir.path().join(name));
        fs::create_dir(vm.path()).unwrap();
        let mut config = VmConfig::new_linux(Arch::Amd64);
        config.cpu_count = 1;
        config.memory_size = 512 << 20;
        vm.save_config(&config).unwrap();
        fs::copy(tart_testkit::test_guest_image(), vm.disk_path()).unwrap();
        let template = tart_qemu::firmware::find_firmware(Arch::Amd64).unwrap().vars_template;
        fs::copy(template, vm.nvram_path()).unwrap();
        TestVm { dir, vm, config }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.vm.path().join(file)
    }

    fn options(&self, serial: SerialPort) -> RunOptions {
        RunOptions {
            vnc: false,
            serial,
            // restrict=on: DHCP/DNS from QEMU only, the guest reaches nothing.
            network: vec![NetworkAttachment::Slirp {
                restrict: true,
                forwards: Vec::new(),
            }],
            // Only migratable devices (no vhost-user vsock), so any of these VMs can be suspended.
            suspendable: true,
            ..RunOptions::defaults()
        }
    }

    fn spec(&self, options: RunOptions) -> VmSpec {
        let host = HostInfo::detect();
        let prepared = VmSpec::prepare(&self.vm, &self.config, options, &host).unwrap();
        assert_eq!(
            prepared.nvram.map(|nvram| nvram.path),
            Some(self.vm.nvram_path()),
            "our nvram.bin is OVMF's"
        );
        prepared.spec
    }
}

/// Waits for a serial-console line starting with `prefix` in `log`; returns it.
fn wait_for_line(vm: &RunningVm, log: &Path, prefix: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let text = fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
            return line.trim_end().to_owned();
        }
        if let Some(end) = vm.wait_timeout(Some(Duration::ZERO)) {
            panic!("QEMU ended ({end:?}) before {prefix:?}; serial:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix:?} within {BOOT_TIMEOUT:?}; serial:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ticks(log: &Path) -> Vec<u32> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("TART-TEST-GUEST: tick "))
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

#[test]
fn boots_serves_vnc_and_shuts_down_on_acpi_powerdown() {
    let t0 = Instant::now();
    let test = TestVm::new("acpi");
    let serial = test.path("serial.log");
    let mut options = test.options(SerialPort::path(&serial));
    options.vnc = true;
    let vm = RunningVm::start(test.spec(options)).unwrap();
    assert_eq!(vm.status().unwrap(), "running");

    // VNC on loopback, password in the URL as Tart prints it (Packer's regex).
    let url = vm.vnc_url().unwrap().to_owned();
    let (password, port) = url
        .strip_prefix("vnc://:")
        .and_then(|rest| rest.split_once("@127.0.0.1:"))
        .unwrap_or_else(|| panic!("{url}"));
    assert_eq!(password.len(), 8);
    let mut banner = [0u8; 12];
    std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap()))
        .unwrap()
        .read_exact(&mut banner)
        .unwrap();
    assert!(banner.starts_with(b"RFB 003."), "{banner:?}");

    wait_for_line(&vm, &serial, "TART-TEST-GUEST: booted");
    let booted = t0.elapsed();
    let t1 = Instant::now();
    vm.powerdown().unwrap();
    assert_eq!(vm.wait(), ExitReason::GuestShutdown);
    let log = fs::read_to_string(&serial).unwrap();
    assert!(log.contains("TART-TEST-GUEST: powering off"), "{log}");
    assert!(matches!(vm.status(), Err(Error::NotRunning)));
    eprintln!(
        "acpi: booted in {:.1} s, shut down {:.1} s after the power button",
        booted.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
}

#[test]
fn poweroff_is_immediate_and_serial_pty_works() {
    let t0 = Instant::now();
    let test = TestVm::new("poweroff");
    let host = HostInfo::detect();
    let mut options = test.options(SerialPort::Pty);
    // passt (installed by scripts/setup), which the guest gets an address from.
    options.network = vec![NetworkAttachment::Passt {
        binary: host.find_program("passt").expect("passt (scripts/setup installs it)"),
        forwards: Vec::new(),
    }];
    let vm = RunningVm::start(test.spec(options)).unwrap();
    let pty = vm.serial_pty().expect("a pty").to_owned();
    assert!(pty.starts_with("/dev/pts/"), "{}", pty.display());

    let (lines_tx, lines) = mpsc::channel();
    let reader = BufReader::new(fs::File::open(&pty).unwrap());
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let want = "TART-TEST-GUEST: ip ";
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let line = loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no {want:?} on the pty; QEMU: {}", vm.qemu_output()));
        if line.starts_with(want) {
            break line;
        }
    };
    let booted = t0.elapsed();
    let t1 = Instant::now();
    vm.poweroff().unwrap();
    assert_eq!(vm.wait(), ExitReason::HostQuit);
    let exit = t1.elapsed();
    assert!(exit < Duration::from_secs(5), "poweroff took {exit:?}");
    eprintln!(
        "poweroff: {:?} in {:.1} s (passt), QEMU gone {:.2} s after poweroff()",
        line.trim(),
        booted.as_secs_f64(),
        exit.as_secs_f64()
    );
}

#[test]
fn suspend_to_file_and_restore_continues_the_guest() {
    let t0 = Instant::now();
    let test = TestVm::new("suspend");
    let serial = test.path("serial.log");
    let spec = test.spec(test.options(SerialPort::path(&serial)));
    let vm = RunningVm::start(spec.clone()).unwrap();
    wait_for_line(&vm, &serial, "TART-TEST-GUEST: tick 3");
    let booted = t0.elapsed();

    let state = test.vm.state_path();
    let t1 = Instant::now();
    vm.suspend_to(&state).unwrap();
    assert_eq!(vm.wait(), ExitReason::HostQuit);
    let saved = t1.elapsed();
    let last_tick = *ticks(&serial).last().unwrap();
    assert!(last_tick >= 3);
    let state_bytes = fs::metadata(&state).unwrap().len();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);
    drop(vm);

    // Other hardware (memory size) than what was saved: QEMU refuses, nothing is lost.
    let disk_before = fs::read(test.vm.disk_path()).unwrap();
    let mut wrong = spec.clone();
    wrong.memory_bytes = 256 << 20;
    wrong.restore_from = Some(state.clone());
    let t2 = Instant::now();
    let err = RunningVm::start(wrong)
        .err()
        .expect("restore into other hardware fails");
    let rejected = t2.elapsed();
    let message = err.to_string();
    assert!(matches!(err, Error::StateRejected { .. }), "{message}");
    assert!(message.contains("ram0"), "QEMU's reason is in the message: {message}");
    assert_eq!(fs::metadata(&state).unwrap().len(), state_bytes);
    assert!(fs::read(test.vm.disk_path()).unwrap() == disk_before, "disk untouched");

    // The right hardware: the guest carries on where it was, without booting again.
    let resumed_serial = test.path("serial-resumed.log");
    let mut resume = test.spec(test.options(SerialPort::path(&resumed_serial)));
    resume.restore_from = Some(state.clone());
    let t3 = Instant::now();
    let vm = RunningVm::start(resume).unwrap();
    let restored = t3.elapsed();
    fs::remove_file(&state).unwrap(); // what tart run does after a successful restore
    let first = wait_for_line(&vm, &resumed_serial, "TART-TEST-GUEST: tick ");
    let resumed_tick: u32 = first.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(resumed_tick, last_tick + 1, "{first}");
    assert!(resumed_tick >= 4);
    let log = fs::read_to_string(&resumed_serial).unwrap();
    assert!(
        !log.contains("booted") && !log.contains("boot-count"),
        "no reboot: {log}"
    );
    vm.poweroff().unwrap();
    assert_eq!(vm.wait(), ExitReason::HostQuit);
    eprintln!(
        "suspend: tick 3 after {:.1} s, saved {} MiB in {:.2} s, wrong hardware refused in {:.2} s: {message}; \
         restored in {:.2} s, first tick {resumed_tick} after {last_tick}",
        booted.as_secs_f64(),
        state_bytes >> 20,
        saved.as_secs_f64(),
        rejected.as_secs_f64(),
        restored.as_secs_f64()
    );
}

#[test]
fn corrupt_state_is_refused_and_kept() {
    let test = TestVm::new("corrupt");
    let state = test.vm.state_path();
    let mut junk = b"QEVM\0\0\0\x03".to_vec();
    junk.extend_from_slice(&[0x5a; 4096]);
    fs::write(&state, &junk).unwrap();
    let mut spec = test.spec(test.options(SerialPort::None));
    spec.restore_from = Some(state.clone());
    let err = RunningVm::start(spec.clone()).err().expect("garbage state");
    let message = err.to_string();
    assert!(matches!(err, Error::StateRejected { .. }), "{message}");
    assert!(
        message.starts_with(&format!("QEMU refused the saved VM state {}: ", state.display())),
        "{message}"
    );
    assert_eq!(fs::read(&state).unwrap(), junk);

    // Apple's state file from macOS Tart is not even handed to QEMU.
    fs::write(&state, b"\x00\x01 not qemu").unwrap();
    let err = RunningVm::start(spec).err().expect("foreign state");
    assert!(matches!(err, Error::NotAQemuState(_)), "{err}");
    eprintln!("corrupt state: {message}");
}

#[test]
fn killed_qemu_is_a_crash() {
    let test = TestVm::new("crash");
    let vm = RunningVm::start(test.spec(test.options(SerialPort::None))).unwrap();
    vm.kill();
    match vm.wait() {
        ExitReason::Crashed { status, .. } => {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGKILL));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_qemu_arguments_fail_start_with_qemu_s_words() {
    let test = TestVm::new("badargs");
    let mut spec = test.spec(test.options(SerialPort::None));
    spec.extra_args = vec!["-device".into(), "no-such-device".into()];
    let err = RunningVm::start(spec).err().expect("QEMU refuses");
    let message = err.to_string();
    assert!(
        message.starts_with("QEMU exited while starting (exit status: 1)") && message.contains("no-such-device"),
        "{message}"
    );
}

const PDEATHSIG_CHILD: &str = "TART_QEMU_TEST_PDEATHSIG_CHILD";

/// In the child process of `qemu_dies_with_the_process_that_started_it` only: starts a VM,
/// prints QEMU's pid and waits to be killed.
#[test]
fn pdeathsig_child() {
    if std::env::var_os(PDEATHSIG_CHILD).is_none() {
        return;
    }
    let test = TestVm::new("orphan");
    let vm = RunningVm::start(test.spec(test.options(SerialPort::None))).unwrap();
    // Killed with SIGKILL, this process cleans up nothing: the parent removes these.
    println!(
        "QEMU_PID {} {} {}",
        vm.pid(),
        vm.runtime_dir().display(),
        test.dir.path().display()
    );
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn qemu_dies_with_the_process_that_started_it() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["pdeathsig_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(PDEATHSIG_CHILD, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // libtest prints "test pdeathsig_child ... " on the same line.
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split("QEMU_PID ").nth(1).map(str::to_owned))
        .expect("the child started QEMU");
    let mut words = line.split_whitespace();
    let pid: i32 = words.next().unwrap().parse().unwrap();
    let leftovers: Vec<PathBuf> = words.map(PathBuf::from).collect();
    let alive = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(false)
    };
    assert!(alive(pid));
    child.kill().unwrap(); // SIGKILL: no destructor runs in the child
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "QEMU {pid} outlived its parent");
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in leftovers {
        let _ = fs::remove_dir_all(dir);
    }
}

/// An arm64 VM on this x86_64 host: qemu-system-aarch64 under TCG, with a warning. Needs Debian's
/// qemu-system-arm and qemu-efi-aarch64, which scripts/setup installs.
#[test]
fn arm64_vm_is_emulated_with_a_warning() {
    let host = HostInfo::detect();
    if host.arch != Arch::Amd64 {
        return;
    }
    let firmware = tart_qemu::firmware::find_firmware(Arch::Arm64).expect("scripts/setup installs qemu-efi-aarch64");
    host.qemu_binary(Arch::Arm64)
        .expect("scripts/setup installs qemu-system-arm");
    let dir = tempfile::tempdir().unwrap();
    let vm = VmDir::new(dir.path().join("arm"));
    fs::create_dir(vm.path()).unwrap();
    let mut config = VmConfig::new_linux(Arch::Arm64);
    config.cpu_count = 2;
    config.memory_size = 256 << 20;
    vm.save_config(&config).unwrap();
    fs::File::create(vm.disk_path()).unwrap().set_len(64 << 20).unwrap();
    fs::copy(&firmware.vars_template, vm.nvram_path()).unwrap();
    let serial = vm.path().join("serial.log");
    let options = RunOptions {
        vnc: true,
        serial: SerialPort::path(&serial),
        network: vec![NetworkAttachment::Slirp {
            restrict: true,
            forwards: Vec::new(),
        }],
        ..RunOptions::defaults()
    };
    let prepared = VmSpec::prepare(&vm, &config, options, &host).unwrap();
    assert!(prepared.spec.qemu_binary.ends_with("qemu-system-aarch64"));
    assert!(prepared.accel.emulated);
    assert_eq!(prepared.warnings.len(), 1, "{:?}", prepared.warnings);
    assert!(prepared.warnings[0].contains("arm64 VM on an amd64 host"));
    let running = RunningVm::start(prepared.spec).unwrap();
    assert_eq!(running.status().unwrap(), "running");
    assert!(running.vnc_url().is_some());
    // The firmware runs (and finds nothing to boot on the empty disk).
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "no firmware output; QEMU: {}",
            running.qemu_output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    running.poweroff().unwrap();
    assert_eq!(running.wait(), ExitReason::HostQuit);
}
