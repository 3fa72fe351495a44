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
use tokio_postgres::Client;

use self::events::{EventBuilder, Step};
use self::replication::{ReplicationConnection, ReplicationError, StreamMessage};
use crate::config::CaptureConfig;
use crate::db::describe;
use crate::event::{TableName, quote_ident};
use crate::transport::Publisher;

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

/// Counters of one capture run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaptureStats {
    pub events: u64,
    pub transactions: u64,
    pub confirmed_lsn: u64,
    /// Replication sessions started (more than one after reconnects).
    pub sessions: u64,
}

/// How long after start a slot still active (a killed predecessor's
/// walsender) is waited for before it is reported as in use.
const SLOT_RELEASE_GRACE: Duration = Duration::from_secs(3);

/// How often the slot is confirmed while changes flow.
const CONFIRM_INTERVAL: Duration = Duration::from_millis(200);

/// Streams changes from the slot into `sink` until `shutdown` completes;
/// reconnects with backoff when the source goes away. On shutdown the sink
/// is made durable and the slot confirmed before returning.
pub async fn stream_changes<S: Publisher + Send>(
    source_url: &str,
    config: &CaptureConfig,
    database: &str,
    sink: &mut S,
    shutdown: impl Future<Output = ()>,
) -> Result<CaptureStats, CaptureError> {
    let mut stats = CaptureStats::default();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Duration::from_millis(250);
    // A slot still held by our own previous session (its walsender has not
    // noticed the closed connection yet) is waited for, not reported; so is
    // one held for a moment after start, when the previous process was
    // killed just before (its walsender goes away within a few hundred ms).
    // A slot another capture keeps is reported once the grace is over.
    let mut reconnecting = false;
    let started = tokio::time::Instant::now();
    loop {
        let sessions_before = stats.sessions;
        let session = stream_session(source_url, config, database, sink, &mut stats);
        tokio::select! {
            result = session => match result {
                Ok(()) => return Ok(stats),
                Err(err) if is_retryable(&err)
                    || (matches!(err, CaptureError::SlotActive { .. })
                        && (reconnecting || started.elapsed() < SLOT_RELEASE_GRACE)) => {
                    if stats.sessions > sessions_before {
                        // The last session had streamed: a new failure.
                        reconnecting = false;
                        backoff = Duration::from_millis(250);
                    }
                    if is_retryable(&err) {
                        if !reconnecting {
                            tracing::warn!("{err}; reconnecting with backoff, resuming from the slot's confirmed position");
                        }
                        reconnecting = true;
                    } else if !reconnecting {
                        // At start: the grace runs out unless the slot is freed.
                        tracing::info!("{err}; waiting up to {SLOT_RELEASE_GRACE:?} for it to be released");
                    }
                    // Whatever is not durable is sent again from the slot.
                    if let Err(err) = sink.make_durable().await {
                        tracing::debug!("while reconnecting: {err}");
                    }
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

/// Whether a new session may succeed: the source or the transport went
/// away, as opposed to a setup or data problem.
fn is_retryable(err: &CaptureError) -> bool {
    match err {
        CaptureError::Replication(err) => is_retryable_replication(err),
        CaptureError::Sink(err) => matches!(
            err.kind(),
            std::io::ErrorKind::NotConnected
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}

fn is_retryable_replication(err: &ReplicationError) -> bool {
    match err {
        ReplicationError::Closed | ReplicationError::Io(_) | ReplicationError::Connect { .. } => {
            true
        }
        // 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now
        ReplicationError::Server { code, .. } => code.starts_with("57P") || code.starts_with("08"),
        _ => false,
    }
}

async fn stream_session<S: Publisher>(
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
    stats.sessions += 1;
    if stats.sessions > 1 {
        tracing::info!(
            "reconnected; streaming changes from slot \"{}\" again",
            config.slot
        );
    } else {
        tracing::info!("streaming changes from slot \"{}\"", config.slot);
    }
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
                                metrics::counter!("tally_events_captured_total")
                                    .increment(events.len() as u64);
                                for event in events {
                                    sink.publish(event).await?;
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
        if due || reply_requested {
            // What the server has sent that is not yet safe in the target
            // (embedded) or the broker (NATS).
            metrics::gauge!("tally_capture_lag_bytes")
                .set(received.saturating_sub(stats.confirmed_lsn) as f64);
        }
    }
}
