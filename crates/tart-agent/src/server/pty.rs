//! The pseudo-terminal of a `tty` session.

use std::io;
use std::os::fd::OwnedFd;

use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::proto::TerminalSize;

/// The master side, non-blocking and registered with Tokio.
pub(super) struct Pty {
    master: AsyncFd<OwnedFd>,
}

impl Pty {
    /// Opens a PTY pair of `size`; the slave goes to the child.
    pub(super) fn open(size: Option<TerminalSize>) -> io::Result<(Pty, OwnedFd)> {
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let master = rustix::pty::openpt(flags)?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        // TIOCGPTPEER rather than opening ptsname(): no path lookup that could race with another pty.
        let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
        rustix::io::ioctl_fionbio(&master, true)?;
        // SAFETY: the AsyncFd owns `master`, so the descriptor stays open and the same while registered.
        let pty = Pty {
            master: unsafe { AsyncFd::register(master)? },
        };
        if let Some(size) = size {
            pty.resize(size)?;
        }
        Ok((pty, slave))
    }

    /// Sets the window size; the kernel sends SIGWINCH to the terminal's foreground process group.
    pub(super) fn resize(&self, size: TerminalSize) -> io::Result<()> {
        let clamp = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
        let winsize = Winsize {
            ws_row: clamp(size.rows),
            ws_col: clamp(size.cols),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        Ok(rustix::termios::tcsetwinsize(self.master.get_ref(), winsize)?)
    }

    /// Reads the terminal's output. Fails with EIO once no process has the slave open any more.
    pub(super) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.master
            .async_io(Interest::READABLE, |fd| Ok(rustix::io::read(fd, &mut *buf)?))
            .await
    }

    /// Types `data` into the terminal, waiting while its input queue is full.
    pub(super) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self
                .master
                .async_io(Interest::WRITABLE, |fd| Ok(rustix::io::write(fd, data)?))
                .await?;
            data = &data[n..];
        }
        Ok(())
    }
}
