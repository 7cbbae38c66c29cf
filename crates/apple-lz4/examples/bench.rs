//! Throughput of this crate against the `lz4` command-line tool on a disk-like buffer.
//!
//! Usage: `bench [SIZE_MIB] [TEXT_FILE]` (defaults: 512 MiB, the pg2554.txt test vector).
//! The buffer repeats a 16 MiB pattern of 8 MiB zeros, 6 MiB text (slices of TEXT_FILE) and
//! 2 MiB pseudo-random bytes, roughly what a used VM disk looks like. Run via scripts/bench/lz4.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std::{env, fs};

use apple_lz4::{Decoder, Encoder, PushDecoder};

const MIB: usize = 1024 * 1024;
/// Each figure is the best of this many runs, to shed one-off page-fault and scheduling noise.
const RUNS: usize = 3;

fn main() -> io::Result<()> {
    let mut args = env::args().skip(1);
    let size_mib: usize = args
        .next()
        .map(|s| s.parse().expect("SIZE_MIB must be a number"))
        .unwrap_or(512);
    let text_path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/apple-lz4/pg2554.txt"));
    let text = fs::read(&text_path)?;

    println!("input: {size_mib} MiB, 50% zeros / 37.5% text / 12.5% random");
    let data = disk_like(size_mib * MIB, &text);
    bench_ours("mixed", &data)?;
    bench_ours("zeros", &vec![0; size_mib.min(128) * MIB])?;
    bench_ours("text", &text.repeat(size_mib.min(128) * MIB / text.len()))?;
    bench_lz4_cli(&data)
}

fn disk_like(len: usize, text: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut text_pos = 0;
    while data.len() < len {
        data.resize(data.len() + 8 * MIB, 0);
        for _ in 0..6 * MIB / 4096 {
            // Pages of text from ever-shifting offsets, so that nothing repeats within 64 KiB.
            text_pos = (text_pos + 4096 + 513) % (text.len() - 4096);
            data.extend_from_slice(&text[text_pos..text_pos + 4096]);
        }
        for _ in 0..2 * MIB / 8 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            data.extend_from_slice(&rng.to_le_bytes());
        }
    }
    data.truncate(len);
    data
}

fn best(mut run: impl FnMut() -> io::Result<()>) -> io::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let start = Instant::now();
        run()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

fn mb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

fn bench_ours(label: &str, data: &[u8]) -> io::Result<()> {
    let mut compressed = Vec::with_capacity(data.len() + data.len() / 64 + 64);
    let compress_time = best(|| {
        compressed.clear();
        let mut encoder = Encoder::new(&mut compressed);
        for chunk in data.chunks(MIB) {
            encoder.write_all(chunk)?;
        }
        encoder.finish()?;
        Ok(())
    })?;

    // Decode into a pre-faulted buffer, as a pull writes into an already allocated disk file.
    let mut out = Vec::with_capacity(data.len());
    let push_time = best(|| {
        out.clear();
        let mut decoder = PushDecoder::new();
        for chunk in compressed.chunks(MIB) {
            decoder.feed(chunk, &mut out)?;
        }
        Ok(decoder.finish()?)
    })?;
    assert!(out == data, "{label}: round trip mismatch");

    let read_time = best(|| {
        out.clear();
        Decoder::new(compressed.as_slice()).read_to_end(&mut out)?;
        Ok(())
    })?;
    assert!(out == data, "{label}: round trip mismatch");

    println!(
        "apple-lz4 {label:>5}: {:>4} MiB -> {:>10} bytes, ratio {:>6.2}, compress {:>7.0} MB/s, \
         decompress push {:>7.0} MB/s, Read {:>7.0} MB/s",
        data.len() / MIB,
        compressed.len(),
        data.len() as f64 / compressed.len() as f64,
        mb_per_s(data.len(), compress_time),
        mb_per_s(data.len(), push_time),
        mb_per_s(data.len(), read_time),
    );
    Ok(())
}

/// The reference C implementation on the same mixed buffer: fast level, 64 KiB linked blocks as
/// in Apple's format, through pipes so that no disk is involved.
fn bench_lz4_cli(data: &[u8]) -> io::Result<()> {
    let args = ["-1", "-B4", "-BD", "--no-frame-crc", "-q"];
    let mut compressed = Vec::new();
    let compress_time = best(|| {
        compressed = pipe("lz4", &[&args[..], &["-c"]].concat(), data)?;
        Ok(())
    })?;
    let mut out = Vec::new();
    let decompress_time = best(|| {
        out = pipe("lz4", &["-d", "-c", "-q"], &compressed)?;
        Ok(())
    })?;
    assert!(out == data, "lz4: round trip mismatch");
    println!(
        "lz4 CLI   mixed: {:>4} MiB -> {:>10} bytes, ratio {:>6.2}, compress {:>7.0} MB/s, \
         decompress {:>7.0} MB/s  (lz4 {} through pipes)",
        data.len() / MIB,
        compressed.len(),
        data.len() as f64 / compressed.len() as f64,
        mb_per_s(data.len(), compress_time),
        mb_per_s(data.len(), decompress_time),
        args.join(" "),
    );

    // Pipes cap the figures above; lz4's own in-memory benchmark shows the bare codec.
    let path = env::temp_dir().join(format!("apple-lz4-bench-{}", std::process::id()));
    fs::write(&path, data)?;
    let report = Command::new("lz4")
        .args(["-b1", "-B4", "-BD", "-i3"])
        .arg(&path)
        .output();
    fs::remove_file(&path)?;
    let report = report?;
    let text = String::from_utf8_lossy(&report.stdout) + String::from_utf8_lossy(&report.stderr);
    // The tool redraws its progress line with carriage returns; the last one is the result.
    let result = text
        .split(['\r', '\n'])
        .rfind(|line| line.contains("MB/s"))
        .unwrap_or("no result");
    // Drop the spinner and truncated file name in front of the figures.
    let figures = result.split_once(" : ").map_or(result, |(_, figures)| figures);
    println!(
        "lz4 -b1 -B4 -BD in memory, mixed: {} (in -> out (ratio), compress, decompress)",
        figures.trim()
    );
    Ok(())
}

fn pipe(program: &str, args: &[&str], input: &[u8]) -> io::Result<Vec<u8>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Even -qq leaves a "using blocks of size" note; failures still show in the status.
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let output = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(input));
        let mut output = Vec::with_capacity(input.len());
        stdout.read_to_end(&mut output)?;
        writer.join().expect("writer thread panicked")?;
        io::Result::Ok(output)
    })?;
    let status = child.wait()?;
    if !status.success() {
        return Err(io::Error::other(format!("{program} failed: {status}")));
    }
    Ok(output)
}
