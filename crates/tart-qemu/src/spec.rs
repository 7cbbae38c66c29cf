//! [`VmSpec`]: everything QEMU needs to run one VM, fully resolved (binary, accelerator,
//! firmware, files), so that turning it into a command line is a pure function
//! ([`crate::qemu_args`]). [`VmSpec::prepare`] builds one from a Tart VM directory, its config and
//! the `tart run` options.
//!
//! The emulated hardware depends only on the VM's config and on the flags that change hardware
//! in Tart too (`--no-keyboard`, `--no-pointer`, `ro`); never on how the host *looks at* the VM
//! (`--no-graphics`, `--serial`, VNC). Restoring a saved state needs exactly the same hardware,
//! so `tart run --serial` can resume a VM suspended by `tart run --no-graphics`: the GPU and the
//! UART are always there, only their host-side backends (VNC server, pty, file, nothing) change.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tart_home::{Arch, BootFirmware, DiskFormat, MacAddress, Os, VmConfig, VmDir};

use crate::boot::{direct_kernel, Boot};
use crate::disk::ExtraDisk;
use crate::firmware::{find_firmware, prepare_nvram, NvramChoice};
use crate::host::{Accel, AccelChoice, HostInfo};
use crate::share::SharedDirectory;
use crate::vsock::VsockDevice;
use crate::{DiskOptions, Error, Result};

/// A VM ready to be started with [`crate::RunningVm::start`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// Shown as QEMU's `-name` (process title, VNC desktop name).
    pub name: String,
    pub qemu_binary: PathBuf,
    pub arch: Arch,
    pub accel: Accel,
    pub cpus: u32,
    /// Guest RAM, rounded up to whole MiB on the command line.
    pub memory_bytes: u64,
    /// UEFI firmware and its variable store (`nvram.bin` or its substitute), or the VM's own
    /// kernel.
    pub boot: Boot,
    pub root_disk: PathBuf,
    pub root_disk_options: DiskOptions,
    /// `--disk`: more virtio-blk disks (CD-ROMs for ISO images), after the root disk.
    pub extra_disks: Vec<ExtraDisk>,
    /// `--dir`: one virtio-fs device (and `virtiofsd`) per tag.
    pub shares: Vec<SharedDirectory>,
    /// The channel to the guest agent.
    pub vsock: Option<VsockDevice>,
    /// Let the guest run its own VMs (`--nested`).
    pub nested: bool,
    /// Network interfaces, in PCI order.
    pub network: Vec<NetworkDevice>,
    /// The virtual GPU's preferred resolution (`virtio-gpu-pci`); `None` = no GPU at all.
    pub display: Option<DisplaySize>,
    /// Serve the GPU's screen over VNC on 127.0.0.1 with a random password.
    pub vnc: bool,
    /// USB keyboard.
    pub keyboard: bool,
    /// USB tablet (absolute pointer).
    pub pointer: bool,
    /// `virtio-rng-pci` fed from the host's `/dev/urandom`.
    pub entropy: bool,
    /// Where the guest's console goes.
    pub serial: SerialPort,
    /// Which device the guest sees as its console.
    pub serial_device: SerialDevice,
    /// Restore this saved state (from [`crate::RunningVm::suspend_to`]) instead of booting.
    pub restore_from: Option<PathBuf>,
    /// Appended to QEMU's command line as they are (tests, experiments: e.g. `-fw_cfg`).
    pub extra_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisplaySize {
    pub width: u32,
    pub height: u32,
}

/// One virtio-net NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkDevice {
    pub mac: MacAddress,
    pub attachment: NetworkAttachment,
}

/// The host side of a NIC. Each variant knows its QEMU `-netdev` and, if it needs one, the helper
/// process to run next to QEMU (see `argv.rs` and `vm.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// QEMU's built-in user-mode NAT (libslirp): guest 10.0.2.15, DHCP and DNS from QEMU.
    /// `restrict` cuts the guest off from everything but that DHCP/DNS (tests).
    Slirp { restrict: bool, forwards: Vec<PortForward> },
    /// User-mode NAT by `passt` (faster than slirp, IPv6): the guest gets the host's address
    /// over DHCP. `tart-qemu` runs one `passt` per NIC, connected to QEMU by a socket pair.
    Passt {
        binary: PathBuf,
        forwards: Vec<PortForward>,
    },
    /// A tap (or macvtap) interface the caller made and keeps up for the VM's life, e.g. a port
    /// of the shared network's bridge; QEMU inherits the descriptor.
    Tap { device: TapDevice },
    /// A port of an existing bridge made by QEMU's setuid `qemu-bridge-helper`, for users
    /// without CAP_NET_ADMIN (the bridge must be allowed in `/etc/qemu/bridge.conf`).
    BridgeHelper { bridge: String, helper: PathBuf },
}

/// An open tap device, shared between its owner and the spec (whose clones all name the same
/// descriptor).
#[derive(Clone, Debug)]
pub struct TapDevice(pub std::sync::Arc<std::os::fd::OwnedFd>);

impl PartialEq for TapDevice {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TapDevice {}

/// A host TCP port forwarded to a guest port (user-mode networking's `--net-user-expose`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

impl NetworkAttachment {
    /// User-mode NAT: QEMU's slirp when QEMU has it, else `passt` (QEMU 7.2 made slirp
    /// optional, and some builds leave it out). Slirp comes first: Debian 12's passt (2023-03)
    /// sometimes never tells the guest that the other end closed a TCP connection.
    pub fn user_nat(host: &HostInfo, qemu: &Path, forwards: Vec<PortForward>) -> Result<Self> {
        if qemu_has_slirp(qemu) {
            return Ok(NetworkAttachment::Slirp {
                restrict: false,
                forwards,
            });
        }
        let binary = host.find_program("passt").ok_or(Error::MissingHelper {
            program: "passt",
            hint: "this QEMU has no user-mode networking (slirp) of its own: install Debian's passt package \
                   (apt-get install passt)",
        })?;
        Ok(NetworkAttachment::Passt { binary, forwards })
    }
}

/// Whether `qemu` lists the `user` (slirp) network backend.
fn qemu_has_slirp(qemu: &Path) -> bool {
    std::process::Command::new(qemu)
        .args(["-netdev", "help"])
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|line| line.trim() == "user")
        })
}

/// Host side of the guest console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialPort {
    /// Connected to nothing (the device still exists).
    None,
    /// A new pseudo-terminal; its path is [`crate::RunningVm::serial_pty`] (`tart run --serial`).
    Pty,
    /// Appended to a file, created if missing (`tart run --serial-path <file>`).
    File(PathBuf),
    /// An existing terminal device, read and written (`--serial-path /dev/ttyX`).
    Tty(PathBuf),
}

impl SerialPort {
    /// `--serial-path <path>`: a terminal device is used as a terminal, anything else as a file.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let is_char_device = std::fs::metadata(&path)
            .map(|m| m.file_type().is_char_device())
            .unwrap_or(false);
        if is_char_device && is_tty(&path) {
            SerialPort::Tty(path)
        } else {
            SerialPort::File(path)
        }
    }
}

fn is_tty(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        // SAFETY: isatty only inspects the descriptor.
        .map(|file| unsafe { libc::isatty(file.as_raw_fd()) } == 1)
        .unwrap_or(false)
}

/// The console device of the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SerialDevice {
    /// The platform UART: 16550 `ttyS0` on x86_64, PL011 `ttyAMA0` on arm64. What firmware and
    /// distribution images print to (`console=ttyS0`).
    #[default]
    Uart,
    /// A virtio console, `hvc0` in the guest: what Tart (Virtualization.framework) gives Linux
    /// guests.
    VirtioConsole,
}

/// The `tart run` flags that shape the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Serve the display over VNC (false: `--no-graphics`).
    pub vnc: bool,
    pub serial: SerialPort,
    pub serial_device: SerialDevice,
    pub root_disk: DiskOptions,
    pub extra_disks: Vec<ExtraDisk>,
    pub shares: Vec<SharedDirectory>,
    /// Only devices whose state QEMU can save: no vhost-user vsock or virtio-fs (`--suspendable`,
    /// or resuming a suspended VM).
    pub suspendable: bool,
    pub nested: bool,
    /// NICs' host side, one NIC each (all with the config's MAC for now: Tart gives every NIC
    /// the same address too).
    pub network: Vec<NetworkAttachment>,
    pub keyboard: bool,
    pub pointer: bool,
    /// Resume from this state file (`state.vzvmsave`) instead of booting.
    pub restore_from: Option<PathBuf>,
}

impl RunOptions {
    /// `tart run <vm>` without flags: VNC display, no serial, user-mode NAT (QEMU's slirp),
    /// keyboard and pointer.
    pub fn defaults() -> Self {
        RunOptions {
            vnc: true,
            serial: SerialPort::None,
            serial_device: SerialDevice::default(),
            root_disk: DiskOptions::default(),
            extra_disks: Vec::new(),
            shares: Vec::new(),
            suspendable: false,
            nested: false,
            network: vec![NetworkAttachment::Slirp {
                restrict: false,
                forwards: Vec::new(),
            }],
            keyboard: true,
            pointer: true,
            restore_from: None,
        }
    }
}

/// A [`VmSpec`] and what the caller should know about how it was made.
#[derive(Clone, Debug)]
pub struct PreparedVm {
    pub spec: VmSpec,
    pub accel: AccelChoice,
    /// The UEFI variable store, `None` for a VM that boots its own kernel.
    pub nvram: Option<NvramChoice>,
    /// Lines to print before starting (e.g. the VM is emulated).
    pub warnings: Vec<String>,
}

impl VmSpec {
    /// Resolves everything for running the VM in `vm` with `config` under `options` on `host`:
    /// the QEMU binary, the accelerator, and how it boots: the VM's own `kernel` when it has one
    /// (see [`crate::Boot`]), else the firmware and the variable store (which may create
    /// `nvram.qemu.bin` in the VM directory, see [`crate::firmware`]).
    pub fn prepare(vm: &VmDir, config: &VmConfig, options: RunOptions, host: &HostInfo) -> Result<PreparedVm> {
        if config.os == Os::Darwin {
            return Err(Error::InvalidSpec("macOS VMs can only run on macOS hosts".into()));
        }
        if config.disk_format == DiskFormat::Asif {
            return Err(Error::InvalidSpec(
                "ASIF disk images can only be used on macOS hosts".into(),
            ));
        }
        if options.suspendable && !options.shares.is_empty() {
            return Err(Error::InvalidSpec(
                "--dir cannot be used with a suspendable VM: QEMU cannot save the state of a virtio-fs device".into(),
            ));
        }
        let accel = host.choose_accel(config.arch)?;
        if options.nested {
            check_nested(accel.accel, config.arch)?;
        }
        let qemu_binary = host.qemu_binary(config.arch)?;
        let (boot, nvram) = match direct_kernel(vm, config)? {
            Some(kernel) => (kernel, None),
            None if config.boot_firmware == Some(BootFirmware::Bios) => {
                if config.arch != Arch::Amd64 {
                    return Err(Error::InvalidSpec(format!(
                        "the VM's config asks for BIOS boot, which only amd64 VMs have, and this VM is {}",
                        config.arch.as_str()
                    )));
                }
                (Boot::Bios, None)
            }
            None => {
                let firmware = find_firmware(config.arch)?;
                let nvram = prepare_nvram(&vm.nvram_path(), &firmware)?;
                let boot = Boot::Uefi {
                    code: firmware.code,
                    vars: nvram.path.clone(),
                };
                (boot, Some(nvram))
            }
        };
        let name = vm
            .path()
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tart-vm".into());
        let mut spec = VmSpec {
            name,
            qemu_binary,
            arch: config.arch,
            accel: accel.accel,
            cpus: config.cpu_count,
            memory_bytes: config.memory_size,
            boot,
            root_disk: vm.disk_path(),
            root_disk_options: options.root_disk,
            extra_disks: options.extra_disks,
            shares: options.shares,
            vsock: VsockDevice::choose(host, options.suspendable),
            nested: options.nested,
            network: Vec::new(),
            display: Some(DisplaySize {
                width: config.display.width,
                height: config.display.height,
            }),
            vnc: options.vnc,
            keyboard: options.keyboard,
            pointer: options.pointer,
            entropy: true,
            serial: options.serial,
            serial_device: options.serial_device,
            restore_from: options.restore_from,
            extra_args: Vec::new(),
        };
        spec.set_network(config.mac_address, options.network);
        let warnings = accel.warning.iter().cloned().collect();
        Ok(PreparedVm {
            spec,
            accel,
            nvram,
            warnings,
        })
    }
}

impl VmSpec {
    /// One NIC with `mac` per attachment (Tart gives every NIC the VM's address).
    pub fn set_network(&mut self, mac: MacAddress, attachments: Vec<NetworkAttachment>) {
        self.network = attachments
            .into_iter()
            .map(|attachment| NetworkDevice { mac, attachment })
            .collect();
    }
}

/// Nested virtualization needs the guest to see VT-x/AMD-V (x86, KVM only: QEMU's TCG emulates
/// neither) or EL2 (arm64: TCG emulates it; KVM only on hosts with nested support).
fn check_nested(accel: Accel, arch: Arch) -> Result<()> {
    match (accel, arch) {
        (Accel::Tcg, Arch::Amd64) => Err(Error::InvalidSpec(
            "nested virtualization is not available: this VM runs under QEMU's TCG emulation, which \
             cannot emulate VT-x/AMD-V; it needs a host with KVM"
                .into(),
        )),
        (Accel::Kvm, Arch::Amd64) => {
            let enabled = ["kvm_intel", "kvm_amd"].iter().any(|module| {
                std::fs::read_to_string(format!("/sys/module/{module}/parameters/nested"))
                    .is_ok_and(|value| matches!(value.trim(), "Y" | "y" | "1"))
            });
            if enabled {
                Ok(())
            } else {
                Err(Error::InvalidSpec(
                    "nested virtualization is disabled in the host's KVM module: enable it with \
                     \"echo 'options kvm_intel nested=1' >/etc/modprobe.d/kvm-nested.conf\" (kvm_amd on AMD) \
                     and reload the module"
                        .into(),
                ))
            }
        }
        (_, Arch::Arm64) => Ok(()),
    }
}
