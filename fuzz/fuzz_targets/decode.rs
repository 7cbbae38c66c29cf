//! Arbitrary input must never panic, and the three ways of decoding must agree on it.
#![no_main]

use std::io::Read;

use apple_lz4::{Decoder, PushDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = apple_lz4::decompress(data);

    // The same input split in three (at points taken from its own bytes) through the push API.
    let (first, second) = match data.first() {
        Some(&b) => (b as usize % (data.len() + 1), data.len() / 2),
        None => (0, 0),
    };
    let (first, second) = (first.min(second), first.max(second));
    let mut pushed = Vec::new();
    let mut decoder = PushDecoder::new();
    let split = [&data[..first], &data[first..second], &data[second..]]
        .into_iter()
        .try_for_each(|piece| decoder.feed(piece, &mut pushed))
        .and_then(|()| decoder.finish());

    let mut pulled = Vec::new();
    let read = Decoder::new(data).read_to_end(&mut pulled);

    match whole {
        Ok(out) => {
            split.expect("whole input decodes but split input does not");
            read.expect("whole input decodes but the Read adapter fails");
            assert!(out == pushed && out == pulled);
        }
        Err(_) => {
            assert!(split.is_err(), "split input decodes but whole input does not");
            assert!(read.is_err(), "the Read adapter decodes what decompress rejects");
        }
    }
});
