//! The agent served on a Unix socket in this process, driven through the client.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tart_agent::server::{Listen, Server, CHUNK_SIZE, NO_GLOBAL_IPV4};
use tart_agent::{AgentClient, Error, ExecCommand, Stdin, TerminalSize};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWrite, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

const PATIENCE: Duration = Duration::from_secs(20);

/// An agent on a fresh socket, and a client connected to it.
async fn agent() -> (TempDir, AgentClient) {
    let dir = tempfile::tempdir().unwrap();
    let client = serve_and_connect(&dir.path().join("agent.sock")).await;
    (dir, client)
}

async fn serve_and_connect(socket: &Path) -> AgentClient {
    let server = Server::bind(&Listen::Unix(socket.to_owned())).unwrap();
    tokio::spawn(server.run());
    AgentClient::connect_unix(socket).await.unwrap()
}

fn command(argv: &[&str], tty: Option<TerminalSize>) -> ExecCommand {
    ExecCommand {
        name: argv[0].into(),
        args: argv[1..].iter().map(|&arg| arg.into()).collect(),
        tty,
    }
}

fn stdin_of(chunks: Vec<Vec<u8>>) -> Stdin {
    Box::pin(tokio_stream::iter(chunks))
}

struct Finished {
    code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Finished {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

async fn exec(client: &mut AgentClient, command: ExecCommand, stdin: Option<Stdin>) -> Finished {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let run = client.exec(command, stdin, None, &mut stdout, &mut stderr);
    let code = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("exec timed out")
        .unwrap();
    Finished { code, stdout, stderr }
}

/// A session running in the background, fed and watched step by step.
struct Session {
    input: Option<mpsc::Sender<Vec<u8>>>,
    resize: mpsc::Sender<TerminalSize>,
    output: DuplexStream,
    seen: Vec<u8>,
    task: JoinHandle<Result<i32, Error>>,
}

impl Session {
    fn start(mut client: AgentClient, command: ExecCommand, interactive: bool) -> Session {
        let (input, stdin) = mpsc::channel(4);
        let (resize, resizes) = mpsc::channel(4);
        let (output, mut writer) = tokio::io::duplex(1 << 16);
        let stdin: Option<Stdin> = interactive.then(|| Box::pin(ReceiverStream::new(stdin)) as Stdin);
        let task = tokio::spawn(async move {
            let mut stderr = Vec::new();
            let code = client
                .exec(command, stdin, Some(resizes), &mut writer, &mut stderr)
                .await;
            assert_eq!(String::from_utf8_lossy(&stderr), "");
            code
        });
        Session {
            input: Some(input),
            resize,
            output,
            seen: Vec::new(),
            task,
        }
    }

    async fn send(&self, data: &str) {
        self.input
            .as_ref()
            .unwrap()
            .send(data.as_bytes().to_vec())
            .await
            .unwrap();
    }

    /// Reads output until it contains `needle`.
    async fn wait_for(&mut self, needle: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !String::from_utf8_lossy(&self.seen).contains(needle) {
            let mut buf = [0; 4096];
            let n = tokio::time::timeout_at(deadline, self.output.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} in output {:?}", String::from_utf8_lossy(&self.seen)))
                .unwrap();
            assert_ne!(
                n,
                0,
                "output ended without {needle:?}: {:?}",
                String::from_utf8_lossy(&self.seen)
            );
            self.seen.extend_from_slice(&buf[..n]);
        }
    }

    /// Ends the input and returns the exit code with the complete output.
    async fn finish(mut self) -> (i32, String) {
        drop(self.input.take());
        let code = tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("session did not end")
            .unwrap()
            .unwrap();
        self.output.read_to_end(&mut self.seen).await.unwrap();
        (code, String::from_utf8_lossy(&self.seen).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn uname_matches_this_machine() {
    let (_dir, mut client) = agent().await;
    let local = std::process::Command::new("uname").arg("-r").output().unwrap();
    let run = exec(&mut client, command(&["uname", "-r"], None), None).await;
    assert_eq!((run.code, run.stdout, run.stderr), (0, local.stdout, Vec::new()));
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_code_is_the_commands() {
    let (_dir, mut client) = agent().await;
    assert_eq!(
        exec(&mut client, command(&["sh", "-c", "exit 7"], None), None)
            .await
            .code,
        7
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_by_signal_is_128_plus_signal() {
    let (_dir, mut client) = agent().await;
    assert_eq!(
        exec(&mut client, command(&["sh", "-c", "kill -9 $$"], None), None)
            .await
            .code,
        137
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn interactive_cat_echoes_stdin() {
    let (_dir, mut client) = agent().await;
    let run = exec(
        &mut client,
        command(&["cat"], None),
        Some(stdin_of(vec![b"hi\n".to_vec()])),
    )
    .await;
    assert_eq!((run.code, run.stdout(), run.stderr()), (0, "hi\n".into(), "".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn non_interactive_stdin_is_empty() {
    let (_dir, mut client) = agent().await;
    let run = exec(&mut client, command(&["wc", "-c"], None), None).await;
    assert_eq!((run.code, run.stdout().trim()), (0, "0"));
}

/// Records the largest single write, which is the largest chunk the agent sent.
struct ChunkRecorder {
    data: Vec<u8>,
    largest_write: usize,
}

impl AsyncWrite for ChunkRecorder {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.largest_write = self.largest_write.max(buf.len());
        self.data.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_mebibyte_of_random_bytes_round_trips_through_cat() {
    let (_dir, mut client) = agent().await;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            // xorshift64: random enough to catch reordered, dropped or mangled chunks.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let chunks = data.chunks(50_000).map(<[u8]>::to_vec).collect();
    let mut stdout = ChunkRecorder {
        data: Vec::new(),
        largest_write: 0,
    };
    let mut stderr = Vec::new();
    let run = client.exec(
        command(&["cat"], None),
        Some(stdin_of(chunks)),
        None,
        &mut stdout,
        &mut stderr,
    );
    let code = tokio::time::timeout(PATIENCE, run).await.unwrap().unwrap();
    assert_eq!(code, 0);
    assert!(
        stdout.data == data,
        "output differs from input ({} bytes back)",
        stdout.data.len()
    );
    assert!(
        stdout.largest_write <= CHUNK_SIZE,
        "a chunk of {} bytes",
        stdout.largest_write
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_and_stderr_stay_separate() {
    let (_dir, mut client) = agent().await;
    let run = exec(
        &mut client,
        command(&["sh", "-c", "echo out; echo err >&2"], None),
        None,
    )
    .await;
    assert_eq!(
        (run.code, run.stdout(), run.stderr()),
        (0, "out\n".into(), "err\n".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn output_streams_while_the_command_runs() {
    let (_dir, client) = agent().await;
    let mut session = Session::start(
        client,
        command(&["sh", "-c", "echo first; read line; echo $line"], None),
        true,
    );
    // The command is blocked on its input here, so "first" can only have come as it was written.
    session.wait_for("first\n").await;
    session.send("second\n").await;
    assert_eq!(session.finish().await, (0, "first\nsecond\n".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_has_a_pts_of_the_requested_size() {
    let (_dir, mut client) = agent().await;
    let size = TerminalSize { rows: 30, cols: 100 };
    let run = exec(
        &mut client,
        command(&["sh", "-c", "tty; stty size; echo $TERM"], Some(size)),
        None,
    )
    .await;
    assert_eq!(run.code, 0);
    assert!(run.stderr.is_empty(), "with a tty everything is on stdout");
    let lines: Vec<_> = run
        .stdout()
        .lines()
        .map(|line| line.trim_end_matches('\r').to_owned())
        .collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{lines:?}");
    assert_eq!(lines[1], "30 100");
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
    assert_eq!(lines[2], term);
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_interactive_shell_runs_input_and_exits_with_its_code() {
    let (_dir, mut client) = agent().await;
    let tty = Some(TerminalSize { rows: 24, cols: 80 });
    // The quotes keep the terminal's echo of the input from matching "hello".
    let stdin = stdin_of(vec![b"echo hel''lo\nexit 3\n".to_vec()]);
    let run = exec(&mut client, command(&["sh"], tty), Some(stdin)).await;
    assert_eq!(run.code, 3);
    assert!(run.stdout().contains("hello\r\n"), "{:?}", run.stdout());
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_end_of_input_is_ctrl_d() {
    let (_dir, mut client) = agent().await;
    let tty = Some(TerminalSize { rows: 24, cols: 80 });
    let stdin = stdin_of(vec![b"abc\n".to_vec()]);
    let run = exec(&mut client, command(&["wc", "-l"], tty), Some(stdin)).await;
    assert_eq!(run.code, 0);
    assert!(run.stdout().contains("1\r\n"), "{:?}", run.stdout());
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_without_interactive_gets_no_end_of_input() {
    let (_dir, mut client) = agent().await;
    let tty = Some(TerminalSize { rows: 24, cols: 80 });
    // cat ends at once on an end of input; without one, timeout stops it with 124.
    let run = exec(
        &mut client,
        command(&["sh", "-c", "timeout 1 cat; echo rc=$?"], tty),
        None,
    )
    .await;
    assert!(run.stdout().contains("rc=124"), "{:?}", run.stdout());
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_resize_reaches_the_terminal() {
    let (_dir, client) = agent().await;
    let mut session = Session::start(
        client,
        command(&["sh"], Some(TerminalSize { rows: 30, cols: 100 })),
        true,
    );
    // $(...) keeps the terminal's echo of the command line from matching.
    session.send("echo A-$(stty size | tr ' ' x)\n").await;
    session.wait_for("A-30x100").await;
    session.resize.send(TerminalSize { rows: 40, cols: 120 }).await.unwrap();
    // Resizes and input travel side by side, so ask until the resize has overtaken the question.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        session.send("echo B-$(stty size | tr ' ' x)\n").await;
        let asked = tokio::time::timeout(Duration::from_millis(300), session.wait_for("B-40x120")).await;
        if asked.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            String::from_utf8_lossy(&session.seen)
        );
    }
    session.send("exit 0\n").await;
    assert_eq!(session.finish().await.0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_command_fails_like_a_shell() {
    let (_dir, mut client) = agent().await;
    let run = exec(&mut client, command(&["tart-agent-no-such-command", "x"], None), None).await;
    assert_eq!(run.code, 127);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr()
            .starts_with("tart-guest-agent: failed to start \"tart-agent-no-such-command\": "),
        "{:?}",
        run.stderr()
    );
    let tty = Some(TerminalSize { rows: 24, cols: 80 });
    assert_eq!(
        exec(&mut client, command(&["tart-agent-no-such-command"], tty), None)
            .await
            .code,
        127
    );
}

/// The machine's local IPv4 addresses, read from the kernel's routing tables rather than the way
/// the agent reads them (getifaddrs).
fn local_ipv4_addresses() -> Vec<Ipv4Addr> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap();
    let lines: Vec<&str> = trie.lines().collect();
    lines
        .windows(2)
        .filter(|pair| pair[1].trim() == "/32 host LOCAL")
        .filter_map(|pair| pair[0].trim().trim_start_matches(['|', '+', '-', ' ']).parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn resolve_ip_answers_a_global_address_of_this_machine() {
    let (_dir, mut client) = agent().await;
    let global: Vec<Ipv4Addr> = local_ipv4_addresses()
        .into_iter()
        .filter(|ip| !(ip.is_loopback() || ip.is_link_local() || ip.is_unspecified()))
        .collect();
    match client.resolve_ip(PATIENCE).await {
        Ok(ip) => {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert!(
                global.contains(&ip),
                "{ip} is not among this machine's global addresses {global:?}"
            );
        }
        Err(Error::Status(status)) => {
            assert!(global.is_empty(), "{status:?} although this machine has {global:?}");
            assert_eq!(
                (status.code(), status.message()),
                (tonic::Code::NotFound, NO_GLOBAL_IPV4)
            );
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn command_dies_with_the_client() {
    for tty in [None, Some(TerminalSize { rows: 24, cols: 80 })] {
        let (_dir, client) = agent().await;
        let mut session = Session::start(
            client,
            command(&["sh", "-c", "echo pid=$$.; exec sleep 1000"], tty),
            false,
        );
        session.wait_for(".").await;
        let seen = String::from_utf8_lossy(&session.seen).into_owned();
        let pid = &seen[seen.find("pid=").unwrap() + 4..seen.find('.').unwrap()];
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        assert!(proc_dir.exists());
        session.task.abort();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while proc_dir.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{pid} (tty {tty:?}) outlived its client"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_path_longer_than_sun_path_works() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
    std::fs::create_dir_all(&deep).unwrap();
    let socket = deep.join("agent.sock");
    assert!(socket.as_os_str().len() > 108);
    let mut client = serve_and_connect(&socket).await;
    assert!(socket.exists(), "the socket must be created where asked");
    let run = exec(&mut client, command(&["echo", "ok"], None), None).await;
    assert_eq!((run.code, run.stdout()), (0, "ok\n".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_to_a_missing_socket_says_where_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let message = AgentClient::connect_unix(&socket).await.unwrap_err().to_string();
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
    assert!(message.contains("is tart-guest-agent running"), "{message}");
}
