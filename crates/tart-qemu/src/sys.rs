//! The few system calls std does not wrap.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `command`'s child die with us and start with a clean signal state:
///
/// * `PR_SET_PDEATHSIG(SIGKILL)`: the kernel kills the child when its parent goes away. "Parent"
///   is the *thread* that forked it, not the process: spawn from a thread that lives as long as
///   the VM should (the main thread of `tart run`), or the VM is killed when that thread ends.
///   If we already died between fork and the prctl, the child exits at once.
/// * Its own process group: a Ctrl-C on `tart run`'s terminal goes to `tart run`, which decides
///   what happens to the VM (Tart: hard stop), instead of QEMU dying on SIGINT by itself.
/// * An empty signal mask: a CLI that blocks signals to `sigwait` for them would otherwise hand
///   QEMU a mask in which SIGTERM/SIGINT never arrive.
/// * `inherit`: descriptors (close-on-exec in the parent) that the child keeps, same numbers.
pub(crate) fn supervise_child(command: &mut Command, inherit: Vec<RawFd>) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    command.process_group(0);
    // SAFETY: the closure only makes async-signal-safe calls (prctl, fcntl, getppid,
    // sigemptyset, pthread_sigmask) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            for fd in &inherit {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited before the VM started"));
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(())
        });
    }
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
    unsafe { Ok((File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Blocks until process `pid` (our child) has exited, without reaping it: the caller reaps it
/// while holding the lock that [`kill`] takes, so a signal never reaches a recycled pid.
pub(crate) fn wait_exited_no_reap(pid: u32) -> io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain data, zero is a valid value; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to info; pid is our own child.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

pub(crate) fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall; callers guarantee pid is an unreaped child of ours.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `data` to `socket` with `fd` attached (SCM_RIGHTS), as QMP's `getfd` expects.
pub(crate) fn send_with_fd(socket: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::io::Write;
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all pointers set below stay valid during sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg has a control buffer of CMSG_SPACE(sizeof(int)) bytes, so the first header
    // exists and has room for one int.
    let sent = unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(header) as *mut libc::c_int, raw);
        libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptor went with the first byte; the rest (if the kernel took only part) follows.
    (&*socket).write_all(&data[sent as usize..])
}

/// A VNC password: 8 characters, all that VNC's DES authentication uses, from an alphabet of 32
/// unambiguous lowercase letters and digits (40 bits).
pub(crate) fn random_vnc_password() -> io::Result<String> {
    const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| ALPHABET[(*b as usize) % 32] as char).collect())
}

/// A bind mount to make in a child's private mount namespace.
pub(crate) struct BindMount {
    source: std::ffi::CString,
    target: std::ffi::CString,
    read_only: bool,
}

impl BindMount {
    pub(crate) fn new(source: &std::path::Path, target: &std::path::Path, read_only: bool) -> crate::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = |path: &std::path::Path| {
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| crate::Error::NonUtf8Path(path.to_owned()))
        };
        Ok(BindMount {
            source: c_path(source)?,
            target: c_path(target)?,
            read_only,
        })
    }
}

/// Runs `command` in a new mount namespace (needs CAP_SYS_ADMIN) holding `mounts`, so that they
/// exist for that process only and vanish with it. Propagation is cut first: nothing leaks back
/// to the host's namespace.
pub(crate) fn bind_mounts_in_new_namespace(command: &mut Command, mounts: Vec<BindMount>) {
    // SAFETY: the closure only makes async-signal-safe system calls (unshare, mount) on strings
    // allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            let none = std::ptr::null();
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for bind in &mounts {
                check(libc::mount(
                    bind.source.as_ptr(),
                    bind.target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if bind.read_only {
                    check(libc::mount(
                        none,
                        bind.target.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnc_passwords_are_eight_random_characters() {
        let a = random_vnc_password().unwrap();
        let b = random_vnc_password().unwrap();
        assert_eq!(a.len(), 8);
        assert!(a.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn descriptors_travel_with_the_message() {
        use std::io::{Read, Seek, Write};
        let (left, right) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed along").unwrap();
        file.rewind().unwrap();
        use std::os::fd::AsFd;
        send_with_fd(&left, b"hello\n", file.as_fd()).unwrap();

        let mut buf = [0u8; 16];
        let space = unsafe { libc::CMSG_SPACE(4) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut _,
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut _;
        msg.msg_controllen = space as _;
        let n = unsafe { libc::recvmsg(right.as_raw_fd(), &mut msg, 0) };
        assert_eq!(&buf[..n as usize], b"hello\n");
        let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(libc::CMSG_FIRSTHDR(&msg)) as *const i32) };
        let mut received = unsafe { File::from_raw_fd(fd) };
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed along");
    }
}
