//! Commands that talk to registries: pull, push, login, logout, and the pull inside clone.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};

use anyhow::{bail, Context as _, Result};
use tart_credentials::{Credentials, Store};
use tart_oci::pull::PullOptions;
use tart_oci::push::PushOptions;
use tart_oci::registry::{Connection, Registry};
use tart_oci::{Reference, RemoteName};

use super::{parse_vm_name, Context, VmName};
use crate::cli::{ImageArch, LoginArgs, LogoutArgs, PullArgs, PullFlags, PushArgs, RegistryArgs};
use crate::progress::CliProgress;
use crate::UsageError;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

fn connection(args: &RegistryArgs) -> Connection {
    Connection {
        insecure: args.insecure,
        ca_certs: args.ca_cert.clone(),
    }
}

fn credential_store(ctx: &Context) -> Store {
    Store::new(ctx.home.root().join("credentials.json"))
}

/// Credentials for `host` from the environment, Docker's config or `tart login`. A failing
/// source is reported and we go on anonymously, as Tart does.
fn credentials_for(ctx: &Context, host: &str) -> Option<tart_oci::registry::Credentials> {
    match tart_credentials::lookup(host, &credential_store(ctx)) {
        Ok(Some((found, _))) => Some(tart_oci::registry::Credentials {
            username: found.username,
            password: found.password,
        }),
        Ok(None) => None,
        Err(err) => {
            eprintln!("Failed to retrieve credentials, authentication may fail: {err}");
            None
        }
    }
}

fn registry_for(ctx: &Context, name: &RemoteName, args: &RegistryArgs, chunk_size: usize) -> Result<Registry> {
    Registry::new(
        &name.host,
        &name.namespace,
        &connection(args),
        credentials_for(ctx, &name.host),
        chunk_size,
    )
}

pub fn pull(ctx: &Context, args: &PullArgs) -> Result<()> {
    if ctx.home.local_vm(&args.remote_name).is_ok_and(|vm| vm.is_initialized()) {
        println!("\"{}\" is a local image, nothing to pull here!", args.remote_name);
        return Ok(());
    }
    let name: RemoteName = args.remote_name.parse()?;
    pull_remote(ctx, &name, &args.flags)?;
    Ok(())
}

/// Pulls `name` into the OCI cache (used by `pull` and by `clone` of an uncached image).
pub fn pull_remote(ctx: &Context, name: &RemoteName, flags: &PullFlags) -> Result<tart_home::VmDir> {
    println!("pulling {name}...");
    let registry = registry_for(ctx, name, &flags.registry, 0)?;
    let options = PullOptions {
        concurrency: flags.concurrency as usize,
        auto_prune: std::env::var_os("TART_NO_AUTO_PRUNE").is_none(),
        arch: flags.arch.map(|arch| match arch {
            ImageArch::Amd64 => tart_home::Arch::Amd64,
            ImageArch::Arm64 => tart_home::Arch::Arm64,
        }),
        containerdisk_path: flags.containerdisk_path.clone(),
    };
    let progress = CliProgress::new();
    runtime()?.block_on(tart_oci::pull::pull(
        &ctx.home, &ctx.cache, &registry, name, &options, &progress,
    ))
}

pub fn push(ctx: &Context, args: &PushArgs) -> Result<()> {
    let targets: Vec<RemoteName> = args
        .remote_names
        .iter()
        .map(|n| n.parse::<RemoteName>())
        .collect::<Result<_, _>>()?;
    let labels = parse_labels(&args.label);
    let progress = CliProgress::new();
    let runtime = runtime()?;

    // Group the targets by repository: each repository gets the image once, then its tags.
    let mut groups: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for target in &targets {
        groups
            .entry((target.host.clone(), target.namespace.clone()))
            .or_default()
            .push(target.reference.value().to_owned());
    }

    match parse_vm_name(&args.local_name)? {
        VmName::Remote(source) => {
            let digest = ctx
                .cache
                .fqn(&source)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{source} is not in the local OCI cache: pull it first"))?;
            let Reference::Digest(digest) = digest.reference else {
                unreachable!("fqn resolves to a digest")
            };
            for ((host, namespace), references) in &groups {
                print_group(&args.local_name, host, namespace, references);
                let name = RemoteName {
                    host: host.clone(),
                    namespace: namespace.clone(),
                    reference: Reference::Digest(digest.clone()),
                };
                let registry = registry_for(ctx, &name, &args.registry, 0)?;
                runtime.block_on(tart_oci::push::retag(&registry, &digest, references, &progress))?;
            }
        }
        VmName::Local(local) => {
            let vm = ctx.home.existing_local_vm(&local)?;
            let _not_running = vm.lock_not_running(&local)?;
            vm.set_access_date(tart_home::AccessDate::Now)?;
            for ((host, namespace), references) in &groups {
                print_group(&local, host, namespace, references);
                let name = RemoteName {
                    host: host.clone(),
                    namespace: namespace.clone(),
                    reference: Reference::Tag(references[0].clone()),
                };
                let chunk_size = args.chunk_size.saturating_mul(1_000_000);
                let registry = registry_for(ctx, &name, &args.registry, chunk_size)?;
                let options = PushOptions {
                    concurrency: args.concurrency as usize,
                    chunk_size,
                    labels: labels.clone(),
                    mount_from: ctx.cache.blob_sources(host),
                    spill_dir: ctx.home.tmp_dir(),
                };
                let pushed =
                    runtime.block_on(tart_oci::push::push_vm(&registry, &vm, references, &options, &progress))?;
                if args.populate_cache {
                    let tags: Vec<RemoteName> = references
                        .iter()
                        .map(|r| RemoteName {
                            reference: if r.starts_with("sha256:") {
                                Reference::Digest(r.clone())
                            } else {
                                Reference::Tag(r.clone())
                            },
                            ..name.clone()
                        })
                        .collect();
                    ctx.cache
                        .populate(
                            &ctx.home,
                            &vm,
                            &name.with_digest(&pushed.digest),
                            &pushed.manifest,
                            &tags,
                        )
                        .context("failed to populate the OCI cache")?;
                }
            }
        }
    }
    Ok(())
}

fn print_group(source: &str, host: &str, namespace: &str, references: &[String]) {
    let refs = if references.len() == 1 {
        format!(":{}", references[0])
    } else {
        format!(
            "{{{}}}",
            references.iter().map(|r| format!(":{r}")).collect::<Vec<_>>().join(",")
        )
    };
    println!("pushing {source} to {host}/{namespace}{refs}...");
}

/// `--label key=value`: split at the first `=`, trimmed, empty keys ignored (as Tart does).
fn parse_labels(labels: &[String]) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter_map(|label| {
            let label = label.trim();
            let (key, value) = label.split_once('=').unwrap_or((label, ""));
            (!key.is_empty()).then(|| (key.to_owned(), value.to_owned()))
        })
        .collect()
}

fn check_host(host: &str) -> Result<()> {
    let probe = format!("{host}/probe");
    if host.starts_with("http://") || host.starts_with("https://") || probe.parse::<RemoteName>().is_err() {
        return Err(UsageError(format!(
            "improperly formatted host \"{host}\" was provided, make sure that it doesn't start with http:// or https://"
        ))
        .into());
    }
    Ok(())
}

pub fn login(ctx: &Context, args: &LoginArgs) -> Result<()> {
    check_host(&args.host)?;
    let (username, password) = match (&args.username, args.password_stdin) {
        (Some(username), true) => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("failed to read the password from stdin")?;
            (username.clone(), password.trim_end_matches(['\n', '\r']).to_owned())
        }
        (None, false) if std::io::stdin().is_terminal() => {
            eprint!("User: ");
            let mut username = String::new();
            std::io::stdin().read_line(&mut username)?;
            let password = rpassword::prompt_password("Password: ")?;
            (username.trim_end_matches(['\n', '\r']).to_owned(), password)
        }
        (None, false) => bail!("no terminal to ask for credentials: use --username and --password-stdin"),
        _ => return Err(UsageError("both --username and --password-stdin are required".into()).into()),
    };
    let credentials = tart_oci::registry::Credentials { username, password };
    if !args.no_validate {
        let probe: RemoteName = format!("{}/tart-login-probe", args.host).parse()?;
        let registry = Registry::new(
            &probe.host,
            &probe.namespace,
            &connection(&args.registry),
            Some(credentials.clone()),
            0,
        )?;
        runtime()?
            .block_on(registry.ping())
            .map_err(|err| anyhow::anyhow!("invalid credentials: {err:#}"))?;
    }
    credential_store(ctx).set(
        &args.host,
        &Credentials {
            username: credentials.username,
            password: credentials.password,
        },
    )?;
    println!("Login succeeded");
    Ok(())
}

pub fn logout(ctx: &Context, args: &LogoutArgs) -> Result<()> {
    check_host(&args.host)?;
    credential_store(ctx).remove(&args.host)?;
    Ok(())
}
