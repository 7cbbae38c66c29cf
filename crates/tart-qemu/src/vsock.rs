//! virtio-vsock: the host↔guest channel the guest agent listens on (port 8080).
//!
//! Two host backends, chosen by [`VsockDevice::choose`]:
//! * the kernel's vhost-vsock (`/dev/vhost-vsock`): QEMU's `vhost-vsock-pci` with a guest CID
//!   unique on the host; we connect with `AF_VSOCK` to (CID, port);
//! * rust-vmm's `vhost-device-vsock` where the kernel module is missing (containers, some cloud
//!   VMs, this project's CI): QEMU's `vhost-user-vsock-pci` talks vhost-user to the daemon, and we
//!   connect to the daemon's Unix socket and ask for a port with Firecracker's hybrid-vsock
//!   handshake (`CONNECT <port>\n` → `OK <local port>\n`).
//!
//! QEMU cannot save the state of a vhost-user device, so a suspendable VM gets vsock only from
//! the kernel backend.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host::HostInfo;

const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";
/// The daemon answers at once; a silent one is broken, not slow.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The vsock device of a VM and its host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsockDevice {
    /// Kernel vhost-vsock; `cid` must be unique among the host's VMs.
    Kernel { cid: u32 },
    /// `vhost-device-vsock`, one daemon per VM (the guest CID is private to it).
    VhostUser { binary: PathBuf },
}

impl VsockDevice {
    /// The kernel backend when the host has it, else `vhost-device-vsock` when installed and
    /// the VM need not be suspendable; `None` when neither can be used.
    pub fn choose(host: &HostInfo, suspendable: bool) -> Option<VsockDevice> {
        if Path::new(VHOST_VSOCK_DEVICE).exists() {
            return Some(VsockDevice::Kernel { cid: random_cid() });
        }
        if suspendable {
            return None;
        }
        host.find_helper("vhost-device-vsock")
            .map(|binary| VsockDevice::VhostUser { binary })
    }
}

/// CIDs 0–2 are reserved and `u32::MAX` means "any"; a random one collides with another VM's
/// only with negligible probability, and QEMU refuses to start rather than share one.
fn random_cid() -> u32 {
    let mut bytes = [0u8; 4];
    let random = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    let value = match random {
        Ok(()) => u32::from_ne_bytes(bytes),
        Err(_) => std::process::id(),
    };
    3 + value % (u32::MAX - 4)
}

/// Opens connections to ports of a running guest. Cheap to clone and `Send`, for proxy threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsockConnector {
    Kernel { cid: u32 },
    HybridUnix { socket: PathBuf },
}

impl VsockConnector {
    /// A byte stream to `port` in the guest. Fails when nothing listens there (yet).
    pub fn connect(&self, port: u32) -> io::Result<GuestStream> {
        match self {
            VsockConnector::Kernel { cid } => connect_af_vsock(*cid, port),
            VsockConnector::HybridUnix { socket } => connect_hybrid(socket, port),
        }
    }
}

/// A connected stream socket to the guest (AF_VSOCK or the daemon's Unix socket).
#[derive(Debug)]
pub struct GuestStream {
    socket: File,
}

impl GuestStream {
    fn new(fd: OwnedFd) -> Self {
        GuestStream { socket: File::from(fd) }
    }

    pub fn try_clone(&self) -> io::Result<GuestStream> {
        Ok(GuestStream {
            socket: self.socket.try_clone()?,
        })
    }

    /// Half- or full-closes the connection (`shutdown(2)`), waking a thread blocked reading it.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown on a socket descriptor we own.
        if unsafe { libc::shutdown(self.socket.as_raw_fd(), how) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for GuestStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.read(buf)
    }
}

impl Write for GuestStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn connect_af_vsock(cid: u32, port: u32) -> io::Result<GuestStream> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is valid for every field.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = cid;
    address.svm_port = port;
    // SAFETY: address is a valid sockaddr_vm of the given size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(address).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(GuestStream::new(fd))
}

fn connect_hybrid(socket: &Path, port: u32) -> io::Result<GuestStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    // Byte by byte: whatever follows the answer's newline is the guest's and must stay unread.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 64 {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    if !answer.starts_with("OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            if answer.is_empty() {
                format!("nothing listens on guest vsock port {port}")
            } else {
                format!("vhost-device-vsock refused the connection to port {port}: {answer}")
            },
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(GuestStream::new(OwnedFd::from(stream)))
}

/// Reads one `\n`-terminated line; used by tests that play the daemon's part.
#[cfg(test)]
fn read_line(stream: &UnixStream) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    io::BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn hybrid_handshake_asks_for_the_port_and_leaves_guest_bytes_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let daemon = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            assert_eq!(read_line(&conn), "CONNECT 8080\n");
            conn.write_all(b"OK 1234\nfrom the guest").unwrap();
            drop(conn);
            let (refused, _) = listener.accept().unwrap();
            let _ = read_line(&refused);
            refused.shutdown(std::net::Shutdown::Both).unwrap();
        });
        let connector = VsockConnector::HybridUnix { socket: path };
        let mut stream = connector.connect(8080).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "from the guest");
        let err = connector.connect(8080).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            err.to_string().contains("nothing listens on guest vsock port 8080"),
            "{err}"
        );
        daemon.join().unwrap();
    }

    #[test]
    fn random_cids_avoid_the_reserved_ones() {
        for _ in 0..1000 {
            let cid = random_cid();
            assert!((3..u32::MAX).contains(&cid));
        }
    }
}
