//! Media types and annotation keys: Tart's image format (§4.2 of the spec), vetu's
//! (vetu-format.md §2), and the OCI/Docker types of manifests, indexes and container layers.

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

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a manifest request accepts: single-image manifests and the indexes that point to them.
pub const ACCEPTED_MANIFESTS: [&str; 4] = [MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

pub const VETU_CONFIG: &str = "application/vnd.cirruslabs.vetu.config.v1";
pub const VETU_KERNEL: &str = "application/vnd.cirruslabs.vetu.kernel.v1";
pub const VETU_INITRAMFS: &str = "application/vnd.cirruslabs.vetu.initramfs.v1";
pub const VETU_DISK: &str = "application/vnd.cirruslabs.vetu.disk.v1";
pub const VETU_DISK_NAME: &str = "org.cirruslabs.vetu.name";
pub const VETU_UNCOMPRESSED_SIZE: &str = "org.cirruslabs.vetu.uncompressed-size";
pub const VETU_UNCOMPRESSED_DIGEST: &str = "org.cirruslabs.vetu.uncompressed-digest";

/// Layers of container images: what makes a manifest a KubeVirt containerDisk.
pub const CONTAINER_LAYERS: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];
