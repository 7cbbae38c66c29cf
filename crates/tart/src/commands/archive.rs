//! `tart export` and `tart import`: VMs as `.tvm` files (Apple Archive + LZFSE, as macOS Tart).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use tart_home::AccessDate;
use tart_oci::progress::Progress;

use super::{parse_vm_name, Context, VmName};
use crate::cli::{ExportArgs, ImportArgs};
use crate::progress::CliProgress;
use crate::UsageError;

pub fn export(ctx: &Context, args: &ExportArgs) -> Result<()> {
    let vm = match parse_vm_name(&args.name)? {
        VmName::Local(name) => ctx.home.existing_local_vm(&name)?,
        VmName::Remote(remote) => ctx
            .cache
            .open(&remote)
            .ok_or_else(|| tart_home::Error::VmDoesNotExist(args.name.clone()))?,
    };
    let target = match &args.path {
        Some(path) => path.clone(),
        None => {
            // A remote name's slashes would make a path into directories that do not exist.
            let default = PathBuf::from(format!("{}.tvm", args.name.replace('/', "_")));
            if default.exists() && !confirm_overwrite(&default)? {
                return Ok(());
            }
            default
        }
    };
    println!("exporting...");
    let progress = CliProgress::new();
    progress.begin(vm.export_size()?);
    vm.export_archive(&target, &|bytes| progress.advance(bytes))?;
    progress.end();
    vm.set_access_date(AccessDate::Now)?;
    Ok(())
}

/// Tart asks before replacing the default path (an explicit one is replaced silently); without
/// a terminal to ask on, we refuse rather than guess.
fn confirm_overwrite(path: &std::path::Path) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "file {} already exists; give the path explicitly (tart export <name> <path>) to overwrite it",
            path.display()
        );
    }
    print!(
        "file {} already exists, are you sure you want to overwrite it? (yes, [no])? ",
        path.display()
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim_end_matches(['\r', '\n']) == "yes")
}

pub fn import(ctx: &Context, args: &ImportArgs) -> Result<()> {
    if args.name.contains('/') {
        return Err(UsageError("<name> should be a local name".into()).into());
    }
    let size = std::fs::metadata(&args.path)
        .map_err(|err| anyhow::anyhow!("failed to open {}: {err}", args.path.display()))?
        .len();
    println!("importing...");
    let progress = CliProgress::new();
    progress.begin(size);
    ctx.home
        .import_vm(&args.path, &args.name, args.force, &|bytes| progress.advance(bytes))?;
    progress.end();
    Ok(())
}
