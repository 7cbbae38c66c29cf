//! [`VmSpec`] → QEMU command line. Pure: no file system access, no environment.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use tart_home::Arch;

use crate::boot::Boot;
use crate::disk::DiskSource;
use crate::host::Accel;
use crate::spec::{NetworkAttachment, SerialDevice, SerialPort, VmSpec};
use crate::vsock::VsockDevice;
use crate::{Error, Result};

/// What a run adds to the spec: where QEMU's QMP socket goes and which inherited descriptors
/// carry the NICs that need them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runtime {
    /// QMP control socket; QEMU listens, we connect. It lives in a private directory with a
    /// short path (a Unix socket path must fit in 108 bytes, `$TART_HOME/vms/<name>/` need not).
    pub qmp_socket: PathBuf,
    /// For NIC `index`, the descriptor QEMU inherits as its connected stream socket (passt).
    pub netdev_fds: BTreeMap<usize, RawFd>,
    /// For share `index`, the vhost-user socket its `virtiofsd` listens on.
    pub share_sockets: BTreeMap<usize, PathBuf>,
    /// The vhost-user socket of `vhost-device-vsock`, for [`VsockDevice::VhostUser`].
    pub vsock_socket: Option<PathBuf>,
}

/// Id of the chardev of the guest console (reported by `query-chardev`).
pub(crate) const SERIAL_CHARDEV: &str = "serial0";

const MIB: u64 = 1 << 20;

/// The arguments (without the program) that run `spec`, with runtime files under `runtime`.
///
/// The VM starts paused (`-S`) and QEMU waits for the QMP client before it even creates the
/// machine (`wait=on`): [`crate::RunningVm::start`] sets things up (VNC password, restore) and then
/// sends `cont`, so no guest instruction runs and no event is emitted before we are attached.
pub fn qemu_args(spec: &VmSpec, runtime: &Runtime) -> Result<Vec<String>> {
    if spec.cpus == 0 {
        return Err(Error::InvalidSpec("the VM needs at least one CPU".into()));
    }
    if spec.memory_bytes < MIB {
        return Err(Error::InvalidSpec(format!(
            "the VM needs at least 1 MiB of memory, not {} bytes",
            spec.memory_bytes
        )));
    }
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));

    push(&["-name", &format!("guest={},debug-threads=on", escape(&spec.name))]);
    // Nothing we did not ask for: no default NIC, VGA, CD-ROM, monitor or serial port on stdio,
    // and no /etc/qemu config.
    push(&["-nodefaults", "-no-user-config", "-S"]);
    push(&["-accel", spec.accel.as_str()]);

    // RAM as a shared memfd, so vhost-user devices (virtiofsd, vhost-device-vsock) can be added.
    let memory_mib = spec.memory_bytes.div_ceil(MIB);
    let machine = match (spec.arch, spec.nested) {
        // smm=off: the plain OVMF build needs no SMM and emulating it costs seconds under TCG.
        // Nested x86 needs nothing here: `-cpu host` passes VT-x/AMD-V through when KVM allows it.
        (Arch::Amd64, _) => "q35,smm=off,vmport=off,memory-backend=ram0",
        // gic-version=max: GICv3 where possible (more than 8 vCPUs), under KVM and TCG alike.
        (Arch::Arm64, false) => "virt,gic-version=max,memory-backend=ram0",
        // EL2 for the guest's own hypervisor.
        (Arch::Arm64, true) => "virt,gic-version=max,memory-backend=ram0,virtualization=on",
    };
    push(&["-machine", machine]);
    let cpu = match (spec.accel, spec.arch) {
        (Accel::Kvm, _) => "host",
        (Accel::Tcg, Arch::Amd64) => "max",
        // pauth-impdef: QEMU's cheap pointer-authentication hash instead of emulated QARMA5,
        // which otherwise dominates TCG time on arm64 guests.
        (Accel::Tcg, Arch::Arm64) => "max,pauth-impdef=on",
    };
    push(&["-cpu", cpu]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-m", &format!("{memory_mib}M")]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=ram0,size={memory_mib}M,share=on"),
    ]);

    match &spec.boot {
        Boot::Uefi { code, vars } => {
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", path_opt(code)?),
            ]);
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", path_opt(vars)?),
            ]);
        }
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            push(&["-kernel", path_str(kernel)?]);
            if let Some(initrd) = initrd {
                push(&["-initrd", path_str(initrd)?]);
            }
            if !cmdline.is_empty() {
                push(&["-append", cmdline]);
            }
        }
        Boot::Bios => {}
    }

    let disk = &spec.root_disk_options;
    let mut drive = format!(
        "if=none,id=root,format=raw,file={},{}",
        path_opt(&spec.root_disk)?,
        disk.qemu_cache().drive_option()
    );
    if disk.read_only {
        drive.push_str(",readonly=on");
    } else {
        // Guest TRIM punches holes into the sparse image instead of leaving it to grow.
        drive.push_str(",discard=unmap");
    }
    push(&["-drive", &drive]);
    match spec.boot {
        Boot::Uefi { .. } | Boot::Bios => push(&["-device", "virtio-blk-pci,drive=root,bootindex=0"]),
        // The kernel loader holds boot index 0 (QEMU refuses a second one), and nothing is
        // booted from the disk anyway.
        Boot::Kernel { .. } => push(&["-device", "virtio-blk-pci,drive=root"]),
    }

    let mut scsi_controller = false;
    for (index, disk) in spec.extra_disks.iter().enumerate() {
        let id = format!("disk{index}");
        let options = &disk.options;
        let mut drive = format!("if=none,id={id},{}", options.qemu_cache().drive_option());
        match &disk.source {
            DiskSource::Image { path, format } => {
                drive.push_str(&format!(",format={},file={}", format.as_str(), path_opt(path)?));
            }
            DiskSource::Iso(path) => drive.push_str(&format!(",format=raw,media=cdrom,file={}", path_opt(path)?)),
            DiskSource::BlockDevice(path) => {
                drive.push_str(&format!(",format=raw,file={}", path_opt(path)?));
            }
            DiskSource::Nbd(url) => drive.push_str(&format!(",format=raw,file={}", escape(url))),
        }
        if options.read_only {
            drive.push_str(",readonly=on");
        } else if !matches!(disk.source, DiskSource::Nbd(_)) {
            drive.push_str(",discard=unmap");
        }
        push(&["-drive", &drive]);
        match disk.source {
            // After the root disk in the boot order: an installer boots while the root disk is
            // still empty, and never again once something is installed there.
            DiskSource::Iso(_) => {
                if !scsi_controller {
                    push(&["-device", "virtio-scsi-pci,id=scsi0"]);
                    scsi_controller = true;
                }
                push(&[
                    "-device",
                    &format!("scsi-cd,bus=scsi0.0,drive={id},bootindex={}", index + 1),
                ]);
            }
            // The serial shows up as /dev/disk/by-id/virtio-tart-disk<N> in Linux guests.
            _ => push(&["-device", &format!("virtio-blk-pci,drive={id},serial=tart-disk{index}")]),
        }
    }

    if spec.entropy {
        push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
        push(&["-device", "virtio-rng-pci,rng=rng0"]);
    }

    for (index, nic) in spec.network.iter().enumerate() {
        let id = format!("net{index}");
        let backend_fd = || {
            runtime
                .netdev_fds
                .get(&index)
                .ok_or_else(|| Error::InvalidSpec(format!("NIC {index} has no descriptor to its backend")))
        };
        let netdev = match &nic.attachment {
            NetworkAttachment::Slirp { restrict, forwards } => {
                let mut netdev = format!("user,id={id}{}", if *restrict { ",restrict=on" } else { "" });
                for forward in forwards {
                    netdev.push_str(&format!(",hostfwd=tcp::{}-:{}", forward.host, forward.guest));
                }
                netdev
            }
            // One end of a socket pair; passt has the other (no socket file: passt drops root
            // for `nobody`, who could not reach one in our private directory).
            NetworkAttachment::Passt { .. } => {
                format!("stream,id={id},server=off,addr.type=fd,addr.str={}", backend_fd()?)
            }
            NetworkAttachment::Tap { .. } => format!("tap,id={id},fd={}", backend_fd()?),
            NetworkAttachment::BridgeHelper { bridge, helper } => {
                format!("bridge,id={id},br={},helper={}", escape(bridge), path_opt(helper)?)
            }
        };
        push(&["-netdev", &netdev]);
        // romfile=: no iPXE option ROM; the VM boots from disk and the ROM costs seconds of
        // firmware time under TCG.
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev={id},mac={},romfile=", nic.mac),
        ]);
    }

    for (index, share) in spec.shares.iter().enumerate() {
        let socket = runtime
            .share_sockets
            .get(&index)
            .ok_or_else(|| Error::InvalidSpec(format!("share {index} has no virtiofsd socket")))?;
        push(&["-chardev", &format!("socket,id=fs{index},path={}", path_opt(socket)?)]);
        push(&[
            "-device",
            &format!("vhost-user-fs-pci,chardev=fs{index},tag={}", escape(&share.tag)),
        ]);
    }

    match &spec.vsock {
        Some(VsockDevice::Kernel { cid }) => push(&["-device", &format!("vhost-vsock-pci,guest-cid={cid}")]),
        Some(VsockDevice::VhostUser { .. }) => {
            let socket = runtime
                .vsock_socket
                .as_deref()
                .ok_or_else(|| Error::InvalidSpec("vhost-user vsock without a socket".into()))?;
            push(&["-chardev", &format!("socket,id=vsock0,path={}", path_opt(socket)?)]);
            push(&["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        }
        None => {}
    }

    if let Some(size) = spec.display {
        push(&[
            "-device",
            &format!("virtio-gpu-pci,xres={},yres={}", size.width, size.height),
        ]);
    }
    if spec.keyboard || spec.pointer {
        push(&["-device", "qemu-xhci,id=usb"]);
    }
    if spec.keyboard {
        push(&["-device", "usb-kbd,bus=usb.0"]);
    }
    if spec.pointer {
        push(&["-device", "usb-tablet,bus=usb.0"]);
    }

    let chardev = match &spec.serial {
        SerialPort::None => format!("null,id={SERIAL_CHARDEV}"),
        SerialPort::Pty => format!("pty,id={SERIAL_CHARDEV}"),
        SerialPort::File(path) => format!("file,id={SERIAL_CHARDEV},path={},append=on", path_opt(path)?),
        SerialPort::Tty(path) => format!("serial,id={SERIAL_CHARDEV},path={}", path_opt(path)?),
    };
    push(&["-chardev", &chardev]);
    match spec.serial_device {
        SerialDevice::Uart => push(&["-serial", &format!("chardev:{SERIAL_CHARDEV}")]),
        SerialDevice::VirtioConsole => {
            push(&["-device", "virtio-serial-pci,id=vser0"]);
            push(&["-device", &format!("virtconsole,chardev={SERIAL_CHARDEV},bus=vser0.0")]);
        }
    }

    push(&["-display", "none"]);
    if spec.vnc {
        // First free port from 5900 on; the password is set over QMP before the guest runs
        // (until then, password=on lets nobody in).
        push(&["-vnc", "127.0.0.1:0,to=99,password=on"]);
    }

    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=on",
            path_opt(&runtime.qmp_socket)?
        ),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);

    if spec.restore_from.is_some() {
        // The state arrives later over QMP (migrate-incoming with a file descriptor).
        push(&["-incoming", "defer"]);
    }
    args.extend(spec.extra_args.iter().cloned());
    Ok(args)
}

/// QEMU option values end at a comma; a literal comma is written twice.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_opt(path: &Path) -> Result<String> {
    path_str(path).map(escape)
}

/// A path as a whole argument (`-kernel`), not inside an option list: nothing to escape.
fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| Error::NonUtf8Path(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DisplaySize, NetworkDevice, PortForward, TapDevice};
    use crate::DiskOptions;

    fn typical() -> VmSpec {
        VmSpec {
            name: "ubuntu".into(),
            qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
            arch: Arch::Amd64,
            accel: Accel::Kvm,
            cpus: 4,
            memory_bytes: 4 << 30,
            boot: Boot::Uefi {
                code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                vars: "/root/.tart/vms/ubuntu/nvram.bin".into(),
            },
            root_disk: "/root/.tart/vms/ubuntu/disk.img".into(),
            root_disk_options: DiskOptions::default(),
            extra_disks: vec![],
            shares: vec![],
            vsock: None,
            nested: false,
            network: vec![NetworkDevice {
                mac: "6e:35:1a:09:4c:b2".parse().unwrap(),
                attachment: NetworkAttachment::Slirp {
                    restrict: false,
                    forwards: Vec::new(),
                },
            }],
            display: Some(DisplaySize {
                width: 1024,
                height: 768,
            }),
            vnc: true,
            keyboard: true,
            pointer: true,
            entropy: true,
            serial: SerialPort::Pty,
            serial_device: SerialDevice::Uart,
            restore_from: None,
            extra_args: vec![],
        }
    }

    fn runtime() -> Runtime {
        Runtime {
            qmp_socket: "/run/user/0/tart-qemu-x/qmp.sock".into(),
            netdev_fds: BTreeMap::new(),
            share_sockets: BTreeMap::new(),
            vsock_socket: None,
        }
    }

    fn args(spec: &VmSpec) -> Vec<String> {
        qemu_args(spec, &runtime()).unwrap()
    }

    /// The value following each occurrence of `flag`.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    #[test]
    fn typical_vm_command_line() {
        let line = args(&typical()).join(" ");
        assert_eq!(
            line,
            "-name guest=ubuntu,debug-threads=on -nodefaults -no-user-config -S -accel kvm \
             -machine q35,smm=off,vmport=off,memory-backend=ram0 -cpu host -smp 4 -m 4096M \
             -object memory-backend-memfd,id=ram0,size=4096M,share=on \
             -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
             -drive if=pflash,format=raw,unit=1,file=/root/.tart/vms/ubuntu/nvram.bin \
             -drive if=none,id=root,format=raw,file=/root/.tart/vms/ubuntu/disk.img,cache=writeback,discard=unmap \
             -device virtio-blk-pci,drive=root,bootindex=0 \
             -object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0 \
             -netdev user,id=net0 -device virtio-net-pci,netdev=net0,mac=6e:35:1a:09:4c:b2,romfile= \
             -device virtio-gpu-pci,xres=1024,yres=768 \
             -device qemu-xhci,id=usb -device usb-kbd,bus=usb.0 -device usb-tablet,bus=usb.0 \
             -chardev pty,id=serial0 -serial chardev:serial0 -display none \
             -vnc 127.0.0.1:0,to=99,password=on \
             -chardev socket,id=qmp,path=/run/user/0/tart-qemu-x/qmp.sock,server=on,wait=on \
             -mon chardev=qmp,mode=control"
        );
    }

    #[test]
    fn a_bios_vm_gets_no_pflash_and_boots_its_disk_first() {
        let mut spec = typical();
        spec.boot = Boot::Bios;
        let a = args(&spec);
        assert!(!a.join(" ").contains("pflash"));
        assert!(values(&a, "-kernel").is_empty());
        assert!(a.contains(&"virtio-blk-pci,drive=root,bootindex=0".to_owned()));
    }

    #[test]
    fn a_vm_with_its_own_kernel_boots_it_without_firmware() {
        let mut spec = typical();
        spec.boot = Boot::Kernel {
            kernel: "/vms/v,1/kernel".into(),
            initrd: Some("/vms/v,1/initramfs".into()),
            cmdline: "console=ttyS0 root=/dev/vda1 rw".into(),
        };
        let a = args(&spec);
        assert_eq!(values(&a, "-kernel"), ["/vms/v,1/kernel"]);
        assert_eq!(values(&a, "-initrd"), ["/vms/v,1/initramfs"]);
        assert_eq!(values(&a, "-append"), ["console=ttyS0 root=/dev/vda1 rw"]);
        assert!(!a.join(" ").contains("pflash"));
        assert!(a.contains(&"virtio-blk-pci,drive=root".to_owned()));

        spec.boot = Boot::Kernel {
            kernel: "/vms/v/kernel".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let a = args(&spec);
        assert!(values(&a, "-initrd").is_empty() && values(&a, "-append").is_empty());
    }

    #[test]
    fn accelerator_and_architecture_pick_machine_and_cpu() {
        let mut spec = typical();
        spec.accel = Accel::Tcg;
        let a = args(&spec);
        assert_eq!(values(&a, "-accel"), ["tcg"]);
        assert_eq!(values(&a, "-cpu"), ["max"]);

        spec.arch = Arch::Arm64;
        let a = args(&spec);
        assert_eq!(values(&a, "-machine"), ["virt,gic-version=max,memory-backend=ram0"]);
        assert_eq!(values(&a, "-cpu"), ["max,pauth-impdef=on"]);
        spec.accel = Accel::Kvm;
        assert_eq!(values(&args(&spec), "-cpu"), ["host"]);
    }

    #[test]
    fn memory_is_rounded_up_to_mib_and_matches_the_backend() {
        let mut spec = typical();
        spec.memory_bytes = (512 << 20) + 1;
        let a = args(&spec);
        assert_eq!(values(&a, "-m"), ["513M"]);
        assert!(values(&a, "-object").contains(&"memory-backend-memfd,id=ram0,size=513M,share=on"));
        spec.memory_bytes = 1000;
        assert!(qemu_args(&spec, &runtime())
            .unwrap_err()
            .to_string()
            .contains("at least 1 MiB"));
        spec.memory_bytes = 1 << 30;
        spec.cpus = 0;
        assert!(qemu_args(&spec, &runtime()).is_err());
    }

    #[test]
    fn root_disk_options_reach_the_drive() {
        let mut spec = typical();
        let root = |spec: &VmSpec| {
            values(&args(spec), "-drive")
                .into_iter()
                .find(|d| d.starts_with("if=none,id=root"))
                .unwrap()
                .to_owned()
        };
        spec.root_disk_options = DiskOptions::parse("ro,caching=uncached").unwrap();
        assert_eq!(
            root(&spec),
            "if=none,id=root,format=raw,file=/root/.tart/vms/ubuntu/disk.img,cache=none,readonly=on"
        );
        spec.root_disk_options = DiskOptions::parse("sync=none,caching=uncached").unwrap();
        assert!(root(&spec).ends_with(",cache.direct=on,cache.no-flush=on,discard=unmap"));
        spec.root_disk_options = DiskOptions::parse("sync=none").unwrap();
        assert!(root(&spec).ends_with(",cache=unsafe,discard=unmap"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut spec = typical();
        spec.name = "a,b".into();
        spec.root_disk = "/vms/a,b/disk.img".into();
        spec.serial = SerialPort::File("/tmp/x,y.log".into());
        let a = args(&spec);
        assert_eq!(values(&a, "-name"), ["guest=a,,b,debug-threads=on"]);
        assert!(values(&a, "-drive")
            .iter()
            .any(|d| d.contains("file=/vms/a,,b/disk.img,cache")));
        assert!(values(&a, "-chardev").contains(&"file,id=serial0,path=/tmp/x,,y.log,append=on"));
    }

    #[test]
    fn non_utf8_paths_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let mut spec = typical();
        spec.root_disk = PathBuf::from(std::ffi::OsStr::from_bytes(b"/vms/\xff/disk.img"));
        let err = qemu_args(&spec, &runtime()).unwrap_err().to_string();
        assert!(err.starts_with("path is not valid UTF-8"), "{err}");
    }

    #[test]
    fn host_side_options_leave_the_hardware_alone() {
        let mut headless = typical();
        headless.vnc = false;
        headless.serial = SerialPort::None;
        let a = args(&headless);
        assert!(!a.contains(&"-vnc".to_string()));
        assert_eq!(values(&a, "-chardev")[0], "null,id=serial0");
        // Same devices as with VNC and a pty: a state saved by one restores in the other.
        let devices = |a: &[String]| values(a, "-device").into_iter().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(devices(&a), devices(&args(&typical())));
        assert_eq!(values(&a, "-serial"), ["chardev:serial0"]);
    }

    #[test]
    fn serial_backends_and_devices() {
        let mut spec = typical();
        spec.serial = SerialPort::Tty("/dev/ttyUSB0".into());
        spec.serial_device = SerialDevice::VirtioConsole;
        let a = args(&spec);
        assert!(values(&a, "-chardev").contains(&"serial,id=serial0,path=/dev/ttyUSB0"));
        assert!(values(&a, "-serial").is_empty());
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-serial-pci,id=vser0"));
        assert!(devices.contains(&"virtconsole,chardev=serial0,bus=vser0.0"));
    }

    #[test]
    fn optional_devices_and_restore() {
        let mut spec = typical();
        spec.keyboard = false;
        spec.pointer = false;
        spec.entropy = false;
        spec.display = None;
        spec.network.clear();
        spec.restore_from = Some("/vms/x/state.vzvmsave".into());
        spec.extra_args = vec!["-fw_cfg".into(), "name=opt/x,string=1".into()];
        let a = args(&spec);
        assert_eq!(
            values(&a, "-device"),
            ["virtio-blk-pci,drive=root,bootindex=0"],
            "only the root disk is left"
        );
        assert!(values(&a, "-netdev").is_empty());
        assert_eq!(values(&a, "-incoming"), ["defer"]);
        assert_eq!(&a[a.len() - 2..], ["-fw_cfg", "name=opt/x,string=1"]);

        spec.keyboard = true;
        let devices = values(&args(&spec), "-device").join(" ");
        assert!(devices.contains("qemu-xhci,id=usb usb-kbd,bus=usb.0") && !devices.contains("usb-tablet"));
    }

    #[test]
    fn network_attachments() {
        let mut spec = typical();
        let forwards = vec![PortForward { host: 2222, guest: 22 }];
        let tap = TapDevice(std::sync::Arc::new(std::fs::File::open("/dev/null").unwrap().into()));
        let attachments = [
            NetworkAttachment::Slirp {
                restrict: true,
                forwards: forwards.clone(),
            },
            NetworkAttachment::Passt {
                binary: "/usr/bin/passt".into(),
                forwards,
            },
            NetworkAttachment::Tap { device: tap },
            NetworkAttachment::BridgeHelper {
                bridge: "br0".into(),
                helper: "/usr/lib/qemu/qemu-bridge-helper".into(),
            },
        ];
        spec.network = attachments
            .into_iter()
            .enumerate()
            .map(|(index, attachment)| NetworkDevice {
                mac: format!("02:00:00:00:00:0{index}").parse().unwrap(),
                attachment,
            })
            .collect();
        let err = qemu_args(&spec, &runtime()).unwrap_err().to_string();
        assert!(err.contains("NIC 1 has no descriptor to its backend"), "{err}");
        let mut runtime = runtime();
        runtime.netdev_fds.insert(1, 7);
        runtime.netdev_fds.insert(2, 8);
        let a = qemu_args(&spec, &runtime).unwrap();
        assert_eq!(
            values(&a, "-netdev"),
            [
                "user,id=net0,restrict=on,hostfwd=tcp::2222-:22",
                "stream,id=net1,server=off,addr.type=fd,addr.str=7",
                "tap,id=net2,fd=8",
                "bridge,id=net3,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper",
            ]
        );
        let nics: Vec<_> = values(&a, "-device")
            .into_iter()
            .filter(|d| d.starts_with("virtio-net-pci"))
            .collect();
        assert_eq!(
            nics,
            (0..4)
                .map(|i| format!("virtio-net-pci,netdev=net{i},mac=02:00:00:00:00:0{i},romfile="))
                .collect::<Vec<_>>()
        );
    }
}
