//! `tart`: the command-line front end. Parsing, output formats and exit codes live here; the
//! work is done by the library crates.

mod cli;
mod commands;
mod control;
mod output;
mod progress;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::Cli;

/// A misuse of the command line that clap cannot see (flag combinations, name kinds). Tart
/// reports these as swift-argument-parser validation errors: `Error: …` and exit code 64.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match commands::run(cli.command) {
        Ok(code) => code,
        Err(err) => report(&err),
    }
}

fn report(err: &anyhow::Error) -> ExitCode {
    if let Some(usage) = err.downcast_ref::<UsageError>() {
        eprintln!("Error: {usage}");
        eprintln!("{}", Cli::command().render_usage());
        return ExitCode::from(EXIT_USAGE);
    }
    eprintln!("{err:#}");
    let code = err
        .downcast_ref::<tart_home::Error>()
        .map_or(1, tart_home::Error::exit_code);
    ExitCode::from(code as u8)
}
