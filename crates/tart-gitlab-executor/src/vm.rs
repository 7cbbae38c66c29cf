//! The job's VM: waiting for its address and SSH, and telling a VM that went away from a slow one.

use std::path::PathBuf;
use std::process::Child;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::settings::Settings;
use crate::ssh::{Probe, Ssh};
use crate::tart::{last_line, Tart};

/// Logins refused in a row before the credentials are taken to be wrong: while cloud-init is
/// still creating the user, sshd may already refuse a login that will succeed seconds later.
const REFUSALS_BEFORE_GIVING_UP: u32 = 3;

pub struct Vm<'a> {
    pub tart: &'a Tart,
    pub name: String,
    pub settings: &'a Settings,
    pub run_log: PathBuf,
    /// `tart run`, when this stage started it.
    pub run: Option<Child>,
}

impl Vm<'_> {
    /// Fails when the VM no longer runs, with what `tart run` said last.
    pub fn ensure_running(&mut self) -> Result<()> {
        let said = || {
            last_line(&self.run_log)
                .map(|line| format!(" (tart run: {line})"))
                .unwrap_or_default()
        };
        if let Some(run) = &mut self.run {
            if let Ok(Some(status)) = run.try_wait() {
                bail!(
                    "VM {:?} stopped while booting: tart run exited with {status}{}",
                    self.name,
                    said()
                );
            }
            return Ok(());
        }
        let info = self
            .tart
            .exec(&["get", "--format", "json", &self.name], &[])
            .map_err(|err| anyhow!("VM {:?} is gone (deleted during the job?): {err}", self.name))?;
        let info: serde_json::Value = serde_json::from_str(&info)?;
        match info["State"].as_str() {
            Some("running") => Ok(()),
            state => bail!(
                "VM {:?} is no longer running (state {}; stopped during the job?){}",
                self.name,
                state.unwrap_or("unknown"),
                said()
            ),
        }
    }

    /// `"darwin"` or `"linux"`, from `tart get --format json`.
    pub fn os(&self) -> Result<String> {
        let info: serde_json::Value =
            serde_json::from_str(&self.tart.exec(&["get", "--format", "json", &self.name], &[])?)?;
        // Tart spells the key "OS"; Go's decoder, which gitlab-tart-executor uses, matches "os" to it.
        Ok(info["OS"]
            .as_str()
            .or(info["os"].as_str())
            .unwrap_or("darwin")
            .to_owned())
    }

    /// Waits for the VM's address, then for a login, within the boot timeout.
    pub fn connect(&mut self) -> Result<Ssh> {
        let deadline = Instant::now() + self.settings.boot_timeout;
        let ip = self.wait_for_ip(deadline)?;
        let ssh = Ssh::new(&ip, self.settings);
        let mut refusals = 0;
        loop {
            let reason = match ssh.probe() {
                Probe::Ready => return Ok(ssh),
                Probe::Refused(reason) => {
                    refusals += 1;
                    if refusals >= REFUSALS_BEFORE_GIVING_UP {
                        bail!(
                            "VM errored: failed to connect via SSH: {} refused the login: {}; check \
                             TART_EXECUTOR_SSH_USERNAME and TART_EXECUTOR_SSH_PASSWORD (or TART_EXECUTOR_SSH_KEY_PATH)",
                            ssh.destination(),
                            reason.trim_end_matches('.')
                        );
                    }
                    reason
                }
                Probe::Unreachable(reason) => {
                    refusals = 0;
                    reason
                }
            };
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "VM errored: failed to connect via SSH to {} in {} s: {reason}",
                    ssh.destination(),
                    self.settings.boot_timeout.as_secs()
                );
            }
            sleep(Duration::from_secs(1));
        }
    }

    fn wait_for_ip(&mut self, deadline: Instant) -> Result<String> {
        let resolver = if self.settings.bridged.is_some() { "arp" } else { "dhcp" };
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .clamp(1, 60);
            let wait = left.to_string();
            match self
                .tart
                .exec(&["ip", "--wait", &wait, "--resolver", resolver, &self.name], &[])
            {
                Ok(ip) if !ip.trim().is_empty() => return Ok(ip.trim().to_owned()),
                Ok(_) => eprintln!(
                    "Failed to retrieve IP address of VM {:?}: tart ip printed nothing, will re-try...",
                    self.name
                ),
                Err(err) => eprintln!(
                    "Failed to retrieve IP address of VM {:?} in {wait} seconds: {err}, will re-try...",
                    self.name
                ),
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "VM {:?} got no IP address in {} s: its guest has no network, or did not boot \
                     (see the tart run output above); TART_EXECUTOR_BOOT_TIMEOUT sets the limit",
                    self.name,
                    self.settings.boot_timeout.as_secs()
                );
            }
            sleep(Duration::from_secs(1));
        }
    }
}
