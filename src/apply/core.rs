//! The pure heart of apply: coalescing a batch, the ordering guard, and the
//! ledger transition that yields each row's old and new version.
//!
//! Nothing here does I/O, so every rule can be tested exhaustively. The SQL
//! side (`store`) only locks, feeds stored state in, and writes the plan out.

use std::collections::{BTreeMap, HashMap};

use crate::event::{OrderKey, Row, TableName, UNCHANGED_TOAST};

/// Identity of one source row: its table and canonical primary-key text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowId {
    pub table: TableName,
    /// The primary-key values as a JSON array text, in key-column order.
    pub pk: String,
}

/// What a change says the row looks like afterwards.
#[derive(Debug, Clone, PartialEq)]
pub enum Image {
    /// The row exists with these (view-relevant) column values.
    Row(Row),
    /// The row is gone.
    Deleted,
}

/// One row-level change, after parsing and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    pub id: RowId,
    pub key: OrderKey,
    pub image: Image,
}

/// What the ledger holds for a row. A row never seen is `LedgerRow::ABSENT`:
/// key zero and no image, which every real event beats.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    pub key: OrderKey,
    /// `None` for a tombstone (or a row never seen).
    pub image: Option<Row>,
}

impl LedgerRow {
    pub const ABSENT: LedgerRow = LedgerRow {
        key: OrderKey::ZERO,
        image: None,
    };
}

/// The guard's decision for one incoming change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Apply,
    /// Same key as stored: a redelivery.
    Duplicate,
    /// Older than what is stored, or at or below the table's truncate
    /// watermark: a late arrival whose effect is already superseded.
    Stale,
}

/// The ordering guard (DESIGN.md, "Ledger and apply", step 3).
pub fn guard(stored: OrderKey, watermark: OrderKey, incoming: OrderKey) -> Verdict {
    if incoming <= watermark {
        Verdict::Stale
    } else if incoming == stored {
        Verdict::Duplicate
    } else if incoming < stored {
        Verdict::Stale
    } else {
        Verdict::Apply
    }
}

/// The watermark an incoming change is guarded by: the table's truncate
/// watermark, and for a row the ledger does not hold (never seen, or its
/// tombstone reclaimed by `vacuum`) also the table's vacuum horizon.
///
/// `vacuum` deletes tombstones only below a horizon no deliverable event is
/// under; it raises `vacuum_horizon` to that LSN in the same transaction. An
/// event for an absent row that still commits below the horizon can only be
/// a stale copy of a change whose tombstone was reclaimed (e.g. an old
/// events file applied again), so it must not resurrect the row: every
/// change with `commit_lsn < vacuum_horizon` is stale for an absent row.
pub fn effective_watermark(
    stored: &LedgerRow,
    truncate: OrderKey,
    vacuum_horizon: u64,
) -> OrderKey {
    if stored.key != OrderKey::ZERO || vacuum_horizon == 0 {
        return truncate;
    }
    // The greatest key with commit_lsn below the horizon: guard treats keys
    // at or below it as stale.
    let floor = OrderKey::new(vacuum_horizon - 1, u64::MAX);
    truncate.max(floor)
}

/// Counters over everything apply saw. Kept as plain numbers so batches,
/// workers and runs can be added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Row changes written to the ledger (and their deltas to the views).
    pub applied: u64,
    /// Truncates that moved a table's watermark.
    pub truncates: u64,
    /// Older versions inside one batch, never visible because the batch
    /// commits atomically.
    pub coalesced: u64,
    /// Redeliveries of a change already applied.
    pub duplicates: u64,
    /// Late arrivals of a change already superseded.
    pub stale: u64,
    /// Events quarantined in the dead-letter table.
    pub dead_lettered: u64,
    /// Debezium's empty delete tombstone messages, ignored.
    pub tombstone_messages: u64,
}

impl std::ops::AddAssign for ApplyStats {
    fn add_assign(&mut self, other: ApplyStats) {
        self.applied += other.applied;
        self.truncates += other.truncates;
        self.coalesced += other.coalesced;
        self.duplicates += other.duplicates;
        self.stale += other.stale;
        self.dead_lettered += other.dead_lettered;
        self.tombstone_messages += other.tombstone_messages;
    }
}

impl std::fmt::Display for ApplyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "applied {}, coalesced {}, dropped {} duplicate + {} stale, truncates {}, dead-lettered {}, delete tombstone messages ignored {}",
            self.applied,
            self.coalesced,
            self.duplicates,
            self.stale,
            self.truncates,
            self.dead_lettered,
            self.tombstone_messages
        )
    }
}

/// A batch reduced to what can matter: per row the change with the greatest
/// key, and per table the greatest truncate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Coalesced {
    /// Sorted by `RowId`, so locks are always taken in the same order.
    pub changes: Vec<RowChange>,
    pub truncates: BTreeMap<TableName, OrderKey>,
    pub stats: ApplyStats,
}

/// Keeps, per row, only the change with the greatest key; drops changes that
/// a truncate in the same batch supersedes.
pub fn coalesce(
    changes: impl IntoIterator<Item = RowChange>,
    truncates: impl IntoIterator<Item = (TableName, OrderKey)>,
) -> Coalesced {
    let mut stats = ApplyStats::default();
    let mut latest_truncate: BTreeMap<TableName, OrderKey> = BTreeMap::new();
    for (table, key) in truncates {
        let slot = latest_truncate.entry(table).or_insert(key);
        if key == *slot {
            // first sight, or a redelivered truncate
        } else if key > *slot {
            *slot = key;
            stats.coalesced += 1;
        } else {
            stats.coalesced += 1;
        }
    }
    let mut latest: HashMap<RowId, RowChange> = HashMap::new();
    for change in changes {
        if let Some(truncate_key) = latest_truncate.get(&change.id.table)
            && change.key <= *truncate_key
        {
            stats.stale += 1;
            continue;
        }
        match latest.get_mut(&change.id) {
            None => {
                latest.insert(change.id.clone(), change);
            }
            Some(kept) if change.key == kept.key => stats.duplicates += 1,
            Some(kept) => {
                stats.coalesced += 1;
                if change.key > kept.key {
                    *kept = merge_unchanged_toast(change, Some(kept));
                }
            }
        }
    }
    let mut changes: Vec<RowChange> = latest.into_values().collect();
    changes.sort_by(|a, b| a.id.cmp(&b.id));
    Coalesced {
        changes,
        truncates: latest_truncate,
        stats,
    }
}

/// A newer change whose unchanged TOASTed columns carry Debezium's
/// placeholder takes those values from the version it replaces, when that
/// version is known and has them.
fn merge_unchanged_toast(mut newer: RowChange, older: Option<&RowChange>) -> RowChange {
    if let (
        Image::Row(row),
        Some(RowChange {
            image: Image::Row(previous),
            ..
        }),
    ) = (&mut newer.image, older)
    {
        fill_unchanged_toast(row, Some(previous));
    }
    newer
}

/// Replaces placeholder values in `row` with the ones in `previous`.
pub fn fill_unchanged_toast(row: &mut Row, previous: Option<&Row>) {
    for (column, value) in row.iter_mut() {
        if value.as_str() == Some(UNCHANGED_TOAST)
            && let Some(stored) = previous.and_then(|p| p.get(column))
        {
            *value = stored.clone();
        }
    }
}

/// Whether a row still holds a placeholder nothing could fill.
pub fn has_unfilled_toast(row: &Row) -> bool {
    row.values().any(|v| v.as_str() == Some(UNCHANGED_TOAST))
}

/// The outcome of guarding one change against the stored ledger row.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub verdict: Verdict,
    /// The ledger row to store (unchanged unless the verdict is `Apply`).
    pub next: LedgerRow,
    /// The version that contributed to the views before (`None`: nothing).
    pub old_image: Option<Row>,
    /// The version that contributes after (`None`: nothing).
    pub new_image: Option<Row>,
}

/// Guards `change` against `stored` and computes the next ledger row. Old
/// contributions come from the ledger, never from the event, so key-only
/// deletes are enough.
pub fn transition(stored: &LedgerRow, watermark: OrderKey, change: &RowChange) -> Transition {
    let verdict = guard(stored.key, watermark, change.key);
    if verdict != Verdict::Apply {
        return Transition {
            verdict,
            next: stored.clone(),
            old_image: stored.image.clone(),
            new_image: stored.image.clone(),
        };
    }
    let new_image = match &change.image {
        Image::Deleted => None,
        Image::Row(row) => {
            let mut row = row.clone();
            fill_unchanged_toast(&mut row, stored.image.as_ref());
            Some(row)
        }
    };
    Transition {
        verdict,
        next: LedgerRow {
            key: change.key,
            image: new_image.clone(),
        },
        old_image: stored.image.clone(),
        new_image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(pk: i64) -> RowId {
        RowId {
            table: TableName::public("invoices"),
            pk: format!("[{pk}]"),
        }
    }

    fn row(total: i64) -> Image {
        Image::Row(json!({ "total": total }).as_object().unwrap().clone())
    }

    fn change(pk: i64, lsn: u64, image: Image) -> RowChange {
        RowChange {
            id: id(pk),
            key: OrderKey::new(lsn, lsn),
            image,
        }
    }

    #[test]
    fn vacuum_horizon_guards_only_absent_rows() {
        let k = |n| OrderKey::new(n, n);
        let horizon = 100;
        // An absent row: anything committed below the horizon is stale.
        let absent = effective_watermark(&LedgerRow::ABSENT, k(0), horizon);
        assert_eq!(
            guard(OrderKey::ZERO, absent, OrderKey::new(99, 500)),
            Verdict::Stale
        );
        assert_eq!(
            guard(OrderKey::ZERO, absent, OrderKey::new(100, 0)),
            Verdict::Apply
        );
        assert_eq!(guard(OrderKey::ZERO, absent, k(150)), Verdict::Apply);
        // A truncate above the horizon still rules.
        assert_eq!(
            effective_watermark(&LedgerRow::ABSENT, k(200), horizon),
            k(200)
        );
        // A row the ledger holds is guarded by its own key alone.
        let held = LedgerRow {
            key: k(40),
            image: None,
        };
        assert_eq!(effective_watermark(&held, k(0), horizon), k(0));
        assert_eq!(guard(held.key, k(0), k(50)), Verdict::Apply);
        // No vacuum yet: nothing changes.
        assert_eq!(effective_watermark(&LedgerRow::ABSENT, k(3), 0), k(3));
    }

    #[test]
    fn guard_orders_by_key_and_watermark() {
        let k = |n| OrderKey::new(n, n);
        assert_eq!(guard(k(0), k(0), k(5)), Verdict::Apply);
        assert_eq!(guard(k(5), k(0), k(5)), Verdict::Duplicate);
        assert_eq!(guard(k(6), k(0), k(5)), Verdict::Stale);
        assert_eq!(guard(k(0), k(7), k(5)), Verdict::Stale);
        assert_eq!(guard(k(0), k(5), k(5)), Verdict::Stale);
        // Same commit, later change in the transaction wins.
        assert_eq!(
            guard(OrderKey::new(9, 3), k(0), OrderKey::new(9, 4)),
            Verdict::Apply
        );
        // A change from a transaction that committed later wins even if its
        // own LSN is smaller (it began earlier).
        assert_eq!(
            guard(OrderKey::new(9, 8), k(0), OrderKey::new(10, 2)),
            Verdict::Apply
        );
    }

    #[test]
    fn coalesce_keeps_greatest_key_per_row_and_counts_the_rest() {
        let batch = vec![
            change(2, 20, row(40)),
            change(2, 10, row(20)),
            change(1, 5, row(10)),
            change(2, 20, row(40)),
            change(2, 30, Image::Deleted),
        ];
        let out = coalesce(batch, []);
        assert_eq!(out.changes.len(), 2);
        assert_eq!(out.changes[0].id, id(1));
        assert_eq!(out.changes[1].key, OrderKey::new(30, 30));
        assert_eq!(out.changes[1].image, Image::Deleted);
        assert_eq!(out.stats.duplicates, 1);
        assert_eq!(out.stats.coalesced, 2);
    }

    #[test]
    fn coalesce_drops_changes_a_truncate_supersedes() {
        let table = TableName::public("invoices");
        let batch = vec![change(1, 5, row(1)), change(2, 50, row(2))];
        let out = coalesce(batch, [(table.clone(), OrderKey::new(10, 10))]);
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0].id, id(2));
        assert_eq!(out.stats.stale, 1);
        assert_eq!(out.truncates[&table], OrderKey::new(10, 10));
    }

    #[test]
    fn transition_takes_old_version_from_the_ledger() {
        let stored = LedgerRow {
            key: OrderKey::new(10, 10),
            image: Some(json!({"total": 20}).as_object().unwrap().clone()),
        };
        let t = transition(&stored, OrderKey::ZERO, &change(2, 20, Image::Deleted));
        assert_eq!(t.verdict, Verdict::Apply);
        assert_eq!(t.old_image, stored.image);
        assert_eq!(t.new_image, None);
        assert_eq!(t.next.key, OrderKey::new(20, 20));
        assert_eq!(t.next.image, None);
    }

    #[test]
    fn delete_before_create_leaves_a_tombstone_that_blocks_the_create() {
        let t = transition(
            &LedgerRow::ABSENT,
            OrderKey::ZERO,
            &change(2, 30, Image::Deleted),
        );
        assert_eq!((t.old_image.clone(), t.new_image.clone()), (None, None));
        let late_create = transition(&t.next, OrderKey::ZERO, &change(2, 10, row(20)));
        assert_eq!(late_create.verdict, Verdict::Stale);
        assert_eq!(late_create.next, t.next);
    }

    #[test]
    fn unchanged_toast_keeps_the_stored_value() {
        let stored = LedgerRow {
            key: OrderKey::new(1, 1),
            image: Some(json!({"body": "long", "n": 1}).as_object().unwrap().clone()),
        };
        let update = RowChange {
            id: id(1),
            key: OrderKey::new(2, 2),
            image: Image::Row(
                json!({"body": UNCHANGED_TOAST, "n": 2})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        };
        let t = transition(&stored, OrderKey::ZERO, &update);
        assert_eq!(
            t.new_image.unwrap(),
            json!({"body": "long", "n": 2}).as_object().unwrap().clone()
        );
    }
}
