//! A child process that cannot outlive the test process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub(crate) struct Supervised {
    pid: libc::pid_t,
    /// `None` while the child has not been reaped, so its pid cannot have been reused by another process.
    exit: Arc<Mutex<Option<ExitStatus>>>,
    waiter: Option<JoinHandle<()>>,
}

impl Supervised {
    /// Spawns `command` from a thread that lives exactly as long as the child. `PR_SET_PDEATHSIG` fires
    /// when the *thread* that forked exits, not the process: forking from a test's own thread would kill
    /// the child as soon as that test returns, even if the handle was moved elsewhere (a shared fixture).
    pub(crate) fn spawn(mut command: Command) -> io::Result<Supervised> {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure only makes async-signal-safe calls and does not allocate.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The test process may have died between fork and prctl; then nobody would ever kill us.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let exit = Arc::new(Mutex::new(None));
        let (started_tx, started_rx) = mpsc::channel();
        let waiter_exit = Arc::clone(&exit);
        let waiter = thread::Builder::new().name("testkit-child".into()).spawn(move || {
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(e) => return drop(started_tx.send(Err(e))),
            };
            let pid = child.id() as libc::pid_t;
            let _ = started_tx.send(Ok(pid));
            // Wait for the exit without reaping (WNOWAIT): reaping happens under the lock, so `Drop` never
            // signals a pid that the kernel may already have handed to an unrelated process.
            loop {
                // SAFETY: an all-zero siginfo_t is a valid out-parameter.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: waitid only writes into `info`.
                let rc =
                    unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
                if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
            let mut slot = waiter_exit.lock().unwrap_or_else(PoisonError::into_inner);
            *slot = child.wait().ok();
        })?;
        match started_rx.recv() {
            Ok(Ok(pid)) => Ok(Supervised {
                pid,
                exit,
                waiter: Some(waiter),
            }),
            Ok(Err(e)) => {
                let _ = waiter.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("child-supervising thread died")),
        }
    }

    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        {
            let slot = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                // SAFETY: plain syscall; the pid is still ours because the child is not reaped yet.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
        }
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.join();
        }
    }
}

/// Runs the shell `script` with `args` as `$1`… in a private mount namespace, where it may mount
/// a small tmpfs to run tart out of space without touching the host's mounts. The script must
/// succeed; its stdout and stderr.
pub fn in_private_mounts(script: &str, args: &[&std::ffi::OsStr]) -> (String, String) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .args(args)
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// Runs `command` to success; its wall time and peak resident memory. The child is reaped with
/// wait4, which reports its own peak (getrusage(RUSAGE_CHILDREN) would mix in other tests' VMs).
#[allow(clippy::zombie_processes)]
pub fn measured(command: &mut Command) -> (Duration, u64) {
    let started = Instant::now();
    let child = command.stdout(Stdio::null()).spawn().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{command:?} failed"
    );
    (started.elapsed(), usage.ru_maxrss as u64 * 1024)
}
