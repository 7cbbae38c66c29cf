//! Downloads of images by URL into `cache/images/<sha256 of the URL>/`, resumable: the bytes
//! arrive in `tmp/download-<key>/partial` (kept by tmp GC for a day, like pull staging), and
//! only a complete, verified image is moved into the cache.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tart_home::{StagingDir, DOWNLOAD_STAGING_PREFIX};
use tart_progress::Progress;

use crate::{inspect, io_context, refused, Error, Result};

/// Where downloads go: `cache/images` for complete ones, `tmp` for those under way.
pub struct DownloadCache {
    pub images: PathBuf,
    pub tmp: PathBuf,
}

const IMAGE: &str = "image";
const SHA256: &str = "sha256";

/// The image at `url`, from the cache or downloaded into it; with `expected_sha256`, only an
/// image with that SHA-256 (a cached one that differs is downloaded again).
pub fn download(
    cache: &DownloadCache,
    url: &str,
    expected_sha256: Option<&str>,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let expected = expected_sha256.map(valid_sha256).transpose()?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(refused(format!("{url} is neither a file nor an http(s) URL")));
    }
    let key = hex(&Sha256::digest(url.as_bytes()));
    let cached = cache.images.join(&key);
    let usable = || {
        let sha256 = fs::read_to_string(cached.join(SHA256)).unwrap_or_default();
        cached.join(IMAGE).is_file() && expected.as_deref().is_none_or(|hex| hex == sha256.trim())
    };
    if usable() {
        return Ok(cached.join(IMAGE));
    }
    let staging = StagingDir::resumable(cache.tmp.join(format!("{DOWNLOAD_STAGING_PREFIX}{key}")), || {
        progress.line(&format!("waiting for another download of {url}..."))
    })?;
    // The download we waited for may have been this one.
    if usable() {
        staging.discard();
        return Ok(cached.join(IMAGE));
    }
    let partial = staging.path().join("partial");
    progress.line(&format!("downloading {url}..."));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_context("failed to start the download"))?;
    if let Err(err) = runtime.block_on(fetch(url, &partial, progress)) {
        // Only bytes that arrived are worth keeping for the next attempt.
        if fs::metadata(&partial).map_or(true, |m| m.len() == 0) {
            staging.discard();
        }
        return Err(err);
    }

    let sha256 = file_sha256(&partial)?;
    // A bad download must not be resumed from either: drop it.
    let discard = |staging: StagingDir, error: Error| {
        staging.discard();
        Err(error)
    };
    if let Some(hex) = expected.filter(|hex| *hex != sha256) {
        return discard(
            staging,
            refused(format!(
                "checksum mismatch for {url}: expected SHA-256 {hex}, got {sha256}; the download was discarded"
            )),
        );
    }
    if let Err(err) = inspect(&partial) {
        return discard(staging, refused(format!("{url} did not give a disk image: {err}")));
    }
    fs::write(staging.path().join(SHA256), format!("{sha256}\n"))
        .and_then(|()| fs::write(staging.path().join("url"), format!("{url}\n")))
        .and_then(|()| fs::rename(&partial, staging.path().join(IMAGE)))
        .map_err(io_context(format!("failed to store the download of {url}")))?;
    // Syncs the download and its directory, creates cache/images durably, syncs it after.
    staging.persist(&cached, true)?;
    Ok(cached.join(IMAGE))
}

/// Appends the rest of `url` to `partial`: from where an earlier attempt stopped when the server
/// takes a `Range`, from the start when it does not.
async fn fetch(url: &str, partial: &Path, progress: &dyn Progress) -> Result<()> {
    // reqwest's own message ("error sending request") hides the cause ("connection refused").
    let failed = |err: reqwest::Error| refused(format!("failed to download {url}: {:#}", anyhow::Error::from(err)));
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(failed)?;
    let mut offset = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut request = client.get(url);
    if offset > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
    }
    let mut response = request.send().await.map_err(failed)?;
    let status = response.status();
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && offset > 0 {
        // What we have is longer than what the server has now: start again.
        fs::remove_file(partial).map_err(io_context("failed to restart the download"))?;
        return Box::pin(fetch(url, partial, progress)).await;
    }
    if !status.is_success() {
        return Err(refused(format!("failed to download {url}: HTTP {status}")));
    }
    let html = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().to_ascii_lowercase().starts_with("text/html"));
    if html {
        let _ = fs::remove_file(partial);
        return Err(refused(format!(
            "{url} returned an HTML page, not a disk image: check the URL"
        )));
    }
    if status != reqwest::StatusCode::PARTIAL_CONTENT {
        offset = 0;
    }
    let context = || format!("failed to write {}", partial.display());
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .append(offset > 0)
        .open(partial)
        .map_err(io_context(context()))?;
    let expected_total = response.content_length().map(|length| offset + length);
    progress.begin(expected_total.unwrap_or(0));
    progress.advance(offset);
    let mut received = offset;
    let broken = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                file.write_all(&chunk).map_err(io_context(context()))?;
                received += chunk.len() as u64;
                progress.advance(chunk.len() as u64);
            }
            Ok(None) => break expected_total.is_some_and(|total| total != received),
            Err(_) => break true,
        }
    };
    progress.end();
    // What arrived is kept (synced) for the next attempt to resume from.
    file.sync_all().map_err(io_context(context()))?;
    if broken {
        let total = expected_total.map_or_else(|| "?".to_owned(), |total| total.to_string());
        return Err(refused(format!(
            "the download of {url} broke off after {received} of {total} bytes; run the command again to resume it"
        )));
    }
    Ok(())
}

/// Refuses `path` unless its SHA-256 is `expected` (hex).
pub fn check_sha256(path: &Path, expected: &str) -> Result<()> {
    let expected = valid_sha256(expected)?;
    let actual = file_sha256(path)?;
    if actual != expected {
        return Err(refused(format!(
            "checksum mismatch for {}: expected SHA-256 {expected}, got {actual}",
            path.display()
        )));
    }
    Ok(())
}

fn valid_sha256(hex: &str) -> Result<String> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refused(format!("--sha256 must be 64 hexadecimal digits, not {hex:?}")));
    }
    Ok(hex.to_ascii_lowercase())
}

fn file_sha256(path: &Path) -> Result<String> {
    let context = || format!("failed to read {}", path.display());
    let mut file = File::open(path).map_err(io_context(context()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_context(context()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
