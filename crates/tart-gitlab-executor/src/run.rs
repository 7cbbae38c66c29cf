//! The `run` stage: one of GitLab's scripts piped into the guest's shell over SSH.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context as _};

use crate::gitlab::Job;
use crate::settings::Settings;
use crate::tart::{follow, Tart};
use crate::vm::Vm;
use crate::Failure;

/// OpenSSH's own exit status for a failed connection; a script may exit with it too.
const SSH_ERROR: i32 = 255;

/// The user's shell reading the script from stdin. Not a login shell (which an SSH "shell"
/// request, gitlab-tart-executor's, starts): on exit, a login bash runs `~/.bash_logout`, whose
/// Debian and Ubuntu version fails under the `set -e` of GitLab's scripts and turns every
/// script's status into 1. `TART_EXECUTOR_SHELL="bash -l"` asks for a login shell.
const DEFAULT_SHELL: &str = "exec \"$SHELL\"";

pub fn run(script: &Path) -> Result<(), Failure> {
    let input = File::open(script).with_context(|| format!("failed to open the script {}", script.display()))?;
    let job = Job::from_env()?;
    let settings = Settings::from_env()?;
    let tart = Tart::find()?;
    follow(job.run_log());
    let mut vm = Vm {
        tart: &tart,
        name: job.vm_name(),
        settings: &settings,
        run_log: job.run_log(),
        run: None,
    };
    let ssh = vm.connect()?;
    let status = ssh
        .command(settings.shell.as_deref().unwrap_or(DEFAULT_SHELL))
        .stdin(input)
        .status()
        .context("failed to run ssh")?;
    let code = match status.code() {
        Some(0) => return Ok(()),
        Some(SSH_ERROR) => {
            // The script's status, or ssh's: a VM that still runs and answers tells them apart.
            vm.ensure_running()?;
            if !matches!(ssh.probe(), crate::ssh::Probe::Ready) {
                return Err(anyhow!("lost the SSH connection to VM {:?} while the script ran", vm.name).into());
            }
            SSH_ERROR
        }
        Some(code) => code,
        None => return Err(anyhow!("ssh was killed ({status})").into()),
    };
    eprintln!("Process exited with status {code}");
    if let Some(path) = std::env::var_os("BUILD_EXIT_CODE_FILE") {
        if let Err(err) = std::fs::write(&path, format!("{code}\n")) {
            eprintln!(
                "failed to propagate SSH command exit code to a file pointed by the BUILD_EXIT_CODE_FILE \
                 environment variable ({path:?}): {err}"
            );
        }
    }
    Err(Failure::Build)
}
