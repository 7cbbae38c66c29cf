mod agent;
mod archive;
mod doctor;
mod image;
mod info;
mod lifecycle;
mod meta;
mod prune;
mod registry;
mod run;

use std::process::ExitCode;

use anyhow::Result;
use tart_home::TartHome;
use tart_oci::{OciCache, RemoteName};

use crate::cli::Command;

pub fn run(command: Command) -> Result<ExitCode> {
    let home = match &command {
        Command::Completions(args) => return meta::completions(args),
        Command::Manpage => return meta::manpage(),
        _ => TartHome::from_env()?,
    };
    if command.runs_tmp_gc() {
        if let Err(err) = home.gc_tmp() {
            eprintln!("Failed to perform garbage collection: {err}");
        }
    }
    // Taps, rules, reservations and leases of VMs whose `tart run` was killed.
    if let Err(err) = tart_net::collect_stale_attachments() {
        eprintln!("Failed to clean up the network of a VM that is gone: {err}");
    }
    let ctx = Context {
        cache: OciCache::new(home.oci_cache_dir()),
        home,
    };
    match command {
        Command::Create(args) => lifecycle::create(&ctx, &args),
        Command::Clone(args) => lifecycle::clone(&ctx, &args),
        Command::Set(args) => lifecycle::set(&ctx, &args),
        Command::Rename(args) => lifecycle::rename(&ctx, &args),
        Command::Delete(args) => lifecycle::delete(&ctx, &args),
        Command::Stop(args) => lifecycle::stop(&ctx, &args),
        Command::Get(args) => info::get(&ctx, &args),
        Command::List(args) => info::list(&ctx, &args),
        Command::Fqn(args) => info::fqn(&ctx, &args),
        Command::Prune(args) => prune::prune(&ctx, &args),
        Command::Run(args) => return run::run(&ctx, &args),
        Command::Login(args) => registry::login(&ctx, &args),
        Command::Logout(args) => registry::logout(&ctx, &args),
        Command::Ip(args) => agent::ip(&ctx, &args),
        Command::Exec(args) => return agent::exec(&ctx, &args),
        Command::Pull(args) => registry::pull(&ctx, &args),
        Command::Push(args) => registry::push(&ctx, &args),
        Command::Import(args) => archive::import(&ctx, &args),
        Command::Export(args) => archive::export(&ctx, &args),
        Command::Doctor(args) => return doctor::doctor(&ctx, &args),
        Command::Suspend(args) => run::suspend(&ctx, &args),
        Command::Completions(_) | Command::Manpage => unreachable!("handled before TART_HOME is opened"),
    }?;
    Ok(ExitCode::SUCCESS)
}

pub struct Context {
    pub home: TartHome,
    pub cache: OciCache,
}

/// A VM argument that may name a local VM or an image in a registry.
pub enum VmName {
    Local(String),
    Remote(RemoteName),
}

/// Anything that parses as a remote name is one (Tart's rule); a name with a `/` that does
/// not parse is reported with the parser's reason rather than as a bad local name.
pub fn parse_vm_name(name: &str) -> Result<VmName> {
    match name.parse::<RemoteName>() {
        Ok(remote) => Ok(VmName::Remote(remote)),
        Err(err) if name.contains('/') => Err(err.into()),
        Err(_) => Ok(VmName::Local(name.to_owned())),
    }
}
