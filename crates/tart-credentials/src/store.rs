//! The file that `tart login` writes, standing in for the macOS Keychain item Tart uses.
//!
//! Passwords are kept in plain JSON (`{"registries": {"host[:port]": {"username", "password"}}}`),
//! protected only by the file mode, as `docker login` does without a credential helper. The file is
//! always written 0600 through a temporary file and a rename, so a crash never leaves a half-written
//! or briefly readable store. Reading it for a lookup is refused while group or others have any
//! access to it, like OpenSSH does with private keys: the secrets may already have leaked, and
//! silently using them would hide that. `set` and `remove` still read such a file, because the
//! private rewrite they do is the repair.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{json_error_without_values, Credentials, Error};

/// Tart's own credential store: one JSON file, normally `$TART_HOME/credentials.json`.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct StoreFile {
    #[serde(default)]
    registries: BTreeMap<String, Entry>,
}

// Kept apart from `Credentials` so that the public type cannot be serialised with its password by
// accident.
#[derive(Serialize, Deserialize)]
struct Entry {
    username: String,
    password: String,
}

/// Host names are case-insensitive: `tart login GHCR.io` must serve pulls from `ghcr.io`.
fn key(host: &str) -> String {
    host.to_ascii_lowercase()
}

impl Store {
    /// A store kept in `path`; nothing is touched until it is used.
    pub fn new(path: PathBuf) -> Self {
        Store { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credentials stored for `host`; `Ok(None)` when there are none or the file does not exist.
    pub fn get(&self, host: &str) -> Result<Option<Credentials>, Error> {
        let Some(file) = self.load(true)? else {
            return Ok(None);
        };
        Ok(file.registries.get(&key(host)).map(|entry| Credentials {
            username: entry.username.clone(),
            password: entry.password.clone(),
        }))
    }

    /// Stores `credentials` for `host`, replacing earlier ones, creating the file (and its
    /// directory) when missing.
    pub fn set(&self, host: &str, credentials: &Credentials) -> Result<(), Error> {
        let mut file = self.load(false)?.unwrap_or_default();
        file.registries.insert(
            key(host),
            Entry {
                username: credentials.username.clone(),
                password: credentials.password.clone(),
            },
        );
        self.save(&file)
    }

    /// Forgets `host`; `Ok(false)` when nothing was stored for it, which is not an error.
    pub fn remove(&self, host: &str) -> Result<bool, Error> {
        let Some(mut file) = self.load(false)? else {
            return Ok(false);
        };
        if file.registries.remove(&key(host)).is_none() {
            return Ok(false);
        }
        self.save(&file)?;
        Ok(true)
    }

    fn load(&self, require_private: bool) -> Result<Option<StoreFile>, Error> {
        let read_error = |source| Error::StoreRead {
            path: self.path.clone(),
            source,
        };
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(read_error(error)),
        };
        if require_private {
            // The mode of the opened file, not of the path, so a swap in between cannot fool us.
            let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(Error::StoreNotPrivate {
                    path: self.path.clone(),
                    mode,
                });
            }
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(read_error)?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|error| Error::StoreInvalid {
                path: self.path.clone(),
                reason: json_error_without_values(&error),
            })
    }

    fn save(&self, file: &StoreFile) -> Result<(), Error> {
        let write_error = |source| Error::StoreWrite {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(write_error)?;
        // tempfile creates its files 0600, and the rename keeps that mode.
        let mut temp = tempfile::Builder::new()
            .prefix(".credentials.")
            .tempfile_in(dir)
            .map_err(write_error)?;
        let mut text = serde_json::to_vec_pretty(file).map_err(|error| write_error(error.into()))?;
        text.push(b'\n');
        temp.write_all(&text).map_err(write_error)?;
        temp.as_file().sync_all().map_err(write_error)?;
        temp.persist(&self.path).map_err(|error| write_error(error.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn credentials(username: &str, password: &str) -> Credentials {
        Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn set_get_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("home/credentials.json"));
        assert_eq!(store.get("ghcr.io").unwrap(), None);

        store.set("ghcr.io", &credentials("alice", "pw1")).unwrap();
        store.set("localhost:5000", &credentials("bob", "pw2")).unwrap();
        assert_eq!(store.get("ghcr.io").unwrap(), Some(credentials("alice", "pw1")));
        assert_eq!(store.get("GHCR.IO").unwrap(), Some(credentials("alice", "pw1")));
        assert_eq!(store.get("localhost:5000").unwrap(), Some(credentials("bob", "pw2")));
        assert_eq!(store.get("localhost").unwrap(), None);

        store.set("ghcr.io", &credentials("alice", "pw3")).unwrap();
        assert_eq!(store.get("ghcr.io").unwrap(), Some(credentials("alice", "pw3")));

        assert!(store.remove("ghcr.io").unwrap());
        assert_eq!(store.get("ghcr.io").unwrap(), None);
        assert_eq!(store.get("localhost:5000").unwrap(), Some(credentials("bob", "pw2")));
    }

    #[test]
    fn file_is_private_and_no_temporary_files_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        let store = Store::new(path.clone());
        store.set("ghcr.io", &credentials("alice", "pw")).unwrap();
        assert_eq!(mode(&path), 0o600);
        store.set("quay.io", &credentials("carol", "pw")).unwrap();
        assert_eq!(mode(&path), 0o600);
        store.remove("quay.io").unwrap();
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["credentials.json"]);
    }

    #[test]
    fn removing_a_missing_host_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        let store = Store::new(path.clone());
        assert!(!store.remove("ghcr.io").unwrap());
        assert!(!path.exists(), "removing from a missing store must not create it");
        store.set("quay.io", &credentials("carol", "pw")).unwrap();
        assert!(!store.remove("ghcr.io").unwrap());
        assert_eq!(store.get("quay.io").unwrap(), Some(credentials("carol", "pw")));
    }

    #[test]
    fn readable_by_others_is_refused_for_lookups_and_repaired_by_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        let store = Store::new(path.clone());
        store.set("ghcr.io", &credentials("alice", "topsecret")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

        let error = store.get("ghcr.io").unwrap_err();
        assert!(matches!(error, Error::StoreNotPrivate { mode: 0o644, .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("chmod 600"), "{message}");
        assert!(message.contains("0644"), "{message}");
        assert!(!message.contains("topsecret"));

        store.set("quay.io", &credentials("carol", "pw")).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(store.get("ghcr.io").unwrap(), Some(credentials("alice", "topsecret")));
    }

    #[test]
    fn invalid_file_error_does_not_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        fs::write(
            &path,
            r#"{"registries": {"ghcr.io": {"username": "a", "password": 12345678}}}"#,
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let error = Store::new(path.clone()).get("ghcr.io").unwrap_err();
        assert!(matches!(error, Error::StoreInvalid { .. }), "{error:?}");
        let message = error.to_string();
        assert!(!message.contains("12345678"), "{message}");
        assert!(message.contains("tart login"), "{message}");
    }
}
