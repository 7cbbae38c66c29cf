//! Apple Archive, the format of Apple's AppleArchive framework and `aa` tool, and of the
//! `.tvm` files that Tart's `export` writes and `import` reads.
//!
//! An archive is a stream of entries, each an `AA01` header (see [`Header`]) followed by the
//! bytes of its blob fields (a file's `DAT`). Tart compresses that stream with Apple's `pbze`
//! container (see [`PbzeWriter`]): blocks of 4 MiB, each an independent LZFSE stream.
//!
//! Both directions stream with bounded memory: blocks are (de)compressed on all cores, a few
//! at a time, and all-zero blocks (the holes of a sparse disk image) are neither compressed nor
//! decompressed. Reading is strict, since archives come from elsewhere: sizes are checked
//! before anything is allocated for them, a block must decode to exactly its declared size, and
//! a cut-off archive is an error, never a short file.
//!
//! ```
//! use apple_archive::{ArchiveReader, ArchiveWriter, EntryType, Header, Key, PbzeWriter, Piece, Value};
//!
//! let data = b"{\"os\": \"linux\"}".to_vec();
//! let mut writer = ArchiveWriter::new(PbzeWriter::new(Vec::new())?);
//! writer.write_header(
//!     &Header::new()
//!         .with(Key::TYP, Value::Uint(u64::from(EntryType::File.letter())))
//!         .with(Key::PAT, Value::String(b"config.json".to_vec()))
//!         .with(Key::DAT, Value::Blob(data.len() as u64)),
//! )?;
//! writer.write_data(&data)?;
//! let tvm = writer.finish()?.finish()?;
//!
//! let mut reader = ArchiveReader::new(std::io::Cursor::new(tvm))?;
//! let header = reader.next_entry()?.unwrap();
//! assert_eq!(header.string(Key::PAT), Some(&b"config.json"[..]));
//! assert_eq!(reader.next_blob()?, Some((Key::DAT, data.len() as u64)));
//! match reader.read_blob(u64::MAX)? {
//!     Some(Piece::Bytes(bytes)) => assert_eq!(bytes, &data[..]),
//!     _ => unreachable!(),
//! }
//! assert!(reader.next_entry()?.is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod archive;
mod header;
mod pbz;
mod stream;
#[cfg(test)]
mod tests;

pub use archive::{ArchiveReader, ArchiveWriter, Sink};
pub use header::{EntryType, Header, Key, Value, LEGACY_MAGIC, MAGIC};
pub use pbz::{is_zero, PbzeWriter, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE};
pub use stream::Piece;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an Apple Archive: {0}")]
    NotAnArchive(String),
    #[error("corrupt Apple Archive: {0}")]
    Corrupt(String),
    #[error("truncated Apple Archive: {0}")]
    Truncated(String),
    #[error("cannot write this Apple Archive: {0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
