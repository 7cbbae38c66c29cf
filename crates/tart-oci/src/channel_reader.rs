//! The byte pieces a download hands over, as a blocking reader: for decoders that pull their
//! input (lz4_flex's frame decoder, tar readers) rather than being fed it.

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

/// Reads the pieces sent to a channel, in order; end of input when every sender is gone. For
/// blocking threads only.
pub(crate) struct ChannelReader {
    receiver: mpsc::Receiver<Bytes>,
    piece: Bytes,
}

impl ChannelReader {
    pub(crate) fn new(receiver: mpsc::Receiver<Bytes>) -> Self {
        ChannelReader {
            receiver,
            piece: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            match self.receiver.blocking_recv() {
                Some(piece) => self.piece = piece,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece[..n]);
        self.piece.advance(n);
        Ok(n)
    }
}
