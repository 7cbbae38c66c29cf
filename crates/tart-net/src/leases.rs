//! dnsmasq's lease file: one line per lease, `<expiry> <mac> <ip> <hostname> <client id>`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// Lower-case `aa:bb:…`.
    pub mac: String,
    /// Unix time; 0 means infinite.
    pub expires: u64,
    /// The DHCP client identifier, when the client sent one (`dhcp_release` must repeat it).
    pub client_id: Option<String>,
}

/// The unexpired lease of `mac`, the latest-expiring one if several.
pub fn lease_for(lease_file: &Path, mac: &str) -> Option<Lease> {
    current_leases(lease_file)
        .into_iter()
        .filter(|lease| lease.mac.eq_ignore_ascii_case(mac))
        .max_by_key(|lease| if lease.expires == 0 { u64::MAX } else { lease.expires })
}

/// Every unexpired lease in the file (none if there is no file).
pub fn current_leases(lease_file: &Path) -> Vec<Lease> {
    let text = std::fs::read_to_string(lease_file).unwrap_or_default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    parse(&text)
        .filter(|lease| lease.expires == 0 || lease.expires > now)
        .collect()
}

fn parse(text: &str) -> impl Iterator<Item = Lease> + '_ {
    text.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let expires = fields.next()?.parse().ok()?;
        let mac = fields.next()?.to_ascii_lowercase();
        let ip = fields.next()?.parse().ok()?;
        let _hostname = fields.next();
        let client_id = fields.next().filter(|id| *id != "*").map(str::to_owned);
        Some(Lease {
            ip,
            mac,
            expires,
            client_id,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_unexpired_lease_of_the_mac_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("leases");
        let later = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
        std::fs::write(
            &file,
            format!(
                "100 6e:35:1a:09:4c:b2 192.168.64.5 old *\n\
                 {later} 6e:35:1a:09:4c:b2 192.168.64.9 guest 01:6e:35:1a:09:4c:b2\n\
                 {} 6e:35:1a:09:4c:b2 192.168.64.7 guest *\n\
                 {later} aa:bb:cc:dd:ee:ff 192.168.64.3 other *\n\
                 garbage line\n",
                later - 10
            ),
        )
        .unwrap();
        let lease = lease_for(&file, "6E:35:1A:09:4C:B2").unwrap();
        assert_eq!(lease.ip, Ipv4Addr::new(192, 168, 64, 9));
        assert_eq!(lease.client_id.as_deref(), Some("01:6e:35:1a:09:4c:b2"));
        assert_eq!(current_leases(&file).len(), 3);
        assert_eq!(lease_for(&file, "aa:bb:cc:dd:ee:ff").unwrap().client_id, None);
        assert_eq!(lease_for(&file, "00:00:00:00:00:01"), None);
        assert_eq!(lease_for(&dir.path().join("missing"), "aa:bb:cc:dd:ee:ff"), None);
    }
}
