use std::io::Cursor;

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use crate::pbz::{PbzeBlocks, MAGIC as PBZE};
use crate::stream::Blocks;
use crate::*;

fn file_header(path: &str, size: u64) -> Header {
    Header::new()
        .with(Key::TYP, Value::Uint(u64::from(EntryType::File.letter())))
        .with(Key::PAT, Value::String(path.as_bytes().to_vec()))
        .with(Key::MOD, Value::Uint(0o644))
        .with(
            Key::MTM,
            Value::Time {
                seconds: 1_700_000_000,
                nanos: Some(5),
            },
        )
        .with(Key::DAT, Value::Blob(size))
}

/// Data of an entry: byte runs and zero runs, as a sparse disk would give them.
#[derive(Clone, Debug)]
enum Run {
    Bytes(Vec<u8>),
    Zeros(u64),
}

fn expand(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::new();
    for run in runs {
        match run {
            Run::Bytes(bytes) => out.extend_from_slice(bytes),
            Run::Zeros(len) => out.resize(out.len() + *len as usize, 0),
        }
    }
    out
}

fn write_archive(entries: &[(String, Vec<Run>)], block_size: usize) -> Vec<u8> {
    let mut writer = ArchiveWriter::new(PbzeWriter::with_block_size(Vec::new(), block_size).unwrap());
    for (path, runs) in entries {
        let size = runs
            .iter()
            .map(|run| match run {
                Run::Bytes(bytes) => bytes.len() as u64,
                Run::Zeros(len) => *len,
            })
            .sum();
        writer.write_header(&file_header(path, size)).unwrap();
        for run in runs {
            match run {
                Run::Bytes(bytes) => writer.write_data(bytes).unwrap(),
                Run::Zeros(len) => writer.write_zeros(*len).unwrap(),
            }
        }
    }
    writer.finish().unwrap().finish().unwrap()
}

/// Every entry's header and data, read back.
fn read_archive(bytes: Vec<u8>) -> Result<Vec<(Header, Vec<u8>)>> {
    let mut reader = ArchiveReader::new(Cursor::new(bytes))?;
    let mut entries = Vec::new();
    while let Some(header) = reader.next_entry()? {
        let mut data = Vec::new();
        while reader.next_blob()?.is_some() {
            while let Some(piece) = reader.read_blob(u64::MAX)? {
                match piece {
                    Piece::Bytes(bytes) => data.extend_from_slice(bytes),
                    Piece::Zeros(len) => data.resize(data.len() + len as usize, 0),
                }
            }
        }
        entries.push((header, data));
    }
    Ok(entries)
}

/// The blocks of one of our `pbze` streams: (uncompressed size, payload).
fn split_blocks(archive: &[u8]) -> Vec<(usize, &[u8])> {
    assert_eq!(&archive[..4], PBZE);
    let mut rest = &archive[12..];
    let mut blocks = Vec::new();
    while !rest.is_empty() {
        let raw = u64::from_be_bytes(rest[..8].try_into().unwrap()) as usize;
        let len = u64::from_be_bytes(rest[8..16].try_into().unwrap()) as usize;
        blocks.push((raw, &rest[16..16 + len]));
        rest = &rest[16 + len..];
    }
    blocks
}

fn reference_decode(payload: &[u8], raw_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; raw_size + 1];
    // SAFETY: both buffers are valid for the lengths given; the reference decoder allocates
    // its own scratch space when passed NULL.
    let n = unsafe {
        lzfse_sys::lzfse_decode_buffer(
            out.as_mut_ptr().cast(),
            out.len(),
            payload.as_ptr().cast(),
            payload.len(),
            std::ptr::null_mut(),
        )
    };
    out.truncate(n);
    out
}

fn reference_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; raw.len() + 4096];
    // SAFETY: as above.
    let n = unsafe {
        lzfse_sys::lzfse_encode_buffer(
            out.as_mut_ptr().cast(),
            out.len(),
            raw.as_ptr().cast(),
            raw.len(),
            std::ptr::null_mut(),
        )
    };
    assert!(n > 0);
    out.truncate(n);
    out
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn text(len: usize) -> Vec<u8> {
    b"config.json disk.img nvram.bin "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

#[test]
fn apple_made_archive_decodes_to_its_published_contents() {
    let archive = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sparkle-test-app.aar")).unwrap();
    let manifest = include_str!("../tests/data/sparkle-test-app.manifest.tsv");
    let expected: Vec<Vec<&str>> = manifest
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split('\t').collect())
        .collect();
    let entries = read_archive(archive).unwrap();
    assert_eq!(entries.len(), expected.len());
    assert_eq!(expected.len(), 227);
    for ((header, data), want) in entries.iter().zip(&expected) {
        let path = String::from_utf8(header.string(Key::PAT).unwrap().to_vec()).unwrap();
        assert_eq!(path, want[0]);
        let kind = header.entry_type().unwrap().letter();
        assert_eq!(char::from(kind).to_string(), want[1], "{path}");
        assert_eq!(format!("{:o}", header.uint(Key::MOD).unwrap()), want[2], "{path}");
        assert_eq!(header.uint(Key::UID).unwrap().to_string(), want[3]);
        assert_eq!(header.uint(Key::GID).unwrap().to_string(), want[4]);
        match header.get(Key::MTM) {
            Some(Value::Time { seconds, .. }) => assert_eq!(seconds.to_string(), want[6], "{path}"),
            other => panic!("{path}: MTM {other:?}"),
        }
        if want[1] == "F" {
            assert_eq!(header.uint(Key::DAT).map(|_| ()), None, "DAT is a blob, not a uint");
            let dat = header.blobs().find(|(key, _)| *key == Key::DAT).unwrap().1;
            assert_eq!(dat.to_string(), want[7], "{path}");
            // The first entry also has an XAT blob: only DAT bytes count for the digest.
            let data = if header.blobs().count() > 1 {
                &data[..dat as usize]
            } else {
                &data[..]
            };
            assert_eq!(format!("{:x}", Sha256::digest(data)), want[8], "{path}");
        }
        if want[1] == "L" {
            assert_eq!(header.string(Key::LNK).unwrap(), want[9].as_bytes(), "{path}");
        }
    }
}

#[test]
fn apple_made_block_is_decoded_by_both_codecs_alike() {
    let archive = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sparkle-test-app.aar")).unwrap();
    let (raw_size, payload) = split_blocks(&archive)[0];
    let reference = reference_decode(payload, raw_size);
    assert_eq!(
        format!("{:x}", Sha256::digest(&reference)),
        "dcc81dfa9803a5fe2a1036f8568fada61fca6979851e1d754efb7a413c254e77"
    );
    let mut blocks = PbzeBlocks::new(Cursor::new(archive[4..].to_vec())).unwrap();
    match blocks.next_block().unwrap() {
        Some(pbz::Block::Bytes(ours)) => assert!(ours == reference),
        _ => panic!("expected one block of bytes"),
    }
}

#[test]
fn our_blocks_decode_with_the_reference_lzfse() {
    // Compressible, incompressible, all-zero and short blocks all take different paths.
    let data = [text(3 << 20), pseudo_random(6 << 20, 7), vec![0; 4 << 20], text(1000)].concat();
    let archive = write_archive(
        &[("disk.img".into(), vec![Run::Bytes(data.clone())])],
        DEFAULT_BLOCK_SIZE,
    );
    let mut stream = Vec::new();
    let blocks = split_blocks(&archive);
    assert!(
        blocks.iter().any(|(_, payload)| payload.starts_with(b"bvx-")),
        "a stored block"
    );
    assert!(
        blocks.iter().any(|(_, payload)| payload.starts_with(b"bvx2")),
        "a compressed block"
    );
    for (raw_size, payload) in blocks {
        assert!(payload.starts_with(b"bvx"), "every payload is an LZFSE stream");
        stream.extend(reference_decode(payload, raw_size));
    }
    let header = file_header("disk.img", data.len() as u64).encode().unwrap();
    assert_eq!(&stream[..header.len()], &header[..]);
    assert!(stream[header.len()..] == data[..]);
}

#[test]
fn reference_encoded_blocks_decode() {
    let data = [text(5 << 20), pseudo_random(1 << 20, 3)].concat();
    let stream = [
        file_header("disk.img", data.len() as u64).encode().unwrap(),
        data.clone(),
    ]
    .concat();
    let mut archive = PBZE.to_vec();
    archive.extend_from_slice(&(1u64 << 20).to_be_bytes());
    for raw in stream.chunks(1 << 20) {
        let payload = reference_encode(raw);
        archive.extend_from_slice(&(raw.len() as u64).to_be_bytes());
        archive.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        archive.extend_from_slice(&payload);
    }
    let entries = read_archive(archive).unwrap();
    assert_eq!(entries.len(), 1);
    assert!(entries[0].1 == data);
}

#[test]
fn stored_blocks_are_read_as_is() {
    let stream = [file_header("a", 5).encode().unwrap(), b"hello".to_vec()].concat();
    let mut archive = PBZE.to_vec();
    archive.extend_from_slice(&(1u64 << 20).to_be_bytes());
    archive.extend_from_slice(&(stream.len() as u64).to_be_bytes());
    archive.extend_from_slice(&(stream.len() as u64).to_be_bytes());
    archive.extend_from_slice(&stream);
    assert_eq!(read_archive(archive).unwrap()[0].1, b"hello");
}

#[test]
fn uncompressed_archives_are_read() {
    let mut writer = ArchiveWriter::new(Vec::new());
    writer.write_header(&file_header("x", 3)).unwrap();
    writer.write_data(b"abc").unwrap();
    let entries = read_archive(writer.finish().unwrap()).unwrap();
    assert_eq!(entries[0].1, b"abc");
}

#[test]
fn zero_runs_cost_nothing_and_come_back_as_zeros() {
    const LEN: u64 = 64 << 30;
    let started = std::time::Instant::now();
    let mut writer = ArchiveWriter::new(PbzeWriter::new(Vec::new()).unwrap());
    writer.write_header(&file_header("disk.img", LEN + 3)).unwrap();
    writer.write_data(b"MBR").unwrap();
    writer.write_zeros(LEN).unwrap();
    let archive = writer.finish().unwrap().finish().unwrap();
    assert!(archive.len() < 64 << 20, "{} bytes for 64 GiB of zeros", archive.len());

    let mut reader = ArchiveReader::new(Cursor::new(archive)).unwrap();
    reader.next_entry().unwrap().unwrap();
    reader.next_blob().unwrap().unwrap();
    let (mut zeros, mut bytes) = (0, Vec::new());
    while let Some(piece) = reader.read_blob(u64::MAX).unwrap() {
        match piece {
            Piece::Zeros(len) => zeros += len,
            Piece::Bytes(data) => bytes.extend_from_slice(data),
        }
    }
    assert!(bytes.len() < 2 * DEFAULT_BLOCK_SIZE && bytes[..3] == *b"MBR" && bytes[3..].iter().all(|&b| b == 0));
    assert_eq!(zeros + bytes.len() as u64, LEN + 3);
    // 16384 blocks: far too many to have been compressed or decompressed in this time.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn writer_refuses_data_that_does_not_match_the_header() {
    let mut writer = ArchiveWriter::new(Vec::new());
    writer.write_header(&file_header("x", 3)).unwrap();
    assert!(matches!(writer.write_data(b"abcd"), Err(Error::Invalid(_))));
    let mut writer = ArchiveWriter::new(Vec::new());
    writer.write_header(&file_header("x", 3)).unwrap();
    writer.write_data(b"ab").unwrap();
    assert!(matches!(writer.finish(), Err(Error::Invalid(_))));
}

fn small_archive() -> Vec<u8> {
    write_archive(
        &[
            ("config.json".into(), vec![Run::Bytes(text(3000))]),
            (
                "disk.img".into(),
                vec![Run::Bytes(pseudo_random(5000, 1)), Run::Zeros(9000)],
            ),
        ],
        4096,
    )
}

#[test]
fn every_truncation_is_an_error() {
    let archive = small_archive();
    let complete = read_archive(archive.clone()).unwrap();
    assert_eq!(complete.len(), 2);
    for len in 0..archive.len() {
        let result = read_archive(archive[..len].to_vec());
        // A cut exactly between two blocks leaves a shorter but well-formed stream only if
        // it also falls between two entries, which the caller detects by what is missing.
        match result {
            Err(Error::Truncated(_) | Error::NotAnArchive(_)) => {}
            Ok(entries) => assert!(entries.len() < 2, "cut at {len} read as complete"),
            Err(other) => panic!("cut at {len}: {other}"),
        }
    }
}

#[test]
fn malformed_containers_are_refused_before_allocating() {
    let mut absurd = PBZE.to_vec();
    absurd.extend_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        ArchiveReader::new(Cursor::new(absurd)),
        Err(Error::Corrupt(_))
    ));

    let mut huge_block = PBZE.to_vec();
    huge_block.extend_from_slice(&(1u64 << 20).to_be_bytes());
    huge_block.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge_block.extend_from_slice(&100u64.to_be_bytes());
    let err = read_archive(huge_block).unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");

    let mut huge_payload = PBZE.to_vec();
    huge_payload.extend_from_slice(&(1u64 << 20).to_be_bytes());
    huge_payload.extend_from_slice(&100u64.to_be_bytes());
    huge_payload.extend_from_slice(&(1u64 << 40).to_be_bytes());
    let err = read_archive(huge_payload).unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");

    for (bytes, kind) in [
        (&b""[..], "empty"),
        (b"PK\x03\x04zip", "magic"),
        (b"pbzz\0\0\0\0\0\0\0\x10", "zlib"),
    ] {
        let err = ArchiveReader::new(Cursor::new(bytes.to_vec())).err().unwrap();
        assert!(matches!(err, Error::NotAnArchive(_)), "{kind}: {err}");
    }
}

#[test]
fn a_block_that_expands_past_its_declared_size_is_a_bomb() {
    let payload = reference_encode(&vec![0; 1 << 20]);
    let mut archive = PBZE.to_vec();
    archive.extend_from_slice(&(1u64 << 20).to_be_bytes());
    archive.extend_from_slice(&1000u64.to_be_bytes());
    archive.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    archive.extend_from_slice(&payload);
    let err = read_archive(archive).unwrap_err();
    assert!(err.to_string().contains("decodes to more bytes"), "{err}");
}

#[test]
fn malformed_headers_are_refused() {
    let good = file_header("x", 0).encode().unwrap();
    let mut short = good.clone();
    short[4..6].copy_from_slice(&3u16.to_le_bytes());
    let mut unknown = good.clone();
    let at = unknown
        .windows(4)
        .position(|w| w == b"MODA" || w.starts_with(b"MOD"))
        .unwrap();
    unknown[at + 3] = b'Z';
    let mut cut = good.clone();
    let size = (good.len() - 1) as u16;
    cut[4..6].copy_from_slice(&size.to_le_bytes());
    cut.pop();
    for (bytes, what) in [(short, "short"), (unknown, "unknown subtype"), (cut, "cut field")] {
        let err = read_archive(bytes).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{what}: {err}");
    }
    let mut two = file_header("a", 0).encode().unwrap();
    two.extend_from_slice(b"junk!!");
    assert!(matches!(read_archive(two), Err(Error::Corrupt(_))));
}

fn runs() -> impl Strategy<Value = Vec<Run>> {
    prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..3000).prop_map(Run::Bytes),
            (0usize..3000).prop_map(|n| Run::Bytes(text(n))),
            (0u64..20_000).prop_map(Run::Zeros),
        ],
        0..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn roundtrip(entries in prop::collection::vec(("[a-z]{1,12}", runs()), 0..5), block_size in 1usize..9000) {
        let archive = write_archive(&entries, block_size);
        let read = read_archive(archive).unwrap();
        prop_assert_eq!(read.len(), entries.len());
        for ((header, data), (path, runs)) in read.iter().zip(&entries) {
            prop_assert_eq!(header, &file_header(path, data.len() as u64));
            prop_assert!(data == &expand(runs));
        }
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000), magic in 0usize..3) {
        let mut input = [&b"pbze"[..], b"AA01", b""][magic].to_vec();
        if magic == 0 {
            input.extend_from_slice(&4096u64.to_be_bytes());
        }
        input.extend(bytes);
        let _ = read_archive(input);
    }

    #[test]
    fn headers_roundtrip(uid in any::<u64>(), secs in any::<i64>(), nanos in any::<u32>(), path in prop::collection::vec(any::<u8>(), 0..300), blob in any::<u64>()) {
        let header = Header::new()
            .with(Key::PAT, Value::String(path))
            .with(Key::UID, Value::Uint(uid))
            .with(Key::MTM, Value::Time { seconds: secs, nanos: Some(nanos) })
            .with(Key::CTM, Value::Time { seconds: secs, nanos: None })
            .with(Key(*b"SH2"), Value::Hash(vec![7; 32]))
            .with(Key(*b"XAT"), Value::Blob(blob))
            .with(Key(*b"NLK"), Value::Flag);
        let bytes = header.encode().unwrap();
        prop_assert_eq!(Header::decode_fields(&bytes[6..]).unwrap(), header);
    }
}

#[test]
fn an_lzfse_payload_is_never_as_long_as_its_block() {
    // Readers take a payload exactly as long as its block for a stored block; an LZFSE stream of
    // that length would be copied out as is (found by the roundtrip property: a 291-byte block).
    let mut encoder = lzfse_rust::LzfseEncoder::default();
    for len in 1..2000usize {
        for raw in [
            pseudo_random(len, len as u64),
            text(len),
            [text(len / 2), pseudo_random(len - len / 2, 1)].concat(),
        ] {
            let payload = crate::pbz::encode_block(&mut encoder, &raw);
            assert_ne!(payload.len(), raw.len(), "{len}");
            assert_eq!(reference_decode(&payload, raw.len()), raw);
        }
    }
}
