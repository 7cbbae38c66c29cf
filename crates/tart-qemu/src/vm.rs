//! The lifecycle of one QEMU process: start (boot or restore), control, wait, and cleanup.
//!
//! ```text
//!  VmSpec ──start──▶ [QEMU paused, QMP attached] ──setup: VNC password, restore──▶ cont ──▶ running
//!                                                                                           │
//!    powerdown() (ACPI) ─▶ guest shuts down ─▶ wait() = GuestShutdown                       │
//!    poweroff()  (quit)  ─────────────────────▶ wait() = HostQuit                           │
//!    suspend_to(file): stop, migrate to file, quit ─▶ wait() = HostQuit                     │
//!    QEMU dies (signal, error exit) ──────────▶ wait() = Crashed                            ▼
//! ```
//!
//! A thread waits for the QEMU process (without reaping it first, so killing it never hits a
//! recycled pid), another keeps the tail of its output for error messages, and the QMP reader
//! thread records events. Dropping a [`RunningVm`] kills QEMU: a VM never outlives its owner.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::argv::{qemu_args, Runtime, SERIAL_CHARDEV};
use crate::error::io_context;
use crate::qmp::{QmpClient, QmpError, QmpEvent, ShutdownEvent};
use crate::share::{ShareContent, SharedDirectory};
use crate::spec::{NetworkAttachment, PortForward, SerialPort, VmSpec};
use crate::vsock::{VsockConnector, VsockDevice};
use crate::{sys, Error, Result};
use tart_home::FileLock;

/// How long QEMU may take to open its QMP socket after being spawned.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one QMP command may take (restore uses its own, longer limit).
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Loading a state blocks QEMU's main loop (and so its QMP replies) until it is done.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
/// QEMU output kept for error messages.
const OUTPUT_TAIL_BYTES: usize = 16 * 1024;
/// The first bytes of a QEMU migration stream (`QEMU_VM_FILE_MAGIC`).
const QEMU_STATE_MAGIC: &[u8; 4] = b"QEVM";

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off, including in answer to [`RunningVm::powerdown`].
    GuestShutdown,
    /// The host ended it: [`RunningVm::poweroff`], [`RunningVm::suspend_to`], or a signal to QEMU.
    HostQuit,
    /// QEMU failed or was killed; `output` is the end of what it printed.
    Crashed { status: ExitStatus, output: String },
}

/// A running VM and its QEMU process.
pub struct RunningVm {
    // Field order is drop order: the QMP connection first, then the process (killed if still
    // running), then the runtime directory.
    qmp: QmpClient,
    process: QemuProcess,
    quit_requested: AtomicBool,
    vnc_url: Option<String>,
    serial_pty: Option<PathBuf>,
    vsock: Option<VsockConnector>,
    args: Vec<String>,
    _runtime_lock: FileLock,
    runtime_dir: tempfile::TempDir,
}

impl RunningVm {
    /// Starts QEMU for `spec` and returns once the guest runs: booting, or resumed from
    /// `spec.restore_from` (the caller deletes that file after success; on failure it is left as
    /// it was, as is the rest of the VM).
    ///
    /// QEMU gets `PR_SET_PDEATHSIG(SIGKILL)`: it dies when the *thread* that called `start`
    /// exits (or the process, e.g. `tart run` killed with SIGKILL). Call it from the main thread,
    /// or from a thread that lives as long as the VM.
    pub fn start(spec: VmSpec) -> Result<RunningVm> {
        let state_file = spec.restore_from.as_deref().map(open_state).transpose()?;
        remove_stale_runtime_dirs();
        let runtime_dir = tempfile::Builder::new()
            .prefix(RUNTIME_DIR_PREFIX)
            .tempdir_in(runtime_base())
            .map_err(io_context("failed to create a runtime directory for QEMU"))?;
        let runtime_lock = lock_runtime_dir(runtime_dir.path())
            .map_err(io_context("failed to create a runtime directory for QEMU"))?;

        // Socket pairs for NICs whose backend is a helper process (passt).
        let mut helper_ends: BTreeMap<usize, OwnedFd> = BTreeMap::new();
        let mut runtime = Runtime {
            qmp_socket: runtime_dir.path().join("qmp.sock"),
            netdev_fds: BTreeMap::new(),
            share_sockets: BTreeMap::new(),
            vsock_socket: None,
        };
        let mut helpers = Vec::new();
        if !spec.shares.is_empty() {
            let virtiofsd = find_virtiofsd().ok_or(Error::MissingHelper {
                program: "virtiofsd",
                hint: "--dir needs it: install it with \"cargo install --locked --root /usr/local virtiofsd\" \
                       (Debian 13: apt-get install virtiofsd)",
            })?;
            for (index, share) in spec.shares.iter().enumerate() {
                let (helper, socket) = Helper::start_virtiofsd(&virtiofsd, share, runtime_dir.path(), index)?;
                helpers.push(helper);
                runtime.share_sockets.insert(index, socket);
            }
        }
        let vsock = match &spec.vsock {
            Some(VsockDevice::Kernel { cid }) => Some(VsockConnector::Kernel { cid: *cid }),
            Some(VsockDevice::VhostUser { binary }) => {
                let (helper, vhost_socket, uds) = Helper::start_vsock(binary, runtime_dir.path())?;
                helpers.push(helper);
                runtime.vsock_socket = Some(vhost_socket);
                Some(VsockConnector::HybridUnix { socket: uds })
            }
            None => None,
        };
        let mut qemu_ends = Vec::new();
        for (index, nic) in spec.network.iter().enumerate() {
            match &nic.attachment {
                NetworkAttachment::Passt { .. } => {
                    let (ours, theirs) = UnixStream::pair().map_err(io_context("failed to create a socket pair"))?;
                    runtime.netdev_fds.insert(index, ours.as_raw_fd());
                    qemu_ends.push(OwnedFd::from(ours));
                    helper_ends.insert(index, OwnedFd::from(theirs));
                }
                NetworkAttachment::Tap { device } => {
                    let tap = device
                        .0
                        .try_clone()
                        .map_err(io_context("failed to duplicate the tap descriptor"))?;
                    runtime.netdev_fds.insert(index, tap.as_raw_fd());
                    qemu_ends.push(tap);
                }
                NetworkAttachment::Slirp { .. } | NetworkAttachment::BridgeHelper { .. } => {}
            }
        }
        let args = qemu_args(&spec, &runtime)?;

        for (index, nic) in spec.network.iter().enumerate() {
            if let NetworkAttachment::Passt { binary, forwards } = &nic.attachment {
                let end = helper_ends.remove(&index).expect("socket pair made above");
                helpers.push(Helper::start_passt(binary, forwards, end, runtime_dir.path(), index)?);
            }
        }

        let process = QemuProcess::spawn(&spec.qemu_binary, &args, qemu_ends, helpers)?;
        let stream = process.connect(&runtime.qmp_socket)?;
        let qmp = QmpClient::handshake(stream, QMP_COMMAND_TIMEOUT).map_err(|e| process.start_error(e.into()))?;

        let setup = || -> Result<(Option<String>, Option<PathBuf>)> {
            let vnc_url = if spec.vnc {
                let password = sys::random_vnc_password().map_err(io_context("failed to read /dev/urandom"))?;
                qmp.change_vnc_password(&password)?;
                let port = qmp.vnc_port()?;
                Some(format!("vnc://:{password}@127.0.0.1:{port}"))
            } else {
                None
            };
            let serial_pty = match spec.serial {
                SerialPort::Pty => qmp
                    .chardev_filename(SERIAL_CHARDEV)?
                    .and_then(|name| name.strip_prefix("pty:").map(PathBuf::from)),
                _ => None,
            };
            if let (Some(file), Some(path)) = (&state_file, &spec.restore_from) {
                restore(&qmp, &process, file, path)?;
            }
            process.check_helpers()?;
            qmp.cont()?;
            Ok((vnc_url, serial_pty))
        };
        let (vnc_url, serial_pty) = setup().map_err(|e| process.start_error(e))?;

        Ok(RunningVm {
            qmp,
            process,
            quit_requested: AtomicBool::new(false),
            vnc_url,
            serial_pty,
            vsock,
            args,
            _runtime_lock: runtime_lock,
            runtime_dir,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    /// `vnc://:<password>@127.0.0.1:<port>` when the spec asked for VNC.
    pub fn vnc_url(&self) -> Option<&str> {
        self.vnc_url.as_deref()
    }

    /// The guest console's pseudo-terminal, for [`SerialPort::Pty`].
    pub fn serial_pty(&self) -> Option<&Path> {
        self.serial_pty.as_deref()
    }

    /// Opens connections to the guest's vsock ports; `None` when the VM has no vsock device.
    pub fn vsock_connector(&self) -> Option<VsockConnector> {
        self.vsock.clone()
    }

    /// The private directory of this run (QMP socket, helper logs); removed when the
    /// `RunningVm` is dropped.
    pub fn runtime_dir(&self) -> &Path {
        self.runtime_dir.path()
    }

    /// QEMU's command line (without the program).
    pub fn qemu_args(&self) -> &[String] {
        &self.args
    }

    /// The QMP connection, for operations this type does not wrap.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// QMP events received so far.
    pub fn events(&self) -> Vec<QmpEvent> {
        self.qmp.events()
    }

    /// The last few KiB QEMU wrote to stdout/stderr.
    pub fn qemu_output(&self) -> String {
        self.process.output_tail()
    }

    /// QEMU's run state: `running`, `paused`, ...
    pub fn status(&self) -> Result<String> {
        self.qmp.query_status().map_err(|e| self.qmp_error(e))
    }

    /// Presses the ACPI power button; the guest decides what to do (a Linux guest with acpid or
    /// systemd-logind shuts down, and [`Self::wait`] then reports [`ExitReason::GuestShutdown`]).
    pub fn powerdown(&self) -> Result<()> {
        self.qmp.system_powerdown().map_err(|e| self.qmp_error(e))
    }

    /// Pulls the plug: QEMU exits at once (`quit`), or is killed if it does not answer.
    pub fn poweroff(&self) -> Result<()> {
        self.quit_requested.store(true, Ordering::SeqCst);
        match self.qmp.quit() {
            Ok(()) => Ok(()),
            Err(_) if self.process.exit_status().is_some() => Ok(()),
            Err(_) => {
                self.process.kill();
                Ok(())
            }
        }
    }

    /// Pauses the guest's vCPUs.
    pub fn pause(&self) -> Result<()> {
        self.qmp.stop().map_err(|e| self.qmp_error(e))
    }

    /// Resumes the guest's vCPUs.
    pub fn resume(&self) -> Result<()> {
        self.qmp.cont().map_err(|e| self.qmp_error(e))
    }

    /// Kills QEMU (SIGKILL); [`Self::wait`] then reports [`ExitReason::Crashed`].
    pub fn kill(&self) {
        self.process.kill();
    }

    /// Suspends the VM to `path`: pauses it, saves its state (RAM and devices, QEMU's migration
    /// stream; mode 0600 since it holds guest memory) and quits QEMU. `path` appears, complete and
    /// synced, only once QEMU has exited. Restore with [`VmSpec::restore_from`] and the same
    /// spec (same QEMU version, accelerator and hardware). If saving fails the VM is resumed and
    /// keeps running.
    pub fn suspend_to(&self, path: &Path) -> Result<()> {
        self.qmp.stop().map_err(|e| self.qmp_error(e))?;
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::SaveFailed(format!("{} is not a file path", path.display())))?;
        let partial = path.with_file_name(format!(".{}.partial", file_name.to_string_lossy()));
        let saved = self.save_state(&partial);
        let file = match saved {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_file(&partial);
                let _ = self.qmp.cont();
                return Err(e);
            }
        };
        // QEMU may still hold its copy of the descriptor until it exits: only a file nobody
        // writes any more is synced and moved into place.
        self.poweroff()?;
        if self.process.wait_timeout(Some(QMP_COMMAND_TIMEOUT)).is_none() {
            self.process.kill();
            self.process.wait_timeout(None);
        }
        let finish = || -> io::Result<()> {
            file.sync_all()?;
            fs::rename(&partial, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        finish().map_err(|e| {
            let _ = fs::remove_file(&partial);
            Error::SaveFailed(format!("{}: {e}", path.display()))
        })
    }

    fn save_state(&self, partial: &Path) -> Result<File> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(partial)
            .map_err(|e| Error::SaveFailed(format!("{}: {e}", partial.display())))?;
        let failed = |e: QmpError| Error::SaveFailed(e.to_string());
        self.qmp.unlimit_migration_bandwidth().map_err(failed)?;
        self.qmp.getfd("tart-save", file.as_fd()).map_err(failed)?;
        self.qmp.migrate("fd:tart-save").map_err(failed)?;
        loop {
            let (status, error) = self.qmp.query_migrate().map_err(failed)?;
            match status.as_str() {
                "completed" => return Ok(file),
                "failed" | "cancelled" => return Err(Error::SaveFailed(error.unwrap_or(status))),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Blocks until QEMU has exited and says how the VM ended.
    pub fn wait(&self) -> ExitReason {
        self.wait_timeout(None)
            .expect("waiting without a timeout returns only at the end")
    }

    /// As [`Self::wait`], giving up after `timeout` (`None`: still running).
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let status = self.process.wait_timeout(timeout)?;
        // The SHUTDOWN event precedes the exit; make sure the reader has seen everything.
        self.qmp.wait_closed(Duration::from_secs(2));
        Some(classify_exit(
            status,
            self.qmp.shutdown_event().as_ref(),
            self.quit_requested.load(Ordering::SeqCst),
            || self.process.output_tail(),
        ))
    }

    fn qmp_error(&self, error: QmpError) -> Error {
        match error {
            QmpError::Disconnected => Error::NotRunning,
            other => other.into(),
        }
    }
}

/// How a QEMU exit reads: a clean exit after a SHUTDOWN the guest asked for is the guest's doing;
/// a clean exit otherwise the host's; anything else a crash.
pub(crate) fn classify_exit(
    status: ExitStatus,
    shutdown: Option<&ShutdownEvent>,
    quit_requested: bool,
    output: impl FnOnce() -> String,
) -> ExitReason {
    if !status.success() {
        return ExitReason::Crashed {
            status,
            output: output(),
        };
    }
    match shutdown {
        Some(event) if event.guest && !quit_requested => ExitReason::GuestShutdown,
        _ => ExitReason::HostQuit,
    }
}

/// Opens a state file for restoring and checks that it is QEMU's.
fn open_state(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_context(format!("failed to open {}", path.display())))?;
    let mut magic = [0u8; 4];
    // read_exact_at leaves the offset at 0 for QEMU.
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) if &magic == QEMU_STATE_MAGIC => Ok(file),
        Ok(()) => Err(Error::NotAQemuState(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::NotAQemuState(path.to_owned())),
        Err(e) => Err(io_context(format!("failed to read {}", path.display()))(e)),
    }
}

/// Feeds `file` to a QEMU started with `-incoming defer` and waits until the state is loaded.
fn restore(qmp: &QmpClient, process: &QemuProcess, file: &File, path: &Path) -> Result<()> {
    let rejected = |reason: String| Error::StateRejected {
        path: path.to_owned(),
        reason,
    };
    // QEMU (up to 9.0 at least) exits when loading fails: its last words are the reason.
    let from_exit = |process: &QemuProcess| {
        process.wait_timeout(Some(Duration::from_secs(5)));
        rejected(qemu_error_lines(&process.output_tail()))
    };
    qmp.getfd("tart-state", file.as_fd())?;
    match qmp.migrate_incoming("fd:tart-state") {
        Ok(()) => {}
        Err(QmpError::Disconnected) => return Err(from_exit(process)),
        Err(e) => return Err(rejected(e.to_string())),
    }
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    loop {
        match qmp.query_migrate() {
            Ok((status, _)) if status == "completed" => return Ok(()),
            Ok((status, error)) if status == "failed" || status == "cancelled" => {
                return Err(rejected(error.unwrap_or(status)))
            }
            Ok(_) => {}
            // Loading blocks QEMU's main loop: a slow answer just means it is still busy.
            Err(QmpError::Timeout { .. }) => {}
            Err(QmpError::Disconnected) => return Err(from_exit(process)),
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: "load the saved state",
                seconds: RESTORE_TIMEOUT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// QEMU's error lines (`qemu-system-x86_64: ...`) from its output, without the program prefix.
fn qemu_error_lines(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter_map(|line| line.strip_prefix("qemu-system-").and_then(|rest| rest.split_once(": ")))
        .map(|(_, message)| message.trim())
        // "-chardev socket,...: info: QEMU waiting for connection on: ..." and the like.
        .filter(|message| !message.contains("info: "))
        .collect();
    if lines.is_empty() {
        let trimmed = output.trim();
        if trimmed.is_empty() {
            "QEMU exited".into()
        } else {
            trimmed.to_owned()
        }
    } else {
        lines.join("; ")
    }
}

/// `virtiofsd` from PATH or tart's package, else where Debian's own package puts it (outside
/// PATH).
pub fn find_virtiofsd() -> Option<PathBuf> {
    crate::host::find_helper("virtiofsd", std::env::var_os("PATH").as_deref())
        .or_else(|| Some(PathBuf::from("/usr/libexec/virtiofsd")).filter(|path| path.is_file()))
}

const RUNTIME_DIR_PREFIX: &str = "tart-qemu-";
const RUNTIME_LOCK: &str = "lock";

/// Held for the VM's life: a runtime directory whose lock is free belongs to a dead process.
/// Locked under another name first, so that no other process ever sees it unlocked.
fn lock_runtime_dir(dir: &Path) -> io::Result<FileLock> {
    let new = dir.join(format!("{RUNTIME_LOCK}.new"));
    File::create(&new)?;
    let lock = FileLock::try_exclusive(&new)?.ok_or_else(|| io::Error::other("the new lock file is locked"))?;
    fs::rename(&new, dir.join(RUNTIME_LOCK))?;
    Ok(lock)
}

/// The runtime directories of VMs whose process was killed (SIGKILL leaves them behind).
fn remove_stale_runtime_dirs() {
    let Ok(entries) = fs::read_dir(runtime_base()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let ours = entry.file_name().to_string_lossy().starts_with(RUNTIME_DIR_PREFIX);
        // Only directories with a lock: one being set up has none yet.
        if ours && matches!(FileLock::try_exclusive(&dir.join(RUNTIME_LOCK)), Ok(Some(_))) {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

fn runtime_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir() && dir.as_os_str().len() < 64)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

#[derive(Default)]
struct OutputTail {
    bytes: Vec<u8>,
}

impl OutputTail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > OUTPUT_TAIL_BYTES {
            let cut = self.bytes.len() - OUTPUT_TAIL_BYTES;
            self.bytes.drain(..cut);
        }
    }
}

/// A process next to QEMU (passt); killed with the VM.
struct Helper {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Helper {
    /// Starts `command` tied to our life, keeping the descriptors in `inherit`, with its output
    /// in `<log_dir>/<name><index>.log` (shown if it fails).
    fn spawn(
        name: &'static str,
        mut command: Command,
        inherit: Vec<RawFd>,
        log_dir: &Path,
        index: usize,
    ) -> Result<Helper> {
        let log = log_dir.join(format!("{name}{index}.log"));
        let log_file = File::create(&log).map_err(io_context(format!("failed to create {}", log.display())))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log_file
                    .try_clone()
                    .map_err(io_context("failed to duplicate a descriptor"))?,
            ))
            .stderr(Stdio::from(log_file));
        sys::supervise_child(&mut command, inherit);
        let child = command.spawn().map_err(io_context(format!(
            "failed to start {}",
            command.get_program().to_string_lossy()
        )))?;
        Ok(Helper { name, child, log })
    }

    fn start_passt(
        binary: &Path,
        forwards: &[PortForward],
        socket: OwnedFd,
        log_dir: &Path,
        index: usize,
    ) -> Result<Helper> {
        let fd = socket.as_raw_fd();
        let mut command = Command::new(binary);
        // --fd: the connected socket to QEMU, no socket file; passt exits when QEMU closes it.
        // Inbound, only the TCP ports asked for (passt's default would forward every port the
        // host does not use).
        let tcp_ports = if forwards.is_empty() {
            "none".to_owned()
        } else {
            forwards
                .iter()
                .map(|f| format!("{}:{}", f.host, f.guest))
                .collect::<Vec<_>>()
                .join(",")
        };
        command
            .args([
                "--foreground",
                "--quiet",
                "--tcp-ports",
                &tcp_ports,
                "--udp-ports",
                "none",
                "--fd",
            ])
            .arg(fd.to_string());
        let helper = Helper::spawn("passt", command, vec![fd], log_dir, index)?;
        drop(socket);
        Ok(helper)
    }

    /// `virtiofsd` for one share; returns it and the vhost-user socket QEMU connects to.
    fn start_virtiofsd(binary: &Path, share: &SharedDirectory, dir: &Path, index: usize) -> Result<(Helper, PathBuf)> {
        // We listen and hand virtiofsd the socket (--fd), so QEMU can connect right away.
        let socket_path = dir.join(format!("fs{index}.sock"));
        let listener = UnixListener::bind(&socket_path)
            .map_err(io_context(format!("failed to create {}", socket_path.display())))?;
        let fd = listener.as_raw_fd();
        let mut command = Command::new(binary);
        command.arg("--fd").arg(fd.to_string());
        // The guest sees host changes at once; mounts inside a share are visible as such.
        command.args(["--cache", "auto", "--announce-submounts", "--log-level", "error"]);
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            // The default sandbox needs root; without it virtiofsd can only run unconfined.
            command.args(["--sandbox", "none"]);
        }
        match &share.content {
            ShareContent::Directory { path, read_only } => {
                command.arg("--shared-dir").arg(path);
                if *read_only {
                    command.arg("--readonly");
                }
            }
            ShareContent::Named(shares) => {
                if !root {
                    return Err(Error::InvalidSpec(format!(
                        "named --dir shares (tag {}) need root: they are bind mounts in virtiofsd's own \
                         mount namespace; share one unnamed directory per tag instead",
                        share.tag
                    )));
                }
                let top = dir.join(format!("fs{index}"));
                let mut mounts = Vec::new();
                for named in shares {
                    let target = top.join(&named.name);
                    fs::create_dir_all(&target)
                        .map_err(io_context(format!("failed to create {}", target.display())))?;
                    mounts.push(sys::BindMount::new(&named.path, &target, named.read_only)?);
                }
                command.arg("--shared-dir").arg(&top);
                sys::bind_mounts_in_new_namespace(&mut command, mounts);
            }
        }
        let helper = Helper::spawn("virtiofsd", command, vec![fd], dir, index)?;
        drop(listener);
        Ok((helper, socket_path))
    }

    /// `vhost-device-vsock`; returns it, the vhost-user socket for QEMU and the hybrid-vsock
    /// socket for us.
    fn start_vsock(binary: &Path, dir: &Path) -> Result<(Helper, PathBuf, PathBuf)> {
        const STARTUP: Duration = Duration::from_secs(10);
        let vhost_socket = dir.join("vhost-vsock.sock");
        let uds = dir.join("vsock.sock");
        let mut command = Command::new(binary);
        // The guest CID only matters inside this daemon: 3, the first one not reserved.
        command
            .args(["--guest-cid", "3", "--socket"])
            .arg(&vhost_socket)
            .arg("--uds-path")
            .arg(&uds);
        let mut helper = Helper::spawn("vhost-device-vsock", command, Vec::new(), dir, 0)?;
        let deadline = Instant::now() + STARTUP;
        while !vhost_socket.exists() {
            if let Ok(Some(status)) = helper.child.try_wait() {
                return Err(Error::HelperStartFailed {
                    helper: helper.name,
                    status,
                    stderr: fs::read_to_string(&helper.log).unwrap_or_default(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Io {
                    context: format!(
                        "vhost-device-vsock did not create {} within {} s",
                        vhost_socket.display(),
                        STARTUP.as_secs()
                    ),
                    source: io::ErrorKind::TimedOut.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok((helper, vhost_socket, uds))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // passt exits by itself once QEMU's end of the socket is closed; this is for a helper
        // that does not (or whose QEMU never started).
        if self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(50));
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// The QEMU process and the threads that watch it.
struct QemuProcess {
    pid: u32,
    exit: Arc<(Mutex<Option<ExitStatus>>, Condvar)>,
    waiter: Option<JoinHandle<()>>,
    output: Arc<Mutex<OutputTail>>,
    output_reader: Mutex<Option<JoinHandle<()>>>,
    helpers: Mutex<Vec<Helper>>,
}

impl QemuProcess {
    fn spawn(binary: &Path, args: &[String], inherit: Vec<OwnedFd>, helpers: Vec<Helper>) -> Result<QemuProcess> {
        let (output_read, output_write) = sys::pipe().map_err(io_context("failed to create a pipe"))?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                output_write
                    .try_clone()
                    .map_err(io_context("failed to duplicate a descriptor"))?,
            ))
            .stderr(Stdio::from(output_write));
        sys::supervise_child(&mut command, inherit.iter().map(AsRawFd::as_raw_fd).collect());
        let child = command
            .spawn()
            .map_err(io_context(format!("failed to start {}", binary.display())))?;
        // Our copies of the pipe's write end and of QEMU's sockets go now, so that the output
        // pipe ends when QEMU does.
        drop(command);
        drop(inherit);
        let pid = child.id();

        let output = Arc::new(Mutex::new(OutputTail::default()));
        let output_reader = {
            let output = Arc::clone(&output);
            let mut pipe = output_read;
            std::thread::Builder::new()
                .name("qemu-output".into())
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = pipe.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        output.lock().unwrap_or_else(|e| e.into_inner()).push(&buf[..n]);
                    }
                })
                .map_err(io_context("failed to start a thread"))?
        };
        let exit = Arc::new((Mutex::new(None), Condvar::new()));
        let waiter = {
            let exit = Arc::clone(&exit);
            let mut child = child;
            std::thread::Builder::new()
                .name("qemu-waiter".into())
                .spawn(move || {
                    let _ = sys::wait_exited_no_reap(pid);
                    let (lock, changed) = &*exit;
                    let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                    // Reaping under the lock that kill() takes: no signal to a recycled pid.
                    if let Ok(status) = child.wait() {
                        *guard = Some(status);
                    }
                    changed.notify_all();
                })
                .map_err(io_context("failed to start a thread"))?
        };
        Ok(QemuProcess {
            pid,
            exit,
            waiter: Some(waiter),
            output,
            output_reader: Mutex::new(Some(output_reader)),
            helpers: Mutex::new(helpers),
        })
    }

    /// Connects to QEMU's QMP socket as soon as it listens.
    fn connect(&self, socket: &Path) -> Result<UnixStream> {
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        loop {
            if let Ok(stream) = UnixStream::connect(socket) {
                return Ok(stream);
            }
            if let Some(status) = self.exit_status() {
                return Err(Error::QemuStartFailed {
                    status,
                    stderr: self.full_output(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "open its QMP socket",
                    seconds: QMP_CONNECT_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The error to report for a failed start: if QEMU has exited (or exits within a moment,
    /// as it does after a failed restore), its own words; else `error`.
    fn start_error(&self, error: Error) -> Error {
        if matches!(error, Error::StateRejected { .. } | Error::NotAQemuState(_)) {
            return error;
        }
        // A lost connection usually means QEMU is on its way out (it opens the QMP socket before
        // it checks the rest of its command line): give it a moment to say why.
        let connection_lost = matches!(
            error,
            Error::NotRunning | Error::Qmp(QmpError::Disconnected | QmpError::Io(_) | QmpError::Protocol(_))
        );
        let exited = self.exit_status().is_some()
            || (connection_lost && self.wait_timeout(Some(Duration::from_secs(5))).is_some());
        match self.exit_status() {
            Some(status) if exited => Error::QemuStartFailed {
                status,
                stderr: self.full_output(),
            },
            _ => error,
        }
    }

    /// Everything QEMU printed, once it has exited (waits for the pipe to end).
    fn full_output(&self) -> String {
        if let Some(reader) = self.output_reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = reader.join();
        }
        self.output_tail()
    }

    fn output_tail(&self) -> String {
        let tail = self.output.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&tail.bytes).into_owned()
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_timeout(&self, timeout: Option<Duration>) -> Option<ExitStatus> {
        let (lock, changed) = &*self.exit;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(status) = *guard {
                return Some(status);
            }
            guard = match deadline {
                None => changed.wait(guard).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    changed.wait_timeout(guard, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }

    fn kill(&self) {
        let guard = self.exit.0.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let _ = sys::kill(self.pid, libc::SIGKILL);
        }
    }

    /// Fails if a helper (passt) has already died: the VM would run without its network.
    fn check_helpers(&self) -> Result<()> {
        let mut helpers = self.helpers.lock().unwrap_or_else(|e| e.into_inner());
        for helper in helpers.iter_mut() {
            if let Ok(Some(status)) = helper.child.try_wait() {
                return Err(Error::HelperStartFailed {
                    helper: helper.name,
                    status,
                    stderr: fs::read_to_string(&helper.log).unwrap_or_default(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.join();
        }
        self.helpers.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
        if let Some(reader) = self.output_reader.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = reader.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn exits_are_classified() {
        let guest = ShutdownEvent {
            guest: true,
            reason: "guest-shutdown".into(),
        };
        let host = ShutdownEvent {
            guest: false,
            reason: "host-qmp-quit".into(),
        };
        let no_output = String::new;
        assert_eq!(
            classify_exit(exited(0), Some(&guest), false, no_output),
            ExitReason::GuestShutdown
        );
        assert_eq!(
            classify_exit(exited(0), Some(&host), false, no_output),
            ExitReason::HostQuit
        );
        assert_eq!(
            classify_exit(exited(0), Some(&host), true, no_output),
            ExitReason::HostQuit
        );
        assert_eq!(classify_exit(exited(0), None, false, no_output), ExitReason::HostQuit);
        // The guest shutting down while we quit: we asked first, so it is ours.
        assert_eq!(
            classify_exit(exited(0), Some(&guest), true, no_output),
            ExitReason::HostQuit
        );
        assert_eq!(
            classify_exit(exited(1), Some(&guest), false, || "boom".into()),
            ExitReason::Crashed {
                status: exited(1),
                output: "boom".into()
            }
        );
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert!(matches!(
            classify_exit(killed, None, true, no_output),
            ExitReason::Crashed { .. }
        ));
    }

    #[test]
    fn qemu_error_lines_are_extracted() {
        let output = "VNC server running on 127.0.0.1:5900\n\
                      qemu-system-x86_64: -chardev socket,id=qmp,path=/tmp/q.sock,server=on,wait=on: info: QEMU waiting for connection on: disconnected:unix:/tmp/q.sock,server=on\n\
                      qemu-system-x86_64: Unknown savevm section or instance 'foo' 0. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices\n\
                      qemu-system-x86_64: load of migration failed: Invalid argument\n";
        assert_eq!(
            qemu_error_lines(output),
            "Unknown savevm section or instance 'foo' 0. Make sure that your current VM setup matches your saved \
             VM setup, including any hotplugged devices; load of migration failed: Invalid argument"
        );
        assert_eq!(qemu_error_lines(""), "QEMU exited");
        assert_eq!(qemu_error_lines("something else\n"), "something else");
    }

    #[test]
    fn state_files_must_be_qemu_streams() {
        let dir = tempfile::tempdir().unwrap();
        let apple = dir.path().join("state.vzvmsave");
        fs::write(&apple, b"bplist00 something from macOS").unwrap();
        let err = open_state(&apple).unwrap_err().to_string();
        assert!(err.contains("is not a VM state saved by QEMU"), "{err}");
        fs::write(&apple, b"QE").unwrap();
        assert!(matches!(open_state(&apple), Err(Error::NotAQemuState(_))));
        fs::write(&apple, b"QEVM\0\0\0\x03").unwrap();
        let file = open_state(&apple).unwrap();
        let mut all = Vec::new();
        (&file).read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 8, "offset stays at 0 for QEMU");
        assert!(matches!(open_state(&dir.path().join("missing")), Err(Error::Io { .. })));
    }

    #[test]
    fn running_vm_can_be_shared_with_a_signal_thread() {
        fn shareable<T: Send + Sync>() {}
        shareable::<RunningVm>();
    }

    #[test]
    fn output_tail_keeps_the_end() {
        let mut tail = OutputTail::default();
        tail.push(&vec![b'a'; OUTPUT_TAIL_BYTES]);
        tail.push(b"end");
        assert_eq!(tail.bytes.len(), OUTPUT_TAIL_BYTES);
        assert!(tail.bytes.ends_with(b"aend"));
    }
}
