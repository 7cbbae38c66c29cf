//! A layer's bytes as a tar stream: decompressed by what the media type says (or, for a plain
//! tar type, by what the content turns out to be) and counted against the layer's bound.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// How a tar layer is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar`, `application/vnd.docker.image.rootfs.diff.tar`:
    /// plain tar, unless the content starts with a gzip or zstd magic (some tools label
    /// compressed layers so).
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a tar layer's media type (`application/vnd.oci.image.layer.v1.tar+gzip`,
    /// `application/vnd.docker.image.rootfs.diff.tar.gzip`, ...); which media types are tar
    /// layers is the caller's to know.
    pub fn of_media_type(media_type: &str) -> Compression {
        if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") {
            Compression::Gzip
        } else if media_type.ends_with("+zstd") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// The decompressed bytes of a layer.
pub(crate) fn decompressed<'a>(reader: impl Read + 'a, declared: Compression) -> Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let head = reader.fill_buf().context("failed to read the layer")?;
    let actual = match declared {
        Compression::None if head.starts_with(GZIP_MAGIC) => Compression::Gzip,
        Compression::None if head.starts_with(ZSTD_MAGIC) => Compression::Zstd,
        declared => declared,
    };
    let magic_missing = match actual {
        Compression::Gzip => !head.starts_with(GZIP_MAGIC),
        Compression::Zstd => !head.starts_with(ZSTD_MAGIC),
        Compression::None => false,
    };
    if magic_missing {
        bail!(
            "its media type says {}, but the data is not {0} data (corrupt, or labelled wrongly)",
            actual.name()
        );
    }
    Ok(match actual {
        Compression::None => Box::new(reader),
        // Several members, as pigz and some registries' recompression write, are one stream.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(reader).context("failed to start zstd decompression")?)
        }
    })
}

/// How many decompressed bytes a layer may have. Raised by the stated size of each disk file
/// accepted, so it ends up as the disk files plus a fixed allowance for the rest.
pub(crate) struct Budget {
    limit: Cell<u64>,
    used: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    pub(crate) fn new(allowance: u64) -> Rc<Budget> {
        Rc::new(Budget {
            limit: Cell::new(allowance),
            used: Cell::new(0),
            exceeded: Cell::new(false),
        })
    }

    pub(crate) fn allow(&self, bytes: u64) {
        self.limit.set(self.limit.get().saturating_add(bytes));
    }

    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit.get()
    }
}

/// Passes at most the budget's bytes, then fails: decompression stops at the bound instead of
/// running through whatever a small layer expands to.
pub(crate) struct Bounded<R> {
    pub(crate) inner: R,
    pub(crate) budget: Rc<Budget>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let budget = &self.budget;
        let left = budget.limit.get().saturating_sub(budget.used.get());
        if left == 0 {
            // One byte more, to tell a stream that ends exactly at the bound from one that goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            budget.exceeded.set(true);
            return Err(io::Error::other("the layer decompresses past its bound"));
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..take])?;
        budget.used.set(budget.used.get() + n as u64);
        Ok(n)
    }
}

/// Hashes what passes through: a layer's decompressed bytes, for its `diff_id`.
pub(crate) struct Hashing<R> {
    pub(crate) inner: R,
    hasher: Sha256,
}

impl<R> Hashing<R> {
    pub(crate) fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    pub(crate) fn digest(self) -> String {
        format!("sha256:{:x}", self.hasher.finalize())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
