//! Writing decompressed disk data into a sparse `disk.img` at a layer's offset.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Zero detection granularity, as in Tart: an all-zero piece becomes a hole.
const PIECE: usize = 4 << 20;

/// Receives a layer's decompressed bytes in order, hashes them, and writes them at their place
/// in the disk image. All-zero pieces are punched out instead of written, so the image stays
/// sparse and stale bytes from an earlier attempt or a base image can never survive.
pub struct LayerSink {
    file: Arc<File>,
    position: u64,
    end: Option<u64>,
    buffer: Vec<u8>,
    hasher: Sha256,
}

impl LayerSink {
    /// `limit`: the layer's declared uncompressed size, which the data may not exceed.
    pub fn new(file: Arc<File>, offset: u64, limit: Option<u64>) -> Self {
        LayerSink {
            file,
            position: offset,
            end: limit.map(|limit| offset + limit),
            buffer: Vec::with_capacity(PIECE),
            hasher: Sha256::new(),
        }
    }

    /// Writes what is buffered; returns where the data ended and its digest.
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        self.flush_piece()?;
        Ok((self.position, format!("sha256:{:x}", self.hasher.finalize())))
    }

    fn flush_piece(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if is_zero(&self.buffer) {
            punch_hole(&self.file, self.position, self.buffer.len() as u64)?;
        } else {
            self.file.write_all_at(&self.buffer, self.position)?;
            start_writeback(&self.file, self.position, self.buffer.len() as u64);
        }
        self.position += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }
}

impl Write for LayerSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let written_so_far = self.position + self.buffer.len() as u64;
        if let Some(end) = self.end {
            if written_so_far + data.len() as u64 > end {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the layer decompresses to more bytes than its uncompressed-size annotation declares",
                ));
            }
        }
        self.hasher.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let take = rest.len().min(PIECE - self.buffer.len());
            self.buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buffer.len() == PIECE {
                self.flush_piece()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = unsafe { data.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Starts writing a range to the device without waiting, so the `fdatasync` that must come
/// before a chunk is journaled finds little left to do, instead of flushing a whole chunk at
/// once while the download of the next one waits. Only a hint: errors surface at that sync.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on a descriptor we own; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Deallocates a range (it reads back as zeros). Where the filesystem cannot punch holes, zeros
/// are written instead.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeros = vec![0u8; len.min(PIECE as u64) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_pieces_become_holes_and_overwrite_stale_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = File::create(&path).unwrap();
        file.set_len(3 * PIECE as u64).unwrap();
        file.write_all_at(&vec![0xee; 3 * PIECE], 0).unwrap();
        let file = Arc::new(file);

        let mut sink = LayerSink::new(file.clone(), 0, Some(3 * PIECE as u64));
        let mut data = vec![0u8; 3 * PIECE];
        data[PIECE + 7] = 1;
        sink.write_all(&data).unwrap();
        let (end, digest) = sink.finish().unwrap();
        assert_eq!(end, 3 * PIECE as u64);
        assert_eq!(digest, crate::manifest::sha256_digest(&data));
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 <= 2 * PIECE as u64);
    }

    #[test]
    fn more_data_than_declared_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(File::create(dir.path().join("disk.img")).unwrap());
        let mut sink = LayerSink::new(file, 100, Some(10));
        assert!(sink.write_all(&[1u8; 11]).is_err());
    }
}
