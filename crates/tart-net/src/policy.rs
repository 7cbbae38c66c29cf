//! What a Softnet VM may reach (`--net-softnet-allow`, `--net-softnet-block`) and which host
//! ports lead to it (`--net-softnet-expose`, `--net-user-expose`), parsed from Tart's
//! comma-separated flag values.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use tart_qemu::PortForward;

/// An IPv4 network, `a.b.c.d/N`; a bare address is a /32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub const fn new(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            network: Ipv4Addr::new(a, b, c, d),
            prefix,
        }
    }

    pub fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.network)
    }

    /// Whether the two networks share an address (one contains the other).
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let common = self.mask() & other.mask();
        u32::from(self.network) & common == u32::from(other.network) & common
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// The network an interface address such as `10.0.2.15/24` is in.
    pub fn enclosing(address: &str) -> Option<Cidr> {
        let (network, prefix) = split(address).ok()?;
        let mut cidr = Cidr { network, prefix };
        cidr.network = Ipv4Addr::from(u32::from(network) & cidr.mask());
        Some(cidr)
    }
}

/// `a.b.c.d[/N]`, unchecked for host bits.
fn split(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => {
            let prefix = prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| format!("invalid CIDR {text:?}: the prefix length must be 0 to 32"))?;
            (address, prefix)
        }
        None => (text, 32),
    };
    let network: Ipv4Addr = address
        .parse()
        .map_err(|_| format!("invalid CIDR {text:?}: {address:?} is not an IPv4 address"))?;
    Ok((network, prefix))
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let (network, prefix) = split(text)?;
        let cidr = Cidr { network, prefix };
        if u32::from(network) & !cidr.mask() != 0 {
            return Err(format!(
                "invalid CIDR {text:?}: host bits are set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(network) & cidr.mask())
            ));
        }
        Ok(cidr)
    }
}

/// `10.0.0.0/8,192.168.1.5` (spaces around the commas allowed).
pub fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, String> {
    text.split(',').map(|item| item.trim().parse()).collect()
}

/// `EXT:INT[,EXT:INT…]`: host TCP port EXT leads to guest port INT.
pub fn parse_port_forwards(text: &str) -> Result<Vec<PortForward>, String> {
    text.split(',')
        .map(|item| {
            let item = item.trim();
            let port = |part: &str| {
                part.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("invalid port forward {item:?}: {part:?} is not a port number (1-65535)"))
            };
            let (host, guest) = item
                .split_once(':')
                .ok_or_else(|| format!("invalid port forward {item:?}: expected EXTERNAL:INTERNAL, e.g. 2222:22"))?;
            Ok(PortForward {
                host: port(host)?,
                guest: port(guest)?,
            })
        })
        .collect()
}

/// What Softnet blocks unless allowed: every range that is not the public Internet.
pub const NON_PUBLIC: [Cidr; 8] = [
    Cidr::new(0, 0, 0, 0, 8),
    Cidr::new(10, 0, 0, 0, 8),
    Cidr::new(100, 64, 0, 0, 10),
    Cidr::new(127, 0, 0, 0, 8),
    Cidr::new(169, 254, 0, 0, 16),
    Cidr::new(172, 16, 0, 0, 12),
    Cidr::new(192, 168, 0, 0, 16),
    Cidr::new(224, 0, 0, 0, 3),
];

/// A Softnet VM's rules. Blocked ranges win over allowed ones, as in Softnet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoftnetPolicy {
    pub allow: Vec<Cidr>,
    pub block: Vec<Cidr>,
    pub expose: Vec<PortForward>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidrs("10.0.0.0/8, 192.168.1.5").unwrap(),
            [Cidr::new(10, 0, 0, 0, 8), Cidr::new(192, 168, 1, 5, 32)]
        );
        assert_eq!(parse_cidrs("0.0.0.0/0").unwrap(), [Cidr::new(0, 0, 0, 0, 0)]);
        assert!(Cidr::new(0, 0, 0, 0, 0).contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(Cidr::new(172, 16, 0, 0, 12).contains(Ipv4Addr::new(172, 31, 255, 255)));
        assert!(!Cidr::new(172, 16, 0, 0, 12).contains(Ipv4Addr::new(172, 32, 0, 0)));
        assert_eq!(Cidr::enclosing("10.0.2.15/24"), Some(Cidr::new(10, 0, 2, 0, 24)));
        assert_eq!(Cidr::enclosing("10.0.2.15/33"), None);
        for (bad, reason) in [
            ("10.0.0.1/8", "host bits are set (did you mean 10.0.0.0/8?)"),
            ("10.0.0.0/33", "prefix length"),
            ("10.0.0/8", "not an IPv4 address"),
            ("", "not an IPv4 address"),
            ("10.0.0.0/8,", "not an IPv4 address"),
        ] {
            let err = parse_cidrs(bad).unwrap_err();
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn port_forwards() {
        assert_eq!(
            parse_port_forwards("2222:22, 8080:80").unwrap(),
            [
                PortForward { host: 2222, guest: 22 },
                PortForward { host: 8080, guest: 80 }
            ]
        );
        for (bad, reason) in [
            ("22", "expected EXTERNAL:INTERNAL"),
            ("0:22", "\"0\" is not a port number"),
            ("70000:22", "\"70000\" is not a port number"),
            ("22:x", "\"x\" is not a port number"),
        ] {
            let err = parse_port_forwards(bad).unwrap_err();
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }
}
