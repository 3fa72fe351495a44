//! A plain HTTP/1.1 client over a real TCP connection, and starting
//! `tally demo` / `tally serve` as child processes, for the web tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Spawned;

/// One answer: status, headers (lower-case names), body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn head(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    request
}

/// Sends one request and reads the whole answer.
pub fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(head(method, addr, path, headers, body).as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (top, rest) = text.split_once("\r\n\r\n").expect("a header block");
    let mut lines = top.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

pub fn get(addr: SocketAddr, path: &str) -> Answer {
    request("GET", addr, path, &[], "")
}

/// A JSON write as the page sends it.
pub fn send_json(method: &str, addr: SocketAddr, path: &str, body: &str) -> Answer {
    request(
        method,
        addr,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
}

/// An open `GET /api/stream`, read event by event.
pub struct EventStream {
    reader: BufReader<TcpStream>,
}

impl EventStream {
    pub fn open(addr: SocketAddr, headers: &[(&str, &str)]) -> EventStream {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
            .write_all(head("GET", addr, "/api/stream", headers, "").as_bytes())
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
        }
        EventStream { reader }
    }

    /// Reads until an event whose data satisfies `wanted`, or fails after
    /// `limit`. (Chunk-size lines of the chunked body are skipped: they
    /// are neither `event:` nor `data:` lines.)
    pub fn wait_for(
        &mut self,
        event: &str,
        limit: Duration,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        let mut current_event = String::new();
        let mut seen = Vec::new();
        while started.elapsed() < limit {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap() == 0 {
                panic!("stream ended; saw {seen:?}");
            }
            let line = line.trim_end();
            if std::env::var_os("SSE_DEBUG").is_some() {
                eprintln!("sse: {line:?}");
            }
            if let Some(name) = line.strip_prefix("event:") {
                current_event = name.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:")
                && current_event == event
            {
                let value: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
                if wanted(&value) {
                    return value;
                }
                seen.push(value);
            }
        }
        panic!("no matching {event:?} event in {limit:?}; saw {seen:?}");
    }
}

/// A `tally` child process serving HTTP, and its address.
pub struct Server {
    pub child: Spawned,
    pub addr: SocketAddr,
    /// Wall time from spawn until the page answered.
    pub ready_after: Duration,
}

/// Starts `tally ARGS` and waits until it prints its `http://` address
/// and `GET /` answers.
pub fn start_server(args: &[&str]) -> Server {
    let started = Instant::now();
    let mut child = Spawned(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (found, address) = std::sync::mpsc::channel();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(at) = line.find("http://") {
                let addr = line[at + 7..].trim_end_matches('/').to_string();
                let _ = found.send(addr);
                sent = true;
            }
        }
    });
    let addr: SocketAddr = address
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("tally {args:?} printed no address in 60 s"))
        .parse()
        .unwrap();
    loop {
        // Any answer will do: with a token, `/` is 401 without it.
        if std::panic::catch_unwind(|| get(addr, "/healthz")).is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no answer from {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        addr,
        ready_after: started.elapsed(),
    }
}

/// Polls `GET path` until `wanted` holds for its JSON (the pipeline is
/// asynchronous), or fails after `limit`.
pub fn wait_for_json(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let answer = get(addr, path);
        let value = answer.json();
        if answer.status == 200 && wanted(&value) {
            return value;
        }
        assert!(started.elapsed() < limit, "{path} never matched: {value}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
