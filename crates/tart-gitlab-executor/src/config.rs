//! The `config` stage: where builds and caches live in the guest, and which host directories
//! are shared into it. GitLab Runner reads the JSON on stdout; no tart command runs.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value};

use crate::gitlab::Job;
use crate::settings::{self, Settings};

/// `/var/tmp` is absolute, no symlink, and present on macOS and Linux guests alike.
const GUEST_BUILDS_DIR: &str = "/var/tmp/builds";
const GUEST_CACHE_DIR: &str = "/var/tmp/cache";

#[derive(clap::Args)]
pub struct Args {
    /// Host directory for builds, shared into the guest (mutually exclusive with --guest-builds-dir)
    #[arg(long)]
    builds_dir: Option<String>,
    /// Host directory for caches, shared into the guest (mutually exclusive with --guest-cache-dir)
    #[arg(long)]
    cache_dir: Option<String>,
    /// Builds directory in the guest, e.g. on a --disk of prepare (mutually exclusive with --builds-dir)
    #[arg(long)]
    guest_builds_dir: Option<String>,
    /// Cache directory in the guest (mutually exclusive with --cache-dir)
    #[arg(long)]
    guest_cache_dir: Option<String>,
}

pub fn config(args: &Args) -> Result<()> {
    let settings = Settings::from_env()?;
    let job = Job::from_env()?;
    let failed = "configuration stage failed";
    if settings.host_dir && args.builds_dir.is_some() {
        bail!("{failed}: --builds-dir and TART_EXECUTOR_HOST_DIR are mutually exclusive");
    }
    if settings.host_dir && args.guest_builds_dir.is_some() {
        bail!("{failed}: --guest-builds-dir and TART_EXECUTOR_HOST_DIR are mutually exclusive");
    }
    if args.builds_dir.is_some() && args.guest_builds_dir.is_some() {
        bail!("{failed}: --builds-dir and --guest-builds-dir are mutually exclusive");
    }
    if args.cache_dir.is_some() && args.guest_cache_dir.is_some() {
        bail!("{failed}: --cache-dir and --guest-cache-dir are mutually exclusive");
    }

    let mut job_env = Map::new();
    let host_builds = if settings.host_dir {
        Some(job.host_dir().to_string_lossy().into_owned())
    } else {
        args.builds_dir.as_deref().map(expand)
    };
    if let Some(dir) = host_builds {
        make_private_dir(Path::new(&dir))?;
        job_env.insert(settings::BUILDS_DIR_ON_HOST.into(), dir.into());
    }
    if let Some(dir) = args.cache_dir.as_deref().map(expand) {
        make_private_dir(Path::new(&dir))?;
        job_env.insert(settings::CACHE_DIR_ON_HOST.into(), dir.into());
    }
    let builds_dir = args.guest_builds_dir.as_deref().unwrap_or(GUEST_BUILDS_DIR);
    let cache_dir = args.guest_cache_dir.as_deref().unwrap_or(GUEST_CACHE_DIR);
    // GitLab Runner does not pass its builds and cache directories to the driver itself.
    job_env.insert(settings::BUILDS_DIR.into(), builds_dir.into());
    job_env.insert(settings::CACHE_DIR.into(), cache_dir.into());

    let config = json!({
        "builds_dir": builds_dir,
        "cache_dir": cache_dir,
        "job_env": Value::Object(job_env),
        "driver": {"name": "tart", "version": env!("CARGO_PKG_VERSION")},
    });
    println!("{}", serde_json::to_string_pretty(&config)?);
    Ok(())
}

/// `$VAR` and `${VAR}` replaced as Go's `os.ExpandEnv` does (unset: empty).
fn expand(path: &str) -> String {
    shellexpand::env_with_context_no_errors(path, |name| Some(std::env::var(name).unwrap_or_default())).into_owned()
}

fn make_private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create {}", dir.display()))
}
