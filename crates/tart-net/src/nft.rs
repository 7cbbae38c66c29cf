//! The nftables rules of the shared network, as `nft -f` scripts. Two tables of our own, both
//! named `tart`; nothing else is ever touched:
//!
//! * `ip tart`: masquerading of the subnet, forwarding into the bridge only for replies, and
//!   verdict maps keyed by a VM's (reserved) address — `from_vm` and `to_vm` in the forward
//!   hook, `to_host` in the input hook — that send its packets to the VM's own chains;
//! * `bridge tart`: the map `ports` sends the frames entering the bridge from a VM's tap to
//!   its anti-spoofing chain; the set `isolated` holds the taps that must not exchange frames
//!   with any other port of the bridge (Softnet).
//!
//! Frames between two ports of the bridge also pass the `ip` forward hook (with `tart0` as both
//! interfaces) where `br_netfilter` is loaded, as on every Docker host; the rules give the same
//! verdicts with or without it.
//!
//! The base chains are rewritten whole on every set-up (idempotent, converging to the current
//! settings); per-VM chains and map elements are added and removed in one transaction each, so
//! a VM's rules are either all there or none.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use tart_home::MacAddress;

use crate::policy::{Cidr, NON_PUBLIC};
use crate::shared::{Isolation, BRIDGE};

const TABLE: &str = "tart";

/// The base tables and chains for `bridge` with `subnet`.
pub(crate) fn base(bridge: &str, subnet: Cidr) -> String {
    format!(
        "add table ip {TABLE}\n\
         add map ip {TABLE} from_vm {{ type ipv4_addr : verdict; }}\n\
         add map ip {TABLE} to_vm {{ type ipv4_addr : verdict; }}\n\
         add map ip {TABLE} to_host {{ type ipv4_addr : verdict; }}\n\
         add chain ip {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         add chain ip {TABLE} input {{ type filter hook input priority filter; policy accept; }}\n\
         add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain ip {TABLE} forward\n\
         flush chain ip {TABLE} input\n\
         flush chain ip {TABLE} postrouting\n\
         add rule ip {TABLE} forward ip saddr vmap @from_vm\n\
         add rule ip {TABLE} forward ip daddr vmap @to_vm\n\
         add rule ip {TABLE} forward iifname \"{bridge}\" accept\n\
         add rule ip {TABLE} forward oifname \"{bridge}\" ct state established,related accept\n\
         add rule ip {TABLE} forward oifname \"{bridge}\" drop\n\
         add rule ip {TABLE} input iifname \"{bridge}\" ip saddr vmap @to_host\n\
         add rule ip {TABLE} postrouting ip saddr {subnet} ip daddr != {subnet} masquerade\n\
         add table bridge {TABLE}\n\
         add map bridge {TABLE} ports {{ type ifname : verdict; }}\n\
         add set bridge {TABLE} isolated {{ type ifname; }}\n\
         add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n\
         add chain bridge {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         flush chain bridge {TABLE} prerouting\n\
         flush chain bridge {TABLE} forward\n\
         add rule bridge {TABLE} prerouting iifname vmap @ports\n\
         add rule bridge {TABLE} forward iifname @isolated drop\n\
         add rule bridge {TABLE} forward oifname @isolated drop\n"
    )
}

/// The rules of one VM, whose frames enter the bridge through `port` with `mac` and `ip`
/// (none for [`Isolation::None`]).
pub(crate) fn add_vm(
    port: &str,
    mac: MacAddress,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    isolation: &Isolation,
) -> Option<String> {
    let policy = match isolation {
        Isolation::None => return None,
        Isolation::Softnet(policy) => Some(policy),
        Isolation::HostOnly => None,
    };
    let mut script = String::new();
    let chain = format!("vm-{port}");
    let mut rule = |table: &str, chain: &str, rule: String| {
        let _ = writeln!(script, "add rule {table} {TABLE} {chain} {rule}");
    };
    // Anti-spoofing: its own MAC, its own address, DHCP before it has one, IPv4 and ARP only
    // (IPv6 would go around every IPv4 rule).
    let mut prelude = format!("add chain bridge {TABLE} {chain}\n");
    let anti_spoofing = [
        format!("ether saddr != {mac} drop"),
        format!("arp saddr ether != {mac} drop"),
        format!("arp saddr ip != {{ 0.0.0.0, {ip} }} drop"),
        "ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept".to_owned(),
        format!("ip saddr != {ip} drop"),
        "ether type != { ip, arp } drop".to_owned(),
    ];
    for line in anti_spoofing {
        rule("bridge", &chain, line);
    }
    let mut elements = format!("add element bridge {TABLE} ports {{ \"{port}\" : jump {chain} }}\n");
    let out = format!("{chain}-out");
    let _ = writeln!(prelude, "add chain ip {TABLE} {out}");
    let _ = writeln!(elements, "add element ip {TABLE} from_vm {{ {ip} : jump {out} }}");
    match policy {
        None => {
            // Within the bridge (routed back into it, or bridged under br_netfilter) only.
            rule("ip", &out, format!("oifname \"{BRIDGE}\" accept"));
            rule("ip", &out, "drop".into());
        }
        Some(policy) => {
            let host = format!("{chain}-host");
            let inbound = format!("{chain}-in");
            let _ = write!(prelude, "add chain ip {TABLE} {host}\nadd chain ip {TABLE} {inbound}\n");
            rule("ip", &out, "ct state established,related accept".into());
            rule("ip", &host, "ct state established,related accept".into());
            rule(
                "ip",
                &host,
                format!("ip daddr {{ {gateway}, 255.255.255.255 }} udp dport {{ 53, 67 }} accept"),
            );
            rule("ip", &host, format!("ip daddr {gateway} tcp dport 53 accept"));
            for chain in [&out, &host] {
                if !policy.block.is_empty() {
                    rule("ip", chain, format!("ip daddr {} drop", set(&policy.block)));
                }
                if !policy.allow.is_empty() {
                    rule("ip", chain, format!("ip daddr {} accept", set(&policy.allow)));
                }
            }
            rule("ip", &out, format!("ip daddr {} drop", set(&NON_PUBLIC)));
            rule("ip", &out, "accept".into());
            rule("ip", &host, "drop".into());
            // Forwarded to it: replies only (its exposed ports are proxied from the host).
            rule("ip", &inbound, "ct state established,related accept".into());
            rule("ip", &inbound, "drop".into());
            let _ = write!(
                elements,
                "add element ip {TABLE} to_host {{ {ip} : jump {host} }}\n\
                 add element ip {TABLE} to_vm {{ {ip} : jump {inbound} }}\n\
                 add element bridge {TABLE} isolated {{ \"{port}\" }}\n"
            );
        }
    }
    Some(prelude + &script + &elements)
}

/// Removes what [`add_vm`] added.
pub(crate) fn remove_vm(port: &str, ip: Ipv4Addr, softnet: bool) -> String {
    let chain = format!("vm-{port}");
    let mut script = format!(
        "delete element bridge {TABLE} ports {{ \"{port}\" }}\n\
         delete element ip {TABLE} from_vm {{ {ip} }}\n"
    );
    if softnet {
        let _ = write!(
            script,
            "delete element ip {TABLE} to_host {{ {ip} }}\n\
             delete element ip {TABLE} to_vm {{ {ip} }}\n\
             delete element bridge {TABLE} isolated {{ \"{port}\" }}\n\
             delete chain ip {TABLE} {chain}-host\n\
             delete chain ip {TABLE} {chain}-in\n"
        );
    }
    let _ = write!(
        script,
        "delete chain ip {TABLE} {chain}-out\n\
         delete chain bridge {TABLE} {chain}\n"
    );
    script
}

fn set(cidrs: &[Cidr]) -> String {
    let items: Vec<String> = cidrs.iter().map(Cidr::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SoftnetPolicy;

    #[test]
    fn softnet_rules_block_before_allow_and_remove_cleanly() {
        let policy = SoftnetPolicy {
            allow: vec![Cidr::new(10, 0, 0, 0, 8)],
            block: vec![Cidr::new(10, 1, 0, 0, 16)],
            expose: Vec::new(),
        };
        let mac: MacAddress = "6e:35:1a:09:4c:b2".parse().unwrap();
        let ip = Ipv4Addr::new(192, 168, 64, 130);
        let gateway = Ipv4Addr::new(192, 168, 64, 1);
        let script = add_vm("tarttap3", mac, ip, gateway, &Isolation::Softnet(policy)).unwrap();
        let lines: Vec<&str> = script.lines().collect();
        let position = |needle: &str| {
            lines
                .iter()
                .position(|line| line.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in\n{script}"))
        };
        // Chains exist before their rules, rules before the elements that jump to them.
        assert!(position("add chain bridge tart vm-tarttap3") < position("ether saddr != 6e:35:1a:09:4c:b2 drop"));
        assert!(position("add chain ip tart vm-tarttap3-out") < position("add rule ip tart vm-tarttap3-out"));
        assert!(position("ip daddr { 10.1.0.0/16 } drop") < position("ip daddr { 10.0.0.0/8 } accept"));
        assert!(
            position("add rule ip tart vm-tarttap3-out ip daddr { 10.0.0.0/8 } accept") < position("172.16.0.0/12")
        );
        assert!(position("from_vm { 192.168.64.130 : jump vm-tarttap3-out }") > position("vm-tarttap3-out accept"));
        assert!(script.contains("add rule ip tart vm-tarttap3-host ip daddr 192.168.64.1 tcp dport 53 accept"));
        assert!(
            script.ends_with("add element bridge tart isolated { \"tarttap3\" }\n"),
            "{script}"
        );

        let removal = remove_vm("tarttap3", ip, true);
        for needle in [
            "ports { \"tarttap3\" }",
            "from_vm { 192.168.64.130 }",
            "to_host",
            "to_vm",
            "isolated",
            "-out",
            "-host",
            "-in\n",
        ] {
            assert!(removal.contains(needle), "{needle:?} in\n{removal}");
        }
        assert!(removal.ends_with("delete chain ip tart vm-tarttap3-out\ndelete chain bridge tart vm-tarttap3\n"));
    }

    #[test]
    fn host_only_rules_drop_forwarding_only() {
        let mac: MacAddress = "6e:35:1a:09:4c:b2".parse().unwrap();
        let ip = Ipv4Addr::new(192, 168, 64, 131);
        let gateway = Ipv4Addr::new(192, 168, 64, 1);
        let script = add_vm("tarttap4", mac, ip, gateway, &Isolation::HostOnly).unwrap();
        assert_eq!(add_vm("tarttap4", mac, ip, gateway, &Isolation::None), None);
        assert!(script.contains("add element ip tart from_vm { 192.168.64.131 : jump vm-tarttap4-out }"));
        assert!(script.contains(
            "add rule ip tart vm-tarttap4-out oifname \"tart0\" accept\nadd rule ip tart vm-tarttap4-out drop\n"
        ));
        assert!(
            !script.contains("to_host") && !script.contains("isolated") && !script.contains("to_vm"),
            "{script}"
        );
        let removal = remove_vm("tarttap4", ip, false);
        assert!(
            !removal.contains("to_host") && removal.contains("delete chain ip tart vm-tarttap4-out"),
            "{removal}"
        );
    }
}
