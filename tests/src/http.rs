//! A small HTTP/1.1 file server on loopback for the image-pull tests: serves bodies by
//! path, honours `Range: bytes=N-` (206, or 416 past the end), and can misbehave on
//! purpose: cut a response short, stall in the middle of one, or redirect. Every request's path
//! and range is recorded.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a path is served.
#[derive(Clone, Debug)]
pub enum Mode {
    Whole,
    /// The first `times` responses send only `bytes` bytes of what they promise, then close.
    CutAfter {
        bytes: usize,
        times: usize,
    },
    /// The first `times` responses stop after `bytes` bytes for `pause`, then close.
    StallAfter {
        bytes: usize,
        pause: Duration,
        times: usize,
    },
    /// 302 to this location.
    Redirect(String),
}

#[derive(Clone, Debug)]
struct Route {
    body: Vec<u8>,
    mode: Mode,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    /// (path, range start) of every request.
    requests: Vec<(String, Option<u64>)>,
}

pub struct HttpServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl HttpServer {
    /// Listens on 127.0.0.1 (an ephemeral port), serving until the test process ends.
    pub fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = Arc::clone(&shared);
                std::thread::spawn(move || serve(conn, &state));
            }
        });
        HttpServer { addr, state }
    }

    /// `http://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, path: &str, body: Vec<u8>, mode: Mode) {
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(path.to_owned(), Route { body, mode });
    }

    /// The (path, range start) of each request so far.
    pub fn requests(&self) -> Vec<(String, Option<u64>)> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse::<u64>().ok();
        }
    }
    let route = {
        let mut s = state.lock().unwrap();
        s.requests.push((path.clone(), range));
        let route = s.routes.get(&path).cloned();
        // Count down a misbehaviour.
        if let Some(r) = s.routes.get_mut(&path) {
            match &mut r.mode {
                Mode::CutAfter { times, .. } | Mode::StallAfter { times, .. } if *times > 0 => {
                    *times -= 1
                }
                _ => {}
            }
        }
        route
    };
    let mut out = conn;
    let Some(route) = route else {
        let _ = out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    if let Mode::Redirect(to) = &route.mode {
        let _ = write!(
            out,
            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let len = route.body.len() as u64;
    let from = range.unwrap_or(0);
    if from >= len && range.is_some() {
        let _ = write!(
            out,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let head = if range.is_some() {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            len - 1,
            len - from
        )
    } else {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let body = &route.body[from as usize..];
    // Where this response stops early (relative to the whole body), if it does.
    let (stop, pause) = match route.mode {
        Mode::CutAfter { bytes, times } if times > 0 => (Some(bytes), None),
        Mode::StallAfter {
            bytes,
            pause,
            times,
        } if times > 0 => (Some(bytes), Some(pause)),
        _ => (None, None),
    };
    match stop {
        Some(n) if n < body.len() => {
            let _ = out.write_all(&body[..n]);
            let _ = out.flush();
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        }
        _ => {
            let _ = out.write_all(body);
        }
    }
}
