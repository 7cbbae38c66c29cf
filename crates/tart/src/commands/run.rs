//! `tart run` and `tart suspend`: a VM's life under QEMU, controlled by signals as in Tart
//! (SIGINT/`tart stop`: power off; SIGUSR1/`tart suspend`: save state; SIGUSR2: ACPI shutdown).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use std::path::PathBuf;

use tart_home::{clone_file, AccessDate, Error, MacAddress, PidLock, StagingDir, VmState};
use tart_oci::RemoteName;
use tart_qemu::{
    parse_directory_shares, DiskOptions, ExitReason, ExtraDisk, HostInfo, RunOptions, RunningVm, SerialPort, VmSpec,
};

use super::Context;
use crate::cli::{RunArgs, SuspendArgs};
use crate::control::{ControlSocket, CONTROL_SOCKET};
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
    // From the start: a `tart stop`/`tart suspend` that arrives while the VM is still starting
    // is handled once it runs, instead of being lost (a background job ignores SIGINT by
    // default) or killing us (SIGUSR1's default action).
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2]).context("failed to install signal handlers")?;
    let vm = ctx.home.existing_local_vm(&args.name)?;
    vm.set_access_date(AccessDate::Now)?;
    let host = HostInfo::detect();
    let mut options = RunOptions::defaults(&host);
    options.vnc = !args.no_graphics;
    options.root_disk = DiskOptions::parse(&args.root_disk_opts)?;
    options.keyboard = !args.no_keyboard;
    options.pointer = !args.no_pointer;
    options.serial = match (&args.serial_path, args.serial) {
        (Some(path), _) => SerialPort::path(path),
        (None, true) => SerialPort::Pty,
        (None, false) => SerialPort::None,
    };
    options.nested = args.nested;
    options.shares = parse_directory_shares(&args.dir)?;
    let restoring = vm.state_path().exists();
    if restoring {
        options.restore_from = Some(vm.state_path());
    }
    // As in Tart, a VM with a saved state runs suspendable, so it can be suspended again.
    options.suspendable = args.suspendable || restoring;

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
    // Claims and private copies of remote disks live as long as the VM.
    let mut remote_disk_copies = Vec::new();
    let mut disk_claims = Vec::new();
    for argument in &args.disk {
        let mut resolve = |location: &str| copy_cached_disk(ctx, location, &mut remote_disk_copies);
        let (disk, claim) = ExtraDisk::open(argument, config.arch, &mut resolve)?;
        options.extra_disks.push(disk);
        disk_claims.extend(claim);
    }
    let suspendable = options.suspendable;
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
    let _control_socket = match running.vsock_connector() {
        Some(guest) => {
            match ControlSocket::serve(&vm.path().join(CONTROL_SOCKET), guest) {
                Ok(socket) => Some(socket),
                Err(err) => {
                    eprintln!("failed to create the control socket, tart exec and tart ip --resolver agent will not work: {err}");
                    None
                }
            }
        }
        None => None,
    };

    // QEMU exits in the middle of a suspend (after saving, before the state file is in
    // place), so the main thread must wait for the suspend itself, not just for QEMU.
    let suspending = Arc::new(AtomicBool::new(false));
    let (suspended_tx, suspended_rx) = std::sync::mpsc::channel::<bool>();
    let handle = signals.handle();
    let signal_thread = {
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
                            // Tart powers the VM off here; we keep it running when QEMU
                            // still has it, so a refused suspend loses nothing.
                            Err(err) if running.status().is_ok() => {
                                eprintln!(
                                    "Failed to suspend the VM: {err}; the VM keeps running{}",
                                    if suspendable {
                                        ""
                                    } else {
                                        " (start it with --suspendable to be able to suspend it)"
                                    }
                                );
                                suspending.store(false, Ordering::SeqCst);
                                continue;
                            }
                            Err(err) => {
                                eprintln!("Failed to suspend the VM: {err}");
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
        })
    };

    let outcome = running.wait();
    handle.close();
    let _ = signal_thread.join();
    // The last reference: QEMU's helpers are reaped and the runtime directory is removed now,
    // not skipped by the process exit.
    drop(running);
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

/// `--disk <remote name>`: a private copy-on-write copy of the cached image's disk in `tmp/`,
/// locked (unlike Tart's, whose lock is dropped at once) so that no other `tart` command collects
/// it while the VM runs, and deleted afterwards.
fn copy_cached_disk(
    ctx: &Context,
    location: &str,
    copies: &mut Vec<StagingDir>,
) -> std::result::Result<Option<PathBuf>, String> {
    let Ok(name) = location.parse::<RemoteName>() else {
        return Ok(None);
    };
    let image = ctx.cache.open(&name).ok_or_else(|| {
        format!("no such file, and {name} is not in the OCI cache: pull it first with \"tart pull {name}\"")
    })?;
    let staging = ctx.home.staging_dir().map_err(|e| e.to_string())?;
    let copy = staging.path().join("disk.img");
    clone_file(&image.disk_path(), &copy).map_err(|e| format!("failed to copy the disk of {name}: {e}"))?;
    copies.push(staging);
    Ok(Some(copy))
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
