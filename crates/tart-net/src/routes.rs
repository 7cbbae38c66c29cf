//! The host's IPv4 routes (`/proc/net/route`), to tell whether a subnet for the shared network
//! would clash with a network the host already reaches through another interface (a VPN, Docker,
//! libvirt).

use std::net::Ipv4Addr;

use crate::policy::Cidr;
use crate::shared::BRIDGE;

/// One route of the host's main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Cidr,
    pub interface: String,
}

/// The routes through other interfaces than tart's bridge whose destination overlaps `subnet`.
/// Default routes are left out: they overlap everything and more specific routes win over them.
pub fn overlapping_routes(subnet: Cidr) -> std::io::Result<Vec<Route>> {
    let table = std::fs::read_to_string("/proc/net/route")?;
    Ok(parse_routes(&table)
        .into_iter()
        .filter(|route| route.destination.prefix > 0 && route.interface != BRIDGE)
        .filter(|route| route.destination.overlaps(&subnet))
        .collect())
}

/// `/proc/net/route`: a header, then `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`
/// with addresses as the hexadecimal value of the network-order word read in host order.
fn parse_routes(table: &str) -> Vec<Route> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = |field: &str| {
                u32::from_str_radix(field, 16)
                    .ok()
                    .map(|word| Ipv4Addr::from(word.to_ne_bytes()))
            };
            let network = address(fields.get(1)?)?;
            let mask = u32::from(address(fields.get(7)?)?);
            Some(Route {
                destination: Cidr {
                    network,
                    prefix: mask.count_ones() as u8,
                },
                interface: (*fields.first()?).to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_route_is_decoded() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     wg0\t0000A8C0\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let routes = parse_routes(table);
        let text: Vec<String> = routes
            .iter()
            .map(|r| format!("{} {}", r.interface, r.destination))
            .collect();
        assert_eq!(text, ["eth0 0.0.0.0/0", "eth0 192.0.2.0/24", "wg0 192.168.0.0/16"]);
        let subnet = Cidr::new(192, 168, 64, 0, 24);
        assert!(routes[2].destination.overlaps(&subnet) && subnet.overlaps(&routes[2].destination));
        assert!(!routes[1].destination.overlaps(&subnet));
    }
}
