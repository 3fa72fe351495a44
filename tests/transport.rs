//! The transport contract as apply relies on it, with a real target:
//! a refused delivery comes back and is applied; an event delivered too
//! often is dead-lettered with the reason; `tally run` with chaos on
//! (shuffled, duplicated, delayed deliveries) still ends exact.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tally::apply::consumer::{ConsumeOptions, consume};
use tally::event::TableName;
use tally::progress::Counter;
use tally::transport::embedded::channel;
use tally::transport::{CapturedEvent, Publisher, Subscription};

const SCHEMA: &str = "CREATE TABLE invoices (id bigint PRIMARY KEY, customer integer NOT NULL, total numeric(12,2));";
const VIEWS: &str = "CREATE MATERIALIZED VIEW customer_totals AS SELECT customer, SUM(total) AS total, COUNT(*) AS invoices FROM invoices GROUP BY customer;";

fn captured(json: String, lsn: u64) -> CapturedEvent {
    CapturedEvent {
        table: Arc::new(TableName::new("public", "invoices")),
        commit_lsn: lsn,
        lsn,
        row_key: String::new(),
        json,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deliveries_come_back_and_worn_ones_are_dead_lettered() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let model = env.model().await;
    let (mut publisher, mut queue) = channel(4, 10);
    publisher
        .publish(captured(
            create(
                "invoices",
                json!({"id": 1, "customer": 7, "total": "10.00"}),
                10,
            ),
            10,
        ))
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    // An applier that gave up on the first event twice (as after two
    // target failures): it is then on its third delivery.
    for _ in 0..2 {
        let batch = queue.next_batch(10, Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(batch.len(), 1);
        for delivery in batch {
            delivery.nak(Duration::ZERO).await.unwrap();
        }
    }
    // Its neighbour arrives fresh.
    publisher
        .publish(captured(
            create(
                "invoices",
                json!({"id": 2, "customer": 7, "total": "5.00"}),
                11,
            ),
            11,
        ))
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let durable = tokio::spawn(async move {
        publisher.make_durable().await.unwrap();
        // Dropping the publisher closes the queue: consume returns.
    });
    let (_keep, stop) = tokio::sync::watch::channel(false);
    let options = ConsumeOptions {
        max_deliveries: 2,
        ..ConsumeOptions::default()
    };
    let stats = tokio::time::timeout(
        Duration::from_secs(30),
        consume(
            queue,
            &env.target_url,
            model,
            &options,
            stop,
            Counter::default(),
        ),
    )
    .await
    .expect("consume returns once the queue is closed and drained")
    .unwrap();
    durable.await.unwrap();
    assert_eq!(stats.applied, 1, "{stats}");
    assert_eq!(stats.dead_lettered, 1, "{stats}");
    let reason: String = env
        .target()
        .await
        .query_one("SELECT reason FROM tally.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        reason.contains("delivered 3 times") && reason.contains("max_deliveries = 2"),
        "{reason}"
    );
    // The payload is kept, so the event can be replayed.
    assert_eq!(
        env.value("SELECT total::text FROM customer_totals")
            .await
            .as_deref(),
        Some("5.00")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_with_chaos_stays_exact() {
    let env = TestEnv::new(
        &format!(
            "{SCHEMA} INSERT INTO invoices SELECT g, g % 20, g % 500 FROM generate_series(1, 1000) g;"
        ),
        VIEWS,
    )
    .await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    // Existing rows through bootstrap, then `run` with chaos.
    let boot = env.dir.path().join("boot.jsonl");
    let state = env.dir.path().join("boot.state");
    let status = tally_command(&[
        "bootstrap",
        "--config",
        config,
        "--output",
        boot.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ])
    .status()
    .unwrap();
    assert!(status.success());
    let model = env.model().await;
    let snapshot: Vec<String> = std::fs::read_to_string(&boot)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    env.apply(&model, &snapshot, 2, 500).await;

    let mut process = tally_command(&["run", "--config", config, "--parallel", "3"])
        .env("TALLY_CHAOS_SEED", "11")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_active_slots(&env.source().await, 1).await;
    // Statements that each touch many rows, so one row changes many times
    // within the chaos window and reordering matters.
    let source = env.source().await;
    for round in 0..60i64 {
        source
            .execute(
                "UPDATE invoices SET total = total + 1, customer = (customer + 3) % 20 WHERE id % 17 = $1",
                &[&(round % 17)],
            )
            .await
            .unwrap();
        source
            .execute("DELETE FROM invoices WHERE id % 97 = $1", &[&(round % 97)])
            .await
            .unwrap();
        source
            .execute(
                "INSERT INTO invoices SELECT 10000 + $1::bigint * 10 + g, g, 1.5 * g FROM generate_series(0, 9) g",
                &[&round],
            )
            .await
            .unwrap();
    }
    wait_until_captured(&source).await;
    let started = Instant::now();
    loop {
        let differences = env.verify(&model).await;
        if differences.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no convergence under chaos: {:#?}",
            &differences[..differences.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(terminate(&mut process).success(), "run exits 0 on SIGTERM");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut process.stderr.take().unwrap(), &mut log).unwrap();
    // The summary says how many deliveries chaos duplicated: the guard
    // dropped them, and they must have happened for the test to mean much.
    let duplicates: u64 = log
        .split("dropped ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary in: {log}"));
    assert!(duplicates > 0, "chaos duplicated nothing: {log}");
    let target = env.target().await;
    let dead: i64 = target
        .query_one("SELECT count(*) FROM tally.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
}
