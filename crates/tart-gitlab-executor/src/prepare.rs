//! The `prepare` stage: the job's VM pulled, cloned, configured, started detached, reachable by
//! SSH, with the shared builds and cache directories mounted.

use std::io::Write as _;
use std::process::Stdio;

use anyhow::{anyhow, bail, Context as _, Result};
use globset::GlobBuilder;

use crate::gitlab::Job;
use crate::settings::{self, Settings};
use crate::ssh::Ssh;
use crate::tart::{follow, Tart};
use crate::vm::Vm;

#[derive(clap::Args)]
pub struct Args {
    /// VMs this host runs at once, which "auto" --cpu and --memory divide the host by
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// CPUs of the VM: a number, or "auto"
    #[arg(long)]
    cpu: Option<String>,
    /// Memory of the VM in MiB: a number, or "auto"
    #[arg(long)]
    memory: Option<String>,
    /// A --dir argument for "tart run" (repeatable)
    #[arg(long)]
    dir: Vec<String>,
    /// A --disk argument for "tart run" (repeatable)
    #[arg(long)]
    disk: Vec<String>,
    /// Whether tart may prune its caches when cloning (false sets TART_NO_AUTO_PRUNE)
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    auto_prune: bool,
    /// Only run images matching this glob ("*" stops at "/", "**" does not; repeatable)
    #[arg(long)]
    allow_image: Vec<String>,
    /// The image of jobs that name none
    #[arg(long)]
    default_image: Option<String>,
    /// Run the VM with nested virtualization
    #[arg(long)]
    nested: bool,
    /// KEY=VALUE added to the environment of "tart run" (repeatable)
    #[arg(long)]
    tart_run_env: Vec<String>,
}

pub fn prepare(args: &Args) -> Result<()> {
    let cpu = resource(args.cpu.as_deref(), "--cpu", || cpus() / args.concurrency)?;
    let memory = resource(args.memory.as_deref(), "--memory", || memory_mib() / args.concurrency)?;
    let mut tart_env = Vec::new();
    if !args.auto_prune {
        tart_env.push(("TART_NO_AUTO_PRUNE".to_owned(), "true".to_owned()));
    }
    let settings = Settings::from_env()?;
    let mut job = Job::from_env()?;
    if job.image.is_empty() {
        let Some(image) = &args.default_image else {
            bail!("\"prepare\" stage failed: the job names no image (CI_JOB_IMAGE) and no --default-image was set");
        };
        job.image = image.clone();
        eprintln!("No image provided, falling back to default: {image}");
    }
    ensure_allowed(&job.image, &args.allow_image)?;
    if settings.install_gitlab_runner.is_some() {
        bail!(
            "TART_EXECUTOR_INSTALL_GITLAB_RUNNER is not supported for Linux guests: install gitlab-runner in the image"
        );
    }
    let tart = Tart::find()?;
    let name = job.vm_name();
    remove_earlier_attempt(&tart, &name);

    let mut pull_env = tart_env.clone();
    pull_env.extend(job.registry_env());
    let mut pull_flags = Vec::new();
    if settings.insecure_pull {
        pull_flags.push("--insecure".to_owned());
    }
    if let Some(concurrency) = settings.pull_concurrency {
        pull_flags.extend(["--concurrency".to_owned(), concurrency.to_string()]);
    }
    if settings.always_pull {
        eprintln!("Pulling the latest version of {}...", job.image);
        let pull: Vec<String> = ["pull".to_owned(), job.image.clone()]
            .into_iter()
            .chain(pull_flags.clone())
            .collect();
        tart.exec(&pull, &pull_env)?;
    }
    eprintln!("Cloning a new VM...");
    let clone: Vec<String> = ["clone".to_owned(), job.image.clone(), name.clone()]
        .into_iter()
        .chain(pull_flags)
        .collect();
    tart.exec(&clone, &pull_env).context("failed to clone the VM")?;

    eprintln!("Configuring a new VM...");
    let set = |flag: &str, value: Option<String>| -> Result<()> {
        let args: Vec<String> = ["set".to_owned(), flag.to_owned()]
            .into_iter()
            .chain(value)
            .chain([name.clone()])
            .collect();
        tart.exec(&args, &tart_env).map(drop).context("failed to clone the VM")
    };
    if let Some(cpu) = cpu {
        set("--cpu", Some(cpu.to_string()))?;
    }
    if let Some(memory) = memory {
        set("--memory", Some(memory.to_string()))?;
    }
    if settings.random_mac {
        set("--random-mac", None)?;
    }
    if let Some(display) = &settings.display {
        set("--display", Some(display.clone()))?;
    }

    let run_log = job.run_log();
    let run = tart.start_detached(&run_args(args, &settings, &job), &run_env(args)?, &run_log)?;
    // cleanup kills it by this pid if it outlives a prepare killed before it could register.
    std::fs::write(job.run_pid_file(), run.id().to_string()).context("failed to record tart run's pid")?;
    follow(run_log.clone());
    let mut vm = Vm {
        tart: &tart,
        name: name.clone(),
        settings: &settings,
        run_log,
        run: Some(run),
    };
    eprintln!("Waiting for the VM to boot and be SSH-able...");
    let ssh = vm.connect()?;
    eprintln!("Was able to SSH!");

    let os = vm.os()?;
    if os != "darwin" {
        keep_user_manager(&ssh);
    }
    if let Some(timezone) = &settings.timezone {
        set_timezone(&ssh, &os, timezone)?;
    }
    let mounts = [
        ("buildsdir", settings::BUILDS_DIR_ON_HOST, settings::BUILDS_DIR),
        ("cachedir", settings::CACHE_DIR_ON_HOST, settings::CACHE_DIR),
    ];
    for (share, on_host, in_guest) in mounts {
        if std::env::var_os(on_host).is_none() {
            continue;
        }
        let path =
            std::env::var(in_guest).with_context(|| format!("{in_guest} is missing: did the config stage run?"))?;
        eprintln!("Mounting {share} on {path}...");
        let tag = format!("tart.virtiofs.{share}.{}", job.id);
        let path = shlex::try_quote(&path)?;
        let script = if os == "darwin" {
            format!("mkdir -p {path}\nmount_virtiofs {tag} {path}\n")
        } else {
            // virtiofsd applies the guest's uids to the host directory, which the config stage
            // made 0700 for the runner's user: the guest user takes the share over.
            format!(
                "set -e\nmkdir -p {path}\nsudo mount -t virtiofs {tag} {path}\n\
                 [ -w {path} ] || sudo chown \"$(id -u):$(id -g)\" {path}\n"
            )
        };
        shell(&ssh, &script).with_context(|| format!("failed to mount the {share} share"))?;
    }
    eprintln!("VM is ready.");
    Ok(())
}

/// GitLab Runner retries a failed prepare without a cleanup in between: the VM of an earlier
/// attempt would make this clone fail.
fn remove_earlier_attempt(tart: &Tart, name: &str) {
    if tart.exec(&["get", "--format", "json", name], &[]).is_ok() {
        eprintln!("Removing VM {name:?} left by an earlier attempt...");
        let _ = tart.exec(&["stop", name], &[]);
        if let Err(err) = tart.exec(&["delete", name], &[]) {
            eprintln!("Failed to delete VM: {err:#}");
        }
    }
}

fn run_args(args: &Args, settings: &Settings, job: &Job) -> Vec<String> {
    let mut run = vec!["run".to_owned()];
    if settings.softnet {
        run.push("--net-softnet".to_owned());
        if let Some(allow) = &settings.softnet_allow {
            run.extend(["--net-softnet-allow".to_owned(), allow.clone()]);
        }
    }
    if let Some(options) = &settings.root_disk_opts {
        run.extend(["--root-disk-opts".to_owned(), options.clone()]);
    }
    if let Some(interface) = &settings.bridged {
        run.extend(["--net-bridged".to_owned(), interface.clone()]);
    }
    if settings.headless {
        run.push("--no-graphics".to_owned());
    }
    if args.nested {
        run.push("--nested".to_owned());
    }
    for dir in &args.dir {
        run.extend(["--dir".to_owned(), dir.clone()]);
    }
    for disk in &args.disk {
        run.extend(["--disk".to_owned(), disk.clone()]);
    }
    for (share, on_host) in [
        ("buildsdir", settings::BUILDS_DIR_ON_HOST),
        ("cachedir", settings::CACHE_DIR_ON_HOST),
    ] {
        if let Ok(dir) = std::env::var(on_host) {
            run.extend([
                "--dir".to_owned(),
                format!("{dir}:tag=tart.virtiofs.{share}.{}", job.id),
            ]);
        }
    }
    run.push(job.vm_name());
    run
}

fn run_env(args: &Args) -> Result<Vec<(String, String)>> {
    args.tart_run_env
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(anyhow!("--tart-run-env {pair:?} is not KEY=VALUE")),
        })
        .collect()
}

fn ensure_allowed(image: &str, patterns: &[String]) -> Result<()> {
    if patterns.is_empty() {
        return Ok(());
    }
    for pattern in patterns {
        // doublestar's rules, which gitlab-tart-executor matches with: "*" stays within a path
        // component.
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .with_context(|| format!("--allow-image {pattern:?} is not a valid pattern"))?;
        if glob.compile_matcher().is_match(image) {
            return Ok(());
        }
    }
    bail!(
        "image {image:?} is disallowed by GitLab Runner configuration (allowed: {})",
        patterns.join(", ")
    )
}

/// A --cpu/--memory value: none, "auto" (computed), or a number.
fn resource(value: Option<&str>, flag: &str, auto: impl Fn() -> u64) -> Result<Option<u64>> {
    match value {
        None | Some("") => Ok(None),
        Some("auto") => Ok(Some(auto().max(1))),
        Some(number) => number
            .parse()
            .map(Some)
            .map_err(|_| anyhow!("{flag} {number:?} is neither a number nor \"auto\"")),
    }
}

fn cpus() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1)
}

fn memory_mib() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    u64::try_from(pages).unwrap_or(0) * u64::try_from(size).unwrap_or(0) / (1 << 20)
}

fn set_timezone(ssh: &Ssh, os: &str, timezone: &str) -> Result<()> {
    eprintln!("Setting timezone...");
    let timezone = if timezone == "auto" {
        host_timezone()?
    } else {
        timezone.to_owned()
    };
    let quoted = shlex::try_quote(&timezone)?;
    let command = if os == "darwin" {
        format!("sudo systemsetup settimezone {quoted}\n")
    } else {
        format!("sudo timedatectl set-timezone {quoted}\n")
    };
    shell(ssh, &command).context("failed to set the timezone")?;
    eprintln!("Timezone was set to {timezone}!");
    Ok(())
}

/// The host's zone name, from the `/etc/localtime` link.
fn host_timezone() -> Result<String> {
    let target = std::fs::read_link("/etc/localtime")
        .context("TART_EXECUTOR_TIMEZONE=auto: /etc/localtime is not a link into the zoneinfo database")?;
    let target = target.to_string_lossy();
    target
        .split_once("zoneinfo/")
        .map(|(_, zone)| zone.to_owned())
        .ok_or_else(|| anyhow!("TART_EXECUTOR_TIMEZONE=auto: cannot tell the zone of /etc/localtime -> {target}"))
}

/// Lingering for the SSH user: each stage is a new SSH session, and when one ends with no other
/// open, logind stops the user's systemd instance a few seconds later; a session that starts
/// while it stops is killed (ssh exits 255 with no message). Seen here: the runner's
/// sub-stage right after prepare_script died that way in 2 of 2 runs without it, in none with it.
fn keep_user_manager(ssh: &Ssh) {
    let script = "if command -v loginctl >/dev/null; then sudo -n loginctl enable-linger \"$(id -un)\"; fi\n";
    if let Err(err) = shell(ssh, script) {
        eprintln!("Could not keep the SSH user's systemd instance (loginctl enable-linger): {err:#}; stages may fail with status 255");
    }
}

/// `script` piped into the guest's `sh`, its output in the job log.
fn shell(ssh: &Ssh, script: &str) -> Result<()> {
    let mut child = ssh
        .command("sh")
        .stdin(Stdio::piped())
        .spawn()
        .context("failed to run ssh")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .context("failed to send the script to the guest")?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the guest's shell exited with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_images_follow_doublestar_rules() {
        let patterns = [
            "ghcr.io/cirruslabs/*".to_owned(),
            "registry.example.com/ci/**".to_owned(),
        ];
        for image in [
            "ghcr.io/cirruslabs/debian:latest",
            "registry.example.com/ci/linux/debian:12",
        ] {
            ensure_allowed(image, &patterns).unwrap();
        }
        for image in ["ghcr.io/cirruslabs/nested/debian:latest", "ghcr.io/other/debian:latest"] {
            let err = ensure_allowed(image, &patterns).unwrap_err().to_string();
            assert!(err.contains("is disallowed by GitLab Runner configuration"), "{err}");
        }
        ensure_allowed("anything", &[]).unwrap();
        assert!(ensure_allowed("x", &["[".to_owned()]).is_err());
    }

    #[test]
    fn cpu_and_memory_are_numbers_or_auto() {
        assert_eq!(resource(None, "--cpu", || 9).unwrap(), None);
        assert_eq!(resource(Some("4"), "--cpu", || 9).unwrap(), Some(4));
        assert_eq!(resource(Some("auto"), "--cpu", || 0).unwrap(), Some(1));
        let err = resource(Some("lots"), "--memory", || 9).unwrap_err().to_string();
        assert_eq!(err, "--memory \"lots\" is neither a number nor \"auto\"");
    }
}
