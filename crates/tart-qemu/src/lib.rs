//! Runs a Tart VM under QEMU, the way `tart run` needs it.
//!
//! Three layers, as in cloud-hypervisor or Firecracker:
//!
//! 1. **Spec** ([`VmSpec`]): everything about one run, fully resolved. [`VmSpec::prepare`] makes
//!    one from a VM directory, its `config.json` and the `tart run` flags ([`RunOptions`]),
//!    choosing the QEMU binary and accelerator ([`HostInfo`]), the firmware and the UEFI
//!    variable store ([`firmware`]). [`qemu_args`] turns it into QEMU's command line, purely.
//! 2. **Supervisor** ([`RunningVm`]): spawns QEMU tied to the caller's life
//!    (`PR_SET_PDEATHSIG`), waits for it, reports how it ended ([`ExitReason`]), and kills it when
//!    dropped.
//! 3. **Control** ([`QmpClient`]): QMP commands typed by the `qapi` crate (power button, hard
//!    power-off, pause, save and restore of the VM state, VNC password, status) and events.
//!
//! ```no_run
//! # fn main() -> tart_qemu::Result<()> {
//! use tart_qemu::{ExitReason, HostInfo, RunOptions, RunningVm, VmSpec};
//! let home = tart_home::TartHome::from_env().unwrap();
//! let vm = home.existing_local_vm("ubuntu").unwrap();
//! let config = vm.config().unwrap();
//! let host = HostInfo::detect();
//! let prepared = VmSpec::prepare(&vm, &config, RunOptions::defaults(), &host)?;
//! prepared.warnings.iter().for_each(|w| eprintln!("{w}"));
//! let running = RunningVm::start(prepared.spec)?;
//! if let Some(url) = running.vnc_url() {
//!     println!("VNC server is running at {url}");
//! }
//! match running.wait() {
//!     ExitReason::GuestShutdown | ExitReason::HostQuit => {}
//!     ExitReason::Crashed { status, output } => eprintln!("QEMU {status}: {output}"),
//! }
//! # Ok(()) }
//! ```

mod argv;
mod boot;
mod disk;
mod error;
pub mod firmware;
mod host;
pub mod qmp;
mod share;
mod spec;
mod sys;
mod vm;
mod vsock;

pub use argv::{qemu_args, Runtime};
pub use boot::{kernel_kind, Boot, KernelKind};
pub use disk::{
    CachingMode, DiskClaim, DiskOptions, DiskSource, ExtraDisk, ImageFormat, QemuCache, RemoteDiskResolver, SyncMode,
};
pub use error::{Error, Result};
pub use firmware::{Firmware, NvramChoice, NvramFormat, QEMU_NVRAM_FILE};
pub use host::{
    cpuinfo_has_hardware_virtualization, find_helper, find_in_path, qemu_binary_name, Accel, AccelChoice, HostInfo,
    ACCEL_ENV, HELPER_DIR,
};
pub use qmp::{QemuVersion, QmpClient, QmpError, QmpEvent, ShutdownEvent};
pub use share::{parse_directory_shares, NamedDirectory, ShareContent, SharedDirectory, DEFAULT_SHARE_TAG};
pub use spec::{
    DisplaySize, NetworkAttachment, NetworkDevice, PortForward, PreparedVm, RunOptions, SerialDevice, SerialPort,
    TapDevice, VmSpec,
};
pub use vm::{find_virtiofsd, ExitReason, RunningVm};
pub use vsock::{GuestStream, VsockConnector, VsockDevice};
