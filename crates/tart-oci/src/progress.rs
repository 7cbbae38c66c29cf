//! Re-exported so that the engine's users keep naming it `tart_oci::progress::Progress`.
pub use tart_progress::Progress;
