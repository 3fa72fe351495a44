//! A small client for Postgres's streaming replication protocol: the
//! startup handshake with `replication=database`, authentication (trust,
//! cleartext, MD5, SCRAM-SHA-256), simple queries such as
//! `CREATE_REPLICATION_SLOT`, and the CopyBoth stream of `START_REPLICATION`
//! (XLogData, keepalives, standby status updates).
//!
//! tokio-postgres does not speak this sub-protocol, so this module frames
//! the messages itself; it uses `postgres-protocol` (tokio-postgres's own
//! codec crate) to encode frontend messages and for SCRAM.

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use thiserror::Error;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};

use crate::config::redact_url;

#[derive(Debug, Error)]
pub enum ReplicationError {
    #[error("invalid source URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the source closed the replication connection")]
    Closed,
    #[error("source server: {message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("replication connection I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl ReplicationError {
    /// The SQLSTATE the server sent, if this is a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Microseconds between the Unix epoch and Postgres's epoch (2000-01-01).
const POSTGRES_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Now, in microseconds since 2000-01-01, as the protocol counts time.
pub fn postgres_now_us() -> i64 {
    let unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix_us - POSTGRES_EPOCH_OFFSET_US
}

/// Converts a protocol timestamp to Unix milliseconds (Debezium's `ts_ms`).
pub fn postgres_us_to_unix_ms(us: i64) -> i64 {
    (us + POSTGRES_EPOCH_OFFSET_US) / 1000
}

/// One backend message: its tag and body.
struct BackendMessage {
    tag: u8,
    body: BytesMut,
}

/// A connection in replication mode, before streaming starts.
pub struct ReplicationConnection {
    reader: BufReader<ReadHalf<Box<dyn Stream>>>,
    writer: StatusWriter,
}

/// The sending side of a replication connection.
pub struct StatusWriter {
    writer: WriteHalf<Box<dyn Stream>>,
    buffer: BytesMut,
}

impl StatusWriter {
    async fn flush(&mut self) -> Result<(), ReplicationError> {
        let data = self.buffer.split();
        self.writer.write_all(&data).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Tells the server how far we have received and durably processed
    /// WAL. The slot's confirmed position moves to `flushed`: WAL before it
    /// may be removed, and a restart resumes from it.
    pub async fn send_status(
        &mut self,
        received: u64,
        flushed: u64,
        reply: bool,
    ) -> Result<(), ReplicationError> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(received);
        payload.put_u64(flushed);
        payload.put_u64(flushed);
        payload.put_i64(postgres_now_us());
        payload.put_u8(u8::from(reply));
        frontend::CopyData::new(payload.freeze())?.write(&mut self.buffer);
        self.flush().await
    }
}

/// A row of a simple query's result, as text.
pub type TextRow = Vec<Option<String>>;

impl ReplicationConnection {
    /// Connects to the database in `url` with `replication=database`.
    pub async fn connect(url: &str) -> Result<ReplicationConnection, ReplicationError> {
        let shown = redact_url(url);
        let config =
            tokio_postgres::Config::from_str(url).map_err(|err| ReplicationError::Url {
                url: shown.clone(),
                reason: err.to_string(),
            })?;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let host = config.get_hosts().first().cloned();
        let connect_error = |reason: String| ReplicationError::Connect {
            url: shown.clone(),
            reason,
        };
        let stream: Box<dyn Stream> = match host {
            Some(tokio_postgres::config::Host::Tcp(host)) => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            Some(tokio_postgres::config::Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                Box::new(
                    tokio::net::UnixStream::connect(&path)
                        .await
                        .map_err(|e| connect_error(format!("{}: {e}", path.display())))?,
                )
            }
            None => {
                let path = format!("/var/run/postgresql/.s.PGSQL.{port}");
                Box::new(
                    tokio::net::UnixStream::connect(&path)
                        .await
                        .map_err(|e| connect_error(format!("{path}: {e}")))?,
                )
            }
        };
        let user = config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        let (read_half, write_half) = tokio::io::split(stream);
        let mut connection = ReplicationConnection {
            reader: BufReader::with_capacity(1 << 16, read_half),
            writer: StatusWriter {
                writer: write_half,
                buffer: BytesMut::new(),
            },
        };
        let parameters = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", "tally-capture"),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(parameters.iter().copied(), &mut connection.writer.buffer)?;
        connection.flush().await?;
        connection
            .authenticate(config.get_password(), &user)
            .await
            .map_err(|err| match err {
                ReplicationError::Server { code, message } => {
                    connect_error(format!("{message} (SQLSTATE {code})"))
                }
                other => other,
            })?;
        Ok(connection)
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.writer.flush().await
    }

    async fn read_message(&mut self) -> Result<BackendMessage, ReplicationError> {
        read_backend_message(&mut self.reader).await
    }

    async fn authenticate(
        &mut self,
        password: Option<&[u8]>,
        user: &str,
    ) -> Result<(), ReplicationError> {
        let need_password = || {
            ReplicationError::Protocol(
                "the server asks for a password and the source URL has none".into(),
            )
        };
        loop {
            let mut message = self.read_message().await?;
            match message.tag {
                b'R' => {
                    let kind = take_i32(&mut message.body)?;
                    match kind {
                        0 => {} // AuthenticationOk
                        3 => {
                            let password = password.ok_or_else(need_password)?;
                            frontend::password_message(password, &mut self.writer.buffer)?;
                            self.flush().await?;
                        }
                        5 => {
                            let password = password.ok_or_else(need_password)?;
                            let mut salt = [0u8; 4];
                            if message.body.len() < 4 {
                                return Err(truncated());
                            }
                            message.body.copy_to_slice(&mut salt);
                            let hashed = md5_hash(user.as_bytes(), password, salt);
                            frontend::password_message(hashed.as_bytes(), &mut self.writer.buffer)?;
                            self.flush().await?;
                        }
                        10 => {
                            let password = password.ok_or_else(need_password)?;
                            let mechanisms = String::from_utf8_lossy(&message.body).to_string();
                            if !mechanisms.split('\0').any(|m| m == sasl::SCRAM_SHA_256) {
                                return Err(ReplicationError::Protocol(format!(
                                    "the server offers SASL mechanisms {mechanisms:?}; Tally supports SCRAM-SHA-256"
                                )));
                            }
                            let mut scram = sasl::ScramSha256::new(
                                password,
                                sasl::ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                scram.message(),
                                &mut self.writer.buffer,
                            )?;
                            self.flush().await?;
                            let mut reply = self.read_message().await?;
                            if reply.tag != b'R' || take_i32(&mut reply.body)? != 11 {
                                return Err(ReplicationError::Protocol(
                                    "expected SASL continue".into(),
                                ));
                            }
                            scram.update(&reply.body)?;
                            frontend::sasl_response(scram.message(), &mut self.writer.buffer)?;
                            self.flush().await?;
                            let mut last = self.read_message().await?;
                            if last.tag != b'R' || take_i32(&mut last.body)? != 12 {
                                return Err(ReplicationError::Protocol(
                                    "expected SASL final".into(),
                                ));
                            }
                            scram.finish(&last.body)?;
                        }
                        other => {
                            return Err(ReplicationError::Protocol(format!(
                                "unsupported authentication method {other}; use trust, password, md5 or scram-sha-256"
                            )));
                        }
                    }
                }
                b'S' | b'K' | b'N' => {} // parameter status, key data, notice
                b'Z' => return Ok(()),
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message '{}' during startup",
                        other as char
                    )));
                }
            }
        }
    }

    /// Runs a replication command or SQL query with the simple protocol and
    /// returns the rows of its last result as text.
    pub async fn simple_query(&mut self, query: &str) -> Result<Vec<TextRow>, ReplicationError> {
        frontend::query(query, &mut self.writer.buffer)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let mut message = match self.read_message().await {
                Ok(message) => message,
                Err(err @ ReplicationError::Server { .. }) => {
                    // Wait for ReadyForQuery so the connection stays usable.
                    failure = Some(err);
                    continue;
                }
                Err(err) => return Err(err),
            };
            match message.tag {
                b'T' => rows.clear(),
                b'D' => {
                    if message.body.len() < 2 {
                        return Err(truncated());
                    }
                    let count = message.body.get_i16();
                    let mut row = Vec::with_capacity(count.max(0) as usize);
                    for _ in 0..count {
                        let length = take_i32(&mut message.body)?;
                        if length < 0 {
                            row.push(None);
                        } else {
                            if message.body.len() < length as usize {
                                return Err(truncated());
                            }
                            let value = message.body.split_to(length as usize);
                            row.push(Some(String::from_utf8_lossy(&value).to_string()));
                        }
                    }
                    rows.push(row);
                }
                b'Z' => {
                    return match failure {
                        Some(err) => Err(err),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// `START_REPLICATION` of a logical slot with pgoutput; the connection
    /// becomes a stream of WAL data.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start_lsn: u64,
        publication: &str,
    ) -> Result<(ReplicationStream, StatusWriter), ReplicationError> {
        let query = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" '{}')",
            crate::event::quote_ident(slot),
            crate::event::format_lsn(start_lsn),
            crate::event::quote_ident(publication).replace('\'', "''")
        );
        frontend::query(&query, &mut self.writer.buffer)?;
        self.flush().await?;
        loop {
            let message = self.read_message().await?;
            match message.tag {
                b'W' => break, // CopyBothResponse
                b'N' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "expected CopyBothResponse, got '{}'",
                        other as char
                    )));
                }
            }
        }
        Ok((
            ReplicationStream {
                reader: self.reader,
            },
            self.writer,
        ))
    }
}

/// Reads one framed backend message; an ErrorResponse becomes an error.
async fn read_backend_message(
    reader: &mut BufReader<ReadHalf<Box<dyn Stream>>>,
) -> Result<BackendMessage, ReplicationError> {
    let tag = match reader.read_u8().await {
        Ok(tag) => tag,
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ReplicationError::Closed);
        }
        Err(err) => return Err(err.into()),
    };
    let length = reader.read_u32().await?;
    if !(4..=1 << 30).contains(&length) {
        return Err(ReplicationError::Protocol(format!(
            "message '{}' claims {length} bytes",
            tag as char
        )));
    }
    let mut body = BytesMut::zeroed(length as usize - 4);
    reader.read_exact(&mut body).await?;
    if tag == b'E' {
        return Err(parse_error_response(&body));
    }
    Ok(BackendMessage { tag, body })
}

fn truncated() -> ReplicationError {
    ReplicationError::Protocol("truncated message from the server".into())
}

fn take_i32(body: &mut BytesMut) -> Result<i32, ReplicationError> {
    if body.len() < 4 {
        return Err(truncated());
    }
    Ok(body.get_i32())
}

fn parse_error_response(body: &[u8]) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = String::new();
    let mut hint = String::new();
    for field in body.split(|b| *b == 0) {
        if let Some((&kind, value)) = field.split_first() {
            let value = String::from_utf8_lossy(value).to_string();
            match kind {
                b'C' => code = value,
                b'M' => message = value,
                b'D' => detail = value,
                b'H' => hint = value,
                _ => {}
            }
        }
    }
    for extra in [detail, hint] {
        if !extra.is_empty() {
            message.push_str(". ");
            message.push_str(&extra);
        }
    }
    ReplicationError::Server { code, message }
}

/// What the server sends while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// WAL data: one pgoutput message, with the LSN of the record it
    /// describes.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        data: Vec<u8>,
    },
    /// The server's position; it wants a status update if `reply_requested`.
    Keepalive { wal_end: u64, reply_requested: bool },
}

/// The receiving side of the CopyBoth stream after `START_REPLICATION`.
pub struct ReplicationStream {
    reader: BufReader<ReadHalf<Box<dyn Stream>>>,
}

impl ReplicationStream {
    async fn read_message(&mut self) -> Result<BackendMessage, ReplicationError> {
        read_backend_message(&mut self.reader).await
    }

    /// The next message, or an error when the connection breaks.
    pub async fn next(&mut self) -> Result<StreamMessage, ReplicationError> {
        loop {
            let mut message = self.read_message().await?;
            match message.tag {
                b'd' => {
                    if message.body.is_empty() {
                        continue;
                    }
                    let kind = message.body.get_u8();
                    match kind {
                        b'w' if message.body.len() >= 24 => {
                            let wal_start = message.body.get_u64();
                            let wal_end = message.body.get_u64();
                            let _server_time = message.body.get_i64();
                            return Ok(StreamMessage::XLogData {
                                wal_start,
                                wal_end,
                                data: message.body.to_vec(),
                            });
                        }
                        b'k' if message.body.len() >= 17 => {
                            let wal_end = message.body.get_u64();
                            let _server_time = message.body.get_i64();
                            let reply_requested = message.body.get_u8() == 1;
                            return Ok(StreamMessage::Keepalive {
                                wal_end,
                                reply_requested,
                            });
                        }
                        other => {
                            return Err(ReplicationError::Protocol(format!(
                                "unexpected copy data kind '{}'",
                                other as char
                            )));
                        }
                    }
                }
                // CopyDone, CommandComplete, ReadyForQuery: the server ended
                // the stream (e.g. it is shutting down).
                b'c' | b'C' | b'Z' => return Err(ReplicationError::Closed),
                b'N' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message '{}' while streaming",
                        other as char
                    )));
                }
            }
        }
    }
}
