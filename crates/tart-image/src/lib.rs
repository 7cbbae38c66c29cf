//! VM disks from distributions' cloud images (`tart create --from-image`): what an image file
//! is ([`inspect`]), its conversion to the sparse raw `disk.img` tart runs ([`convert_to_raw`]),
//! and downloads into a cache keyed by URL that survive interruptions ([`download`]).

mod convert;
mod download;

pub use convert::{check_disk_size, convert_to_raw, inspect, ImageInfo};
pub use download::{check_sha256, download, DownloadCache};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Home(#[from] tart_home::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_context(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn refused(text: impl Into<String>) -> Error {
    Error::Refused(text.into())
}

#[cfg(test)]
mod tests;
