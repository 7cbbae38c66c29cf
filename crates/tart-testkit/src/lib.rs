//! Test support for running `tart` against real OCI registries on 127.0.0.1.
//!
//! - [`Registry`]: a private instance of Debian's CNCF distribution server (`docker-registry` 2.8),
//!   anonymous, with htpasswd Basic auth, or with Docker token auth from an in-process token server.
//! - [`FaultProxy`]: a reverse proxy in front of any registry that logs requests and breaks blob
//!   downloads on demand (corruption, truncation, a lying `Content-Length`, stalls, cross-host redirects).
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

/// The OCI digest (`sha256:<hex>`) of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
    )
}
