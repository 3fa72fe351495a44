//! Bootstrap: 100,000 rows exist before the slot; writers keep running
//! during bootstrap; a transaction opened before the snapshot commits after
//! the slot was requested; bootstrap is killed once and resumed. Bootstrap
//! plus the stream from the same slot converge exactly.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, grp integer NOT NULL, amount numeric(12,2), deleted_at timestamptz);
INSERT INTO items SELECT g, g % 97, (g % 1000) / 7.0, CASE WHEN g % 13 = 0 THEN now() END FROM generate_series(1, 100000) g;";

const WRITES: RandomWrites = RandomWrites {
    insert: "INSERT INTO items VALUES ($1, $2, 1.25, NULL)",
    update: "UPDATE items SET amount = amount + 2.50, grp = (grp + 1) % 97 WHERE id = $1",
    toggle: "UPDATE items SET deleted_at = CASE WHEN deleted_at IS NULL THEN now() END WHERE id = $1",
    delete: "DELETE FROM items WHERE id = $1",
    existing_ids: 100_000,
    groups: 97,
    first_new_id: 200_000,
};

const VIEWS: &str = "
CREATE MATERIALIZED VIEW grp_totals AS
SELECT grp, SUM(amount) AS amount, COUNT(*) AS n FROM items WHERE deleted_at IS NULL GROUP BY grp;
CREATE MATERIALIZED VIEW everything AS SELECT COUNT(*) AS n, SUM(amount) AS amount FROM items;";

fn tally(args: &[&str]) -> Child {
    tally_command(args).spawn().unwrap()
}

fn state_has_progress(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|s| s.contains("\"items\"") || s.contains("public.items"))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bootstrap_plus_stream_converge_exactly() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let boot = env.dir.path().join("bootstrap.jsonl");
    let stream = env.dir.path().join("stream.jsonl");
    let state = env.dir.path().join("bootstrap.state");

    // A transaction with writes, open before the snapshot is requested.
    let mut early = env.source().await;
    let early_tx = early.transaction().await.unwrap();
    early_tx
        .execute("INSERT INTO items VALUES (-1, 1, 1000.00, NULL)", &[])
        .await
        .unwrap();
    early_tx
        .execute("UPDATE items SET amount = amount + 100 WHERE id <= 50", &[])
        .await
        .unwrap();

    let writers = Writers::start(&env.source_url, WRITES, 2);

    let args = [
        "bootstrap",
        "--config",
        config,
        "--output",
        boot.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ];
    let mut first = tally(&args);
    // The slot waits for the early transaction; commit it meanwhile.
    tokio::time::sleep(Duration::from_millis(800)).await;
    early_tx.commit().await.unwrap();

    // Kill the first run once it has saved progress, then resume.
    let started = Instant::now();
    while !state_has_progress(&state) && first.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "bootstrap made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = first.kill();
    let _ = first.wait();
    let mut second = tally(&args);
    let status =
        tokio::task::spawn_blocking(move || wait_for(&mut second, Duration::from_secs(120)))
            .await
            .unwrap();
    assert!(status.success(), "resumed bootstrap: {status:?}");

    // Stream from the same slot while writers go on, then stop.
    let mut capture = tally(&[
        "capture",
        "--config",
        config,
        "--output",
        stream.to_str().unwrap(),
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writers.stop().await;
    let source = env.source().await;
    wait_until_captured(&source).await;
    assert!(terminate(&mut capture).success());

    let mut events: Vec<String> = std::fs::read_to_string(&boot)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let snapshot_rows = events.len();
    assert!(
        snapshot_rows >= 100_000,
        "bootstrap emitted {snapshot_rows} rows"
    );
    events.extend(
        std::fs::read_to_string(&stream)
            .unwrap()
            .lines()
            .map(str::to_string),
    );
    eprintln!(
        "{snapshot_rows} snapshot events, {} streamed",
        events.len() - snapshot_rows
    );

    let model = env.model().await;
    let delivery = shuffle_with_duplicates(&events, 0.05, 3);
    let stats = env.apply(&model, &delivery, 4, 4000).await;
    assert_eq!(stats.dead_lettered, 0, "{stats}");
    let differences = env.verify(&model).await;
    assert!(differences.is_empty(), "{differences:#?}");
}
