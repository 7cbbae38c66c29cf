//! The networks of `tart run` on Linux.
//!
//! * **Shared NAT** (the default, like macOS vmnet's "shared" mode, 192.168.64.0/24): a Linux
//!   bridge, `tart0`, holding the gateway address (`.1`); `dnsmasq` bound to that bridge only for
//!   DHCP and DNS; one nftables table of our own (`ip tart`, plus `bridge tart` for per-VM
//!   filtering) masquerading the subnet; one tap per VM NIC on the bridge. See [`SharedNetwork`].
//! * **Softnet** and **host-only** VMs sit on the same bridge with a reserved address and
//!   per-VM rules: Softnet VMs reach DHCP/DNS and the outside world but not other VMs, the host
//!   or private ranges (unless allowed); host-only VMs reach the host and other VMs but nothing
//!   beyond. Both can send only with their own MAC and address.
//! * **Bridged**: a tap on an existing host bridge, or a macvtap on a physical interface.
//!
//! Taps are not persistent: they vanish with the last descriptor (QEMU's and ours), so a
//! SIGKILLed `tart run` leaves none. What outlives a process (nftables rules, DHCP reservations
//! and leases, macvtaps) is written down in an attachment record locked by the `tart run` that
//! owns it; any later `tart` command removes what belongs to records nobody holds
//! ([`collect_stale_attachments`]).
//!
//! Everything that changes the host's network needs CAP_NET_ADMIN; the functions here say so
//! up front instead of failing halfway.

mod attachment;
mod forward;
mod interfaces;
mod leases;
mod nft;
mod policy;
mod programs;
mod routes;
mod settings;
mod shared;
mod state;
mod tap;

pub use attachment::{collect_stale_attachments, on_shared_network, Attachment};
pub use forward::PortForwarder;
pub use interfaces::{bridgeable_interfaces, describe_interface, Interface, InterfaceKind};
pub use leases::{lease_for, Lease};
pub use policy::{parse_cidrs, parse_port_forwards, Cidr, SoftnetPolicy};
pub use programs::{program, SHARED_NETWORK_PROGRAMS};
pub use routes::{overlapping_routes, Route};
pub use settings::{Settings, SETTINGS_FILE};
pub use shared::{has_net_admin, Isolation, SharedNetwork, BRIDGE};
pub use state::{StateDir, STATE_DIR_ENV};

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} needs CAP_NET_ADMIN: run tart as root, or use --net-user for user-mode networking")]
    NeedsPrivileges { what: String },
    #[error("{program} not found in PATH: install Debian's {package} package (apt-get install {package})")]
    MissingProgram {
        program: &'static str,
        package: &'static str,
    },
    #[error("{command} failed: {output}")]
    CommandFailed { command: String, output: String },
    #[error("invalid network settings in {file}: {reason}")]
    InvalidSettings { file: String, reason: String },
    #[error("the subnet {subnet} is already used by {interface} on this host; choose another one in {file}")]
    SubnetInUse {
        subnet: String,
        interface: String,
        file: String,
    },
    #[error(
        "the shared network runs with subnet {running}, but {file} asks for {wanted}; stop its {vms} running VM(s) \
         to change it"
    )]
    SubnetBusy {
        running: String,
        wanted: String,
        file: String,
        vms: usize,
    },
    #[error("no free address left for another Softnet or host-only VM in {subnet} ({reserved} are in use)")]
    NoAddressLeft { subnet: String, reserved: usize },
    #[error("{0}")]
    Interface(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(transparent)]
    Home(#[from] tart_home::Error),
}

pub(crate) fn io_context<C: Into<String>>(context: C) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io {
        context: context.into(),
        source,
    }
}
