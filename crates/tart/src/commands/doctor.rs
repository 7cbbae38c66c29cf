//! `tart doctor`: prints the checks of `tart-doctor`, one line each with its fix below.

use std::process::ExitCode;

use anyhow::Result;
use tart_doctor::{Report, Status};
use tart_home::tart_pretty_json;

use super::Context;
use crate::cli::{DoctorArgs, Format};

pub fn doctor(ctx: &Context, args: &DoctorArgs) -> Result<ExitCode> {
    let report = tart_doctor::diagnose(&ctx.home);
    match args.format {
        Format::Text => print!("{}", text(&report)),
        Format::Json => println!("{}", String::from_utf8(tart_pretty_json(&report))?),
    }
    Ok(if report.can_run_vms {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn text(report: &Report) -> String {
    let name_width = report.checks.iter().map(|check| check.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for check in &report.checks {
        out.push_str(&format!(
            "{:<7}  {:<name_width$}  {}\n",
            check.status.as_str(),
            check.name,
            check.message
        ));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("{:<7}  {:<name_width$}  fix: {fix}\n", "", ""));
        }
    }
    let count = |status| report.checks.iter().filter(|check| check.status == status).count();
    let (problems, warnings) = (count(Status::Problem), count(Status::Warning));
    out.push_str(&if report.can_run_vms {
        format!("This host can run VMs ({warnings} warning(s)).\n")
    } else {
        format!("This host cannot run VMs: fix the {problems} problem(s) above ({warnings} warning(s)).\n")
    });
    out
}
