//! The uncompressed archive byte stream, read block by block from either container.

use std::io::Read;

use crate::pbz::{read_up_to, Block};
use crate::{Error, Result};

pub(crate) trait Blocks {
    fn next_block(&mut self) -> Result<Option<Block>>;
}

/// An uncompressed archive, read in large pieces.
pub(crate) struct RawBlocks<R: Read> {
    input: R,
}

impl<R: Read> RawBlocks<R> {
    pub(crate) fn new(input: R) -> Self {
        RawBlocks { input }
    }
}

impl<R: Read> Blocks for RawBlocks<R> {
    fn next_block(&mut self) -> Result<Option<Block>> {
        let mut buf = vec![0u8; 1 << 20];
        let got = read_up_to(&mut self.input, &mut buf)?;
        if got == 0 {
            return Ok(None);
        }
        buf.truncate(got);
        Ok(Some(Block::Bytes(buf)))
    }
}

/// A piece of an entry's data: bytes, or a run of zeros that was never materialised.
pub enum Piece<'a> {
    Bytes(&'a [u8]),
    Zeros(u64),
}

impl Piece<'_> {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(bytes) => bytes.len() as u64,
            Piece::Zeros(len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A cursor over the blocks of a stream.
pub(crate) struct Stream<'a> {
    blocks: Box<dyn Blocks + 'a>,
    current: Block,
    pos: usize,
    /// Bytes consumed so far, for error messages.
    pub(crate) offset: u64,
}

impl<'a> Stream<'a> {
    pub(crate) fn new(blocks: Box<dyn Blocks + 'a>) -> Self {
        Stream {
            blocks,
            current: Block::Zeros(0),
            pos: 0,
            offset: 0,
        }
    }

    fn remaining_in_block(&self) -> usize {
        match &self.current {
            Block::Bytes(bytes) => bytes.len() - self.pos,
            Block::Zeros(len) => len - self.pos,
        }
    }

    /// Makes the current block non-empty; false at the end of the stream.
    fn ensure(&mut self) -> Result<bool> {
        while self.remaining_in_block() == 0 {
            match self.blocks.next_block()? {
                Some(block) => {
                    self.current = block;
                    self.pos = 0;
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    pub(crate) fn at_end(&mut self) -> Result<bool> {
        Ok(!self.ensure()?)
    }

    pub(crate) fn read_exact(&mut self, mut buf: &mut [u8], what: &str) -> Result<()> {
        while !buf.is_empty() {
            if !self.ensure()? {
                return Err(Error::Truncated(format!("{what} is cut off")));
            }
            let n = self.remaining_in_block().min(buf.len());
            match &self.current {
                Block::Bytes(bytes) => buf[..n].copy_from_slice(&bytes[self.pos..self.pos + n]),
                Block::Zeros(_) => buf[..n].fill(0),
            }
            self.pos += n;
            self.offset += n as u64;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// Up to `max` (> 0) bytes of the stream, as they are stored in the current block.
    pub(crate) fn next_piece(&mut self, max: u64, what: &str) -> Result<Piece<'_>> {
        if !self.ensure()? {
            return Err(Error::Truncated(format!("{what} is cut off")));
        }
        let n = (self.remaining_in_block() as u64).min(max) as usize;
        let start = self.pos;
        self.pos += n;
        self.offset += n as u64;
        Ok(match &self.current {
            Block::Bytes(bytes) => Piece::Bytes(&bytes[start..start + n]),
            Block::Zeros(_) => Piece::Zeros(n as u64),
        })
    }
}
