//! The tart-guest-agent binary itself: flags, and serving a client.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tart_agent::{AgentClient, ExecCommand};

const AGENT: &str = env!("CARGO_BIN_EXE_tart-guest-agent");

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn help_lists_the_flags() {
    let output = Command::new(AGENT).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in ["--run-rpc", "--run-agent", "--listen", "vsock:8080"] {
        assert!(help.contains(flag), "{flag} missing from {help}");
    }
}

#[test]
fn bad_flags_are_refused_with_usage() {
    for args in [&["--bogus"][..], &["--listen", "tcp:1"], &["--listen"]] {
        let output = Command::new(AGENT).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("Usage:"), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_exec_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = KillOnDrop(
        Command::new(AGENT)
            .args(["--run-agent", &format!("--listen=unix:{}", socket.display())])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent did not create {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = AgentClient::connect_unix(&socket).await.unwrap();
    let command = ExecCommand {
        name: "sh".into(),
        args: vec!["-c".into(), "echo hi; exit 4".into()],
        tty: None,
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let code = client
        .exec(command, None, None, &mut stdout, &mut stderr)
        .await
        .unwrap();
    assert_eq!((code, stdout, stderr), (4, b"hi\n".to_vec(), Vec::new()));
}
