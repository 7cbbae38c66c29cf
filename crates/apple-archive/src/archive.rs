//! Reading and writing sequences of entries: a header, then its blobs' bytes.

use std::io::{self, Read};

use crate::header::{corrupt, Header, Key, LEGACY_MAGIC, MAGIC, PREFIX_LEN};
use crate::pbz::{self, read_up_to, PbzeBlocks};
use crate::stream::{Piece, RawBlocks, Stream};
use crate::{Error, Result};

/// Where an archive's uncompressed bytes go.
pub trait Sink {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Appends `len` zero bytes; containers may encode them without materialising them.
    fn write_zeros(&mut self, len: u64) -> io::Result<()>;
}

impl Sink for Vec<u8> {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }

    fn write_zeros(&mut self, len: u64) -> io::Result<()> {
        self.resize(self.len() + len as usize, 0);
        Ok(())
    }
}

/// Writes entries; checks that each header's blobs get exactly the bytes it announced.
pub struct ArchiveWriter<S: Sink> {
    sink: S,
    blob_bytes_due: u64,
}

impl<S: Sink> ArchiveWriter<S> {
    pub fn new(sink: S) -> Self {
        ArchiveWriter {
            sink,
            blob_bytes_due: 0,
        }
    }

    /// Starts an entry; the bytes of its blobs (all of them, in field order) follow with
    /// [`ArchiveWriter::write_data`] and [`ArchiveWriter::write_zeros`].
    pub fn write_header(&mut self, header: &Header) -> Result<()> {
        self.expect_no_blob_bytes()?;
        self.sink.write_all(&header.encode()?)?;
        self.blob_bytes_due = header.blobs().map(|(_, size)| size).sum();
        Ok(())
    }

    pub fn write_data(&mut self, data: &[u8]) -> Result<()> {
        self.take_blob_bytes(data.len() as u64)?;
        Ok(self.sink.write_all(data)?)
    }

    pub fn write_zeros(&mut self, len: u64) -> Result<()> {
        self.take_blob_bytes(len)?;
        Ok(self.sink.write_zeros(len)?)
    }

    fn take_blob_bytes(&mut self, len: u64) -> Result<()> {
        if len > self.blob_bytes_due {
            return Err(Error::Invalid(format!(
                "{len} bytes written where the entry has {} left (did the file grow while it was archived?)",
                self.blob_bytes_due
            )));
        }
        self.blob_bytes_due -= len;
        Ok(())
    }

    fn expect_no_blob_bytes(&self) -> Result<()> {
        if self.blob_bytes_due > 0 {
            return Err(Error::Invalid(format!(
                "{} bytes of the previous entry were never written (did the file shrink while it was archived?)",
                self.blob_bytes_due
            )));
        }
        Ok(())
    }

    pub fn finish(self) -> Result<S> {
        self.expect_no_blob_bytes()?;
        Ok(self.sink)
    }
}

/// Reads entries from a `pbze`-compressed or an uncompressed archive.
pub struct ArchiveReader<'a> {
    stream: Stream<'a>,
    /// Blobs of the current entry not yet consumed, in stream order.
    blobs: std::collections::VecDeque<(Key, u64)>,
}

impl<'a> ArchiveReader<'a> {
    /// Recognises the container by its magic. Other compressors of Apple's (zlib, LZMA, LZ4,
    /// `pbz` + `z`/`x`/`4`) are refused by name.
    pub fn new<R: Read + 'a>(mut input: R) -> Result<Self> {
        let mut magic = [0u8; 4];
        let got = read_up_to(&mut input, &mut magic)?;
        let stream = match &magic {
            pbz::MAGIC => Stream::new(Box::new(PbzeBlocks::new(input)?)),
            m if m == MAGIC || m == LEGACY_MAGIC => {
                Stream::new(Box::new(RawBlocks::new(io::Cursor::new(magic).chain(input))))
            }
            [b'p', b'b', b'z', algorithm] => {
                let name = match algorithm {
                    b'z' => "zlib".to_owned(),
                    b'x' => "LZMA".to_owned(),
                    b'4' => "LZ4".to_owned(),
                    other => format!("algorithm {:?}", char::from(*other)),
                };
                return Err(Error::NotAnArchive(format!(
                    "it is compressed with {name}; only LZFSE-compressed (as Tart writes) and uncompressed archives are read"
                )));
            }
            _ if got == 0 => return Err(Error::NotAnArchive("the file is empty".into())),
            _ => {
                return Err(Error::NotAnArchive(
                    "it does not start with an Apple Archive magic".into(),
                ))
            }
        };
        Ok(ArchiveReader {
            stream,
            blobs: Default::default(),
        })
    }

    /// The next entry's header, after skipping whatever is left of the current entry's blobs.
    pub fn next_entry(&mut self) -> Result<Option<Header>> {
        while self.next_blob()?.is_some() {
            while self.read_blob(u64::MAX)?.is_some() {}
        }
        if self.stream.at_end()? {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX_LEN];
        self.stream.read_exact(&mut prefix, "an entry header")?;
        if &prefix[..4] != MAGIC && &prefix[..4] != LEGACY_MAGIC {
            return Err(corrupt(format!(
                "no entry header at offset {} of the uncompressed stream",
                self.stream.offset - PREFIX_LEN as u64
            )));
        }
        let size = usize::from(u16::from_le_bytes([prefix[4], prefix[5]]));
        if size < PREFIX_LEN {
            return Err(corrupt(format!("an entry header declares {size} bytes")));
        }
        let mut body = vec![0u8; size - PREFIX_LEN];
        self.stream.read_exact(&mut body, "an entry header")?;
        let header = Header::decode_fields(&body)?;
        self.blobs = header.blobs().collect();
        Ok(Some(header))
    }

    /// Moves to the current entry's next blob with bytes left; its key and size.
    pub fn next_blob(&mut self) -> Result<Option<(Key, u64)>> {
        while let Some(&(key, left)) = self.blobs.front() {
            if left > 0 {
                return Ok(Some((key, left)));
            }
            self.blobs.pop_front();
        }
        Ok(None)
    }

    /// Up to `max` bytes of the current blob (see [`ArchiveReader::next_blob`]); `None` when
    /// it has been read whole.
    pub fn read_blob(&mut self, max: u64) -> Result<Option<Piece<'_>>> {
        let Some((key, left)) = self.blobs.front_mut() else {
            return Ok(None);
        };
        if *left == 0 || max == 0 {
            return Ok(None);
        }
        let want = (*left).min(max);
        let key = *key;
        let piece = self.stream.next_piece(want, &format!("the data of a {key} field"))?;
        if let Some((_, left)) = self.blobs.front_mut() {
            *left -= piece.len();
        }
        Ok(Some(piece))
    }
}
