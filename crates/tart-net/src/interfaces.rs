//! The host interfaces a VM can be bridged to (`--net-bridged`), from `/sys/class/net`.

use std::path::Path;

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceKind {
    /// A Linux bridge: the VM gets a tap on it.
    Bridge,
    /// Anything else that carries Ethernet (a NIC, a bond, a VLAN, a veth): the VM gets a
    /// macvtap on it.
    Interface,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub kind: InterfaceKind,
}

const NET: &str = "/sys/class/net";

/// `name` as a bridging candidate, or why it is none.
pub fn describe_interface(name: &str) -> Result<Interface> {
    let sys = Path::new(NET).join(name);
    if name.is_empty() || name.contains('/') || !sys.exists() {
        let names: Vec<String> = bridgeable_interfaces().into_iter().map(|i| i.name).collect();
        return Err(Error::Interface(format!(
            "no network interface named {name:?} on this host (candidates for --net-bridged: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        )));
    }
    // ARPHRD_ETHER: macvtap and bridges need Ethernet (not loopback, tun, WireGuard, ...).
    let ethernet = std::fs::read_to_string(sys.join("type")).is_ok_and(|t| t.trim() == "1");
    if !ethernet || sys.join("tun_flags").exists() || sys.join("macvtap").exists() {
        return Err(Error::Interface(format!(
            "{name} cannot be bridged: it is not an Ethernet interface, or it is a VM's tap or macvtap"
        )));
    }
    if sys.join("brport").exists() {
        let bridge = std::fs::read_link(sys.join("master"))
            .ok()
            .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "a bridge".into());
        return Err(Error::Interface(format!(
            "{name} is a port of {bridge}: use --net-bridged={bridge}"
        )));
    }
    let kind = if sys.join("bridge").exists() {
        InterfaceKind::Bridge
    } else {
        InterfaceKind::Interface
    };
    Ok(Interface {
        name: name.to_owned(),
        kind,
    })
}

/// Every interface [`describe_interface`] accepts, by name.
pub fn bridgeable_interfaces() -> Vec<Interface> {
    let mut found: Vec<Interface> = std::fs::read_dir(NET)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| describe_interface(&entry.file_name().to_string_lossy()).ok())
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}
