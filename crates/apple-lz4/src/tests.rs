use std::io::{self, Read, Write};

use proptest::prelude::*;

use crate::*;

fn stored(data: &[u8]) -> Vec<u8> {
    let mut block = MAGIC_STORED.to_vec();
    block.extend_from_slice(&(data.len() as u32).to_le_bytes());
    block.extend_from_slice(data);
    block
}

fn compressed(decoded: u32, payload: &[u8]) -> Vec<u8> {
    let mut block = MAGIC_COMPRESSED.to_vec();
    block.extend_from_slice(&decoded.to_le_bytes());
    block.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    block.extend_from_slice(payload);
    block
}

/// An LZ4 block of one sequence (< 15 literals, then a match of 4..=18 bytes) and 5 final
/// literals, the shortest tail the block format allows.
fn lz4_block(literals: &[u8], offset: u16, match_len: usize) -> Vec<u8> {
    assert!(literals.len() < 15 && (4..=18).contains(&match_len));
    let mut block = vec![(literals.len() as u8) << 4 | (match_len - 4) as u8];
    block.extend_from_slice(literals);
    block.extend_from_slice(&offset.to_le_bytes());
    block.push(5 << 4);
    block.extend_from_slice(b"tail!");
    block
}

fn stream(blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = blocks.concat();
    stream.extend_from_slice(&MAGIC_END);
    stream
}

/// Deterministic incompressible bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// (magic, decoded size) of each block of a stream known to be well formed.
fn layout(stream: &[u8]) -> Vec<([u8; 4], u32)> {
    let mut blocks = Vec::new();
    let mut rest = stream;
    loop {
        let magic: [u8; 4] = rest[..4].try_into().unwrap();
        let field = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().unwrap());
        let (decoded, len) = match magic {
            MAGIC_COMPRESSED => (field(4), 12 + field(8) as usize),
            MAGIC_STORED => (field(4), 8 + field(4) as usize),
            _ => {
                assert_eq!(rest, MAGIC_END);
                return blocks;
            }
        };
        blocks.push((magic, decoded));
        rest = &rest[len..];
    }
}

fn read_all(reader: impl Read) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    Decoder::new(reader).read_to_end(&mut out)?;
    Ok(out)
}

/// The `Error` inside an `io::Error` produced by [`Decoder`].
fn inner_error(err: io::Error) -> Error {
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    *err.into_inner().unwrap().downcast::<Error>().unwrap()
}

/// A reader handing out at most one byte per call, so that every header and payload straddles
/// reads.
struct Trickle<'a>(&'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.len().min(buf.len()).min(1);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn empty_stream() {
    assert_eq!(compress(b""), b"bv4$");
    assert_eq!(decompress(b"bv4$").unwrap(), b"");
}

#[test]
fn encoder_layout_follows_apple() {
    let mut data = vec![0; 2 * BLOCK_SIZE];
    data.extend(noise(BLOCK_SIZE + 1000, 1));
    let stream = compress(&data);
    assert_eq!(
        layout(&stream),
        [
            (MAGIC_COMPRESSED, BLOCK_SIZE as u32),
            (MAGIC_COMPRESSED, BLOCK_SIZE as u32),
            (MAGIC_STORED, BLOCK_SIZE as u32),
            (MAGIC_STORED, 1000),
        ]
    );
    assert_eq!(decompress(&stream).unwrap(), data);
}

#[test]
fn encoder_output_does_not_depend_on_write_sizes() {
    let data = [b"abcdefgh".repeat(20_000), noise(70_000, 2)].concat();
    let whole = compress(&data);
    for chunk in [1, 7, 65_535, 65_536, 100_000] {
        let mut encoder = Encoder::new(Vec::new());
        for piece in data.chunks(chunk) {
            encoder.write_all(piece).unwrap();
        }
        encoder.flush().unwrap();
        assert!(encoder.finish().unwrap() == whole, "chunk size {chunk}");
    }
}

#[test]
fn linked_blocks_shrink_repeated_data() {
    // Noise repeating every 40,000 bytes: the second block is long matches into the first.
    let stream = compress(&noise(40_000, 3).repeat(3));
    assert_eq!(
        layout(&stream),
        [
            (MAGIC_COMPRESSED, BLOCK_SIZE as u32),
            (MAGIC_COMPRESSED, 120_000 - BLOCK_SIZE as u32)
        ]
    );
    assert!(stream.len() < 40_000 + 1000);
}

#[test]
fn unknown_magic() {
    assert!(matches!(decompress(b"bv42xxxx"), Err(Error::BadMagic(m)) if &m == b"bv42"));
    assert!(matches!(decompress(b"bvx$"), Err(Error::BadMagic(_))));
}

#[test]
fn truncation_is_reported_at_every_length() {
    let blocks = [stored(b"stored"), compressed(13, &lz4_block(b"abc", 3, 5)), stored(b"")];
    let whole = stream(&blocks);
    let mut boundaries = vec![0];
    for block in &blocks {
        boundaries.push(boundaries.last().unwrap() + block.len());
    }
    for len in 0..whole.len() {
        let expect_missing_marker = boundaries.contains(&len);
        let check = |err: Error| match err {
            Error::MissingEndMarker => assert!(expect_missing_marker, "length {len}"),
            Error::Truncated => assert!(!expect_missing_marker, "length {len}"),
            err => panic!("length {len}: {err}"),
        };
        check(decompress(&whole[..len]).unwrap_err());
        check(inner_error(read_all(&whole[..len]).unwrap_err()));
    }
    assert_eq!(
        decompress(&whole).unwrap(),
        b"stored"
            .iter()
            .chain(b"abcabcab")
            .chain(b"tail!")
            .copied()
            .collect::<Vec<_>>()
    );
}

#[test]
fn data_after_end_marker_is_rejected() {
    let mut with_trailer = compress(b"payload");
    with_trailer.push(0);
    assert!(matches!(decompress(&with_trailer), Err(Error::TrailingData)));
    assert!(matches!(
        inner_error(read_all(with_trailer.as_slice()).unwrap_err()),
        Error::TrailingData
    ));
    // Also when the trailer only arrives in a later read.
    assert!(matches!(
        inner_error(read_all(Trickle(&with_trailer)).unwrap_err()),
        Error::TrailingData
    ));

    let mut decoder = PushDecoder::new();
    decoder.feed(b"bv4$", &mut io::sink()).unwrap();
    assert!(decoder.is_finished());
    decoder.finish().unwrap();
    assert!(matches!(
        decoder.feed(b"bv4$", &mut io::sink()),
        Err(Error::TrailingData)
    ));
}

#[test]
fn declared_decoded_size_must_match() {
    let payload = lz4_block(b"abc", 3, 5);
    assert_eq!(decompress(&stream(&[compressed(13, &payload)])).unwrap().len(), 13);
    for wrong in [0, 12, 14, 1000] {
        assert!(matches!(
            decompress(&stream(&[compressed(wrong, &payload)])),
            Err(Error::DecodedSizeMismatch { declared }) if declared == wrong
        ));
    }
}

#[test]
fn oversized_blocks_are_rejected_before_their_payload() {
    let too_large = MAX_BLOCK_SIZE as u32 + 1;
    let mut header = MAGIC_COMPRESSED.to_vec();
    header.extend_from_slice(&too_large.to_le_bytes());
    header.extend_from_slice(&100u32.to_le_bytes());
    let mut decoder = PushDecoder::new();
    assert!(matches!(
        decoder.feed(&header, &mut io::sink()),
        Err(Error::BlockTooLarge { size }) if size == too_large
    ));

    let mut header = MAGIC_STORED.to_vec();
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        PushDecoder::new().feed(&header, &mut io::sink()),
        Err(Error::BlockTooLarge { .. })
    ));

    let mut header = MAGIC_COMPRESSED.to_vec();
    header.extend_from_slice(&1000u32.to_le_bytes());
    header.extend_from_slice(&2000u32.to_le_bytes());
    assert!(matches!(
        PushDecoder::new().feed(&header, &mut io::sink()),
        Err(Error::EncodedSizeTooLarge {
            decoded: 1000,
            encoded: 2000
        })
    ));
}

#[test]
fn blocks_up_to_the_limit_are_accepted() {
    let data = noise(MAX_BLOCK_SIZE, 4);
    assert_eq!(decompress(&stream(&[stored(&data)])).unwrap(), data);

    // Large compressed blocks from other encoders, linked to each other.
    let text = b"all work and no play makes jack a dull boy ".repeat(30_000);
    let (first, second) = text.split_at(500_000);
    let blocks = [
        compressed(first.len() as u32, &lz4_flex::block::compress(first)),
        compressed(second.len() as u32, &lz4_flex::block::compress_with_dict(second, first)),
    ];
    assert_eq!(decompress(&stream(&blocks)).unwrap(), text);
}

#[test]
fn corrupt_lz4_payload_is_an_error() {
    // The sequence announces 3 literals but the payload ends after one.
    assert!(matches!(
        decompress(&stream(&[compressed(8, &[0x30, b'a'])])),
        Err(Error::CorruptBlock(_))
    ));
    // Offset 0 is invalid in LZ4.
    assert!(matches!(
        decompress(&stream(&[compressed(13, &lz4_block(b"abc", 0, 5))])),
        Err(Error::CorruptBlock(_))
    ));
}

#[test]
fn matches_reach_into_earlier_blocks_but_no_further() {
    // A match 4 bytes back at output position 3 needs one byte of history.
    let block = compressed(13, &lz4_block(b"abc", 4, 5));
    assert!(matches!(
        decompress(&stream(std::slice::from_ref(&block))),
        Err(Error::OffsetOutOfWindow)
    ));
    assert_eq!(decompress(&stream(&[stored(b"x"), block])).unwrap(), b"xabcxabcxtail!");
}

#[test]
fn history_spans_blocks_of_every_size() {
    // Output of mixed-size blocks, then matches at the far end of the 64 KiB window, which lands
    // in different earlier blocks depending on their sizes.
    for sizes in [
        &[1000; 70][..],
        &[0, 65_535, 0, 1],
        &[100_000, 10],
        &[40_000, 40_000],
        &[65_536],
        &[65_535],
    ] {
        let mut blocks = Vec::new();
        let mut expected = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let data = noise(size, i as u64 + 10);
            blocks.push(stored(&data));
            expected.extend(data);
        }
        let start = expected.len() - 65_535;
        expected.extend_from_within(start..start + 18);
        expected.extend_from_slice(b"tail!");
        blocks.push(compressed(23, &lz4_block(b"", 65_535, 18)));
        let whole = stream(&blocks);
        assert_eq!(decompress(&whole).unwrap(), expected, "sizes {sizes:?}");
        assert_eq!(read_all(Trickle(&whole)).unwrap(), expected, "sizes {sizes:?}");
    }
}

#[test]
fn stream_errors_convert_to_invalid_data() {
    let err = io::Error::from(Error::MissingEndMarker);
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let err = io::Error::from(Error::Io(io::Error::from(io::ErrorKind::BrokenPipe)));
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

/// Disk-like data: runs of zeros, noise, and short repeated patterns, each below `max_run`.
fn disk_like(max_run: usize) -> impl Strategy<Value = Vec<u8>> {
    let segment = prop_oneof![
        (0..max_run).prop_map(|len| vec![0; len]),
        (0..max_run, any::<u64>()).prop_map(|(len, seed)| noise(len, seed | 1)),
        (prop::collection::vec(any::<u8>(), 1..300), 0..max_run).prop_map(|(pattern, len)| pattern
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()),
    ];
    prop::collection::vec(segment, 0..6).prop_map(|segments| segments.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn round_trip(data in disk_like(150_000), write_size in 1..200_000usize, feed_size in 1..100_000usize) {
        let mut encoder = Encoder::new(Vec::new());
        for piece in data.chunks(write_size) {
            encoder.write_all(piece).unwrap();
        }
        let stream = encoder.finish().unwrap();

        prop_assert!(decompress(&stream).unwrap() == data);
        prop_assert!(read_all(stream.as_slice()).unwrap() == data);
        let mut decoder = PushDecoder::new();
        let mut out = Vec::new();
        for piece in stream.chunks(feed_size) {
            decoder.feed(piece, &mut out).unwrap();
        }
        decoder.finish().unwrap();
        prop_assert!(out == data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any bytes behind a valid magic and plausible sizes: an error or output, never a panic.
    #[test]
    fn arbitrary_blocks_never_panic(
        magic in prop::sample::select(vec![MAGIC_COMPRESSED, MAGIC_STORED, MAGIC_END]),
        decoded in prop_oneof![0..300u32, any::<u32>()],
        rest in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut input = magic.to_vec();
        input.extend_from_slice(&decoded.to_le_bytes());
        input.extend_from_slice(&rest);
        let _ = decompress(&input);
        let _ = read_all(input.as_slice());
    }

    /// Valid streams with bytes flipped, cut out or repeated.
    #[test]
    fn mutated_streams_never_panic(
        data in disk_like(30_000),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8),
    ) {
        let mut stream = compress(&data);
        for (at, byte, kind) in edits {
            let at = at.index(stream.len());
            match kind {
                0 => stream[at] ^= byte | 1,
                1 => { stream.drain(at..(at + byte as usize).min(stream.len())); }
                _ => {
                    let copy = stream[at..(at + byte as usize).min(stream.len())].to_vec();
                    stream.splice(at..at, copy);
                }
            }
            if stream.is_empty() {
                break;
            }
        }
        let _ = decompress(&stream);
    }
}
