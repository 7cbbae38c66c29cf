//! Just enough HTTP/1.1 framing for the fault proxy and the token server.
//!
//! Hand-rolled on purpose: injecting faults means writing bytes that a conforming HTTP library refuses
//! to produce (a Content-Length that disagrees with the body, a body cut off mid-way).

use std::io::{self, BufRead, Read, Write};

const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

#[derive(Clone, Debug, Default)]
pub(crate) struct Headers(Vec<(String, Vec<u8>)>);

impl Headers {
    fn parse(raw: &[httparse::Header<'_>]) -> Headers {
        Headers(raw.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect())
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    pub(crate) fn remove(&mut self, name: &str) -> Option<String> {
        let value = self.get(name).map(str::to_owned);
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        value
    }

    pub(crate) fn set(&mut self, name: &str, value: impl Into<String>) {
        self.remove(name);
        self.0.push((name.to_owned(), value.into().into_bytes()));
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        for (name, value) in &self.0 {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) target: String,
    http10: bool,
    pub(crate) headers: Headers,
}

impl Request {
    pub(crate) fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(path, _)| path)
    }

    pub(crate) fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, query)| query)
    }

    /// Every `name=value` pair of the query string, percent-decoded, in order (names may repeat).
    pub(crate) fn query_pairs(&self) -> Vec<(String, String)> {
        self.query()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name), percent_decode(value))
            })
            .collect()
    }

    pub(crate) fn wants_close(&self) -> bool {
        self.headers.has_token("connection", "close")
            || (self.http10 && !self.headers.has_token("connection", "keep-alive"))
    }

    pub(crate) fn body_framing(&self) -> io::Result<Framing> {
        if self.headers.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        Ok(match content_length(&self.headers)? {
            Some(0) | None => Framing::Empty,
            Some(n) => Framing::Length(n),
        })
    }

    pub(crate) fn head_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        self.headers.write_to(&mut out);
        out
    }
}

pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) reason: String,
    pub(crate) headers: Headers,
}

impl Response {
    pub(crate) fn new(status: u16, reason: &str) -> Response {
        Response {
            status,
            reason: reason.to_owned(),
            headers: Headers::default(),
        }
    }

    pub(crate) fn wants_close(&self) -> bool {
        self.headers.has_token("connection", "close")
    }

    /// How the body that follows this response head is delimited (RFC 9112 section 6.3).
    pub(crate) fn body_framing(&self, request_method: &str) -> io::Result<Framing> {
        if request_method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(Framing::Empty);
        }
        if self.headers.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        Ok(match content_length(&self.headers)? {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        })
    }

    pub(crate) fn head_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason).into_bytes();
        self.headers.write_to(&mut out);
        out
    }

    /// A complete response with a small in-memory body, for answers the proxy or token server make up.
    pub(crate) fn with_body(mut self, content_type: &str, body: &[u8]) -> Vec<u8> {
        self.headers.set("Content-Type", content_type);
        self.headers.set("Content-Length", body.len().to_string());
        let mut out = self.head_bytes();
        out.extend_from_slice(body);
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

fn content_length(headers: &Headers) -> io::Result<Option<u64>> {
    headers
        .get("content-length")
        .map(|v| v.parse().map_err(|_| invalid(format!("bad Content-Length {v:?}"))))
        .transpose()
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Reads up to and including the blank line that ends a message head; `None` when the peer closed the
/// connection cleanly before sending anything.
fn read_head(from: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        if from
            .by_ref()
            .take((MAX_HEAD - start) as u64)
            .read_until(b'\n', &mut head)?
            == 0
        {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        let line = &head[start..];
        if !line.ends_with(b"\n") {
            return Err(invalid("message head too long".into()));
        }
        if line == b"\r\n" || line == b"\n" {
            // RFC 9112 section 2.2: empty lines before a request line are to be ignored.
            if start == 0 {
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
    }
}

pub(crate) fn read_request(from: &mut impl BufRead) -> io::Result<Option<Request>> {
    let Some(head) = read_head(from)? else { return Ok(None) };
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut raw);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => Ok(Some(Request {
            method: parsed.method.unwrap_or_default().to_owned(),
            target: parsed.path.unwrap_or_default().to_owned(),
            http10: parsed.version == Some(0),
            headers: Headers::parse(parsed.headers),
        })),
        Ok(httparse::Status::Partial) => Err(invalid("truncated request head".into())),
        Err(e) => Err(invalid(format!("bad request head: {e}"))),
    }
}

pub(crate) fn read_response(from: &mut impl BufRead) -> io::Result<Response> {
    let head = read_head(from)?.ok_or(io::ErrorKind::UnexpectedEof)?;
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut raw);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => Ok(Response {
            status: parsed.code.unwrap_or_default(),
            reason: parsed.reason.unwrap_or_default().to_owned(),
            headers: Headers::parse(parsed.headers),
        }),
        Ok(httparse::Status::Partial) => Err(invalid("truncated response head".into())),
        Err(e) => Err(invalid(format!("bad response head: {e}"))),
    }
}

/// Copies one message body from `from` to `to` byte for byte, framing (chunk sizes, trailers) included.
pub(crate) fn relay_body(framing: Framing, from: &mut impl BufRead, to: &mut impl Write) -> io::Result<()> {
    match framing {
        Framing::Empty => Ok(()),
        Framing::Length(n) => copy_exact(from, to, n),
        Framing::Chunked => copy_chunked(from, to, true),
        Framing::UntilClose => io::copy(from, to).map(drop),
    }
}

/// Reads one message body with its transfer framing removed.
pub(crate) fn read_body(framing: Framing, from: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => copy_exact(from, &mut body, n)?,
        Framing::Chunked => copy_chunked(from, &mut body, false)?,
        Framing::UntilClose => drop(from.read_to_end(&mut body)?),
    }
    Ok(body)
}

fn copy_exact(from: &mut impl BufRead, to: &mut impl Write, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut from.by_ref().take(n), to)?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn copy_chunked(from: &mut impl BufRead, to: &mut impl Write, keep_framing: bool) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        from.by_ref().take(4096).read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(invalid("bad chunk size line".into()));
        }
        let size_text = std::str::from_utf8(&line)
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        let size = u64::from_str_radix(size_text, 16).map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
        if keep_framing {
            to.write_all(&line)?;
        }
        if size == 0 {
            break;
        }
        copy_exact(from, to, size)?;
        let mut crlf = [0; 2];
        from.read_exact(&mut crlf)?;
        if keep_framing {
            to.write_all(&crlf)?;
        }
    }
    // Trailer section, ended by an empty line.
    loop {
        line.clear();
        from.by_ref().take(MAX_HEAD as u64).read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if keep_framing {
            to.write_all(&line)?;
        }
        if line == b"\r\n" || line == b"\n" {
            return Ok(());
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_relayed_verbatim_and_decoded() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let mut relayed = Vec::new();
        let mut from = &wire[..];
        relay_body(Framing::Chunked, &mut from, &mut relayed).unwrap();
        assert_eq!(relayed, &wire[..wire.len() - 4]);
        assert_eq!(from, b"NEXT");
        assert_eq!(read_body(Framing::Chunked, &mut &wire[..]).unwrap(), b"hello world");
    }

    #[test]
    fn query_pairs_are_percent_decoded() {
        let request = read_request(
            &mut &b"GET /token?scope=repository%3Aa%2Fb%3Apull%2Cpush&scope=x&service=s+1 HTTP/1.1\r\n\r\n"[..],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            request.query_pairs(),
            [
                ("scope", "repository:a/b:pull,push"),
                ("scope", "x"),
                ("service", "s 1")
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
