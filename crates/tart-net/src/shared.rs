//! Bringing up (idempotently) the shared network: bridge, addresses, forwarding, nftables base
//! rules and dnsmasq; and attaching a VM to it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tart_home::MacAddress;

use crate::attachment::{collect_locked, live_on_shared_bridge, Attachment, Kind, Record};
use crate::policy::{Cidr, SoftnetPolicy};
use crate::programs::{ip_output, nft, program, run_ip, SHARED_NETWORK_PROGRAMS};
use crate::settings::{Settings, SETTINGS_FILE};
use crate::state::StateDir;
use crate::tap::create_tap;
use crate::{io_context, leases, nft as rules, Error, Result};

/// The bridge of the shared network (vmnet calls its own `bridge100`).
pub const BRIDGE: &str = "tart0";

/// How a VM on the shared bridge is confined beyond the plain NAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// The plain NAT: the outside world, the host (at the gateway and its other addresses) and
    /// the other VMs.
    None,
    /// Softnet: DHCP/DNS of the gateway and the public Internet only, no other VM, plus what
    /// the policy allows (blocked ranges win).
    Softnet(SoftnetPolicy),
    /// Host-only: the host and other VMs, nothing forwarded beyond.
    HostOnly,
}

/// The shared network, up and running.
#[derive(Debug)]
pub struct SharedNetwork {
    settings: Settings,
    state: StateDir,
}

/// Whether this process may create interfaces and rules (CAP_NET_ADMIN in its namespace).
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

impl SharedNetwork {
    /// Makes sure the bridge, the rules and dnsmasq are there and match `$TART_HOME/network.json`,
    /// creating what is missing. Serialised by the state directory's lock, so two `tart run`s
    /// starting together do it once; attachments of dead `tart run`s are removed first.
    pub fn ensure(home: &Path) -> Result<SharedNetwork> {
        if !has_net_admin() {
            return Err(Error::NeedsPrivileges {
                what: "the shared network".into(),
            });
        }
        let settings = Settings::load(home)?;
        for (name, package) in SHARED_NETWORK_PROGRAMS {
            program(name, package)?;
        }
        let state = StateDir::locate();
        let _lock = state.lock()?;
        collect_locked(&state)?;
        let live = live_on_shared_bridge(&state);
        let settings_file = home.join(SETTINGS_FILE).display().to_string();
        configure_bridge(&settings, live, &settings_file)?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io_context(
            "failed to enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)",
        ))?;
        nft(&rules::base(BRIDGE, settings.subnet))?;
        ensure_dnsmasq(&settings, &state, live, &settings_file)?;
        Ok(SharedNetwork { settings, state })
    }

    /// A new tap on the bridge for the VM `vm` with `mac`, confined as `isolation` says:
    /// Softnet and host-only VMs get a reserved address and their rules before they boot.
    pub fn attach(&self, vm: &str, mac: MacAddress, isolation: &Isolation) -> Result<Attachment> {
        let _lock = self.state.lock()?;
        let (tap, port) = create_tap("tarttap%d", BRIDGE)?;
        let kind = match isolation {
            Isolation::None => Kind::Nat,
            Isolation::Softnet(_) => Kind::Softnet,
            Isolation::HostOnly => Kind::HostOnly,
        };
        // Softnet and host-only VMs need their address in their rules, before they boot.
        let ip = match isolation {
            Isolation::None => None,
            _ => Some(free_address(&self.settings, &self.state, &mac.to_string())?),
        };
        let record = Record {
            vm: vm.to_owned(),
            mac: mac.to_string(),
            kind,
            port: port.clone(),
            ip,
        };
        // Written down first, so that whatever follows fails or is interrupted, the next
        // `tart` command finds the record and undoes it.
        let attachment = Attachment::new(tap, record, &self.state)?;
        if let Some(ip) = ip {
            let file = self.state.hosts_dir().join(&port);
            std::fs::write(&file, format!("{mac},{ip}\n"))
                .map_err(io_context(format!("failed to write {}", file.display())))?;
            if let Some(script) = rules::add_vm(&port, mac, ip, self.settings.gateway(), isolation) {
                nft(&script)?;
            }
        }
        Ok(attachment)
    }
}

/// Creates the bridge if needed and gives it the gateway address. The subnet must be free on
/// the host's other interfaces: an address of it elsewhere means another network (libvirt,
/// Docker, a VPN) uses it, and routing would break both.
fn configure_bridge(settings: &Settings, live: usize, settings_file: &str) -> Result<()> {
    let wanted = format!("{}/{}", settings.gateway(), settings.subnet.prefix);
    let exists = Path::new("/sys/class/net").join(BRIDGE).exists();
    let current: Vec<String> = if exists {
        ipv4_addresses()?
            .into_iter()
            .filter(|(interface, _)| interface == BRIDGE)
            .map(|(_, address)| address)
            .collect()
    } else {
        Vec::new()
    };
    if current != [wanted.clone()] {
        if live > 0 {
            if let Some(running) = current.first() {
                return Err(Error::SubnetBusy {
                    running: running.clone(),
                    wanted,
                    file: settings_file.to_owned(),
                    vms: live,
                });
            }
        }
        check_subnet_free(settings.subnet, settings_file)?;
        if exists {
            run_ip(&["addr", "flush", "dev", BRIDGE])?;
        } else {
            run_ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        }
        run_ip(&["addr", "add", &wanted, "dev", BRIDGE])?;
    }
    run_ip(&["link", "set", BRIDGE, "up"])
}

/// `(interface, "a.b.c.d/N")` for every IPv4 address of this host.
fn ipv4_addresses() -> Result<Vec<(String, String)>> {
    // "2: eth0    inet 10.0.2.15/24 brd ..."
    Ok(ip_output(&["-4", "-o", "addr", "show"])?
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let interface = fields.get(1)?.trim_end_matches(':');
            let interface = interface.split('@').next().unwrap_or(interface);
            Some((interface.to_owned(), (*fields.get(3)?).to_owned()))
        })
        .collect())
}

fn check_subnet_free(subnet: Cidr, settings_file: &str) -> Result<()> {
    for (interface, address) in ipv4_addresses()? {
        let Some(theirs) = Cidr::enclosing(&address) else {
            continue;
        };
        if interface != BRIDGE && subnet.overlaps(&theirs) {
            return Err(Error::SubnetInUse {
                subnet: subnet.to_string(),
                interface,
                file: settings_file.to_owned(),
            });
        }
    }
    Ok(())
}

/// The first address of the reserved range that no reservation and no other client's lease
/// holds. Reservations are files in dnsmasq's hosts directory, which it reads as they appear.
fn free_address(settings: &Settings, state: &StateDir, mac: &str) -> Result<Ipv4Addr> {
    let hosts = state.hosts_dir();
    let mut taken: Vec<Ipv4Addr> = std::fs::read_dir(&hosts)
        .map_err(io_context(format!("failed to read {}", hosts.display())))?
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter_map(|line| line.trim().rsplit(',').next()?.parse().ok())
        .collect();
    taken.extend(
        leases::current_leases(&state.lease_file())
            .into_iter()
            .filter(|lease| lease.mac != mac)
            .map(|lease| lease.ip),
    );
    settings
        .reserved_range()
        .find(|ip| !taken.contains(ip))
        .ok_or_else(|| Error::NoAddressLeft {
            subnet: settings.subnet.to_string(),
            reserved: taken.len(),
        })
}

/// dnsmasq runs as a daemon shared by all VMs: kept when it runs with the wanted arguments,
/// restarted when the settings changed and no VM uses it.
fn ensure_dnsmasq(settings: &Settings, state: &StateDir, live: usize, settings_file: &str) -> Result<()> {
    let (first, last) = settings.dynamic_range();
    let args = vec![
        "--conf-file=/dev/null".to_owned(),
        format!("--interface={BRIDGE}"),
        "--bind-interfaces".to_owned(),
        format!("--listen-address={}", settings.gateway()),
        format!(
            "--dhcp-range={first},{last},{},{}s",
            settings.netmask(),
            settings.lease_seconds
        ),
        "--dhcp-authoritative".to_owned(),
        // No ping of an address before offering it (a 3 s wait per new lease, seen in tests):
        // only tart's VMs, whose leases dnsmasq knows, are on the bridge.
        "--no-ping".to_owned(),
        format!("--dhcp-hostsdir={}", state.hosts_dir().display()),
        format!("--dhcp-leasefile={}", state.lease_file().display()),
        format!("--pid-file={}", state.pid_file().display()),
        format!("--log-facility={}", state.log_file().display()),
    ];
    if let Some((pid, running)) = state.running_dnsmasq() {
        if running == args {
            return Ok(());
        }
        if live > 0 {
            let range = running
                .iter()
                .find_map(|arg| arg.strip_prefix("--dhcp-range="))
                .unwrap_or("other settings");
            return Err(Error::SubnetBusy {
                running: range.to_owned(),
                wanted: settings.subnet.to_string(),
                file: settings_file.to_owned(),
                vms: live,
            });
        }
        stop_process(pid);
    }
    let dnsmasq = program("dnsmasq", "dnsmasq-base")?;
    // dnsmasq forks into the background once it is ready and reports start-up errors itself;
    // its output goes to a file, not a pipe that the daemon would keep open.
    let startup_log = state.path().join("dnsmasq.startup.log");
    let log = std::fs::File::create(&startup_log)
        .map_err(io_context(format!("failed to create {}", startup_log.display())))?;
    let status = Command::new(&dnsmasq)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .map_err(io_context("failed to run dnsmasq"))?;
    if !status.success() {
        let output = std::fs::read_to_string(&startup_log).unwrap_or_default();
        return Err(Error::CommandFailed {
            command: format!("dnsmasq (for {BRIDGE})"),
            output: output.trim().to_owned(),
        });
    }
    Ok(())
}

fn stop_process(pid: libc::pid_t) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
