//! `tally verify`: is the target right? Three comparisons, each safe while
//! the pipeline runs:
//!
//! 1. **Ledger vs source rows.** The source is read in the snapshot of a
//!    temporary slot (consistent point `C`, see [`super::snapshot`]); each
//!    row goes through the same decoding as an event, and is compared with
//!    its ledger row in the columns the ledger keeps: *missing* (no live
//!    ledger row), *extra* (a live ledger row the source does not have),
//!    *different*. A ledger row whose key is at or past `C` is newer than
//!    the snapshot and not judged. Before reading the ledger, verify waits
//!    (briefly) for the capture slot to be confirmed past `C`: with the
//!    embedded transport everything committed before `C` is then applied.
//!    With NATS, appliers may still lag, so a difference only counts as
//!    drift if it is still there in every one of a few rounds, each with a
//!    fresh snapshot.
//! 2. **Views vs ledger.** Each view is rebuilt from its ledger in a
//!    transaction that locks out its table's appliers and is rolled back
//!    (see [`super::recalc`]): exact under any load.
//! 3. **Views vs their `SELECT` on the source**, the user-facing contract.
//!    The two databases are read at different moments, so under load a
//!    group being written differs for a moment; only differences present in
//!    every round count. Under heavy writes to few groups this comparison
//!    can still report groups in motion; 1 and 2 are exact.
//!
//! `--repair` fixes drift: ledger rows through replay events keyed `(C, 0)`
//! from the round that found them (extra rows get delete events with that
//! key, so a newer re-creation still wins), applied straight to the target
//! through the guarded batch path; then a recalc of each affected view; then
//! verify runs again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use thiserror::Error;
use tokio_postgres::Client;

use super::bootstrap::{RowOp, RowReader};
use super::recalc::{RecalcError, rebuild_view};
use super::snapshot::ExportedSnapshot;
use crate::apply::Model;
use crate::apply::core::Image;
use crate::apply::validate::{Decoded, decode};
use crate::capture::replication::ReplicationError;
use crate::catalog::TableMeta;
use crate::db::describe;
use crate::event::{self, Parsed, TableName, format_lsn, parse_lsn_text};
use crate::transport::{CapturedEvent, Publisher};

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("view \"{view}\": running its SELECT on the source failed: {message}")]
    Source { view: String, message: String },
    #[error("view \"{view}\": reading its table in the target failed: {message}")]
    Target { view: String, message: String },
    #[error("table {table}: reading rows from the source failed: {message}")]
    SourceRows { table: String, message: String },
    #[error("table {table}: reading the ledger in the target failed: {message}")]
    Ledger { table: String, message: String },
    #[error("taking a snapshot of the source (a temporary replication slot): {0}")]
    Snapshot(#[from] ReplicationError),
    #[error(transparent)]
    Recalc(#[from] RecalcError),
    #[error("repair: sending events to the target: {0}")]
    Repair(#[from] std::io::Error),
}

/// One row where a view table and its query on the source disagree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub view: String,
    /// The group key (an object of group columns; empty without groups).
    pub key: Value,
    /// What the source query returns; `None`: the source has no such row.
    pub expected: Option<Value>,
    /// What the view table holds; `None`: the table has no such row.
    pub found: Option<Value>,
    /// The columns whose values differ (all of them when a row is missing).
    pub columns: Vec<String>,
}

/// How a ledger row differs from its source row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerDriftKind {
    /// The source has the row; the ledger has no live row for it.
    Missing,
    /// The ledger has a live row the source does not have.
    Extra,
    /// Both have it, with different values in the kept columns.
    Different,
}

/// One source row whose ledger row is wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerDifference {
    pub table: String,
    /// The primary key as the ledger spells it (a JSON array).
    pub pk: String,
    pub kind: LedgerDriftKind,
    /// The kept columns of the source row (`None`: no such row).
    pub expected: Option<Value>,
    /// The kept columns of the ledger row (`None`: no live row).
    pub found: Option<Value>,
    /// The ledger row's key, `commit_lsn/lsn` (`None`: no ledger row).
    pub found_key: Option<String>,
    /// The consistent point of the snapshot the source row was read in.
    pub snapshot: String,
    /// The event that sets the ledger right, keyed `(C, 0)`.
    #[serde(skip)]
    repair_event: Option<CapturedEvent>,
}

/// Knobs of the racy comparisons.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The capture slot whose confirmed LSN tells how far the pipeline got.
    pub slot: String,
    /// Rounds a difference must survive to count as drift.
    pub rounds: u32,
    /// Pause between rounds.
    pub retry_delay: Duration,
    /// How long to wait for the capture slot to pass a snapshot.
    pub catch_up: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            slot: "tally".into(),
            rounds: 3,
            retry_delay: Duration::from_millis(700),
            catch_up: Duration::from_secs(10),
        }
    }
}

/// Everything one verify found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub tables_checked: usize,
    pub views_checked: usize,
    pub source_rows: u64,
    pub ledger: Vec<LedgerDifference>,
    pub views_vs_ledger: Vec<Difference>,
    pub views_vs_source: Vec<Difference>,
    pub drift: bool,
}

/// What `--repair` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RepairSummary {
    pub rows_replayed: u64,
    pub rows_deleted: u64,
    pub views_recalculated: Vec<String>,
}

const SLOT_CONFIRMED: &str =
    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND active";

/// Source rows whose ledger row is absent, a tombstone, or different.
const LEDGER_MISMATCHES: &str = "
SELECT s.pk, s.cols, l.commit_lsn, l.lsn, l.deleted, l.cols
FROM unnest($2::text[], $3::jsonb[]) AS s(pk, cols)
LEFT JOIN tally.ledger AS l ON l.tbl = $1 AND l.pk = s.pk
WHERE l.pk IS NULL OR l.deleted OR l.cols IS DISTINCT FROM s.cols";

/// Live ledger rows older than the snapshot that the source does not have.
const LEDGER_EXTRAS: &str = "
SELECT l.pk, l.commit_lsn, l.lsn, l.cols
FROM tally.ledger AS l
WHERE l.tbl = $1 AND NOT l.deleted AND l.commit_lsn < $3
  AND NOT EXISTS (SELECT 1 FROM unnest($2::text[]) AS s(pk) WHERE s.pk = l.pk)";

/// Runs all three comparisons.
pub async fn verify_all(
    source: &mut Client,
    source_url: &str,
    target: &mut Client,
    model: &Model,
    options: &VerifyOptions,
) -> Result<Report, VerifyError> {
    let mut report = Report {
        tables_checked: model.tables.len(),
        views_checked: model.views().count(),
        ..Report::default()
    };
    // 1. Ledger vs source, in rounds.
    let mut surviving: Option<BTreeMap<(String, String), LedgerDifference>> = None;
    for round in 0..options.rounds.max(1) {
        if round > 0 {
            tokio::time::sleep(options.retry_delay).await;
        }
        let (found, rows) = ledger_round(source, source_url, target, model, options).await?;
        report.source_rows = rows;
        let found: BTreeMap<_, _> = found
            .into_iter()
            .map(|d| ((d.table.clone(), d.pk.clone()), d))
            .collect();
        let next: BTreeMap<_, _> = match surviving {
            None => found,
            Some(previous) => found
                .into_iter()
                .filter(|(k, _)| previous.contains_key(k))
                .collect(),
        };
        let empty = next.is_empty();
        surviving = Some(next);
        if empty {
            break;
        }
    }
    report.ledger = surviving.unwrap_or_default().into_values().collect();
    // 2. Views vs ledger, exact.
    for (table, table_model) in &model.tables {
        for view in &table_model.views {
            let rebuilt = rebuild_view(target, view, table, false).await?;
            report.views_vs_ledger.extend(rebuilt.differences);
        }
    }
    // 3. Views vs the source, in rounds.
    let mut surviving: Option<Vec<Difference>> = None;
    for round in 0..options.rounds.max(1) {
        if round > 0 {
            tokio::time::sleep(options.retry_delay).await;
        }
        let found = verify_views(source, target, model).await?;
        let next: Vec<Difference> = match surviving {
            None => found,
            Some(previous) => found
                .into_iter()
                .filter(|d| previous.iter().any(|p| p.view == d.view && p.key == d.key))
                .collect(),
        };
        let empty = next.is_empty();
        surviving = Some(next);
        if empty {
            break;
        }
    }
    report.views_vs_source = surviving.unwrap_or_default();
    report.drift = !(report.ledger.is_empty()
        && report.views_vs_ledger.is_empty()
        && report.views_vs_source.is_empty());
    Ok(report)
}

/// Waits until the capture slot is confirmed at or past `point`, for at
/// most `limit`; without an active slot there is nothing to wait for.
async fn wait_for_slot(source: &Client, slot: &str, point: u64, limit: Duration) {
    let started = std::time::Instant::now();
    loop {
        let confirmed = match source.query_opt(SLOT_CONFIRMED, &[&slot]).await {
            Ok(Some(row)) => row
                .get::<_, Option<String>>(0)
                .and_then(|t| parse_lsn_text(&t)),
            _ => return,
        };
        match confirmed {
            Some(lsn) if lsn >= point => return,
            None => return,
            Some(_) if started.elapsed() >= limit => {
                tracing::warn!(
                    "slot \"{slot}\" is not confirmed past {} after {limit:?}; comparing anyway",
                    format_lsn(point)
                );
                return;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One snapshot's comparison of every table's rows with the ledger.
async fn ledger_round(
    source: &mut Client,
    source_url: &str,
    target: &Client,
    model: &Model,
    options: &VerifyOptions,
) -> Result<(Vec<LedgerDifference>, u64), VerifyError> {
    let snapshot = ExportedSnapshot::take(source_url, "verify").await?;
    let point = snapshot.consistent_point;
    wait_for_slot(source, &options.slot, point, options.catch_up).await;
    let mut differences = Vec::new();
    let mut total_rows = 0u64;
    let source_error = |table: &TableName, message: String| VerifyError::SourceRows {
        table: table.to_string(),
        message,
    };
    let tx = snapshot
        .begin(source)
        .await
        .map_err(|m| source_error(&TableName::public("?"), m))?;
    for (table, table_model) in &model.tables {
        let ledger_error = |err: tokio_postgres::Error| VerifyError::Ledger {
            table: table.to_string(),
            message: describe(&err),
        };
        let table_text = table.to_string();
        let shared_table = Arc::new(table.clone());
        let mut reader = RowReader::new(&table_model.meta, point, RowOp::Read, None);
        let mut all_pks: Vec<String> = Vec::new();
        loop {
            let chunk = reader
                .next_chunk(&tx)
                .await
                .map_err(|e| source_error(table, describe(&e)))?;
            if chunk.is_empty() {
                break;
            }
            total_rows += chunk.len() as u64;
            let mut pks = Vec::with_capacity(chunk.len());
            let mut cols = Vec::with_capacity(chunk.len());
            let mut events: BTreeMap<String, CapturedEvent> = BTreeMap::new();
            for row in chunk {
                let Some((pk, image)) =
                    decode_row(&row.json, &table_model.meta, &table_model.stored_columns)
                else {
                    tracing::warn!(
                        "table {table}: a source row with key {:?} does not decode; skipped",
                        row.key
                    );
                    continue;
                };
                pks.push(pk.clone());
                cols.push(image);
                events.insert(
                    pk,
                    CapturedEvent {
                        table: shared_table.clone(),
                        commit_lsn: point,
                        lsn: 0,
                        row_key: row.key.join("\u{1f}"),
                        json: row.json,
                    },
                );
            }
            let mismatches = target
                .query(LEDGER_MISMATCHES, &[&table_text, &pks, &cols])
                .await
                .map_err(ledger_error)?;
            for row in mismatches {
                let pk: String = row.get(0);
                let expected: Value = row.get(1);
                let commit_lsn: Option<i64> = row.get(2);
                let lsn: Option<i64> = row.get(3);
                let deleted: Option<bool> = row.get(4);
                let found: Option<Value> = row.get(5);
                if commit_lsn.is_some_and(|c| c as u64 >= point) {
                    continue; // newer than the snapshot: not ours to judge
                }
                let kind = if deleted.unwrap_or(true) {
                    LedgerDriftKind::Missing
                } else {
                    LedgerDriftKind::Different
                };
                differences.push(LedgerDifference {
                    table: table_text.clone(),
                    kind,
                    found_key: commit_lsn.zip(lsn).map(|(c, l)| key_text(c, l)),
                    expected: Some(expected),
                    found: if kind == LedgerDriftKind::Missing {
                        None
                    } else {
                        found
                    },
                    snapshot: format_lsn(point),
                    repair_event: events.remove(&pk),
                    pk,
                });
            }
            all_pks.extend(pks);
        }
        let extras = target
            .query(LEDGER_EXTRAS, &[&table_text, &all_pks, &(point as i64)])
            .await
            .map_err(ledger_error)?;
        for row in extras {
            let pk: String = row.get(0);
            let repair_event =
                delete_event(&table_model.meta, &pk, point).map(|json| CapturedEvent {
                    table: shared_table.clone(),
                    commit_lsn: point,
                    lsn: 0,
                    row_key: pk.clone(),
                    json,
                });
            differences.push(LedgerDifference {
                table: table_text.clone(),
                kind: LedgerDriftKind::Extra,
                found_key: Some(key_text(row.get(1), row.get(2))),
                expected: None,
                found: row.get(3),
                snapshot: format_lsn(point),
                repair_event,
                pk,
            });
        }
    }
    tx.commit()
        .await
        .map_err(|e| source_error(&TableName::public("?"), describe(&e)))?;
    Ok((differences, total_rows))
}

fn key_text(commit_lsn: i64, lsn: i64) -> String {
    format!(
        "{}/{}",
        format_lsn(commit_lsn as u64),
        format_lsn(lsn as u64)
    )
}

/// The primary key and kept columns of a rendered source row, decoded
/// exactly as apply decodes an event.
fn decode_row(json: &str, meta: &TableMeta, stored_columns: &[String]) -> Option<(String, Value)> {
    let Ok(Parsed::Event(event)) = event::parse_event(json) else {
        return None;
    };
    match decode(&event, meta, stored_columns) {
        Ok(Decoded::Rows(rows)) => rows.into_iter().find_map(|change| match change.image {
            Image::Row(row) => Some((change.id.pk, Value::Object(row))),
            Image::Deleted => None,
        }),
        _ => None,
    }
}

/// A delete event for the row with ledger key `pk`, keyed `(point, 0)`.
fn delete_event(meta: &TableMeta, pk: &str, point: u64) -> Option<String> {
    let values: Vec<Value> = serde_json::from_str(pk).ok()?;
    if values.len() != meta.primary_key.len() {
        return None;
    }
    let before: serde_json::Map<String, Value> =
        meta.primary_key.iter().cloned().zip(values).collect();
    Some(
        json!({
            "before": before,
            "after": null,
            "op": "d",
            "source": {
                "connector": "tally",
                "schema": meta.name.schema,
                "table": meta.name.name,
                "lsn": 0,
                "commit_lsn": point,
            }
        })
        .to_string(),
    )
}

/// Fixes what `report` found: ledger rows through replay and delete events
/// sent to `sink` (durable on return), then a rebuild of every view that
/// drifted or whose table's ledger did. Verify again afterwards.
pub async fn repair<S: Publisher + Send>(
    report: &Report,
    sink: &mut S,
    target: &mut Client,
    model: &Model,
) -> Result<RepairSummary, VerifyError> {
    let mut summary = RepairSummary::default();
    let mut tables: BTreeSet<String> = BTreeSet::new();
    for difference in &report.ledger {
        if let Some(event) = &difference.repair_event {
            sink.publish(event.clone()).await?;
            if difference.kind == LedgerDriftKind::Extra {
                summary.rows_deleted += 1;
            } else {
                summary.rows_replayed += 1;
            }
        }
        tables.insert(difference.table.clone());
    }
    sink.make_durable().await?;
    let mut views: BTreeSet<&str> = BTreeSet::new();
    views.extend(report.views_vs_ledger.iter().map(|d| d.view.as_str()));
    views.extend(report.views_vs_source.iter().map(|d| d.view.as_str()));
    for (table, table_model) in &model.tables {
        for view in &table_model.views {
            if tables.contains(&table.to_string()) || views.contains(view.name()) {
                let rebuilt = rebuild_view(target, view, table, true).await?;
                tracing::info!(
                    "repair: view \"{}\" rebuilt from the ledger ({} rows changed)",
                    view.name(),
                    rebuilt.differences.len()
                );
                summary.views_recalculated.push(view.name().to_string());
            }
        }
    }
    Ok(summary)
}

/// Compares every view; returns all differences (empty when equal).
pub async fn verify_views(
    source: &Client,
    target: &Client,
    model: &Model,
) -> Result<Vec<Difference>, VerifyError> {
    let mut differences = Vec::new();
    for view in model.views() {
        let expected: String = source
            .query_one(&view.expected_rows_sql(), &[])
            .await
            .map_err(|err| VerifyError::Source {
                view: view.name().to_string(),
                message: describe(&err),
            })?
            .get(0);
        let rows = target
            .query(&view.compare_sql(), &[&expected])
            .await
            .map_err(|err| VerifyError::Target {
                view: view.name().to_string(),
                message: describe(&err),
            })?;
        for row in rows {
            differences.push(Difference {
                view: view.name().to_string(),
                key: row.get(0),
                expected: row.get(1),
                found: row.get(2),
                columns: serde_json::from_value(row.get(3)).unwrap_or_default(),
            });
        }
    }
    Ok(differences)
}

/// A readable report: one line per difference, at most `limit` lines, then
/// totals per view.
pub fn render_report(differences: &[Difference], views_checked: usize, limit: usize) -> String {
    let mut out = String::new();
    if differences.is_empty() {
        let _ = writeln!(
            out,
            "verify: all {views_checked} views equal their SELECT on the source"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<32} {:<40} found",
        "view", "group key", "expected"
    );
    for difference in differences.iter().take(limit) {
        let show = |v: &Option<Value>| v.as_ref().map_or("(no row)".to_string(), Value::to_string);
        let _ = writeln!(
            out,
            "{:<24} {:<32} {:<40} {}",
            difference.view,
            difference.key.to_string(),
            show(&difference.expected),
            show(&difference.found)
        );
    }
    if differences.len() > limit {
        let _ = writeln!(out, "… and {} more", differences.len() - limit);
    }
    let mut per_view: Vec<(&str, usize)> = Vec::new();
    for difference in differences {
        match per_view.iter_mut().find(|(v, _)| *v == difference.view) {
            Some((_, n)) => *n += 1,
            None => per_view.push((&difference.view, 1)),
        }
    }
    let summary: Vec<String> = per_view.iter().map(|(v, n)| format!("{v}: {n}")).collect();
    let _ = writeln!(
        out,
        "verify: DRIFT in {} of {views_checked} views ({} rows differ; {})",
        per_view.len(),
        differences.len(),
        summary.join(", ")
    );
    out
}

/// The whole report, readable: at most `limit` lines per comparison, then
/// totals (always complete).
pub fn render_full(report: &Report, limit: usize) -> String {
    let mut out = String::new();
    let show = |v: &Option<Value>| v.as_ref().map_or("(no row)".to_string(), Value::to_string);
    if !report.ledger.is_empty() {
        let _ = writeln!(out, "ledger vs source rows:");
        let _ = writeln!(
            out,
            "  {:<20} {:<16} {:<10} {:<40} found",
            "table", "primary key", "kind", "source"
        );
        for d in report.ledger.iter().take(limit) {
            let kind = match d.kind {
                LedgerDriftKind::Missing => "missing",
                LedgerDriftKind::Extra => "extra",
                LedgerDriftKind::Different => "different",
            };
            let _ = writeln!(
                out,
                "  {:<20} {:<16} {:<10} {:<40} {}",
                d.table,
                d.pk,
                kind,
                show(&d.expected),
                show(&d.found)
            );
        }
        if report.ledger.len() > limit {
            let _ = writeln!(out, "  … and {} more", report.ledger.len() - limit);
        }
    }
    for (title, differences) in [
        (
            "views vs their ledger (expected: rebuilt from the ledger):",
            &report.views_vs_ledger,
        ),
        (
            "views vs their SELECT on the source:",
            &report.views_vs_source,
        ),
    ] {
        if differences.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}");
        let _ = writeln!(
            out,
            "  {:<24} {:<32} {:<40} found",
            "view", "group key", "expected"
        );
        for d in differences.iter().take(limit) {
            let _ = writeln!(
                out,
                "  {:<24} {:<32} {:<40} {}",
                d.view,
                d.key.to_string(),
                show(&d.expected),
                show(&d.found)
            );
        }
        if differences.len() > limit {
            let _ = writeln!(out, "  … and {} more", differences.len() - limit);
        }
    }
    let count = |kind| report.ledger.iter().filter(|d| d.kind == kind).count();
    if report.drift {
        let views = |ds: &[Difference]| {
            ds.iter()
                .map(|d| d.view.as_str())
                .collect::<BTreeSet<_>>()
                .len()
        };
        let _ = writeln!(
            out,
            "verify: DRIFT: ledger {} missing, {} extra, {} different (of {} source rows in {} tables); views vs ledger {} rows in {} of {} views; views vs source {} rows in {} views",
            count(LedgerDriftKind::Missing),
            count(LedgerDriftKind::Extra),
            count(LedgerDriftKind::Different),
            report.source_rows,
            report.tables_checked,
            report.views_vs_ledger.len(),
            views(&report.views_vs_ledger),
            report.views_checked,
            report.views_vs_source.len(),
            views(&report.views_vs_source),
        );
    } else {
        let _ = writeln!(
            out,
            "verify: OK: {} source rows in {} tables match the ledger; all {} views equal their ledger and their SELECT on the source",
            report.source_rows, report.tables_checked, report.views_checked
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn report_lists_rows_and_totals() {
        let differences = vec![
            Difference {
                view: "balance".into(),
                key: json!({"customer_id": 1}),
                expected: Some(json!({"customer_id": 1, "balance": "10.00"})),
                found: Some(json!({"customer_id": 1, "balance": "12.00"})),
                columns: vec!["balance".into()],
            },
            Difference {
                view: "balance".into(),
                key: json!({"customer_id": 2}),
                expected: None,
                found: Some(json!({"customer_id": 2, "balance": "1.00"})),
                columns: vec!["customer_id".into(), "balance".into()],
            },
        ];
        let report = render_report(&differences, 3, 1);
        assert!(report.contains("\"balance\":\"10.00\""), "{report}");
        assert!(report.contains("… and 1 more"), "{report}");
        assert!(
            report.contains("DRIFT in 1 of 3 views (2 rows differ; balance: 2)"),
            "{report}"
        );
        assert!(render_report(&[], 3, 10).contains("all 3 views equal"));
    }
}
