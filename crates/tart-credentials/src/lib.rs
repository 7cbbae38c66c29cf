//! Registry credentials for a `host[:port]`, found the way Tart finds them (spec §5.3):
//! environment variables, then the Docker config (`auths`, `credHelpers`, and — unlike Tart —
//! `credsStore`), then the file store that `tart login` writes, which replaces the macOS Keychain.
//!
//! The `docker_credential` crate was not used: it reads `DOCKER_CONFIG`/`HOME` and `PATH` only from
//! the process environment (so tests would have to mutate global state), does not treat
//! `credHelpers` keys as regular expressions as Tart does, does not turn a helper's "credentials not
//! found" into "no credentials", and its errors do not say which config entry named a helper.

mod docker;
mod error;
mod store;

use std::fmt;

pub use error::Error;
pub use store::Store;

/// A username and password for HTTP Basic auth or a token request.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

// Credentials end up in `{:?}` of larger structs and in logs; the password must never go with them.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where credentials were found, so that messages can tell the user what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `TART_REGISTRY_USERNAME` / `TART_REGISTRY_PASSWORD`.
    Environment,
    /// An `auths` entry of the Docker config.
    DockerConfig,
    /// `docker-credential-<name>`, named by `credHelpers` or `credsStore`; holds `<name>`.
    DockerHelper(String),
    /// The store written by `tart login`.
    TartStore,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Environment => f.write_str("environment variables TART_REGISTRY_USERNAME/TART_REGISTRY_PASSWORD"),
            Source::DockerConfig => f.write_str("Docker config"),
            Source::DockerHelper(name) => write!(f, "docker-credential-{name}"),
            Source::TartStore => f.write_str("Tart credential store (tart login)"),
        }
    }
}

/// Finds credentials for `host` (`host[:port]`, as in a remote name).
///
/// Sources are tried in order: environment, Docker config, `store`. As in Tart, a source that fails
/// does not stop the later ones; when no source has credentials the first failure is returned, so
/// the caller can print Tart's `Failed to retrieve credentials …, authentication may fail: <e>` and
/// carry on anonymously. `HOME`, `DOCKER_CONFIG` and `PATH` are read when this is called.
pub fn lookup(host: &str, store: &Store) -> Result<Option<(Credentials, Source)>, Error> {
    lookup_with(host, &|name| std::env::var(name).ok(), store)
}

/// [`lookup`] with the environment passed in, so tests need not mutate the process environment.
fn lookup_with(
    host: &str,
    env: &dyn Fn(&str) -> Option<String>,
    store: &Store,
) -> Result<Option<(Credentials, Source)>, Error> {
    if let Some(credentials) = from_environment(host, env) {
        return Ok(Some((credentials, Source::Environment)));
    }
    let mut first_error = None;
    match docker::lookup(host, env) {
        Ok(Some(found)) => return Ok(Some(found)),
        Ok(None) => {}
        Err(error) => first_error = Some(error),
    }
    match store.get(host) {
        Ok(Some(credentials)) => return Ok(Some((credentials, Source::TartStore))),
        Ok(None) => {}
        Err(error) => {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(None), Err)
}

/// Tart's EnvironmentCredentialsProvider: a set-but-different `TART_REGISTRY_HOSTNAME` (even an
/// empty one) disables the variables, and empty username/password values still count as set.
fn from_environment(host: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<Credentials> {
    if env("TART_REGISTRY_HOSTNAME").is_some_and(|only| only != host) {
        return None;
    }
    Some(Credentials {
        username: env("TART_REGISTRY_USERNAME")?,
        password: env("TART_REGISTRY_PASSWORD")?,
    })
}

/// Describes a JSON error without quoting the input: serde's type errors echo the offending value
/// (`invalid type: string "hunter2"`), and the input here holds secrets.
fn json_error_without_values(error: &serde_json::Error) -> String {
    match error.classify() {
        serde_json::error::Category::Data => {
            format!(
                "unexpected field type at line {} column {}",
                error.line(),
                error.column()
            )
        }
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests;
