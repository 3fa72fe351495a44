//! End to end on a real Postgres: a long random history with group-key
//! changes, soft deletes and restores, primary-key updates, NULL measures
//! and a TRUNCATE, delivered shuffled with 20% duplicates to 4 concurrent
//! appliers. Every view must equal its SELECT on a source holding the
//! history's final state, with no deadlock or serialization error escaping.

mod common;

use std::collections::BTreeMap;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const SCHEMA: &str = "
CREATE TABLE movements (
    id         bigint PRIMARY KEY,
    account_id integer,
    amount     numeric(12,2),
    voided_at  timestamptz,
    note       text
);";

const VIEWS: &str = "
-- Balance per account, soft-deleted (voided) movements excluded.
CREATE MATERIALIZED VIEW account_balance AS
SELECT account_id, SUM(amount) AS balance, COUNT(*) AS movements,
       COUNT(amount) AS priced, AVG(amount) AS average
FROM movements
WHERE voided_at IS NULL
GROUP BY account_id;

-- One row over everything, with a FILTER and a ratio.
CREATE MATERIALIZED VIEW movement_totals AS
SELECT SUM(amount) AS total, COUNT(*) AS rows,
       COUNT(*) FILTER (WHERE voided_at IS NOT NULL) AS voided,
       ROUND(COUNT(*) FILTER (WHERE voided_at IS NOT NULL)::numeric / NULLIF(COUNT(*), 0), 4) AS voided_share
FROM movements;

-- Groups by an expression, evaluated by Postgres.
CREATE MATERIALIZED VIEW by_sign AS
SELECT sign(amount) AS sign, SUM(amount) AS total, COUNT(*) AS n
FROM movements
GROUP BY sign(amount);
";

#[derive(Clone, Debug, PartialEq)]
struct Movement {
    account_id: Option<i64>,
    amount: Option<String>,
    voided_at: Option<String>,
    note: String,
}

impl Movement {
    fn json(&self, id: i64) -> Value {
        json!({"id": id, "account_id": self.account_id, "amount": self.amount,
               "voided_at": self.voided_at, "note": self.note})
    }
}

/// Generates a history as Debezium events, and its final state.
struct History {
    rng: rand::rngs::StdRng,
    rows: BTreeMap<i64, Movement>,
    next_id: i64,
    lsn: u64,
    events: Vec<String>,
}

impl History {
    fn new(seed: u64) -> History {
        History {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            rows: BTreeMap::new(),
            next_id: 1,
            lsn: 0x1_0000_0000,
            events: Vec::new(),
        }
    }

    fn random_movement(&mut self) -> Movement {
        let account_id = if self.rng.random_bool(0.05) {
            None
        } else {
            Some(self.rng.random_range(1..=40))
        };
        let amount = if self.rng.random_bool(0.1) {
            None
        } else {
            let cents: i64 = self.rng.random_range(-50_000..100_000);
            let sign = if cents < 0 { "-" } else { "" };
            Some(format!(
                "{sign}{}.{:02}",
                cents.abs() / 100,
                cents.abs() % 100
            ))
        };
        Movement {
            account_id,
            amount,
            voided_at: None,
            note: "x".repeat(self.rng.random_range(0..20)),
        }
    }

    fn random_existing(&mut self) -> Option<i64> {
        if self.rows.is_empty() {
            return None;
        }
        let n = self.rng.random_range(0..self.rows.len());
        self.rows.keys().nth(n).copied()
    }

    /// One source transaction of 1-3 changes.
    fn transaction(&mut self) {
        let size = self.rng.random_range(1..=3);
        let start = self.lsn;
        self.lsn += 100;
        let commit_lsn = self.lsn;
        for i in 0..size {
            let lsn = start + i as u64 * 10;
            let choice = self.rng.random_range(0..100);
            let existing = self.random_existing();
            match (choice, existing) {
                (0..=29, _) | (_, None) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    let movement = self.random_movement();
                    self.events.push(envelope(
                        "c",
                        "movements",
                        Value::Null,
                        movement.json(id),
                        commit_lsn,
                        lsn,
                    ));
                    self.rows.insert(id, movement);
                }
                (30..=59, Some(id)) => {
                    // Change amount and/or account (a group-key change).
                    let mut movement = self.rows[&id].clone();
                    let fresh = self.random_movement();
                    if self.rng.random_bool(0.5) {
                        movement.amount = fresh.amount;
                    }
                    if self.rng.random_bool(0.5) {
                        movement.account_id = fresh.account_id;
                    }
                    self.events.push(envelope(
                        "u",
                        "movements",
                        Value::Null,
                        movement.json(id),
                        commit_lsn,
                        lsn,
                    ));
                    self.rows.insert(id, movement);
                }
                (60..=74, Some(id)) => {
                    // Soft delete or restore.
                    let mut movement = self.rows[&id].clone();
                    movement.voided_at = match movement.voided_at {
                        None => Some("2026-11-25T10:00:00+00:00".into()),
                        Some(_) => None,
                    };
                    self.events.push(envelope(
                        "u",
                        "movements",
                        Value::Null,
                        movement.json(id),
                        commit_lsn,
                        lsn,
                    ));
                    self.rows.insert(id, movement);
                }
                (75..=84, Some(id)) => {
                    // Primary-key update: `before` carries the old key.
                    let movement = self.rows.remove(&id).unwrap();
                    let new_id = self.next_id;
                    self.next_id += 1;
                    self.events.push(envelope(
                        "u",
                        "movements",
                        json!({"id": id}),
                        movement.json(new_id),
                        commit_lsn,
                        lsn,
                    ));
                    self.rows.insert(new_id, movement);
                }
                (_, Some(id)) => {
                    self.rows.remove(&id);
                    self.events.push(envelope(
                        "d",
                        "movements",
                        json!({"id": id}),
                        Value::Null,
                        commit_lsn,
                        lsn,
                    ));
                }
            }
        }
    }

    fn truncate(&mut self) {
        self.lsn += 100;
        self.rows.clear();
        self.events.push(envelope(
            "t",
            "movements",
            Value::Null,
            Value::Null,
            self.lsn,
            self.lsn - 50,
        ));
    }

    /// Writes the final state into the source table.
    async fn write_source(&self, source: &tokio_postgres::Client) {
        let mut values = Vec::new();
        for (id, m) in &self.rows {
            values.push(m.json(*id));
        }
        source
            .execute(
                "INSERT INTO movements SELECT * FROM jsonb_populate_recordset(NULL::movements, $1)",
                &[&Value::Array(values)],
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shuffled_duplicated_history_converges_with_four_appliers() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let model = env.model().await;
    let mut history = History::new(7);
    // Rows grow to about 1,000, a TRUNCATE, then more history.
    while history.events.len() < 4_000 {
        history.transaction();
    }
    history.truncate();
    while history.events.len() < 12_000 {
        history.transaction();
    }
    history.write_source(&env.source().await).await;
    assert!(
        history.rows.len() >= 500,
        "history keeps enough rows: {}",
        history.rows.len()
    );

    let delivery = shuffle_with_duplicates(&history.events, 0.2, 42);
    let stats = env.apply(&model, &delivery, 4, 300).await;
    eprintln!("{stats}");
    assert!(stats.duplicates + stats.stale > 0);
    assert_eq!(stats.dead_lettered, 0);

    let differences = env.verify(&model).await;
    assert!(differences.is_empty(), "drift: {differences:#?}");

    // Redelivering everything again changes nothing.
    let again = env.apply(&model, &delivery, 4, 1000).await;
    assert_eq!(again.applied, 0, "{again}");
    assert!(env.verify(&model).await.is_empty());
}
