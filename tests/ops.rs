//! Operator tools against a real Postgres: verify finds planted drift of
//! every kind and `verify --repair` fixes it while writers and `tally run`
//! keep going; replay's `--where` cannot write; recalc rebuilds a view.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The orders fixture plus ten rows (ids 5001–5010) the writers never touch,
/// so drift planted on them stays put, and a sequence to try writing with.
const SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, customer integer NOT NULL, total numeric(12,2), cancelled boolean NOT NULL DEFAULT false);
INSERT INTO orders SELECT g, g % 50, g % 300, false FROM generate_series(1, 2000) g;
INSERT INTO orders SELECT g, g % 50, 7, false FROM generate_series(5001, 5010) g;
CREATE SEQUENCE side_effect;";

/// Runs `tally ARGS` to completion off the async runtime; returns the exit
/// code, stdout and stderr.
async fn tally_output(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = tally_command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    })
    .await
    .unwrap()
}

/// Bootstraps the existing rows into the target and starts `tally run`.
async fn running_pipeline(env: &TestEnv) -> Spawned {
    let boot = env.bootstrap();
    let model = env.model().await;
    let snapshot: Vec<String> = std::fs::read_to_string(&boot)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    env.apply(&model, &snapshot, 2, 1000).await;
    let config = env.config_path();
    spawn_tally(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--parallel",
        "2",
    ])
}

fn ledger_kinds(report: &Value) -> Vec<(String, String)> {
    report["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["pk"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_reports_planted_drift_and_repair_fixes_it_under_load() {
    let env = TestEnv::new(SCHEMA, ORDERS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let mut process = running_pipeline(&env).await;
    let source = env.source().await;
    let target = env.target().await;
    wait_for_active_slots(&source, 1).await;

    // Drift 1: a source change whose event is lost. Capture is stopped,
    // the row changes, and the slot is advanced past the change.
    assert!(terminate(&mut process).success());
    source
        .execute("UPDATE orders SET total = 555 WHERE id = 5002", &[])
        .await
        .unwrap();
    source
        .execute(
            "SELECT pg_replication_slot_advance('tally', pg_current_wal_lsn())",
            &[],
        )
        .await
        .unwrap();
    process = spawn_tally(&["run", "--config", config, "--parallel", "2"]);
    wait_for_active_slots(&source, 1).await;

    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 2);
    // Drift 2: a ledger row deleted by hand (its contribution stays in the
    // view). Drift 3: a view row edited by hand.
    target
        .execute(
            "DELETE FROM tally.ledger WHERE tbl = 'public.orders' AND pk = '[5003]'",
            &[],
        )
        .await
        .unwrap();
    target
        .execute(
            "UPDATE customer_orders SET _tally_a0 = _tally_a0 + 1000 WHERE customer = 7",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (code, stdout, stderr) = tally_output(&["verify", "--config", config, "--json"]).await;
    assert_eq!(code, 1, "verify must report drift: {stdout}\n{stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    let report = &json["report"];
    assert_eq!(report["drift"], true);
    let kinds = ledger_kinds(report);
    assert!(
        kinds.contains(&("[5002]".into(), "different".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("[5003]".into(), "missing".into())),
        "{kinds:?}"
    );
    let view_keys: Vec<String> = report["views_vs_ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].to_string())
        .collect();
    assert!(
        view_keys.iter().any(|k| k.contains("\"customer\":7")),
        "{view_keys:?}"
    );

    // The readable report says the same.
    let (code, stdout, _) = tally_output(&["verify", "--config", config]).await;
    assert_eq!(code, 1);
    assert!(stdout.contains("verify: DRIFT"), "{stdout}");
    assert!(stdout.contains("[5002]"), "{stdout}");

    // Repair while writers and the pipeline keep running.
    let (code, stdout, stderr) = tally_output(&["verify", "--config", config, "--repair"]).await;
    eprintln!("verify --repair exited {code}:\n{stdout}\n{stderr}");
    assert!(stderr.contains("repair:"), "{stderr}");

    tokio::time::sleep(Duration::from_millis(1000)).await;
    writers.stop().await;
    let model = env.model().await;
    env.wait_until_converged(&model, Duration::from_secs(60))
        .await;
    let (code, stdout, stderr) = tally_output(&["verify", "--config", config]).await;
    assert_eq!(code, 0, "after repair: {stdout}\n{stderr}");
    assert!(stdout.contains("verify: OK"), "{stdout}");
    assert_eq!(
        env.value("SELECT total::text FROM tally.ledger l, LATERAL (SELECT (l.cols->>'total') AS total) x WHERE tbl = 'public.orders' AND pk = '[5002]'")
            .await
            .as_deref(),
        Some("555.00")
    );
    assert!(terminate(&mut process).success());
    assert_eq!(env.dead_letters().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_and_recalc() {
    let env = TestEnv::new(SCHEMA, ORDERS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let boot = env.bootstrap();
    let model = env.model().await;
    let snapshot: Vec<String> = std::fs::read_to_string(&boot)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    env.apply(&model, &snapshot, 1, 1000).await;
    let source = env.source().await;

    // A WHERE that tries to write is refused, and says why.
    let (code, _, stderr) = tally_output(&[
        "replay",
        "--config",
        config,
        "--table",
        "orders",
        "--where",
        "nextval('side_effect') > 0",
    ])
    .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("READ ONLY"), "{stderr}");
    assert!(stderr.contains("read-only transaction"), "{stderr}");
    let (code, _, stderr) = tally_output(&["replay", "--config", config, "--table", "nope"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("public.orders"), "{stderr}");

    // To a file: the matching rows, keyed at the snapshot.
    let out = env.dir.path().join("replay.jsonl");
    let (code, _, stderr) = tally_output(&[
        "replay",
        "--config",
        config,
        "--table",
        "orders",
        "--where",
        "id BETWEEN 5001 AND 5010",
        "--output",
        out.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count(), 10);
    assert!(lines.contains("\"op\":\"r\"") || lines.contains("\"op\": \"r\""));

    // A change nobody streamed (no pipeline runs here) reaches the views
    // through a replay applied straight to the target.
    source
        .execute("UPDATE orders SET total = 100 WHERE id = 5004", &[])
        .await
        .unwrap();
    let (code, _, stderr) = tally_output(&[
        "replay",
        "--config",
        config,
        "--table",
        "orders",
        "--where",
        "id = 5004",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(env.verify(&model).await.is_empty());

    // A replay with op d removes the rows from the views.
    source
        .execute("UPDATE orders SET cancelled = false WHERE id = 5005", &[])
        .await
        .unwrap();
    let (code, _, stderr) = tally_output(&[
        "replay",
        "--config",
        config,
        "--table",
        "orders",
        "--where",
        "id = 5005",
        "--op",
        "d",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    let differences = env.verify(&model).await;
    assert_eq!(differences.len(), 1, "{differences:#?}");
    // A fresh replay (a later snapshot) brings it back.
    let (code, _, stderr) = tally_output(&[
        "replay",
        "--config",
        config,
        "--table",
        "orders",
        "--where",
        "id = 5005",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(env.verify(&model).await.is_empty());

    // recalc rebuilds a view edited by hand.
    env.target()
        .await
        .execute(
            "UPDATE customer_orders SET _tally_a1 = _tally_a1 + 3 WHERE customer = 4",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(env.verify(&model).await.len(), 1);
    let (code, stdout, stderr) =
        tally_output(&["recalc", "--config", config, "--view", "customer_orders"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("customer_orders: 50 rows, 1 changed"),
        "{stdout}"
    );
    assert!(env.verify(&model).await.is_empty());
    let (code, _, stderr) = tally_output(&["recalc", "--config", config, "--view", "nope"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("customer_orders"), "{stderr}");
}

async fn tombstones(env: &TestEnv, from: i64, to: i64) -> i64 {
    env.target()
        .await
        .query_one(
            "SELECT count(*) FROM tally.ledger WHERE tbl = 'public.orders' AND deleted AND pk IN (SELECT jsonb_build_array(g)::text FROM generate_series($1::bigint, $2::bigint) g)",
            &[&from, &to],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vacuum_keeps_tombstones_late_events_need_and_reclaims_the_rest() {
    let env = TestEnv::new(SCHEMA, ORDERS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let boot = env.bootstrap();
    let model = env.model().await;
    let snapshot: Vec<String> = std::fs::read_to_string(&boot)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    env.apply(&model, &snapshot, 1, 1000).await;
    let source = env.source().await;

    // Deletes of ids 1..10, captured and applied: the slot is confirmed
    // past them, so no copy of them (or of anything older) can come again.
    let stream = env.dir.path().join("stream.jsonl");
    let mut capture = spawn_tally(&[
        "capture",
        "--config",
        config,
        "--output",
        stream.to_str().unwrap(),
    ]);
    wait_for_active_slots(&source, 1).await;
    source
        .execute("DELETE FROM orders WHERE id BETWEEN 1 AND 10", &[])
        .await
        .unwrap();
    wait_until_captured(&source).await;
    assert!(terminate(&mut capture).success());
    let captured: Vec<String> = std::fs::read_to_string(&stream)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(captured.len(), 10);
    env.apply(&model, &captured, 1, 1000).await;
    let confirmed: String = source
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'tally'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let confirmed_lsn = tally::event::parse_lsn_text(&confirmed).unwrap();

    // Deletes of ids 11..20 past the confirmed LSN: capture has not
    // confirmed them, so they (and older changes of those rows) are still
    // deliverable; their tombstones must stay.
    source
        .execute("DELETE FROM orders WHERE id BETWEEN 11 AND 20", &[])
        .await
        .unwrap();
    let late_key = confirmed_lsn + 1000;
    let pending: Vec<String> = (11..=20)
        .map(|id| delete("orders", serde_json::json!({ "id": id }), late_key))
        .collect();
    env.apply(&model, &pending, 1, 1000).await;
    assert_eq!(tombstones(&env, 1, 10).await, 10);
    assert_eq!(tombstones(&env, 11, 20).await, 10);

    let (code, stdout, stderr) = tally_output(&["vacuum", "--config", config, "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["horizon"], confirmed.as_str(), "{report}");
    assert_eq!(report["deleted"], 10, "{report}");
    assert_eq!(
        tombstones(&env, 1, 10).await,
        0,
        "reclaimed below the horizon"
    );
    assert_eq!(tombstones(&env, 11, 20).await, 10, "kept above the horizon");

    // Late events: an old create of a reclaimed row is stale (the vacuum
    // horizon), an old create of a kept row is stale (its tombstone).
    let old_creates: Vec<String> = snapshot
        .iter()
        .filter(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let id = v["after"]["id"].as_i64().unwrap();
            id == 5 || id == 15
        })
        .cloned()
        .collect();
    assert_eq!(old_creates.len(), 2);
    let stats = env.apply(&model, &old_creates, 1, 1000).await;
    assert_eq!(stats.applied, 0, "{stats}");
    assert_eq!(stats.stale, 2, "{stats}");
    assert_eq!(tombstones(&env, 11, 20).await, 10);
    let live: i64 = env
        .target()
        .await
        .query_one(
            "SELECT count(*) FROM tally.ledger WHERE pk IN ('[5]', '[15]') AND NOT deleted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 0, "no row came back");
    assert!(env.verify(&model).await.is_empty());

    // The human form says what it did: the stale create of the absent row
    // left a key-zero placeholder, reclaimed now; the ten stay.
    let (code, stdout, _) = tally_output(&["vacuum", "--config", config]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&format!(
            "vacuum: deleted 1 tombstones below horizon {confirmed}; 10 kept"
        )),
        "{stdout}"
    );

    // status shows the slot, the ledger, the views and the dead letters.
    let (code, stdout, stderr) = tally_output(&["status", "--config", config, "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        status["slot"]["confirmed_lsn"],
        confirmed.as_str(),
        "{status}"
    );
    assert_eq!(status["slot"]["active"], false, "{status}");
    assert!(
        status["slot"]["lag_bytes"].as_i64().unwrap() >= 0,
        "{status}"
    );
    assert_eq!(status["transport"]["kind"], "embedded");
    assert_eq!(status["transport"]["pending"], Value::Null);
    assert_eq!(status["tables"][0]["table"], "public.orders");
    assert_eq!(status["tables"][0]["tombstones"], 10, "{status}");
    assert_eq!(status["tables"][0]["rows"], 1990, "{status}");
    assert_eq!(status["tables"][0]["vacuum_horizon"], confirmed.as_str());
    assert!(
        status["tables"][0]["last_applied"]
            .as_str()
            .unwrap()
            .starts_with(&tally::event::format_lsn(late_key)),
        "{status}"
    );
    assert_eq!(status["dead_letters"], 0);
    assert_eq!(status["views"][0]["view"], "customer_orders");
    assert_eq!(status["views"][0]["rows"], 50);
    let (code, stdout, _) = tally_output(&["status", "--config", config]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("view customer_orders: 50 rows"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn views_added_on_a_running_system_become_correct_without_bootstrap() {
    let env = TestEnv::new(SCHEMA, ORDERS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let mut process = running_pipeline(&env).await;
    let source = env.source().await;
    wait_for_active_slots(&source, 1).await;
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 2);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Two new views while writes go on: one reads only columns the ledger
    // holds (built from the ledger), one reads `id`, which it does not
    // (backfilled through replay).
    assert!(terminate(&mut process).success());
    let views = format!(
        "{ORDERS_VIEWS}
CREATE MATERIALIZED VIEW cancelled_orders AS
SELECT cancelled, COUNT(*) AS n, SUM(total) AS total FROM orders GROUP BY cancelled;
CREATE MATERIALIZED VIEW id_buckets AS
SELECT id % 10 AS bucket, COUNT(*) AS n, SUM(id) AS ids FROM orders GROUP BY 1;"
    );
    std::fs::write(env.dir.path().join("views.sql"), views).unwrap();
    process = spawn_tally(&["run", "--config", config, "--parallel", "2"]);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    writers.stop().await;

    let model = env.model().await;
    assert_eq!(model.views().count(), 3);
    env.wait_until_converged(&model, Duration::from_secs(60))
        .await;
    let recorded = env
        .value("SELECT array_to_string(columns, ',') FROM tally.ledger_columns WHERE tbl = 'public.orders'")
        .await;
    assert_eq!(recorded.as_deref(), Some("cancelled,customer,id,total"));
    let (code, stdout, stderr) = tally_output(&["verify", "--config", config]).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(terminate(&mut process).success());
    assert_eq!(env.dead_letters().await, 0);
}
