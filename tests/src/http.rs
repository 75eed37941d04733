//! A loopback HTTP mirror for tests: serves a directory or in-memory files on `127.0.0.1:<free
//! port>`, answers `Range: bytes=N-` / `bytes=N-M` with 206, and can inject faults per path.
//!
//! ```no_run
//! use gpu_passthrough_tests::http::Mirror;
//! let mirror = Mirror::files([("/a.bin", b"hello".to_vec())]);
//! mirror.fail_next("/a.bin", 2, 503); // the next two GETs answer 503
//! let url = mirror.url("/a.bin");     // http://127.0.0.1:PORT/a.bin
//! # drop(url);
//! ```
//!
//! It is a deliberately small HTTP/1.1 server (GET only, `Connection: close` on every answer,
//! one thread per connection) so that faults such as a connection dropped mid-body are exact.
//! The server stops when the [`Mirror`] is dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request the mirror answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The request path (no query).
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `If-Range` header, if any.
    pub if_range: Option<String>,
    /// The status code answered.
    pub status: u16,
}

#[derive(Default)]
struct Faults {
    fail: Option<(u32, u16)>,
    drop_after: Option<(u32, u64)>,
    stall: Option<(u32, u64, Duration)>,
    replace: Option<Arc<Vec<u8>>>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Arc<Vec<u8>>>,
    root: Option<PathBuf>,
    faults: HashMap<String, Faults>,
    ranges: bool,
    /// Whether answers carry an `ETag` (a validator a resume can name in `If-Range`).
    no_validators: bool,
    /// Path → `Location` answered with 302.
    redirects: HashMap<String, String>,
    log: Vec<Logged>,
}

/// A running loopback mirror. Dropping it stops the server.
pub struct Mirror {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Mirror {
    /// Serve the files under `root`: `GET /a/b` reads `root/a/b`.
    pub fn dir(root: &Path) -> Mirror {
        Mirror::start(State {
            root: Some(root.to_path_buf()),
            ranges: true,
            ..State::default()
        })
    }

    /// Serve in-memory files, keyed by request path (`"/name"`).
    pub fn files<P: Into<String>>(files: impl IntoIterator<Item = (P, Vec<u8>)>) -> Mirror {
        Mirror::start(State {
            files: files
                .into_iter()
                .map(|(p, b)| (p.into(), Arc::new(b)))
                .collect(),
            ranges: true,
            ..State::default()
        })
    }

    fn start(state: State) -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("loopback address");
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || {
                        let _ = serve(stream, &state);
                    });
                }
            })
        };
        Mirror {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The URL of `path` on this mirror (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The mirror's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next `times` requests for `path` answer `status` with an empty body.
    pub fn fail_next(&self, path: &str, times: u32, status: u16) {
        self.lock().faults.entry(path.to_string()).or_default().fail = Some((times, status));
    }

    /// The next `times` requests for `path` announce the full length but send only `bytes` of
    /// the body, then close the connection.
    pub fn drop_after(&self, path: &str, bytes: u64, times: u32) {
        self.lock()
            .faults
            .entry(path.to_string())
            .or_default()
            .drop_after = Some((times, bytes));
    }

    /// The next `times` requests for `path` send `bytes` of the body, then go silent for `pause`
    /// (to trip the client's read timeout), then close the connection.
    pub fn stall_after(&self, path: &str, bytes: u64, times: u32, pause: Duration) {
        self.lock()
            .faults
            .entry(path.to_string())
            .or_default()
            .stall = Some((times, bytes, pause));
    }

    /// From now on serve `bytes` for `path` instead of its real content.
    pub fn serve_instead(&self, path: &str, bytes: Vec<u8>) {
        self.lock()
            .faults
            .entry(path.to_string())
            .or_default()
            .replace = Some(Arc::new(bytes));
    }

    /// Whether `Range` requests are honoured (default) or answered with the full body (200).
    pub fn set_ranges(&self, enabled: bool) {
        self.lock().ranges = enabled;
    }

    /// Answer without `ETag`, so a client has no validator to resume with.
    pub fn set_validators(&self, enabled: bool) {
        self.lock().no_validators = !enabled;
    }

    /// Answer GETs of `path` with `302 Found` and `Location: location`.
    pub fn redirect(&self, path: &str, location: &str) {
        self.lock()
            .redirects
            .insert(path.to_string(), location.to_string());
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// How many requests for `path` were answered.
    pub fn hits(&self, path: &str) -> usize {
        self.lock().log.iter().filter(|l| l.path == path).count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Body {
    Memory(Arc<Vec<u8>>),
    Disk(File, u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Memory(b) => b.len() as u64,
            Body::Disk(_, len) => *len,
        }
    }

    /// A strong validator of the content (changes whenever the bytes do).
    fn etag(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match self {
            Body::Memory(b) => b.hash(&mut h),
            Body::Disk(_, len) => len.hash(&mut h),
        }
        format!("\"{:016x}\"", h.finish())
    }

    fn reader(self, start: u64) -> io::Result<Box<dyn Read>> {
        Ok(match self {
            Body::Memory(b) => {
                let mut c = io::Cursor::new(b.as_ref().clone());
                c.set_position(start);
                Box::new(c)
            }
            Body::Disk(mut f, _) => {
                f.seek(SeekFrom::Start(start))?;
                Box::new(f)
            }
        })
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let mut range = None;
    let mut if_range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            } else if name.trim().eq_ignore_ascii_case("if-range") {
                if_range = Some(value.trim().to_string());
            }
        }
    }
    let path = target.split('?').next().unwrap_or("/").to_string();
    let mut out = stream;

    // Decide the answer while holding the lock, then stream without it.
    let (status, body, drop_after, ranges, validators) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(location) = st.redirects.get(&path).cloned() {
            drop(st);
            log(state, &path, &range, &if_range, 302);
            write!(
                out,
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
        let ranges = st.ranges;
        let validators = !st.no_validators;
        let faults = st.faults.entry(path.clone()).or_default();
        let mut status = 200;
        let mut drop_after = None;
        if let Some((n, code)) = faults.fail
            && n > 0
        {
            faults.fail = Some((n - 1, code));
            status = code;
        }
        if status == 200
            && let Some((n, bytes)) = faults.drop_after
            && n > 0
        {
            faults.drop_after = Some((n - 1, bytes));
            drop_after = Some((bytes, Duration::ZERO));
        }
        if status == 200
            && drop_after.is_none()
            && let Some((n, bytes, pause)) = faults.stall
            && n > 0
        {
            faults.stall = Some((n - 1, bytes, pause));
            drop_after = Some((bytes, pause));
        }
        let replace = faults.replace.clone();
        let body = if method != "GET" {
            status = 405;
            None
        } else if let Some(bytes) = replace {
            Some(Body::Memory(bytes))
        } else if let Some(bytes) = st.files.get(&path) {
            Some(Body::Memory(Arc::clone(bytes)))
        } else {
            st.root.as_deref().and_then(|r| open_under(r, &path))
        };
        (status, body, drop_after, ranges, validators)
    };

    let Some(body) = body.filter(|_| status == 200) else {
        let status = if status == 200 { 404 } else { status };
        log(state, &path, &range, &if_range, status);
        write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    };
    let len = body.len();
    let etag = body.etag();
    // `If-Range` naming another version: the whole new body (RFC 9110, 13.1.5).
    let range_applies = ranges && if_range.as_ref().is_none_or(|v| *v == etag);
    let start = match range
        .as_deref()
        .filter(|_| range_applies)
        .map(|r| parse_range(r, len))
    {
        None => None,
        Some(Some(start)) => Some(start),
        Some(None) => {
            log(state, &path, &range, &if_range, 416);
            write!(
                out,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
    };
    let (status, from) = match start {
        Some(from) => (206, from),
        None => (200, 0),
    };
    log(state, &path, &range, &if_range, status);
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        len - from
    );
    if validators {
        head.push_str(&format!("ETag: {etag}\r\n"));
    }
    if status == 206 {
        head.push_str(&format!(
            "Content-Range: bytes {from}-{}/{len}\r\n",
            len - 1
        ));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    let reader = body.reader(from)?;
    match drop_after {
        Some((bytes, pause)) => {
            io::copy(&mut reader.take(bytes), &mut out)?;
            out.flush()?;
            std::thread::sleep(pause);
            out.shutdown(Shutdown::Both)?;
        }
        None => {
            io::copy(&mut reader.take(len - from), &mut out)?;
            out.flush()?;
        }
    }
    Ok(())
}

/// `bytes=N-` or `bytes=N-M` (the end is ignored: the rest is sent) → N, if N < len.
fn parse_range(header: &str, len: u64) -> Option<u64> {
    let spec = header.strip_prefix("bytes=")?;
    let (start, _end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    (start < len).then_some(start)
}

fn open_under(root: &Path, path: &str) -> Option<Body> {
    let rel = Path::new(path.trim_start_matches('/'));
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return None;
    }
    let file = File::open(root.join(rel)).ok()?;
    let meta = file.metadata().ok()?;
    meta.is_file().then(|| Body::Disk(file, meta.len()))
}

fn log(
    state: &Mutex<State>,
    path: &str,
    range: &Option<String>,
    if_range: &Option<String>,
    status: u16,
) {
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .log
        .push(Logged {
            path: path.to_string(),
            range: range.clone(),
            if_range: if_range.clone(),
            status,
        });
}
