//! OCI side of Tart: remote image names, the local image cache under `cache/OCIs/`, the registry
//! client and the push/pull engine for Tart's VM image format.

mod cache;
pub mod manifest;
pub mod media;
mod name;
pub mod progress;
pub mod pull;
pub mod push;
pub mod registry;
mod retry;
mod reuse;
mod sink;

pub use cache::{CacheEntry, OciCache};
pub use name::{NameError, Reference, RemoteName};
