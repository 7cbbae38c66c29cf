//! Whatever bytes and zero runs go into an archive come back out, in any block size.
#![no_main]

use apple_archive::{ArchiveReader, ArchiveWriter, EntryType, Header, Key, PbzeWriter, Piece, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, data)) = data.split_first() else {
        return;
    };
    let block_size = 1 + usize::from(shape) * 97;
    let zeros = u64::from(shape) * 1031;
    let mut expected = data.to_vec();
    expected.resize(data.len() + zeros as usize, 0);

    let mut writer = ArchiveWriter::new(PbzeWriter::with_block_size(Vec::new(), block_size).unwrap());
    let header = Header::new()
        .with(Key::TYP, Value::Uint(u64::from(EntryType::File.letter())))
        .with(Key::PAT, Value::String(b"disk.img".to_vec()))
        .with(Key::DAT, Value::Blob(expected.len() as u64));
    writer.write_header(&header).unwrap();
    writer.write_data(data).unwrap();
    writer.write_zeros(zeros).unwrap();
    let archive = writer.finish().unwrap().finish().unwrap();

    let mut reader = ArchiveReader::new(std::io::Cursor::new(archive)).unwrap();
    assert_eq!(reader.next_entry().unwrap(), Some(header));
    assert_eq!(reader.next_blob().unwrap().is_some(), !expected.is_empty());
    let mut restored = Vec::new();
    while let Some(piece) = reader.read_blob(u64::MAX).unwrap() {
        match piece {
            Piece::Bytes(bytes) => restored.extend_from_slice(bytes),
            Piece::Zeros(len) => restored.resize(restored.len() + len as usize, 0),
        }
    }
    assert!(restored == expected);
    assert!(reader.next_entry().unwrap().is_none());
});
