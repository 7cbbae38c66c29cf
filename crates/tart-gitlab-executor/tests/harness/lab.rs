//! Where the guest tests' jobs run: the executor inside a [`NetLab`]'s host namespace (where
//! `tart run` builds its shared network), a TART_HOME of the test's own, and the Debian image,
//! booted once so that its user `admin` exists, in a real registry with Basic auth that the
//! lab reaches on 127.0.0.1 as production hosts reach theirs.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tart_testkit::{NetLab, Registry};

use super::{executor_binary, tart_beside, Executor};

pub const REGISTRY_USER: &str = "ci";
pub const REGISTRY_PASSWORD: &str = "registry-secret";
const CLOUD_INIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Names the cached golden VM's recipe (make_golden_vm): change it when the recipe changes.
const GOLDEN_RECIPE: &str = "v1";

/// The golden VM pushed to a registry of the test's own (gone with it).
pub struct Golden {
    pub registry: Registry,
    pub image: String,
    /// A private key that `admin` accepts.
    pub key: PathBuf,
}

impl Golden {
    pub fn in_registry() -> Golden {
        let vm = golden_vm();
        let registry = Registry::basic(REGISTRY_USER, REGISTRY_PASSWORD);
        let image = format!("{}/ci/debian:12", registry.host());
        // tart push holds the VM's run lock: a second push at once is refused ("is running").
        static PUSH: Mutex<()> = Mutex::new(());
        let _one_at_a_time = PUSH.lock().unwrap_or_else(PoisonError::into_inner);
        succeed(
            tart_in(&vm.join("home"))
                .args(["push", "--insecure", "golden", &image])
                .env("TART_REGISTRY_USERNAME", REGISTRY_USER)
                .env("TART_REGISTRY_PASSWORD", REGISTRY_PASSWORD),
        );
        Golden {
            registry,
            image,
            key: vm.join("user/.ssh/id_ed25519"),
        }
    }
}

fn tart_in(home: &Path) -> Command {
    let mut cmd = Command::new(tart_beside(&executor_binary()));
    cmd.env("TART_HOME", home);
    cmd
}

/// The Debian image as VM `golden`, booted once so that cloud-init made `admin` with the
/// password `admin` and a key, cached in build/gitlab-golden by the image and the recipe (a
/// boot under TCG is the costliest step of these tests). Its directory: `home/` (a TART_HOME)
/// and `user/.ssh/` (the key).
fn golden_vm() -> &'static Path {
    static VM: OnceLock<PathBuf> = OnceLock::new();
    VM.get_or_init(|| {
        let image = tart_testkit::debian_image();
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/gitlab-golden");
        let stem = image.file_stem().unwrap().to_string_lossy();
        let dir = cache.join(format!("{stem}-{GOLDEN_RECIPE}"));
        if dir.join("home/vms/golden/config.json").is_file() {
            return dir;
        }
        std::fs::create_dir_all(&cache).unwrap();
        let staging = tempfile::tempdir_in(&cache).unwrap();
        make_golden_vm(image, staging.path());
        // Another test process may have finished first: then its VM is used and ours dropped.
        let _ = std::fs::rename(staging.keep(), &dir);
        dir
    })
}

fn make_golden_vm(image: &Path, dir: &Path) {
    let started = Instant::now();
    let user = dir.join("user");
    std::fs::create_dir_all(user.join(".ssh")).unwrap();
    let key = user.join(".ssh/id_ed25519");
    succeed(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f"])
            .arg(&key),
    );
    let tart = |args: &[&str]| {
        let mut cmd = tart_in(&dir.join("home"));
        // The seed takes the invoking user's keys from $HOME/.ssh.
        cmd.args(args).env("HOME", &user).env_remove("SUDO_USER");
        cmd
    };
    let image = image.to_str().unwrap();
    succeed(&mut tart(&[
        "create",
        "--from-image",
        image,
        "--disk-size",
        "4",
        "golden",
    ]));
    succeed(&mut tart(&["set", "golden", "--cpu", "1", "--memory", "1024"]));
    // User-mode networking: this boot only needs the agent, which tart reaches over vsock.
    let mut run = tart(&["run", "--no-graphics", "--net-user", "golden"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait = CLOUD_INIT_TIMEOUT.as_secs().to_string();
    let cloud_init =
        |mut status: Command| String::from_utf8_lossy(&status.output().unwrap().stdout).contains("status: done");
    let ready = tart(&["ip", "--resolver", "agent", "--wait", &wait, "golden"]).output().unwrap().status.success()
        && cloud_init(tart(&["exec", "golden", "cloud-init", "status", "--wait"]))
        // Sysprep: an image keeps its machine-id, from which systemd-networkd derives its DHCP
        // client id; clones sharing one would share one lease. Empty, it is made anew at boot.
        // And, as GitLab's docs tell shell-executor hosts, no ~/.bash_logout: Debian's fails
        // the login shells that the PyPI driver runs scripts in.
        && tart(&["exec", "golden", "sh", "-c", "truncate -s 0 /etc/machine-id && rm -f /home/admin/.bash_logout && sync"])
            .status()
            .unwrap()
            .success();
    let _ = tart(&["stop", "golden"]).output();
    let _ = run.wait();
    assert!(
        ready,
        "the golden VM did not finish cloud-init, or could not be prepared"
    );
    eprintln!("golden VM ready in {:.0?}", started.elapsed());
}

/// A lab for one test's jobs: its namespaces, its TART_HOME, the registry reachable inside.
pub struct JobLab {
    pub lab: NetLab,
    pub home: tempfile::TempDir,
}

impl JobLab {
    pub fn new(golden: &Golden) -> JobLab {
        let lab = NetLab::new();
        let target: SocketAddr = golden.registry.host().parse().unwrap();
        forward_into(&lab.host, target);
        JobLab {
            lab,
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// The image pulled into the lab's TART_HOME, as on a runner host that ran jobs before:
    /// concurrent first pulls of one image into one TART_HOME race in tart (reported: "failed to
    /// lock …/tmp/pull-<digest>: No such file or directory"); pulls of a cached image do not.
    pub fn pull(&self, golden: &Golden) {
        let out = self
            .lab
            .command_in(&self.lab.host, tart_beside(&executor_binary()))
            .args(["pull", "--insecure", &golden.image])
            .env("TART_HOME", self.tart_home())
            .env("TART_REGISTRY_USERNAME", REGISTRY_USER)
            .env("TART_REGISTRY_PASSWORD", REGISTRY_PASSWORD)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn tart_home(&self) -> PathBuf {
        self.home.path().join("home")
    }

    /// The executor in the lab's host namespace: `ip netns exec` execs it, so the runner's
    /// signals to the stage's process group reach it.
    pub fn executor(&self) -> Executor {
        let mut executor = Executor::new(vec![
            OsString::from("ip"),
            "netns".into(),
            "exec".into(),
            self.lab.host.clone().into(),
            executor_binary().into(),
        ]);
        executor.env = vec![
            ("TART_HOME".into(), self.tart_home().to_string_lossy().into_owned()),
            (
                "TART_NETWORK_DIR".into(),
                self.lab.state_path().to_string_lossy().into_owned(),
            ),
            ("CI".into(), "1".into()),
        ];
        executor
    }

    /// `tart args...` in the lab, against its TART_HOME.
    pub fn tart(&self, args: &[&str]) -> Output {
        self.lab
            .command_in(&self.lab.host, tart_beside(&executor_binary()))
            .args(args)
            .env("TART_HOME", self.tart_home())
            .output()
            .unwrap()
    }

    /// The local VMs.
    pub fn vms(&self) -> Vec<String> {
        let out = self.tart(&["list", "--quiet", "--source", "local"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The lab's tap interfaces (one per running VM on the shared network).
    pub fn taps(&self) -> Vec<String> {
        self.lab
            .output_in(&self.lab.host, "ip", &["-o", "link", "show", "type", "tun"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// QEMU processes running a disk under `home`.
pub fn qemu_processes(home: &Path) -> Vec<String> {
    let needle = home.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if (cmdline.starts_with("qemu-system") || cmdline.contains("/qemu-system")) && cmdline.contains(&needle) {
            found.push(cmdline);
        }
    }
    found
}

/// Listens on `target`'s port on 127.0.0.1 inside namespace `ns` and forwards every
/// connection to `target` in this process's namespace: the registry is one, on 127.0.0.1,
/// for the tests and for the executor in the lab. A socket stays in the namespace it was made
/// in, so only its creation happens inside (setns applies to the calling thread alone).
fn forward_into(ns: &str, target: SocketAddr) {
    let own = File::open("/proc/thread-self/ns/net").unwrap();
    let lab = File::open(format!("/run/netns/{ns}")).unwrap();
    let listener = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this (scoped, short-lived) thread with valid namespace fds.
                assert_eq!(
                    unsafe { libc::setns(lab.as_raw_fd(), libc::CLONE_NEWNET) },
                    0,
                    "setns into {ns}"
                );
                let listener = TcpListener::bind(("127.0.0.1", target.port()));
                // SAFETY: as above.
                assert_eq!(unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                listener.expect("listen in the lab")
            })
            .join()
            .unwrap()
    });
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

pub fn succeed(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
