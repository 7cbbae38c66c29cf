//! `tart run` and `tart suspend`: a VM's life under QEMU, controlled by signals as in Tart
//! (SIGINT/`tart stop`: power off; SIGUSR1/`tart suspend`: save state; SIGUSR2: ACPI shutdown).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use std::path::{Path, PathBuf};

use std::net::Ipv4Addr;

use tart_home::{clone_file, AccessDate, Error, MacAddress, PidLock, StagingDir, VmState};
use tart_net::{
    bridgeable_interfaces, has_net_admin, parse_cidrs, parse_port_forwards, Attachment, InterfaceKind, Isolation,
    PortForwarder, SharedNetwork, SoftnetPolicy,
};
use tart_oci::RemoteName;
use tart_qemu::{
    parse_directory_shares, DiskOptions, ExitReason, ExtraDisk, HostInfo, NetworkAttachment, PortForward, RunOptions,
    RunningVm, SerialPort, VmSpec,
};

use super::Context;
use crate::cli::{RunArgs, SuspendArgs};
use crate::control::{ControlSocket, CONTROL_SOCKET};
use crate::UsageError;

fn validate(args: &RunArgs) -> Result<NetworkMode> {
    if args.vnc && args.vnc_experimental {
        return Err(usage("--vnc and --vnc-experimental are mutually exclusive"));
    }
    if args.graphics && args.no_graphics {
        return Err(usage("--graphics and --no-graphics are mutually exclusive"));
    }
    // Packer's Tart plugin passes these when a template asks for them; say why they cannot work.
    if args.recovery {
        bail!("--recovery boots macOS recovery, and macOS guests need a macOS host: drop recovery from the template");
    }
    if args.rosetta.is_some() {
        bail!(
            "--rosetta shares Apple's Rosetta, which exists only on Apple silicon Macs: on Linux, run x86_64 \
             binaries in an arm64 guest with qemu-user-static and binfmt-support instead"
        );
    }
    NetworkMode::from_args(args)
}

fn usage(text: &str) -> anyhow::Error {
    UsageError(text.to_owned()).into()
}

/// Where the VM's NIC goes, from the `--net-*` flags.
enum NetworkMode {
    /// The shared NAT network (the default), plain, Softnet or host-only.
    Shared(Isolation),
    Bridged(Vec<String>),
    /// User-mode NAT; `fallback`: chosen because tart may not manage interfaces.
    User {
        forwards: Vec<PortForward>,
        fallback: bool,
    },
}

impl NetworkMode {
    fn from_args(args: &RunArgs) -> Result<NetworkMode> {
        let softnet = args.net_softnet
            || args.net_softnet_allow.is_some()
            || args.net_softnet_block.is_some()
            || args.net_softnet_expose.is_some();
        let user = args.net_user || !args.net_user_expose.is_empty();
        let bridged = !args.net_bridged.is_empty();
        if [bridged, softnet, args.net_host].iter().filter(|&&on| on).count() > 1 {
            return Err(usage(
                "--net-bridged, --net-softnet and --net-host are mutually exclusive",
            ));
        }
        if user && (bridged || softnet || args.net_host) {
            return Err(usage(
                "--net-user cannot be used with --net-bridged, --net-softnet or --net-host",
            ));
        }
        if args.net_bridged.iter().any(|name| name == "list") {
            let candidates: Vec<String> = bridgeable_interfaces()
                .into_iter()
                .map(|interface| match interface.kind {
                    InterfaceKind::Bridge => format!("  {} (bridge: a tap on it)", interface.name),
                    InterfaceKind::Interface => format!("  {} (interface: a macvtap on it)", interface.name),
                })
                .collect();
            return Err(usage(&if candidates.is_empty() {
                "no interfaces to bridge to on this host".to_owned()
            } else {
                format!("interfaces available for --net-bridged:\n{}", candidates.join("\n"))
            }));
        }
        let cidrs = |value: &Option<String>| {
            value
                .as_deref()
                .map_or(Ok(Vec::new()), parse_cidrs)
                .map_err(|e| usage(&e))
        };
        let forwards = |values: &[String]| -> Result<Vec<PortForward>> {
            let mut forwards = Vec::new();
            for value in values {
                forwards.extend(parse_port_forwards(value).map_err(|e| usage(&e))?);
            }
            Ok(forwards)
        };
        Ok(if softnet {
            NetworkMode::Shared(Isolation::Softnet(SoftnetPolicy {
                allow: cidrs(&args.net_softnet_allow)?,
                block: cidrs(&args.net_softnet_block)?,
                expose: forwards(args.net_softnet_expose.as_slice())?,
            }))
        } else if args.net_host {
            NetworkMode::Shared(Isolation::HostOnly)
        } else if bridged {
            NetworkMode::Bridged(args.net_bridged.clone())
        } else if user || !has_net_admin() {
            NetworkMode::User {
                forwards: forwards(&args.net_user_expose)?,
                fallback: !user,
            }
        } else {
            NetworkMode::Shared(Isolation::None)
        })
    }
}

/// The host side of the VM's NICs, kept until the VM stops (dropping it undoes it).
struct Network {
    attachments: Vec<Attachment>,
    forwarder: Option<(PortForwarder, Ipv4Addr)>,
}

impl Network {
    fn attach(
        ctx: &Context,
        mode: &NetworkMode,
        vm: &str,
        mac: MacAddress,
        host: &HostInfo,
        qemu: &Path,
    ) -> Result<(Network, Vec<NetworkAttachment>)> {
        let mut network = Network {
            attachments: Vec::new(),
            forwarder: None,
        };
        match mode {
            NetworkMode::User { forwards, fallback } => {
                let nic = NetworkAttachment::user_nat(host, qemu, forwards.clone())?;
                if *fallback {
                    eprintln!(
                        "tart may not manage network interfaces (no CAP_NET_ADMIN): the VM gets user-mode networking \
                         ({}); run tart as root for the shared network",
                        if matches!(nic, NetworkAttachment::Passt { .. }) {
                            "passt"
                        } else {
                            "QEMU's slirp"
                        }
                    );
                }
                return Ok((network, vec![nic]));
            }
            NetworkMode::Shared(isolation) => {
                let forwarder = match isolation {
                    Isolation::Softnet(policy) if !policy.expose.is_empty() => {
                        Some(PortForwarder::bind(&policy.expose)?)
                    }
                    _ => None,
                };
                let shared = SharedNetwork::ensure(ctx.home.root())?;
                let attachment = shared.attach(vm, mac, isolation)?;
                if let (Some(forwarder), Some(ip)) = (forwarder, attachment.reserved_ip()) {
                    network.forwarder = Some((forwarder, ip));
                }
                network.attachments.push(attachment);
            }
            NetworkMode::Bridged(interfaces) => {
                for interface in interfaces {
                    network.attachments.push(Attachment::bridged(vm, interface, mac)?);
                }
            }
        }
        let nics = network.attachments.iter().map(Attachment::qemu).collect();
        Ok((network, nics))
    }
}

pub fn run(ctx: &Context, args: &RunArgs) -> Result<ExitCode> {
    let network_mode = validate(args)?;
    // From the start: a `tart stop`/`tart suspend` that arrives while the VM is still starting
    // is handled once it runs, instead of being lost (a background job ignores SIGINT by
    // default) or killing us (SIGUSR1's default action).
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2]).context("failed to install signal handlers")?;
    let vm = ctx.home.existing_local_vm(&args.name)?;
    vm.set_access_date(AccessDate::Now)?;
    let host = HostInfo::detect();
    let mut options = RunOptions::defaults();
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
    // After the --disk drives, so theirs keep the guest device names they had without a seed.
    let _seed_disk = match super::image::seed_disk(ctx, &vm)? {
        Some((disk, staging)) => {
            options.extra_disks.push(disk);
            Some(staging)
        }
        None => None,
    };
    let suspendable = options.suspendable;
    let mut prepared = VmSpec::prepare(&vm, &config, options, &host)?;
    // Last, once nothing else can fail for bad input: the host's network is only changed for
    // a VM that will run.
    let (network, nics) = Network::attach(
        ctx,
        &network_mode,
        &args.name,
        config.mac_address,
        &host,
        &prepared.spec.qemu_binary,
    )?;
    prepared.spec.set_network(config.mac_address, nics);
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
    if let Some((forwarder, guest)) = network.forwarder {
        forwarder.serve(guest);
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
    drop(network.attachments);
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
