//! A reverse proxy that forwards HTTP/1.1 to an upstream registry and breaks blob downloads on request.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http::{self, Framing, Response};

/// One request the proxy received, in the order their response heads were known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedRequest {
    pub method: String,
    /// The request path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// The `Range` header, e.g. `bytes=1024-`.
    pub range: Option<String>,
    /// The `Authorization` header, to check which hosts credentials were sent to.
    pub authorization: Option<String>,
    /// The status the client was sent (502 when the upstream could not be reached, 0 when the proxy
    /// cut the request and sent nothing).
    pub status: u16,
}

impl ProxiedRequest {
    pub fn has_range(&self) -> bool {
        self.range.is_some()
    }

    pub fn has_authorization(&self) -> bool {
        self.authorization.is_some()
    }

    /// The digest of a blob download (`GET /v2/<repo>/blobs/<digest>`), `None` for any other request.
    pub fn blob_get(&self) -> Option<&str> {
        if self.method == "GET" {
            blob_digest(&self.path)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug)]
enum Fault {
    Corrupt,
    Truncate {
        after: u64,
        times: u32,
    },
    LieContentLength(i64),
    Delay(Duration),
    /// Cut after this fraction of the body.
    Cut(f64),
}

#[derive(Default)]
struct Faults {
    by_digest: HashMap<String, Fault>,
    redirect_to: Option<String>,
    random_cuts: Option<RandomCuts>,
    upload_cuts: Option<RandomCuts>,
}

/// Which blob downloads are cut, and where: a seeded xorshift64* so a failing run can be replayed.
struct RandomCuts {
    probability: f64,
    state: u64,
}

impl RandomCuts {
    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Shared {
    upstream: String,
    faults: Mutex<Faults>,
    log: Mutex<Vec<ProxiedRequest>>,
    stop: AtomicBool,
    /// Downloads cut by [`FaultProxy::cut_blobs_randomly`].
    cuts: AtomicU64,
    /// Uploads cut by [`FaultProxy::cut_uploads_randomly`].
    upload_cuts: AtomicU64,
    /// Open client connections, shut down on drop so their threads end with the proxy.
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
}

impl Shared {
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fault for this download, using up one of a truncation's repetitions.
    fn take_fault(&self, digest: &str) -> Option<Fault> {
        let mut faults = self.faults();
        if !faults.by_digest.contains_key(digest) {
            let cuts = faults.random_cuts.as_mut()?;
            if cuts.next() >= cuts.probability {
                return None;
            }
            self.cuts.fetch_add(1, Ordering::SeqCst);
            return Some(Fault::Cut(cuts.next()));
        }
        let fault = faults.by_digest.get_mut(digest)?;
        if let Fault::Truncate { times, .. } = fault {
            if *times == 0 {
                return None;
            }
            *times -= 1;
        }
        Some(fault.clone())
    }

    /// Where to cut this upload request's body (a fraction of it), if it is to be cut.
    fn take_upload_cut(&self) -> Option<f64> {
        let mut faults = self.faults();
        let cuts = faults.upload_cuts.as_mut()?;
        if cuts.next() >= cuts.probability {
            return None;
        }
        self.upload_cuts.fetch_add(1, Ordering::SeqCst);
        Some(cuts.next())
    }

    fn record(&self, request: &http::Request, status: u16) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ProxiedRequest {
                method: request.method.clone(),
                path: request.path().to_owned(),
                query: request.query().map(str::to_owned),
                range: request.headers.get("range").map(str::to_owned),
                authorization: request.headers.get("authorization").map(str::to_owned),
                status,
            });
    }

    /// Sleeps, but returns early once the proxy is dropped so no thread outlives a test by long.
    fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        while !self.stop.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

/// An HTTP/1.1 reverse proxy on `127.0.0.1:<free port>` in front of `upstream` that forwards everything
/// (keeping the `Host` header, so the registry's upload `Location`s point back at the proxy) and injects
/// faults into blob downloads (`GET /v2/<repo>/blobs/<digest>` answered 200 or 206).
///
/// Faults can be changed while requests are in flight; each applies from the next download on.
pub struct FaultProxy {
    addr: SocketAddr,
    host: String,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy forwarding to `upstream` (`host:port`, e.g. [`crate::Registry::host`]).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy on 127.0.0.1");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            faults: Mutex::default(),
            log: Mutex::default(),
            stop: AtomicBool::new(false),
            cuts: AtomicU64::new(0),
            upload_cuts: AtomicU64::new(0),
            connections: Mutex::default(),
            next_connection: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("testkit-proxy".into())
                .spawn(move || accept(listener, shared))
                .expect("spawn proxy thread")
        };
        FaultProxy {
            addr,
            host: addr.to_string(),
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Flips one byte (the middle one) of every download of the blob; the length stays the same.
    pub fn corrupt_blob(&self, digest: &str) {
        self.set(digest, Fault::Corrupt);
    }

    /// The next `times` downloads of the blob announce the full length, send `n_bytes` of the body and then
    /// close the connection; later ones go through. Applies to ranged (206) downloads too, so a resumed
    /// download can be cut again.
    pub fn truncate_blob_after(&self, digest: &str, n_bytes: u64, times: u32) {
        self.set(digest, Fault::Truncate { after: n_bytes, times });
    }

    /// Downloads of the blob announce `Content-Length` off by `delta` bytes, send the real body and close
    /// the connection: too long leaves the client waiting for bytes that never come, too short hands it a
    /// cut-off body.
    pub fn lie_content_length(&self, digest: &str, delta: i64) {
        self.set(digest, Fault::LieContentLength(delta));
    }

    /// Downloads of the blob send the head and the first half of the body at once, then stall for
    /// `delay` before the rest: long enough to kill a pull mid-way with part of the blob written.
    pub fn delay_blob(&self, digest: &str, delay: Duration) {
        self.set(digest, Fault::Delay(delay));
    }

    /// Each blob download without a fault of its own is cut with `probability`: the full length is
    /// announced, the body is sent up to a uniformly random byte strictly inside it (so every cut
    /// download brings some data and misses some; a body of one byte goes through) and the
    /// connection is closed. `seed` makes the choices repeatable.
    pub fn cut_blobs_randomly(&self, probability: f64, seed: u64) {
        self.shared.faults().random_cuts = Some(RandomCuts {
            probability,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        });
    }

    /// Each blob upload request with a body (`PATCH`/`PUT` on `/v2/<repo>/blobs/uploads/…`) is cut
    /// with `probability`: the registry gets the head and the body up to a uniformly random point
    /// (at least one byte), then both connections are closed and the client gets no answer. Its
    /// log entry has status 0. `seed` makes the choices repeatable.
    pub fn cut_uploads_randomly(&self, probability: f64, seed: u64) {
        self.shared.faults().upload_cuts = Some(RandomCuts {
            probability,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        });
    }

    /// How many uploads [`FaultProxy::cut_uploads_randomly`] has cut so far.
    pub fn upload_cuts(&self) -> u64 {
        self.shared.upload_cuts.load(Ordering::SeqCst)
    }

    /// How many downloads [`FaultProxy::cut_blobs_randomly`] has cut so far.
    pub fn random_cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// Answers every blob download with `307 Temporary Redirect` to the same path and query on
    /// `other_host` (e.g. another proxy's [`FaultProxy::host`]), the way registries hand blobs off to a CDN.
    pub fn redirect_blobs_to(&self, other_host: &str) {
        self.shared.faults().redirect_to = Some(other_host.to_owned());
    }

    /// Removes every fault and the redirect; the request log is kept.
    pub fn clear_faults(&self) {
        *self.shared.faults() = Faults::default();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.shared.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The downloads (`GET`) of one blob so far, redirected ones included.
    pub fn blob_gets(&self, digest: &str) -> Vec<ProxiedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.blob_get() == Some(digest))
            .collect()
    }

    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    fn set(&self, digest: &str, fault: Fault) {
        self.shared.faults().by_digest.insert(digest.to_owned(), fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for connection in self
            .shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
        let Ok(registered) = stream.try_clone() else { continue };
        shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, registered);
        let conn_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new().name("testkit-proxy-conn".into()).spawn(move || {
            let _ = serve(&stream, &conn_shared);
            // The registered clone keeps the socket open: without an explicit shutdown the client would
            // not see the connection end after a fault.
            let _ = stream.shutdown(Shutdown::Both);
            conn_shared
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
        if spawned.is_err() {
            if let Some(stream) = shared
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id)
            {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

struct Upstream {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Upstream {
    fn connect(host: &str) -> io::Result<Upstream> {
        let stream = TcpStream::connect(host)?;
        stream.set_nodelay(true)?;
        Ok(Upstream {
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
        })
    }
}

/// Serves one client connection, request by request, over one upstream connection.
fn serve(client: &TcpStream, shared: &Shared) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let mut upstream: Option<Upstream> = None;
    while let Some(mut request) = http::read_request(&mut from_client)? {
        let digest = if request.method == "GET" {
            blob_digest(request.path()).map(str::to_owned)
        } else {
            None
        };
        let redirect = digest.as_ref().and(shared.faults().redirect_to.clone());
        if let Some(other_host) = redirect {
            let mut response = Response::new(307, "Temporary Redirect");
            response
                .headers
                .set("Location", format!("http://{other_host}{}", request.target));
            to_client.write_all(&response.with_body("text/plain", b""))?;
            shared.record(&request, 307);
            http::read_body(request.body_framing()?, &mut from_client)?;
            if request.wants_close() {
                return Ok(());
            }
            continue;
        }

        if request
            .headers
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            // Answered here rather than relayed: the body is streamed to the upstream right after the head.
            request.headers.remove("expect");
            to_client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let up = match &mut upstream {
            Some(up) => up,
            None => match Upstream::connect(&shared.upstream) {
                Ok(up) => upstream.insert(up),
                Err(e) => {
                    shared.record(&request, 502);
                    let message = format!("upstream {}: {e}\n", shared.upstream);
                    let mut response = Response::new(502, "Bad Gateway");
                    response.headers.set("Connection", "close");
                    return to_client.write_all(&response.with_body("text/plain", message.as_bytes()));
                }
            },
        };
        let framing = request.body_framing()?;
        let upload = matches!(request.method.as_str(), "PATCH" | "PUT") && request.path().contains("/blobs/uploads/");
        if let Some(fraction) = (upload && framing != Framing::Empty)
            .then(|| shared.take_upload_cut())
            .flatten()
        {
            let body = http::read_body(framing, &mut from_client)?;
            request.headers.remove("transfer-encoding");
            request.headers.set("Content-Length", body.len().to_string());
            let cut = 1 + (body.len().saturating_sub(1) as f64 * fraction) as usize;
            up.writer.write_all(&request.head_bytes())?;
            up.writer.write_all(&body[..cut.min(body.len())])?;
            up.writer.flush()?;
            shared.record(&request, 0);
            return Ok(());
        }
        up.writer.write_all(&request.head_bytes())?;
        http::relay_body(framing, &mut from_client, &mut up.writer)?;
        up.writer.flush()?;

        let mut response = loop {
            let response = http::read_response(&mut up.reader)?;
            if (100..200).contains(&response.status) && response.status != 101 {
                to_client.write_all(&response.head_bytes())?;
                continue;
            }
            break response;
        };
        shared.record(&request, response.status);
        let framing = response.body_framing(&request.method)?;
        let mut keep_alive = !request.wants_close() && !response.wants_close() && framing != Framing::UntilClose;
        let fault = digest
            .filter(|_| matches!(response.status, 200 | 206))
            .and_then(|d| shared.take_fault(&d));
        match fault {
            None => {
                to_client.write_all(&response.head_bytes())?;
                http::relay_body(framing, &mut up.reader, &mut to_client)?;
            }
            Some(fault) => {
                let mut body = http::read_body(framing, &mut up.reader)?;
                response.headers.remove("transfer-encoding");
                let length = body.len() as u64;
                response.headers.set("Content-Length", length.to_string());
                match fault {
                    Fault::Corrupt => {
                        let middle = body.len() / 2;
                        if let Some(byte) = body.get_mut(middle) {
                            *byte ^= 0xff;
                        }
                        to_client.write_all(&response.head_bytes())?;
                        to_client.write_all(&body)?;
                    }
                    Fault::Truncate { after, .. } => {
                        to_client.write_all(&response.head_bytes())?;
                        to_client.write_all(&body[..after.min(length) as usize])?;
                        keep_alive = false;
                    }
                    Fault::Cut(fraction) => {
                        // Strictly inside the body: at least one byte arrives and one is missing.
                        let cut = 1 + ((length.saturating_sub(1)) as f64 * fraction) as usize;
                        to_client.write_all(&response.head_bytes())?;
                        to_client.write_all(&body[..cut.min(body.len())])?;
                        keep_alive &= cut >= body.len();
                    }
                    Fault::LieContentLength(delta) => {
                        let claimed = (length as i64).saturating_add(delta).max(0);
                        response.headers.set("Content-Length", claimed.to_string());
                        to_client.write_all(&response.head_bytes())?;
                        to_client.write_all(&body)?;
                        keep_alive = false;
                    }
                    Fault::Delay(delay) => {
                        let (first, rest) = body.split_at(body.len() / 2);
                        to_client.write_all(&response.head_bytes())?;
                        to_client.write_all(first)?;
                        to_client.flush()?;
                        shared.sleep(delay);
                        to_client.write_all(rest)?;
                    }
                }
            }
        }
        to_client.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// `sha256:…` from `/v2/<repo>/blobs/sha256:…` (repository names may contain slashes), `None` for upload
/// and other paths.
fn blob_digest(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let (_repo, digest) = rest.rsplit_once("/blobs/")?;
    (digest.contains(':') && !digest.contains('/')).then_some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_digests_are_found_in_nested_repositories_only_for_downloads() {
        assert_eq!(blob_digest("/v2/org/vm/blobs/sha256:abc"), Some("sha256:abc"));
        assert_eq!(blob_digest("/v2/vm/blobs/uploads/"), None);
        assert_eq!(blob_digest("/v2/vm/blobs/uploads/0f3c"), None);
        assert_eq!(blob_digest("/v2/vm/manifests/sha256:abc"), None);
    }
}
