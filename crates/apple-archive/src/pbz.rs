//! Apple's `pbze` container: an Apple Archive byte stream cut into blocks, each compressed on
//! its own with LZFSE, so both sides can work on several blocks at once.
//!
//! | bytes | field                                                                 |
//! |-------|-----------------------------------------------------------------------|
//! | 4     | magic `pbze` (`pbz` + the algorithm's letter: `e` is LZFSE)            |
//! | 8     | big-endian block size: the uncompressed size of every block but the last |
//! | then, per block: 8 + 8 + payload | big-endian uncompressed size, big-endian payload size, payload |
//!
//! A payload as long as its uncompressed size is stored as is; any other is an LZFSE stream.
//! We write incompressible blocks as LZFSE streams of one stored (`bvx-`) block instead, which
//! every LZFSE decoder reads, so our files never depend on how a reader treats the equal sizes.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use lzfse_rust::{LzfseEncoder, LzfseRingDecoder};

use crate::{Error, Result};

pub const MAGIC: &[u8; 4] = b"pbze";
/// Block size of the archives we write: 4 MiB, Apple's own default.
pub const DEFAULT_BLOCK_SIZE: usize = 4 << 20;
/// Larger declared block sizes are refused before anything is allocated for them.
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;
/// Decoded and encoded blocks in flight together stay under this, whatever the block size.
const PIPELINE_BYTES: u64 = 128 << 20;

const LZFSE_STORED: &[u8; 4] = b"bvx-";
const LZFSE_END: &[u8; 4] = b"bvx$";
const LZFSE_STORED_OVERHEAD: usize = 12;

/// One block of the uncompressed stream. All-zero blocks (the holes of sparse disks) are passed
/// around by length, so neither side spends memory bandwidth on them.
pub(crate) enum Block {
    Bytes(Vec<u8>),
    Zeros(usize),
}

/// Threads that each own a codec state, fed through one queue. Started by the first job, so
/// small archives (and all-zero ones) never pay for threads.
struct Pool<S> {
    jobs: Option<SyncSender<Job<S>>>,
    threads: Vec<JoinHandle<()>>,
}

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

impl<S: Default + 'static> Pool<S> {
    fn new() -> Self {
        Pool {
            jobs: None,
            threads: Vec::new(),
        }
    }

    fn start(&mut self) {
        let threads = workers();
        let (jobs, queue) = mpsc::sync_channel::<Job<S>>(threads);
        let queue = Arc::new(Mutex::new(queue));
        self.threads = (0..threads)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || {
                    let mut state = S::default();
                    loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut state),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        self.jobs = Some(jobs);
    }

    /// Runs `work` on a pool thread; its result arrives on the returned receiver.
    fn submit<T: Send + 'static>(&mut self, work: impl FnOnce(&mut S) -> T + Send + 'static) -> Receiver<T> {
        if self.jobs.is_none() {
            self.start();
        }
        let (result, receiver) = mpsc::sync_channel(1);
        let job: Job<S> = Box::new(move |state| {
            let _ = result.send(work(state));
        });
        if let Some(jobs) = &self.jobs {
            // A send only fails once every worker is gone; the receiver then reports it.
            let _ = jobs.send(job);
        }
        receiver
    }
}

impl<S> Drop for Pool<S> {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

enum Pending<T> {
    Ready(T),
    Working(Receiver<T>),
}

impl<T> Pending<T> {
    fn wait(self) -> Option<T> {
        match self {
            Pending::Ready(value) => Some(value),
            Pending::Working(receiver) => receiver.recv().ok(),
        }
    }
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(8)
}

fn pipeline_depth(block_size: u64, threads: usize) -> usize {
    // Each block in flight holds its payload and its decoded bytes.
    let by_memory = (PIPELINE_BYTES / (2 * block_size.max(1))).max(1) as usize;
    (2 * threads).min(by_memory).max(1)
}

/// The LZFSE stream of `len` zero bytes as our encoder writes it, to recognise and reuse.
fn zero_payload(len: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    LzfseEncoder::default()
        .encode_bytes(&vec![0; len], &mut payload)
        .expect("encoding into a Vec cannot fail");
    payload
}

/// Whether `data` is all zero bytes, a word at a time.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words
        .by_ref()
        .all(|word| u128::from_ne_bytes(word.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// LZFSE-encodes one block. Incompressible data is stored after a cheap probe, because the
/// encoder spends as long on random bytes as on text and gains nothing there. The payload is
/// never exactly as long as the block, which readers take for a block stored without LZFSE.
pub(crate) fn encode_block(encoder: &mut LzfseEncoder, raw: &[u8]) -> Vec<u8> {
    if looks_incompressible(encoder, raw) {
        return stored_lzfse(raw);
    }
    let mut payload = Vec::with_capacity(raw.len() / 2);
    encoder
        .encode_bytes(raw, &mut payload)
        .expect("encoding into a Vec cannot fail");
    if payload.len() >= raw.len() {
        return stored_lzfse(raw);
    }
    payload
}

fn looks_incompressible(encoder: &mut LzfseEncoder, raw: &[u8]) -> bool {
    const PROBE: usize = 32 << 10;
    if raw.len() < 8 * PROBE {
        return false;
    }
    let mut scratch = Vec::with_capacity(PROBE + 64);
    [0, raw.len() / 2 - PROBE / 2, raw.len() - PROBE].iter().all(|&start| {
        scratch.clear();
        encoder
            .encode_bytes(&raw[start..start + PROBE], &mut scratch)
            .expect("encoding into a Vec cannot fail");
        scratch.len() * 100 > PROBE * 97
    })
}

fn stored_lzfse(raw: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(raw.len() + LZFSE_STORED_OVERHEAD);
    payload.extend_from_slice(LZFSE_STORED);
    payload.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    payload.extend_from_slice(raw);
    payload.extend_from_slice(LZFSE_END);
    payload
}

/// Decodes one payload that must expand to exactly `raw_size` bytes; decoding stops one byte
/// past that, so a payload that claims more (a bomb) costs no more than an honest one.
fn decode_block(decoder: &mut LzfseRingDecoder, payload: &[u8], raw_size: usize) -> Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(raw_size);
    decoder
        .reader_bytes(payload)
        .take(raw_size as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|err| Error::Corrupt(format!("an LZFSE block does not decode: {err}")))?;
    if raw.len() != raw_size {
        return Err(Error::Corrupt(format!(
            "an LZFSE block decodes to {} bytes where its header says {raw_size}",
            if raw.len() > raw_size {
                "more".to_owned()
            } else {
                raw.len().to_string()
            }
        )));
    }
    Ok(raw)
}

/// Writes a `pbze` stream, compressing blocks on all cores while the caller produces the next.
pub struct PbzeWriter<W: Write> {
    output: W,
    block_size: usize,
    current: Vec<u8>,
    pool: Pool<LzfseEncoder>,
    depth: usize,
    pending: VecDeque<Pending<(usize, Vec<u8>)>>,
    zero_payload: OnceCell<Vec<u8>>,
}

impl<W: Write> PbzeWriter<W> {
    pub fn new(output: W) -> io::Result<Self> {
        Self::with_block_size(output, DEFAULT_BLOCK_SIZE)
    }

    pub fn with_block_size(mut output: W, block_size: usize) -> io::Result<Self> {
        assert!(block_size > 0 && block_size as u64 <= MAX_BLOCK_SIZE);
        output.write_all(MAGIC)?;
        output.write_all(&(block_size as u64).to_be_bytes())?;
        Ok(PbzeWriter {
            output,
            block_size,
            current: Vec::with_capacity(block_size),
            pool: Pool::new(),
            depth: pipeline_depth(block_size as u64, workers()),
            pending: VecDeque::new(),
            zero_payload: OnceCell::new(),
        })
    }

    fn zero_block(&self) -> Vec<u8> {
        self.zero_payload.get_or_init(|| zero_payload(self.block_size)).clone()
    }

    fn submit_current(&mut self) -> io::Result<()> {
        let raw = std::mem::replace(&mut self.current, Vec::with_capacity(self.block_size));
        let pending = if raw.len() == self.block_size && is_zero(&raw) {
            Pending::Ready((raw.len(), self.zero_block()))
        } else {
            Pending::Working(
                self.pool
                    .submit(move |encoder| (raw.len(), encode_block(encoder, &raw))),
            )
        };
        self.push(pending)
    }

    fn push(&mut self, pending: Pending<(usize, Vec<u8>)>) -> io::Result<()> {
        self.pending.push_back(pending);
        while self.pending.len() >= self.depth {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(pending) = self.pending.pop_front() else {
            return Ok(());
        };
        let (raw_len, payload) = pending
            .wait()
            .ok_or_else(|| io::Error::other("an LZFSE compression thread died"))?;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&(raw_len as u64).to_be_bytes());
        header[8..].copy_from_slice(&(payload.len() as u64).to_be_bytes());
        self.output.write_all(&header)?;
        self.output.write_all(&payload)?;
        Ok(())
    }

    /// Flushes the last block and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.current.is_empty() {
            self.submit_current()?;
        }
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.output.flush()?;
        let PbzeWriter { output, .. } = self;
        Ok(output)
    }
}

impl<W: Write> crate::Sink for PbzeWriter<W> {
    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = self.block_size - self.current.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.current.extend_from_slice(now);
            data = rest;
            if self.current.len() == self.block_size {
                self.submit_current()?;
            }
        }
        Ok(())
    }

    fn write_zeros(&mut self, mut len: u64) -> io::Result<()> {
        while len > 0 {
            if self.current.is_empty() && len >= self.block_size as u64 {
                self.push(Pending::Ready((self.block_size, self.zero_block())))?;
                len -= self.block_size as u64;
                continue;
            }
            let room = (self.block_size - self.current.len()) as u64;
            let now = room.min(len) as usize;
            self.current.resize(self.current.len() + now, 0);
            len -= now as u64;
            if self.current.len() == self.block_size {
                self.submit_current()?;
            }
        }
        Ok(())
    }
}

/// Reads a `pbze` stream (its magic already consumed), decoding blocks on all cores ahead of
/// the caller.
pub(crate) struct PbzeBlocks<R: Read> {
    input: R,
    block_size: u64,
    pool: Pool<LzfseRingDecoder>,
    depth: usize,
    pending: VecDeque<Pending<Result<Block>>>,
    input_done: bool,
    zero_payload: OnceCell<Vec<u8>>,
}

impl<R: Read> PbzeBlocks<R> {
    pub(crate) fn new(mut input: R) -> Result<Self> {
        let mut size = [0u8; 8];
        read_exact_or_truncated(&mut input, &mut size, "the block size is cut off")?;
        let block_size = u64::from_be_bytes(size);
        if block_size == 0 || block_size > MAX_BLOCK_SIZE {
            return Err(Error::Corrupt(format!(
                "the archive declares blocks of {block_size} bytes (at most {MAX_BLOCK_SIZE} are accepted)"
            )));
        }
        Ok(PbzeBlocks {
            input,
            block_size,
            pool: Pool::new(),
            depth: pipeline_depth(block_size, workers()),
            pending: VecDeque::new(),
            input_done: false,
            zero_payload: OnceCell::new(),
        })
    }

    /// Reads the next block's header and payload and queues its decoding.
    fn read_ahead(&mut self) -> Result<()> {
        let mut header = [0u8; 16];
        let got = read_up_to(&mut self.input, &mut header)?;
        if got == 0 {
            self.input_done = true;
            return Ok(());
        }
        if got < header.len() {
            return Err(Error::Truncated("a block header is cut off".into()));
        }
        let raw_size = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let payload_size = u64::from_be_bytes(header[8..].try_into().expect("8 bytes"));
        if raw_size == 0 || raw_size > self.block_size {
            return Err(Error::Corrupt(format!(
                "a block declares {raw_size} bytes in an archive of {}-byte blocks",
                self.block_size
            )));
        }
        // An LZFSE stream can be a little larger than its input, never much larger.
        if payload_size == 0 || payload_size > raw_size + 4096 {
            return Err(Error::Corrupt(format!(
                "a block of {raw_size} bytes declares a payload of {payload_size} bytes"
            )));
        }
        let mut payload = vec![0u8; payload_size as usize];
        read_exact_or_truncated(&mut self.input, &mut payload, "a block's payload is cut off")?;
        let raw_size = raw_size as usize;
        let pending = if payload_size as usize == raw_size {
            Pending::Ready(Ok(Block::Bytes(payload)))
        } else if raw_size as u64 == self.block_size
            && payload == *self.zero_payload.get_or_init(|| zero_payload(raw_size))
        {
            Pending::Ready(Ok(Block::Zeros(raw_size)))
        } else {
            Pending::Working(
                self.pool
                    .submit(move |decoder| decode_block(decoder, &payload, raw_size).map(Block::Bytes)),
            )
        };
        self.pending.push_back(pending);
        Ok(())
    }
}

impl<R: Read> crate::stream::Blocks for PbzeBlocks<R> {
    fn next_block(&mut self) -> Result<Option<Block>> {
        while !self.input_done && self.pending.len() < self.depth {
            self.read_ahead()?;
        }
        match self.pending.pop_front() {
            None => Ok(None),
            Some(pending) => pending
                .wait()
                .unwrap_or_else(|| Err(Error::Io(io::Error::other("an LZFSE decompression thread died"))))
                .map(Some),
        }
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
pub(crate) fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Error::Io(err)),
        }
    }
    Ok(filled)
}

pub(crate) fn read_exact_or_truncated(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    if read_up_to(input, buf)? < buf.len() {
        return Err(Error::Truncated(what.into()));
    }
    Ok(())
}
