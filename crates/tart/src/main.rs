//! `tart`: the command-line front end. Parsing, output formats and exit codes live here; the
//! work is done by the library crates.

mod cli;
mod commands;
mod control;
mod output;
mod progress;
mod vetu_compat;

use std::ffi::OsString;
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
    let args: Vec<OsString> = std::env::args_os().collect();
    // Installed or symlinked as `vetu`, for Orchard workers and cirrus-cli on Linux hosts.
    let program = args
        .first()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name);
    if program.is_some_and(|name| name == "vetu") {
        return vetu_compat::main(args);
    }
    let cli: Cli = match parse(args, EXIT_USAGE) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match commands::run(cli.command) {
        Ok(code) => code,
        Err(err) => report(&err),
    }
}

/// `args` parsed as `P`, or the status to exit with once clap has printed why not: `misuse` for
/// a bad command line, 0 for `--help` and `--version`.
fn parse<P: Parser>(args: impl IntoIterator<Item = impl Into<OsString> + Clone>, misuse: u8) -> Result<P, ExitCode> {
    P::try_parse_from(args).map_err(|err| {
        let _ = err.print();
        if err.use_stderr() {
            ExitCode::from(misuse)
        } else {
            ExitCode::SUCCESS
        }
    })
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
