//! Media types and annotation keys of Tart's image format (§4.2 of the spec).

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const VM_CONFIG: &str = "application/vnd.cirruslabs.tart.config.v1";
pub const DISK_V2: &str = "application/vnd.cirruslabs.tart.disk.v2";
pub const DISK_V1: &str = "application/vnd.cirruslabs.tart.disk.v1";
pub const NVRAM: &str = "application/vnd.cirruslabs.tart.nvram.v1";

pub const UNCOMPRESSED_DISK_SIZE: &str = "org.cirruslabs.tart.uncompressed-disk-size";
pub const UPLOAD_TIME: &str = "org.cirruslabs.tart.upload-time";
pub const UNCOMPRESSED_SIZE: &str = "org.cirruslabs.tart.uncompressed-size";
pub const UNCOMPRESSED_CONTENT_DIGEST: &str = "org.cirruslabs.tart.uncompressed-content-digest";
pub const DISK_FORMAT_LABEL: &str = "org.cirruslabs.tart.disk.format";

/// Disk images are cut into layers of this many uncompressed bytes.
pub const DISK_CHUNK_SIZE: u64 = 512 * 1024 * 1024;
