//! `tart exec` and `tart ip`: talking to a running VM, through the guest agent behind the VM's
//! `control.sock` (see `crate::control`) or through what the host knows of the VM's network.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use tart_agent::proto::TerminalSize;
use tart_agent::{AgentClient, ExecCommand, Stdin};
use tart_home::{Error, MacAddress, VmDir};
use tart_net::{lease_for, on_shared_network, StateDir};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

use super::Context;
use crate::cli::{ExecArgs, IpArgs};
use crate::control::CONTROL_SOCKET;

/// Tart's deadline for one `ResolveIP` call.
const AGENT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Tart reads stdin in 64 KiB pieces.
const STDIN_CHUNK: usize = 64 * 1024;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn running_vm(ctx: &Context, name: &str) -> Result<VmDir> {
    let vm = ctx.home.existing_local_vm(name)?;
    if vm.running_pid().is_none() {
        return Err(Error::VmNotRunning(name.to_owned()).into());
    }
    Ok(vm)
}

pub fn exec(ctx: &Context, args: &ExecArgs) -> Result<ExitCode> {
    let vm = running_vm(ctx, &args.name)?;
    let (name, rest) = args.command.split_first().expect("clap requires a command");
    let stdin_is_terminal = std::io::stdin().is_terminal();
    let command = ExecCommand {
        name: name.clone(),
        args: rest.to_vec(),
        tty: args.tty.then(terminal_size),
    };
    let runtime = runtime()?;
    let code = runtime.block_on(async {
        let socket = vm.path().join(CONTROL_SOCKET);
        let connect_error = |reason: String| {
            anyhow!("Failed to connect to the VM using its control socket: {reason}, is the Tart Guest Agent running?")
        };
        let mut client = AgentClient::connect_unix(&socket).await.map_err(|e| match e {
            tart_agent::Error::Connect { reason, .. } => connect_error(reason),
            other => connect_error(other.to_string()),
        })?;
        let stdin = args.interactive.then(stdin_chunks);
        let (resize, _resize_task) = if args.tty { forward_resizes()? } else { (None, None) };
        // Raw mode only for an interactive terminal session: the remote PTY does the echoing
        // and line editing, and ^C must reach the remote program instead of killing us.
        let _raw = (args.tty && args.interactive && stdin_is_terminal)
            .then(RawTerminal::enter)
            .transpose()?;
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        client
            .exec(command, stdin, resize, &mut stdout, &mut stderr)
            .await
            .map_err(|e| match e {
                tart_agent::Error::Status(status) if status.code() == tart_agent::Code::Unavailable => {
                    connect_error(status.message().to_owned())
                }
                other => anyhow!(other),
            })
    });
    // The stdin reader may be blocked in read(2) on a terminal that never ends; dropping the
    // runtime would wait for it forever.
    runtime.shutdown_background();
    Ok(ExitCode::from(code?.clamp(0, 255) as u8))
}

/// Standard input as a stream of chunks, read on its own task so a slow network does not stop
/// us from noticing its end (and vice versa); the channel bounds what is buffered.
fn stdin_chunks() -> Stdin {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        loop {
            let mut buffer = vec![0u8; STDIN_CHUNK];
            match stdin.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buffer.truncate(n);
                    if tx.send(buffer).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

type ResizeForwarding = (
    Option<mpsc::Receiver<TerminalSize>>,
    Option<tokio::task::JoinHandle<()>>,
);

/// Sends our terminal's new size on every SIGWINCH.
fn forward_resizes() -> Result<ResizeForwarding> {
    let mut window_changes = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(async move {
        while window_changes.recv().await.is_some() {
            if tx.send(terminal_size()).await.is_err() {
                break;
            }
        }
    });
    Ok((Some(rx), Some(task)))
}

/// Our terminal's size, or Tart's 80×24 when we have none.
fn terminal_size() -> TerminalSize {
    let size = [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd()]
        .into_iter()
        .find_map(|fd| {
            // SAFETY: winsize is plain data; TIOCGWINSZ only writes into it.
            let mut size: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: ioctl on a descriptor of ours with a valid pointer.
            let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0;
            (ok && size.ws_row > 0 && size.ws_col > 0).then_some(size)
        });
    match size {
        Some(size) => TerminalSize {
            rows: size.ws_row.into(),
            cols: size.ws_col.into(),
        },
        None => TerminalSize { rows: 24, cols: 80 },
    }
}

/// Our terminal in raw mode until dropped.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Result<RawTerminal> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            bail!(
                "failed to read the terminal's settings: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            bail!(
                "failed to put the terminal into raw mode: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: valid descriptor and pointer.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

pub fn ip(ctx: &Context, args: &IpArgs) -> Result<()> {
    let vm = ctx.home.existing_local_vm(&args.name)?;
    let mac = vm.config()?.mac_address;
    let deadline = Instant::now() + Duration::from_secs(args.wait.into());
    let runtime = runtime()?;
    loop {
        let found = match args.resolver.as_str() {
            "agent" => runtime.block_on(resolve_with_agent(&vm.path().join(CONTROL_SOCKET))),
            "arp" => resolve_with_arp(&mac)?,
            _ => {
                let lease = lease_for(&StateDir::locate().lease_file(), &mac.to_string());
                // tart run attaches the NIC before it takes the VM's lock: a running VM without
                // a shared-network attachment has none, and never will.
                if lease.is_none() && vm.running_pid().is_some() && !on_shared_network(mac) {
                    bail!(
                        "no IP address found: VM \"{}\" is not on the shared network, so no DHCP server of tart's has \
                         its lease. With user-mode networking (--net-user, the default without CAP_NET_ADMIN) its \
                         address is not reachable from the host, and \"tart ip --resolver agent\" reports the address \
                         the guest itself has; with --net-bridged, use \"tart ip --resolver arp\"",
                        args.name
                    );
                }
                lease.map(|lease| lease.ip.to_string())
            }
        };
        if let Some(ip) = found {
            println!("{ip}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut message = "no IP address found".to_owned();
    if vm.running_pid().is_none() {
        message.push_str(", is your VM running?");
    }
    match args.resolver.as_str() {
        "agent" => message.push_str(" (also make sure that Guest agent for Tart is running inside of a VM)"),
        "arp" => message.push_str(" (not all Linux distributions are compatible with the ARP resolver)"),
        _ => {}
    }
    bail!(message)
}

/// A failure to reach the agent only means "not yet": the caller retries until `--wait` ends.
async fn resolve_with_agent(socket: &Path) -> Option<String> {
    let attempt = async {
        let mut client = AgentClient::connect_unix(socket).await.ok()?;
        client.resolve_ip(AGENT_RESOLVE_TIMEOUT).await.ok()
    };
    tokio::time::timeout(AGENT_RESOLVE_TIMEOUT, attempt)
        .await
        .ok()
        .flatten()
        .filter(|ip| !ip.is_empty())
}

/// The host's IPv4 neighbour table (`/proc/net/arp`, what `ip -4 neigh` shows): the first
/// complete entry with the VM's MAC address.
fn resolve_with_arp(mac: &MacAddress) -> Result<Option<String>> {
    let table = std::fs::read_to_string("/proc/net/arp").map_err(|e| anyhow!("failed to read /proc/net/arp: {e}"))?;
    Ok(arp_lookup(&table, mac))
}

fn arp_lookup(table: &str, mac: &MacAddress) -> Option<String> {
    // IP address, HW type, Flags, HW address, Mask, Device; flags 0x0 = incomplete.
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [ip, _, flags, hw, ..] = fields.as_slice() else {
            return None;
        };
        let complete = u32::from_str_radix(flags.trim_start_matches("0x"), 16).is_ok_and(|f| f & 0x2 != 0);
        (complete && hw.parse::<MacAddress>().is_ok_and(|found| found == *mac)).then(|| ip.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_entries_are_matched_by_mac_and_completeness() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     192.168.64.7     0x1         0x0         6e:35:1a:09:4c:b2     *        tart0\n\
                     192.168.64.9     0x1         0x2         6e:35:1a:09:4c:b2     *        tart0\n\
                     192.168.64.3     0x1         0x2         aa:bb:cc:dd:ee:ff     *        tart0\n";
        let mac: MacAddress = "6E:35:1A:09:4C:B2".parse().unwrap();
        assert_eq!(arp_lookup(table, &mac).as_deref(), Some("192.168.64.9"));
        let other: MacAddress = "6e:35:1a:09:4c:b3".parse().unwrap();
        assert_eq!(arp_lookup(table, &other), None);
    }
}
