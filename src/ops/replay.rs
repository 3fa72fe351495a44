//! `tally replay`: re-sends the current source rows of a table (optionally
//! those matching a `WHERE`, optionally as another operation) through the
//! normal path, so a row whose events were lost, or a ledger row damaged by
//! hand, is set right while the pipeline runs.
//!
//! The rows are read in the snapshot of a temporary slot and sent with the
//! key `(C, 0)`, `C` its consistent point (see [`super::snapshot`] for why
//! that key beats every change already in the rows and loses to every
//! change after them). A replayed row therefore never undoes a newer
//! streamed change, whatever the order they arrive in.
//!
//! Where the events go: `--output` (JSON lines, like bootstrap), the NATS
//! stream when `[transport] kind = "nats"`, or, with the embedded transport
//! (whose queue lives inside `tally run`), straight into the target through
//! the same guarded batch transaction the appliers use.

use std::sync::Arc;

use thiserror::Error;
use tokio_postgres::Client;

use super::bootstrap::{RowOp, RowReader};
use super::snapshot::ExportedSnapshot;
use crate::apply::{Applier, ApplyError, ApplyStats, Model};
use crate::capture::replication::ReplicationError;
use crate::catalog::TableMeta;
use crate::db::describe;
use crate::event::{TableName, format_lsn};
use crate::progress::{Counter, Reporter};
use crate::transport::{AnyPublisher, CapturedEvent, Publisher};

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(
        "table {0} is not read by any view in the views file, so Tally keeps nothing of it; name one of: {1}"
    )]
    UnknownTable(String, String),
    #[error(
        "--where {filter:?} failed on the source: {message}. It runs in a READ ONLY transaction on {table}, so it may only read (columns of the table by name, e.g. --where \"id < 1000\")"
    )]
    Where {
        table: String,
        filter: String,
        message: String,
    },
    #[error("taking a snapshot of the source (a temporary replication slot): {0}")]
    Snapshot(#[from] ReplicationError),
    #[error("reading the source: {0}")]
    Source(String),
    #[error("sending events: {0}")]
    Sink(#[from] std::io::Error),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub rows: u64,
    pub consistent_point: u64,
}

/// Events applied straight to the target, for the embedded transport. The
/// guard makes this as safe as going through a queue: each event is one
/// more delivery, applied once if it is the newest version, else dropped.
pub struct DirectApply {
    applier: Applier,
    buffer: Vec<String>,
    batch_size: usize,
    pub stats: ApplyStats,
}

impl DirectApply {
    pub async fn connect(
        target_url: &str,
        model: Arc<Model>,
        batch_size: usize,
    ) -> Result<DirectApply, ApplyError> {
        Ok(DirectApply {
            applier: Applier::connect(target_url, model).await?,
            buffer: Vec::new(),
            batch_size: batch_size.max(1),
            stats: ApplyStats::default(),
        })
    }

    async fn apply_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.buffer);
        self.stats += self
            .applier
            .apply_messages(&batch)
            .await
            .map_err(|e| std::io::Error::other(format!("applying to the target: {e}")))?;
        Ok(())
    }
}

impl Publisher for DirectApply {
    async fn publish(&mut self, event: CapturedEvent) -> std::io::Result<()> {
        self.buffer.push(event.json);
        if self.buffer.len() >= self.batch_size {
            self.apply_buffer().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.apply_buffer().await
    }

    async fn make_durable(&mut self) -> std::io::Result<()> {
        self.apply_buffer().await
    }
}

/// Where replayed (or repair) events go.
pub enum ReplaySink {
    Transport(AnyPublisher),
    Direct(Box<DirectApply>),
}

impl ReplaySink {
    /// What the target did with the events, when they were applied here.
    pub fn applied(&self) -> Option<ApplyStats> {
        match self {
            ReplaySink::Direct(direct) => Some(direct.stats),
            ReplaySink::Transport(_) => None,
        }
    }
}

impl Publisher for ReplaySink {
    async fn publish(&mut self, event: CapturedEvent) -> std::io::Result<()> {
        match self {
            ReplaySink::Transport(p) => p.publish(event).await,
            ReplaySink::Direct(p) => p.publish(event).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ReplaySink::Transport(p) => p.flush().await,
            ReplaySink::Direct(p) => p.flush().await,
        }
    }

    async fn make_durable(&mut self) -> std::io::Result<()> {
        match self {
            ReplaySink::Transport(p) => p.make_durable().await,
            ReplaySink::Direct(p) => p.make_durable().await,
        }
    }
}

/// Finds `table` (as `name` or `schema.name`) among the tables the views
/// read.
pub fn find_table<'a>(model: &'a Model, table: &str) -> Result<&'a TableMeta, ReplayError> {
    let wanted = match table.split_once('.') {
        Some((schema, name)) => TableName::new(schema, name),
        None => TableName::public(table),
    };
    model.tables.get(&wanted).map(|t| &t.meta).ok_or_else(|| {
        let known: Vec<String> = model.tables.keys().map(ToString::to_string).collect();
        ReplayError::UnknownTable(table.to_string(), known.join(", "))
    })
}

/// Re-sends the rows of `table` matching `filter` as `op` events keyed
/// `(C, 0)`; returns how many and `C`. Durable in `sink` on return.
pub async fn replay<S: Publisher + Send>(
    source: &mut Client,
    source_url: &str,
    table: &TableMeta,
    filter: Option<&str>,
    op: RowOp,
    sink: &mut S,
) -> Result<ReplayStats, ReplayError> {
    let snapshot = ExportedSnapshot::take(source_url, "replay").await?;
    let point = snapshot.consistent_point;
    tracing::info!(
        "replaying {} at consistent point {} (newer changes win over these rows)",
        table.name,
        format_lsn(point)
    );
    let tx = snapshot.begin(source).await.map_err(ReplayError::Source)?;
    let where_error = |err: tokio_postgres::Error| match filter {
        Some(filter) => ReplayError::Where {
            table: table.name.to_string(),
            filter: filter.to_string(),
            message: describe(&err),
        },
        None => ReplayError::Source(describe(&err)),
    };
    let counter = Counter::default();
    let reporter = Reporter::start("rows replayed", counter.clone(), None);
    let name = Arc::new(table.name.clone());
    let mut reader = RowReader::new(table, point, op, filter);
    let mut rows = 0u64;
    loop {
        let chunk = reader.next_chunk(&tx).await.map_err(where_error)?;
        if chunk.is_empty() {
            break;
        }
        for row in &chunk {
            sink.publish(CapturedEvent {
                table: name.clone(),
                commit_lsn: point,
                lsn: 0,
                row_key: row.key.join("\u{1f}"),
                json: row.json.clone(),
            })
            .await?;
        }
        sink.make_durable().await?;
        rows += chunk.len() as u64;
        counter.add(chunk.len() as u64);
    }
    drop(reporter);
    tx.commit()
        .await
        .map_err(|e| ReplayError::Source(describe(&e)))?;
    Ok(ReplayStats {
        rows,
        consistent_point: point,
    })
}
