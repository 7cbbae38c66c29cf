use std::io::{self, Write};
use std::mem;
use std::sync::OnceLock;

use crate::{BLOCK_SIZE, MAGIC_COMPRESSED, MAGIC_END, MAGIC_STORED};

const COMPRESSED_HEADER_LEN: usize = 12;

/// Streaming encoder: compresses everything written to it into linked 64 KiB blocks on `W`.
///
/// Input is buffered until a full block is available, so every block but the last holds exactly
/// [`BLOCK_SIZE`] bytes, the layout Apple's encoder produces. [`Encoder::finish`] writes the last
/// block and the end marker; dropping the encoder without it leaves a truncated stream.
#[derive(Debug)]
pub struct Encoder<W: Write> {
    inner: W,
    /// Input of the block being gathered.
    block: Vec<u8>,
    /// Input of the previous block: the dictionary the next block's matches may reach into.
    previous: Vec<u8>,
    /// Scratch space for one encoded block with its header.
    encoded: Vec<u8>,
}

impl<W: Write> Encoder<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            block: Vec::with_capacity(BLOCK_SIZE),
            previous: Vec::with_capacity(BLOCK_SIZE),
            encoded: vec![0; COMPRESSED_HEADER_LEN + lz4_flex::block::get_maximum_output_size(BLOCK_SIZE)],
        }
    }

    /// Writes the pending input as the last block, then the end marker, and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() {
            self.write_block()?;
        }
        self.inner.write_all(&MAGIC_END)?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    fn write_block(&mut self) -> io::Result<()> {
        let len = self.block.len();
        // Zero runs dominate disk images. Without a dictionary the codec encodes a zero block as
        // one offset-1 match, which decoders expand with a memset; with one it picks a small
        // offset into the dictionary that decoders copy byte by byte, several times slower.
        let zero = is_all_zero(&self.block);
        if zero && len == BLOCK_SIZE {
            // Always the same bytes: encoded once per process, not once per 64 KiB of zeros.
            self.inner.write_all(zero_block())?;
            mem::swap(&mut self.block, &mut self.previous);
            self.block.clear();
            return Ok(());
        }
        let dict: &[u8] = if zero { &[] } else { &self.previous };
        let compressed =
            lz4_flex::block::compress_into_with_dict(&self.block, &mut self.encoded[COMPRESSED_HEADER_LEN..], dict)
                .map_err(io::Error::other)?;
        if compressed < len {
            self.encoded[..4].copy_from_slice(&MAGIC_COMPRESSED);
            self.encoded[4..8].copy_from_slice(&block_len_u32(len).to_le_bytes());
            self.encoded[8..12].copy_from_slice(&block_len_u32(compressed).to_le_bytes());
            self.inner
                .write_all(&self.encoded[..COMPRESSED_HEADER_LEN + compressed])?;
        } else {
            let mut header = [0; 8];
            header[..4].copy_from_slice(&MAGIC_STORED);
            header[4..].copy_from_slice(&block_len_u32(len).to_le_bytes());
            self.inner.write_all(&header)?;
            self.inner.write_all(&self.block)?;
        }
        mem::swap(&mut self.block, &mut self.previous);
        self.block.clear();
        Ok(())
    }
}

/// A full block of zeros as [`Encoder::write_block`] encodes it, header included.
fn zero_block() -> &'static [u8] {
    static ZERO_BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    ZERO_BLOCK.get_or_init(|| {
        let zeros = vec![0u8; BLOCK_SIZE];
        let mut block = vec![0; COMPRESSED_HEADER_LEN + lz4_flex::block::get_maximum_output_size(BLOCK_SIZE)];
        let compressed = lz4_flex::block::compress_into_with_dict(&zeros, &mut block[COMPRESSED_HEADER_LEN..], &[])
            .expect("the buffer has room for any block");
        block[..4].copy_from_slice(&MAGIC_COMPRESSED);
        block[4..8].copy_from_slice(&block_len_u32(BLOCK_SIZE).to_le_bytes());
        block[8..12].copy_from_slice(&block_len_u32(compressed).to_le_bytes());
        block.truncate(COMPRESSED_HEADER_LEN + compressed);
        block
    })
}

fn is_all_zero(data: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorises; a byte-wise `all` would not.
    data.chunks(256)
        .all(|chunk| chunk.iter().fold(0, |acc, &b| acc | b) == 0)
}

/// Block sizes never exceed [`BLOCK_SIZE`], so they always fit the u32 header fields.
fn block_len_u32(len: usize) -> u32 {
    debug_assert!(len <= BLOCK_SIZE);
    len as u32
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A full block is encoded only once more input shows it is not the last one, so that
        // a failure is reported before any byte of `buf` has been taken.
        if self.block.len() == BLOCK_SIZE && !buf.is_empty() {
            self.write_block()?;
        }
        let n = (BLOCK_SIZE - self.block.len()).min(buf.len());
        self.block.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    /// Flushes the inner writer only: emitting the partial block would make a short block in the
    /// middle of the stream, a layout Apple's encoder never produces.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
