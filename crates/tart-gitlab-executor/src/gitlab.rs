//! What GitLab Runner hands a custom executor: the job's variables as `CUSTOM_ENV_*`, the exit
//! codes that mean "build failure" and "system failure", and per-job paths (`TMPDIR`,
//! `BUILD_EXIT_CODE_FILE`).

use std::env;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

/// The job as the stages see it.
pub struct Job {
    pub id: String,
    /// `CUSTOM_ENV_CI_JOB_IMAGE`; empty when the job names none.
    pub image: String,
    registry: Option<Registry>,
}

/// GitLab's own registry for the job (`CI_REGISTRY*`), whose credentials pull images too.
struct Registry {
    address: String,
    user: String,
    password: String,
}

impl Job {
    pub fn from_env() -> Result<Job> {
        let id = env::var("CUSTOM_ENV_CI_JOB_ID").map_err(|_| {
            anyhow!(
                "GitLab environment error: CUSTOM_ENV_CI_JOB_ID is missing \
                 (run this program as GitLab Runner's custom executor, which sets it)"
            )
        })?;
        // The id names the VM and a virtio-fs tag, and reaches the guest's shell.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            bail!("GitLab environment error: CUSTOM_ENV_CI_JOB_ID {id:?} is not a job id");
        }
        let registry = match (
            env::var("CUSTOM_ENV_CI_REGISTRY"),
            env::var("CUSTOM_ENV_CI_REGISTRY_USER"),
            env::var("CUSTOM_ENV_CI_REGISTRY_PASSWORD"),
        ) {
            (Ok(address), Ok(user), Ok(password)) => Some(Registry {
                address,
                user,
                password,
            }),
            _ => None,
        };
        Ok(Job {
            id,
            image: env::var("CUSTOM_ENV_CI_JOB_IMAGE").unwrap_or_default(),
            registry,
        })
    }

    /// Concurrency comes from unique job ids: one VM per job, no slots.
    pub fn vm_name(&self) -> String {
        format!("gitlab-{}", self.id)
    }

    /// The per-job host directory of `TART_EXECUTOR_HOST_DIR=true`, inside the runner's per-job
    /// `TMPDIR`, which the runner deletes after the job.
    pub fn host_dir(&self) -> PathBuf {
        env::temp_dir().join(format!("tart-executor-host-dir-{}", self.id))
    }

    /// The `tart run` output that prepare and run show in the job log.
    pub fn run_log(&self) -> PathBuf {
        env::temp_dir().join(format!("{}-tart-run-output.log", self.vm_name()))
    }

    /// The pid of the `tart run` that prepare started, for cleanup.
    pub fn run_pid_file(&self) -> PathBuf {
        env::temp_dir().join(format!("{}-tart-run.pid", self.vm_name()))
    }

    /// `TART_REGISTRY_*` for `tart pull`/`tart clone`: the user's `TART_REGISTRY_*` variables
    /// first, else the job's GitLab registry credentials.
    pub fn registry_env(&self) -> Vec<(String, String)> {
        let custom = |name: &str| env::var(format!("CUSTOM_ENV_TART_REGISTRY_{name}")).ok();
        if let (Some(user), Some(password)) = (custom("USERNAME"), custom("PASSWORD")) {
            let mut vars = vec![
                ("TART_REGISTRY_USERNAME".to_owned(), user),
                ("TART_REGISTRY_PASSWORD".to_owned(), password),
            ];
            if let Some(host) = custom("HOSTNAME") {
                vars.push(("TART_REGISTRY_HOSTNAME".to_owned(), host));
            }
            return vars;
        }
        match &self.registry {
            Some(registry) => vec![
                ("TART_REGISTRY_HOSTNAME".to_owned(), registry.address.clone()),
                ("TART_REGISTRY_USERNAME".to_owned(), registry.user.clone()),
                ("TART_REGISTRY_PASSWORD".to_owned(), registry.password.clone()),
            ],
            None => Vec::new(),
        }
    }
}

/// `BUILD_FAILURE_EXIT_CODE` or `SYSTEM_FAILURE_EXIT_CODE`; 1 when unset, as gitlab-tart-executor.
pub fn exit_code(name: &str) -> Result<i32> {
    match env::var(name) {
        Ok(value) if !value.is_empty() => value
            .parse()
            .map_err(|_| anyhow!("failed to parse {name}'s value {value:?}: not an integer")),
        _ => Ok(1),
    }
}
