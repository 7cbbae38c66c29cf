//! SSH into the guest with OpenSSH's `ssh` (passwords through `sshpass`), the client admins
//! already debug with; any host key is accepted, as gitlab-tart-executor does, since every job
//! VM is new.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::settings::Settings;

/// sshpass's exit status when the server rejected the password.
const SSHPASS_WRONG_PASSWORD: i32 = 5;

pub struct Ssh {
    destination: String,
    port: u16,
    auth: Auth,
}

enum Auth {
    Password(String),
    Key(PathBuf),
}

pub enum Probe {
    Ready,
    /// The guest answered and refused the login: retrying will not help.
    Refused(String),
    /// Not (yet) reachable: sshd not up, or the VM gone.
    Unreachable(String),
}

impl Ssh {
    pub fn new(ip: &str, settings: &Settings) -> Ssh {
        Ssh {
            destination: format!("{}@{ip}", settings.ssh_username),
            port: settings.ssh_port,
            auth: match &settings.ssh_key_path {
                Some(key) => Auth::Key(key.clone()),
                None => Auth::Password(settings.ssh_password.clone()),
            },
        }
    }

    pub fn destination(&self) -> String {
        format!("{}:{}", self.destination, self.port)
    }

    /// `ssh` to the guest running the shell command `remote`.
    pub fn command(&self, remote: &str) -> Command {
        let mut command = match &self.auth {
            Auth::Password(password) => {
                let mut command = Command::new("sshpass");
                // -e: the password travels in the environment, not in argv (ps shows argv).
                command.arg("-e").env("SSHPASS", password).arg("ssh");
                command.args(["-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1"]);
                command
            }
            Auth::Key(key) => {
                let mut command = Command::new("ssh");
                command.arg("-i").arg(key);
                command.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"]);
                command
            }
        };
        command.args([
            "-T",
            "-p",
            &self.port.to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            // Also bounds sshd's banner, which a guest under TCG on a busy host (several VMs
            // booting on 2 cores) took over 10 s to send.
            "ConnectTimeout=30",
            // A VM that vanishes mid-job (stopped, deleted, crashed) ends the session in a
            // minute instead of leaving the job hanging until its timeout. Not sooner: such a
            // guest also stalled for over 15 s, and a 15 s limit broke live jobs' sessions.
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
            &self.destination,
        ]);
        command.arg("--").arg(remote);
        command
    }

    /// One login running `true`.
    pub fn probe(&self) -> Probe {
        let out = match self.command("true").stdin(Stdio::null()).output() {
            Ok(out) => out,
            Err(err) => {
                return Probe::Refused(format!("failed to run ssh: {err} (install openssh-client and sshpass)"))
            }
        };
        if out.status.success() {
            return Probe::Ready;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("ssh failed without a message")
            .to_owned();
        if matches!(self.auth, Auth::Password(_)) && out.status.code() == Some(SSHPASS_WRONG_PASSWORD) {
            return Probe::Refused("Permission denied (the password was rejected)".to_owned());
        }
        if stderr.contains("Permission denied") {
            Probe::Refused(reason)
        } else {
            Probe::Unreachable(reason)
        }
    }
}
