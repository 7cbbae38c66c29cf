//! The host side: connects to an agent and runs `Exec` sessions and `ResolveIP`.
//!
//! Terminal handling (raw mode, SIGWINCH) is the caller's: this module only moves bytes and
//! forwards the terminal sizes it is given.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::agent_client::AgentClient as Stub;
use crate::proto::exec_request::{self, Command};
use crate::proto::exec_response;
use crate::proto::{ExecRequest, IoChunk, ResolveIpRequest, TerminalSize};
use crate::socket_path::SocketPath;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the guest agent at {target}: {reason}; is tart-guest-agent running in the VM?")]
    Connect { target: String, reason: String },
    #[error("the guest agent did not answer within {0:?}; is tart-guest-agent running in the VM?")]
    Timeout(Duration),
    #[error("guest agent: {}", describe(.0))]
    Status(#[from] tonic::Status),
    #[error("cannot write the command's output: {0}")]
    Output(#[source] io::Error),
    #[error("the guest agent ended the session without the command's exit code")]
    NoExitCode,
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default)]
pub struct ExecCommand {
    /// Looked up in the guest's `PATH`; no shell is involved.
    pub name: String,
    pub args: Vec<String>,
    /// Run on a pseudo-terminal of this size (`tart exec -t`): stdout and stderr then arrive merged
    /// on stdout, with the terminal's line endings.
    pub tty: Option<TerminalSize>,
}

/// A connection to a guest agent; cheap to clone, sessions on clones share it.
#[derive(Debug, Clone)]
pub struct AgentClient {
    stub: Stub<Channel>,
}

impl AgentClient {
    /// Connects over the Unix stream socket at `path`, which may be longer than a socket address
    /// holds.
    pub async fn connect_unix(path: &Path) -> Result<AgentClient, Error> {
        let owned = path.to_owned();
        Self::connect_with(path.display(), move || {
            let path = owned.clone();
            async move {
                let path = SocketPath::new(&path)?;
                UnixStream::connect(path.as_path()).await
            }
        })
        .await
    }

    /// Connects over streams that `connect` opens, e.g. after a proxy's handshake; `target` names
    /// the agent in errors. `connect` is called again to reconnect after the connection broke.
    pub async fn connect_with<F, Fut, S>(target: impl fmt::Display, connect: F) -> Result<AgentClient, Error>
    where
        F: Fn() -> Fut + Send + Clone + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let connector = tower::service_fn(move |_: Uri| {
            let connect = connect.clone();
            async move { connect().await.map(TokioIo::new) }
        });
        // The URI only fills the HTTP/2 :authority; the connector decides where to connect.
        let channel = Endpoint::from_static("http://tart-agent")
            .connect_with_connector(connector)
            .await
            .map_err(|e| Error::Connect {
                target: target.to_string(),
                reason: error_chain(&e),
            })?;
        Ok(AgentClient {
            stub: Stub::new(channel),
        })
    }

    /// The guest's first global unicast IPv4 address, as the agent sees it.
    pub async fn resolve_ip(&mut self, timeout: Duration) -> Result<String, Error> {
        let response = tokio::time::timeout(timeout, self.stub.resolve_ip(ResolveIpRequest {}))
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        Ok(response.into_inner().ip)
    }

    /// Runs `command` in the guest and returns its exit code (128+N when killed by signal N).
    ///
    /// With `stdin`, the session is interactive: its chunks are the command's input, and its end
    /// is sent as end of input (empty chunks are skipped, as they would mean end of input). Without,
    /// the command's stdin is empty. `resize` carries later terminal sizes of a `tty` session.
    /// Output is written (and flushed) to `stdout` and `stderr` as it arrives; a slow writer slows
    /// the command down instead of buffering its output.
    pub async fn exec<O, E>(
        &mut self,
        command: ExecCommand,
        stdin: Option<Stdin>,
        resize: Option<mpsc::Receiver<TerminalSize>>,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<i32, Error>
    where
        O: AsyncWrite + Unpin + ?Sized,
        E: AsyncWrite + Unpin + ?Sized,
    {
        let first = request(exec_request::Type::Command(Command {
            name: command.name,
            args: command.args,
            interactive: stdin.is_some(),
            tty: command.tty.is_some(),
            terminal_size: command.tty,
        }));
        // A channel rather than the combined stream itself: tonic's future over a boxed stream is not
        // provably Send, which would keep callers from spawning sessions.
        let (requests, queue) = mpsc::channel(REQUEST_QUEUE);
        requests.try_send(first).expect("a new channel has room");
        let mut responses = self.stub.exec(ReceiverStream::new(queue)).await?.into_inner();
        let pump = pump(stdin, resize, requests);
        tokio::pin!(pump);
        let mut pumping = true;
        loop {
            tokio::select! {
                () = &mut pump, if pumping => pumping = false,
                response = responses.message() => match response?.ok_or(Error::NoExitCode)?.r#type {
                    Some(exec_response::Type::StandardOutput(chunk)) => write_flush(stdout, &chunk.data).await?,
                    Some(exec_response::Type::StandardError(chunk)) => write_flush(stderr, &chunk.data).await?,
                    Some(exec_response::Type::Exit(exit)) => return Ok(exit.code),
                    // A message type from a newer protocol: nothing to do with it.
                    None => {}
                },
            }
        }
    }
}

/// Requests queued before the session stops reading stdin: bounds memory when the agent reads
/// slower than stdin delivers.
const REQUEST_QUEUE: usize = 4;

/// Queues the session's input and resizes as requests, and ends the request stream (by dropping
/// `requests`) once both are done.
async fn pump(stdin: Option<Stdin>, resize: Option<mpsc::Receiver<TerminalSize>>, requests: mpsc::Sender<ExecRequest>) {
    let input: RequestStream = match stdin {
        Some(stdin) => Box::pin(
            stdin
                .filter(|data| !data.is_empty())
                .chain(tokio_stream::once(Vec::new()))
                .map(|data| request(exec_request::Type::StandardInput(IoChunk { data }))),
        ),
        None => Box::pin(tokio_stream::empty()),
    };
    let resizes: RequestStream = match resize {
        Some(resize) => {
            Box::pin(ReceiverStream::new(resize).map(|size| request(exec_request::Type::TerminalResize(size))))
        }
        None => Box::pin(tokio_stream::empty()),
    };
    let mut merged = input.merge(resizes);
    while let Some(request) = merged.next().await {
        if requests.send(request).await.is_err() {
            return;
        }
    }
}

/// The input of an interactive session: chunks of bytes, then the end of the stream as end of input.
pub type Stdin = Pin<Box<dyn Stream<Item = Vec<u8>> + Send>>;

type RequestStream = Pin<Box<dyn Stream<Item = ExecRequest> + Send>>;

fn request(r#type: exec_request::Type) -> ExecRequest {
    ExecRequest { r#type: Some(r#type) }
}

async fn write_flush<W: AsyncWrite + Unpin + ?Sized>(writer: &mut W, data: &[u8]) -> Result<(), Error> {
    writer.write_all(data).await.map_err(Error::Output)?;
    // Interactive output must show up now, not when some buffer fills.
    writer.flush().await.map_err(Error::Output)
}

/// A status's message, or what its code means when it has none (as for a broken connection).
fn describe(status: &tonic::Status) -> &str {
    match status.message() {
        "" => status.code().description(),
        message => message,
    }
}

/// tonic's transport errors say only "transport error" at the top; the cause is further down.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
