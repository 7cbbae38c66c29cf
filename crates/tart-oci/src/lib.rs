//! OCI side of Tart: remote image names, the local image cache under `cache/OCIs/`, the registry
//! client and the push/pull engine for Tart's VM image format, which also pulls vetu images and
//! KubeVirt containerDisks, choosing the platform from multi-arch indexes.

mod cache;
mod channel_reader;
mod containerdisk;
pub mod format;
mod lz4frame;
pub mod manifest;
pub mod media;
mod name;
pub mod platform;
pub mod progress;
pub mod pull;
pub mod push;
pub mod registry;
mod retry;
mod reuse;
mod sink;
pub mod vetu;

pub use cache::{CacheEntry, OciCache};
pub use name::{NameError, Reference, RemoteName};
