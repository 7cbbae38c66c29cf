//! `tart doctor`: whether this host can run VMs well, one check per line, each with the command
//! that fixes what it found. The checks reuse what `tart run` itself decides with (accelerator
//! choice, firmware lookup, vsock backend, helper and network program lookup, `network.json`),
//! so the doctor and `tart run` never disagree.

mod accel;
mod devices;
mod programs;
mod storage;

use serde::Serialize;
use tart_home::TartHome;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// VMs run, but slower or with a feature missing.
    Warning,
    /// `tart run` fails (with the defaults) until it is fixed.
    Problem,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Problem => "problem",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    /// The command (or step) that fixes it; none when the status is ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, message: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            message: message.into(),
            fix: None,
        }
    }

    fn warning(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::needed(false, name, message, fix)
    }

    fn problem(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::needed(true, name, message, fix)
    }

    /// A problem where `needed`, else a warning: what only some VMs need.
    fn needed(needed: bool, name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: if needed { Status::Problem } else { Status::Warning },
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub can_run_vms: bool,
    pub checks: Vec<Check>,
}

/// Runs every check against this host and `home`. The shared network is `tart run`'s default
/// only with CAP_NET_ADMIN, so what only it needs is a problem there and a warning elsewhere.
pub fn diagnose(home: &TartHome) -> Report {
    let host = tart_qemu::HostInfo::detect();
    let net_admin = tart_net::has_net_admin();
    let mut checks = accel::checks(&host);
    checks.extend(programs::qemu(&host));
    checks.push(programs::firmware(host.arch));
    checks.extend(devices::checks(&host, net_admin));
    checks.push(programs::virtiofsd());
    checks.push(programs::network_tools(net_admin));
    checks.push(programs::firewall());
    checks.extend(storage::checks(home, net_admin));
    Report {
        can_run_vms: !checks.iter().any(|check| check.status == Status::Problem),
        checks,
    }
}
