//! `tally vacuum`: reclaims ledger tombstones no event that can still be
//! delivered could need.
//!
//! A tombstone at key `K` exists so that a late event of its row with a key
//! below `K` is recognised as stale. It can go once no such event can come
//! any more. The horizon `H` below which nothing can come:
//!
//! - **capture** re-sends, after a restart, only transactions committed at
//!   or after its slot's confirmed LSN, and it confirms an LSN only once
//!   every event before it is durable in the transport (NATS) or committed
//!   in the target (embedded). So `H ≤ min(confirmed_flush_lsn)` over the
//!   source database's logical slots; taking the minimum over all of them
//!   also covers a `replay` or `verify --repair` in progress, whose
//!   temporary slot's consistent point is the key of the rows it sends.
//! - **embedded** transport: what is below the confirmed LSN is committed
//!   in the target; no redelivery window. `H = min(confirmed)`.
//! - **NATS** (work-queue stream): a message can be redelivered until it is
//!   acknowledged, and messages in the stream are not in key order (replays
//!   interleave with captured changes). Finding the smallest key among
//!   unacknowledged messages would mean reading them all, so vacuum is
//!   conservative: it reads the slots first, then requires the consumer to
//!   have nothing pending or unacknowledged; everything published before
//!   the slots' confirmed LSN is then applied. Otherwise it reclaims nothing
//!   and says why (run it when apply has caught up, e.g. off-peak).
//! - An events **file** applied again by hand is beyond any horizon; the
//!   vacuum horizon below makes its old events stale instead of letting
//!   them resurrect rows.
//!
//! Per table, in one target transaction: raise `tally.watermarks.vacuum_lsn`
//! to `H` (this waits for the table's batches in flight, which hold the row
//! `FOR SHARE`, and holds new ones until commit), then delete the
//! tombstones that committed below `H`. Apply treats a change with
//! `commit_lsn < vacuum_lsn` for a row the ledger does not hold as stale
//! (`apply::core::effective_watermark`), so even an event that slipped past
//! the horizon cannot bring a deleted row back.

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::db::describe;
use crate::event::{format_lsn, parse_lsn_text};

#[derive(Debug, Error)]
pub enum VacuumError {
    #[error("reading the replication slots on the source: {0}")]
    Source(String),
    #[error("table {table}: reclaiming tombstones in the target failed: {message}")]
    Target { table: String, message: String },
}

/// The oldest confirmed LSN of the source database's logical slots, and
/// how many slots there are.
const SLOTS_HORIZON: &str = "
SELECT min(confirmed_flush_lsn)::text, count(*)
FROM pg_replication_slots
WHERE slot_type = 'logical' AND database = current_database()";

const TABLES: &str = "SELECT tbl FROM tally.watermarks ORDER BY tbl";

/// Raises the table's vacuum horizon (never lowers it).
const RAISE_VACUUM_HORIZON: &str = "
UPDATE tally.watermarks SET vacuum_lsn = GREATEST(vacuum_lsn, $2) WHERE tbl = $1";

const DELETE_TOMBSTONES: &str =
    "DELETE FROM tally.ledger WHERE tbl = $1 AND deleted AND commit_lsn < $2";

const TOMBSTONES_LEFT: &str = "SELECT count(*) FROM tally.ledger WHERE deleted";

/// Where the safe horizon comes from, or why there is none now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Horizon {
    Safe(u64),
    Unsafe(String),
}

/// The horizon from the slots' confirmed LSN and, for NATS, the number of
/// messages not yet acknowledged (read after the slots).
pub async fn slots_horizon(source: &Client) -> Result<Horizon, VacuumError> {
    let row = source
        .query_one(SLOTS_HORIZON, &[])
        .await
        .map_err(|e| VacuumError::Source(describe(&e)))?;
    let slots: i64 = row.get(1);
    let confirmed = row
        .get::<_, Option<String>>(0)
        .and_then(|t| parse_lsn_text(&t));
    Ok(match confirmed {
        Some(lsn) if lsn > 0 => Horizon::Safe(lsn),
        _ if slots == 0 => Horizon::Unsafe(
            "the source has no logical replication slot, so nothing bounds the events still to come; nothing reclaimed".into(),
        ),
        _ => Horizon::Unsafe("a replication slot has no confirmed position yet; nothing reclaimed".into()),
    })
}

/// Combines the slots' horizon with the transport's unacknowledged
/// messages (`None`: the embedded transport, nothing outside the target).
pub fn combine(slots: Horizon, unacknowledged: Option<u64>) -> Horizon {
    match (slots, unacknowledged) {
        (Horizon::Unsafe(reason), _) => Horizon::Unsafe(reason),
        (Horizon::Safe(_), Some(n)) if n > 0 => Horizon::Unsafe(format!(
            "{n} messages in the NATS stream are not acknowledged yet and could be redelivered with any older key; nothing reclaimed (run vacuum when apply has caught up)"
        )),
        (safe, _) => safe,
    }
}

/// What a vacuum did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VacuumReport {
    /// The horizon used, as an LSN (`None`: nothing was safe to reclaim).
    pub horizon: Option<String>,
    /// Why nothing was reclaimed, when so.
    pub skipped: Option<String>,
    pub deleted: u64,
    /// Per table: tombstones deleted.
    pub tables: Vec<(String, u64)>,
    /// Tombstones kept (at or above the horizon).
    pub kept: i64,
}

/// Deletes the tombstones below `horizon`, table by table.
pub async fn vacuum(target: &mut Client, horizon: Horizon) -> Result<VacuumReport, VacuumError> {
    let failed = |table: &str, err: tokio_postgres::Error| VacuumError::Target {
        table: table.to_string(),
        message: describe(&err),
    };
    let mut report = VacuumReport::default();
    let lsn = match horizon {
        Horizon::Unsafe(reason) => {
            report.skipped = Some(reason);
            None
        }
        Horizon::Safe(lsn) => Some(lsn),
    };
    if let Some(lsn) = lsn {
        report.horizon = Some(format_lsn(lsn));
        let tables: Vec<String> = target
            .query(TABLES, &[])
            .await
            .map_err(|e| failed("tally.watermarks", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let bound = lsn as i64;
        for table in tables {
            let tx = target.transaction().await.map_err(|e| failed(&table, e))?;
            tx.execute(RAISE_VACUUM_HORIZON, &[&table, &bound])
                .await
                .map_err(|e| failed(&table, e))?;
            let deleted = tx
                .execute(DELETE_TOMBSTONES, &[&table, &bound])
                .await
                .map_err(|e| failed(&table, e))?;
            tx.commit().await.map_err(|e| failed(&table, e))?;
            report.deleted += deleted;
            report.tables.push((table, deleted));
        }
    }
    report.kept = target
        .query_one(TOMBSTONES_LEFT, &[])
        .await
        .map_err(|e| failed("tally.ledger", e))?
        .get(0);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_backlog_makes_the_horizon_unsafe() {
        assert_eq!(combine(Horizon::Safe(9), None), Horizon::Safe(9));
        assert_eq!(combine(Horizon::Safe(9), Some(0)), Horizon::Safe(9));
        assert!(
            matches!(combine(Horizon::Safe(9), Some(3)), Horizon::Unsafe(r) if r.contains("3 messages"))
        );
        assert!(matches!(
            combine(Horizon::Unsafe("x".into()), Some(0)),
            Horizon::Unsafe(r) if r == "x"
        ));
    }
}
