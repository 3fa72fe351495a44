//! A private, throwaway NATS server with JetStream for tests and benchmarks.
//!
//! [`NatsServer::start`] runs `nats-server -js` on a free loopback port, with
//! its JetStream file storage in a fresh temporary directory, so a test can
//! stop, restart, kill and pause the server without touching anything else
//! on the machine. Everything is blocking (`std::process`), like
//! [`crate::pgcluster`], whose process plumbing it shares: the server is a
//! child of this process (never daemonized, so this process reaps it), it
//! gets `PR_SET_PDEATHSIG(SIGKILL)` so that it dies with this process, and
//! its ports are reserved against the clusters of this process.
//!
//! # Binary
//!
//! `nats-server` is looked up in, first to last: the path named by
//! `TALLY_NATS_SERVER` (when set, nothing else is tried); `PATH`;
//! `/usr/sbin` (where Debian's `nats-server` package puts it, often not on a
//! normal user's `PATH`); `/usr/local/bin`.
//!
//! # Readiness
//!
//! The server is ready when its client port greets with `INFO` *and* its
//! monitoring endpoint `/jsz` reports JetStream enabled with our storage
//! directory. The client port alone is not enough to tell that JetStream is
//! on, and `/jsz` alone is not enough either: the monitor listens before
//! JetStream has restored its streams and before the client port opens, and
//! it answers `200` even when JetStream is disabled (`"disabled": true`).
//! Checking the storage directory also makes sure that a process squatting
//! one of our ports is not mistaken for our server.
//!
//! # Layout
//!
//! `ROOT/` holds `store/` (`-sd`, the JetStream storage, kept across
//! restarts), `server.log` (the server's stdout and stderr, appended to
//! across restarts) and a marker naming the owning process, so that the
//! directories of processes that died without cleaning up are removed by
//! the next process that starts a server.
//!
//! # Signals
//!
//! `nats-server` shuts down gracefully on SIGTERM as on SIGINT, but exits
//! with status 1 on SIGTERM (0 on SIGINT); [`NatsServer::stop`] therefore
//! does not read anything into the exit status. A stopped (SIGSTOP) server
//! still completes TCP handshakes (the kernel's backlog does that) but sends
//! no `INFO` greeting, which is what a hung server looks like to a client.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use thiserror::Error;

use crate::pgcluster::{
    find_in_path, is_executable, log_tail, pick_port, process_running, release_port, send_signal,
    spawn_tied, wait_child,
};

/// Environment variable naming the `nats-server` binary to use.
pub const BINARY_ENV: &str = "TALLY_NATS_SERVER";

const BINARY_NAME: &str = "nats-server";
/// Where the binary may be when it is not on `PATH`.
const FALLBACK_DIRS: [&str; 2] = ["/usr/sbin", "/usr/local/bin"];
const DIR_PREFIX: &str = "tally-nats-";
const OWNER_FILE: &str = "tally-owner.pid";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: u32 = 5;
/// Connect and read timeout of one readiness probe or monitoring request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong starting, using or stopping a NATS server.
#[derive(Debug, Error)]
pub enum NatsServerError {
    #[error(
        "the NATS server binary `{BINARY_NAME}` was not found; searched {searched}. \
         Install Debian's `nats-server` package (apt-get install -y nats-server), \
         or set {BINARY_ENV} to the binary's path"
    )]
    BinaryNotFound { searched: String },
    #[error(
        "{} failed to start: {reason}\n--- last lines of {} ---\n{log_tail}",
        binary.display(),
        log.display()
    )]
    Start {
        binary: PathBuf,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("nats-server did not stop cleanly: {reason}")]
    Stop { reason: String },
    #[error("the NATS server is not running")]
    NotRunning,
    #[error("GET {url}: {reason}")]
    Monitor { url: String, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> NatsServerError {
    let context = context.into();
    move |source| NatsServerError::Io { context, source }
}

/// A private `nats-server -js` in a temporary directory, on its own ports.
///
/// Dropping it kills the server and removes the directory.
#[derive(Debug)]
pub struct NatsServer {
    /// Removes the directory when dropped.
    _dir: TempDir,
    root: PathBuf,
    store: PathBuf,
    log: PathBuf,
    binary: PathBuf,
    port: u16,
    monitor_port: u16,
    child: Option<Child>,
    paused: bool,
}

impl NatsServer {
    /// Starts a server on free ports. Blocks until it accepts clients and
    /// JetStream is ready.
    pub fn start() -> Result<NatsServer, NatsServerError> {
        let began = Instant::now();
        let binary = find_binary()?;
        let parent = std::env::temp_dir();
        static STALE_SWEEP: Once = Once::new();
        STALE_SWEEP.call_once(|| remove_stale_dirs(&parent));
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(&parent)
            .map_err(io_err(format!(
                "creating a temporary directory in {}",
                parent.display()
            )))?;
        let root = dir.path().to_path_buf();
        let marker = root.join(OWNER_FILE);
        fs::write(&marker, std::process::id().to_string())
            .map_err(io_err(format!("writing {}", marker.display())))?;
        // From here on, Drop cleans up whatever fails.
        let mut server = NatsServer {
            _dir: dir,
            store: root.join("store"),
            log: root.join("server.log"),
            root,
            binary,
            port: 0,
            monitor_port: 0,
            child: None,
            paused: false,
        };
        server.start_server(true)?;
        tracing::info!(
            port = server.port,
            monitor_port = server.monitor_port,
            dir = %server.root.display(),
            ms = began.elapsed().as_millis() as u64,
            "started private NATS server"
        );
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`, what a client connects to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port on 127.0.0.1. Stays the same across
    /// [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port on 127.0.0.1 (`/varz`, `/jsz`, ...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The body of a monitoring endpoint, e.g. `/jsz?streams=true&consumers=true`
    /// to see what JetStream holds; an error unless it answers `200`.
    pub fn monitor_get(&self, path: &str) -> Result<String, NatsServerError> {
        let url = format!("http://127.0.0.1:{}{path}", self.monitor_port);
        if self.child.is_none() {
            return Err(NatsServerError::NotRunning);
        }
        match http_get(self.monitor_port, path) {
            Ok((200, body)) => Ok(body),
            Ok((status, body)) => Err(NatsServerError::Monitor {
                url,
                reason: format!("status {status}: {}", body.trim()),
            }),
            Err(error) => Err(NatsServerError::Monitor {
                url,
                reason: error.to_string(),
            }),
        }
    }

    /// Stops the server gracefully (SIGTERM, as an operator would) and waits
    /// until it has exited; SIGKILL and an error if it takes longer than
    /// 30 s. A paused server is resumed first, or it could not act on the
    /// signal. Does nothing when it is not running.
    pub fn stop(&mut self) -> Result<(), NatsServerError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(()); // It had died already.
        }
        send_signal(child.id(), libc::SIGTERM);
        if std::mem::take(&mut self.paused) {
            send_signal(child.id(), libc::SIGCONT);
        }
        if wait_child(&mut child, STOP_TIMEOUT) {
            return Ok(());
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(NatsServerError::Stop {
            reason: format!(
                "still running {} s after SIGTERM; killed it",
                STOP_TIMEOUT.as_secs()
            ),
        })
    }

    /// Stops the server if it runs, then starts it again on the same ports
    /// with the same JetStream storage, so streams, consumers and messages
    /// stay. After [`kill`](Self::kill) the server recovers its storage.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.stop()?;
        self.start_server(false)
    }

    /// Crash simulation: SIGKILLs the server and waits until it is gone.
    /// Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL, which also ends a paused process.
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is
    /// answered, as when a server hangs or its machine stalls. Returns once
    /// every thread of the server has stopped: the kernel delivers SIGSTOP
    /// asynchronously, and a connection made right after the signal was
    /// seen to get its greeting.
    pub fn pause(&mut self) -> Result<(), NatsServerError> {
        let pid = self.pid().ok_or(NatsServerError::NotRunning)?;
        send_signal(pid, libc::SIGSTOP);
        self.paused = true;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            if Instant::now() >= deadline {
                return Err(NatsServerError::Io {
                    context: format!("pausing nats-server (pid {pid})"),
                    source: io::Error::other("its threads did not stop within 5 s of SIGSTOP"),
                });
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Lets a [`pause`](Self::pause)d server go on (SIGCONT).
    pub fn resume(&mut self) -> Result<(), NatsServerError> {
        let pid = self.pid().ok_or(NatsServerError::NotRunning)?;
        send_signal(pid, libc::SIGCONT);
        self.paused = false;
        Ok(())
    }

    /// Starts the server and waits until it is ready. Retries when a port is
    /// taken, picking other ports if `may_change_ports`, else waiting a
    /// little for it to come free.
    fn start_server(&mut self, may_change_ports: bool) -> Result<(), NatsServerError> {
        let mut last_error = None;
        for attempt in 0..START_ATTEMPTS {
            if self.port == 0 || (attempt > 0 && may_change_ports) {
                self.pick_ports()?;
            } else if attempt > 0 {
                thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
            }
            match self.start_once() {
                Ok(()) => return Ok(()),
                Err(Failure::Retry(error)) => {
                    tracing::debug!(attempt, %error, "nats-server start failed; retrying");
                    last_error = Some(error);
                }
                Err(Failure::Fatal(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or(NatsServerError::NotRunning))
    }

    fn pick_ports(&mut self) -> Result<(), NatsServerError> {
        let pick = || {
            pick_port().map_err(|error| NatsServerError::Io {
                context: "picking a free port".into(),
                source: io::Error::other(error.to_string()),
            })
        };
        let port = pick()?;
        release_port(std::mem::replace(&mut self.port, port));
        let monitor_port = pick()?;
        release_port(std::mem::replace(&mut self.monitor_port, monitor_port));
        Ok(())
    }

    fn start_once(&mut self) -> Result<(), Failure> {
        let log_offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        let log_too = log
            .try_clone()
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        let mut command = Command::new(&self.binary);
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(&self.store)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            // A terminal's Ctrl-C reaches only this process, which can then
            // stop the server in order.
            .process_group(0);
        let mut child =
            spawn_tied(command).map_err(io_err(format!("running {}", self.binary.display())))?;

        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(2);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let tail = log_tail(&self.log, log_offset);
                    let error = self.start_error(format!("it exited ({status})"), &tail);
                    return Err(if tail.contains("address already in use") {
                        Failure::Retry(error)
                    } else {
                        Failure::Fatal(error)
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io_err("waiting for nats-server")(e).into());
                }
            }
            let not_ready = match self.probe(&mut child) {
                Ok(()) => {
                    self.child = Some(child);
                    self.paused = false;
                    return Ok(());
                }
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let tail = log_tail(&self.log, log_offset);
                let reason = format!("not ready after {} s: {not_ready}", START_TIMEOUT.as_secs());
                return Err(Failure::Fatal(self.start_error(reason, &tail)));
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Ok when the client port greets with `INFO` and `/jsz` reports
    /// JetStream on, with our storage; else why not. Gives up waiting for
    /// the greeting as soon as `child` exits: a process squatting the port
    /// may accept connections and never greet.
    fn probe(&self, child: &mut Child) -> Result<(), String> {
        let mut exited = || !matches!(child.try_wait(), Ok(None));
        let greeting = read_greeting(self.port, &mut exited)
            .map_err(|e| format!("client port {}: {e}", self.port))?;
        if !greeting.starts_with("INFO ") {
            return Err(format!(
                "client port {} greeted with {greeting:?}, not INFO",
                self.port
            ));
        }
        let (status, body) = http_get(self.monitor_port, "/jsz")
            .map_err(|e| format!("GET /jsz on port {}: {e}", self.monitor_port))?;
        if status != 200 {
            return Err(format!("GET /jsz answered {status}"));
        }
        let jsz: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("GET /jsz: {e}: {body}"))?;
        if jsz["disabled"] == serde_json::Value::Bool(true) {
            return Err("GET /jsz says JetStream is disabled".into());
        }
        let store = jsz["config"]["store_dir"].as_str().unwrap_or_default();
        if !Path::new(store).starts_with(&self.store) {
            return Err(format!(
                "GET /jsz reports storage {store:?}, not under {}",
                self.store.display()
            ));
        }
        Ok(())
    }

    fn start_error(&self, reason: String, log_tail: &str) -> NatsServerError {
        NatsServerError::Start {
            binary: self.binary.clone(),
            reason: format!(
                "{reason} (port {}, monitor port {}, storage {})",
                self.port,
                self.monitor_port,
                self.store.display()
            ),
            log: self.log.clone(),
            log_tail: log_tail.to_string(),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        release_port(self.port);
        release_port(self.monitor_port);
        // `_dir` (a TempDir) removes the directory, ignoring errors.
    }
}

enum Failure {
    Retry(NatsServerError),
    Fatal(NatsServerError),
}

impl From<NatsServerError> for Failure {
    fn from(error: NatsServerError) -> Self {
        Failure::Fatal(error)
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in
/// `/proc/PID/task/TID/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // "tid (comm) state ...", where comm may hold spaces and parentheses.
            stat.rfind(')')
                .and_then(|end| stat[end + 1..].split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}

/// The first line a NATS server sends on a new connection (`INFO {...}`),
/// waited for up to [`PROBE_TIMEOUT`] or until `give_up` says so.
fn read_greeting(port: u16, give_up: &mut dyn FnMut() -> bool) -> io::Result<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_millis(20)))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut line = Vec::new();
    let mut buffer = [0u8; 4096];
    while !line.ends_with(b"\r\n") && line.len() < 64 * 1024 {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => line.extend_from_slice(&buffer[..read]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if give_up() || Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no greeting"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

/// A plain HTTP/1.0 GET on 127.0.0.1 (the server closes the connection after
/// the response): the status code and the body.
fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no HTTP status in {head:?}")))?;
    Ok((status, body.to_string()))
}

/// Removes `tally-nats-*` directories whose owning process is gone: leftovers
/// of processes that were killed (their server died with them).
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = entry.file_name().to_string_lossy().starts_with(DIR_PREFIX)
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_ours {
            continue;
        }
        let owner = fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok());
        let Some(owner) = owner else {
            continue; // Being set up, or not ours.
        };
        if !process_running(owner) {
            tracing::debug!(dir = %path.display(), owner, "removing stale NATS server directory");
            let _ = fs::remove_dir_all(&path);
        }
    }
}

fn find_binary() -> Result<PathBuf, NatsServerError> {
    let fallbacks: Vec<PathBuf> = FALLBACK_DIRS.iter().map(PathBuf::from).collect();
    find_binary_in(
        std::env::var_os(BINARY_ENV),
        std::env::var_os("PATH"),
        &fallbacks,
    )
}

fn find_binary_in(
    binary_override: Option<std::ffi::OsString>,
    path_var: Option<std::ffi::OsString>,
    fallback_dirs: &[PathBuf],
) -> Result<PathBuf, NatsServerError> {
    if let Some(binary) = binary_override.filter(|b| !b.is_empty()) {
        let binary = PathBuf::from(binary);
        return if is_executable(&binary) {
            Ok(binary)
        } else {
            Err(NatsServerError::BinaryNotFound {
                searched: format!("{BINARY_ENV}={}", binary.display()),
            })
        };
    }
    if let Some(found) = find_in_path(path_var.as_deref(), BINARY_NAME) {
        return Ok(found);
    }
    if let Some(found) = fallback_dirs
        .iter()
        .map(|dir| dir.join(BINARY_NAME))
        .find(|candidate| is_executable(candidate))
    {
        return Ok(found);
    }
    let mut searched = vec!["PATH".to_string()];
    searched.extend(fallback_dirs.iter().map(|dir| dir.display().to_string()));
    Err(NatsServerError::BinaryNotFound {
        searched: searched.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;

    fn started() -> NatsServer {
        let began = Instant::now();
        let server = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
        eprintln!(
            "natsserver: port {} ready in {} ms",
            server.port(),
            began.elapsed().as_millis()
        );
        server
    }

    /// Just enough of the NATS protocol to call the JetStream API and
    /// publish with acknowledgements: requests go out one at a time.
    struct Wire {
        writer: TcpStream,
        reader: BufReader<TcpStream>,
    }

    const INBOX: &str = "_INBOX.natsserver-test";

    impl Wire {
        fn connect(port: u16) -> Wire {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut wire = Wire {
                writer: stream.try_clone().unwrap(),
                reader: BufReader::new(stream),
            };
            assert!(wire.line().starts_with("INFO "));
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {INBOX} 1\r\nPING\r\n"
            );
            wire.writer.write_all(hello.as_bytes()).unwrap();
            loop {
                let line = wire.line();
                if line == "PONG" {
                    return wire;
                }
                assert!(!line.starts_with("-ERR"), "{line}");
            }
        }

        fn line(&mut self) -> String {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "the server closed the connection");
            line.trim_end().to_string()
        }

        /// Publishes `payload` with our inbox as reply subject and returns
        /// the reply's payload.
        fn request(&mut self, subject: &str, payload: &str) -> String {
            let message = format!("PUB {subject} {INBOX} {}\r\n{payload}\r\n", payload.len());
            self.writer.write_all(message.as_bytes()).unwrap();
            loop {
                let line = self.line();
                if line == "PING" {
                    self.writer.write_all(b"PONG\r\n").unwrap();
                } else if let Some(header) = line.strip_prefix("MSG ") {
                    let size: usize = header.rsplit(' ').next().unwrap().parse().unwrap();
                    let mut body = vec![0; size + 2];
                    self.reader.read_exact(&mut body).unwrap();
                    body.truncate(size);
                    return String::from_utf8(body).unwrap();
                } else {
                    assert!(!line.starts_with("-ERR"), "{line}");
                }
            }
        }

        fn create_stream(&mut self) {
            let reply = self.request(
                "$JS.API.STREAM.CREATE.T",
                r#"{"name":"T","subjects":["t.>"],"storage":"file"}"#,
            );
            assert!(reply.contains("stream_create_response"), "{reply}");
            assert!(!reply.contains("\"error\""), "{reply}");
        }

        /// Publishes to stream `T` and waits for JetStream's acknowledgement.
        fn publish(&mut self, count: usize) {
            for i in 0..count {
                let ack = self.request("t.x", &format!("message {i}"));
                assert!(ack.contains("\"stream\":\"T\""), "{ack}");
            }
        }
    }

    /// Streams and messages JetStream holds, from `/jsz`.
    fn jetstream_totals(server: &NatsServer) -> (u64, u64) {
        let body = server.monitor_get("/jsz").unwrap();
        let jsz: serde_json::Value = serde_json::from_str(&body).unwrap();
        (
            jsz["streams"].as_u64().unwrap(),
            jsz["messages"].as_u64().unwrap(),
        )
    }

    fn answers(port: u16) -> bool {
        read_greeting(port, &mut || false).is_ok_and(|greeting| greeting.starts_with("INFO "))
    }

    #[test]
    fn starts_with_jetstream_and_restarts_on_the_same_port() {
        let mut server = started();
        let port = server.port();
        assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
        assert_ne!(server.monitor_port(), port);
        let greeting = read_greeting(port, &mut || false).unwrap();
        assert!(greeting.contains("\"jetstream\":true"), "{greeting}");
        let mut wire = Wire::connect(port);
        wire.create_stream();
        wire.publish(10);
        drop(wire);
        assert_eq!(jetstream_totals(&server), (1, 10));

        let began = Instant::now();
        server.restart().unwrap();
        eprintln!(
            "natsserver: restart took {} ms",
            began.elapsed().as_millis()
        );
        assert_eq!(server.port(), port);
        assert!(answers(port));
        assert_eq!(jetstream_totals(&server), (1, 10), "storage kept");
        Wire::connect(port).publish(1);
        assert_eq!(jetstream_totals(&server), (1, 11));

        // stop is idempotent, and restart also starts a stopped server.
        let pid = server.pid().unwrap();
        server.stop().unwrap();
        server.stop().unwrap();
        assert!(!process_running(pid));
        assert!(!answers(port));
        assert!(matches!(
            server.monitor_get("/jsz"),
            Err(NatsServerError::NotRunning)
        ));
        server.restart().unwrap();
        assert_eq!(server.port(), port);
        assert_eq!(jetstream_totals(&server), (1, 11));
    }

    #[test]
    fn kill_then_restart_keeps_acknowledged_messages() {
        let mut server = started();
        let mut wire = Wire::connect(server.port());
        wire.create_stream();
        wire.publish(500);
        let pid = server.pid().unwrap();
        server.kill();
        server.kill(); // Nothing to kill: no-op.
        assert!(!process_running(pid));
        assert!(!answers(server.port()));

        let began = Instant::now();
        server.restart().unwrap();
        eprintln!(
            "natsserver: restart after kill took {} ms",
            began.elapsed().as_millis()
        );
        assert_eq!(jetstream_totals(&server), (1, 500));
    }

    #[test]
    fn pause_and_resume() {
        let mut server = started();
        let port = server.port();
        server.pause().unwrap();
        // The kernel still accepts the connection; the server says nothing.
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let error = (&stream).read(&mut byte).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{error}"
        );
        server.resume().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!((&stream).read(&mut byte).unwrap(), 1);
        assert_eq!(&byte, b"I", "the INFO greeting arrives after resume");
        assert!(answers(port));

        // A paused server still stops (it is resumed to act on SIGTERM).
        server.pause().unwrap();
        let began = Instant::now();
        server.stop().unwrap();
        assert!(began.elapsed() < Duration::from_secs(5));
        assert!(matches!(server.pause(), Err(NatsServerError::NotRunning)));
        assert!(matches!(server.resume(), Err(NatsServerError::NotRunning)));
    }

    #[test]
    fn servers_run_side_by_side_and_drop_cleans_up() {
        let (a, b) = thread::scope(|s| {
            let a = s.spawn(started);
            let b = s.spawn(started);
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_ne!(a.port(), b.port());
        assert!(answers(a.port()) && answers(b.port()));
        let (root, pid, port) = (a.root.clone(), a.pid().unwrap(), a.port());
        assert!(root.join("store/jetstream").is_dir());
        drop(a);
        assert!(!root.exists(), "{} still exists", root.display());
        assert!(!process_running(pid));
        assert!(!answers(port));
        assert!(answers(b.port()));
    }

    #[test]
    fn a_taken_port_fails_restart_with_the_log_tail() {
        let mut server = started();
        server.stop().unwrap();
        let old_port = server.port();
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, old_port)).unwrap();

        // restart keeps its port, so it retries, then reports the log.
        let error = server.restart().unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, NatsServerError::Start { .. }), "{text}");
        assert!(text.contains("address already in use"), "{text}");
        assert!(text.contains("nats-server"), "{text}");

        // A first start moves on to other ports.
        server.start_server(true).unwrap();
        assert_ne!(server.port(), old_port);
        assert!(answers(server.port()));
        drop(squatter);
    }

    #[test]
    fn binary_lookup_order_and_error() {
        let empty = tempfile::tempdir().unwrap();
        let missing = empty.path().join("nats-server");
        let error = find_binary_in(Some(missing.clone().into()), None, &[]).unwrap_err();
        let text = error.to_string();
        assert!(text.contains(BINARY_ENV), "{text}");
        assert!(text.contains("apt-get install -y nats-server"), "{text}");

        let error = find_binary_in(
            None,
            Some(std::ffi::OsString::new()),
            &[empty.path().to_path_buf()],
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, NatsServerError::BinaryNotFound { .. }));
        assert!(text.contains("apt-get install -y nats-server"), "{text}");
        assert!(text.contains(&empty.path().display().to_string()), "{text}");

        // PATH first, then the fallback directories; the override alone.
        let on_path = empty.path().join("bin");
        let fallbacks = [empty.path().join("sbin")];
        for dir in [&on_path, &fallbacks[0]] {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join(BINARY_NAME), "").unwrap();
            fs::set_permissions(dir.join(BINARY_NAME), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let found =
            find_binary_in(None, Some(on_path.clone().into_os_string()), &fallbacks).unwrap();
        assert_eq!(found, on_path.join(BINARY_NAME));
        let found = find_binary_in(None, None, &fallbacks).unwrap();
        assert_eq!(found, fallbacks[0].join(BINARY_NAME));
        let found = find_binary_in(Some(missing.into()), None, &fallbacks).unwrap_err();
        assert!(matches!(found, NatsServerError::BinaryNotFound { .. }));
    }
}
