use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::ser::{Formatter, PrettyFormatter};

use crate::{Error, MacAddress, Result};

/// A VM's `config.json`, field for field as Tart reads and writes it. Field order here is the
/// order Tart writes, which serde keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    pub version: u32,
    #[serde(default = "Os::tart_default")]
    pub os: Os,
    #[serde(default = "Arch::tart_default")]
    pub arch: Arch,
    /// darwin only: opaque base64 blobs we cannot interpret but must hand back verbatim on push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_model: Option<String>,
    pub cpu_count_min: u32,
    pub cpu_count: u32,
    pub memory_size_min: u64,
    pub memory_size: u64,
    pub mac_address: MacAddress,
    #[serde(default)]
    pub display: Display,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_refit: Option<bool>,
    #[serde(default, deserialize_with = "DiskFormat::deserialize_lenient")]
    pub disk_format: DiskFormat,
    /// The registry format the VM came in; absent for Tart's own (and VMs made locally). Keys
    /// Tart does not know are ignored by Tart, so configs with them stay Tart-readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_format: Option<ImageFormat>,
    /// Kernel command line for VMs booted directly from a `kernel` file in their directory
    /// (vetu images carry one); `None` when the VM has no kernel of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_command_line: Option<String>,
    /// The firmware the VM boots with when it has no kernel of its own; absent means UEFI, as
    /// for every Tart VM. `bios` for disks that only boot the legacy way (an MBR boot loader and
    /// no EFI system partition, as some containerDisks have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_firmware: Option<BootFirmware>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootFirmware {
    Uefi,
    /// SeaBIOS, QEMU's default x86 firmware.
    Bios,
}

/// The image formats a VM can be pulled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Tart,
    Vetu,
    #[serde(rename = "containerdisk")]
    ContainerDisk,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Tart => "tart",
            ImageFormat::Vetu => "vetu",
            ImageFormat::ContainerDisk => "containerdisk",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Darwin,
    Linux,
}

impl Os {
    fn tart_default() -> Self {
        Os::Darwin
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Os::Darwin => "darwin",
            Os::Linux => "linux",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Arm64,
    Amd64,
}

impl Arch {
    /// Configs written before Tart supported Intel hosts have no `arch`: they are arm64.
    fn tart_default() -> Self {
        Arch::Arm64
    }

    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::Amd64 => "amd64",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Asif,
}

impl DiskFormat {
    /// Tart maps formats it does not know to raw instead of refusing the VM.
    fn deserialize_lenient<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(if text == "asif" {
            DiskFormat::Asif
        } else {
            DiskFormat::Raw
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Asif => "asif",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Display {
    pub width: u32,
    pub height: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<DisplayUnit>,
}

impl Default for Display {
    fn default() -> Self {
        Display {
            width: 1024,
            height: 768,
            unit: None,
        }
    }
}

impl fmt::Display for Display {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)?;
        match self.unit {
            Some(unit) => f.write_str(unit.as_str()),
            None => Ok(()),
        }
    }
}

impl FromStr for Display {
    type Err = String;

    /// `WxH[pt|px]`, as `tart set --display` takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid display {s:?}, expected WIDTHxHEIGHT[pt|px], e.g. 1920x1080");
        let (size, unit) = if let Some(size) = s.strip_suffix("pt") {
            (size, Some(DisplayUnit::Point))
        } else if let Some(size) = s.strip_suffix("px") {
            (size, Some(DisplayUnit::Pixel))
        } else {
            (s, None)
        };
        let (width, height) = size.split_once('x').ok_or_else(invalid)?;
        Ok(Display {
            width: width.parse().map_err(|_| invalid())?,
            height: height.parse().map_err(|_| invalid())?,
            unit,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisplayUnit {
    #[serde(rename = "pt")]
    Point,
    #[serde(rename = "px")]
    Pixel,
}

impl DisplayUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            DisplayUnit::Point => "pt",
            DisplayUnit::Pixel => "px",
        }
    }
}

impl VmConfig {
    /// The config `tart create --linux` writes: Tart's 4 CPU / 4 GiB defaults and a fresh MAC.
    pub fn new_linux(arch: Arch) -> Self {
        const FOUR_GIB: u64 = 4 * 1024 * 1024 * 1024;
        VmConfig {
            version: 1,
            os: Os::Linux,
            arch,
            ecid: None,
            hardware_model: None,
            cpu_count_min: 4,
            cpu_count: 4,
            memory_size_min: FOUR_GIB,
            memory_size: FOUR_GIB,
            mac_address: MacAddress::random(),
            display: Display::default(),
            display_refit: None,
            disk_format: DiskFormat::Raw,
            image_format: None,
            kernel_command_line: None,
            boot_firmware: None,
        }
    }

    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let config: VmConfig = serde_json::from_slice(bytes).map_err(|source| Error::InvalidConfig {
            path: path.to_owned(),
            source,
        })?;
        if config.os == Os::Darwin && (config.ecid.is_none() || config.hardware_model.is_none()) {
            return Err(Error::ConfigConstraint {
                path: path.to_owned(),
                reason: "a darwin VM needs both \"ecid\" and \"hardwareModel\"".into(),
            });
        }
        Ok(config)
    }

    /// Tart's local serialisation: pretty-printed, `"key" : value`, slashes escaped.
    pub fn to_pretty_json(&self) -> Vec<u8> {
        tart_pretty_json(self)
    }
}

/// Serialises like Swift's `JSONEncoder` with `.prettyPrinted`, which tools that parse Tart's
/// output (and humans diffing configs made by macOS Tart) see.
pub fn tart_pretty_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, SwiftPrettyFormatter::default());
    value
        .serialize(&mut serializer)
        .expect("serialising plain data into memory cannot fail");
    out
}

/// Compact, in declaration order, slashes escaped: what Tart pushes as the VM config blob.
pub fn tart_compact_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, SwiftCompactFormatter);
    value
        .serialize(&mut serializer)
        .expect("serialising plain data into memory cannot fail");
    out
}

struct SwiftCompactFormatter;

impl Formatter for SwiftCompactFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        write_escaping_slashes(w, fragment)
    }
}

fn write_escaping_slashes<W: ?Sized + io::Write>(w: &mut W, fragment: &str) -> io::Result<()> {
    let mut parts = fragment.split('/');
    if let Some(first) = parts.next() {
        w.write_all(first.as_bytes())?;
    }
    for part in parts {
        w.write_all(b"\\/")?;
        w.write_all(part.as_bytes())?;
    }
    Ok(())
}

#[derive(Default)]
struct SwiftPrettyFormatter(PrettyFormatter<'static>);

/// Swift's pretty printer differs from serde_json's in two places: a space before the colon,
/// and `/` escaped as `\/`. Everything else is delegated.
impl Formatter for SwiftPrettyFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b" : ")
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        write_escaping_slashes(w, fragment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"{
  "version" : 1,
  "os" : "linux",
  "arch" : "arm64",
  "cpuCountMin" : 4,
  "cpuCount" : 4,
  "memorySizeMin" : 4294967296,
  "memorySize" : 4294967296,
  "macAddress" : "6e:35:1a:09:4c:b2",
  "display" : {
    "width" : 1024,
    "height" : 768
  },
  "diskFormat" : "raw"
}"#;

    fn parse(text: &str) -> Result<VmConfig> {
        VmConfig::from_json(text.as_bytes(), Path::new("config.json"))
    }

    #[test]
    fn spec_example_round_trips_byte_for_byte() {
        let config = parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(config.os, Os::Linux);
        assert_eq!(config.memory_size, 4 << 30);
        assert_eq!(String::from_utf8(config.to_pretty_json()).unwrap(), SPEC_EXAMPLE);
    }

    #[test]
    fn darwin_config_keeps_opaque_blobs_and_escapes_slashes() {
        let compact = r#"{"hardwareModel":"YnBsaXN0MDDTAQIDBAUGXxAZ\/RhdGFSZXByZXNlbnRhdGlvblZlcnNpb24=","displayRefit":true,"memorySize":8589934592,"cpuCount":4,"ecid":"YnBsaXN0MDDRAQJURUNJRBMAA\/dyD1u7rAgLAAAAAAAAAQEAAAAAAAAAAwAAAAAAAAAAAAAAAAAAABQ=","display":{"width":1920,"unit":"pt","height":1200},"memorySizeMin":8589934592,"macAddress":"ba:3f:15:5d:2c:0a","cpuCountMin":4,"version":1,"arch":"arm64","os":"darwin","diskFormat":"raw"}"#;
        let config = parse(compact).unwrap();
        assert_eq!(
            config.ecid.as_deref(),
            Some("YnBsaXN0MDDRAQJURUNJRBMAA/dyD1u7rAgLAAAAAAAAAQEAAAAAAAAAAwAAAAAAAAAAAAAAAAAAABQ=")
        );
        assert_eq!(config.display.to_string(), "1920x1200pt");
        let pretty = String::from_utf8(config.to_pretty_json()).unwrap();
        assert!(
            pretty.contains(r#""ecid" : "YnBsaXN0MDDRAQJURUNJRBMAA\/dyD1u7"#),
            "{pretty}"
        );
        let keys: Vec<&str> = pretty
            .lines()
            .filter(|line| line.starts_with("  \""))
            .map(|line| line.trim().split('"').nth(1).unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "version",
                "os",
                "arch",
                "ecid",
                "hardwareModel",
                "cpuCountMin",
                "cpuCount",
                "memorySizeMin",
                "memorySize",
                "macAddress",
                "display",
                "displayRefit",
                "diskFormat"
            ]
        );
        assert_eq!(parse(&pretty).unwrap(), config);
    }

    #[test]
    fn missing_optional_keys_take_tart_defaults() {
        let minimal = r#"{"version":1,"os":"linux","cpuCountMin":2,"cpuCount":2,"memorySizeMin":1,"memorySize":1,"macAddress":"02:00:00:00:00:01","diskFormat":"something-new"}"#;
        let config = parse(minimal).unwrap();
        assert_eq!(config.arch, Arch::Arm64);
        assert_eq!(config.display, Display::default());
        assert_eq!(config.display_refit, None);
        assert_eq!(config.disk_format, DiskFormat::Raw);
    }

    #[test]
    fn rejects_broken_configs_with_the_reason() {
        let not_json = parse("{not json").unwrap_err().to_string();
        assert!(not_json.starts_with("failed to parse config.json"), "{not_json}");
        let missing = parse(r#"{"version":1,"os":"linux"}"#).unwrap_err().to_string();
        assert!(missing.contains("missing field `cpuCountMin`"), "{missing}");
        let darwin = parse(
            r#"{"version":1,"cpuCountMin":2,"cpuCount":2,"memorySizeMin":1,"memorySize":1,"macAddress":"02:00:00:00:00:01"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(darwin.contains("ecid"), "{darwin}");
        let mac = parse(
            r#"{"version":1,"os":"linux","cpuCountMin":2,"cpuCount":2,"memorySizeMin":1,"memorySize":1,"macAddress":"nope"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(mac.contains("invalid MAC address"), "{mac}");
    }

    #[test]
    fn display_parsing() {
        assert_eq!("800x600".parse::<Display>().unwrap().to_string(), "800x600");
        assert_eq!("800x600px".parse::<Display>().unwrap().unit, Some(DisplayUnit::Pixel));
        assert!("800".parse::<Display>().is_err());
        assert!("axb".parse::<Display>().is_err());
    }
}
