//! Paths inside a container image: tar entry names, link targets and whiteouts, all taken as
//! `/`-separated components below the image root (`./disk/a`, `/disk/a` and `disk/a` are one
//! path, written `disk/a`).

use anyhow::{bail, Result};

/// The directory KubeVirt looks in (`DiskSourceFallbackPath`).
pub(crate) const DISK_DIR: &str = "disk";

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// The path of a tar entry. A `..` component is refused wherever it stands: no image tool
/// writes one, and an extractor that honoured it would write outside its root.
pub(crate) fn entry_path(name: &str) -> Result<String> {
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => bail!("the entry {name:?} has a \"..\" component, a path escaping the image root"),
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// A user's name for a file of the image's `/disk` (`/disk/a.qcow2`, `disk/a.qcow2`,
/// `./disk/a.qcow2`), as the image root-relative path the extractor keys files by.
pub fn disk_file(name: &str) -> Result<String> {
    let path = entry_path(name)?;
    if !is_within(&path, DISK_DIR) || path == DISK_DIR {
        bail!("{name:?} is not a file in /disk: a containerDisk's disk is one of the files there");
    }
    Ok(path)
}

/// Where a link's target lies: a symlink's relative to the directory holding the link, an
/// absolute one (and every hard link's) from the image root, as the container runtime resolves
/// them. `None` when `..` climbs above the root.
pub(crate) fn link_target(base_dir: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        base_dir.split('/').filter(|part| !part.is_empty()).collect()
    };
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

/// The directory holding `path` (`""` for the root).
pub(crate) fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Whether `path` is `dir` or lies below it.
pub(crate) fn is_within(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// What a whiteout entry of a layer hides in the layers below it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout {
    /// `.wh.<name>`: that path and everything below it.
    Path(String),
    /// `.wh..wh..opq`: everything below that directory.
    Contents(String),
}

pub(crate) fn whiteout(path: &str) -> Option<Whiteout> {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name == OPAQUE_WHITEOUT {
        return Some(Whiteout::Contents(dir.to_owned()));
    }
    let hidden = name.strip_prefix(WHITEOUT_PREFIX)?;
    Some(Whiteout::Path(if dir.is_empty() {
        hidden.to_owned()
    } else {
        format!("{dir}/{hidden}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_name_one_path() {
        for name in ["disk/a.qcow2", "./disk/a.qcow2", "/disk/a.qcow2", "disk//./a.qcow2"] {
            assert_eq!(entry_path(name).unwrap(), "disk/a.qcow2", "{name}");
        }
        assert_eq!(entry_path("./").unwrap(), "");
    }

    #[test]
    fn dot_dot_is_refused_anywhere() {
        for name in ["../etc/passwd", "disk/../../x", "./disk/../disk/a", "/.."] {
            let err = entry_path(name).unwrap_err().to_string();
            assert!(err.contains("escaping the image root"), "{name}: {err}");
        }
    }

    #[test]
    fn link_targets_resolve_inside_the_root() {
        assert_eq!(link_target("disk", "a.qcow2").as_deref(), Some("disk/a.qcow2"));
        assert_eq!(link_target("disk", "./sub/../a").as_deref(), Some("disk/a"));
        assert_eq!(link_target("disk", "/images/a").as_deref(), Some("images/a"));
        assert_eq!(link_target("disk", "../images/a").as_deref(), Some("images/a"));
        assert_eq!(link_target("disk", "../../etc/shadow"), None);
        assert_eq!(link_target("", "../x"), None);
        assert_eq!(link_target("", "/../x"), None);
    }

    #[test]
    fn whiteouts() {
        assert_eq!(whiteout("disk/.wh.a.img"), Some(Whiteout::Path("disk/a.img".into())));
        assert_eq!(whiteout(".wh.disk"), Some(Whiteout::Path("disk".into())));
        assert_eq!(whiteout("disk/.wh..wh..opq"), Some(Whiteout::Contents("disk".into())));
        assert_eq!(whiteout("disk/a.wh.b"), None);
        assert_eq!(whiteout("disk/a.img"), None);
    }

    #[test]
    fn within() {
        assert!(is_within("disk/a", "disk"));
        assert!(is_within("disk", "disk"));
        assert!(!is_within("disks/a", "disk"));
        assert!(is_within("anything", ""));
        assert_eq!(parent("disk/a"), "disk");
        assert_eq!(parent("disk"), "");
    }
}
