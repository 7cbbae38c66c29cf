//! cloud-init NoCloud seeds for tart's VMs.
//!
//! A VM made from a cloud image keeps its seed in `<vm>/cloud-init/` (`user-data`, `meta-data`,
//! optional `network-config`), so it travels with `clone` and can be edited with `tart set
//! --user-data`. `tart run` hands it to the guest as a small read-only FAT disk labelled
//! `CIDATA`, which cloud-init's NoCloud datasource finds by its label.
//!
//! cloud-init runs its per-instance work (users, SSH host keys, hostname, `runcmd`) again
//! whenever `meta-data`'s `instance-id` changes, so every `create`, `clone` and new user-data
//! gets a new one: a clone boots as a new machine.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

mod image;

pub use image::write_cidata_image;

const USER_DATA: &str = "user-data";
const META_DATA: &str = "meta-data";
const NETWORK_CONFIG: &str = "network-config";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0} is not cloud-init user-data: it must start with \"#cloud-config\" (a YAML config) or \"#!\" (a script)"
    )]
    NotUserData(String),
    #[error("the cloud-init seed in {dir} has no {file}: restore it, or write a new seed with `tart set <vm> --user-data <file>`")]
    Incomplete { dir: String, file: &'static str },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The files of a NoCloud seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub user_data: Vec<u8>,
    pub meta_data: Vec<u8>,
    pub network_config: Option<Vec<u8>>,
}

impl Seed {
    /// A seed for a new instance named `hostname` with the given user-data.
    pub fn new(user_data: Vec<u8>, hostname: &str) -> Self {
        Seed {
            user_data,
            meta_data: meta_data(&new_instance_id(), hostname),
            network_config: None,
        }
    }

    /// The seed in `dir`, `None` when there is none; a seed missing one of its required files
    /// is an error rather than something the guest would silently ignore.
    pub fn load(dir: &Path) -> Result<Option<Seed>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let read = |file: &'static str| match fs::read(dir.join(file)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(io_context(format!("failed to read {}", dir.join(file).display()))(err)),
        };
        let incomplete = |file| Error::Incomplete {
            dir: dir.display().to_string(),
            file,
        };
        Ok(Some(Seed {
            user_data: read(USER_DATA)?.ok_or_else(|| incomplete(USER_DATA))?,
            meta_data: read(META_DATA)?.ok_or_else(|| incomplete(META_DATA))?,
            network_config: read(NETWORK_CONFIG)?,
        }))
    }

    /// Writes the seed into `dir`, each file replaced atomically (written aside, synced,
    /// renamed), so an interrupted write leaves the old file or the new one.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(io_context(format!("failed to create {}", dir.display())))?;
        write_atomically(dir, USER_DATA, &self.user_data)?;
        write_atomically(dir, META_DATA, &self.meta_data)?;
        match &self.network_config {
            Some(config) => write_atomically(dir, NETWORK_CONFIG, config)?,
            None => match fs::remove_file(dir.join(NETWORK_CONFIG)) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(io_context("failed to remove network-config")(err))
                }
                _ => {}
            },
        }
        sync_dir(dir)
    }

    /// The same seed as a new instance named `hostname` (for a clone, or new user-data).
    pub fn renewed(&self, hostname: &str) -> Seed {
        Seed {
            meta_data: meta_data(&new_instance_id(), hostname),
            ..self.clone()
        }
    }

    /// `meta-data`'s `instance-id`, as written by tart.
    pub fn instance_id(&self) -> Option<String> {
        String::from_utf8_lossy(&self.meta_data).lines().find_map(|line| {
            let value = line.strip_prefix("instance-id:")?.trim();
            Some(serde_json::from_str::<String>(value).unwrap_or_else(|_| value.to_owned()))
        })
    }
}

/// Refuses what cloud-init would not run: tart accepts a `#cloud-config` YAML document or a
/// `#!` script, and nothing else (`source` names the input in the message).
pub fn validate_user_data(source: &str, bytes: &[u8]) -> Result<()> {
    let text = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    if text.starts_with(b"#cloud-config") || text.starts_with(b"#!") {
        Ok(())
    } else {
        Err(Error::NotUserData(source.to_owned()))
    }
}

/// The Tart image convention, which the GitLab executor, Orchard and Packer rely on: user
/// `admin` with password `admin` and passwordless sudo, plus `ssh_keys` for key logins. The
/// root filesystem grows to the disk at every boot (`tart set --disk-size`).
pub fn default_user_data(ssh_keys: &[String]) -> Vec<u8> {
    let keys: String = ssh_keys
        .iter()
        .map(|key| format!("      - {}\n", serde_json::Value::from(key.trim())))
        .collect();
    let keys = if keys.is_empty() {
        String::new()
    } else {
        format!("    ssh_authorized_keys:\n{keys}")
    };
    format!(
        "#cloud-config\n\
         # Written by tart: replace it with `tart set <vm> --user-data <file>`.\n\
         users:\n\
         \x20 - name: admin\n\
         \x20   gecos: admin\n\
         \x20   groups: [sudo]\n\
         \x20   shell: /bin/bash\n\
         \x20   sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n\
         \x20   lock_passwd: false\n\
         {keys}\
         chpasswd:\n\
         \x20 expire: false\n\
         \x20 users:\n\
         \x20   - {{name: admin, password: admin, type: text}}\n\
         ssh_pwauth: true\n\
         growpart:\n\
         \x20 mode: auto\n\
         \x20 devices: [\"/\"]\n\
         resize_rootfs: true\n"
    )
    .into_bytes()
}

/// The public keys in `~/.ssh/*.pub` of the user who invoked tart (under sudo, the user who
/// ran sudo, whose keys are the ones they log in with), sorted by file name.
pub fn invoking_user_ssh_keys() -> Vec<String> {
    let Some(home) = invoking_user_home() else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(home.join(".ssh")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "pub"))
        .collect();
    files.sort();
    files
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .flat_map(|text| text.lines().map(str::trim).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

fn invoking_user_home() -> Option<PathBuf> {
    if let Some(user) = std::env::var_os("SUDO_USER") {
        let passwd = fs::read_to_string("/etc/passwd").ok()?;
        return passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 5 && fields[0] == user).then(|| PathBuf::from(fields[5]))
        });
    }
    std::env::var_os("HOME").map(PathBuf::from)
}

/// An identifier cloud-init has never seen.
pub fn new_instance_id() -> String {
    format!("iid-{}", uuid::Uuid::new_v4())
}

/// `meta-data` naming the instance and its hostname. A VM name may hold characters a hostname
/// cannot (`_`, `.`, spaces): they become `-`.
pub fn meta_data(instance_id: &str, vm_name: &str) -> Vec<u8> {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        serde_json::Value::from(instance_id),
        serde_json::Value::from(hostname_for(vm_name))
    )
    .into_bytes()
}

fn hostname_for(vm_name: &str) -> String {
    let name: String = vm_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "tart".to_owned()
    } else {
        name.to_owned()
    }
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let aside = dir.join(format!(".{name}.new"));
    let context = || format!("failed to write {}", path.display());
    let mut file = fs::File::create(&aside).map_err(io_context(context()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&aside, &path))
        .map_err(io_context(context()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_context(format!("failed to sync {}", dir.display())))
}

#[cfg(test)]
mod tests;
