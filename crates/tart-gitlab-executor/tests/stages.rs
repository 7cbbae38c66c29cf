//! Each stage on its own and jobs that fail before a VM boots, through the runner harness:
//! every failure is the right kind with a one-line reason, and cleanup leaves nothing behind.
//! No guest and no network namespace: nothing here reaches `tart run`.

mod harness;

use std::path::Path;
use std::process::{Command, Output};

use harness::{executor_binary, run_job, tart_beside, Executor, Job, Outcome};
use tart_testkit::Registry;

fn executor_in(home: &Path) -> Executor {
    let mut executor = Executor::new(vec![executor_binary().into()]);
    executor.env = vec![("TART_HOME".into(), home.to_string_lossy().into_owned())];
    executor
}

/// A stage run directly, with GitLab's exit codes and `env`.
fn stage(args: &[&str], env: &[(&str, &str)]) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    Command::new(executor_binary())
        .args(args)
        .env("TMPDIR", tmp.path())
        .env("BUILD_FAILURE_EXIT_CODE", "1")
        .env("SYSTEM_FAILURE_EXIT_CODE", "2")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn local_vms(home: &Path) -> String {
    let out = Command::new(tart_beside(&executor_binary()))
        .args(["list", "--quiet", "--source", "local"])
        .env("TART_HOME", home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn config_prints_guest_directories_and_the_shares_job_env() {
    let tmp = tempfile::tempdir().unwrap();
    let builds = tmp.path().join("builds");
    let out = stage(
        &["config", "--builds-dir", "$BASE/builds", "--guest-cache-dir", "/cache"],
        &[("CUSTOM_ENV_CI_JOB_ID", "7"), ("BASE", tmp.path().to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["builds_dir"], "/var/tmp/builds");
    assert_eq!(config["cache_dir"], "/cache");
    assert_eq!(config["driver"]["name"], "tart");
    let job_env = &config["job_env"];
    assert_eq!(
        job_env["TART_EXECUTOR_INTERNAL_BUILDS_DIR_ON_HOST"],
        builds.to_str().unwrap()
    );
    assert_eq!(job_env["TART_EXECUTOR_INTERNAL_BUILDS_DIR"], "/var/tmp/builds");
    assert_eq!(job_env["TART_EXECUTOR_INTERNAL_CACHE_DIR"], "/cache");
    assert!(job_env.get("TART_EXECUTOR_INTERNAL_CACHE_DIR_ON_HOST").is_none());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&builds).unwrap().permissions().mode() & 0o777, 0o700);

    // TART_EXECUTOR_HOST_DIR: a per-job directory in the runner's TMPDIR.
    let out = stage(
        &["config"],
        &[
            ("CUSTOM_ENV_CI_JOB_ID", "7"),
            ("CUSTOM_ENV_TART_EXECUTOR_HOST_DIR", "true"),
        ],
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let host_dir = config["job_env"]["TART_EXECUTOR_INTERNAL_BUILDS_DIR_ON_HOST"]
        .as_str()
        .unwrap();
    assert!(host_dir.ends_with("/tart-executor-host-dir-7"), "{host_dir}");
}

#[test]
fn bad_configuration_is_a_system_failure_with_one_line() {
    // A stage's arguments, its environment, and the reason it must give.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (&["config"], &[], "CUSTOM_ENV_CI_JOB_ID is missing"),
        (&["prepare"], &[], "CUSTOM_ENV_CI_JOB_ID is missing"),
        (&["cleanup"], &[], "CUSTOM_ENV_CI_JOB_ID is missing"),
        (
            &["config", "--builds-dir", "/b", "--guest-builds-dir", "/g"],
            &[("CUSTOM_ENV_CI_JOB_ID", "1")],
            "--builds-dir and --guest-builds-dir are mutually exclusive",
        ),
        (
            &["prepare"],
            &[
                ("CUSTOM_ENV_CI_JOB_ID", "1"),
                ("CUSTOM_ENV_TART_EXECUTOR_SOFTNET", "maybe"),
            ],
            "TART_EXECUTOR_SOFTNET=\"maybe\" is not a boolean",
        ),
        (
            &["prepare"],
            &[("CUSTOM_ENV_CI_JOB_ID", "1")],
            "the job names no image (CI_JOB_IMAGE) and no --default-image was set",
        ),
    ];
    for (args, env, reason) in cases {
        let out = stage(args, env);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(reason), "{args:?}: {text}");
        assert_eq!(text.trim().lines().count(), 1, "{args:?}: {text}");
    }
    // An executor without tart beside it or on PATH.
    let alone = tempfile::tempdir().unwrap();
    let copy = alone.path().join("tart-gitlab-executor");
    std::fs::copy(executor_binary(), &copy).unwrap();
    let out = Command::new(&copy)
        .arg("cleanup")
        .env("PATH", alone.path())
        .env("CUSTOM_ENV_CI_JOB_ID", "1")
        .env("SYSTEM_FAILURE_EXIT_CODE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("tart command not found"), "{}", stderr(&out));
    // run without a job id or script: a system failure too, not the script's failure.
    let script = tempfile::NamedTempFile::new().unwrap();
    let out = stage(&["run", script.path().to_str().unwrap(), "step_script"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("CUSTOM_ENV_CI_JOB_ID is missing"));
    let out = stage(
        &["run", "/nonexistent/script", "step_script"],
        &[("CUSTOM_ENV_CI_JOB_ID", "1")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("failed to open the script /nonexistent/script"),
        "{}",
        stderr(&out)
    );
}

/// Images refused by --allow-image, a registry that is down, one that refuses the job's
/// credentials: system failures in prepare (retried as the runner does), a one-line reason in
/// the job log, and cleanup finds nothing to remove.
#[test]
fn jobs_whose_image_cannot_be_had_fail_in_prepare_and_leave_nothing() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::basic("ci", "right");
    let image = format!("{}/ci/debian:12", registry.host());
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };

    let mut refused = executor_in(home.path());
    refused
        .prepare_args
        .extend(["--allow-image".into(), "ghcr.io/cirruslabs/*".into()]);
    let cases = [
        (
            refused,
            Job::new(1, &image, "true"),
            format!("image \"{image}\" is disallowed by GitLab Runner configuration"),
        ),
        (
            executor_in(home.path()),
            Job::new(2, &format!("127.0.0.1:{closed}/ci/debian:12"), "true")
                .variable("TART_EXECUTOR_INSECURE_PULL", "true"),
            "tart command returned non-zero exit code: \"".to_owned(),
        ),
        (
            executor_in(home.path()),
            Job::new(3, &image, "true")
                .variable("TART_EXECUTOR_INSECURE_PULL", "true")
                .variable("TART_REGISTRY_USERNAME", "ci")
                .variable("TART_REGISTRY_PASSWORD", "wrong"),
            "tart command returned non-zero exit code: \"".to_owned(),
        ),
    ];
    for (executor, job, reason) in cases {
        let report = run_job(&executor, &job);
        let log = report.text();
        assert_eq!(
            report.outcome,
            Outcome::SystemFailure {
                stage: "prepare".into()
            },
            "{log}"
        );
        let prepare = report.stage_text("prepare");
        let failures: Vec<&str> = prepare.lines().filter(|line| line.contains(&reason)).collect();
        assert_eq!(failures.len(), 3, "one reason per prepare attempt: {log}");
        assert!(!report.text().contains("Cloning a new VM"), "{log}");
        assert_eq!(report.cleanup_code, Some(0), "{log}");
        assert!(report.stage_text("cleanup").contains("nothing to delete"), "{log}");
        eprintln!("job {}: {}", job.id, failures[0]);
    }
    assert_eq!(local_vms(home.path()), "");
    assert_eq!(
        std::fs::read_dir(home.path().join("cache/OCIs"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}
