//! `tart-gitlab-executor`: GitLab Runner's custom executor running each job in a fresh tart VM,
//! with the stages, flags, `TART_EXECUTOR_*` variables, VM names and log lines of Cirrus Labs'
//! gitlab-tart-executor, so that a runner's `config.toml` only changes the program's name.

mod cleanup;
mod config;
mod gitlab;
mod prepare;
mod run;
mod settings;
mod ssh;
mod tart;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tart-gitlab-executor",
    version,
    about = "GitLab Runner custom executor for tart VMs"
)]
struct Cli {
    #[command(subcommand)]
    stage: Stage,
}

#[derive(Subcommand)]
enum Stage {
    /// Configure GitLab Runner (prints the builds/cache directories and job environment as JSON)
    Config(config::Args),
    /// Prepare a tart VM for the job: pull, clone, configure, start it and wait for SSH
    Prepare(prepare::Args),
    /// Run one of GitLab's scripts in the job's VM
    Run {
        /// The script GitLab Runner wrote for this sub-stage
        script: PathBuf,
        /// The sub-stage's name (step_script, after_script, ...); not needed to run it
        stage: Option<String>,
    },
    /// Stop and delete the job's VM
    Cleanup,
}

/// How a stage ends, in GitLab Runner's terms.
pub enum Failure {
    /// The job's own script failed (`BUILD_FAILURE_EXIT_CODE`).
    Build,
    /// The executor or its VM failed (`SYSTEM_FAILURE_EXIT_CODE`): GitLab may retry.
    System(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Failure {
        Failure::System(err)
    }
}

fn main() -> ExitCode {
    let codes = gitlab::exit_code("BUILD_FAILURE_EXIT_CODE")
        .and_then(|build| gitlab::exit_code("SYSTEM_FAILURE_EXIT_CODE").map(|system| (build, system)));
    let (build_failure, system_failure) = match codes {
        Ok(codes) => codes,
        Err(err) => {
            eprintln!("{err:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let _ = err.print();
            return exit(system_failure);
        }
    };
    let result = match cli.stage {
        Stage::Config(args) => config::config(&args).map_err(Failure::from),
        Stage::Prepare(args) => prepare::prepare(&args).map_err(Failure::from),
        Stage::Run { script, .. } => run::run(&script),
        Stage::Cleanup => cleanup::cleanup().map_err(Failure::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Build) => exit(build_failure),
        Err(Failure::System(err)) => {
            eprintln!("{err:#}");
            exit(system_failure)
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
