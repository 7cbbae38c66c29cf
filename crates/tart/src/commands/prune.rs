use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context as _, Result};
use tart_home::prune::{older_than, over_budget, Candidate};
use tart_home::VmState;

use super::Context;
use crate::cli::PruneArgs;
use crate::output::days;
use crate::UsageError;

const GIB: u64 = 1 << 30;

pub fn prune(ctx: &Context, args: &PruneArgs) -> Result<()> {
    let space_budget = match (args.space_budget, args.cache_budget) {
        (Some(_), Some(_)) => {
            return Err(UsageError("--cache-budget is deprecated, please use only --space-budget".into()).into())
        }
        (Some(budget), None) => Some(budget),
        (None, Some(budget)) => {
            eprintln!("--cache-budget is deprecated, please use --space-budget");
            Some(budget)
        }
        (None, None) => None,
    };
    if args.older_than.is_none() && space_budget.is_none() && !args.gc {
        return Err(UsageError("at least one pruning criteria must be specified".into()).into());
    }
    let vms = match args.entries.as_str() {
        "caches" => false,
        "vms" => true,
        _ => {
            return Err(
                UsageError("unsupported --entries value, please specify either \"caches\" or \"vms\"".into()).into(),
            )
        }
    };

    if args.gc {
        ctx.cache.gc().context("OCI storage error")?;
    }
    let mut candidates = if vms {
        vm_candidates(ctx)?
    } else {
        ctx.cache.prune_candidates()?
    };
    if let Some(n) = args.older_than {
        let cutoff = SystemTime::now() - days(n);
        let doomed = older_than(&candidates, cutoff);
        delete(ctx, vms, &doomed)?;
        candidates.retain(|c| !doomed.contains(&c.key));
    }
    if let Some(budget) = space_budget {
        let doomed = over_budget(&candidates, budget.saturating_mul(GIB));
        delete(ctx, vms, &doomed)?;
    }
    Ok(())
}

fn vm_candidates(ctx: &Context) -> Result<Vec<Candidate<PathBuf>>> {
    let mut candidates = Vec::new();
    for (_, vm) in ctx.home.local_vms()? {
        if vm.state() == VmState::Running {
            continue;
        }
        candidates.push(Candidate {
            accessed: vm.access_date(),
            allocated_bytes: vm.allocated_bytes()?,
            key: vm.path().to_owned(),
        });
    }
    Ok(candidates)
}

fn delete(ctx: &Context, vms: bool, doomed: &[PathBuf]) -> Result<()> {
    if !vms {
        return ctx.cache.remove_images(doomed).context("OCI storage error");
    }
    for path in doomed {
        let vm = tart_home::VmDir::new(path.clone());
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        // A VM may have started since we listed it; leave it alone then.
        let Ok(_not_running) = vm.lock_not_running(&name) else {
            continue;
        };
        vm.remove(&ctx.home.tmp_dir())?;
    }
    Ok(())
}
