//! GitLab Runner's side of the custom-executor contract (gitlab-runner's executors/custom:
//! executor.go, command/command.go; docs/executors/custom.md), played against any driver:
//!
//! - every stage gets the runner's environment: the job's variables as `CUSTOM_ENV_*`,
//!   `BUILD_FAILURE_EXIT_CODE=1`, `SYSTEM_FAILURE_EXIT_CODE=2`, a per-job `TMPDIR` that the runner
//!   creates and deletes, `JOB_RESPONSE_FILE` and `BUILD_EXIT_CODE_FILE`, and after `config`
//!   every key of its `job_env`;
//! - `config` must print JSON (retried twice more when it does not); `prepare` is tried up to
//!   three times, 3 s apart, on a system failure, each failed attempt followed by `cleanup`
//!   (common/build.go `retryCreateExecutor`); each sub-stage is one `run <script> <stage>` with
//!   the script in a real file; `cleanup` always runs and never changes the result;
//! - exit codes: 0 success, `BUILD_FAILURE_EXIT_CODE` a build failure (the script's own status in
//!   `BUILD_EXIT_CODE_FILE`), `SYSTEM_FAILURE_EXIT_CODE` a system failure, anything else an
//!   unknown failure;
//! - the job timeout, or a cancel: SIGTERM to the stage's process group, SIGKILL after the
//!   graceful period.
#![allow(dead_code)] // Each test binary uses its own part of the harness.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

pub mod lab;

const BUILD_FAILURE: i32 = 1;
const SYSTEM_FAILURE: i32 = 2;
const CONFIG_ATTEMPTS: u32 = 3;
const PREPARE_RETRY_DELAY: Duration = Duration::from_secs(3);

/// The `[runners.custom]` section of config.toml: one program for every stage, with the
/// stages' arguments.
#[derive(Clone)]
pub struct Executor {
    /// The program and any arguments before the stage's own (e.g. `ip netns exec NS driver`).
    pub command: Vec<OsString>,
    pub config_args: Vec<String>,
    pub prepare_args: Vec<String>,
    pub run_args: Vec<String>,
    pub cleanup_args: Vec<String>,
    /// GitLab Runner's PreparationRetries (3); tests of failures that cost a guest boot per
    /// attempt lower it.
    pub prepare_attempts: u32,
    /// The runner's own environment additions (config.toml `environment` is the job's, below).
    pub env: Vec<(String, String)>,
}

impl Executor {
    pub fn new(command: Vec<OsString>) -> Executor {
        Executor {
            command,
            config_args: vec!["config".into()],
            prepare_args: vec!["prepare".into()],
            run_args: vec!["run".into()],
            cleanup_args: vec!["cleanup".into()],
            prepare_attempts: 3,
            env: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum When {
    /// Skipped once the job failed (prepare_script … step_script, *_on_success).
    OnSuccess,
    /// Runs whatever happened, its failure ignored (after_script).
    Always,
    /// Only once the job failed (*_on_failure).
    OnFailure,
}

#[derive(Clone)]
pub struct Step {
    pub stage: &'static str,
    pub script: String,
    pub when: When,
}

/// A bash script as GitLab Runner generates them: strict mode, the commands, `exit 0`.
pub fn script(commands: &str) -> String {
    format!("#!/usr/bin/env bash\nset -eo pipefail\nset +o noclobber\n{commands}\nexit 0\n")
}

#[derive(Clone)]
pub struct Job {
    pub id: u64,
    pub image: String,
    /// Job variables (from .gitlab-ci.yml, the UI, config.toml `environment`).
    pub variables: Vec<(String, String)>,
    pub steps: Vec<Step>,
    pub timeout: Duration,
    pub graceful_kill: Duration,
    /// Cancel the job (as a user's "Cancel" does) once a line containing this appears.
    pub cancel_on: Option<String>,
}

impl Job {
    /// The usual sub-stages around `step`.
    pub fn new(id: u64, image: &str, step: &str) -> Job {
        let steps = vec![
            Step {
                stage: "prepare_script",
                script: script("echo \"Running on $(hostname)...\""),
                when: When::OnSuccess,
            },
            Step {
                stage: "get_sources",
                script: script("mkdir -p \"$CI_PROJECT_DIR\" && cd \"$CI_PROJECT_DIR\" && echo fetched >SOURCES"),
                when: When::OnSuccess,
            },
            Step {
                stage: "step_script",
                script: script(step),
                when: When::OnSuccess,
            },
            Step {
                stage: "after_script",
                script: script("echo after_script ran"),
                when: When::Always,
            },
            Step {
                stage: "upload_artifacts_on_failure",
                script: script("echo no artifacts"),
                when: When::OnFailure,
            },
        ];
        Job {
            id,
            image: image.to_owned(),
            variables: Vec::new(),
            steps,
            timeout: Duration::from_secs(900),
            graceful_kill: Duration::from_secs(10),
            cancel_on: None,
        }
    }

    pub fn variable(mut self, name: &str, value: &str) -> Job {
        self.variables.push((name.to_owned(), value.to_owned()));
        self
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// `exit_code`: what BUILD_EXIT_CODE_FILE said.
    BuildFailure {
        stage: String,
        exit_code: Option<i32>,
    },
    SystemFailure {
        stage: String,
    },
    UnknownFailure {
        stage: String,
        code: Option<i32>,
    },
    /// Timed out or cancelled.
    Killed {
        stage: String,
    },
}

pub struct Line {
    pub at: Instant,
    pub stage: String,
    pub text: String,
}

/// When each stage ran, and what it said.
pub struct Report {
    pub outcome: Outcome,
    pub started: Instant,
    pub spans: Vec<(String, Instant, Instant)>,
    pub log: Vec<Line>,
    pub config: serde_json::Value,
    pub cleanup_code: Option<i32>,
}

impl Report {
    pub fn text(&self) -> String {
        self.log
            .iter()
            .map(|line| format!("[{}] {}\n", line.stage, line.text))
            .collect()
    }

    pub fn stage_text(&self, stage: &str) -> String {
        self.log
            .iter()
            .filter(|line| line.stage == stage)
            .map(|line| format!("{}\n", line.text))
            .collect()
    }

    pub fn span(&self, stage: &str) -> Option<(Instant, Instant)> {
        self.spans
            .iter()
            .find(|(name, ..)| name == stage)
            .map(|(_, start, end)| (*start, *end))
    }

    /// Wall time from prepare's start to the first line of step_script, and from step_script's
    /// end to cleanup's end.
    pub fn overheads(&self) -> (Duration, Duration) {
        let (prepare, _) = self.span("prepare").expect("prepare ran");
        let first = self
            .log
            .iter()
            .find(|line| line.stage == "step_script")
            .expect("step_script printed")
            .at;
        let (_, script_end) = self.span("step_script").expect("step_script ran");
        let (_, cleanup_end) = self.span("cleanup").expect("cleanup ran");
        (first - prepare, cleanup_end - script_end)
    }

    /// Each stage's wall time, in order.
    pub fn timings(&self) -> String {
        self.spans
            .iter()
            .map(|(stage, start, end)| format!("{stage} {:.1}s", (*end - *start).as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One stage's process and how it ended.
struct Ended {
    code: Option<i32>,
    killed: bool,
    stdout: String,
}

struct Run<'a> {
    executor: &'a Executor,
    job: &'a Job,
    tmp: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// The variables every script exports.
    exports: Vec<(String, String)>,
    log: Arc<Mutex<Vec<Line>>>,
    spans: Vec<(String, Instant, Instant)>,
    deadline: Instant,
}

/// Runs `job` through `executor` as GitLab Runner would.
pub fn run_job(executor: &Executor, job: &Job) -> Report {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("custom-executor")
        .tempdir()
        .expect("the job's TMPDIR");
    let response = tmp.path().join("response.json");
    std::fs::write(
        &response,
        serde_json::json!({"id": job.id, "image": {"name": job.image}}).to_string(),
    )
    .unwrap();
    let mut env: Vec<(String, String)> = executor.env.clone();
    let mut variables = vec![
        ("CI_JOB_ID".to_owned(), job.id.to_string()),
        ("CI_JOB_IMAGE".to_owned(), job.image.clone()),
        ("CI_JOB_SERVICES".to_owned(), "[]".to_owned()),
        ("CI_CONCURRENT_PROJECT_ID".to_owned(), "0".to_owned()),
    ];
    variables.extend(job.variables.iter().cloned());
    for (name, value) in &variables {
        env.push((format!("CUSTOM_ENV_{name}"), value.clone()));
    }
    let mut exports = variables;
    env.extend([
        ("TMPDIR".to_owned(), tmp.path().to_string_lossy().into_owned()),
        ("BUILD_FAILURE_EXIT_CODE".to_owned(), BUILD_FAILURE.to_string()),
        ("SYSTEM_FAILURE_EXIT_CODE".to_owned(), SYSTEM_FAILURE.to_string()),
        ("JOB_RESPONSE_FILE".to_owned(), response.to_string_lossy().into_owned()),
        (
            "BUILD_EXIT_CODE_FILE".to_owned(),
            tmp.path().join("build-exit-code").to_string_lossy().into_owned(),
        ),
    ]);
    // Like the runner's generated scripts, each script exports the job's variables itself.
    exports.push(("CI_BUILDS_DIR".to_owned(), String::new()));
    let mut run = Run {
        executor,
        job,
        env,
        exports,
        tmp,
        log: Arc::default(),
        spans: Vec::new(),
        deadline: started + job.timeout,
    };
    let (outcome, config, cleaned) = run.stages();
    let cleanup = match cleaned {
        Some(code) => code,
        None => run.stage("cleanup", &executor.cleanup_args).code,
    };
    let log = std::mem::take(&mut *run.log.lock().unwrap());
    Report {
        outcome,
        started,
        spans: run.spans,
        log,
        config,
        cleanup_code: cleanup,
    }
}

impl Run<'_> {
    /// The stages up to cleanup; cleanup's exit code if a failed prepare attempt ran it already.
    fn stages(&mut self) -> (Outcome, serde_json::Value, Option<Option<i32>>) {
        let mut config = serde_json::Value::Null;
        for attempt in 1..=CONFIG_ATTEMPTS {
            let ended = self.stage("config", &self.executor.config_args.clone());
            if let Some(outcome) = self.failure("config", &ended) {
                return (outcome, config, None);
            }
            match serde_json::from_str::<serde_json::Value>(&ended.stdout) {
                Ok(value) => {
                    config = value;
                    break;
                }
                Err(err) if attempt == CONFIG_ATTEMPTS => {
                    self.note("config", format!("invalid JSON from config: {err}"));
                    return (Outcome::SystemFailure { stage: "config".into() }, config, None);
                }
                Err(_) => {}
            }
        }
        let driver = &config["driver"];
        if let (Some(name), Some(version)) = (driver["name"].as_str(), driver["version"].as_str()) {
            self.note(
                "config",
                format!("Using Custom executor with driver {name} {version}..."),
            );
        }
        if let Some(job_env) = config["job_env"].as_object() {
            for (key, value) in job_env {
                self.env
                    .push((key.clone(), value.as_str().unwrap_or_default().to_owned()));
            }
        }
        let builds_dir = config["builds_dir"].as_str().unwrap_or("/builds").to_owned();
        let project_dir = format!("{builds_dir}/project-{}", self.job.id);
        self.exports.retain(|(name, _)| name != "CI_BUILDS_DIR");
        for (name, value) in [("CI_BUILDS_DIR", builds_dir), ("CI_PROJECT_DIR", project_dir)] {
            self.env.push((format!("CUSTOM_ENV_{name}"), value.clone()));
            self.exports.push((name.to_owned(), value));
        }
        for attempt in 1..=self.executor.prepare_attempts {
            let ended = self.stage("prepare", &self.executor.prepare_args.clone());
            let Some(outcome) = self.failure("prepare", &ended) else {
                break;
            };
            let cleaned = self.stage("cleanup", &self.executor.cleanup_args.clone()).code;
            match outcome {
                Outcome::SystemFailure { .. } if attempt < self.executor.prepare_attempts => sleep(PREPARE_RETRY_DELAY),
                outcome => return (outcome, config, Some(cleaned)),
            }
        }
        let mut outcome = Outcome::Success;
        for (index, step) in self.job.steps.iter().enumerate() {
            let failed = outcome != Outcome::Success;
            let runs = match step.when {
                When::OnSuccess => !failed,
                When::Always => true,
                When::OnFailure => failed,
            };
            if !runs || matches!(outcome, Outcome::SystemFailure { .. } | Outcome::Killed { .. }) {
                continue;
            }
            let path = self
                .tmp
                .path()
                .join(format!("script{index}"))
                .join(format!("script.{}", step.stage));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, self.with_exports(&step.script)).unwrap();
            let exit_file = self.tmp.path().join("build-exit-code");
            let _ = std::fs::remove_file(&exit_file);
            let mut args = self.executor.run_args.clone();
            args.extend([path.to_string_lossy().into_owned(), step.stage.to_owned()]);
            let ended = self.stage(step.stage, &args);
            if let Some(failure) = self.failure(step.stage, &ended) {
                let ignored = step.when == When::Always && matches!(failure, Outcome::BuildFailure { .. });
                if !failed && !ignored {
                    outcome = failure;
                }
            }
        }
        (outcome, config, None)
    }

    /// `script` with the job's variables exported after its first (shebang) line.
    fn with_exports(&self, script: &str) -> String {
        let (shebang, body) = script.split_once('\n').unwrap_or((script, ""));
        let exports: String = self
            .exports
            .iter()
            .map(|(name, value)| format!("export {name}={}\n", shlex::try_quote(value).unwrap()))
            .collect();
        format!("{shebang}\n{exports}{body}")
    }

    /// The outcome a stage's end means, `None` for success.
    fn failure(&self, stage: &str, ended: &Ended) -> Option<Outcome> {
        let stage = stage.to_owned();
        if ended.killed {
            return Some(Outcome::Killed { stage });
        }
        match ended.code {
            Some(0) => None,
            Some(BUILD_FAILURE) => {
                let exit_code = std::fs::read_to_string(self.tmp.path().join("build-exit-code"))
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
                Some(Outcome::BuildFailure { stage, exit_code })
            }
            Some(SYSTEM_FAILURE) => Some(Outcome::SystemFailure { stage }),
            code => Some(Outcome::UnknownFailure { stage, code }),
        }
    }

    fn note(&self, stage: &str, text: String) {
        eprintln!("[job {} {stage}] {text}", self.job.id);
        self.log.lock().unwrap().push(Line {
            at: Instant::now(),
            stage: stage.to_owned(),
            text,
        });
    }

    /// One stage's process, in a process group of its own, until it exits or the job times out
    /// (cleanup has no deadline: the runner gives it its own, long one).
    fn stage(&mut self, stage: &str, args: &[String]) -> Ended {
        let mut command = Command::new(&self.executor.command[0]);
        command
            .args(&self.executor.command[1..])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let start = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("start {:?}: {err}", self.executor.command));
        // config's stdout is its answer; every other stage's output goes to the job log.
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let answer = Arc::new(Mutex::new(String::new()));
        let readers = [
            self.reader(stage, stdout, (stage == "config").then(|| answer.clone())),
            self.reader(stage, stderr, None),
        ];
        let (code, killed) = if stage == "cleanup" {
            (child.wait().unwrap().code(), false)
        } else {
            let log = self.log.clone();
            let cancel_on = self.job.cancel_on.clone();
            let deadline = self.deadline;
            let kill = move || {
                Instant::now() >= deadline
                    || cancel_on
                        .as_ref()
                        .is_some_and(|text| log.lock().unwrap().iter().any(|line| line.text.contains(text)))
            };
            kill_when(&mut child, kill, self.job.graceful_kill)
        };
        for reader in readers {
            reader.join().unwrap();
        }
        self.spans.push((stage.to_owned(), start, Instant::now()));
        if killed {
            self.note(stage, "ERROR: Job failed: canceled or timed out".into());
        }
        let stdout = answer.lock().unwrap().clone();
        Ended { code, killed, stdout }
    }

    fn reader(
        &self,
        stage: &str,
        pipe: impl std::io::Read + Send + 'static,
        answer: Option<Arc<Mutex<String>>>,
    ) -> thread::JoinHandle<()> {
        let log = self.log.clone();
        let stage = stage.to_owned();
        let id = self.job.id;
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(text) = line else { break };
                if let Some(answer) = &answer {
                    let mut answer = answer.lock().unwrap();
                    answer.push_str(&text);
                    answer.push('\n');
                    continue;
                }
                eprintln!("[job {id} {stage}] {text}");
                log.lock().unwrap().push(Line {
                    at: Instant::now(),
                    stage: stage.clone(),
                    text,
                });
            }
        })
    }
}

/// Waits for `child`; once `kill` says so, SIGTERM to its process group, then SIGKILL after
/// `graceful`. Its exit code (None when killed by a signal) and whether it was killed.
fn kill_when(child: &mut Child, kill: impl Fn() -> bool, graceful: Duration) -> (Option<i32>, bool) {
    let group = -(child.id() as libc::pid_t);
    let mut killed_at: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), killed_at.is_some());
        }
        let now = Instant::now();
        match killed_at {
            None if kill() => {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(group, libc::SIGTERM) };
                killed_at = Some(now);
            }
            Some(at) if now >= at + graceful => {
                // SAFETY: as above.
                unsafe { libc::kill(group, libc::SIGKILL) };
            }
            _ => {}
        }
        sleep(Duration::from_millis(50));
    }
}

/// The driver binary this crate builds, and the `tart` beside it (built on first use: the
/// executor finds `tart` next to itself, as when installed from the package).
pub fn executor_binary() -> PathBuf {
    static TART: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let executor = PathBuf::from(env!("CARGO_BIN_EXE_tart-gitlab-executor"));
    TART.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "tart", "--bin", "tart"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p tart");
        assert!(status.success(), "cargo build -p tart failed");
    });
    assert!(
        tart_beside(&executor).is_file(),
        "no tart next to {}",
        executor.display()
    );
    executor
}

pub fn tart_beside(executor: &Path) -> PathBuf {
    executor.parent().unwrap().join("tart")
}
