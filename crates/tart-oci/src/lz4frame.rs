//! Decoding vetu's disk layers, each one standard LZ4 frame (not Apple's `bv41` stream), from
//! the pieces a download hands over. lz4_flex's frame decoder pulls from a reader, so the pieces
//! are presented as one.

use std::io::{self, Read, Write};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::channel_reader::ChannelReader;

/// Decodes the LZ4 frame(s) arriving on `receiver` into `out`: the frame's content checksum is
/// checked, and a stream that ends inside a frame or carries anything but frames is an error.
pub(crate) fn decode(receiver: mpsc::Receiver<Bytes>, out: &mut impl Write) -> io::Result<()> {
    let mut decoder = lz4_flex::frame::FrameDecoder::new(ChannelReader::new(receiver));
    // Frames hold blocks of up to 4 MiB; a large buffer keeps the copies few.
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = decoder.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buffer[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as vetu writes one (pierrec/lz4's defaults): independent 4 MiB blocks, content
    /// checksum.
    fn frame(data: &[u8]) -> Vec<u8> {
        use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
        let info = FrameInfo::new()
            .block_size(BlockSize::Max4MB)
            .block_mode(BlockMode::Independent)
            .content_checksum(true);
        let mut encoder = FrameEncoder::with_frame_info(info, Vec::new());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn decode_pieces(stream: &[u8], piece: usize) -> io::Result<Vec<u8>> {
        let (sender, receiver) = mpsc::channel(stream.len() / piece + 2);
        for chunk in stream.chunks(piece) {
            sender.try_send(Bytes::copy_from_slice(chunk)).unwrap();
        }
        drop(sender);
        let mut out = Vec::new();
        decode(receiver, &mut out).map(|()| out)
    }

    #[test]
    fn decodes_a_frame_cut_into_any_pieces() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8 ^ (i >> 13) as u8).collect();
        let stream = frame(&data);
        for piece in [1 << 20, 4096, 7] {
            assert_eq!(decode_pieces(&stream, piece).unwrap(), data);
        }
        assert_eq!(decode_pieces(&frame(b""), 3).unwrap(), b"");
    }

    #[test]
    fn refuses_truncated_and_corrupt_frames() {
        let data = vec![7u8; 100_000];
        let stream = frame(&data);
        assert!(decode_pieces(&stream[..stream.len() - 3], 1000).is_err());
        // An Apple `bv41` stream is not a frame.
        assert!(decode_pieces(&apple_lz4::compress(&data), 1000).is_err());
        let mut flipped = stream.clone();
        let checksum = flipped.len() - 1;
        flipped[checksum] ^= 1;
        assert!(decode_pieces(&flipped, 1000).is_err());
    }
}
