//! `tally bootstrap`: the rows that exist before streaming starts, read in a
//! snapshot consistent with a new replication slot and emitted as `op: "r"`
//! events with the ordering key `(consistent_point, 0)`.
//!
//! Every change not in the snapshot commits after the consistent point, so
//! its key is greater and it wins (DESIGN.md, "Ordering key"); streaming
//! from the same slot afterwards therefore converges exactly.
//!
//! Resumable: progress (the last primary key emitted per table) is kept in
//! a state file. A resumed run reads the remaining rows in a fresh snapshot,
//! still with the slot's key: those rows are at least as new as the
//! snapshot, and every change after the consistent point is streamed with
//! a greater key, so the result converges all the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_postgres::Client;

use crate::capture::CaptureError;
use crate::capture::replication::{ReplicationConnection, ReplicationError};
use crate::catalog::{self, CatalogError, TableMeta};
use crate::db::describe;
use crate::event::{TableName, parse_lsn_text, quote_ident};
use crate::progress::{Counter, Reporter};
use crate::transport::{CapturedEvent, Publisher};

#[derive(Debug, Error)]
pub enum BootstrapError {
    #[error(
        "replication slot \"{0}\" already exists, so streaming may have begun without a snapshot. To bootstrap again, drop it first (SELECT pg_drop_replication_slot('{0}')) or set another [capture] slot"
    )]
    SlotExists(String),
    #[error("bootstrap state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("reading the source: {0}")]
    Source(String),
    #[error("writing events: {0}")]
    Sink(#[from] std::io::Error),
}

impl From<tokio_postgres::Error> for BootstrapError {
    fn from(err: tokio_postgres::Error) -> Self {
        BootstrapError::Source(describe(&err))
    }
}

/// Progress saved after every chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BootstrapState {
    pub slot: String,
    pub consistent_point: u64,
    /// Per table (`schema.name`): the last primary key emitted, as text.
    pub last_key: BTreeMap<String, Vec<String>>,
    pub done: Vec<String>,
}

impl BootstrapState {
    fn load(path: &Path) -> Result<Option<BootstrapState>, BootstrapError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|err| BootstrapError::State {
                        path: path.to_path_buf(),
                        reason: format!("{err}; delete it to start over"),
                    })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(BootstrapError::State {
                path: path.to_path_buf(),
                reason: err.to_string(),
            }),
        }
    }

    fn save(&self, path: &Path) -> Result<(), BootstrapError> {
        let temporary = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self).expect("state serialises");
        std::fs::write(&temporary, text)
            .and_then(|_| std::fs::rename(&temporary, path))
            .map_err(|err| BootstrapError::State {
                path: path.to_path_buf(),
                reason: err.to_string(),
            })
    }
}

/// What a bootstrap run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootstrapStats {
    pub rows: u64,
    pub consistent_point: u64,
    pub resumed: bool,
}

const SLOT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)";

/// Rows per query; each chunk is made durable before progress is saved.
pub const CHUNK_ROWS: i64 = 10_000;

/// Runs (or resumes) a bootstrap of `tables` into `sink`.
pub async fn bootstrap<S: Publisher + Send>(
    source: &mut Client,
    source_url: &str,
    slot: &str,
    tables: &[TableName],
    state_path: &Path,
    sink: &mut S,
) -> Result<BootstrapStats, BootstrapError> {
    let metas = catalog::load_tables(source, tables.iter().cloned()).await?;
    let slot_exists: bool = source.query_one(SLOT_EXISTS, &[&slot]).await?.get(0);
    let previous = BootstrapState::load(state_path)?.filter(|s| s.slot == slot);

    // Keep the replication connection open (and idle) while reading: the
    // exported snapshot lives as long as it does.
    let mut _snapshot_holder: Option<ReplicationConnection> = None;
    let transaction = source
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true);
    let (state, tx, resumed) = match previous {
        Some(state) if slot_exists => {
            tracing::info!(
                "resuming bootstrap at consistent point {} (rows read so far are kept)",
                crate::event::format_lsn(state.consistent_point)
            );
            (state, transaction.start().await?, true)
        }
        _ if slot_exists => return Err(BootstrapError::SlotExists(slot.to_string())),
        _ => {
            let mut replication = ReplicationConnection::connect(source_url).await?;
            let rows = replication
                .simple_query(&format!(
                    "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                    quote_ident(slot)
                ))
                .await?;
            let row = rows.first().ok_or_else(|| {
                BootstrapError::Source("CREATE_REPLICATION_SLOT returned no row".into())
            })?;
            let point_text = row.get(1).cloned().flatten().unwrap_or_default();
            let consistent_point = parse_lsn_text(&point_text).ok_or_else(|| {
                BootstrapError::Source(format!("bad consistent point {point_text:?}"))
            })?;
            let snapshot = row.get(2).cloned().flatten().unwrap_or_default();
            tracing::info!(
                "created slot \"{slot}\" at consistent point {point_text} with snapshot {snapshot}"
            );
            let tx = transaction.start().await?;
            tx.batch_execute(&format!(
                "SET TRANSACTION SNAPSHOT '{}'",
                snapshot.replace('\'', "''")
            ))
            .await?;
            _snapshot_holder = Some(replication);
            let state = BootstrapState {
                slot: slot.to_string(),
                consistent_point,
                ..BootstrapState::default()
            };
            state.save(state_path)?;
            (state, tx, false)
        }
    };
    let mut state = state;

    let mut total = 0u64;
    for table in tables {
        if !state.done.contains(&table.to_string()) {
            let count: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {}", table.quoted()), &[])
                .await?
                .get(0);
            total += count as u64;
        }
    }
    let counter = Counter::default();
    let reporter = Reporter::start("rows read", counter.clone(), Some(total));
    let mut rows_emitted = 0u64;
    for table in tables {
        let name = table.to_string();
        if state.done.contains(&name) {
            continue;
        }
        let meta = &metas[table];
        let table_name = std::sync::Arc::new(table.clone());
        let (first_chunk, next_chunk) =
            chunk_queries(meta, state.consistent_point, RowOp::Read, None);
        let first = tx.prepare(&first_chunk).await?;
        let next = tx.prepare(&next_chunk).await?;
        loop {
            let rows = match state.last_key.get(&name) {
                None => tx.query(&first, &[&CHUNK_ROWS]).await?,
                Some(last) => tx.query(&next, &[last, &CHUNK_ROWS]).await?,
            };
            for row in &rows {
                let key: Vec<String> = row.get(1);
                sink.publish(CapturedEvent {
                    table: table_name.clone(),
                    commit_lsn: state.consistent_point,
                    lsn: 0,
                    row_key: key.join("\u{1f}"),
                    json: row.get(0),
                })
                .await?;
            }
            let Some(last_row) = rows.last() else { break };
            sink.make_durable().await?;
            state.last_key.insert(name.clone(), last_row.get(1));
            state.save(state_path)?;
            rows_emitted += rows.len() as u64;
            counter.add(rows.len() as u64);
            if (rows.len() as i64) < CHUNK_ROWS {
                break;
            }
        }
        state.done.push(name);
        state.save(state_path)?;
    }
    drop(reporter);
    tx.commit().await?;
    Ok(BootstrapStats {
        rows: rows_emitted,
        consistent_point: state.consistent_point,
        resumed,
    })
}

/// Which Debezium operation rows are rendered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    /// `r`: a snapshot read (bootstrap).
    Read,
    /// `c`: a create.
    Create,
    /// `u`: an update.
    Update,
    /// `d`: a delete, with the row as `before`.
    Delete,
}

impl RowOp {
    fn code(self) -> &'static str {
        match self {
            RowOp::Read => "r",
            RowOp::Create => "c",
            RowOp::Update => "u",
            RowOp::Delete => "d",
        }
    }
}

/// The queries that read a table in primary-key order, a chunk at a time,
/// each row already rendered as a Debezium envelope of `op` with the key
/// `(commit_lsn, 0)`, and its primary key as text. Numerics are rendered as
/// text so they stay exact. `filter` (SQL over the table's columns, alias
/// `t`) narrows the rows; the first query binds `$1` = chunk size, the
/// next one `$1` = last key, `$2` = chunk size.
pub(crate) fn chunk_queries(
    meta: &TableMeta,
    commit_lsn: u64,
    op: RowOp,
    filter: Option<&str>,
) -> (String, String) {
    let row_pairs: Vec<String> = meta
        .columns
        .iter()
        .map(|c| {
            let value = if c.type_name == "numeric" {
                format!("to_jsonb(t.{}::text)", quote_ident(&c.name))
            } else {
                format!("to_jsonb(t.{})", quote_ident(&c.name))
            };
            format!("{}, {value}", sql_literal(&c.name))
        })
        .collect();
    // jsonb_build_object takes at most 100 arguments: 50 columns a call.
    let row = row_pairs
        .chunks(50)
        .map(|pairs| format!("jsonb_build_object({})", pairs.join(", ")))
        .collect::<Vec<_>>()
        .join(" || ");
    let (before, after) = if op == RowOp::Delete {
        (row, "NULL::jsonb".to_string())
    } else {
        ("NULL::jsonb".to_string(), row)
    };
    let envelope = format!(
        "jsonb_build_object('before', {before}, 'after', {after}, 'op', '{op}', 'ts_ms', (extract(epoch FROM now()) * 1000)::bigint, \
         'source', jsonb_build_object('connector', 'tally', 'snapshot', true, 'db', current_database(), 'schema', {schema}, 'table', {table}, 'lsn', 0, 'commit_lsn', {cp}::bigint))::text",
        op = op.code(),
        schema = sql_literal(&meta.name.schema),
        table = sql_literal(&meta.name.name),
        cp = commit_lsn,
    );
    let key_columns: Vec<String> = meta
        .primary_key
        .iter()
        .map(|c| format!("t.{}", quote_ident(c)))
        .collect();
    let key_text: Vec<String> = key_columns.iter().map(|c| format!("{c}::text")).collect();
    let key_params: Vec<String> = meta
        .primary_key
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let sql_type = meta
                .column(c)
                .map(|m| m.sql_type.as_str())
                .unwrap_or("text");
            format!("($1::text[])[{}]::{sql_type}", i + 1)
        })
        .collect();
    let order = key_columns.join(", ");
    let select = format!(
        "SELECT {envelope}, ARRAY[{}] FROM {} AS t",
        key_text.join(", "),
        meta.name.quoted()
    );
    let (first_where, next_where) = match filter {
        Some(filter) => (format!(" WHERE ({filter})"), format!(" AND ({filter})")),
        None => (String::new(), String::new()),
    };
    let first = format!("{select}{first_where} ORDER BY {order} LIMIT $1");
    let next = format!(
        "{select} WHERE ({order}) > ({}){next_where} ORDER BY {order} LIMIT $2",
        key_params.join(", ")
    );
    (first, next)
}

fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Reads a table's rows as rendered envelopes, a chunk at a time, in
/// primary-key order (for `replay` and `verify`, which need no state file).
pub(crate) struct RowReader {
    first: String,
    next: String,
    last_key: Option<Vec<String>>,
    done: bool,
}

/// One row read: its envelope and its primary-key values as text.
pub(crate) struct RenderedRow {
    pub json: String,
    pub key: Vec<String>,
}

impl RowReader {
    pub(crate) fn new(meta: &TableMeta, commit_lsn: u64, op: RowOp, filter: Option<&str>) -> Self {
        let (first, next) = chunk_queries(meta, commit_lsn, op, filter);
        RowReader {
            first,
            next,
            last_key: None,
            done: false,
        }
    }

    /// The next chunk; empty once the table is read.
    pub(crate) async fn next_chunk(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<Vec<RenderedRow>, tokio_postgres::Error> {
        if self.done {
            return Ok(Vec::new());
        }
        let rows = match &self.last_key {
            None => tx.query(&self.first, &[&CHUNK_ROWS]).await?,
            Some(last) => tx.query(&self.next, &[last, &CHUNK_ROWS]).await?,
        };
        if (rows.len() as i64) < CHUNK_ROWS {
            self.done = true;
        }
        let rows: Vec<RenderedRow> = rows
            .iter()
            .map(|r| RenderedRow {
                json: r.get(0),
                key: r.get(1),
            })
            .collect();
        if let Some(last) = rows.last() {
            self.last_key = Some(last.key.clone());
        }
        Ok(rows)
    }
}
