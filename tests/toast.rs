//! A TOASTed column that an update leaves unchanged arrives from pgoutput
//! as "unchanged", not as its value. It must not be mistaken for NULL:
//! capture marks it with Debezium's placeholder and apply keeps the value
//! stored in the ledger. Here the large value is a view's group key.

mod common;

use common::*;

const SCHEMA: &str =
    "CREATE TABLE docs (id int PRIMARY KEY, category text NOT NULL, hits int NOT NULL);";
const VIEWS: &str = "CREATE MATERIALIZED VIEW hits_by_category AS
SELECT category, SUM(hits) AS hits, COUNT(*) AS docs FROM docs GROUP BY category;";

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_keeps_the_stored_group_key() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let output = env.dir.path().join("events.jsonl");
    let mut capture = tally_command(&[
        "capture",
        "--config",
        env.config_path().to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let source = env.source().await;
    wait_for_active_slots(&source, 1).await;
    // Random hex barely compresses: 40 kB stays far above the TOAST
    // threshold and is stored out of line.
    source
        .batch_execute(
            "INSERT INTO docs SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 1250) i), 1
             FROM generate_series(1, 4) g",
        )
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO docs SELECT 10 + g, d.category, 5 FROM docs d CROSS JOIN generate_series(1, 2) g WHERE d.id = 1")
        .await
        .unwrap();
    // Updates that leave the large column alone.
    source.batch_execute("UPDATE docs SET hits = hits + 10; UPDATE docs SET hits = hits * 2 WHERE id IN (1, 11);").await.unwrap();

    wait_until_captured(&source).await;
    terminate(&mut capture);

    let text = std::fs::read_to_string(&output).unwrap();
    assert!(
        text.contains(tally::event::UNCHANGED_TOAST),
        "the updates must carry the unchanged-TOAST placeholder for this test to mean anything"
    );
    let events: Vec<String> = text.lines().map(str::to_string).collect();
    let model = env.model().await;
    let stats = env.apply(&model, &events, 1, 3).await;
    if stats.dead_lettered > 0 {
        let reasons: Vec<String> = env
            .target()
            .await
            .query("SELECT reason FROM tally.dead_letters", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        panic!("{stats}: {reasons:?}");
    }
    let differences = env.verify(&model).await;
    assert!(differences.is_empty(), "{differences:#?}");
    let groups: i64 = env
        .target()
        .await
        .query_one("SELECT count(*) FROM hits_by_category", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(groups, 4, "no group of NULL or placeholder categories");
}
