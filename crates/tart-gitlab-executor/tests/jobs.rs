//! Real jobs through the runner harness: the Debian image (booted once so that `admin` exists)
//! pulled from a real registry with Basic auth, cloned, booted under TCG on tart's shared
//! network inside a [`tart_testkit::NetLab`], reached by SSH, its builds directory shared with
//! the host over virtio-fs. Each test holds its jobs' VMs at once to keep the boots few.

mod harness;

use std::path::Path;
use std::thread;
use std::time::Duration;

use harness::lab::{qemu_processes, Golden, JobLab, REGISTRY_PASSWORD, REGISTRY_USER};
use harness::{run_job, Executor, Job, Outcome, Report};

/// A job of the golden image with the registry's credentials, as a project's CI variables
/// carry them.
fn job(golden: &Golden, id: u64, step: &str) -> Job {
    Job::new(id, &golden.image, step)
        .variable("TART_EXECUTOR_INSECURE_PULL", "true")
        .variable("TART_REGISTRY_USERNAME", REGISTRY_USER)
        .variable("TART_REGISTRY_PASSWORD", REGISTRY_PASSWORD)
}

/// Runs the jobs at once, each on its own thread as on a runner with `concurrent = n`.
fn run_together(executor: &Executor, jobs: Vec<Job>) -> Vec<Report> {
    thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|job| scope.spawn(move || run_job(executor, job)))
            .collect();
        handles.into_iter().map(|handle| handle.join().unwrap()).collect()
    })
}

/// Nothing of the jobs is left: no VM, no QEMU, no tap.
fn assert_nothing_left(lab: &JobLab) {
    assert_eq!(lab.vms(), Vec::<String>::new(), "VMs left behind");
    assert_eq!(
        qemu_processes(&lab.tart_home()),
        Vec::<String>::new(),
        "QEMU left running"
    );
    assert_eq!(lab.taps(), Vec::<String>::new(), "taps left behind");
}

fn line_with(report: &Report, stage: &str, needle: &str) -> String {
    let text = report.stage_text(stage);
    let line = text.lines().find(|line| line.contains(needle));
    line.unwrap_or_else(|| panic!("no {needle:?} in {stage}:\n{}", report.text()))
        .to_owned()
}

/// Two jobs at once get two VMs and both succeed, one logging in with the password, the other
/// with a key; their scripts write into the builds directory, which the host sees; a third job
/// whose script exits 3 fails as a build failure with 3 in BUILD_EXIT_CODE_FILE.
#[test]
fn jobs_succeed_side_by_side_and_a_failing_script_is_a_build_failure() {
    let golden = Golden::in_registry();
    let lab = JobLab::new(&golden);
    lab.pull(&golden);
    let builds = lab.home.path().join("builds");
    let mut executor = lab.executor();
    // Each attempt costs a boot: a broken build fails once, not three times (the runner's
    // retries are tested in stages.rs).
    executor.prepare_attempts = 1;
    executor
        .config_args
        .extend(["--builds-dir".into(), builds.to_string_lossy().into_owned()]);
    let step = "uname -a\ncat /etc/machine-id\necho \"written by job $CI_JOB_ID\" >\"$CI_PROJECT_DIR/out.txt\"";
    let jobs = vec![
        job(&golden, 101, step),
        job(&golden, 102, step).variable("TART_EXECUTOR_SSH_KEY_PATH", golden.key.to_str().unwrap()),
        job(&golden, 103, "echo about to fail\nexit 3"),
    ];
    let reports = run_together(&executor, jobs);
    for report in &reports {
        eprintln!("{}", report.timings());
    }
    let (ok1, ok2, failed) = (&reports[0], &reports[1], &reports[2]);
    for (id, report) in [(101, ok1), (102, ok2)] {
        assert_eq!(report.outcome, Outcome::Success, "{}", report.text());
        assert!(line_with(report, "step_script", "Linux golden").contains("x86_64"));
        let written = std::fs::read_to_string(builds.join(format!("project-{id}/out.txt"))).unwrap();
        assert_eq!(written, format!("written by job {id}\n"));
        let prepare = report.stage_text("prepare");
        for line in [
            "Pulling the latest version of",
            "Cloning a new VM...",
            "Configuring a new VM...",
            "Waiting for the VM to boot and be SSH-able...",
            "Was able to SSH!",
            "Mounting buildsdir on /var/tmp/builds...",
            "VM is ready.",
        ] {
            assert!(prepare.contains(line), "no {line:?} in prepare:\n{prepare}");
        }
        assert_eq!(report.cleanup_code, Some(0), "{}", report.text());
        let (first, last) = report.overheads();
        eprintln!(
            "job {id}: prepare start -> first step_script line {:.1}s; step_script end -> cleanup done {:.1}s",
            first.as_secs_f64(),
            last.as_secs_f64()
        );
    }
    // Two machines, both up at once: each ran from the end of its prepare to its cleanup.
    let machine = |report: &Report| {
        let text = report.stage_text("step_script");
        let id = text
            .lines()
            .find(|line| line.len() == 32 && line.bytes().all(|b| b.is_ascii_hexdigit()));
        id.expect("the script printed /etc/machine-id").to_owned()
    };
    assert_ne!(machine(ok1), machine(ok2));
    let up = |report: &Report| (report.span("prepare").unwrap().1, report.span("cleanup").unwrap().0);
    let (up1, up2) = (up(ok1), up(ok2));
    assert!(up1.0 < up2.1 && up2.0 < up1.1, "the two VMs never ran at the same time");

    assert_eq!(
        failed.outcome,
        Outcome::BuildFailure {
            stage: "step_script".into(),
            exit_code: Some(3)
        },
        "{}",
        failed.text()
    );
    line_with(failed, "step_script", "Process exited with status 3");
    line_with(failed, "after_script", "after_script ran");
    line_with(failed, "upload_artifacts_on_failure", "no artifacts");
    assert_eq!(failed.cleanup_code, Some(0));
    assert_nothing_left(&lab);
}

/// A job cancelled while its VM boots (prepare SIGKILLed with no grace), a VM stopped and
/// deleted under a running script, wrong SSH credentials, and a guest that never answers: each
/// ends as a system failure with one line saying why, and cleanup removes everything.
#[test]
fn cancelled_and_broken_jobs_leave_nothing_behind() {
    let golden = Golden::in_registry();
    let lab = JobLab::new(&golden);
    lab.pull(&golden);
    let mut executor = lab.executor();
    // Each attempt of these would cost a boot; the failure is the same every time.
    executor.prepare_attempts = 1;

    let mut cancelled = job(&golden, 201, "true");
    cancelled.cancel_on = Some("Waiting for the VM to boot and be SSH-able...".into());
    cancelled.graceful_kill = Duration::ZERO;
    let deleted = job(&golden, 202, "echo sleeping\nsleep 600");
    let wrong_password = job(&golden, 203, "true").variable("TART_EXECUTOR_SSH_PASSWORD", "not-the-password");
    let silent = job(&golden, 204, "true")
        .variable("TART_EXECUTOR_SSH_PORT", "2222")
        .variable("TART_EXECUTOR_BOOT_TIMEOUT", "20");

    let reports = thread::scope(|scope| {
        let executor = &executor;
        let jobs: Vec<_> = [cancelled, deleted, wrong_password, silent]
            .into_iter()
            .map(|job| scope.spawn(move || run_job(executor, &job)))
            .collect();
        // Once 202's script runs, its VM goes away under it.
        while !lab
            .tart(&["exec", "gitlab-202", "pgrep", "-x", "sleep"])
            .status
            .success()
        {
            assert!(!jobs[1].is_finished(), "job 202 ended before its script ran");
            thread::sleep(Duration::from_secs(1));
        }
        assert!(lab.tart(&["stop", "gitlab-202"]).status.success());
        assert!(lab.tart(&["delete", "gitlab-202"]).status.success());
        jobs.into_iter().map(|job| job.join().unwrap()).collect::<Vec<_>>()
    });

    for report in &reports {
        eprintln!("{}", report.timings());
    }
    let reason = |report: &Report, stage: &str, needle: &str| {
        let line = line_with(report, stage, needle);
        eprintln!("job reason: {line}");
    };
    assert_eq!(
        reports[0].outcome,
        Outcome::Killed {
            stage: "prepare".into()
        },
        "{}",
        reports[0].text()
    );
    assert_eq!(reports[0].cleanup_code, Some(0), "{}", reports[0].text());

    assert_eq!(
        reports[1].outcome,
        Outcome::SystemFailure {
            stage: "step_script".into()
        },
        "{}",
        reports[1].text()
    );
    reason(
        &reports[1],
        "step_script",
        "VM \"gitlab-202\" is gone (deleted during the job?)",
    );

    assert_eq!(
        reports[2].outcome,
        Outcome::SystemFailure {
            stage: "prepare".into()
        }
    );
    reason(
        &reports[2],
        "prepare",
        "Permission denied (publickey,password); check TART_EXECUTOR_SSH_USERNAME",
    );

    assert_eq!(
        reports[3].outcome,
        Outcome::SystemFailure {
            stage: "prepare".into()
        }
    );
    reason(&reports[3], "prepare", "in 20 s");
    for report in &reports {
        assert_eq!(report.cleanup_code, Some(0), "{}", report.text());
    }
    assert_nothing_left(&lab);
}

/// PyPI's gitlab-runner-tart-driver (a separate Python driver that reads `tart list --format
/// json` and the text of `tart get`) runs the same job against our tart.
#[test]
fn pypi_gitlab_runner_tart_driver_completes_a_job() {
    let golden = Golden::in_registry();
    let driver = harness::lab::succeed(&mut std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup-tart-driver"),
    ));
    let driver = driver
        .lines()
        .last()
        .expect("setup-tart-driver prints the driver's path")
        .to_owned();
    let lab = JobLab::new(&golden);
    let mut executor = lab.executor();
    *executor.command.last_mut().unwrap() = driver.into();
    // The driver runs "tart" from PATH.
    let tart_dir = harness::tart_beside(&harness::executor_binary())
        .parent()
        .unwrap()
        .to_owned();
    let path = format!("{}:{}", tart_dir.display(), std::env::var("PATH").unwrap());
    executor.env.push(("PATH".into(), path));
    executor
        .prepare_args
        .extend(["--cpu", "1", "--memory", "1024", "--timeout", "300"].map(String::from));
    executor.prepare_attempts = 1;
    // The driver pulls without --insecure, which a plain-HTTP registry needs: the image is on
    // the host already, as its default pull policy (if-not-present) expects of such registries.
    lab.pull(&golden);

    let job = Job::new(301, &golden.image, "uname -a\necho \"pypi driver on $(hostname)\"")
        .variable("CI_PROJECT_NAME", "demo")
        .variable("CI_PIPELINE_ID", "31")
        .variable("CI_CONCURRENT_ID", "0")
        // It hands CUSTOM_ENV_TART_* to tart as TART_*: the registry's credentials.
        .variable("TART_REGISTRY_USERNAME", REGISTRY_USER)
        .variable("TART_REGISTRY_PASSWORD", REGISTRY_PASSWORD)
        // Its default shell, /bin/zsh, is macOS's.
        .variable("TART_EXECUTOR_SHELL", "/bin/bash");
    let report = run_job(&executor, &job);
    eprintln!("{}", report.timings());
    assert_eq!(report.outcome, Outcome::Success, "{}", report.text());
    line_with(&report, "step_script", "pypi driver on golden");
    line_with(&report, "prepare", "VM 'grtd-demo-31-301-0' is running");
    assert_nothing_left(&lab);
}

/// scripts/bench/gitlab-job: one job alone, timed from prepare's start to the first line of its
/// step_script and from the script's end to cleanup's end, with the phases of each.
#[test]
#[ignore = "a benchmark: scripts/bench/gitlab-job runs it"]
fn bench_job_overhead() {
    let golden = Golden::in_registry();
    let lab = JobLab::new(&golden);
    // A runner's steady state: the image is cached, prepare's pull only checks the registry.
    lab.pull(&golden);
    let report = run_job(&lab.executor(), &job(&golden, 401, "echo first line of the script"));
    assert_eq!(report.outcome, Outcome::Success, "{}", report.text());
    let (before, after) = report.overheads();
    let at = |stage: &str, needle: &str| {
        report
            .log
            .iter()
            .find(|line| line.stage == stage && line.text.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {stage}"))
            .at
    };
    let prepare = report.span("prepare").unwrap();
    let phases = [
        ("pull", prepare.0, at("prepare", "Cloning a new VM...")),
        (
            "clone",
            at("prepare", "Cloning a new VM..."),
            at("prepare", "Configuring a new VM..."),
        ),
        (
            "set",
            at("prepare", "Configuring a new VM..."),
            at("prepare", "Waiting for the VM to boot"),
        ),
        (
            "boot to SSH",
            at("prepare", "Waiting for the VM to boot"),
            at("prepare", "Was able to SSH!"),
        ),
        ("rest of prepare", at("prepare", "Was able to SSH!"), prepare.1),
        (
            "sub-stages before step_script",
            prepare.1,
            report.span("step_script").unwrap().0,
        ),
        (
            "step_script start to first line",
            report.span("step_script").unwrap().0,
            at("step_script", "first line of the script"),
        ),
    ];
    println!(
        "gitlab-job: prepare start -> first step_script line: {:.1} s",
        before.as_secs_f64()
    );
    for (name, start, end) in phases {
        println!("gitlab-job:   {name}: {:.1} s", (end - start).as_secs_f64());
    }
    println!(
        "gitlab-job: step_script end -> cleanup done: {:.1} s",
        after.as_secs_f64()
    );
    let script_end = report.span("step_script").unwrap().1;
    for (stage, start, end) in report.spans.iter().filter(|(_, start, _)| *start >= script_end) {
        println!("gitlab-job:   {stage}: {:.1} s", (*end - *start).as_secs_f64());
    }
    println!("gitlab-job: stages: {}", report.timings());
    assert_nothing_left(&lab);
}
