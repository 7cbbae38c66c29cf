//! Apple Compression-framework LZ4 streams (`COMPRESSION_LZ4`), the codec of every Tart
//! `disk.v2` OCI layer.
//!
//! A stream is a sequence of blocks, integers little-endian:
//!
//! | magic  | bytes         | header fields                      | payload                        |
//! |--------|---------------|------------------------------------|--------------------------------|
//! | `bv41` | `62 76 34 31` | u32 decoded size, u32 encoded size | one raw LZ4 *block* (no frame) |
//! | `bv4-` | `62 76 34 2d` | u32 size                           | `size` stored bytes            |
//! | `bv4$` | `62 76 34 24` | —                                  | none: end of stream            |
//!
//! Blocks are *linked*: an LZ4 match may reach up to 64 KiB back into the output of earlier
//! blocks (stored ones included), so both sides keep the last 64 KiB of decoded data as an LZ4
//! dictionary. Apple's encoder cuts the input into 64 KiB blocks; so does [`Encoder`], which falls
//! back to a stored block when LZ4 does not shrink one.
//!
//! Decoding is offered as a pull adapter ([`Decoder`], an [`std::io::Read`]) and as a push engine
//! ([`PushDecoder`]) for callers that receive the stream in chunks, e.g. from an async HTTP body.
//! Both are strict, since a layer that decodes to anything but its producer's input is corrupt:
//! the `bv4$` marker is required and nothing may follow it, a `bv41` block must decode to
//! exactly its declared size, and blocks larger than [`MAX_BLOCK_SIZE`] (or payloads larger than
//! LZ4 could need for their declared size) are rejected before anything is allocated for them.
//!
//! ```
//! use std::io::Write;
//!
//! let disk = [vec![0; 100_000], b"boot sector ".repeat(1000)].concat();
//! let mut encoder = apple_lz4::Encoder::new(Vec::new());
//! encoder.write_all(&disk)?;
//! let layer = encoder.finish()?;
//!
//! // Decode as chunks arrive, e.g. from an HTTP body.
//! let mut decoder = apple_lz4::PushDecoder::new();
//! let mut restored = Vec::new();
//! for chunk in layer.chunks(1000) {
//!     decoder.feed(chunk, &mut restored)?;
//! }
//! decoder.finish()?;
//! assert_eq!(restored, disk);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod decode;
mod encode;
#[cfg(test)]
mod tests;

use std::io::{self, Write};

pub use decode::{Decoder, PushDecoder};
pub use encode::Encoder;

/// Decoded size of the blocks [`Encoder`] writes (all but the last), as Apple's encoder does.
pub const BLOCK_SIZE: usize = 64 * 1024;

/// Largest decoded block the decoders accept. Apple writes 64 KiB blocks; the generous margin
/// tolerates other encoders while bounding the memory a hostile stream can make us allocate.
pub const MAX_BLOCK_SIZE: usize = 4 * 1024 * 1024;

/// How far back an LZ4 match can reach (its offset is a u16), hence the history both sides keep.
const WINDOW_SIZE: usize = 64 * 1024;

const MAGIC_COMPRESSED: [u8; 4] = *b"bv41";
const MAGIC_STORED: [u8; 4] = *b"bv4-";
const MAGIC_END: [u8; 4] = *b"bv4$";

/// Why a stream could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown Apple LZ4 block magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("Apple LZ4 block declares {size} decoded bytes, more than the {MAX_BLOCK_SIZE} allowed")]
    BlockTooLarge { size: u32 },
    #[error("Apple LZ4 block declares {encoded} encoded bytes for {decoded} decoded bytes, more than LZ4 can need")]
    EncodedSizeTooLarge { decoded: u32, encoded: u32 },
    #[error("LZ4 block does not decode to its declared {declared} bytes")]
    DecodedSizeMismatch { declared: u32 },
    #[error("LZ4 match reaches before the available 64 KiB history")]
    OffsetOutOfWindow,
    #[error("corrupt LZ4 block: {0}")]
    CorruptBlock(String),
    #[error("Apple LZ4 stream is truncated inside a block")]
    Truncated,
    #[error("Apple LZ4 stream ends without its bv4$ end marker")]
    MissingEndMarker,
    #[error("data follows the bv4$ end marker of an Apple LZ4 stream")]
    TrailingData,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Io(err) => err,
            err => io::Error::new(io::ErrorKind::InvalidData, err),
        }
    }
}

/// Compresses `data` into a complete stream, ready for Apple's decoder.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut encoder = Encoder::new(Vec::with_capacity(data.len() / 2 + 64));
    // Writing into a Vec only fails on allocation failure, which aborts anyway.
    encoder.write_all(data).expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Decompresses one complete stream; trailing bytes after the end marker are an error.
pub fn decompress(stream: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(stream.len().saturating_mul(2));
    let mut decoder = PushDecoder::new();
    decoder.feed(stream, &mut out)?;
    decoder.finish()?;
    Ok(out)
}
