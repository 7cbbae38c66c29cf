//! Whatever we compress must decompress to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|program: &[u8]| {
    let data = expand(program);
    let stream = apple_lz4::compress(&data);
    assert!(apple_lz4::decompress(&stream).expect("our own stream decodes") == data);
});

/// Grows a small fuzz input into data spanning many 64 KiB blocks: bytes below 0x10 append runs
/// of zeros, bytes 0x10..0x20 repeat recent output (long-distance matches), others are literal.
/// Capped at 1 MiB to keep executions fast.
fn expand(program: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    for &op in program {
        if data.len() > 1 << 20 {
            break;
        }
        match op {
            0x00..0x10 => data.resize(data.len() + (op as usize + 1) * 4096, 0),
            0x10..0x20 => {
                let len = (op as usize - 0x0f) * 3000;
                let start = data.len().saturating_sub(len);
                data.extend_from_within(start..);
            }
            _ => data.push(op),
        }
    }
    data
}
