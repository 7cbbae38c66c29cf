//! Test support for running `tart` against real OCI registries on 127.0.0.1.
//!
//! - [`Registry`]: a private instance of Debian's CNCF distribution server (`docker-registry` 2.8),
//!   anonymous, with htpasswd Basic auth, or with Docker token auth from an in-process token server.
//! - [`FaultProxy`]: a reverse proxy in front of any registry that logs requests and breaks blob
//!   downloads on demand (corruption, truncation, a lying `Content-Length`, stalls, cross-host redirects).
//!
//! - [`test_guest_image`], [`test_guest_image_with_agent`]: the small UEFI guest that VM tests boot.
//!
//! - [`NetLab`]: network namespaces of a test's own, where `tart run` builds its networks.
//!
//! - [`debian_image`]: the Debian 12 cloud image that real-guest tests boot; [`FileServer`]
//!   serves files like it over HTTP on 127.0.0.1.
//!
//! Everything binds ephemeral ports and private temporary directories, so tests can run in parallel.

mod client;
mod files;
mod http;
pub mod netlab;
mod process;
mod proxy;
mod registry;
mod token;

pub use files::FileServer;
pub use netlab::NetLab;
pub use process::{in_private_mounts, measured};
pub use proxy::{FaultProxy, ProxiedRequest};
pub use registry::Registry;
pub use token::{TokenOptions, TokenRequest};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The test guest disk (`scripts/guest/build-test-guest`: a Debian kernel and busybox, printing
/// `TART-TEST-GUEST: booted` and a tick a second on its serial console), built once per test
/// process (the builder is incremental: well under a second when nothing changed).
pub fn test_guest_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build_guest("test.img", None))
}

/// The test guest with our guest agent (`tart-guest-agent`, built static by
/// `scripts/guest/build-agent`) started at boot, listening on vsock port 8080.
pub fn test_guest_image_with_agent() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let agent = path_printed_by("scripts/guest/build-agent");
        build_guest("test-agent.img", Some(&agent))
    })
}

/// The Debian 12 cloud image (`scripts/guest/build-debian-image`: qcow2 with systemd,
/// cloud-init, sshd and our agent), built on first use and cached in `build/debian` by its inputs.
pub fn debian_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| path_printed_by("scripts/guest/build-debian-image"))
}

/// Runs one of the repository's build scripts, which print what they built as their last line.
fn path_printed_by(script: &str) -> PathBuf {
    let out = Command::new(repo_root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|err| panic!("run {script}: {err}"));
    assert!(out.status.success(), "{script} failed");
    let stdout = String::from_utf8(out.stdout).expect("a path in UTF-8");
    PathBuf::from(
        stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("{script} printed no path"))
            .trim(),
    )
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn build_guest(file_name: &str, agent: Option<&Path>) -> PathBuf {
    let repo = repo_root();
    let image = repo.join("build/guest").join(file_name);
    let mut command = Command::new(repo.join("scripts/guest/build-test-guest"));
    if let Some(agent) = agent {
        command.arg("--agent").arg(agent);
    }
    let status = command
        .arg(&image)
        .status()
        .expect("run scripts/guest/build-test-guest");
    assert!(status.success(), "build-test-guest failed");
    image
}

/// Waits until the file at `path` (a serial console log) contains `text` and returns the file's
/// text; panics with what it holds after `timeout`.
pub fn wait_for_text(path: &Path, text: &str, timeout: std::time::Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let log = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        if log.contains(text) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {text:?} in {}:\n{log}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The OCI digest (`sha256:<hex>`) of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
    )
}
