//! The host end of a VM's NIC: a tap on a bridge, or a macvtap on a physical interface.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tart_home::MacAddress;

use crate::programs::run_ip;
use crate::{io_context, Error, Result};

/// Creates a tap named after `pattern` (`%d`: the kernel picks the number), enslaved to
/// `bridge` and up. The tap is not persistent: it lives as long as a descriptor of it is open
/// (ours and QEMU's copy), so no VM, however it ends, leaves one behind.
pub(crate) fn create_tap(pattern: &str, bridge: &str) -> Result<(OwnedFd, String)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(io_context("failed to open /dev/net/tun"))?;
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(pattern.bytes().chain([0])) {
        *slot = byte as libc::c_char;
    }
    // IFF_VNET_HDR: QEMU finds it and passes checksum and segmentation offloads through.
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
        return Err(io_context("failed to create a tap interface")(
            std::io::Error::last_os_error(),
        ));
    }
    let name: String = request
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    run_ip(&["link", "set", &name, "master", bridge, "up"])?;
    Ok((file.into(), name))
}

/// Creates the macvtap `name` on `parent` in bridge mode (the VM and the host's other macvtaps
/// talk to each other and to the network; the host itself is not reached through `parent`),
/// with the VM's `mac`, and opens its character device. Unlike a tap it is persistent: the
/// caller deletes it ([`delete_link`]).
pub(crate) fn create_macvtap(name: &str, parent: &str, mac: MacAddress, scratch: &Path) -> Result<OwnedFd> {
    run_ip(&[
        "link",
        "add",
        "link",
        parent,
        "name",
        name,
        "address",
        &mac.to_string(),
        "type",
        "macvtap",
        "mode",
        "bridge",
    ])?;
    let opened = run_ip(&["link", "set", name, "up"]).and_then(|()| open_macvtap(name, scratch));
    if opened.is_err() {
        delete_link(name);
    }
    opened
}

/// `/dev/tap<ifindex>`, which udev makes; without udev (containers, network namespaces of
/// tests) a private node with the numbers from sysfs.
fn open_macvtap(name: &str, scratch: &Path) -> Result<OwnedFd> {
    let sys = Path::new("/sys/class/net").join(name);
    let index = std::fs::read_to_string(sys.join("ifindex"))
        .map_err(io_context(format!("failed to read the index of {name}")))?;
    let index = index.trim();
    let open = |path: &Path| -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    };
    let device = Path::new("/dev").join(format!("tap{index}"));
    if let Ok(file) = open(&device) {
        return Ok(file.into());
    }
    let numbers = std::fs::read_to_string(sys.join(format!("macvtap/tap{index}/dev")))
        .map_err(io_context(format!("{name} has no macvtap device")))?;
    let (major, minor) = numbers
        .trim()
        .split_once(':')
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)))
        .ok_or_else(|| Error::Interface(format!("unexpected device numbers {numbers:?} for {name}")))?;
    let node = scratch.join(format!(".{name}.dev"));
    let _ = std::fs::remove_file(&node);
    let path = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
    // SAFETY: a valid C string; mknod has no other preconditions.
    if unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(major, minor)) } != 0 {
        return Err(io_context(format!("failed to create {}", node.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    let file = open(&node);
    let _ = std::fs::remove_file(&node);
    Ok(file
        .map_err(io_context(format!("failed to open the macvtap device of {name}")))?
        .into())
}

/// Deletes a link we made, if it still exists.
pub(crate) fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = run_ip(&["link", "delete", name]);
    }
}
