//! What the VM tests share: a TART_HOME with the test guest as VM `guest`, `tart` commands
//! against it (inside a [`NetLab`]'s host namespace if given one), and the serial console.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tart_testkit::NetLab;

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Home {
    pub dir: tempfile::TempDir,
    /// The lab namespace tart runs in, and the lab's TART_NETWORK_DIR.
    lab: Option<(String, PathBuf)>,
}

impl Home {
    pub fn empty() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
            lab: None,
        }
    }

    /// A TART_HOME with the test guest imported as VM `guest`.
    pub fn with_guest() -> Home {
        Self::with_image(tart_testkit::test_guest_image())
    }

    pub fn with_image(image: &Path) -> Home {
        let home = Home::empty();
        home.add_vm("guest", image);
        home
    }

    /// Every later `tart` command runs in `lab`'s host namespace.
    pub fn in_lab(mut self, lab: &NetLab) -> Home {
        self.lab = Some((lab.host.clone(), lab.state_path().to_owned()));
        self
    }

    /// Another VM made from `image`, with 1 CPU and 512 MiB like `guest`.
    pub fn add_vm(&self, name: &str, image: &Path) {
        self.ok(&["create", "--linux", "--disk-size", "1", name]);
        self.ok(&[
            "set",
            name,
            "--disk",
            image.to_str().unwrap(),
            "--cpu",
            "1",
            "--memory",
            "512",
        ]);
    }

    pub fn tart(&self) -> Command {
        self.command(assert_cmd::cargo::cargo_bin("tart"))
    }

    /// `program` (tart itself, or tart under another name such as a `vetu` link to it) with
    /// tart's environment, in the lab's host namespace if any.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = match &self.lab {
            Some((ns, state)) => tart_testkit::netlab::command_in(ns, state, program),
            None => Command::new(program),
        };
        cmd.env("TART_HOME", self.dir.path().join("home")).env("CI", "1");
        cmd
    }

    /// [`Home::tart`] without CAP_NET_ADMIN, as an unprivileged user's tart would run.
    pub fn tart_without_net_admin(&self) -> Command {
        let tart = self.tart();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--bounding-set", "-net_admin", "--inh-caps", "-net_admin"])
            .arg(tart.get_program())
            .args(tart.get_args());
        for (key, value) in tart.get_envs() {
            if let Some(value) = value {
                cmd.env(key, value);
            }
        }
        cmd
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.tart().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tart {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn serial(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("serial-{n}.log"))
    }

    pub fn run(&self, n: u32) -> Child {
        self.run_with(n, &[])
    }

    pub fn run_with(&self, n: u32, flags: &[&str]) -> Child {
        self.run_vm("guest", n, flags)
    }

    /// `tart run --no-graphics --serial-path <serial n> <flags> <vm>`. Outside a lab, with
    /// user-mode networking unless the flags choose: tests never touch the host's network.
    pub fn run_vm(&self, vm: &str, n: u32, flags: &[&str]) -> Child {
        let mut cmd = self.tart();
        cmd.args([
            "run",
            "--no-graphics",
            "--serial-path",
            self.serial(n).to_str().unwrap(),
        ])
        .args(flags);
        if self.lab.is_none() && !flags.iter().any(|flag| flag.starts_with("--net-")) {
            cmd.arg("--net-user");
        }
        cmd.arg(vm)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn state(&self) -> String {
        let json: serde_json::Value = serde_json::from_str(&self.ok(&["get", "guest", "--format", "json"])).unwrap();
        json["State"].as_str().unwrap().to_owned()
    }
}

/// `tart stop <vm>`; `tart run`'s exit status must then be 0. Its stdout and stderr.
pub fn stop(home: &Home, vm: &str, run: Child) -> (String, String) {
    home.ok(&["stop", vm]);
    let (code, stdout, stderr) = finish(run);
    assert_eq!(code, 0, "tart run {vm}: {stdout}{stderr}");
    (stdout, stderr)
}

/// `command` fails with exit `code` and `needle` in its stderr, which is returned.
pub fn fails_with(command: &mut Command, code: i32, needle: &str) -> String {
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{command:?}: {stderr}");
    assert!(stderr.contains(needle), "{command:?}: {stderr}");
    stderr
}

/// Whether a QEMU process has the disk `disk` open (by its command line).
pub fn qemu_runs(disk: &Path) -> bool {
    Command::new("pgrep")
        .args(["-f", &format!("file={}", disk.display())])
        .output()
        .unwrap()
        .status
        .success()
}

pub fn wait_for(serial: &Path, text: &str) -> String {
    tart_testkit::wait_for_text(serial, text, BOOT_TIMEOUT)
}

pub fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
