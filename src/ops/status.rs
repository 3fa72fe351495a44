//! `tally status`: how far behind the pipeline is and what the target
//! holds. [`collect`] returns a plain [`Status`] (serialisable), so the web
//! server can show the same numbers; [`render`] turns it into text.

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::apply::Model;
use crate::db::describe;
use crate::event::format_lsn;

#[derive(Debug, Error)]
pub enum StatusError {
    #[error("reading the replication slot on the source: {0}")]
    Source(String),
    #[error("reading {what} in the target: {message}")]
    Target { what: String, message: String },
}

/// The capture slot on the source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub active: bool,
    pub confirmed_lsn: Option<String>,
    /// Bytes of WAL written on the source that capture has not confirmed.
    pub lag_bytes: Option<i64>,
}

/// Messages waiting in the transport.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransportStatus {
    /// `embedded` or `nats`.
    pub kind: String,
    /// Not yet delivered to any applier (NATS `num_pending`); `None` for
    /// the embedded queue, which lives inside `tally run`.
    pub pending: Option<u64>,
    /// Delivered but not acknowledged (NATS `num_ack_pending`).
    pub ack_pending: Option<u64>,
}

/// One source table's ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableStatus {
    pub table: String,
    /// The greatest ordering key applied, `commit_lsn/lsn`.
    pub last_applied: Option<String>,
    pub rows: i64,
    pub tombstones: i64,
    /// Tombstones below this were reclaimed by `tally vacuum`.
    pub vacuum_horizon: Option<String>,
}

/// One view table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ViewStatus {
    pub view: String,
    pub rows: i64,
}

/// Everything `tally status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub slot: Option<SlotStatus>,
    pub transport: TransportStatus,
    pub tables: Vec<TableStatus>,
    pub dead_letters: i64,
    pub views: Vec<ViewStatus>,
}

const SLOT: &str = "
SELECT active, confirmed_flush_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = $1";

/// One pass over the ledger (no index serves a per-table maximum key; the
/// ledger is read once for all tables).
const LEDGER: &str = "
SELECT l.tbl, count(*) FILTER (WHERE NOT l.deleted), count(*) FILTER (WHERE l.deleted),
       (array_agg(l.commit_lsn ORDER BY l.commit_lsn DESC, l.lsn DESC))[1],
       (array_agg(l.lsn ORDER BY l.commit_lsn DESC, l.lsn DESC))[1]
FROM tally.ledger AS l GROUP BY l.tbl";

const VACUUM_HORIZONS: &str = "SELECT tbl, vacuum_lsn FROM tally.watermarks";

const DEAD_LETTERS: &str = "SELECT count(*) FROM tally.dead_letters";

/// Gathers the status. `transport` is what the caller learnt from the
/// transport (kind, pending, unacknowledged), so this needs no broker.
pub async fn collect(
    source: &Client,
    target: &Client,
    model: &Model,
    slot: &str,
    transport: TransportStatus,
) -> Result<Status, StatusError> {
    let target_error = |what: &str, err: tokio_postgres::Error| StatusError::Target {
        what: what.to_string(),
        message: describe(&err),
    };
    let slot = source
        .query_opt(SLOT, &[&slot])
        .await
        .map_err(|e| StatusError::Source(describe(&e)))?
        .map(|row| SlotStatus {
            name: slot.to_string(),
            active: row.get(0),
            confirmed_lsn: row.get(1),
            lag_bytes: row.get(2),
        });
    let horizons: std::collections::HashMap<String, i64> = target
        .query(VACUUM_HORIZONS, &[])
        .await
        .map_err(|e| target_error("tally.watermarks", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ledger = target
        .query(LEDGER, &[])
        .await
        .map_err(|e| target_error("tally.ledger", e))?;
    let mut tables: Vec<TableStatus> = model
        .tables
        .keys()
        .map(|t| TableStatus {
            table: t.to_string(),
            last_applied: None,
            rows: 0,
            tombstones: 0,
            vacuum_horizon: None,
        })
        .collect();
    for row in ledger {
        let name: String = row.get(0);
        let index = match tables.iter().position(|t| t.table == name) {
            Some(i) => i,
            None => {
                tables.push(TableStatus {
                    table: name.clone(),
                    last_applied: None,
                    rows: 0,
                    tombstones: 0,
                    vacuum_horizon: None,
                });
                tables.len() - 1
            }
        };
        let key: Option<(i64, i64)> = row.get::<_, Option<i64>>(3).zip(row.get(4));
        let entry = &mut tables[index];
        entry.rows = row.get(1);
        entry.tombstones = row.get(2);
        entry.last_applied = key
            .filter(|(commit_lsn, _)| *commit_lsn > 0)
            .map(|(c, l)| format!("{}/{}", format_lsn(c as u64), format_lsn(l as u64)));
    }
    for table in &mut tables {
        table.vacuum_horizon = horizons
            .get(&table.table)
            .filter(|h| **h > 0)
            .map(|h| format_lsn(*h as u64));
    }
    let dead_letters: i64 = target
        .query_one(DEAD_LETTERS, &[])
        .await
        .map_err(|e| target_error("tally.dead_letters", e))?
        .get(0);
    let mut views = Vec::new();
    for view in model.views() {
        let rows: i64 = target
            .query_one(&format!("SELECT count(*) FROM {}", view.quoted_name()), &[])
            .await
            .map_err(|e| target_error(view.name(), e))?
            .get(0);
        views.push(ViewStatus {
            view: view.name().to_string(),
            rows,
        });
    }
    Ok(Status {
        slot,
        transport,
        tables,
        dead_letters,
        views,
    })
}

/// The status as a few readable lines.
pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match &status.slot {
        Some(slot) => {
            let _ = writeln!(
                out,
                "slot \"{}\": {}, confirmed {}, lag {} bytes",
                slot.name,
                if slot.active { "active" } else { "inactive" },
                slot.confirmed_lsn.as_deref().unwrap_or("-"),
                slot.lag_bytes.map_or("-".to_string(), |b| b.to_string())
            );
        }
        None => {
            let _ = writeln!(out, "slot: none (run `tally bootstrap` or `tally run`)");
        }
    }
    let count = |n: Option<u64>| n.map_or("n/a".to_string(), |n| n.to_string());
    let _ = writeln!(
        out,
        "transport {}: pending {}, unacknowledged {}",
        status.transport.kind,
        count(status.transport.pending),
        count(status.transport.ack_pending)
    );
    for table in &status.tables {
        let _ = writeln!(
            out,
            "table {}: {} rows, {} tombstones, last applied {}{}",
            table.table,
            table.rows,
            table.tombstones,
            table.last_applied.as_deref().unwrap_or("-"),
            table
                .vacuum_horizon
                .as_ref()
                .map_or(String::new(), |h| format!(", vacuumed below {h}"))
        );
    }
    for view in &status.views {
        let _ = writeln!(out, "view {}: {} rows", view.view, view.rows);
    }
    let _ = writeln!(out, "dead letters: {}", status.dead_letters);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_number() {
        let status = Status {
            slot: Some(SlotStatus {
                name: "tally".into(),
                active: true,
                confirmed_lsn: Some("0/16B3748".into()),
                lag_bytes: Some(120),
            }),
            transport: TransportStatus {
                kind: "embedded".into(),
                pending: None,
                ack_pending: None,
            },
            tables: vec![TableStatus {
                table: "public.orders".into(),
                last_applied: Some("0/16B3700/0/16B36C0".into()),
                rows: 10,
                tombstones: 2,
                vacuum_horizon: None,
            }],
            dead_letters: 0,
            views: vec![ViewStatus {
                view: "customer_orders".into(),
                rows: 5,
            }],
        };
        let text = render(&status);
        assert!(
            text.contains("confirmed 0/16B3748, lag 120 bytes"),
            "{text}"
        );
        assert!(text.contains("pending n/a"), "{text}");
        assert!(
            text.contains("public.orders: 10 rows, 2 tombstones"),
            "{text}"
        );
        assert!(text.contains("view customer_orders: 5 rows"), "{text}");
        assert!(text.contains("dead letters: 0"), "{text}");
    }
}
