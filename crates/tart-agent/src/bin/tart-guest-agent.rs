//! tart-guest-agent for Linux guests: serves `tart exec` and `tart ip --resolver=agent`.

use std::ffi::OsString;
use std::process::ExitCode;

use tart_agent::server::{Listen, Server};

const USAGE: &str = "\
Usage: tart-guest-agent [--run-rpc | --run-agent] [--listen ADDRESS]

Guest agent for Tart VMs: serves \"tart exec\" and \"tart ip --resolver=agent\".

Options:
      --run-rpc          run the RPC service (the default)
      --run-agent        same as --run-rpc (this agent has no other components)
      --listen ADDRESS   vsock:PORT (any CID) or unix:PATH [default: vsock:8080]
  -h, --help             print this help
  -V, --version          print the version
";

fn main() -> ExitCode {
    let listen = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(listen)) => listen,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tart-guest-agent: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tart-guest-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = Server::bind(&listen)?;
        eprintln!("tart-guest-agent: serving RPC on {listen}");
        server.run().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tart-guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The address to serve on, or `None` when the flags asked only for help or the version.
fn parse_args(args: impl Iterator<Item = OsString>) -> Result<Option<Listen>, String> {
    let mut listen = Listen::default();
    let mut args = args.map(|arg| arg.into_string().map_err(|arg| format!("invalid argument {arg:?}")));
    while let Some(arg) = args.next() {
        let arg = arg?;
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        match flag {
            "--run-rpc" | "--run-agent" => {}
            "--listen" => {
                let value = match inline_value {
                    Some(value) => value,
                    None => args.next().ok_or("--listen needs a value: vsock:PORT or unix:PATH")??,
                };
                listen = value.parse()?;
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("tart-guest-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Some(listen))
}
