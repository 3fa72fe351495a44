//! The target goes away under load: `tally run` (capture and apply in one
//! process, embedded transport) keeps running while the target's cluster is
//! stopped for several seconds and three writers keep changing the source;
//! after the target is back, nothing is lost (every view equals its SELECT
//! on the source, no dead letters), memory stayed bounded the whole time
//! (the embedded queue is bounded, so capture waits instead of buffering the
//! outage's changes), and the pipeline catches up on its own.
//!
//! The target has a cluster of its own so that stopping it refuses
//! connections to the target only; the source, its slot and the writers
//! are not disturbed.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

const VIEWS: &str = "
CREATE MATERIALIZED VIEW customer_orders AS
SELECT customer, SUM(total) AS total, COUNT(*) AS orders, AVG(total) AS average
FROM orders WHERE NOT cancelled GROUP BY customer;
CREATE MATERIALIZED VIEW all_orders AS SELECT COUNT(*) AS n, SUM(total) AS total FROM orders;";

/// The orders load, but a delete of an already deleted row re-creates it,
/// keeping the number of live rows steady (a plain `DELETE` would leave the
/// updates of a longer run hitting mostly deleted ids, writing nothing).
/// Two writers may re-create the same id at once (both see it gone): hence
/// `ON CONFLICT`, without which one of them fails on the primary key.
const LOAD: RandomWrites = RandomWrites {
    delete: "WITH gone AS (DELETE FROM orders WHERE id = $1 RETURNING id)
             INSERT INTO orders SELECT $1, ($1 % 50)::int, 5.00 WHERE NOT EXISTS (SELECT 1 FROM gone)
             ON CONFLICT (id) DO NOTHING",
    ..ORDERS_WRITES
};

/// How long the target stays down.
const OUTAGE: Duration = Duration::from_secs(6);
/// Peak resident memory allowed for the `tally run` process. A bounded
/// pipeline needs a few tens of MiB; one that buffered the outage's changes
/// in memory would grow with the outage and the write rate instead.
const RSS_LIMIT_MIB: f64 = 256.0;

/// The source's next transaction id: the difference between two readings
/// counts the writing transactions in between (the writers' own counts
/// arrive only when they stop). Reading it assigns no id itself.
async fn source_next_xid(source: &tokio_postgres::Client) -> i64 {
    source
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Fails the test with a clear message if `process` has exited.
fn assert_alive(process: &mut Child, when: &str) {
    if let Some(status) = process.try_wait().unwrap() {
        panic!(
            "`tally run` exited ({status}) {when}; it must keep running while the target is \
             unreachable (appliers retry with backoff and reconnect), not give up"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_outage_under_load_loses_nothing_and_catches_up() {
    let (env, mut target_cluster) = TestEnv::with_separate_target(ORDERS_SCHEMA, VIEWS).await;
    let target_port = target_cluster.port();
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
    assert!(status.success(), "bootstrap: {status}");
    let model = env.model().await;
    let snapshot: Vec<String> = std::fs::read_to_string(&boot)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    env.apply(&model, &snapshot, 2, 1000).await;

    let source = env.source().await;
    // Killed if the test fails half-way, so it does not outlive the test
    // retrying against clusters that are gone.
    let mut process = spawn_tally(&["run", "--config", config, "--parallel", "2"]);
    let run_started = Instant::now();
    let rss = RssSampler::start(process.id(), Duration::from_millis(100));
    wait_for_active_slots(&source, 1).await;

    // Phase 1: load with the target up.
    let load_started_xid = source_next_xid(&source).await;
    let writers = Writers::start(&env.source_url, LOAD, 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_alive(&mut process, "before the outage");

    // Phase 2: the target refuses connections; the writers go on.
    let commits_before = source_next_xid(&source).await;
    let outage_started = run_started.elapsed();
    tokio::task::block_in_place(|| target_cluster.stop()).expect("stop the target");
    eprintln!("target stopped at {outage_started:.1?}");
    let mut died_during_outage = None;
    let down = Instant::now();
    while down.elapsed() < OUTAGE {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if died_during_outage.is_none()
            && let Some(status) = process.try_wait().unwrap()
        {
            died_during_outage = Some((down.elapsed(), status));
        }
    }
    let written_during_outage = source_next_xid(&source).await - commits_before;
    tokio::task::block_in_place(|| target_cluster.restart()).expect("restart the target");
    let outage_ended = run_started.elapsed();
    assert_eq!(target_cluster.port(), target_port, "restart keeps the port");
    eprintln!(
        "target back at {outage_ended:.1?}; {written_during_outage} source transactions committed while it was down"
    );
    if let Some((after, status)) = died_during_outage {
        // Stop the writers first, so their connections are not cut by the
        // clusters going away and the failure below is the only one shown.
        drop(writers);
        panic!(
            "`tally run` exited ({status}) {after:.1?} into a {OUTAGE:?} target outage; it must \
             keep running while the target is unreachable (appliers retry with backoff and \
             reconnect), not give up"
        );
    }
    assert!(
        written_during_outage > 100,
        "the writers made only {written_during_outage} transactions during the outage: not under load"
    );

    // Phase 3: the target is back; load goes on a little, then stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_alive(&mut process, "after the target came back");
    writers.stop().await;
    let writers_stopped = Instant::now();
    eprintln!(
        "{} writing source transactions in all",
        source_next_xid(&source).await - load_started_xid
    );

    // The pipeline catches up on its own.
    loop {
        let differences = env.verify(&model).await;
        if differences.is_empty() {
            break;
        }
        assert_alive(&mut process, "while catching up");
        assert!(
            writers_stopped.elapsed() < Duration::from_secs(60),
            "views did not converge within 60 s of the writers stopping; {} differences, first: {:#?}",
            differences.len(),
            &differences[..differences.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "views equal their SELECT on the source {:.1?} after the writers stopped",
        writers_stopped.elapsed()
    );

    let status = terminate(&mut process);
    let samples = rss.finish();
    assert!(status.success(), "`tally run` exits 0 on SIGTERM: {status}");
    let dead: i64 = env
        .target()
        .await
        .query_one("SELECT count(*) FROM tally.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "dead letters after the outage");

    // Memory, per phase: before, during and after the outage.
    let peak_in = |from: Duration, to: Duration| {
        samples
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0) as f64
            / 1024.0
    };
    let before = peak_in(Duration::ZERO, outage_started);
    let during = peak_in(outage_started, outage_ended);
    let after = peak_in(outage_ended, Duration::MAX);
    let peak = before.max(during).max(after);
    eprintln!(
        "tally run VmRSS peak {peak:.1} MiB ({} samples; before the outage {before:.1}, during {during:.1}, after {after:.1})",
        samples.len()
    );
    assert!(
        samples.len() > 50,
        "only {} RSS samples: the sampler did not see the process",
        samples.len()
    );
    assert!(
        peak < RSS_LIMIT_MIB,
        "`tally run` peaked at {peak:.1} MiB resident (limit {RSS_LIMIT_MIB} MiB)"
    );
}
