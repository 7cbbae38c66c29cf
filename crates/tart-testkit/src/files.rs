//! [`FileServer`]: the files of a directory over HTTP on 127.0.0.1, with `Range` support (for
//! resumed downloads), an HTML page at `/` (what a wrong URL often gives), 404s, and a fault:
//! cutting off the next response bodies after some bytes.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    /// (bytes to send, responses left) of the cut-off fault.
    cut: Option<(u64, u32)>,
    /// Request lines and their Range header, in order.
    requests: Vec<(String, Option<String>)>,
}

pub struct FileServer {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl FileServer {
    /// Serves `root` until the process ends.
    pub fn start(root: impl Into<PathBuf>) -> FileServer {
        let root = root.into();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (root, state) = (root.clone(), shared.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &root, &state);
                });
            }
        });
        FileServer { port, state }
    }

    /// `http://127.0.0.1:<port>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// The next `times` file responses announce the whole length but stop after `bytes`.
    pub fn cut_after(&self, bytes: u64, times: u32) {
        self.state.lock().unwrap().cut = Some((bytes, times));
    }

    /// The `Range` headers of the GET requests for `path` so far (`None`: no Range).
    pub fn gets(&self, path: &str) -> Vec<Option<String>> {
        let line = format!("GET /{path} ");
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|(request, _)| request.starts_with(&line))
            .map(|(_, range)| range.clone())
            .collect()
    }
}

fn serve(stream: TcpStream, root: &std::path::Path, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_owned());
            }
        }
    }
    state
        .lock()
        .unwrap()
        .requests
        .push((request.trim().to_owned(), range.clone()));
    let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/');
    if path.is_empty() {
        let page = "<html><body>Index of /</body></html>";
        return write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
            page.len()
        );
    }
    let Ok(mut file) = std::fs::File::open(root.join(path)) else {
        return write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    let len = file.metadata()?.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<u64>().ok());
    let head = match start {
        Some(start) if start >= len => {
            return write!(
                out,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
        Some(start) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\nContent-Length: {}\r\n",
            len - 1,
            len - start
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"),
    };
    write!(
        out,
        "{head}Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )?;
    let start = start.unwrap_or(0);
    file.seek(SeekFrom::Start(start))?;
    let limit = {
        let mut state = state.lock().unwrap();
        match &mut state.cut {
            Some((bytes, times)) if *times > 0 => {
                *times -= 1;
                *bytes
            }
            _ => u64::MAX,
        }
    };
    std::io::copy(&mut file.take(limit), &mut out)?;
    Ok(())
}
