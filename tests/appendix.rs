//! The essay's five out-of-order cases (its appendix), each checking every
//! intermediate value of the aggregate and the final ledger.
//!
//! Start: invoice 1 with total 10 is applied. Then invoice 2 is created with
//! 20, updated to 40 and deleted; the events arrive in the case's order,
//! one delivery per batch. The only legal values are 10, 30 and 50; the
//! only legal final value is 10.

mod common;

use common::*;
use serde_json::json;

const SCHEMA: &str = "CREATE TABLE invoices (id serial PRIMARY KEY, name text NOT NULL, total numeric(20,2) NOT NULL);
INSERT INTO invoices (name, total) VALUES ('first', 10);";
const VIEWS: &str =
    "CREATE MATERIALIZED VIEW invoice_total AS SELECT SUM(total) AS total FROM invoices;";

const CREATE_LSN: u64 = 200;
const UPDATE_LSN: u64 = 300;
const DELETE_LSN: u64 = 400;

fn event(kind: char) -> String {
    match kind {
        'C' => create(
            "invoices",
            json!({"id": 2, "name": "second", "total": "20.00"}),
            CREATE_LSN,
        ),
        'U' => update(
            "invoices",
            json!({"id": 2, "name": "second", "total": "40.00"}),
            UPDATE_LSN,
        ),
        'D' => delete("invoices", json!({"id": 2}), DELETE_LSN),
        _ => unreachable!(),
    }
}

/// Applies invoice 1, then each event of `order` in its own batch, and
/// returns the aggregate after each.
async fn run_case(order: &str, expected: &[&str]) {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let model = env.model().await;
    let first = create(
        "invoices",
        json!({"id": 1, "name": "first", "total": "10.00"}),
        100,
    );
    env.apply(&model, &[first], 1, 1).await;
    assert_eq!(
        env.value("SELECT total::text FROM invoice_total")
            .await
            .as_deref(),
        Some("10.00")
    );

    let mut seen = Vec::new();
    for kind in order.chars() {
        env.apply(&model, &[event(kind)], 1, 1).await;
        seen.push(
            env.value("SELECT total::text FROM invoice_total")
                .await
                .unwrap(),
        );
    }
    assert_eq!(seen, expected, "aggregate after each event of {order}");

    // Final ledger: invoice 1 alive at its key, invoice 2 a tombstone at the
    // delete's key.
    let ledger = env
        .target()
        .await
        .query(
            "SELECT pk, commit_lsn, lsn, deleted, cols FROM tally.ledger ORDER BY pk",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, i64, i64, bool, Option<serde_json::Value>)> = ledger
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "[1]".to_string(),
                100,
                100,
                false,
                Some(json!({"total": "10.00"}))
            ),
            (
                "[2]".to_string(),
                DELETE_LSN as i64,
                DELETE_LSN as i64,
                true,
                None
            ),
        ]
    );
    assert!(
        env.verify(&model).await.is_empty(),
        "view equals the source"
    );
}

#[tokio::test]
async fn case_1_create_update_delete_in_order() {
    run_case("CUD", &["30.00", "50.00", "10.00"]).await;
}

#[tokio::test]
async fn case_2_create_delete_then_late_update() {
    run_case("CDU", &["30.00", "10.00", "10.00"]).await;
}

#[tokio::test]
async fn case_3_update_delete_then_late_create() {
    run_case("UDC", &["50.00", "10.00", "10.00"]).await;
}

#[tokio::test]
async fn case_4_update_late_create_then_delete() {
    run_case("UCD", &["50.00", "50.00", "10.00"]).await;
}

#[tokio::test]
async fn case_5_delete_first_then_late_update_and_create() {
    run_case("DUC", &["10.00", "10.00", "10.00"]).await;
}
