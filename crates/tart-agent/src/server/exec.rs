//! One `Exec` session: runs the command and shuttles its input and output.

use std::future::pending;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::pty::Pty;
use super::CHUNK_SIZE;
use crate::proto::exec_request::{self, Command as ExecCommand};
use crate::proto::exec_response::{self, Exit};
use crate::proto::{ExecRequest, ExecResponse, IoChunk};

type Output = mpsc::Sender<Result<ExecResponse, Status>>;

/// ^D: "end of input" for a terminal in canonical mode; a PTY has no half-close.
const EOF_CHAR: u8 = 0x04;

/// How long the terminal is still read after the command exited while no data comes and no EIO
/// either: a background process the command left behind can keep the terminal open indefinitely.
const PTY_LINGER: Duration = Duration::from_millis(500);

pub(super) async fn run(command: ExecCommand, requests: Streaming<ExecRequest>, output: Output) {
    let argv: Vec<&str> = std::iter::once(command.name.as_str())
        .chain(command.args.iter().map(String::as_str))
        .collect();
    eprintln!(
        "tart-guest-agent: executing {argv:?}{}{}",
        if command.tty { " with a tty" } else { "" },
        if command.interactive { ", interactive" } else { "" },
    );
    let result = if command.tty {
        run_tty(&command, requests, &output).await
    } else {
        run_pipes(&command, requests, &output).await
    };
    let response = match result {
        Ok(Some(code)) => Ok(ExecResponse {
            r#type: Some(exec_response::Type::Exit(Exit { code })),
        }),
        // The client went away: there is nobody to tell.
        Ok(None) => return,
        Err(status) => Err(status),
    };
    // Fails only when the client has just gone away, and then there is nothing left to do.
    let _ = output.send(response).await;
}

/// Runs the command on pipes. Returns its exit code, or `None` if the client went away first.
async fn run_pipes(
    command: &ExecCommand,
    requests: Streaming<ExecRequest>,
    output: &Output,
) -> Result<Option<i32>, Status> {
    let mut cmd = Command::new(&command.name);
    cmd.args(&command.args)
        .stdin(if command.interactive {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that killing the session also kills what the command started.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return report_spawn_failure(&command.name, e, output).await,
    };
    let group = process_group(&child);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let input = Input::Pipe(child.stdin.take());
    let outcome = tokio::select! {
        status = async {
            tokio::join!(
                forward(stdout, exec_response::Type::StandardOutput, output),
                forward(stderr, exec_response::Type::StandardError, output),
            );
            child.wait().await
        } => Some(status),
        () = client_gone(input, requests, output) => None,
    };
    conclude(outcome, group, &mut child).await
}

/// Runs the command on a new pseudo-terminal as its controlling terminal.
async fn run_tty(
    command: &ExecCommand,
    requests: Streaming<ExecRequest>,
    output: &Output,
) -> Result<Option<i32>, Status> {
    let (pty, slave) = Pty::open(command.terminal_size)
        .map_err(|e| Status::internal(format!("cannot allocate a pseudo-terminal in the guest: {e}")))?;
    let mut cmd = Command::new(&command.name);
    cmd.args(&command.args);
    if std::env::var_os("TERM").is_none() {
        // Clients do not forward TERM, and without one most programs refuse to draw anything.
        cmd.env("TERM", "xterm-256color");
    }
    let stdio = || slave.try_clone().map(Stdio::from);
    let stdio_error = |e| Status::internal(format!("cannot duplicate the pseudo-terminal: {e}"));
    cmd.stdin(stdio().map_err(stdio_error)?)
        .stdout(stdio().map_err(stdio_error)?)
        .stderr(stdio().map_err(stdio_error)?);
    // SAFETY: setsid and ioctl are async-signal-safe system calls that allocate nothing, and fd 0 is
    // the slave by the time pre_exec hooks run.
    unsafe {
        cmd.pre_exec(|| {
            // A new session (hence process group) with the PTY as controlling terminal: job control and
            // ^C work, and killing the session's process group gets everything the command started.
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Only the child may hold the slave: reading the master ends with EIO once the child's copies close.
    drop((cmd, slave));
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return report_spawn_failure(&command.name, e, output).await,
    };
    let group = process_group(&child);
    let input = Input::Pty {
        pty: &pty,
        open: command.interactive,
    };
    let session = async {
        let mut status = None;
        let mut buf = vec![0; CHUNK_SIZE];
        loop {
            let read = match status {
                None => tokio::select! {
                    exited = child.wait() => {
                        status = Some(exited?);
                        continue;
                    }
                    read = pty.read(&mut buf) => read,
                },
                Some(_) => match tokio::time::timeout(PTY_LINGER, pty.read(&mut buf)).await {
                    Ok(read) => read,
                    Err(_) => break,
                },
            };
            match read {
                Ok(0) => break,
                Ok(n) => {
                    if !send_chunk(output, exec_response::Type::StandardOutput, &buf[..n]).await {
                        break;
                    }
                }
                // EIO: every process closed the slave; all output has been read.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) => {
                    eprintln!("tart-guest-agent: reading the terminal: {e}");
                    break;
                }
            }
        }
        match status {
            Some(status) => Ok(status),
            None => child.wait().await,
        }
    };
    let outcome = tokio::select! {
        status = session => Some(status),
        () = client_gone(input, requests, output) => None,
    };
    conclude(outcome, group, &mut child).await
}

/// The command's process group, taken while its leader surely exists: the pipe child leads its
/// own group, the tty child its own session.
fn process_group(child: &Child) -> Option<Pid> {
    child.id().and_then(|pid| Pid::from_raw(pid as i32))
}

/// Resolves when the client is gone, while applying its input until then.
async fn client_gone(input: Input<'_>, requests: Streaming<ExecRequest>, output: &Output) {
    tokio::select! {
        () = feed_input(input, requests) => {}
        () = output.closed() => {}
    }
}

/// Turns how a session ended (`None`: the client went away) into the `exit` code to send, killing
/// the command when it must not outlive the session.
async fn conclude(
    outcome: Option<io::Result<ExitStatus>>,
    group: Option<Pid>,
    child: &mut Child,
) -> Result<Option<i32>, Status> {
    match outcome {
        Some(Ok(status)) => Ok(Some(exit_code(status))),
        Some(Err(e)) => {
            kill_group(group);
            Err(Status::internal(format!("waiting for the command failed: {e}")))
        }
        None => {
            eprintln!("tart-guest-agent: client went away, killing the command");
            kill_group(group);
            // Reap it so that no zombie is left; SIGKILL cannot be ignored, so this returns promptly.
            let _ = child.wait().await;
            Ok(None)
        }
    }
}

fn kill_group(group: Option<Pid>) {
    if let Some(group) = group {
        // ESRCH: everything in the group has already exited.
        let _ = rustix::process::kill_process_group(group, Signal::KILL);
    }
}

/// Shell conventions: 127 "command not found", 126 "found but cannot be run", 128+N "killed by signal N".
fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Reports a command that could not be started as the shell does: a message on stderr and exit code
/// 127 or 126. Unlike a gRPC error status this reaches the user like any other failure of the
/// command and gives scripts the exit code they expect from `sh -c`.
async fn report_spawn_failure(name: &str, error: io::Error, output: &Output) -> Result<Option<i32>, Status> {
    let message = format!("tart-guest-agent: failed to start {name:?}: {error}\n");
    eprint!("{message}");
    if !send_chunk(output, exec_response::Type::StandardError, message.as_bytes()).await {
        return Ok(None);
    }
    Ok(Some(if error.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    }))
}

/// Where the client's `standard_input` and `terminal_resize` messages go.
enum Input<'a> {
    /// The child's stdin pipe; `None` when not interactive or after end of input.
    Pipe(Option<ChildStdin>),
    /// `open`: interactive and before end of input. The terminal stays the child's stdin either way.
    Pty { pty: &'a Pty, open: bool },
}

impl Input<'_> {
    async fn write(&mut self, data: &[u8]) {
        let result = match self {
            Input::Pipe(Some(stdin)) => stdin.write_all(data).await,
            Input::Pipe(None) => Ok(()),
            Input::Pty { pty, open: true } => pty.write_all(data).await,
            Input::Pty { open: false, .. } => Ok(()),
        };
        if let Err(e) = result {
            // The command closed its stdin or exited; what it did not read is of no use to it.
            if e.kind() != io::ErrorKind::BrokenPipe && e.raw_os_error() != Some(libc::EIO) {
                eprintln!("tart-guest-agent: writing the command's input: {e}");
            }
            if let Input::Pipe(stdin) = self {
                *stdin = None;
            }
        }
    }

    async fn eof(&mut self) {
        match self {
            Input::Pipe(stdin) => *stdin = None,
            Input::Pty { pty, open } if *open => {
                *open = false;
                let _ = pty.write_all(&[EOF_CHAR]).await;
            }
            Input::Pty { .. } => {}
        }
    }

    fn resize(&self, size: crate::proto::TerminalSize) {
        if let Input::Pty { pty, .. } = self {
            if let Err(e) = pty.resize(size) {
                eprintln!("tart-guest-agent: resizing the terminal: {e}");
            }
        }
    }
}

/// Applies the client's messages. Returns only when the client is gone (the stream failed); a
/// client that merely finished sending gets its stdin closed and the session goes on.
async fn feed_input(mut input: Input<'_>, mut requests: Streaming<ExecRequest>) {
    loop {
        // Not reading the next message while a write waits for the command is what gives backpressure:
        // HTTP/2 flow control stops the client once the stream's window is full.
        match requests.message().await {
            Ok(Some(ExecRequest {
                r#type: Some(exec_request::Type::StandardInput(chunk)),
            })) => {
                if chunk.data.is_empty() {
                    input.eof().await;
                } else {
                    input.write(&chunk.data).await;
                }
            }
            Ok(Some(ExecRequest {
                r#type: Some(exec_request::Type::TerminalResize(size)),
            })) => input.resize(size),
            // A second command, or a message type from a newer protocol: nothing to do with it.
            Ok(Some(_)) => {}
            Ok(None) => {
                input.eof().await;
                return pending().await;
            }
            Err(_) => return,
        }
    }
}

/// Streams `pipe` to the client in chunks as the command writes them, until EOF.
async fn forward(pipe: Option<impl AsyncRead + Unpin>, kind: fn(IoChunk) -> exec_response::Type, output: &Output) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0; CHUNK_SIZE];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if !send_chunk(output, kind, &buf[..n]).await {
                    return;
                }
            }
            Err(e) => {
                eprintln!("tart-guest-agent: reading the command's output: {e}");
                return;
            }
        }
    }
}

/// Queues one chunk; false once the client has gone away.
async fn send_chunk(output: &Output, kind: fn(IoChunk) -> exec_response::Type, data: &[u8]) -> bool {
    let chunk = IoChunk { data: data.to_vec() };
    output
        .send(Ok(ExecResponse {
            r#type: Some(kind(chunk)),
        }))
        .await
        .is_ok()
}
