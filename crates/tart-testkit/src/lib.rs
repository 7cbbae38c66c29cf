//! Test support for running `tart` against real OCI registries on 127.0.0.1.
//!
//! - [`Registry`]: a private instance of Debian's CNCF distribution server (`docker-registry` 2.8),
//!   anonymous, with htpasswd Basic auth, or with Docker token auth from an in-process token server.
//! - [`FaultProxy`]: a reverse proxy in front of any registry that logs requests and breaks blob
//!   downloads on demand (corruption, truncation, a lying `Content-Length`, stalls, cross-host redirects).
//!
//! - [`test_guest_image`]: the small UEFI guest that VM tests boot.
//!
//! Everything binds ephemeral ports and private temporary directories, so tests can run in parallel.

mod client;
mod http;
mod process;
mod proxy;
mod registry;
mod token;

pub use proxy::{FaultProxy, ProxiedRequest};
pub use registry::Registry;
pub use token::{TokenOptions, TokenRequest};

/// The test guest disk (`scripts/guest/build-test-guest`: a Debian kernel and busybox, printing
/// `TART-TEST-GUEST: booted` and a tick a second on its serial console), built on first use.
pub fn test_guest_image() -> &'static std::path::Path {
    static IMAGE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let image = repo.join("build/guest/test.img");
        if !image.is_file() {
            let status = std::process::Command::new(repo.join("scripts/guest/build-test-guest"))
                .arg(&image)
                .status()
                .expect("run scripts/guest/build-test-guest");
            assert!(status.success(), "build-test-guest failed");
        }
        image
    })
}

/// The OCI digest (`sha256:<hex>`) of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
    )
}
