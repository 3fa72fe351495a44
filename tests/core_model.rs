//! Property test of the pure apply core against a model: random histories
//! over 50 rows, every event delivered in a random order with random
//! duplicates and random batch sizes. At every step each row's ledger entry
//! (so its contribution) is a version that row really had, the incremental
//! aggregate equals the aggregate recomputed from the ledger, and at the end
//! everything equals the history's final state.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tally::apply::core::{Image, LedgerRow, RowChange, RowId, Verdict, coalesce, transition};
use tally::event::{OrderKey, Row, TableName};

const ROWS: usize = 50;

fn row_id(n: usize) -> RowId {
    RowId {
        table: TableName::public("t"),
        pk: format!("[{n}]"),
    }
}

fn image(group: i64, value: Option<i64>) -> Row {
    json!({"g": group, "v": value}).as_object().unwrap().clone()
}

/// The model view: `SELECT g, SUM(v), COUNT(*) FROM t WHERE g <> 3 GROUP BY g`.
type Aggregate = BTreeMap<i64, (i64, i64)>;

fn contribution(row: &Row) -> Option<(i64, i64)> {
    let group = row["g"].as_i64().unwrap();
    (group != 3).then(|| (group, row["v"].as_i64().unwrap_or(0)))
}

fn add(aggregate: &mut Aggregate, row: &Row, sign: i64) {
    if let Some((group, value)) = contribution(row) {
        let entry = aggregate.entry(group).or_insert((0, 0));
        entry.0 += sign * value;
        entry.1 += sign;
        if entry.1 == 0 {
            assert_eq!(entry.0, 0, "an empty group must sum to zero");
            aggregate.remove(&group);
        }
    }
}

fn recompute(ledger: &HashMap<RowId, LedgerRow>) -> Aggregate {
    let mut aggregate = Aggregate::new();
    for row in ledger.values() {
        if let Some(image) = &row.image {
            add(&mut aggregate, image, 1);
        }
    }
    aggregate
}

/// One step of a row's history.
#[derive(Debug, Clone)]
struct Step {
    row: usize,
    group: i64,
    value: Option<i64>,
    delete: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0..ROWS,
        0i64..5,
        proptest::option::of(-100i64..100),
        proptest::bool::weighted(0.25),
    )
        .prop_map(|(row, group, value, delete)| Step {
            row,
            group,
            value,
            delete,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn any_delivery_order_converges_through_real_versions(
        steps in proptest::collection::vec(step(), 1..300),
        transaction_sizes in proptest::collection::vec(1usize..4, 300),
        seed in any::<u64>(),
        duplicate_share in 0.0f64..0.5,
    ) {
        // Build the history: transactions of 1-3 changes; a change's key is
        // (its transaction's commit LSN, its own LSN).
        let mut events: Vec<RowChange> = Vec::new();
        let mut versions: HashMap<RowId, HashMap<OrderKey, Option<Row>>> = HashMap::new();
        let mut alive = [false; ROWS];
        let mut lsn = 1000u64;
        let mut index = 0;
        for size in transaction_sizes {
            if index >= steps.len() { break; }
            let chunk = &steps[index..(index + size).min(steps.len())];
            index += size;
            let start = lsn;
            lsn += chunk.len() as u64 + 1;
            let commit_lsn = lsn; // the commit record comes after the changes
            for (offset, step) in chunk.iter().enumerate() {
                let key = OrderKey::new(commit_lsn, start + offset as u64);
                let id = row_id(step.row);
                let new_image = if step.delete && alive[step.row] {
                    alive[step.row] = false;
                    None
                } else {
                    alive[step.row] = true;
                    Some(image(step.group, step.value))
                };
                versions.entry(id.clone()).or_default().insert(key, new_image.clone());
                events.push(RowChange {
                    id,
                    key,
                    image: new_image.map(Image::Row).unwrap_or(Image::Deleted),
                });
            }
        }

        // Deliver: shuffled, with duplicates, in random batches.
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut delivery = events.clone();
        for event in &events {
            if rng.random_bool(duplicate_share) {
                delivery.push(event.clone());
            }
        }
        delivery.shuffle(&mut rng);

        let mut ledger: HashMap<RowId, LedgerRow> = HashMap::new();
        let mut aggregate = Aggregate::new();
        let mut applied = 0u64;
        let mut rest = &delivery[..];
        while !rest.is_empty() {
            let size = rng.random_range(1..=10).min(rest.len());
            let (batch, tail) = rest.split_at(size);
            rest = tail;
            let coalesced = coalesce(batch.to_vec(), []);
            for change in &coalesced.changes {
                let stored = ledger.get(&change.id).cloned().unwrap_or(LedgerRow::ABSENT);
                let step = transition(&stored, OrderKey::ZERO, change);
                if step.verdict == Verdict::Apply {
                    applied += 1;
                    if let Some(old) = &step.old_image { add(&mut aggregate, old, -1); }
                    if let Some(new) = &step.new_image { add(&mut aggregate, new, 1); }
                    ledger.insert(change.id.clone(), step.next);
                }
            }
            // Every stored version is one the row really had.
            for (id, row) in &ledger {
                let real = versions[id].get(&row.key);
                prop_assert_eq!(real, Some(&row.image), "row {:?} holds a version it never had", id);
            }
            prop_assert_eq!(&aggregate, &recompute(&ledger));
        }

        // Final state: each row at its last version.
        for (id, row_versions) in &versions {
            let (last_key, last_image) = row_versions.iter().max_by_key(|(k, _)| **k).unwrap();
            let stored = &ledger[id];
            prop_assert_eq!(stored.key, *last_key);
            prop_assert_eq!(&stored.image, last_image);
        }
        prop_assert!(applied <= events.len() as u64);
        prop_assert_eq!(&aggregate, &recompute(&ledger));
    }
}
