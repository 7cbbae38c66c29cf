use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tart_cloudinit::{default_user_data, invoking_user_ssh_keys, Seed};
use tart_home::{grow_disk, AccessDate, Arch, Display, Error, MacAddress, Os, VmState};

use super::{image, parse_vm_name, Context, VmName};
use crate::cli::{CloneArgs, CreateArgs, DeleteArgs, RenameArgs, SetArgs, StopArgs};
use crate::UsageError;

const GB: u64 = 1_000_000_000;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

pub fn create(ctx: &Context, args: &CreateArgs) -> Result<()> {
    if args.from_ipsw.is_some() {
        bail!("macOS guests need a macOS host: --from-ipsw is not supported on Linux, use --linux");
    }
    if args.disk_format.eq_ignore_ascii_case("asif") {
        bail!("ASIF disk images need macOS 26 or newer: use --disk-format raw");
    }
    let user_data = args.user_data.as_deref().map(image::read_user_data).transpose()?;
    let source = match &args.from_image {
        Some(location) => Some(image::SourceImage::open(ctx, args, location)?),
        None if args.linux => None,
        None => {
            return Err(UsageError("Please specify either a --from-ipsw or --linux option!".into()).into());
        }
    };
    // A VM from a cloud image always gets a seed: without one it has no user to log in as.
    let user_data = match (user_data, &source) {
        (None, Some(_)) => Some(default_user_data(&invoking_user_ssh_keys())),
        (user_data, _) => user_data,
    };
    let firmware = tart_qemu::firmware::find_firmware(Arch::host())?;
    ctx.home.create_linux_vm_with(
        &args.name,
        &firmware.vars_template,
        args.force,
        |staged| -> Result<()> {
            match &source {
                Some(image) => image.write_disk(&staged.disk_path())?,
                None => staged.create_empty_disk(u64::from(args.disk_size.unwrap_or(50)) * GB)?,
            }
            if let Some(user_data) = user_data {
                Seed::new(user_data, &args.name).save(&staged.seed_dir())?;
            }
            Ok(())
        },
    )
}

pub fn clone(ctx: &Context, args: &CloneArgs) -> Result<()> {
    if args.new_name.contains('/') {
        return Err(UsageError("<new-name> should be a local name".into()).into());
    }
    let source = match parse_vm_name(&args.source_name)? {
        VmName::Local(name) => ctx.home.existing_local_vm(&name)?,
        // With --arch (--containerdisk-path) the tag's cached image may be another platform's
        // (made from another disk): the pull decides, and finds the image cached when it is the
        // one asked for.
        VmName::Remote(remote) => match ctx
            .cache
            .open(&remote)
            .filter(|_| args.pull.arch.is_none() && args.pull.containerdisk_path.is_none())
        {
            Some(vm) => vm,
            None => super::registry::pull_remote(ctx, &remote, &args.pull)?,
        },
    };
    source.set_access_date(AccessDate::Now)?;
    ctx.home.clone_vm(&source, &args.new_name, args.force, |staged| {
        image::renew_identity(staged, &args.new_name)
    })?;

    // The clone shares the source's extents now but will diverge as the guest writes: make
    // sure that much room can exist, within --prune-limit, by pruning old cached images.
    if std::env::var_os("TART_NO_AUTO_PRUNE").is_none() {
        let unallocated = source.size_bytes()?.saturating_sub(source.allocated_bytes()?);
        let required = unallocated.min(args.prune_limit.saturating_mul(GIB));
        if required > 0 {
            ctx.cache
                .reclaim_if_needed(required, Some(source.path()))
                .context("failed to prune the OCI cache")?;
        }
    }
    Ok(())
}

pub fn set(ctx: &Context, args: &SetArgs) -> Result<()> {
    let vm = ctx.home.existing_local_vm(&args.name)?;
    vm.set_access_date(AccessDate::Now)?;
    let mut config = vm.config()?;

    let new_disk_size = args.disk_size.map(|gb| u64::from(gb) * GB);
    if let Some(size) = new_disk_size {
        let current = std::fs::metadata(vm.disk_path())?.len();
        if size < current {
            return Err(Error::DiskShrink {
                requested: size,
                current,
            }
            .into());
        }
    }
    if args.random_serial && config.os == Os::Darwin {
        bail!("--random-serial gives a macOS VM a new machine identifier, which only macOS can make: run it on a Mac");
    }
    let user_data = args.user_data.as_deref().map(image::read_user_data).transpose()?;
    let display = args
        .display
        .as_deref()
        .map(str::parse::<Display>)
        .transpose()
        .map_err(UsageError)?;

    if let Some(cpu) = args.cpu {
        let min = if config.os == Os::Darwin {
            config.cpu_count_min
        } else {
            1
        };
        if u32::from(cpu) < min {
            bail!("VM should have {min} CPU cores at minimum (requested {cpu})");
        }
        config.cpu_count = u32::from(cpu);
    }
    if let Some(mib) = args.memory {
        let bytes = mib.saturating_mul(MIB);
        // 128 MiB is Virtualization.framework's floor, and below it UEFI firmware cannot boot.
        let min = if config.os == Os::Darwin {
            config.memory_size_min
        } else {
            128 * MIB
        };
        if bytes < min {
            bail!("VM should have {min} bytes of memory at minimum (requested {bytes})");
        }
        config.memory_size = bytes;
    }
    if let Some(display) = display {
        if display.width > 0 {
            config.display.width = display.width;
        }
        if display.height > 0 {
            config.display.height = display.height;
        }
        config.display.unit = display.unit;
    }
    config.display_refit = args.display_refit();
    if args.random_mac {
        config.mac_address = MacAddress::random();
        // The saved machine state carries the old address.
        let _ = std::fs::remove_file(vm.state_path());
    }
    vm.save_config(&config)?;

    if let Some(image) = &args.disk {
        if !image.is_file() {
            bail!("disk image {} does not exist or is not a file", image.display());
        }
        ctx.home.replace_disk(&vm, image)?;
    }
    if let Some(size) = new_disk_size {
        grow_disk(&vm.disk_path(), size)?;
    }
    if let Some(user_data) = user_data {
        image::set_user_data(&vm, &args.name, user_data)?;
    }
    Ok(())
}

pub fn rename(ctx: &Context, args: &RenameArgs) -> Result<()> {
    if args.new_name.contains('/') {
        return Err(UsageError("<new-name> should be a local name".into()).into());
    }
    let source = ctx.home.local_vm(&args.name)?;
    let target = ctx.home.local_vm(&args.new_name)?;
    if !source.is_initialized() {
        bail!("failed to rename a non-existent local VM: {}", args.name);
    }
    // Unlike Tart we refuse to move a running VM: its run lock, disk and control socket would
    // change path under the running `tart run`.
    let _not_running = source.lock_not_running(&args.name)?;
    ctx.home.rename_vm(&source, &target).map_err(|err| match err {
        Error::VmAlreadyExists(_) => anyhow::anyhow!(
            "failed to rename VM {}, target VM {} already exists, delete it first!",
            args.name,
            args.new_name
        ),
        other => other.into(),
    })
}

pub fn delete(ctx: &Context, args: &DeleteArgs) -> Result<()> {
    for name in &args.names {
        match parse_vm_name(name)? {
            VmName::Remote(remote) => {
                if !ctx.cache.delete(&remote).context("OCI storage error")? {
                    return Err(Error::VmDoesNotExist(name.clone()).into());
                }
            }
            VmName::Local(local) => {
                let vm = ctx.home.existing_local_vm(&local)?;
                let _not_running = vm.lock_not_running(&local)?;
                vm.remove(&ctx.home.tmp_dir())?;
            }
        }
    }
    Ok(())
}

pub fn stop(ctx: &Context, args: &StopArgs) -> Result<()> {
    let vm = ctx.home.existing_local_vm(&args.name)?;
    match vm.state() {
        VmState::Suspended => {
            std::fs::remove_file(vm.state_path()).context("failed to discard the suspended state")?;
            Ok(())
        }
        VmState::Stopped => Err(Error::VmNotRunning(args.name.clone()).into()),
        VmState::Running => {
            let Some(pid) = vm.running_pid() else {
                return Ok(());
            };
            signal(pid, libc::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(args.timeout);
            while Instant::now() < deadline {
                if vm.running_pid().is_none() {
                    return Ok(());
                }
                sleep(Duration::from_millis(100));
            }
            if vm.running_pid().is_some() && !signal(pid, libc::SIGKILL) {
                bail!(
                    "failed to forcefully terminate the VM \"{}\": {}",
                    args.name,
                    std::io::Error::last_os_error()
                );
            }
            Ok(())
        }
    }
}

fn signal(pid: libc::pid_t, signal: libc::c_int) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) == 0 }
}
