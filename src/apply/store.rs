//! The target side of apply: one transaction per batch that locks, guards,
//! writes the ledger and the view deltas, then commits. SQL lives in the
//! constants below; values are always bound as parameters.

use std::collections::{BTreeMap, HashMap};
use std::task::Poll;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_postgres::{Row as PgRow, Statement, Transaction};

use super::core::{Coalesced, LedgerRow, RowId, Verdict, effective_watermark, transition};
use super::{ApplyStats, DeadLetter, Model};
use crate::event::{OrderKey, Row, TableName};

pub const LOCK_WATERMARK_SHARED: &str =
    "SELECT commit_lsn, lsn, vacuum_lsn FROM tally.watermarks WHERE tbl = $1 FOR SHARE";
pub const LOCK_WATERMARK_EXCLUSIVE: &str =
    "SELECT commit_lsn, lsn, vacuum_lsn FROM tally.watermarks WHERE tbl = $1 FOR UPDATE";

/// Locks the batch's ledger rows in key order, creating an absent
/// placeholder (key zero) for rows never seen, so a row's first two
/// changes cannot race past each other. Returns what was stored.
pub const LOCK_LEDGER_ROWS: &str = "
INSERT INTO tally.ledger AS l (tbl, pk, commit_lsn, lsn, deleted, cols)
SELECT k.tbl, k.pk, 0, 0, true, NULL
FROM unnest($1::text[], $2::text[]) AS k(tbl, pk)
ORDER BY k.tbl COLLATE \"C\", k.pk COLLATE \"C\"
ON CONFLICT (tbl, pk) DO UPDATE SET deleted = l.deleted
RETURNING l.tbl, l.pk, l.commit_lsn, l.lsn, l.cols";

pub const WRITE_LEDGER_ROWS: &str = "
UPDATE tally.ledger AS l
SET commit_lsn = u.commit_lsn, lsn = u.lsn, deleted = u.cols IS NULL, cols = u.cols
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::jsonb[])
     AS u(tbl, pk, commit_lsn, lsn, cols)
WHERE l.tbl = u.tbl AND l.pk = u.pk";

/// Tombstones every row of a table older than the truncate, returning the
/// versions that contributed before.
pub const TRUNCATE_LEDGER: &str = "
UPDATE tally.ledger AS l
SET commit_lsn = $2, lsn = $3, deleted = true, cols = NULL
FROM tally.ledger AS o
WHERE o.tbl = $1 AND l.tbl = o.tbl AND l.pk = o.pk AND (o.commit_lsn, o.lsn) < ($2, $3)
RETURNING o.cols";

pub const RAISE_WATERMARK: &str = "
UPDATE tally.watermarks SET commit_lsn = $2, lsn = $3
WHERE tbl = $1 AND (commit_lsn, lsn) < ($2, $3)";

pub const INSERT_DEAD_LETTERS: &str = "
INSERT INTO tally.dead_letters (source_table, reason, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])";

/// The channel on which each batch transaction announces the views it
/// changed (a comma-separated list of names). Postgres delivers a
/// notification only when its transaction commits, so a listener (`tally
/// serve`) never hears of a change it cannot yet read.
pub const VIEWS_CHANNEL: &str = "tally_views";

pub const NOTIFY_VIEWS: &str = "SELECT pg_notify($1, $2)";

/// Statements prepared once per connection.
pub struct Statements {
    lock_watermark_shared: Statement,
    lock_watermark_exclusive: Statement,
    lock_ledger_rows: Statement,
    write_ledger_rows: Statement,
    truncate_ledger: Statement,
    raise_watermark: Statement,
    insert_dead_letters: Statement,
    notify_views: Statement,
    /// Per view name: its delta upsert and its empty-group delete.
    views: BTreeMap<String, (Statement, Option<Statement>)>,
}

impl Statements {
    pub async fn prepare(
        client: &tokio_postgres::Client,
        model: &Model,
    ) -> Result<Statements, tokio_postgres::Error> {
        let mut views = BTreeMap::new();
        for view in model.views() {
            let delta = client.prepare(&view.delta_sql()).await?;
            let delete = match view.delete_empty_sql() {
                Some(sql) => Some(client.prepare(&sql).await?),
                None => None,
            };
            views.insert(view.name().to_string(), (delta, delete));
        }
        Ok(Statements {
            lock_watermark_shared: client.prepare(LOCK_WATERMARK_SHARED).await?,
            lock_watermark_exclusive: client.prepare(LOCK_WATERMARK_EXCLUSIVE).await?,
            lock_ledger_rows: client.prepare(LOCK_LEDGER_ROWS).await?,
            write_ledger_rows: client.prepare(WRITE_LEDGER_ROWS).await?,
            truncate_ledger: client.prepare(TRUNCATE_LEDGER).await?,
            raise_watermark: client.prepare(RAISE_WATERMARK).await?,
            insert_dead_letters: client.prepare(INSERT_DEAD_LETTERS).await?,
            notify_views: client.prepare(NOTIFY_VIEWS).await?,
            views,
        })
    }
}

fn to_db(lsn: u64) -> i64 {
    lsn as i64
}

fn from_db(lsn: i64) -> u64 {
    lsn as u64
}

/// Old and new versions of rows of one table whose contribution changes.
type VersionPairs = (Vec<Option<Value>>, Vec<Option<Value>>);

/// Runs one batch inside `tx` (the caller commits). Returns the counters.
pub async fn write_batch(
    tx: &Transaction<'_>,
    statements: &Statements,
    model: &Model,
    batch: &Coalesced,
    dead_letters: &[DeadLetter],
) -> Result<ApplyStats, tokio_postgres::Error> {
    let mut stats = batch.stats;

    // 1. Watermarks first, in table order: shared for tables with row
    //    changes, exclusive for tables being truncated. A truncate thus
    //    waits for in-flight batches of its table and no lock cycle forms.
    let mut tables: Vec<&TableName> = batch.changes.iter().map(|c| &c.id.table).collect();
    tables.extend(batch.truncates.keys());
    tables.sort();
    tables.dedup();
    let table_texts: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    let change_tables: Vec<String> = batch
        .changes
        .iter()
        .map(|c| c.id.table.to_string())
        .collect();
    let change_pks: Vec<&str> = batch.changes.iter().map(|c| c.id.pk.as_str()).collect();
    let mut reads: Vec<BoxFuture<'_, Result<Vec<PgRow>, tokio_postgres::Error>>> = Vec::new();
    for (table, text) in tables.iter().zip(&table_texts) {
        let statement = if batch.truncates.contains_key(*table) {
            &statements.lock_watermark_exclusive
        } else {
            &statements.lock_watermark_shared
        };
        reads.push(Box::pin(async move { tx.query(statement, &[text]).await }));
    }
    // The changed rows' ledger keys. Without truncates their lock needs
    // nothing read before it, so it goes in the same round trip as the
    // watermark locks (sent, and so run, after them); a truncate must
    // tombstone rows first, so then it waits until step 3.
    let lock_early = !batch.changes.is_empty() && batch.truncates.is_empty();
    if lock_early {
        let (change_tables, change_pks) = (&change_tables, &change_pks);
        reads.push(Box::pin(async move {
            tx.query(&statements.lock_ledger_rows, &[change_tables, change_pks])
                .await
        }));
    }
    let mut read_rows = pipelined(reads).await?;
    let mut stored_rows = if lock_early { read_rows.pop() } else { None };
    let watermark_rows = read_rows.into_iter().map(|rows| rows.into_iter().next());
    let mut watermarks: HashMap<&TableName, OrderKey> = HashMap::new();
    let mut vacuum_horizons: HashMap<&TableName, u64> = HashMap::new();
    for (table, row) in tables.into_iter().zip(watermark_rows) {
        let key = row
            .as_ref()
            .map(|r| OrderKey::new(from_db(r.get(0)), from_db(r.get(1))))
            .unwrap_or(OrderKey::ZERO);
        watermarks.insert(table, key);
        let horizon = row.map(|r| from_db(r.get(2))).unwrap_or(0);
        vacuum_horizons.insert(table, horizon);
    }

    let mut pairs: BTreeMap<TableName, VersionPairs> = BTreeMap::new();

    // 2. Truncates: tombstone older rows, remove their contributions.
    for (table, key) in &batch.truncates {
        let watermark = watermarks.get(table).copied().unwrap_or(OrderKey::ZERO);
        if *key <= watermark {
            stats.stale += 1;
            continue;
        }
        let table_text = table.to_string();
        let (commit_lsn, lsn) = (to_db(key.commit_lsn), to_db(key.lsn));
        let removed = tx
            .query(
                &statements.truncate_ledger,
                &[&table_text, &commit_lsn, &lsn],
            )
            .await?;
        let entry = pairs.entry(table.clone()).or_default();
        for row in removed {
            let old: Option<Value> = row.get(0);
            if old.is_some() {
                entry.0.push(old);
                entry.1.push(None);
            }
        }
        tx.execute(
            &statements.raise_watermark,
            &[&table_text, &commit_lsn, &lsn],
        )
        .await?;
        watermarks.insert(table, *key);
        stats.truncates += 1;
    }

    // 3. Lock and read the stored rows (unless done above), guard each
    //    change, gather the ledger write.
    let mut write = LedgerWrite::default();
    if !batch.changes.is_empty() {
        let stored_rows = match stored_rows.take() {
            Some(rows) => rows,
            None => {
                tx.query(&statements.lock_ledger_rows, &[&change_tables, &change_pks])
                    .await?
            }
        };
        let mut stored: HashMap<(String, String), LedgerRow> =
            HashMap::with_capacity(stored_rows.len());
        for row in stored_rows {
            let cols: Option<Value> = row.get(4);
            stored.insert(
                (row.get(0), row.get(1)),
                LedgerRow {
                    key: OrderKey::new(from_db(row.get(2)), from_db(row.get(3))),
                    image: cols.and_then(into_row),
                },
            );
        }
        for (change, table_text) in batch.changes.iter().zip(&change_tables) {
            let current = stored
                .get(&(table_text.clone(), change.id.pk.clone()))
                .unwrap_or(&LedgerRow::ABSENT);
            let watermark = watermarks
                .get(&change.id.table)
                .copied()
                .unwrap_or(OrderKey::ZERO);
            let horizon = vacuum_horizons.get(&change.id.table).copied().unwrap_or(0);
            let watermark = effective_watermark(current, watermark, horizon);
            let step = transition(current, watermark, change);
            match step.verdict {
                Verdict::Duplicate => stats.duplicates += 1,
                Verdict::Stale => stats.stale += 1,
                Verdict::Apply => {
                    stats.applied += 1;
                    write.push(&change.id, step.next.key, step.next.image.clone());
                    if step.old_image != step.new_image {
                        let entry = pairs.entry(change.id.table.clone()).or_default();
                        entry.0.push(step.old_image.map(Value::Object));
                        entry.1.push(step.new_image.map(Value::Object));
                    }
                }
            }
        }
    }

    // 4. View deltas, views in name order, groups in key order.
    let mut view_work: Vec<(&str, &VersionPairs)> = Vec::new();
    for (table, versions) in &pairs {
        for view in model.views_of(table) {
            view_work.push((view.name(), versions));
        }
    }
    view_work.sort_by_key(|(name, _)| *name);
    let mut changed: Vec<&str> = Vec::new();
    for (name, _) in &view_work {
        if changed.last() != Some(name) {
            changed.push(name);
        }
    }
    let changed = changed.join(",");

    // 5. Dead letters, in the same transaction as the batch they came with.
    let dead_tables: Vec<Option<String>> = dead_letters.iter().map(|d| d.table.clone()).collect();
    let dead_reasons: Vec<&str> = dead_letters.iter().map(|d| d.reason.as_str()).collect();
    let dead_payloads: Vec<&str> = dead_letters.iter().map(|d| d.payload.as_str()).collect();

    // Every write of steps 3 to 5 depends on nothing it returns, so they go
    // out in one round trip (Postgres runs them in the order sent; the
    // first error fails the batch, as one at a time would).
    let mut writes: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = Vec::new();
    if !write.pks.is_empty() {
        let write = &write;
        writes.push(Box::pin(async move {
            tx.execute(
                &statements.write_ledger_rows,
                &[
                    &write.tables,
                    &write.pks,
                    &write.commit_lsns,
                    &write.lsns,
                    &write.cols,
                ],
            )
            .await
        }));
    }
    for (name, (old, new)) in &view_work {
        let (delta, delete_empty) = &statements.views[*name];
        writes.push(Box::pin(
            async move { tx.execute(delta, &[old, new]).await },
        ));
        if let Some(delete_empty) = delete_empty {
            writes.push(Box::pin(tx.execute(delete_empty, &[])));
        }
    }
    if !changed.is_empty() {
        let changed = &changed;
        writes.push(Box::pin(async move {
            tx.execute(&statements.notify_views, &[&VIEWS_CHANNEL, changed])
                .await
        }));
    }
    if !dead_letters.is_empty() {
        let (tables, reasons, payloads) = (&dead_tables, &dead_reasons, &dead_payloads);
        writes.push(Box::pin(async move {
            tx.execute(
                &statements.insert_dead_letters,
                &[tables, reasons, payloads],
            )
            .await
        }));
        stats.dead_lettered += dead_letters.len() as u64;
    }
    pipelined(writes).await?;
    Ok(stats)
}

/// Awaits `requests` together, polling each first in the order given:
/// tokio-postgres sends a request when its future is first polled, so the
/// server receives, and runs, them in this order, in one round trip.
/// Returns their results in order, or the first error.
async fn pipelined<T>(
    mut requests: Vec<BoxFuture<'_, Result<T, tokio_postgres::Error>>>,
) -> Result<Vec<T>, tokio_postgres::Error> {
    let mut results: Vec<Option<T>> = requests.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (request, result) in requests.iter_mut().zip(results.iter_mut()) {
            if result.is_some() {
                continue;
            }
            match request.as_mut().poll(cx) {
                Poll::Ready(Ok(value)) => *result = Some(value),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => waiting = true,
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    })
    .await?;
    Ok(results.into_iter().flatten().collect())
}

fn into_row(value: Value) -> Option<Row> {
    match value {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Column-wise arrays for the ledger update.
#[derive(Default)]
struct LedgerWrite {
    tables: Vec<String>,
    pks: Vec<String>,
    commit_lsns: Vec<i64>,
    lsns: Vec<i64>,
    cols: Vec<Option<Value>>,
}

impl LedgerWrite {
    fn push(&mut self, id: &RowId, key: OrderKey, image: Option<Row>) {
        self.tables.push(id.table.to_string());
        self.pks.push(id.pk.clone());
        self.commit_lsns.push(to_db(key.commit_lsn));
        self.lsns.push(to_db(key.lsn));
        self.cols.push(image.map(Value::Object));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgcluster::PgCluster;

    /// Requests reach the server in the order given, however many there
    /// are, and the first failure is the result.
    #[tokio::test]
    async fn pipelined_requests_run_in_the_order_given() {
        let cluster = tokio::task::spawn_blocking(PgCluster::start)
            .await
            .unwrap()
            .unwrap();
        let client = crate::db::connect(&cluster.url("postgres")).await.unwrap();
        client
            .batch_execute("CREATE TABLE seen (at serial PRIMARY KEY, n int NOT NULL)")
            .await
            .unwrap();
        let insert = client
            .prepare("INSERT INTO seen (n) VALUES ($1)")
            .await
            .unwrap();
        let numbers: Vec<i32> = (0..100).rev().collect();
        let requests: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = numbers
            .iter()
            .map(|n| {
                let (client, insert) = (&client, &insert);
                Box::pin(async move { client.execute(insert, &[n]).await }) as BoxFuture<'_, _>
            })
            .collect();
        assert_eq!(pipelined(requests).await.unwrap(), vec![1; 100]);
        let stored: Vec<i32> = client
            .query("SELECT n FROM seen ORDER BY at", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(stored, numbers);

        let failing: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = vec![
            Box::pin(client.execute("SELECT 1", &[])),
            Box::pin(client.execute("SELECT 1/0", &[])),
            Box::pin(client.execute("SELECT 2", &[])),
        ];
        let error = pipelined(failing).await.unwrap_err();
        assert_eq!(
            error.as_db_error().map(|e| e.message()),
            Some("division by zero"),
            "{error:?}"
        );
    }
}
