//! The aggregator: batch, coalesce, guard by ordering key, update the ledger
//! and the view tables in one target transaction, then acknowledge.
//!
//! - [`core`]: the pure rules (guard, coalescing, ledger transition).
//! - [`validate`]: from a parsed event to checked row changes.
//! - [`store`]: the batch transaction on the target.
//! - [`schema`]: Tally's own tables in the target.

pub mod consumer;
pub mod core;
pub mod runner;
pub mod schema;
pub mod store;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_postgres::Client;

pub use self::core::ApplyStats;
use self::core::{RowChange, coalesce};
use self::store::Statements;
use self::validate::{Decoded, decode};
use crate::catalog::{self, CatalogError, TableMeta};
use crate::db::{self, ConnectError, describe, is_transient};
use crate::event::{self, OrderKey, Parsed, TableName};
use crate::views::ViewDef;
use crate::views::table::{ViewTable, ViewTableError};

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    View(#[from] ViewTableError),
    #[error("reading input: {0}")]
    Input(String),
    #[error("target database: {0}")]
    Target(String),
    /// The target cannot be reached now (connection lost or refused, server
    /// shutting down); the same work can be retried once it is back.
    #[error("target database unavailable: {0}")]
    Unavailable(String),
    #[error("transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("view \"{view}\": {message}")]
    ViewSchema { view: String, message: String },
}

impl From<tokio_postgres::Error> for ApplyError {
    fn from(err: tokio_postgres::Error) -> Self {
        if db::is_unavailable(&err) {
            ApplyError::Unavailable(describe(&err))
        } else {
            ApplyError::Target(describe(&err))
        }
    }
}

impl ApplyError {
    /// Whether waiting for the target and retrying the same work can
    /// succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ApplyError::Unavailable(_) | ApplyError::Connect(_))
    }
}

/// Everything apply knows about one source table.
#[derive(Debug, Clone)]
pub struct TableModel {
    pub meta: TableMeta,
    /// The columns the ledger keeps for this table: those its views read.
    pub stored_columns: Vec<String>,
    pub views: Vec<ViewTable>,
}

/// The views and the source tables they read, shared by all appliers.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub tables: BTreeMap<TableName, TableModel>,
}

impl Model {
    /// Reads the shape of every table the views read, and the views' types,
    /// from the source.
    pub async fn load(source: &Client, views: Vec<ViewDef>) -> Result<Model, ApplyError> {
        let metas = catalog::load_tables(source, views.iter().map(|v| v.source.clone())).await?;
        let mut tables: BTreeMap<TableName, TableModel> = BTreeMap::new();
        for def in views {
            let meta = &metas[&def.source];
            let view = ViewTable::probe(source, def, meta).await?;
            let entry = tables
                .entry(meta.name.clone())
                .or_insert_with(|| TableModel {
                    meta: meta.clone(),
                    stored_columns: Vec::new(),
                    views: Vec::new(),
                });
            for column in &view.def.columns_read {
                if !entry.stored_columns.contains(column) {
                    entry.stored_columns.push(column.clone());
                }
            }
            entry.views.push(view);
        }
        for table in tables.values_mut() {
            table.stored_columns.sort();
        }
        Ok(Model { tables })
    }

    pub fn views(&self) -> impl Iterator<Item = &ViewTable> {
        self.tables.values().flat_map(|t| t.views.iter())
    }

    pub fn views_of(&self, table: &TableName) -> impl Iterator<Item = &ViewTable> {
        self.tables
            .get(table)
            .into_iter()
            .flat_map(|t| t.views.iter())
    }

    /// Creates or upgrades Tally's schema and every view table in the
    /// target. Safe to run from many processes at once.
    pub async fn ensure_target_schema(&self, target: &mut Client) -> Result<(), ApplyError> {
        let tx = target.transaction().await?;
        tx.batch_execute(schema::CREATE_SCHEMA).await?;
        tx.execute(schema::LOCK_SCHEMA, &[]).await?;
        let current: i32 = tx.query_one(schema::CURRENT_VERSION, &[]).await?.get(0);
        for (index, migration) in schema::MIGRATIONS.iter().enumerate() {
            let version = index as i32 + 1;
            if version > current {
                tx.batch_execute(migration).await?;
                tx.execute(schema::RECORD_VERSION, &[&version]).await?;
                tracing::info!("target schema upgraded to version {version}");
            }
        }
        for (table, model) in &self.tables {
            tx.execute(schema::ENSURE_WATERMARK, &[&table.to_string()])
                .await?;
            // Which columns the ledger rows hold: a view that reads more
            // is built from the ledger now and backfilled through replay
            // (`ops::live_views`), which records the columns when done.
            let recorded: Option<Vec<String>> = tx
                .query_opt(schema::LEDGER_COLUMNS, &[&table.to_string()])
                .await?
                .map(|r| r.get(0));
            let missing = missing_columns(recorded.as_deref(), &model.stored_columns);
            if missing.is_empty() {
                tx.execute(
                    schema::RECORD_LEDGER_COLUMNS,
                    &[&table.to_string(), &model.stored_columns],
                )
                .await?;
            } else {
                tracing::warn!(
                    "the views now read {} of {table}, which the ledger does not hold yet; views are built from the ledger and the table's rows are backfilled through replay",
                    missing.join(", ")
                );
            }
            for view in &model.views {
                let definition = view.create_sql().join(";\n");
                let registered: Option<String> = tx
                    .query_opt(schema::REGISTERED_VIEW, &[&view.name()])
                    .await?
                    .map(|r| r.get(0));
                if registered.as_deref() == Some(definition.as_str()) {
                    continue;
                }
                let exists: bool = tx
                    .query_one(schema::TABLE_EXISTS, &[&view.quoted_name()])
                    .await?
                    .get(0);
                match (&registered, exists) {
                    (None, true) => {
                        return Err(ApplyError::ViewSchema {
                            view: view.name().to_string(),
                            message: "a table of that name already exists in the target and Tally did not create it; rename the view or drop that table".into(),
                        })
                    }
                    (Some(_), true) => {
                        tracing::warn!(
                            "view \"{}\" changed since its table was built; rebuilding it from the ledger",
                            view.name()
                        );
                        tx.batch_execute(&format!("DROP TABLE {}", view.quoted_name()))
                            .await?;
                    }
                    _ => {}
                }
                for statement in view.create_sql() {
                    tx.batch_execute(&statement)
                        .await
                        .map_err(|err| ApplyError::ViewSchema {
                            view: view.name().to_string(),
                            message: format!("cannot create its table: {}", describe(&err)),
                        })?;
                }
                tx.execute(&view.rebuild_sql(), &[&table.to_string()])
                    .await?;
                if let Some(delete) = view.delete_empty_sql() {
                    tx.execute(&delete, &[]).await?;
                }
                tx.execute(
                    schema::REGISTER_VIEW,
                    &[&view.name(), &table.to_string(), &definition],
                )
                .await?;
                tracing::info!(
                    "view \"{}\" {} in the target from the ledger",
                    view.name(),
                    if registered.is_none() {
                        "built"
                    } else {
                        "rebuilt"
                    }
                );
            }
        }
        let registered: Vec<String> = tx
            .query(schema::REGISTERED_VIEWS, &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in registered {
            if !self.views().any(|v| v.name() == name) {
                tracing::warn!(
                    "view \"{name}\" is no longer in the views file: Tally stops maintaining it; its table is left in the target (DROP TABLE {} when nobody reads it)",
                    crate::event::quote_ident(&name)
                );
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Tables whose ledger rows lack columns the views now read (the views
    /// file gained a view reading them); see `ops::live_views`.
    pub async fn tables_to_backfill(&self, target: &Client) -> Result<Vec<TableName>, ApplyError> {
        let mut out = Vec::new();
        for (table, model) in &self.tables {
            let recorded: Option<Vec<String>> = target
                .query_opt(schema::LEDGER_COLUMNS, &[&table.to_string()])
                .await?
                .map(|r| r.get(0));
            if !missing_columns(recorded.as_deref(), &model.stored_columns).is_empty() {
                out.push(table.clone());
            }
        }
        Ok(out)
    }
}

/// The columns `needed` that the ledger rows may lack: those not in
/// `recorded`. Nothing recorded yet (a new table, or a target from before
/// the record existed) counts as holding what is needed now.
pub fn missing_columns(recorded: Option<&[String]>, needed: &[String]) -> Vec<String> {
    match recorded {
        None => Vec::new(),
        Some(recorded) => needed
            .iter()
            .filter(|c| !recorded.contains(c))
            .cloned()
            .collect(),
    }
}

/// A message that could not be applied, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub table: Option<String>,
    pub reason: String,
    pub payload: String,
}

/// One message, decoded as far as it could be.
#[derive(Debug, Clone)]
enum Item {
    Rows(Vec<RowChange>),
    Truncate(TableName, OrderKey),
    Tombstone,
    Dead(DeadLetter),
}

/// One connection's worth of apply: holds the prepared statements.
pub struct Applier {
    client: Client,
    model: Arc<Model>,
    statements: Statements,
    /// Retries of a batch that met a deadlock or serialization failure.
    max_retries: u32,
}

impl Applier {
    pub async fn connect(url: &str, model: Arc<Model>) -> Result<Applier, ApplyError> {
        let client = db::connect(url).await?;
        let statements = Statements::prepare(&client, &model).await?;
        Ok(Applier {
            client,
            model,
            statements,
            max_retries: 20,
        })
    }

    /// Applies a batch of raw messages (one JSON document each) in one
    /// transaction. Invalid messages are dead-lettered in it; a message the
    /// target itself rejects is isolated by splitting the batch, and
    /// dead-lettered alone, so it never blocks the others.
    pub async fn apply_messages<M: AsRef<str>>(
        &mut self,
        messages: &[M],
    ) -> Result<ApplyStats, ApplyError> {
        let started = std::time::Instant::now();
        let mut newest_commit_ms: Option<i64> = None;
        let items: Vec<(Item, &str)> = messages
            .iter()
            .map(|m| {
                let (item, ts_ms) = self.decode(m.as_ref());
                newest_commit_ms = newest_commit_ms.max(ts_ms);
                (item, m.as_ref())
            })
            .collect();
        let stats = self.apply_items(&items).await?;
        record_metrics(&stats, messages.len(), started.elapsed(), newest_commit_ms);
        Ok(stats)
    }

    /// Writes `messages` to the dead-letter table with `reason`, without
    /// trying to apply them.
    pub async fn dead_letter<M: AsRef<str>>(
        &mut self,
        messages: &[M],
        reason: &str,
    ) -> Result<ApplyStats, ApplyError> {
        let items: Vec<(Item, &str)> = messages
            .iter()
            .map(|m| {
                let table = match event::parse_event(m.as_ref()) {
                    Ok(Parsed::Event(event)) => Some(event.table.to_string()),
                    _ => None,
                };
                let dead = Item::Dead(DeadLetter {
                    table,
                    reason: reason.to_string(),
                    payload: m.as_ref().to_string(),
                });
                (dead, m.as_ref())
            })
            .collect();
        let started = std::time::Instant::now();
        let stats = self.try_items(&items).await?;
        record_metrics(&stats, messages.len(), started.elapsed(), None);
        Ok(stats)
    }

    /// The message as an item, and the source commit time it carries (for
    /// the lag gauge).
    fn decode(&self, message: &str) -> (Item, Option<i64>) {
        match event::parse_event(message) {
            Ok(Parsed::Event(event)) => {
                let ts_ms = event.ts_ms;
                (self.decode_event(message, event), ts_ms)
            }
            Ok(Parsed::Tombstone) => (Item::Tombstone, None),
            Err(err) => (
                Item::Dead(DeadLetter {
                    table: None,
                    reason: err.to_string(),
                    payload: message.to_string(),
                }),
                None,
            ),
        }
    }

    fn decode_event(&self, message: &str, event: event::ChangeEvent) -> Item {
        let dead = |table: Option<&TableName>, reason: String| {
            Item::Dead(DeadLetter {
                table: table.map(|t| t.to_string()),
                reason,
                payload: message.to_string(),
            })
        };
        let Some(table) = self.model.tables.get(&event.table) else {
            return dead(
                Some(&event.table),
                format!("unknown table {}: no view reads it", event.table),
            );
        };
        match decode(&event, &table.meta, &table.stored_columns, &table.views) {
            Ok(Decoded::Rows(rows)) => Item::Rows(rows),
            Ok(Decoded::Truncate(table, key)) => Item::Truncate(table, key),
            Err(reason) => dead(Some(&event.table), reason),
        }
    }

    fn apply_items<'a>(
        &'a mut self,
        items: &'a [(Item, &'a str)],
    ) -> futures::future::BoxFuture<'a, Result<ApplyStats, ApplyError>> {
        Box::pin(async move {
            match self.try_items(items).await {
                Ok(stats) => Ok(stats),
                Err(err) if err.as_db_error().is_none() || db::is_unavailable(&err) => {
                    Err(err.into())
                }
                Err(err) => {
                    // The target rejected something in the batch: isolate it.
                    let live = items
                        .iter()
                        .filter(|(i, _)| !matches!(i, Item::Dead(_) | Item::Tombstone))
                        .count();
                    if live <= 1 {
                        let reason = format!("rejected by the target: {}", describe(&err));
                        let isolated: Vec<(Item, &str)> = items
                            .iter()
                            .map(|(item, raw)| match item {
                                Item::Rows(_) | Item::Truncate(..) => (
                                    Item::Dead(DeadLetter {
                                        table: item_table(item),
                                        reason: reason.clone(),
                                        payload: raw.to_string(),
                                    }),
                                    *raw,
                                ),
                                other => (other.clone(), *raw),
                            })
                            .collect();
                        tracing::warn!("dead-lettered an event: {reason}");
                        return self.try_items(&isolated).await.map_err(ApplyError::from);
                    }
                    let middle = items.len() / 2;
                    let mut stats = self.apply_items(&items[..middle]).await?;
                    stats += self.apply_items(&items[middle..]).await?;
                    Ok(stats)
                }
            }
        })
    }

    /// One transaction over `items`, retried on deadlock or serialization
    /// failure, which parallel appliers can cause and which must not escape.
    async fn try_items(
        &mut self,
        items: &[(Item, &str)],
    ) -> Result<ApplyStats, tokio_postgres::Error> {
        let mut changes = Vec::new();
        let mut truncates = Vec::new();
        let mut dead_letters = Vec::new();
        let mut tombstones = 0;
        for (item, _) in items {
            match item {
                Item::Rows(rows) => changes.extend(rows.iter().cloned()),
                Item::Truncate(table, key) => truncates.push((table.clone(), *key)),
                Item::Tombstone => tombstones += 1,
                Item::Dead(dead) => dead_letters.push(dead.clone()),
            }
        }
        let batch = coalesce(changes, truncates);
        let mut attempt = 0;
        loop {
            let tx = self.client.transaction().await?;
            let result =
                store::write_batch(&tx, &self.statements, &self.model, &batch, &dead_letters).await;
            let result = match result {
                Ok(stats) => tx.commit().await.map(|_| stats),
                Err(err) => Err(err),
            };
            match result {
                Ok(mut stats) => {
                    stats.tombstone_messages += tombstones;
                    return Ok(stats);
                }
                Err(err) if is_transient(&err) && attempt < self.max_retries => {
                    attempt += 1;
                    tracing::debug!("retrying batch after: {}", describe(&err));
                    let backoff = Duration::from_millis((5 * attempt as u64).min(200));
                    tokio::time::sleep(backoff + Duration::from_millis(rand::random::<u64>() % 10))
                        .await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Counts a committed batch in the process's metrics (see
/// `serve::metrics` for how they are exported). Recorded here, where every
/// way of applying (file, transport, dead-lettering) passes, and once per
/// batch, so the cost is a few atomic adds per transaction.
fn record_metrics(
    stats: &ApplyStats,
    messages: usize,
    took: Duration,
    newest_commit_ms: Option<i64>,
) {
    metrics::counter!("tally_events_applied_total").increment(stats.applied + stats.truncates);
    metrics::counter!("tally_events_coalesced_total").increment(stats.coalesced);
    metrics::counter!("tally_events_duplicate_total").increment(stats.duplicates);
    metrics::counter!("tally_events_stale_total").increment(stats.stale);
    metrics::counter!("tally_events_dead_lettered_total").increment(stats.dead_lettered);
    metrics::counter!("tally_batches_total").increment(1);
    metrics::histogram!("tally_apply_batch_size").record(messages as f64);
    metrics::histogram!("tally_apply_seconds").record(took.as_secs_f64());
    if let Some(commit_ms) = newest_commit_ms {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // From the source's commit to the target's: what a reader of the
        // view waits for a change.
        metrics::gauge!("tally_apply_lag_seconds").set((now_ms - commit_ms).max(0) as f64 / 1000.0);
    }
}

fn item_table(item: &Item) -> Option<String> {
    match item {
        Item::Rows(rows) => rows.first().map(|r| r.id.table.to_string()),
        Item::Truncate(table, _) => Some(table.to_string()),
        _ => None,
    }
}
