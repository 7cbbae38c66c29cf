//! The `tart` program, driven by argv as gitlab-tart-executor drives it: a failure is reported
//! by the first non-empty line of its stderr (else stdout).

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

pub struct Tart {
    path: PathBuf,
}

impl Tart {
    /// The `tart` installed next to this program (the one it was shipped with), else the first
    /// on `PATH`.
    pub fn find() -> Result<Tart> {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("tart")))
            .filter(|path| path.is_file());
        let on_path = || {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("tart"))
                    .find(|path| path.is_file())
            })
        };
        match beside.or_else(on_path) {
            Some(path) => Ok(Tart { path }),
            None => Err(anyhow!(
                "tart command not found: neither next to this program nor in PATH; install tart (the tart package ships both)"
            )),
        }
    }

    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut command = Command::new(&self.path);
        command.args(args);
        command
    }

    /// Runs `tart args...` with `env` added; its stdout.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S], env: &[(String, String)]) -> Result<String> {
        let out = self
            .command(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("failed to run {}", self.path.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = [stderr.as_ref(), stdout.as_str()]
            .iter()
            .flat_map(|text| text.lines())
            .find(|line| !line.trim().is_empty())
            .unwrap_or("")
            .to_owned();
        Err(anyhow!("tart command returned non-zero exit code: {line:?}"))
    }

    /// Starts `tart run args...` in a session of its own, so that neither the runner's signals
    /// to this stage's process group nor this process's exit stop the VM (only `cleanup` does),
    /// with stdout and stderr written to `log`.
    pub fn start_detached(&self, args: &[String], env: &[(String, String)], log: &Path) -> Result<Child> {
        // A new VM's log: what an earlier prepare attempt's VM said is in the job log already.
        let output = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(log)
            .with_context(|| format!("failed to open {}", log.display()))?;
        let mut command = self.command(args);
        command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn().context("failed to start tart run")
    }
}

/// Copies what `tart run` writes to `log` to stdout (the job log) as long as this process lives.
pub fn follow(log: PathBuf) {
    std::thread::spawn(move || {
        let Ok(mut file) = File::open(&log) else {
            eprintln!("Failed to open VM's output file, looks like the VM wasn't started in \"prepare\" step?");
            return;
        };
        let mut buffer = [0u8; 8192];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => std::thread::sleep(Duration::from_millis(100)),
                Ok(n) => {
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout.write_all(&buffer[..n]);
                    let _ = stdout.flush();
                }
                Err(err) => {
                    eprintln!("Failed to display VM's output: {err}");
                    return;
                }
            }
        }
    });
}

/// The last non-empty line `tart run` wrote, to say why a VM went away.
pub fn last_line(log: &Path) -> Option<String> {
    let mut file = File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .map(str::to_owned)
}
