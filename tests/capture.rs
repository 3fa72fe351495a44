//! Capture from a real source under concurrent writers, killed with SIGKILL
//! twice mid-stream: the captured file, applied, makes every view equal its
//! SELECT on the source; every committed change appears at least once and
//! no rolled-back change appears.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Mutex;

const SCHEMA: &str = "
CREATE TABLE items (
    id         bigint PRIMARY KEY,
    grp        integer NOT NULL,
    qty        integer,
    amount     numeric(12,2),
    deleted_at timestamptz,
    label      text
);";

const VIEWS: &str = "
CREATE MATERIALIZED VIEW grp_totals AS
SELECT grp, SUM(amount) AS amount, SUM(qty) AS qty, COUNT(*) AS n
FROM items WHERE deleted_at IS NULL GROUP BY grp;
CREATE MATERIALIZED VIEW all_items AS
SELECT COUNT(*) AS n, SUM(amount) AS amount, COUNT(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
FROM items;";

/// Ids at or above this are only ever written by rolled-back transactions.
const ROLLED_BACK_IDS: i64 = 1_000_000_000;

fn start_capture(config: &Path, output: &Path) -> Child {
    tally_command(&[
        "capture",
        "--config",
        config.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ])
    .spawn()
    .unwrap()
}

/// A committed change the file must contain: (transaction id, op, row id).
type Expected = (u32, char, i64);

async fn writer(
    url: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    next_id: Arc<Mutex<i64>>,
    expected: Arc<Mutex<Vec<Expected>>>,
    truncate_once: bool,
) {
    let mut client = tally::db::connect(&url).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mine: Vec<i64> = Vec::new();
    let mut transactions = 0;
    while !stop.load(Ordering::Relaxed) || transactions < 50 {
        transactions += 1;
        let tx = client.transaction().await.unwrap();
        let xid: i64 = tx
            .query_one("SELECT txid_current()", &[])
            .await
            .unwrap()
            .get(0);
        let xid = (xid & 0xFFFF_FFFF) as u32;
        let mut changes: Vec<Expected> = Vec::new();
        let statements = rng.random_range(1..=3);
        let rollback = rng.random_bool(0.05);
        for _ in 0..statements {
            let choice = rng.random_range(0..100);
            if rollback {
                let id = ROLLED_BACK_IDS + rng.random_range(0..1_000_000);
                tx.execute("INSERT INTO items VALUES ($1, 1, 1, 1.00, NULL, 'rolled back') ON CONFLICT DO NOTHING", &[&id]).await.unwrap();
                continue;
            }
            if choice < 40 || mine.is_empty() {
                let id = {
                    let mut n = next_id.lock().await;
                    *n += 1;
                    *n
                };
                let amount = format!(
                    "{}.{:02}",
                    rng.random_range(0..1000),
                    rng.random_range(0..100)
                );
                tx.execute(
                    "INSERT INTO items VALUES ($1, $2, $3, $4::text::numeric, NULL, repeat('x', $5))",
                    &[&id, &rng.random_range(1..10i32), &rng.random_range(-5..50i32), &amount, &rng.random_range(0..30i32)],
                ).await.unwrap();
                mine.push(id);
                changes.push((xid, 'c', id));
                continue;
            }
            let index = rng.random_range(0..mine.len());
            let id = mine[index];
            match choice {
                40..=64 => {
                    let n = tx
                        .execute(
                            "UPDATE items SET amount = amount + 1.50, grp = $2 WHERE id = $1",
                            &[&id, &rng.random_range(1..10i32)],
                        )
                        .await
                        .unwrap();
                    if n == 1 {
                        changes.push((xid, 'u', id));
                    }
                }
                65..=74 => {
                    let n = tx.execute("UPDATE items SET deleted_at = CASE WHEN deleted_at IS NULL THEN now() END WHERE id = $1", &[&id]).await.unwrap();
                    if n == 1 {
                        changes.push((xid, 'u', id));
                    }
                }
                75..=84 => {
                    let new_id = {
                        let mut n = next_id.lock().await;
                        *n += 1;
                        *n
                    };
                    let n = tx
                        .execute("UPDATE items SET id = $2 WHERE id = $1", &[&id, &new_id])
                        .await
                        .unwrap();
                    mine[index] = new_id;
                    if n == 1 {
                        changes.push((xid, 'u', new_id));
                    }
                }
                _ => {
                    let n = tx
                        .execute("DELETE FROM items WHERE id = $1", &[&id])
                        .await
                        .unwrap();
                    mine.swap_remove(index);
                    if n == 1 {
                        changes.push((xid, 'd', id));
                    }
                }
            }
        }
        if truncate_once && transactions == 60 {
            tx.execute("TRUNCATE items", &[]).await.unwrap();
        }
        if rollback {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            expected.lock().await.extend(changes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capture_killed_twice_loses_nothing_and_invents_nothing() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let config = env.config_path();
    let output = env.dir.path().join("events.jsonl");
    let source = env.source().await;

    let mut capture = start_capture(&config, &output);
    // Changes count from the slot's creation: wait for it.
    wait_for_active_slots(&source, 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(Mutex::new(0i64));
    let expected = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(writer(
                env.source_url.clone(),
                i,
                stop.clone(),
                next_id.clone(),
                expected.clone(),
                i == 0,
            ))
        })
        .collect();

    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        capture.kill().unwrap(); // SIGKILL
        capture.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        capture = start_capture(&config, &output);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Let capture catch up to the end of the WAL, then stop it gracefully.
    wait_until_captured(&source).await;
    let status = terminate(&mut capture);
    assert!(status.success(), "capture exits 0 on SIGTERM: {status:?}");

    // What the file holds.
    let text = std::fs::read_to_string(&output).unwrap();
    let mut seen: HashSet<Expected> = HashSet::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("torn line {line:?}: {e}"));
        let op = event["op"].as_str().unwrap().chars().next().unwrap();
        let xid = event["source"]["txId"].as_u64().unwrap() as u32;
        for side in ["before", "after"] {
            if let Some(id) = event[side]["id"].as_i64() {
                assert!(
                    id < ROLLED_BACK_IDS,
                    "a rolled-back change was captured: {line}"
                );
                seen.insert((xid, op, id));
            }
        }
    }
    let expected = expected.lock().await;
    let missing: Vec<&Expected> = expected.iter().filter(|e| !seen.contains(e)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} committed changes missing, e.g. {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "{lines} events captured for {} committed changes",
        expected.len()
    );

    // Applied, the file makes every view equal its SELECT on the source.
    let model = env.model().await;
    let events: Vec<String> = text.lines().map(str::to_string).collect();
    let stats = env.apply(&model, &events, 2, 500).await;
    assert_eq!(stats.dead_lettered, 0, "{stats}");
    assert!(stats.truncates >= 1, "{stats}");
    let differences = env.verify(&model).await;
    assert!(differences.is_empty(), "{differences:#?}");
}
