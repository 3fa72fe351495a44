//! Capture: the source's write-ahead log, through logical replication
//! (`pgoutput`), as Debezium-format change events.
//!
//! - [`replication`]: the replication protocol client.
//! - [`pgoutput`]: decoding of the output plugin's messages.
//! - [`events`]: from messages to Debezium envelopes.
//!
//! The slot is confirmed only up to a commit whose events the sink has made
//! durable, so a crash at any point loses nothing (events after the
//! confirmed position are sent again: duplicates, never gaps).

pub mod events;
pub mod pgoutput;
pub mod replication;

use std::future::Future;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;

use self::events::{EventBuilder, Step};
use self::replication::{ReplicationConnection, ReplicationError, StreamMessage};
use crate::config::CaptureConfig;
use crate::db::describe;
use crate::event::{TableName, quote_ident};

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(
        "the source has wal_level = {0}; logical replication needs wal_level = logical. Run ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf) and restart the source server"
    )]
    WalLevel(String),
    #[error(
        "role {0} may not use replication; grant it with ALTER ROLE {0} REPLICATION (or connect as a role that has it)"
    )]
    NoReplicationRole(String),
    #[error(
        "table {0} has no primary key and not REPLICA IDENTITY FULL, so its updates and deletes cannot be identified; add a primary key or run ALTER TABLE {0} REPLICA IDENTITY FULL"
    )]
    NoRowIdentity(TableName),
    #[error(
        "replication slot \"{slot}\" is in use by another process ({message}); stop the other capture, or set a different [capture] slot"
    )]
    SlotActive { slot: String, message: String },
    #[error("setting up capture on the source: {0}")]
    Setup(String),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("decoding the change stream: {0}")]
    Decode(String),
    #[error("writing events: {0}")]
    Sink(#[from] std::io::Error),
}

impl From<tokio_postgres::Error> for CaptureError {
    fn from(err: tokio_postgres::Error) -> Self {
        CaptureError::Setup(describe(&err))
    }
}

const WAL_LEVEL: &str = "SHOW wal_level";
const MAY_REPLICATE: &str = "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user";
const TABLE_IDENTITY: &str = "
SELECT c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
FROM pg_class c WHERE c.oid = to_regclass($1)";
const PUBLICATION_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)";
const PUBLISHED_TABLES: &str =
    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1";
const SLOT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)";

/// Checks the source can be captured and creates the publication (or adds
/// missing tables to it). Run on an ordinary connection.
pub async fn prepare_source(
    source: &Client,
    config: &CaptureConfig,
    tables: &[TableName],
) -> Result<(), CaptureError> {
    let wal_level: String = source.query_one(WAL_LEVEL, &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(CaptureError::WalLevel(wal_level));
    }
    let role = source.query_one(MAY_REPLICATE, &[]).await?;
    if !role.get::<_, bool>(1) {
        return Err(CaptureError::NoReplicationRole(role.get(0)));
    }
    for table in tables {
        let Some(row) = source.query_opt(TABLE_IDENTITY, &[&table.quoted()]).await? else {
            return Err(CaptureError::Setup(format!(
                "table {table} does not exist on the source"
            )));
        };
        let identity: String = row.get(0);
        let has_primary_key: bool = row.get(1);
        if !has_primary_key && identity != "f" {
            return Err(CaptureError::NoRowIdentity(table.clone()));
        }
    }
    let publication = &config.publication;
    let exists: bool = source
        .query_one(PUBLICATION_EXISTS, &[publication])
        .await?
        .get(0);
    let table_list = |list: &[&TableName]| {
        list.iter()
            .map(|t| t.quoted())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !exists {
        let all: Vec<&TableName> = tables.iter().collect();
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(publication),
                table_list(&all)
            ))
            .await?;
        tracing::info!(
            "created publication \"{publication}\" for {}",
            table_list(&all)
        );
    } else {
        let published: Vec<TableName> = source
            .query(PUBLISHED_TABLES, &[publication])
            .await?
            .iter()
            .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        let missing: Vec<&TableName> = tables.iter().filter(|t| !published.contains(t)).collect();
        if !missing.is_empty() {
            source
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(publication),
                    table_list(&missing)
                ))
                .await?;
            tracing::info!(
                "added {} to publication \"{publication}\"",
                table_list(&missing)
            );
        }
    }
    Ok(())
}

/// Creates the slot if it does not exist yet (streaming starts at the
/// current WAL position; `bootstrap` creates it with a snapshot instead).
pub async fn ensure_slot(
    source: &Client,
    source_url: &str,
    slot: &str,
) -> Result<(), CaptureError> {
    let exists: bool = source.query_one(SLOT_EXISTS, &[&slot]).await?.get(0);
    if !exists {
        let mut connection = ReplicationConnection::connect(source_url).await?;
        connection
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                quote_ident(slot)
            ))
            .await?;
        tracing::info!("created replication slot \"{slot}\"");
    }
    Ok(())
}

/// Where captured events go. `make_durable` must not return before every
/// event written so far would survive a crash of this process.
pub trait EventSink {
    fn write_event(&mut self, event: &str) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Hands written events on (e.g. flushes a pipe) without the cost of
    /// durability; called at each commit so readers see events promptly.
    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    fn make_durable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// JSON lines to a file (made durable with fsync) or to stdout.
pub struct LinesSink {
    writer: tokio::io::BufWriter<Box<dyn tokio::io::AsyncWrite + Unpin + Send>>,
    file: Option<tokio::fs::File>,
}

impl LinesSink {
    /// `-` is stdout; anything else a file opened for appending.
    pub async fn open(path: &std::path::Path) -> std::io::Result<LinesSink> {
        if path == std::path::Path::new("-") {
            return Ok(LinesSink {
                writer: tokio::io::BufWriter::with_capacity(1 << 20, Box::new(tokio::io::stdout())),
                file: None,
            });
        }
        drop_torn_last_line(path).await?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let sync_handle = file.try_clone().await?;
        Ok(LinesSink {
            writer: tokio::io::BufWriter::with_capacity(1 << 20, Box::new(file)),
            file: Some(sync_handle),
        })
    }
}

/// A crash can leave half a line at the end of the file; it was never
/// confirmed, so it is sent again after restart. Cutting it off keeps it
/// from gluing onto the next event.
async fn drop_torn_last_line(path: &std::path::Path) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = match tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .await
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    let length = file.metadata().await?.len();
    let mut end = length;
    let mut buffer = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buffer.len() as u64);
        let chunk = &mut buffer[..(end - start) as usize];
        file.seek(std::io::SeekFrom::Start(start)).await?;
        file.read_exact(chunk).await?;
        if let Some(position) = chunk.iter().rposition(|b| *b == b'\n') {
            end = start + position as u64 + 1;
            break;
        }
        end = start;
    }
    if end < length {
        tracing::warn!(
            "{}: cut a torn last line of {} bytes left by a crash",
            path.display(),
            length - end
        );
        file.set_len(end).await?;
        file.sync_data().await?;
    }
    Ok(())
}

impl EventSink for LinesSink {
    async fn write_event(&mut self, event: &str) -> std::io::Result<()> {
        self.writer.write_all(event.as_bytes()).await?;
        self.writer.write_all(b"\n").await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush().await
    }

    async fn make_durable(&mut self) -> std::io::Result<()> {
        self.writer.flush().await?;
        if let Some(file) = &self.file {
            file.sync_data().await?;
        }
        Ok(())
    }
}

/// Counters of one capture run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaptureStats {
    pub events: u64,
    pub transactions: u64,
    pub confirmed_lsn: u64,
}

/// How often the slot is confirmed while changes flow.
const CONFIRM_INTERVAL: Duration = Duration::from_millis(200);

/// Streams changes from the slot into `sink` until `shutdown` completes;
/// reconnects with backoff when the source goes away. On shutdown the sink
/// is made durable and the slot confirmed before returning.
pub async fn stream_changes<S: EventSink + Send>(
    source_url: &str,
    config: &CaptureConfig,
    database: &str,
    sink: &mut S,
    shutdown: impl Future<Output = ()>,
) -> Result<CaptureStats, CaptureError> {
    let mut stats = CaptureStats::default();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Duration::from_millis(250);
    loop {
        let session = stream_session(source_url, config, database, sink, &mut stats);
        tokio::select! {
            result = session => match result {
                Ok(()) => return Ok(stats),
                Err(CaptureError::Replication(err)) if is_retryable(&err) => {
                    tracing::warn!("source replication connection lost ({err}); reconnecting in {backoff:?}");
                    sink.make_durable().await?;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut shutdown => return Ok(stats),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(err) => return Err(err),
            },
            _ = &mut shutdown => {
                // The session future is dropped; what it wrote is made
                // durable, and the next start resumes from the slot.
                sink.make_durable().await?;
                tracing::info!("capture stopped; slot confirmed up to {}", crate::event::format_lsn(stats.confirmed_lsn));
                return Ok(stats);
            }
        }
    }
}

/// Stops a task when the owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn is_retryable(err: &ReplicationError) -> bool {
    match err {
        ReplicationError::Closed | ReplicationError::Io(_) | ReplicationError::Connect { .. } => {
            true
        }
        // 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now
        ReplicationError::Server { code, .. } => code.starts_with("57P") || code.starts_with("08"),
        _ => false,
    }
}

async fn stream_session<S: EventSink>(
    source_url: &str,
    config: &CaptureConfig,
    database: &str,
    sink: &mut S,
    stats: &mut CaptureStats,
) -> Result<(), CaptureError> {
    let connection = ReplicationConnection::connect(source_url).await?;
    let (mut stream, mut status) = connection
        .start_logical_replication(&config.slot, 0, &config.publication)
        .await
        .map_err(|err| match err {
            ReplicationError::Server { code, message } if code == "55006" => {
                CaptureError::SlotActive {
                    slot: config.slot.clone(),
                    message,
                }
            }
            other => other.into(),
        })?;
    tracing::info!("streaming changes from slot \"{}\"", config.slot);
    // Reading runs on its own task so that confirming the slot can be
    // driven by a timer without cancelling a half-read message.
    let (messages, mut inbox) = tokio::sync::mpsc::channel(1024);
    let reader = tokio::spawn(async move {
        loop {
            let message = stream.next().await;
            let failed = message.is_err();
            if messages.send(message).await.is_err() || failed {
                break;
            }
        }
    });
    let _stop_reader = AbortOnDrop(reader);
    let mut builder = EventBuilder::new(database);
    // The end of the last transaction whose events are all written.
    let mut written_up_to = 0u64;
    let mut received = 0u64;
    let mut ticker = tokio::time::interval(CONFIRM_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut reply_requested = false;
        let mut due = false;
        tokio::select! {
            message = inbox.recv() => {
                let Some(message) = message else { return Err(ReplicationError::Closed.into()) };
                match message? {
                    StreamMessage::XLogData { wal_start, wal_end, data } => {
                        received = received.max(wal_end);
                        let decoded = pgoutput::decode(&data)
                            .map_err(|err| CaptureError::Decode(err.to_string()))?;
                        match builder.handle(wal_start, decoded).map_err(CaptureError::Decode)? {
                            Step::Events(events) => {
                                for event in events {
                                    sink.write_event(&event).await?;
                                    stats.events += 1;
                                }
                            }
                            Step::Commit { end_lsn } => {
                                sink.flush().await?;
                                written_up_to = written_up_to.max(end_lsn);
                                stats.transactions += 1;
                            }
                            Step::Nothing => {}
                        }
                    }
                    StreamMessage::Keepalive { wal_end, reply_requested: wanted } => {
                        received = received.max(wal_end);
                        if !builder.in_transaction() {
                            // Nothing of ours is pending before the server's position.
                            written_up_to = written_up_to.max(wal_end);
                        }
                        reply_requested = wanted;
                    }
                }
            }
            _ = ticker.tick() => due = true,
        }
        if reply_requested || (due && written_up_to > stats.confirmed_lsn) {
            if written_up_to > stats.confirmed_lsn {
                sink.make_durable().await?;
                stats.confirmed_lsn = written_up_to;
            }
            status
                .send_status(received, stats.confirmed_lsn, false)
                .await?;
        }
    }
}
