//! The progress interface shared by the crates that transfer or convert images: the OCI engine,
//! cloud-image downloads and containerDisk extraction. A crate of its own so that they need not
//! depend on each other to report progress the same way.

/// Where the push/pull engine reports what it is doing. The CLI draws progress bars on a
/// terminal and prints Tart's plain lines otherwise (Packer and the GitLab executor read them).
pub trait Progress: Send + Sync {
    /// One of Tart's status lines, e.g. `pulling disk (1.2 GB compressed)...`.
    fn line(&self, text: &str);
    /// Starts counting `total` bytes of a transfer.
    fn begin(&self, total: u64);
    fn advance(&self, bytes: u64);
    fn end(&self);
}
