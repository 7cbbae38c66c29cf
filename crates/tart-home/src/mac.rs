use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet address, written as Tart writes it: lowercase, colon-separated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddress([u8; 6]);

impl MacAddress {
    /// A random locally-administered unicast address, like Virtualization.framework's
    /// `VZMACAddress.randomLocallyAdministered()`.
    pub fn random() -> Self {
        let mut bytes: [u8; 6] = rand::rng().random();
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        MacAddress(bytes)
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid MAC address {s:?}, expected xx:xx:xx:xx:xx:xx");
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.is_empty() || part.len() > 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(MacAddress(bytes))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::MacAddress;

    #[test]
    fn random_addresses_are_local_unicast() {
        for _ in 0..100 {
            let mac = MacAddress::random();
            assert_eq!(mac.octets()[0] & 0x03, 0x02, "{mac}");
        }
    }

    #[test]
    fn parses_and_prints_lowercase() {
        let mac: MacAddress = "6E:35:1a:09:4c:B2".parse().unwrap();
        assert_eq!(mac.to_string(), "6e:35:1a:09:4c:b2");
        for bad in [
            "",
            "6e:35:1a:09:4c",
            "6e:35:1a:09:4c:b2:00",
            "6e:35:1a:09:4c:zz",
            "6e::1a:09:4c:b2",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
    }
}
