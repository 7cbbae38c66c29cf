//! `control.sock` (Tart's `ControlSocket`): a Unix socket in the VM directory, served by `tart run`,
//! whose every connection is spliced to a new vsock connection to the guest agent's port, so that
//! `tart exec`, `tart ip --resolver agent` and other tools (Orchard workers) reach the agent without
//! knowing how this host talks vsock.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use tart_agent::{SocketPath, AGENT_VSOCK_PORT};
use tart_qemu::{GuestStream, VsockConnector};

/// The socket's name in the VM directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The running proxy; dropping it removes the socket file, so nobody can connect any more (the
/// accepting thread ends with the process: `tart run` exits when the VM has stopped).
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (replacing a stale socket left by a killed run), readable and writable by
    /// the owner only, and serves it on a background thread.
    pub fn serve(path: &Path, guest: VsockConnector) -> io::Result<ControlSocket> {
        let _ = std::fs::remove_file(path);
        let listener = bind_private(path)?;
        std::thread::Builder::new()
            .name("control-socket".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let guest = guest.clone();
                    // A guest whose agent is not up yet refuses: the client sees its connection
                    // closed and retries (tart ip --wait) or reports it (tart exec).
                    let _ = std::thread::Builder::new().name("control-proxy".into()).spawn(move || {
                        if let Ok(upstream) = guest.connect(AGENT_VSOCK_PORT) {
                            splice(client, upstream);
                        }
                    });
                }
            })?;
        Ok(ControlSocket { path: path.to_owned() })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// socket + bind + chmod 0600 + listen: nobody else can connect, not even in the moment between
/// bind and chmod (connections need listen).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let short = SocketPath::new(path)?;
    let c_path = CString::new(short.as_path().as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zero is valid.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = c_path.as_bytes_with_nul();
    if bytes.len() > address.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: address is a valid sockaddr_un; c_path is NUL-terminated.
    unsafe {
        check(libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(address).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        ))?;
        check(libc::chmod(c_path.as_ptr(), 0o600))?;
        check(libc::listen(fd.as_raw_fd(), 64))?;
    }
    Ok(UnixListener::from(fd))
}

/// Copies both ways until both directions are done, passing each end-of-stream on as a
/// half-close (gRPC clients close their sending side before reading the last answers).
fn splice(client: UnixStream, guest: GuestStream) {
    let (Ok(client_reader), Ok(guest_writer)) = (client.try_clone(), guest.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        copy_then_close(client_reader, guest_writer, |g: &GuestStream| {
            g.shutdown(Shutdown::Write)
        });
    });
    copy_then_close(guest, client, |c: &UnixStream| c.shutdown(Shutdown::Write));
    let _ = upstream.join();
}

fn copy_then_close<R: Read, W: Write>(mut from: R, mut to: W, close: impl Fn(&W) -> io::Result<()>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = close(&to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn connections_are_spliced_to_the_guest_port_and_the_socket_is_private() {
        let dir = tempfile::tempdir().unwrap();
        // Plays vhost-device-vsock: answers the handshake, then echoes in upper case.
        let daemon_path = dir.path().join("vsock.sock");
        let daemon = UnixListener::bind(&daemon_path).unwrap();
        std::thread::spawn(move || {
            for conn in daemon.incoming() {
                let mut conn = conn.unwrap();
                let mut request = [0u8; 13];
                conn.read_exact(&mut request).unwrap();
                assert_eq!(&request, b"CONNECT 8080\n");
                conn.write_all(b"OK 1\n").unwrap();
                let mut text = String::new();
                conn.read_to_string(&mut text).unwrap();
                conn.write_all(text.to_uppercase().as_bytes()).unwrap();
            }
        });
        // Longer than sun_path allows.
        let deep = dir.path().join("d".repeat(100));
        std::fs::create_dir(&deep).unwrap();
        let path = deep.join("control.sock");
        std::fs::write(&path, "stale").unwrap();
        let control = ControlSocket::serve(&path, VsockConnector::HybridUnix { socket: daemon_path }).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        for _ in 0..2 {
            let short = SocketPath::new(&path).unwrap();
            let mut client = UnixStream::connect(short.as_path()).unwrap();
            client.write_all(b"hello").unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).unwrap();
            assert_eq!(answer, "HELLO");
        }
        drop(control);
        assert!(!path.exists());
    }
}
