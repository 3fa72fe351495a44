//! Bad input end to end: valid events mixed with malformed JSON, wrong
//! types, unknown tables, missing primary keys, numeric overflow and a value
//! only the target can reject. The valid ones are applied, every bad one is
//! in the dead-letter table with its reason, nothing crashes.

mod common;

use common::*;
use serde_json::json;

const SCHEMA: &str = "
CREATE TABLE invoices (id int PRIMARY KEY, customer_id int, total numeric(8,2), paid_at timestamptz);
INSERT INTO invoices VALUES (1, 7, 10.50, NULL), (2, 7, 20.00, '2026-01-01T00:00:00Z'), (3, 8, 5.25, NULL);";

const VIEWS: &str = "
CREATE MATERIALIZED VIEW customer_totals AS
SELECT customer_id, SUM(total) AS total, COUNT(paid_at) AS paid
FROM invoices GROUP BY customer_id;";

fn row(id: i64, customer: i64, total: &str, paid_at: Option<&str>) -> serde_json::Value {
    json!({"id": id, "customer_id": customer, "total": total, "paid_at": paid_at})
}

#[tokio::test]
async fn bad_events_are_dead_lettered_with_reasons_and_the_rest_applies() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let model = env.model().await;
    let lines = vec![
        create("invoices", row(1, 7, "10.50", None), 100),
        "{not json".to_string(),
        create(
            "invoices",
            row(2, 7, "20.00", Some("2026-01-01T00:00:00Z")),
            110,
        ),
        // wrong type
        create(
            "invoices",
            json!({"id": 9, "customer_id": "seven", "total": "1.00", "paid_at": null}),
            120,
        ),
        // unknown table
        create("refunds", json!({"id": 1}), 130),
        // missing primary key
        create(
            "invoices",
            json!({"customer_id": 7, "total": "1.00", "paid_at": null}),
            140,
        ),
        // numeric overflow for numeric(8,2)
        create("invoices", row(10, 7, "1000000.00", None), 150),
        create("invoices", row(3, 8, "5.25", None), 160),
        // only Postgres can tell this timestamp is invalid
        create(
            "invoices",
            row(11, 8, "1.00", Some("the day after tomorrow")),
            170,
        ),
        // missing source.lsn
        r#"{"op":"c","after":{"id":12},"source":{"table":"invoices"}}"#.to_string(),
        // unknown op
        r#"{"op":"x","after":{"id":13},"source":{"table":"invoices","lsn":5}}"#.to_string(),
        // Debezium's empty tombstone after a delete: ignored, not an error
        String::new(),
    ];
    let stats = env.apply(&model, &lines, 1, 100).await;
    assert_eq!(stats.applied, 3, "{stats}");
    assert_eq!(stats.dead_lettered, 8, "{stats}");
    assert_eq!(stats.tombstone_messages, 1, "{stats}");

    let reasons: Vec<(Option<String>, String, String)> = env
        .target()
        .await
        .query(
            "SELECT source_table, reason, payload FROM tally.dead_letters ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(reasons.len(), 8);
    let find = |needle: &str| {
        reasons
            .iter()
            .find(|(_, reason, _)| reason.contains(needle))
            .unwrap_or_else(|| panic!("no dead letter mentions {needle:?}: {reasons:#?}"))
    };
    assert_eq!(find("malformed JSON").2, "{not json");
    assert!(find("after.customer_id").1.contains("expected an integer"));
    assert_eq!(
        find("unknown table public.refunds").0.as_deref(),
        Some("public.refunds")
    );
    assert!(find("after.id").1.contains("primary-key column missing"));
    assert!(find("after.total").1.contains("overflow"));
    assert!(find("rejected by the target").1.contains("timestamp"));
    assert!(find("source.lsn").1.contains("missing"));
    assert!(find("\"x\"").1.contains("op"));
    // Every payload is kept verbatim.
    for (_, _, payload) in &reasons {
        assert!(
            lines.contains(payload),
            "payload kept as received: {payload}"
        );
    }

    let differences = env.verify(&model).await;
    assert!(differences.is_empty(), "{differences:#?}");
}
