use std::time::SystemTime;

use anyhow::{anyhow, Result};
use serde::Serialize;
use tart_home::{tart_pretty_json, AccessDate, ImageFormat, VmConfig, VmDir, VmState};

use super::{parse_vm_name, Context, VmName};
use crate::cli::{Format, FqnArgs, GetArgs, ListArgs};
use crate::output::{iso8601, relative_time, table};

const GB: u64 = 1_000_000_000;

/// `tart get --format json`: Packer and the GitLab executor decode these keys.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct VmInfo {
    #[serde(rename = "OS")]
    os: &'static str,
    #[serde(rename = "CPU")]
    cpu: u32,
    memory: u64,
    disk: u64,
    disk_format: &'static str,
    size: String,
    display: String,
    running: bool,
    state: &'static str,
    /// Whether `tart run` gives the guest a cloud-init seed (`<vm>/cloud-init/`).
    cloud_init: bool,
    /// The image format the VM was cloned from (`tart` for VMs made locally). Last, so that
    /// parsers of Tart's columns are not disturbed.
    format: &'static str,
}

pub fn get(ctx: &Context, args: &GetArgs) -> Result<()> {
    let vm = ctx.home.existing_local_vm(&args.name)?;
    vm.set_access_date(AccessDate::Now)?;
    let config = vm.config()?;
    let state = vm.state();
    let info = VmInfo {
        os: config.os.as_str(),
        cpu: config.cpu_count,
        memory: config.memory_size / (1 << 20),
        disk: vm.size_bytes()? / GB,
        disk_format: config.disk_format.as_str(),
        size: format!("{:.3}", vm.allocated_bytes()? as f64 / GB as f64),
        display: config.display.to_string(),
        running: state == VmState::Running,
        state: state.as_str(),
        cloud_init: vm.seed_dir().is_dir(),
        format: image_format(&config),
    };
    match args.format {
        Format::Json => println!("{}", String::from_utf8(tart_pretty_json(&info))?),
        Format::Text => {
            let header = [
                "OS",
                "CPU",
                "Memory",
                "Disk",
                "DiskFormat",
                "Size",
                "Display",
                "State",
                "CloudInit",
                "Format",
            ];
            let row = vec![
                info.os.to_owned(),
                info.cpu.to_string(),
                info.memory.to_string(),
                info.disk.to_string(),
                info.disk_format.to_owned(),
                info.size,
                info.display,
                info.state.to_owned(),
                if info.cloud_init { "seed" } else { "none" }.to_owned(),
                info.format.to_owned(),
            ];
            println!("{}", table(&header, &[row]));
        }
    }
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ListEntry {
    source: &'static str,
    name: String,
    disk: u64,
    size: u64,
    accessed: String,
    running: bool,
    state: &'static str,
    /// See [`VmInfo::format`].
    format: &'static str,
    #[serde(skip)]
    accessed_at: SystemTime,
}

pub fn list(ctx: &Context, args: &ListArgs) -> Result<()> {
    let source = args.source.as_deref();
    let mut entries = Vec::new();
    if source != Some("oci") {
        for (name, vm) in ctx.home.local_vms()? {
            entries.push(list_entry("local", name, &vm)?);
        }
    }
    if source != Some("local") {
        for entry in ctx.cache.entries()? {
            entries.push(list_entry("OCI", entry.name, &entry.vm)?);
        }
    }

    if args.quiet {
        for entry in &entries {
            println!("{}", entry.name);
        }
        return Ok(());
    }
    match args.format {
        Format::Json => println!("{}", String::from_utf8(tart_pretty_json(&entries))?),
        Format::Text => {
            let now = SystemTime::now();
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.source.to_owned(),
                        e.name.clone(),
                        e.disk.to_string(),
                        e.size.to_string(),
                        relative_time(e.accessed_at, now),
                        e.state.to_owned(),
                        e.format.to_owned(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &["Source", "Name", "Disk", "Size", "Accessed", "State", "Format"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

fn list_entry(source: &'static str, name: String, vm: &VmDir) -> Result<ListEntry> {
    let state = vm.state();
    let accessed_at = vm.access_date();
    Ok(ListEntry {
        source,
        name,
        disk: vm.size_bytes()? / GB,
        size: vm.allocated_bytes()? / GB,
        accessed: iso8601(accessed_at),
        running: state == VmState::Running,
        state: state.as_str(),
        // A config too broken to read does not hide the VM from the list.
        format: vm
            .config()
            .map_or(ImageFormat::Tart.as_str(), |config| image_format(&config)),
        accessed_at,
    })
}

fn image_format(config: &VmConfig) -> &'static str {
    config.image_format.unwrap_or(ImageFormat::Tart).as_str()
}

pub fn fqn(ctx: &Context, args: &FqnArgs) -> Result<()> {
    match parse_vm_name(&args.name)? {
        VmName::Local(name) => println!("{name}"),
        VmName::Remote(remote) => println!("{}", ctx.cache.fqn(&remote).map_err(|e| anyhow!(e))?),
    }
    Ok(())
}
