//! `tart run` and `tart suspend`: a VM's life under QEMU, controlled by signals as in Tart
//! (SIGINT/`tart stop`: power off; SIGUSR1/`tart suspend`: save state; SIGUSR2: ACPI shutdown).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use tart_home::{AccessDate, Error, MacAddress, PidLock, VmState};
use tart_qemu::{ExitReason, HostInfo, RootDiskOptions, RunOptions, RunningVm, SerialPort, VmSpec};

use super::Context;
use crate::cli::{RunArgs, SuspendArgs};
use crate::UsageError;

fn validate(args: &RunArgs) -> Result<()> {
    let usage = |text: &str| Err(UsageError(text.to_owned()).into());
    if args.vnc && args.vnc_experimental {
        return usage("--vnc and --vnc-experimental are mutually exclusive");
    }
    if args.graphics && args.no_graphics {
        return usage("--graphics and --no-graphics are mutually exclusive");
    }
    if [!args.net_bridged.is_empty(), args.net_softnet, args.net_host]
        .iter()
        .filter(|&&on| on)
        .count()
        > 1
    {
        return usage("--net-bridged, --net-softnet and --net-host are mutually exclusive");
    }
    let unsupported = [
        (!args.disk.is_empty(), "--disk"),
        (!args.dir.is_empty(), "--dir"),
        (args.nested, "--nested"),
        (!args.net_bridged.is_empty(), "--net-bridged"),
        (args.net_softnet, "--net-softnet"),
        (args.net_host, "--net-host"),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(given, _)| *given) {
        bail!("not implemented yet: tart run {flag}");
    }
    Ok(())
}

pub fn run(ctx: &Context, args: &RunArgs) -> Result<ExitCode> {
    validate(args)?;
    let vm = ctx.home.existing_local_vm(&args.name)?;
    vm.set_access_date(AccessDate::Now)?;
    let host = HostInfo::detect();
    let mut options = RunOptions::defaults(&host);
    options.vnc = !args.no_graphics;
    options.root_disk = RootDiskOptions::parse(&args.root_disk_opts)?;
    options.keyboard = !args.no_keyboard;
    options.pointer = !args.no_pointer;
    options.serial = match (&args.serial_path, args.serial) {
        (Some(path), _) => SerialPort::path(path),
        (None, true) => SerialPort::Pty,
        (None, false) => SerialPort::None,
    };
    let restoring = vm.state_path().exists();
    if restoring {
        options.restore_from = Some(vm.state_path());
    }

    let global = ctx.home.global_lock()?;
    if vm.running_pid().is_some() {
        return Err(Error::VmAlreadyRunning(args.name.clone()).into());
    }
    let mut config = vm.config()?;
    let clash = ctx.home.local_vms()?.into_iter().any(|(name, other)| {
        name != args.name
            && other.state() == VmState::Running
            && other.config().is_ok_and(|c| c.mac_address == config.mac_address)
    });
    if clash {
        println!("There is already a running VM with the same MAC address!");
        println!("Resetting VM to assign a new MAC address...");
        config.mac_address = MacAddress::random();
        let _ = std::fs::remove_file(vm.state_path());
        options.restore_from = None;
        vm.save_config(&config)?;
    }
    let prepared = VmSpec::prepare(&vm, &config, options, &host)?;
    for warning in &prepared.warnings {
        eprintln!("{warning}");
    }
    // Taken after the last read of config.json: closing any descriptor of the file would drop
    // this process's POSIX lock.
    let _running_lock = PidLock::try_acquire(&vm.config_path())
        .context("failed to lock config.json")?
        .ok_or_else(|| Error::VmAlreadyRunning(args.name.clone()))?;
    drop(global);

    let restoring = restoring && prepared.spec.restore_from.is_some();
    if restoring {
        println!("restoring VM state from a snapshot...");
    }
    let running = Arc::new(RunningVm::start(prepared.spec)?);
    if restoring {
        std::fs::remove_file(vm.state_path()).context("failed to remove the consumed state file")?;
        println!("resuming VM...");
    }
    if let Some(pty) = running.serial_pty() {
        println!("Successfully open pty {}", pty.display());
    }
    if let Some(url) = running.vnc_url() {
        println!("VNC server is running at {url}");
    }

    // QEMU exits in the middle of a suspend (after saving, before the state file is in
    // place), so the main thread must wait for the suspend itself, not just for QEMU.
    let suspending = Arc::new(AtomicBool::new(false));
    let (suspended_tx, suspended_rx) = std::sync::mpsc::channel::<bool>();
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2]).context("failed to install signal handlers")?;
    let handle = signals.handle();
    {
        let running = running.clone();
        let suspending = suspending.clone();
        let state_path = vm.state_path();
        std::thread::spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGUSR1 if !suspending.swap(true, Ordering::SeqCst) => {
                        println!("pausing VM to take a snapshot...");
                        let saved = match running.suspend_to(&state_path) {
                            Ok(()) => {
                                println!("snapshot created successfully! shutting down the VM...");
                                true
                            }
                            Err(err) => {
                                eprintln!("Failed to suspend the VM: {err}");
                                let _ = running.poweroff();
                                false
                            }
                        };
                        let _ = suspended_tx.send(saved);
                    }
                    SIGUSR1 => {}
                    SIGUSR2 => {
                        println!("Requesting guest OS to stop...");
                        if let Err(err) = running.powerdown() {
                            eprintln!("failed to request the guest to stop: {err}");
                        }
                    }
                    _ => {
                        println!("Stopping VM...");
                        let _ = running.poweroff();
                    }
                }
            }
        });
    }

    let outcome = running.wait();
    handle.close();
    Ok(match outcome {
        ExitReason::GuestShutdown => {
            println!("guest has stopped the virtual machine");
            ExitCode::SUCCESS
        }
        ExitReason::HostQuit if suspending.load(Ordering::SeqCst) => match suspended_rx.recv() {
            Ok(true) => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        },
        ExitReason::HostQuit => ExitCode::SUCCESS,
        ExitReason::Crashed { status, output } => {
            eprintln!(
                "guest has stopped the virtual machine due to error: QEMU {status}: {}",
                output.trim()
            );
            ExitCode::FAILURE
        }
    })
}

pub fn suspend(ctx: &Context, args: &SuspendArgs) -> Result<()> {
    let vm = ctx.home.existing_local_vm(&args.name)?;
    let Some(pid) = vm.running_pid() else {
        return Err(Error::VmNotRunning(args.name.clone()).into());
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        bail!(
            "failed to send SIGUSR1 signal to the \"tart run\" process running VM \"{}\"",
            args.name
        );
    }
    Ok(())
}
