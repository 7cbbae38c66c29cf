//! The `cleanup` stage: the job's VM stopped and deleted whatever happened before, including a
//! prepare killed before `tart run` held the VM.

use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::gitlab::Job;
use crate::settings::Settings;
use crate::tart::Tart;

/// How long a `tart run` that a killed prepare left starting may take to register or exit.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

pub fn cleanup() -> Result<()> {
    let job = Job::from_env()?;
    let tart = Tart::find()?;
    let name = job.vm_name();
    let run_pid = std::fs::read_to_string(job.run_pid_file())
        .ok()
        .and_then(|pid| pid.trim().parse::<libc::pid_t>().ok())
        .filter(|&pid| is_tart_run_of(pid, &name));

    if let Err(err) = tart.exec(&["stop", &name], &[]) {
        eprintln!("Failed to stop VM: {err:#}");
    }
    // `tart stop` only stops a registered VM; a `tart run` still starting is killed by its pid.
    if let Some(pid) = run_pid {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while is_tart_run_of(pid, &name) {
            if Instant::now() >= deadline {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid was just checked.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            } else {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            sleep(Duration::from_millis(200));
        }
    }
    if let Err(err) = tart.exec(&["delete", &name], &[]) {
        if tart.exec(&["get", "--format", "json", &name], &[]).is_ok() {
            eprintln!("Failed to delete VM: {err:#}");
            bail!("VM errored: failed to delete VM {name}: {err:#}");
        }
        eprintln!("VM {name} does not exist: nothing to delete");
    }
    let _ = std::fs::remove_file(job.run_pid_file());
    if Settings::from_env()?.host_dir {
        let dir = job.host_dir();
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                bail!("Failed to clean up {dir:?} (temporary directory from the host): {err}");
            }
        }
    }
    Ok(())
}

/// Whether `pid` is (still) the `tart run` of this VM, and not a process that reused the pid.
fn is_tart_run_of(pid: libc::pid_t, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.contains(&&b"run"[..]) && args.contains(&name.as_bytes())
}
