//! Arbitrary archives must never panic the reader, nor make it allocate past its bounds.
#![no_main]

use apple_archive::{ArchiveReader, Piece};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Most inputs would stop at the magic; give the fuzzer both containers to work on.
    let input = match data.first() {
        Some(b) if b % 2 == 0 => [&b"pbze\0\0\0\0\0\0\x10\0"[..], &data[1..]].concat(),
        Some(_) => [&b"AA01"[..], &data[1..]].concat(),
        None => Vec::new(),
    };
    let Ok(mut reader) = ArchiveReader::new(std::io::Cursor::new(input)) else {
        return;
    };
    // Read everything; the first error ends it, as it ends an import.
    while let Ok(Some(_header)) = reader.next_entry() {
        loop {
            match reader.next_blob() {
                Ok(Some(_blob)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
            loop {
                match reader.read_blob(1 << 20) {
                    Ok(Some(Piece::Bytes(_) | Piece::Zeros(_))) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
});
