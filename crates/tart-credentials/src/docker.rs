//! The Docker config file and `docker-credential-*` helpers.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use regex::Regex;
use serde::Deserialize;

use crate::{json_error_without_values, Credentials, Error, Source};

// Docker always pads, but hand-written configs and some tools do not; padding carries no meaning.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Unknown fields are ignored: the file also holds settings for Docker itself.
#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperResponse {
    username: String,
    secret: String,
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`. Tart itself ignores
/// `DOCKER_CONFIG`; honouring it lets CI jobs that relocate the Docker config share it with us.
fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let dir = match env("DOCKER_CONFIG").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(&env("HOME").filter(|home| !home.is_empty())?).join(".docker"),
    };
    Some(dir.join("config.json"))
}

pub(crate) fn lookup(host: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<(Credentials, Source)>, Error> {
    let Some(path) = config_path(env) else {
        return Ok(None);
    };
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::DockerConfigRead { path, source }),
    };
    let config: Config = serde_json::from_slice(&text).map_err(|error| Error::DockerConfigInvalid {
        path: path.clone(),
        reason: json_error_without_values(&error),
    })?;

    let auth = find_auth(&config.auths, host);
    if let Some((key, entry)) = auth {
        if let Some(credentials) = credentials_from_entry(entry, key, &path)? {
            return Ok(Some((credentials, Source::DockerConfig)));
        }
    }

    // A per-host helper is authoritative for its hosts, as in Docker: when it has nothing, the
    // global `credsStore` is not asked (it could be a different account, or prompt the user).
    if let Some((key, name)) = find_helper(&config.cred_helpers, host) {
        let origin = format!("credHelpers[\"{key}\"]");
        return Ok(run_helper(name, host, &origin, &path, env)?
            .map(|credentials| (credentials, Source::DockerHelper(name.clone()))));
    }

    if let Some(name) = config.creds_store.as_ref().filter(|name| !name.is_empty()) {
        // `docker login` with a credsStore leaves an empty `auths` entry under the exact server
        // address it stored the secret under (`https://index.docker.io/v1/` for Docker Hub), and
        // the store only finds the secret by that address.
        let server = auth.map_or(host, |(key, _)| key);
        return Ok(run_helper(name, server, "credsStore", &path, env)?
            .map(|credentials| (credentials, Source::DockerHelper(name.clone()))));
    }
    Ok(None)
}

/// The exact key first (Tart only knows that one), then keys Docker tools also write:
/// `https://host`, `http://host:5000/v2/` and the like.
fn find_auth<'a>(auths: &'a BTreeMap<String, AuthEntry>, host: &str) -> Option<(&'a str, &'a AuthEntry)> {
    auths
        .get_key_value(host)
        .or_else(|| auths.iter().find(|(key, _)| same_registry(registry_of_key(key), host)))
        .map(|(key, entry)| (key.as_str(), entry))
}

fn registry_of_key(key: &str) -> &str {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next().unwrap_or(rest)
}

/// Host names are case-insensitive, and Docker files Docker Hub under `index.docker.io` while
/// image references name it `docker.io` or `registry-1.docker.io`.
fn same_registry(a: &str, b: &str) -> bool {
    fn canonical(host: &str) -> String {
        let host = host.to_ascii_lowercase();
        match host.as_str() {
            "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
            _ => host,
        }
    }
    canonical(a) == canonical(b)
}

/// Tart reads only `auth`; the separate `username`/`password` fields (written by some tools and by
/// hand) are accepted too. An entry with neither is the placeholder a `credsStore` leaves.
fn credentials_from_entry(entry: &AuthEntry, key: &str, path: &Path) -> Result<Option<Credentials>, Error> {
    if let Some(auth) = entry.auth.as_deref().map(str::trim).filter(|auth| !auth.is_empty()) {
        let invalid = || Error::DockerAuthInvalid {
            path: path.to_owned(),
            key: key.to_owned(),
        };
        let decoded = String::from_utf8(BASE64.decode(auth).map_err(|_| invalid())?).map_err(|_| invalid())?;
        // Split at the first colon like Docker: Tart rejects passwords that contain one.
        let (username, password) = decoded.split_once(':').ok_or_else(invalid)?;
        return Ok(Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }));
    }
    Ok(match (&entry.username, &entry.password) {
        (Some(username), Some(password)) if !username.is_empty() => Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        }),
        _ => None,
    })
}

/// Exact key first, then keys as whole-string regular expressions (Tart supports keys like
/// `(.*).dkr.ecr.(.*).amazonaws.com`). Keys that are not valid regexes are skipped, as in Tart; the
/// map is sorted, so when several patterns match the choice is at least stable.
fn find_helper<'a>(helpers: &'a BTreeMap<String, String>, host: &str) -> Option<(&'a str, &'a String)> {
    helpers
        .get_key_value(host)
        .or_else(|| {
            helpers
                .iter()
                .find(|(pattern, _)| Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|regex| regex.is_match(host)))
        })
        .map(|(key, name)| (key.as_str(), name))
}

/// Runs `docker-credential-<name> get` with `server` on stdin. `origin` names the config entry that
/// chose the helper, for errors. `Ok(None)` when the helper has nothing for `server`.
fn run_helper(
    name: &str,
    server: &str,
    origin: &str,
    config: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Credentials>, Error> {
    let program = format!("docker-credential-{name}");
    let search_path = env("PATH");
    let executable = search_path
        .as_deref()
        .and_then(|search_path| find_in_path(&program, OsStr::new(search_path)))
        .ok_or_else(|| Error::HelperNotFound {
            program: program.clone(),
            origin: origin.to_owned(),
            config: config.to_owned(),
        })?;

    let mut command = Command::new(&executable);
    command
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Helpers run further tools (aws, gcloud, pass, gpg) by name: they must see the PATH that
    // found them, which may not be the process's own when an environment is passed in.
    if let Some(search_path) = &search_path {
        command.env("PATH", search_path);
    }
    let spawn_error = |source| Error::HelperSpawn {
        path: executable.clone(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading closes the pipe; its exit status says what happened.
        let _ = stdin.write_all(format!("{server}\n").as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_error)?;

    if !output.status.success() {
        let text = format!(
            "{} {}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let text = text.trim();
        // docker-credential-helpers' ErrCredentialsNotFound ("credentials not found in native
        // keychain"), used by every helper built on that library, means "none", not a failure.
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::HelperFailed {
            program,
            status: output.status,
            output: text.to_owned(),
        });
    }
    // Stdout of a successful helper holds the secret, so errors describe it without quoting it.
    let response: HelperResponse =
        serde_json::from_slice(&output.stdout).map_err(|error| Error::HelperResponseInvalid {
            program,
            reason: json_error_without_values(&error),
        })?;
    Ok(Some(Credentials {
        username: response.username,
        password: response.secret,
    }))
}

/// Like `execvp`, but over a PATH passed in. Empty entries (the current directory to POSIX) are
/// skipped so that a helper is never picked up from wherever `tart` happens to be run.
fn find_in_path(program: &str, search_path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(search_path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_of_key_strips_scheme_and_path() {
        assert_eq!(registry_of_key("ghcr.io"), "ghcr.io");
        assert_eq!(registry_of_key("https://ghcr.io"), "ghcr.io");
        assert_eq!(registry_of_key("http://localhost:5000/v2/"), "localhost:5000");
        assert_eq!(registry_of_key("https://index.docker.io/v1/"), "index.docker.io");
        assert_eq!(registry_of_key("example.com/v2/"), "example.com");
    }

    #[test]
    fn same_registry_ignores_case_and_docker_hub_aliases() {
        assert!(same_registry("GHCR.io", "ghcr.io"));
        assert!(same_registry("index.docker.io", "docker.io"));
        assert!(same_registry("registry-1.docker.io", "index.docker.io"));
        assert!(!same_registry("ghcr.io", "ghcr.io:443"));
    }

    #[test]
    fn unpadded_base64_is_accepted() {
        assert_eq!(BASE64.decode("dTpw").unwrap(), b"u:p");
        assert_eq!(BASE64.decode("dTpwMQ").unwrap(), b"u:p1");
        assert_eq!(BASE64.decode("dTpwMQ==").unwrap(), b"u:p1");
    }
}
