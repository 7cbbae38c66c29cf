//! The `TART_EXECUTOR_*` job variables (`CUSTOM_ENV_TART_EXECUTOR_*` in the executor's
//! environment), with gitlab-tart-executor's names and defaults, plus `SSH_KEY_PATH` and
//! `BOOT_TIMEOUT`, which it lacks.

use std::env;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

const PREFIX: &str = "CUSTOM_ENV_TART_EXECUTOR_";

/// The executor's own variables, un-prefixed: GitLab Runner sets them from `config`'s `job_env`
/// and the job cannot override them.
pub const BUILDS_DIR: &str = "TART_EXECUTOR_INTERNAL_BUILDS_DIR";
pub const BUILDS_DIR_ON_HOST: &str = "TART_EXECUTOR_INTERNAL_BUILDS_DIR_ON_HOST";
pub const CACHE_DIR: &str = "TART_EXECUTOR_INTERNAL_CACHE_DIR";
pub const CACHE_DIR_ON_HOST: &str = "TART_EXECUTOR_INTERNAL_CACHE_DIR_ON_HOST";

pub struct Settings {
    pub ssh_username: String,
    pub ssh_password: String,
    /// A private key on the host; when set, SSH logs in with it instead of the password.
    pub ssh_key_path: Option<PathBuf>,
    pub ssh_port: u16,
    pub bridged: Option<String>,
    pub softnet: bool,
    pub softnet_allow: Option<String>,
    pub headless: bool,
    pub random_mac: bool,
    pub root_disk_opts: Option<String>,
    pub always_pull: bool,
    pub insecure_pull: bool,
    pub pull_concurrency: Option<u8>,
    pub host_dir: bool,
    pub shell: Option<String>,
    pub install_gitlab_runner: Option<String>,
    pub timezone: Option<String>,
    pub display: Option<String>,
    /// How long prepare and run wait for the VM's address and SSH. gitlab-tart-executor's
    /// effective limit: ten `tart ip --wait 60` attempts.
    pub boot_timeout: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        Ok(Settings {
            ssh_username: text("SSH_USERNAME").unwrap_or_else(|| "admin".to_owned()),
            ssh_password: text("SSH_PASSWORD").unwrap_or_else(|| "admin".to_owned()),
            ssh_key_path: text("SSH_KEY_PATH").map(PathBuf::from),
            ssh_port: number("SSH_PORT")?.unwrap_or(22),
            bridged: text("BRIDGED"),
            softnet: boolean("SOFTNET", false)?,
            softnet_allow: text("SOFTNET_ALLOW"),
            headless: boolean("HEADLESS", true)?,
            random_mac: boolean("RANDOM_MAC", true)?,
            root_disk_opts: text("ROOT_DISK_OPTS"),
            always_pull: boolean("ALWAYS_PULL", true)?,
            insecure_pull: boolean("INSECURE_PULL", false)?,
            pull_concurrency: number("PULL_CONCURRENCY")?,
            host_dir: boolean("HOST_DIR", false)?,
            shell: text("SHELL"),
            install_gitlab_runner: text("INSTALL_GITLAB_RUNNER"),
            timezone: text("TIMEZONE"),
            display: text("DISPLAY"),
            boot_timeout: Duration::from_secs(number("BOOT_TIMEOUT")?.unwrap_or(600)),
        })
    }
}

/// A set, non-empty variable (caarlos0/env treats empty as unset).
fn text(name: &str) -> Option<String> {
    env::var(format!("{PREFIX}{name}"))
        .ok()
        .filter(|value| !value.is_empty())
}

fn number<T: std::str::FromStr>(name: &str) -> Result<Option<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text(name)
        .map(|value| {
            value.parse().with_context(|| {
                format!("failed to load config from environment: TART_EXECUTOR_{name}={value:?} is not a valid number")
            })
        })
        .transpose()
}

/// Go's `strconv.ParseBool`, which gitlab-tart-executor's variables follow.
fn boolean(name: &str, default: bool) -> Result<bool> {
    match text(name).as_deref() {
        None => Ok(default),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(anyhow!(
            "failed to load config from environment: TART_EXECUTOR_{name}={other:?} is not a boolean (use true or false)"
        )),
    }
}
