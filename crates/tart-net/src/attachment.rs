//! A VM's NIC attachment and its record.
//!
//! Whatever outlives the process that made it (nftables rules, a DHCP reservation and lease, a
//! macvtap) is written down first in `attachments/<port>.json` under the state directory, and
//! that file stays `flock`ed by the `tart run` that owns it. When the VM stops, the attachment
//! undoes it all and deletes the record; when `tart run` was killed instead, the lock is gone
//! and the next `tart` command ([`collect_stale_attachments`]) undoes it from the record.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tart_home::{FileLock, MacAddress};
use tart_qemu::{NetworkAttachment, TapDevice};

use crate::interfaces::{describe_interface, InterfaceKind};
use crate::programs::{nft, program};
use crate::shared::{has_net_admin, BRIDGE};
use crate::state::StateDir;
use crate::tap::{create_macvtap, create_tap, delete_link};
use crate::{io_context, leases, nft as rules, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// A tap on the shared bridge, plain NAT.
    Nat,
    Softnet,
    HostOnly,
    /// A macvtap on a host interface (`--net-bridged`).
    Macvtap,
}

impl Kind {
    pub(crate) fn on_shared_bridge(self) -> bool {
        self != Kind::Macvtap
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub vm: String,
    pub mac: String,
    pub kind: Kind,
    /// The tap or macvtap.
    pub port: String,
    /// The reserved address (Softnet, host-only).
    pub ip: Option<Ipv4Addr>,
}

/// The host side of one NIC; undone when dropped.
#[derive(Debug)]
pub struct Attachment {
    qemu: NetworkAttachment,
    /// The record and its lock, when there is something to undo.
    record: Option<HeldRecord>,
}

#[derive(Debug)]
struct HeldRecord {
    path: PathBuf,
    record: Record,
    state: StateDir,
    _lock: FileLock,
}

impl Attachment {
    /// A tap whose undoing is written down in a record (call with the state lock held).
    pub(crate) fn new(tap: OwnedFd, record: Record, state: &StateDir) -> Result<Attachment> {
        Ok(Attachment {
            qemu: tap_attachment(tap),
            record: Some(HeldRecord::create(record, state)?),
        })
    }

    /// `--net-bridged=<interface>`: a tap on a host bridge, or a macvtap (bridge mode) on any
    /// other interface. Without CAP_NET_ADMIN a bridge is joined through QEMU's setuid
    /// `qemu-bridge-helper`, which the administrator must have set up.
    pub fn bridged(vm: &str, interface: &str, mac: MacAddress) -> Result<Attachment> {
        let kind = describe_interface(interface)?.kind;
        if !has_net_admin() {
            return match kind {
                InterfaceKind::Bridge => Ok(Attachment {
                    qemu: NetworkAttachment::BridgeHelper {
                        bridge: interface.to_owned(),
                        helper: bridge_helper(interface)?,
                    },
                    record: None,
                }),
                InterfaceKind::Interface => Err(Error::NeedsPrivileges {
                    what: format!("--net-bridged={interface} (a macvtap on {interface})"),
                }),
            };
        }
        match kind {
            InterfaceKind::Bridge => {
                let (tap, _) = create_tap("tarttap%d", interface)?;
                Ok(Attachment {
                    qemu: tap_attachment(tap),
                    record: None,
                })
            }
            InterfaceKind::Interface => {
                let state = StateDir::locate();
                let _lock = state.lock()?;
                let port = (0..)
                    .map(|n| format!("tartmv{n}"))
                    .find(|name| {
                        !Path::new("/sys/class/net").join(name).exists()
                            && !state.attachments_dir().join(format!("{name}.json")).exists()
                    })
                    .expect("an unused name");
                let record = Record {
                    vm: vm.to_owned(),
                    mac: mac.to_string(),
                    kind: Kind::Macvtap,
                    port: port.clone(),
                    ip: None,
                };
                let held = HeldRecord::create(record, &state)?;
                // create_macvtap leaves nothing behind when it fails: nor do we.
                let device = create_macvtap(&port, interface, mac, state.path())
                    .inspect_err(|_| drop(std::fs::remove_file(&held.path)))?;
                Ok(Attachment {
                    qemu: tap_attachment(device),
                    record: Some(held),
                })
            }
        }
    }

    /// What QEMU gets for the NIC.
    pub fn qemu(&self) -> NetworkAttachment {
        self.qemu.clone()
    }

    /// The VM's address, known in advance for Softnet and host-only VMs.
    pub fn reserved_ip(&self) -> Option<Ipv4Addr> {
        self.record.as_ref().and_then(|held| held.record.ip)
    }
}

impl HeldRecord {
    /// Writes `record` down and locks it (call with the state lock held, so that no
    /// collection sees it unlocked).
    fn create(record: Record, state: &StateDir) -> Result<HeldRecord> {
        let path = state.attachments_dir().join(format!("{}.json", record.port));
        write_record(&path, &record)?;
        let lock = FileLock::exclusive(&path)?;
        Ok(HeldRecord {
            path,
            record,
            state: state.clone(),
            _lock: lock,
        })
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let Some(held) = self.record.take() else {
            return;
        };
        let Ok(_lock) = held.state.lock() else {
            return;
        };
        // On failure the record stays, and the next `tart` command tries again.
        if teardown(&held.state, &held.record).is_ok() {
            let _ = std::fs::remove_file(&held.path);
        }
    }
}

fn tap_attachment(tap: OwnedFd) -> NetworkAttachment {
    NetworkAttachment::Tap {
        device: TapDevice(Arc::new(tap)),
    }
}

fn write_record(path: &Path, record: &Record) -> Result<()> {
    let json = serde_json::to_vec_pretty(record).expect("a record serialises");
    let mut file = File::create(path).map_err(io_context(format!("failed to create {}", path.display())))?;
    file.write_all(&json)
        .and_then(|()| file.sync_data())
        .map_err(io_context(format!("failed to write {}", path.display())))
}

/// QEMU's bridge helper, if it can work for us: setuid root (Debian installs it without the
/// bit), so that it may add a port to a bridge that `/etc/qemu/bridge.conf` allows.
fn bridge_helper(bridge: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let helper = PathBuf::from("/usr/lib/qemu/qemu-bridge-helper");
    let usable = helper
        .metadata()
        .is_ok_and(|m| m.uid() == 0 && m.permissions().mode() & 0o4000 != 0);
    if usable {
        return Ok(helper);
    }
    Err(Error::NeedsPrivileges {
        what: format!(
            "--net-bridged={bridge} (a tap on the bridge {bridge}); without it, let QEMU's bridge helper do it: as \
             root, run \"chmod u+s {}\" and add \"allow {bridge}\" to /etc/qemu/bridge.conf, and this",
            helper.display()
        ),
    })
}

/// Undoes what `record` says was made (a missing piece counts as undone).
fn teardown(state: &StateDir, record: &Record) -> Result<()> {
    let mut result = Ok(());
    // Only Softnet and host-only VMs have a reserved address, and rules.
    if let Some(ip) = record.ip {
        let script = rules::remove_vm(&record.port, ip, record.kind == Kind::Softnet);
        if let Err(err) = nft(&script) {
            // Each piece on its own: the ones that are gone fail, the others go.
            for line in script.lines() {
                let _ = nft(line);
            }
            if chain_exists(&record.port) {
                result = Err(err);
            }
        }
    }
    if record.kind.on_shared_bridge() {
        release_lease(state, record);
        let reservation = state.hosts_dir().join(&record.port);
        if reservation.exists() {
            let _ = std::fs::remove_file(&reservation);
            // dnsmasq forgets removed reservations only when told to reload.
            if let Some((pid, _)) = state.running_dnsmasq() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGHUP) };
            }
        }
    }
    if record.kind == Kind::Macvtap {
        delete_link(&record.port);
    }
    result
}

fn chain_exists(port: &str) -> bool {
    program("nft", "nftables").is_ok_and(|nft| {
        Command::new(nft)
            .args(["list", "chain", "bridge", "tart", &format!("vm-{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

/// Gives the VM's address back to the pool at once (`dhcp_release`, answered by dnsmasq as a
/// DHCPRELEASE from the client), instead of after the lease time.
fn release_lease(state: &StateDir, record: &Record) {
    let Some(lease) = leases::lease_for(&state.lease_file(), &record.mac) else {
        return;
    };
    let Ok(release) = program("dhcp_release", "dnsmasq-utils") else {
        return;
    };
    let mut command = Command::new(release);
    command.args([BRIDGE, &lease.ip.to_string(), &lease.mac]);
    if let Some(client_id) = &lease.client_id {
        command.arg(client_id);
    }
    let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Undoes the attachments of `tart run`s that are gone. Cheap when there are none; without
/// CAP_NET_ADMIN nothing can be undone, and nothing is tried.
pub fn collect_stale_attachments() -> Result<usize> {
    let state = StateDir::locate();
    let has_records = std::fs::read_dir(state.attachments_dir())
        .map(|entries| entries.flatten().next().is_some())
        .unwrap_or(false);
    if !has_records || !has_net_admin() {
        return Ok(0);
    }
    let _lock = state.lock()?;
    collect_locked(&state)
}

/// [`collect_stale_attachments`] with the state lock held.
pub(crate) fn collect_locked(state: &StateDir) -> Result<usize> {
    let mut collected = 0;
    for (path, record) in records(state) {
        let Ok(Some(_lock)) = FileLock::try_exclusive(&path) else {
            continue;
        };
        if let Some(record) = record {
            teardown(state, &record)?;
        }
        let _ = std::fs::remove_file(&path);
        collected += 1;
    }
    Ok(collected)
}

/// Whether a VM with `mac` has a NIC on the shared bridge (so that its lease is in our
/// dnsmasq's lease file). Needs no privileges.
pub fn on_shared_network(mac: MacAddress) -> bool {
    let mac = mac.to_string();
    records(&StateDir::locate())
        .into_iter()
        .any(|(_, record)| record.is_some_and(|r| r.kind.on_shared_bridge() && r.mac == mac))
}

/// How many running VMs have a NIC on the shared bridge (call after [`collect_locked`]: every
/// record left is a live one).
pub(crate) fn live_on_shared_bridge(state: &StateDir) -> usize {
    records(state)
        .into_iter()
        .filter(|(_, record)| record.as_ref().is_some_and(|r| r.kind.on_shared_bridge()))
        .count()
}

/// Every record file, with its content if it parses (an empty or torn one was being written
/// by a process that died: nothing of it was made yet).
fn records(state: &StateDir) -> Vec<(PathBuf, Option<Record>)> {
    let Ok(entries) = std::fs::read_dir(state.attachments_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let record = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            (path, record)
        })
        .collect()
}
