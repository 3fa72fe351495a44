//! `tally run`: capture and apply in one process with the embedded
//! transport, under concurrent writers, killed with SIGKILL once and
//! restarted. Afterwards every view equals its SELECT on the source.

mod common;

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, customer integer NOT NULL, total numeric(12,2), cancelled boolean NOT NULL DEFAULT false);
INSERT INTO orders SELECT g, g % 50, g % 300, false FROM generate_series(1, 2000) g;";

const VIEWS: &str = "
CREATE MATERIALIZED VIEW customer_orders AS
SELECT customer, SUM(total) AS total, COUNT(*) AS orders, AVG(total) AS average
FROM orders WHERE NOT cancelled GROUP BY customer;";

fn run(config: &str) -> Child {
    tally_command(&["run", "--config", config, "--parallel", "3"])
        .spawn()
        .unwrap()
}

/// Three writers insert, move between customers, cancel and delete orders.
static LOAD: RandomWrites = RandomWrites {
    insert: "INSERT INTO orders VALUES ($1, $2, 9.99)",
    others: [
        "UPDATE orders SET total = total + 1, customer = (customer + 1) % 50 WHERE id = $1",
        "UPDATE orders SET cancelled = NOT cancelled WHERE id = $1",
        "DELETE FROM orders WHERE id = $1",
    ],
    rows: 2000,
    groups: 50,
    first_new_id: 10_000,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_survives_sigkill_and_converges() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    // Existing rows come in through bootstrap, then `run` streams.
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
    env.apply(&model, &snapshot, 2, 1000).await;

    let mut process = run(config);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(random_writer(
                env.source_url.clone(),
                i,
                stop.clone(),
                &LOAD,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    process.kill().unwrap();
    process.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    process = run(config);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Wait until the views match (the pipeline catches up on its own).
    let started = Instant::now();
    loop {
        let differences = env.verify(&model).await;
        if differences.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no convergence: {:#?}",
            &differences[..differences.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(terminate(&mut process).success(), "run exits 0 on SIGTERM");
    let dead: i64 = env
        .target()
        .await
        .query_one("SELECT count(*) FROM tally.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
}
