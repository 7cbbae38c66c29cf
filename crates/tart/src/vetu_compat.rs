//! `vetu` mode. On Linux hosts Orchard's worker runs Cirrus Labs' `vetu` instead of `tart` (a
//! GOOS switch, no setting), and so does cirrus-cli's vetu isolation. Installed or symlinked as
//! `vetu`, this binary takes their command lines with vetu's flags and answers as vetu does (exit
//! status 1 for every failure, the reason on the first line of stderr), doing the work with
//! tart's own commands on the same VMs, so an unmodified worker drives a Linux host running tart.
//!
//! Units are the same in both tools (`--memory` in MiB, `--disk-size` in GB of 10^9 bytes), so each
//! vetu command line becomes a tart command line, parsed by tart's own parser: nothing here repeats
//! what a tart command does.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tart_home::TartHome;

use crate::cli::Cli;

/// vetu exits with this status for every error, usage errors included (Go's `log.Fatal`).
const EXIT_FAILURE: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "vetu",
    version,
    about = "tart in vetu mode: vetu's command lines (Orchard workers, cirrus-cli) on tart's VMs"
)]
struct Vetu {
    #[command(subcommand)]
    command: VetuCommand,
}

#[derive(Subcommand, Debug)]
enum VetuCommand {
    /// Clone a VM (pulls a remote one first)
    Clone {
        name: String,
        local_name: String,
        #[command(flatten)]
        registry: Registry,
    },
    /// Pull a VM from a registry
    Pull {
        remote_name: String,
        #[command(flatten)]
        registry: Registry,
    },
    /// Get a fully-qualified VM name
    #[command(hide = true)]
    Fqn { name: String },
    /// Modify a VM's configuration
    Set(SetArgs),
    /// Run a VM (headless; stop it with SIGINT or `vetu stop`)
    Run(RunArgs),
    /// Get a VM's IP address
    Ip {
        name: String,
        /// Seconds to wait for a booting VM's address
        #[arg(long, default_value_t = 0)]
        wait: u16,
    },
    /// Stop a VM
    Stop {
        name: String,
        /// Seconds to wait for graceful termination before killing the VM
        #[arg(long, default_value_t = 30)]
        timeout: u16,
    },
    /// Delete VMs
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List VMs
    List {
        /// Only VMs from this source: local or oci
        #[arg(long)]
        source: Option<String>,
        /// Only display VM names
        #[arg(short, long)]
        quiet: bool,
        /// text or json (vetu itself has no --format, but Orchard asks for JSON)
        #[arg(long)]
        format: Option<String>,
    },
    /// Log in to a registry
    Login {
        host: String,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Log out from a registry
    Logout { host: String },
}

#[derive(Args, Debug)]
struct Registry {
    /// Layers to download in parallel
    #[arg(long)]
    concurrency: Option<u32>,
    /// Connect to the registry over plain HTTP
    #[arg(long)]
    insecure: bool,
}

#[derive(Args, Debug)]
struct SetArgs {
    name: String,
    // Wider than vetu's uint8 and uint16 (its limits of 255 CPUs and 64 GiB are Go types, not
    // choices): tart's own types.
    /// Number of VM CPUs
    #[arg(long)]
    cpu: Option<u16>,
    /// Memory in MiB
    #[arg(long)]
    memory: Option<u64>,
    /// Grow the VM's disk to this many GB (10^9 bytes)
    #[arg(long)]
    disk_size: Option<u16>,
}

#[derive(Args, Debug)]
struct RunArgs {
    name: String,
    /// Attach the VM to this bridge (or a macvtap on this interface)
    #[arg(long, value_name = "interface")]
    net_bridged: Option<String>,
    /// Host-only networking: the VM reaches the host, and the host the VM
    #[arg(long, conflicts_with = "net_bridged")]
    net_host: bool,
    /// MTU of the host-only network (not supported: tart's is 1500, and this is ignored)
    #[arg(long, value_name = "bytes")]
    net_host_mtu: Option<u16>,
}

/// Runs vetu's command line `args` (`args[0]` is the program name).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let vetu: Vetu = match crate::parse(args, EXIT_FAILURE) {
        Ok(vetu) => vetu,
        Err(code) => return code,
    };
    // vetu's own variable for where its VMs live; tart's wins when both are set.
    if let Some(home) = std::env::var_os("VETU_HOME").filter(|_| std::env::var_os("TART_HOME").is_none()) {
        std::env::set_var("TART_HOME", home);
    }
    let tart_args = vetu.command.into_tart_args();
    // A value vetu would take but tart refuses (e.g. an unknown --source) fails with tart's reason.
    let cli: Cli = match crate::parse(&tart_args, EXIT_FAILURE) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match crate::commands::run(cli.command) {
        Ok(code) if code == ExitCode::SUCCESS => code,
        Ok(_) => ExitCode::from(EXIT_FAILURE),
        Err(err) => {
            eprintln!("{err:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

impl VetuCommand {
    /// The tart command line that does what this vetu command does.
    fn into_tart_args(self) -> Vec<String> {
        let mut args = vec!["tart".to_owned()];
        let mut push = |items: &[&str]| args.extend(items.iter().map(|item| (*item).to_owned()));
        match self {
            VetuCommand::Clone {
                name,
                local_name,
                registry,
            } => {
                push(&["clone", &name, &local_name]);
                registry.push_to(&mut push);
            }
            VetuCommand::Pull { remote_name, registry } => {
                push(&["pull", &remote_name]);
                registry.push_to(&mut push);
            }
            VetuCommand::Fqn { name } => push(&["fqn", &name]),
            VetuCommand::Set(set) => {
                push(&["set", &set.name]);
                for (flag, value) in [
                    ("--cpu", set.cpu.map(u64::from)),
                    ("--memory", set.memory),
                    ("--disk-size", set.disk_size.map(u64::from)),
                ] {
                    if let Some(value) = value {
                        push(&[flag, &value.to_string()]);
                    }
                }
            }
            VetuCommand::Run(run) => {
                // vetu has no display at all.
                push(&["run", "--no-graphics"]);
                if let Some(interface) = &run.net_bridged {
                    push(&["--net-bridged", interface]);
                }
                if run.net_host {
                    push(&["--net-host"]);
                }
                // On stdout, like tart's other notes: integrations report the first line of
                // stderr when the run fails, which must be the reason.
                if let Some(mtu) = run.net_host_mtu {
                    println!("--net-host-mtu {mtu} is ignored: tart's host-only network has an MTU of 1500");
                }
                push(&[&run.name]);
            }
            VetuCommand::Ip { name, wait } => {
                let resolver = ip_resolver(&name);
                push(&["ip", "--wait", &wait.to_string(), "--resolver", resolver, &name]);
            }
            VetuCommand::Stop { name, timeout } => push(&["stop", "--timeout", &timeout.to_string(), &name]),
            VetuCommand::Delete { names } => {
                push(&["delete"]);
                push(&names.iter().map(String::as_str).collect::<Vec<_>>());
            }
            VetuCommand::List { source, quiet, format } => {
                push(&["list"]);
                if let Some(source) = &source {
                    push(&["--source", source]);
                }
                if quiet {
                    push(&["--quiet"]);
                }
                if let Some(format) = &format {
                    push(&["--format", format]);
                }
            }
            VetuCommand::Login {
                host,
                username,
                password_stdin,
            } => {
                push(&["login", &host]);
                if let Some(username) = &username {
                    push(&["--username", username]);
                }
                if password_stdin {
                    push(&["--password-stdin"]);
                }
            }
            VetuCommand::Logout { host } => push(&["logout", &host]),
        }
        args
    }
}

impl Registry {
    fn push_to(&self, push: &mut impl FnMut(&[&str])) {
        if let Some(concurrency) = self.concurrency {
            push(&["--concurrency", &concurrency.to_string()]);
        }
        if self.insecure {
            push(&["--insecure"]);
        }
    }
}

/// vetu reads the host's neighbour table, which has a VM on the shared network only once it has
/// talked to the host; tart's DHCP leases have it as soon as it has an address. So: the leases,
/// unless the VM runs bridged, where only ARP can tell. `vetu run` passes no network flag, so a
/// running VM off the shared network is bridged, or on user-mode networking because tart may not
/// manage interfaces here; the leases' answer explains the latter.
fn ip_resolver(name: &str) -> &'static str {
    let off_shared_network = TartHome::from_env()
        .and_then(|home| home.existing_local_vm(name))
        .ok()
        .filter(|vm| vm.running_pid().is_some())
        .and_then(|vm| vm.config().ok())
        .is_some_and(|config| !tart_net::on_shared_network(config.mac_address));
    if off_shared_network && tart_net::has_net_admin() {
        "arp"
    } else {
        "dhcp"
    }
}
