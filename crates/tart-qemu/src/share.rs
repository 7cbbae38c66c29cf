//! `tart run --dir`: host directories shared with the guest over virtio-fs.
//!
//! QEMU only provides the `vhost-user-fs-pci` device; the file server is `virtiofsd`, one process
//! per tag (per device), started next to QEMU. Tart groups shares by mount tag: a tag with one
//! unnamed share exports that directory; a tag with named shares exports a directory whose
//! entries are the shares (Linux guests: `mount -t virtiofs <tag> /mnt` shows `/mnt/<name>`).
//! virtiofsd exports one directory, so for named shares we build that top level in the runtime
//! directory and bind-mount each share into it, in a mount namespace of virtiofsd's own: nothing
//! appears in the host's mount table, and it all goes away with the process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The tag macOS guests mount automatically at `/Volumes/My Shared Files`; Tart's default.
pub const DEFAULT_SHARE_TAG: &str = "com.apple.virtio-fs.automount";

/// virtio-fs keeps the tag in a fixed 36-byte field of the device's configuration.
const MAX_TAG_BYTES: usize = 36;

/// One virtio-fs device: a mount tag and what it exports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedDirectory {
    pub tag: String,
    pub content: ShareContent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShareContent {
    /// The directory itself is the root of the guest's mount.
    Directory { path: PathBuf, read_only: bool },
    /// A synthesized root with one entry per share.
    Named(Vec<NamedDirectory>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedDirectory {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// One `--dir` argument, before grouping.
#[derive(Debug)]
struct DirectoryArgument {
    name: Option<String>,
    path: PathBuf,
    read_only: bool,
    tag: String,
}

impl DirectoryArgument {
    /// `[name:]path[:options]`, options being `ro` and `tag=<TAG>` (comma-separated), recognised
    /// in the last `:`-component as Tart does.
    fn parse(argument: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidDirectoryShare {
            argument: argument.to_owned(),
            reason,
        };
        let mut read_only = false;
        let mut tag = DEFAULT_SHARE_TAG.to_owned();
        let mut rest = argument;
        if let Some((head, last)) = argument.rsplit_once(':') {
            let items: Vec<&str> = last.split(',').map(str::trim).collect();
            let is_option = |item: &str| item == "ro" || item.starts_with("tag=");
            if items.iter().any(|item| is_option(item)) {
                for item in items.into_iter().filter(|item| !item.is_empty()) {
                    match item.split_once('=') {
                        None if item == "ro" => read_only = true,
                        Some(("tag", value)) if value.is_empty() || value.len() > MAX_TAG_BYTES => {
                            return Err(invalid(format!("a tag has 1 to {MAX_TAG_BYTES} bytes, not {value:?}")))
                        }
                        Some(("tag", value)) => tag = value.to_owned(),
                        _ => return Err(invalid(format!("unknown option {item:?} (expected ro or tag=<TAG>)"))),
                    }
                }
                rest = head;
            }
        }
        if rest.starts_with("http:") || rest.starts_with("https:") {
            return Err(invalid(
                "sharing a remote archive is not supported; download and extract it, then share the directory".into(),
            ));
        }
        let (name, location) = match rest.split_once(':') {
            Some((name, location)) => (Some(name), location),
            None => (None, rest),
        };
        if let Some(name) = name {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(invalid(format!("{name:?} is not a valid share name")));
            }
        }
        if location.is_empty() {
            return Err(invalid("no directory".into()));
        }
        let path = match (location.strip_prefix("~/"), std::env::var_os("HOME")) {
            (Some(relative), Some(home)) => Path::new(&home).join(relative),
            _ => PathBuf::from(location),
        };
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => return Err(invalid(format!("{} is not a directory", path.display()))),
            Err(e) => return Err(invalid(format!("{}: {e}", path.display()))),
        }
        // virtiofsd changes into its own mount namespace; a relative path would mean nothing there.
        let path = std::fs::canonicalize(&path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        Ok(DirectoryArgument {
            name: name.map(str::to_owned),
            path,
            read_only,
            tag,
        })
    }
}

/// Parses and groups `--dir` arguments into virtio-fs devices, in order of first appearance of
/// each tag.
pub fn parse_directory_shares(arguments: &[String]) -> Result<Vec<SharedDirectory>> {
    let mut order: Vec<String> = Vec::new();
    let mut by_tag: BTreeMap<String, Vec<DirectoryArgument>> = BTreeMap::new();
    for argument in arguments {
        let share = DirectoryArgument::parse(argument)?;
        if !by_tag.contains_key(&share.tag) {
            order.push(share.tag.clone());
        }
        by_tag.entry(share.tag.clone()).or_default().push(share);
    }
    let mut devices = Vec::new();
    for tag in order {
        let mut shares = by_tag.remove(&tag).unwrap_or_default();
        let content = match shares.as_mut_slice() {
            [single] if single.name.is_none() => ShareContent::Directory {
                path: std::mem::take(&mut single.path),
                read_only: single.read_only,
            },
            _ => {
                if shares.iter().any(|share| share.name.is_none()) {
                    return Err(Error::InvalidDirectoryShare {
                        argument: tag,
                        reason: "invalid --dir syntax: for multiple directory shares each one of them should be named"
                            .into(),
                    });
                }
                let mut named: Vec<NamedDirectory> = Vec::new();
                for share in shares {
                    let name = share.name.unwrap_or_default();
                    if named.iter().any(|other| other.name == name) {
                        return Err(Error::InvalidDirectoryShare {
                            argument: tag,
                            reason: format!("two shares are named {name:?}"),
                        });
                    }
                    named.push(NamedDirectory {
                        name,
                        path: share.path,
                        read_only: share.read_only,
                    });
                }
                ShareContent::Named(named)
            }
        };
        devices.push(SharedDirectory { tag, content });
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, String, String) {
        let temp = tempfile::tempdir().unwrap();
        let a = temp.path().join("a");
        let b = temp.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let a = a.to_str().unwrap().to_owned();
        let b = b.to_str().unwrap().to_owned();
        (temp, a, b)
    }

    #[test]
    fn one_unnamed_share_exports_the_directory_under_the_default_tag() {
        let (_temp, a, _) = dirs();
        let shares = parse_directory_shares(&[format!("{a}:ro")]).unwrap();
        assert_eq!(
            shares,
            vec![SharedDirectory {
                tag: DEFAULT_SHARE_TAG.into(),
                content: ShareContent::Directory {
                    path: a.into(),
                    read_only: true
                },
            }]
        );
    }

    #[test]
    fn named_shares_of_one_tag_are_grouped_and_tags_keep_their_order() {
        let (_temp, a, b) = dirs();
        let shares =
            parse_directory_shares(&[format!("{a}:tag=first"), format!("src:{a}"), format!("out:{b}:ro")]).unwrap();
        assert_eq!(shares.len(), 2);
        assert_eq!(shares[0].tag, "first");
        assert_eq!(shares[1].tag, DEFAULT_SHARE_TAG);
        assert_eq!(
            shares[1].content,
            ShareContent::Named(vec![
                NamedDirectory {
                    name: "src".into(),
                    path: a.clone().into(),
                    read_only: false
                },
                NamedDirectory {
                    name: "out".into(),
                    path: b.into(),
                    read_only: true
                },
            ])
        );
    }

    #[test]
    fn bad_shares_are_refused_with_the_reason() {
        let (temp, a, b) = dirs();
        let err = |args: &[String]| parse_directory_shares(args).unwrap_err().to_string();
        assert!(err(&[a.clone(), b.clone()]).contains("each one of them should be named"));
        assert!(err(&[format!("x:{a}"), format!("x:{b}")]).contains("two shares are named \"x\""));
        let file = temp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(err(&[file.to_str().unwrap().into()]).ends_with("is not a directory"));
        assert!(err(&[format!("{a}-missing")]).contains("No such file or directory"));
        assert!(err(&[format!("{a}:ro,rw")]).contains("unknown option \"rw\""));
        assert!(err(&["https://example.com/x.tar.gz".into()]).contains("remote archive"));
    }
}
