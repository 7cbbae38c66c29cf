//! The host programs that change the network. Interfaces, addresses and rules are made with
//! `ip` and `nft`: their errors are the ones administrators know, and they are in every Debian
//! installation that runs QEMU. Looked up in `PATH` only, like QEMU itself.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{io_context, Error, Result};

/// What the shared network runs, each with the Debian package that ships it.
pub const SHARED_NETWORK_PROGRAMS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("dnsmasq", "dnsmasq-base"),
    ("dhcp_release", "dnsmasq-utils"),
];

/// `name` from `PATH`, or an error naming the package to install.
pub fn program(name: &'static str, package: &'static str) -> Result<PathBuf> {
    tart_qemu::find_in_path(name, std::env::var_os("PATH").as_deref())
        .ok_or(Error::MissingProgram { program: name, package })
}

pub(crate) fn ip() -> Result<PathBuf> {
    program("ip", "iproute2")
}

/// Runs `ip <args>`, failing with its error output.
pub(crate) fn run_ip(args: &[&str]) -> Result<()> {
    run(Command::new(ip()?).args(args))
}

/// Runs `ip <args>` and returns its standard output.
pub(crate) fn ip_output(args: &[&str]) -> Result<String> {
    let mut command = Command::new(ip()?);
    command.args(args);
    let out = command.output().map_err(io_context("failed to run ip"))?;
    if !out.status.success() {
        return Err(failure(&command, &out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `script` to `nft -f -`: one atomic transaction.
pub(crate) fn nft(script: &str) -> Result<()> {
    let nft = program("nft", "nftables")?;
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_context("failed to run nft"))?;
    let written = child.stdin.take().expect("piped").write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(io_context("failed to run nft"))?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command: "nft -f - (table tart)".into(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    written.map_err(io_context("failed to write to nft"))
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    let out = command.output().map_err(io_context(format!(
        "failed to run {}",
        command.get_program().to_string_lossy()
    )))?;
    if out.status.success() {
        return Ok(());
    }
    Err(failure(command, &out.stderr))
}

fn failure(command: &Command, stderr: &[u8]) -> Error {
    let words: Vec<String> = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| word.to_string_lossy().into_owned())
        .collect();
    Error::CommandFailed {
        command: words.join(" "),
        output: String::from_utf8_lossy(stderr).trim().to_owned(),
    }
}
