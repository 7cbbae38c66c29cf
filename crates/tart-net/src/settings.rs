//! `$TART_HOME/network.json`: the subnet and DHCP lease time of the shared network, the two
//! knobs Tart users turn with `defaults write` on macOS.

use std::net::Ipv4Addr;
use std::path::Path;

use serde::Deserialize;

use crate::policy::Cidr;
use crate::{io_context, Error, Result};

pub const SETTINGS_FILE: &str = "network.json";

/// `{"subnet": "192.168.64.0/24", "dhcpLeaseSeconds": 600}`; both optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The gateway is `.1`; see [`Settings::dynamic_range`] and [`Settings::reserved_range`].
    pub subnet: Cidr,
    /// Short leases (vmnet's default is a day) so that hundreds of short-lived CI VMs a day never
    /// exhaust the pool; leases are also released when a VM stops.
    pub lease_seconds: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            subnet: Cidr::new(192, 168, 64, 0, 24),
            lease_seconds: 600,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    subnet: Option<String>,
    dhcp_lease_seconds: Option<u32>,
}

impl Settings {
    /// The settings in `home`, or the defaults when there is no file.
    pub fn load(home: &Path) -> Result<Settings> {
        let path = home.join(SETTINGS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => return Err(io_context(format!("failed to read {}", path.display()))(e)),
        };
        let invalid = |reason: String| Error::InvalidSettings {
            file: path.display().to_string(),
            reason,
        };
        let file: File = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut settings = Settings::default();
        if let Some(subnet) = file.subnet {
            settings.subnet = parse_subnet(&subnet).map_err(invalid)?;
        }
        if let Some(seconds) = file.dhcp_lease_seconds {
            // dnsmasq's minimum is two minutes.
            if seconds < 120 {
                return Err(invalid(format!("dhcpLeaseSeconds must be at least 120, not {seconds}")));
            }
            settings.lease_seconds = seconds;
        }
        Ok(settings)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.subnet.mask())
    }

    /// The lower half of the subnet (from `.2`), handed out by dnsmasq to any client.
    pub fn dynamic_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        (self.nth(2), self.nth(self.size() / 2 - 1))
    }

    /// The upper half (but the broadcast address), reserved by `tart run` for Softnet and
    /// host-only VMs, whose rules need their address before they boot. Separate from the
    /// dynamic range, so dnsmasq never offers a reserved address to another client.
    pub fn reserved_range(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (self.size() / 2..self.size() - 1).map(|n| self.nth(n))
    }

    fn size(&self) -> u32 {
        1 << (32 - self.subnet.prefix)
    }

    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network) + n)
    }
}

/// A private (RFC 1918) `a.b.c.d/N` with 16 ≤ N ≤ 29: room for a gateway and some VMs.
fn parse_subnet(text: &str) -> std::result::Result<Cidr, String> {
    if !text.contains('/') {
        return Err(format!("subnet {text:?} is not in a.b.c.d/N form"));
    }
    let subnet: Cidr = text.parse()?;
    if !(16..=29).contains(&subnet.prefix) {
        return Err(format!("prefix length /{} must be between /16 and /29", subnet.prefix));
    }
    if !subnet.network.is_private() {
        return Err(format!("{text} is not a private (RFC 1918) network"));
    }
    Ok(subnet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_vmnet() {
        let s = Settings::default();
        assert_eq!(s.subnet.to_string(), "192.168.64.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(192, 168, 64, 1));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            s.dynamic_range(),
            (Ipv4Addr::new(192, 168, 64, 2), Ipv4Addr::new(192, 168, 64, 127))
        );
        let reserved: Vec<_> = s.reserved_range().collect();
        assert_eq!(reserved.first(), Some(&Ipv4Addr::new(192, 168, 64, 128)));
        assert_eq!(reserved.last(), Some(&Ipv4Addr::new(192, 168, 64, 254)));
        assert_eq!(s.lease_seconds, 600);
    }

    #[test]
    fn file_overrides_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Settings::load(dir.path()).unwrap(), Settings::default());
        let write = |text: &str| std::fs::write(dir.path().join(SETTINGS_FILE), text).unwrap();
        write(r#"{"subnet": "10.77.0.0/16", "dhcpLeaseSeconds": 300}"#);
        let s = Settings::load(dir.path()).unwrap();
        assert_eq!((s.subnet.to_string(), s.lease_seconds), ("10.77.0.0/16".into(), 300));
        assert_eq!(s.dynamic_range().1, Ipv4Addr::new(10, 77, 127, 255));
        assert_eq!(s.reserved_range().last(), Some(Ipv4Addr::new(10, 77, 255, 254)));
        write(r#"{"subnet": "10.77.0.0/29"}"#);
        let s = Settings::load(dir.path()).unwrap();
        assert_eq!(
            s.dynamic_range(),
            (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3))
        );
        assert_eq!(s.reserved_range().count(), 3);
        let err = |text: &str| {
            write(text);
            Settings::load(dir.path()).unwrap_err().to_string()
        };
        assert!(err(r#"{"subnet": "10.77.0.1/16"}"#).contains("host bits are set"));
        assert!(err(r#"{"subnet": "8.8.8.0/24"}"#).contains("not a private"));
        assert!(err(r#"{"subnet": "10.0.0.0/8"}"#).contains("between /16 and /29"));
        assert!(err(r#"{"subnet": "10.0.0.0"}"#).contains("a.b.c.d/N"));
        assert!(err(r#"{"dhcpLeaseSeconds": 5}"#).contains("at least 120"));
        assert!(err(r#"{"leaseTime": 5}"#).contains("unknown field"));
    }
}
