//! OCI side of Tart: remote image names and the local image cache under `cache/OCIs/`.

mod cache;
mod name;

pub use cache::{CacheEntry, OciCache};
pub use name::{NameError, Reference, RemoteName};
