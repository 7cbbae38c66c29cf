use std::io::{self, Read, Write};
use std::mem;

use lz4_flex::block::DecompressError;

use crate::{Error, MAGIC_COMPRESSED, MAGIC_END, MAGIC_STORED, MAX_BLOCK_SIZE, WINDOW_SIZE};

/// Where the decoder is within the stream.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Collecting a block header; the first `have` bytes of `PushDecoder::header` are filled.
    Header { have: usize },
    /// Collecting the LZ4 payload of a `bv41` block.
    Compressed { decoded: u32, encoded: u32 },
    /// Collecting the bytes of a `bv4-` block; `have` of them are already in the block buffer.
    Stored { size: u32, have: usize },
    /// The `bv4$` marker has been read.
    End,
}

/// Incremental decoder fed with arbitrary slices of a stream (push style), for callers that
/// receive it in chunks, e.g. an async HTTP body.
///
/// Memory stays bounded whatever the input: two block buffers of at least 64 KiB, plus the
/// payload of a compressed block that straddles two fed slices, each at most
/// [`MAX_BLOCK_SIZE`](crate::MAX_BLOCK_SIZE) (plus LZ4 overhead). Once a method has returned an
/// error the stream is unusable; further calls give unspecified errors or output, never a panic.
#[derive(Debug)]
pub struct PushDecoder {
    phase: Phase,
    header: [u8; 12],
    /// A compressed payload split across fed slices; empty while payloads arrive whole.
    payload: Vec<u8>,
    /// The most recent output in `history[..history_len]`: at least its last 64 KiB, or all of
    /// it while it is shorter. Matches of the next block may reach into it.
    history: Vec<u8>,
    history_len: usize,
    /// The block being decoded (or just decoded) into `block[..block_len]`. Both buffers only
    /// grow, so steady-state decoding neither allocates nor zero-fills.
    block: Vec<u8>,
    block_len: usize,
    /// `block[..block_len]` is a finished block that has not yet been moved into the history.
    block_ready: bool,
}

impl Default for PushDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl PushDecoder {
    pub fn new() -> Self {
        Self {
            phase: Phase::Header { have: 0 },
            header: [0; 12],
            payload: Vec::new(),
            history: vec![0; WINDOW_SIZE],
            history_len: 0,
            block: vec![0; WINDOW_SIZE],
            block_len: 0,
            block_ready: false,
        }
    }

    /// Decodes all of `input`, writing every block it completes to `out`. A block split across
    /// calls is written by the call that completes it.
    pub fn feed(&mut self, mut input: &[u8], out: &mut impl Write) -> Result<(), Error> {
        while !input.is_empty() {
            let (used, block_done) = self.step(input)?;
            input = &input[used..];
            if block_done {
                out.write_all(self.block())?;
            }
        }
        Ok(())
    }

    /// Checks that the stream fed so far is complete, i.e. ended with its `bv4$` marker.
    pub fn finish(&self) -> Result<(), Error> {
        match self.phase {
            Phase::End => Ok(()),
            _ => Err(self.unfinished_error()),
        }
    }

    /// What is wrong with a stream that stops where this decoder stands.
    fn unfinished_error(&self) -> Error {
        match self.phase {
            Phase::Header { have: 0 } => Error::MissingEndMarker,
            _ => Error::Truncated,
        }
    }

    /// Whether the `bv4$` end marker has been decoded.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::End)
    }

    /// Consumes a prefix of a non-empty `input` (at least one byte) and returns its length and
    /// whether it completed a block, whose output [`Self::block`] then returns until the next
    /// call.
    fn step(&mut self, input: &[u8]) -> Result<(usize, bool), Error> {
        if mem::take(&mut self.block_ready) {
            self.retire_block();
        }
        match self.phase {
            Phase::Header { have } => self.step_header(input, have),
            Phase::Compressed { decoded, encoded } => self.step_compressed(input, decoded, encoded),
            Phase::Stored { size, have } => Ok(self.step_stored(input, size, have)),
            Phase::End => Err(Error::TrailingData),
        }
    }

    /// The output of the block the last `step` completed.
    fn block(&self) -> &[u8] {
        if self.block_ready {
            &self.block[..self.block_len]
        } else {
            &[]
        }
    }

    fn step_header(&mut self, input: &[u8], have: usize) -> Result<(usize, bool), Error> {
        // The magic decides the header length, so gather it before the size fields.
        let need = if have < 4 {
            4
        } else {
            match self.magic() {
                MAGIC_COMPRESSED => 12,
                _ => 8,
            }
        };
        let used = (need - have).min(input.len());
        self.header[have..have + used].copy_from_slice(&input[..used]);
        let have = have + used;
        if have < need {
            self.phase = Phase::Header { have };
            return Ok((used, false));
        }
        if need == 4 {
            match self.magic() {
                MAGIC_END => self.phase = Phase::End,
                MAGIC_COMPRESSED | MAGIC_STORED => self.phase = Phase::Header { have },
                magic => return Err(Error::BadMagic(magic)),
            }
            return Ok((used, false));
        }

        let size = self.header_u32(4);
        if size as usize > MAX_BLOCK_SIZE {
            return Err(Error::BlockTooLarge { size });
        }
        if self.block.len() < size as usize {
            self.block.resize(size as usize, 0);
        }
        self.block_len = size as usize;
        if self.magic() == MAGIC_STORED {
            self.phase = Phase::Stored { size, have: 0 };
            // An empty stored block is complete as soon as its header is.
            return Ok((used, self.complete_if_stored_full(size, 0)));
        }
        let encoded = self.header_u32(8);
        if encoded as usize > lz4_compress_bound(size as usize) {
            return Err(Error::EncodedSizeTooLarge { decoded: size, encoded });
        }
        self.payload.clear();
        self.phase = Phase::Compressed { decoded: size, encoded };
        Ok((used, false))
    }

    fn step_compressed(&mut self, input: &[u8], decoded: u32, encoded: u32) -> Result<(usize, bool), Error> {
        let encoded = encoded as usize;
        // Decode straight from the caller's slice when it holds the whole payload.
        if self.payload.is_empty() && input.len() >= encoded {
            self.decode_block(&input[..encoded], decoded)?;
            return Ok((encoded, true));
        }
        let used = (encoded - self.payload.len()).min(input.len());
        self.payload.extend_from_slice(&input[..used]);
        if self.payload.len() < encoded {
            return Ok((used, false));
        }
        let payload = mem::take(&mut self.payload);
        let result = self.decode_block(&payload, decoded);
        self.payload = payload;
        result.map(|()| (used, true))
    }

    fn step_stored(&mut self, input: &[u8], size: u32, have: usize) -> (usize, bool) {
        let used = (size as usize - have).min(input.len());
        self.block[have..have + used].copy_from_slice(&input[..used]);
        let have = have + used;
        self.phase = Phase::Stored { size, have };
        (used, self.complete_if_stored_full(size, have))
    }

    fn complete_if_stored_full(&mut self, size: u32, have: usize) -> bool {
        let full = have == size as usize;
        if full {
            self.phase = Phase::Header { have: 0 };
            self.block_ready = true;
        }
        full
    }

    fn decode_block(&mut self, payload: &[u8], decoded: u32) -> Result<(), Error> {
        let dict = &self.history[self.history_len.saturating_sub(WINDOW_SIZE)..self.history_len];
        let out = &mut self.block[..decoded as usize];
        let len = lz4_flex::block::decompress_into_with_dict(payload, out, dict).map_err(|err| match err {
            DecompressError::OffsetOutOfBounds => Error::OffsetOutOfWindow,
            DecompressError::OutputTooSmall { .. } => Error::DecodedSizeMismatch { declared: decoded },
            err => Error::CorruptBlock(err.to_string()),
        })?;
        if len != decoded as usize {
            return Err(Error::DecodedSizeMismatch { declared: decoded });
        }
        self.phase = Phase::Header { have: 0 };
        self.block_ready = true;
        Ok(())
    }

    /// Makes the finished block part of the history the next block's matches may reach into.
    fn retire_block(&mut self) {
        let len = self.block_len;
        if len >= WINDOW_SIZE {
            // The block alone covers the window: swap buffers instead of copying.
            mem::swap(&mut self.history, &mut self.block);
            self.history_len = len;
        } else {
            // `history` is at least WINDOW_SIZE long, so the kept tail plus the block fit.
            let keep = self.history_len.min(WINDOW_SIZE - len);
            self.history.copy_within(self.history_len - keep..self.history_len, 0);
            self.history[keep..keep + len].copy_from_slice(&self.block[..len]);
            self.history_len = keep + len;
        }
        self.block_len = 0;
    }

    fn magic(&self) -> [u8; 4] {
        [self.header[0], self.header[1], self.header[2], self.header[3]]
    }

    fn header_u32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.header[at],
            self.header[at + 1],
            self.header[at + 2],
            self.header[at + 3],
        ])
    }
}

/// `LZ4_COMPRESSBOUND`: no valid LZ4 block of `len` decoded bytes is longer.
fn lz4_compress_bound(len: usize) -> usize {
    len + len / 255 + 16
}

/// Size of the input buffer of [`Decoder`]: several blocks, so that most compressed payloads are
/// decoded in place rather than gathered across reads.
const READ_BUFFER_SIZE: usize = 256 * 1024;

/// Pull-style decoder: reads a stream from `R` and yields the decoded bytes.
///
/// The stream must make up all of `R`: reading fails with [`Error::Truncated`] or
/// [`Error::MissingEndMarker`] if `R` ends early, and with [`Error::TrailingData`] if anything
/// follows the end marker. Stream errors surface as [`io::ErrorKind::InvalidData`] wrapping an
/// [`Error`].
#[derive(Debug)]
pub struct Decoder<R> {
    inner: R,
    state: PushDecoder,
    input: Box<[u8]>,
    input_start: usize,
    input_end: usize,
    /// `state.block()[output_pos..output_len]` is decoded output not yet handed out.
    output_pos: usize,
    output_len: usize,
    /// `inner` has been checked to end right after the end marker.
    done: bool,
}

impl<R: Read> Decoder<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            state: PushDecoder::new(),
            input: vec![0; READ_BUFFER_SIZE].into_boxed_slice(),
            input_start: 0,
            input_end: 0,
            output_pos: 0,
            output_len: 0,
            done: false,
        }
    }

    fn fill_input(&mut self) -> io::Result<usize> {
        let n = loop {
            match self.inner.read(&mut self.input) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                result => break result?,
            }
        };
        self.input_start = 0;
        self.input_end = n;
        Ok(n)
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.output_pos < self.output_len {
                let pending = &self.state.block()[self.output_pos..self.output_len];
                let n = pending.len().min(buf.len());
                buf[..n].copy_from_slice(&pending[..n]);
                self.output_pos += n;
                return Ok(n);
            }
            if self.state.is_finished() {
                if !self.done {
                    if self.input_start < self.input_end || self.fill_input()? > 0 {
                        return Err(Error::TrailingData.into());
                    }
                    self.done = true;
                }
                return Ok(0);
            }
            if self.input_start == self.input_end && self.fill_input()? == 0 {
                return Err(self.state.unfinished_error().into());
            }
            let (used, block_done) = self.state.step(&self.input[self.input_start..self.input_end])?;
            self.input_start += used;
            if block_done {
                self.output_pos = 0;
                self.output_len = self.state.block().len();
            }
        }
    }
}
