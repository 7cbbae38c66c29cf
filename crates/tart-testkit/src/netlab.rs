//! [`NetLab`]: two network namespaces made for one test, so that `tart run` can build its shared
//! network (bridge, dnsmasq, nftables) without touching the host's:
//!
//! ```text
//!   "host" namespace (tart runs here)             "outside" namespace (the world)
//!   tart0 192.168.64.1/24 ... VMs                  
//!   uplink 198.51.100.1/24  <--- veth --->  wan 198.51.100.2/24
//!   default via 198.51.100.2                       lo 203.0.113.2/32 (a second "far" network)
//!                                                  lo 10.99.0.2/32 (a private one)
//! ```
//!
//! The outside addresses are documentation ranges (RFC 5737), i.e. public as far as Softnet is
//! concerned, and the host's `uplink` address plays "the host's other address". Everything in
//! the namespaces (dnsmasq included) is killed and the namespaces deleted when the lab drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const HOST_UPLINK: &str = "198.51.100.1";
pub const OUTSIDE: &str = "198.51.100.2";
pub const FAR: &str = "203.0.113.2";
/// A private address out there, which Softnet VMs reach only if allowed.
pub const PRIVATE_FAR: &str = "10.99.0.2";

pub struct NetLab {
    pub host: String,
    pub outside: String,
    /// `TART_NETWORK_DIR` for every tart command of the lab.
    pub state_dir: tempfile::TempDir,
    servers: Vec<Child>,
}

impl NetLab {
    // Not a Default: making one creates two network namespaces.
    #[allow(clippy::new_without_default)]
    pub fn new() -> NetLab {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = format!("tart{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let lab = NetLab {
            host: format!("{id}-host"),
            outside: format!("{id}-out"),
            state_dir: tempfile::tempdir().expect("a temporary directory"),
            servers: Vec::new(),
        };
        for ns in [&lab.host, &lab.outside] {
            run(Command::new("ip").args(["netns", "add", ns]));
            lab.ip(ns, &["link", "set", "lo", "up"]);
        }
        lab.ip(
            &lab.host,
            &[
                "link",
                "add",
                "uplink",
                "type",
                "veth",
                "peer",
                "name",
                "wan",
                "netns",
                &lab.outside,
            ],
        );
        lab.ip(
            &lab.host,
            &["addr", "add", &format!("{HOST_UPLINK}/24"), "dev", "uplink"],
        );
        lab.ip(&lab.host, &["link", "set", "uplink", "up"]);
        lab.ip(&lab.host, &["route", "add", "default", "via", OUTSIDE]);
        lab.ip(&lab.outside, &["addr", "add", &format!("{OUTSIDE}/24"), "dev", "wan"]);
        lab.ip(&lab.outside, &["addr", "add", &format!("{FAR}/32"), "dev", "lo"]);
        lab.ip(
            &lab.outside,
            &["addr", "add", &format!("{PRIVATE_FAR}/32"), "dev", "lo"],
        );
        lab.ip(&lab.outside, &["link", "set", "wan", "up"]);
        lab
    }

    /// Whether frames crossing the host namespace's bridges also pass its IPv4 netfilter hooks
    /// (`br_netfilter`, on where Docker runs; the setting is per namespace). Where the kernel
    /// has no br_netfilter, it is off whatever is asked.
    pub fn set_bridge_nf_call_iptables(&self, on: bool) {
        if !Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
            eprintln!("netlab: this kernel has no br_netfilter; bridged frames skip the IPv4 hooks");
            return;
        }
        let status = self
            .command_in(&self.host, "sh")
            .args([
                "-c",
                &format!("echo {} >/proc/sys/net/bridge/bridge-nf-call-iptables", u8::from(on)),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "br_netfilter's setting could not be changed");
    }

    /// `program` run inside namespace `ns`.
    pub fn command_in(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(ns, self.state_dir.path(), program)
    }

    /// `ip <args>` in namespace `ns`, which must succeed.
    pub fn ip(&self, ns: &str, args: &[&str]) {
        run(self.command_in(ns, "ip").args(args));
    }

    /// The output of `program args` in namespace `ns` (whatever its status).
    pub fn output_in(&self, ns: &str, program: &str, args: &[&str]) -> String {
        let out = self
            .command_in(ns, program)
            .args(args)
            .output()
            .expect("run a command in the lab");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// An HTTP server in `ns` on `address:port` whose every page is `body`.
    pub fn serve_http(&mut self, ns: &str, address: &str, port: u16, body: &str) {
        let root = self.state_dir.path().join(format!("www-{ns}-{address}-{port}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), body).unwrap();
        let mut server = self.command_in(ns, "python3");
        server
            .args(["-m", "http.server", "--bind", address, &port.to_string(), "--directory"])
            .arg(&root);
        self.spawn(server);
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = format!("{address}:{port}");
        while !self.output_in(ns, "ss", &["-Hltn", "src", &probe]).contains(&probe) {
            assert!(Instant::now() < deadline, "the HTTP server on {probe} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `command` (from [`NetLab::command_in`]) as a server that lives as long as the lab.
    pub fn spawn(&mut self, mut command: Command) {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a server in the lab");
        self.servers.push(child);
    }

    /// dnsmasq's pid file in the lab's state directory.
    pub fn dnsmasq_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state_dir.path().join("dnsmasq.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn lease_file(&self) -> PathBuf {
        self.state_dir.path().join("dnsmasq.leases")
    }

    pub fn state_path(&self) -> &Path {
        self.state_dir.path()
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        for ns in [&self.host, &self.outside] {
            // Whatever still runs in the namespace (dnsmasq, a VM's helpers) goes with it.
            let pids = Command::new("ip").args(["netns", "pids", ns]).output();
            if let Ok(out) = pids {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) has no memory-safety preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// `program` run inside namespace `ns`, with `state_dir` as tart's `TART_NETWORK_DIR` (for
/// callers that keep a lab's names but not the lab).
pub fn command_in(ns: &str, state_dir: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]).arg(program);
    command.env("TART_NETWORK_DIR", state_dir);
    command
}

fn run(command: &mut Command) {
    let out = command.output().expect("run ip");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
