//! Bad input end to end, beyond `bad_input.rs`: overflow in a view's
//! output type and in a bigint column, a 5 MB row, a views file with a
//! syntax error, and the source's schema changing under a running
//! pipeline (a column added, a column a view reads dropped or retyped).

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tally::apply::Model;

const METRICS_SCHEMA: &str = "
CREATE TABLE metrics (id int PRIMARY KEY, k int, v int, big bigint, note text);";

const METRICS_VIEWS: &str = "
CREATE MATERIALIZED VIEW small_sums AS
SELECT k, SUM(v)::int AS s FROM metrics GROUP BY k;
CREATE MATERIALIZED VIEW big_sums AS
SELECT k, SUM(big) AS total, COUNT(*) AS n FROM metrics GROUP BY k;";

fn metric(
    id: i64,
    k: i64,
    v: i64,
    big: serde_json::Value,
    note: Option<&str>,
) -> serde_json::Value {
    json!({"id": id, "k": k, "v": v, "big": big, "note": note})
}

#[tokio::test]
async fn overflow_is_dead_lettered_and_a_huge_row_keeps_only_what_views_read() {
    let env = TestEnv::new(METRICS_SCHEMA, METRICS_VIEWS).await;
    let model = env.model().await;
    let huge = "x".repeat(5 * 1024 * 1024);
    let lines = vec![
        create(
            "metrics",
            metric(1, 1, 2_000_000_000, json!(i64::MAX), None),
            100,
        ),
        // SUM(v) now exceeds the view's int output: the target refuses it.
        create(
            "metrics",
            metric(2, 1, 2_000_000_000, json!(i64::MAX), None),
            110,
        ),
        // A bigint beyond its range, in a column a view reads.
        create(
            "metrics",
            metric(3, 2, 1, json!("99999999999999999999"), None),
            120,
        ),
        // 5 MB in a column no view reads.
        create("metrics", metric(4, 2, 7, json!(1), Some(&huge)), 130),
        create("metrics", metric(5, 2, 8, json!(2), None), 140),
    ];
    let stats = env.apply(&model, &lines, 1, 100).await;
    assert_eq!(stats.applied, 3, "{stats}");
    assert_eq!(stats.dead_lettered, 2, "{stats}");

    let target = env.target().await;
    let reasons: Vec<String> = target
        .query("SELECT reason FROM tally.dead_letters ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("after.big") && r.contains("out of range for bigint")),
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("rejected by the target") && r.contains("out of range")),
        "{reasons:#?}"
    );
    // The bigint sum itself is exact (numeric), the views hold the rest.
    assert_eq!(
        env.value("SELECT total::text FROM big_sums WHERE k = 1")
            .await
            .as_deref(),
        Some(i64::MAX.to_string().as_str())
    );
    assert_eq!(
        env.value("SELECT s::text FROM small_sums WHERE k = 1")
            .await
            .as_deref(),
        Some("2000000000")
    );
    assert_eq!(
        env.value("SELECT s::text FROM small_sums WHERE k = 2")
            .await
            .as_deref(),
        Some("15")
    );
    // The ledger keeps only the columns views read: not the 5 MB note.
    let row = target
        .query_one(
            "SELECT cols::text, pg_column_size(cols) FROM tally.ledger WHERE pk = '[4]'",
            &[],
        )
        .await
        .unwrap();
    let cols: String = row.get(0);
    let size: i32 = row.get(1);
    assert!(!cols.contains("note"), "{cols}");
    assert!(size < 1000, "ledger row of {size} bytes: {cols}");
}

#[tokio::test]
async fn a_views_file_with_errors_is_refused_naming_file_line_and_problem() {
    let env = TestEnv::new(METRICS_SCHEMA, METRICS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let views = env.dir.path().join("views.sql");
    let cases = [
        (
            "CREATE MATERIALIZED VIEW a AS\nSELECT k, SUM(v) AS s\nFROM metrics GROUP BY k,;\n",
            vec!["views.sql", "Line: 3", "Expected"],
        ),
        (
            "CREATE MATERIALIZED VIEW a AS\nSELECT k, SUM(v AS s FROM metrics GROUP BY k;\n",
            vec!["views.sql", "Line: 2", "Expected"],
        ),
        (
            "CREATE MATERIALIZED VIEW a AS SELECT k, SUM(nope) AS s FROM metrics GROUP BY k;\n",
            vec!["\"a\"", "nope"],
        ),
    ];
    for (sql, expected) in cases {
        std::fs::write(&views, sql).unwrap();
        for command in ["run", "verify"] {
            let output = tally_command(&[command, "--config", config])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{command} accepted {sql}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            for needle in &expected {
                assert!(
                    stderr.contains(needle),
                    "`tally {command}` on {sql:?}: no {needle:?} in\n{stderr}"
                );
            }
        }
    }
}

const SHOP_SCHEMA: &str = "
CREATE TABLE invoices (id int PRIMARY KEY, customer int, total numeric(10,2));
CREATE TABLE payments (id int PRIMARY KEY, customer int, amount numeric(10,2));
CREATE TABLE items (id int PRIMARY KEY, sku int, qty int);
INSERT INTO invoices VALUES (1, 1, 10.00), (2, 2, 20.00);
INSERT INTO payments VALUES (1, 1, 5.00), (2, 2, 6.00);
INSERT INTO items VALUES (1, 100, 3), (2, 100, 4);";

const SHOP_VIEWS: &str = "
CREATE MATERIALIZED VIEW invoice_totals AS
SELECT customer, SUM(total) AS total FROM invoices GROUP BY customer;
CREATE MATERIALIZED VIEW payment_totals AS
SELECT customer, SUM(amount) AS paid, COUNT(*) AS payments FROM payments GROUP BY customer;
CREATE MATERIALIZED VIEW item_qty AS
SELECT sku, SUM(qty) AS qty FROM items GROUP BY sku;";

/// The model restricted to the views of `table`, to verify those alone.
fn only(model: &Model, table: &str) -> Model {
    let mut model = model.clone();
    model.tables.retain(|name, _| name.name == table);
    model
}

async fn wait_for_dead_letters(env: &TestEnv, count: i64) -> Vec<String> {
    let started = Instant::now();
    loop {
        let reasons: Vec<String> = env
            .target()
            .await
            .query("SELECT reason FROM tally.dead_letters ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if reasons.len() as i64 >= count {
            return reasons;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "waited for {count} dead letters, have {reasons:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_mid_stream_are_named_and_other_views_keep_going() {
    let env = TestEnv::new(SHOP_SCHEMA, SHOP_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let model = env.bootstrap_and_apply(1, 100).await;
    let mut process = spawn_tally(&["run", "--config", config]);
    let source = env.source().await;

    // A column added to a table views read: nothing changes for them.
    source
        .batch_execute(
            "ALTER TABLE payments ADD COLUMN note text;
             INSERT INTO payments VALUES (3, 1, 7.00, 'new column');
             UPDATE invoices SET total = 11.00 WHERE id = 1;
             UPDATE items SET qty = 5 WHERE id = 1;",
        )
        .await
        .unwrap();
    env.wait_until_converged(&model, Duration::from_secs(60))
        .await;

    // A column a view reads is dropped, another retyped.
    source
        .batch_execute(
            "ALTER TABLE invoices DROP COLUMN total;
             INSERT INTO invoices VALUES (3, 1);
             ALTER TABLE items ALTER COLUMN qty TYPE text;
             UPDATE items SET qty = 'many' WHERE id = 2;",
        )
        .await
        .unwrap();
    let reasons = wait_for_dead_letters(&env, 2).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("after.total: column missing")
                && r.contains("view \"invoice_totals\" reads it")),
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("after.qty: expected an integer")
                && r.contains("view \"item_qty\" reads it")),
        "{reasons:#?}"
    );

    // The views of the other tables are still served.
    source
        .batch_execute(
            "INSERT INTO payments VALUES (4, 2, 8.00, NULL);
             DELETE FROM payments WHERE id = 1;",
        )
        .await
        .unwrap();
    let payments = Arc::new(only(&model, "payments"));
    env.wait_until_converged(&payments, Duration::from_secs(60))
        .await;
    assert_eq!(
        env.value("SELECT paid::text FROM payment_totals WHERE customer = 2")
            .await
            .as_deref(),
        Some("14.00")
    );
    assert!(
        process.try_wait().unwrap().is_none(),
        "the pipeline is still running"
    );
    assert!(terminate(&mut process).success());
}
