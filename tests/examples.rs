//! The worked examples under `examples/`, end to end on a real Postgres.
//!
//! Each example's `schema.sql` and `views.sql` are used as written. A seeded
//! random history of its table (inserts, updates that move rows between
//! groups and change measures, soft deletes and restores, NULLs, deletes)
//! is delivered shuffled with 20% duplicates to 4 appliers; every view must
//! then equal its SELECT on a source holding the history's final state.
//! A few tiny hand-written histories, delivered in reverse order, check
//! exact values read from the view tables with plain SQL.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tally::apply::Model;

/// Events in each random history.
const EVENTS: usize = 2_500;

/// A history of one table's rows (JSON objects with every column, keyed by
/// `id`) as Debezium events, and its final state.
struct History {
    table: &'static str,
    rows: BTreeMap<i64, Value>,
    events: Vec<String>,
    /// How many of `events` were delivered by [`deliver_reversed`].
    delivered: usize,
    lsn: u64,
}

impl History {
    fn new(table: &'static str) -> History {
        History {
            table,
            rows: BTreeMap::new(),
            events: Vec::new(),
            delivered: 0,
            lsn: 0x1_0000_0000,
        }
    }

    /// Records one change: `Some(row)` upserts row `id`, `None` deletes it.
    /// Each transaction owns a block of 1,000 positions: its changes' `lsn`s
    /// rise within it and its `commit_lsn` is the block's last position.
    /// A change with `same_transaction` joins the previous one's.
    fn change(&mut self, id: i64, row: Option<Value>, same_transaction: bool) {
        if !same_transaction {
            self.lsn = (self.lsn / 1_000 + 1) * 1_000;
        }
        self.lsn += 10;
        let commit_lsn = (self.lsn / 1_000 + 1) * 1_000 - 1;
        let event = match row {
            Some(mut row) => {
                row["id"] = json!(id);
                let op = if self.rows.contains_key(&id) {
                    "u"
                } else {
                    "c"
                };
                self.rows.insert(id, row.clone());
                envelope(op, self.table, Value::Null, row, commit_lsn, self.lsn)
            }
            None => {
                self.rows.remove(&id);
                envelope(
                    "d",
                    self.table,
                    json!({"id": id}),
                    Value::Null,
                    commit_lsn,
                    self.lsn,
                )
            }
        };
        self.events.push(event);
    }

    fn upsert(&mut self, id: i64, row: Value) {
        self.change(id, Some(row), false);
    }

    fn delete(&mut self, id: i64) {
        self.change(id, None, false);
    }

    /// A random history: transactions of 1-3 changes, 30% inserts of
    /// `new_row`, 55% updates by `mutate`, 15% deletes.
    fn random(
        table: &'static str,
        seed: u64,
        new_row: impl Fn(&mut StdRng) -> Value,
        mutate: impl Fn(&mut StdRng, &mut Value),
    ) -> History {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut history = History::new(table);
        let mut next_id = 1;
        while history.events.len() < EVENTS {
            for i in 0..rng.random_range(1..=3) {
                let choice = rng.random_range(0..100);
                let existing = (!history.rows.is_empty()).then(|| {
                    let n = rng.random_range(0..history.rows.len());
                    *history.rows.keys().nth(n).unwrap()
                });
                match (choice, existing) {
                    (0..30, _) | (_, None) => {
                        history.change(next_id, Some(new_row(&mut rng)), i > 0);
                        next_id += 1;
                    }
                    (30..85, Some(id)) => {
                        let mut row = history.rows[&id].clone();
                        mutate(&mut rng, &mut row);
                        history.change(id, Some(row), i > 0);
                    }
                    (_, Some(id)) => history.change(id, None, i > 0),
                }
            }
        }
        history
    }

    /// Makes the source table hold the history's final state.
    async fn write_source(&self, env: &TestEnv) {
        let rows = Value::Array(self.rows.values().cloned().collect());
        let (source, table) = (env.source().await, self.table);
        source
            .execute(&format!("DELETE FROM {table}"), &[])
            .await
            .unwrap();
        let insert = format!(
            "INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, $1)"
        );
        source.execute(&insert, &[&rows]).await.unwrap();
    }
}

/// A private Postgres prepared with `examples/<name>/`'s schema and views.
async fn example_env(name: &str) -> (TestEnv, Arc<Model>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).expect("example file");
    let env = TestEnv::new(&read("schema.sql"), &read("views.sql")).await;
    let model = env.model().await;
    (env, model)
}

/// Delivers a random history of example `name` shuffled and duplicated to
/// 4 appliers, then checks every view against the source.
async fn converges(
    name: &str,
    table: &'static str,
    seed: u64,
    new_row: impl Fn(&mut StdRng) -> Value,
    mutate: impl Fn(&mut StdRng, &mut Value),
) {
    let (env, model) = example_env(name).await;
    let history = History::random(table, seed, new_row, mutate);
    assert!(
        history.rows.len() >= 100,
        "{name}: {} rows",
        history.rows.len()
    );
    history.write_source(&env).await;
    let delivery = shuffle_with_duplicates(&history.events, 0.2, seed);
    let stats = env.apply(&model, &delivery, 4, 200).await;
    eprintln!("{name}: {} rows; {stats}", history.rows.len());
    assert_eq!(stats.dead_lettered, 0, "{name}: {stats}");
    assert!(stats.duplicates + stats.stale > 0, "{name}: {stats}");
    let differences = env.verify(&model).await;
    assert!(differences.is_empty(), "{name}: drift: {differences:#?}");
}

/// Delivers the events of `history` not delivered yet in reverse order,
/// one per batch, and checks the views against the source.
async fn deliver_reversed(env: &TestEnv, model: &Arc<Model>, history: &mut History) {
    for event in history.events[history.delivered..].iter().rev() {
        let stats = env.apply(model, std::slice::from_ref(event), 1, 1).await;
        assert_eq!(stats.dead_lettered, 0, "{stats}");
    }
    history.delivered = history.events.len();
    history.write_source(env).await;
    let differences = env.verify(model).await;
    assert!(differences.is_empty(), "drift: {differences:#?}");
}

/// Reads one value of a view table with plain SQL.
async fn read(env: &TestEnv, sql: &str) -> String {
    env.value(sql).await.unwrap_or_else(|| "(null)".into())
}

// Random values valid for the examples' column types.

/// A decimal with two places, from a range of cents.
fn money(rng: &mut StdRng, cents: std::ops::Range<i64>) -> Value {
    let c = rng.random_range(cents);
    let sign = if c < 0 { "-" } else { "" };
    json!(format!("{sign}{}.{:02}", c.abs() / 100, c.abs() % 100))
}

fn timestamp(rng: &mut StdRng) -> String {
    let (day, hour, minute) = (
        rng.random_range(1..=28),
        rng.random_range(0..24),
        rng.random_range(0..60),
    );
    format!("2026-02-{day:02}T{hour:02}:{minute:02}:00+00:00")
}

/// NULL with probability `p`, else a value made by `value`.
fn or_null(rng: &mut StdRng, p: f64, value: impl FnOnce(&mut StdRng) -> Value) -> Value {
    if rng.random_bool(p) {
        Value::Null
    } else {
        value(rng)
    }
}

/// Sets `field` to NULL when it holds a value, else to `value`.
fn toggle(row: &mut Value, field: &str, value: Value) {
    row[field] = if row[field].is_null() {
        value
    } else {
        Value::Null
    };
}

fn pick<T: Clone>(rng: &mut StdRng, options: &[T]) -> T {
    options[rng.random_range(0..options.len())].clone()
}

/// Words separated by assorted whitespace, sometimes padded, sometimes blank.
fn paragraph_body(rng: &mut StdRng) -> Value {
    const WORDS: &[&str] = &[
        "tally", "keeps", "views", "exact", "café", "naïve", "x", "—",
    ];
    const SPACES: &[&str] = &[" ", "  ", "\n", "\t", " \n\n ", "\r\n"];
    match rng.random_range(0..20) {
        0 => Value::Null,
        1 => json!(""),
        2 => json!(pick(rng, SPACES)),
        _ => {
            let mut body = String::new();
            if rng.random_bool(0.2) {
                body.push_str(pick(rng, SPACES));
            }
            for i in 0..rng.random_range(1..40) {
                if i > 0 {
                    body.push_str(pick(rng, SPACES));
                }
                body.push_str(pick(rng, WORDS));
            }
            if rng.random_bool(0.2) {
                body.push_str(pick(rng, SPACES));
            }
            json!(body)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invoice_total_converges() {
    converges(
        "invoice_total",
        "invoices",
        1,
        |rng| {
            json!({
                "name": format!("INV-{}", rng.random_range(1000..9999)),
                "customer_id": or_null(rng, 0.1, |rng| json!(rng.random_range(1..=40))),
                "total": money(rng, -5_000..500_000),
            })
        },
        |rng, row| match rng.random_range(0..4) {
            0 => row["customer_id"] = or_null(rng, 0.1, |rng| json!(rng.random_range(1..=40))),
            1 => row["total"] = money(rng, -5_000..500_000),
            2 => row["name"] = json!(format!("INV-{}", rng.random_range(1000..9999))),
            _ => {
                row["customer_id"] = json!(rng.random_range(1..=40));
                row["total"] = money(rng, 0..500_000);
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_balance_converges() {
    converges(
        "bank_balance",
        "movements",
        2,
        |rng| {
            json!({
                "account_id": rng.random_range(1..=50),
                "amount": money(rng, -200_000..200_000),
                "memo": or_null(rng, 0.3, |_| json!("transfer")),
                "booked_at": timestamp(rng),
                "voided_at": or_null(rng, 0.9, |rng| json!(timestamp(rng))),
            })
        },
        |rng, row| match rng.random_range(0..4) {
            0 => row["account_id"] = json!(rng.random_range(1..=50)),
            1 => row["amount"] = money(rng, -200_000..200_000),
            _ => toggle(row, "voided_at", json!(timestamp(rng))),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cms_word_count_converges() {
    converges(
        "cms_word_count",
        "paragraphs",
        3,
        |rng| {
            json!({
                "article_id": rng.random_range(1..=30),
                "position": rng.random_range(0..50),
                "body": paragraph_body(rng),
                "deleted_at": or_null(rng, 0.9, |rng| json!(timestamp(rng))),
            })
        },
        |rng, row| match rng.random_range(0..5) {
            0 => row["article_id"] = json!(rng.random_range(1..=30)),
            1 => row["position"] = json!(rng.random_range(0..50)),
            2 => toggle(row, "deleted_at", json!(timestamp(rng))),
            _ => row["body"] = paragraph_body(rng),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn project_completion_converges() {
    const STATUS: &[&str] = &["todo", "doing", "done"];
    let hours = |rng: &mut StdRng| {
        or_null(rng, 0.2, |rng| {
            let tenths = rng.random_range(0..10_000);
            json!(format!("{}.{}", tenths / 10, tenths % 10))
        })
    };
    converges(
        "project_completion",
        "tasks",
        4,
        |rng| {
            json!({
                "project_id": rng.random_range(1..=25),
                "title": "write the docs",
                "status": pick(rng, STATUS),
                "estimate_hours": hours(rng),
            })
        },
        |rng, row| match rng.random_range(0..5) {
            0 => row["project_id"] = json!(rng.random_range(1..=25)),
            1 => row["estimate_hours"] = hours(rng),
            _ => row["status"] = json!(pick(rng, STATUS)),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounting_converges() {
    let kind = |rng: &mut StdRng| json!(pick(rng, &["invoice", "payment"]));
    let date = |rng: &mut StdRng| {
        let (month, day) = (rng.random_range(1..=12), rng.random_range(1..=28));
        json!(format!("2026-{month:02}-{day:02}"))
    };
    converges(
        "accounting",
        "documents",
        5,
        |rng| {
            json!({
                "customer_id": rng.random_range(1..=40),
                "kind": kind(rng),
                "number": format!("D-{}", rng.random_range(1..100_000)),
                "amount": money(rng, 0..1_000_000),
                "issued_on": date(rng),
            })
        },
        |rng, row| match rng.random_range(0..4) {
            0 => row["customer_id"] = json!(rng.random_range(1..=40)),
            1 => row["kind"] = kind(rng),
            2 => row["amount"] = money(rng, 0..1_000_000),
            _ => row["issued_on"] = date(rng),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn product_ratings_converges() {
    let stars = |rng: &mut StdRng| or_null(rng, 0.15, |rng| json!(rng.random_range(1..=5)));
    converges(
        "product_ratings",
        "ratings",
        6,
        |rng| {
            json!({
                "product_id": rng.random_range(1..=30),
                "user_id": rng.random_range(1..=500),
                "stars": stars(rng),
                "review": or_null(rng, 0.5, |_| json!("works as described")),
            })
        },
        |rng, row| match rng.random_range(0..4) {
            0 => row["product_id"] = json!(rng.random_range(1..=30)),
            1 => row["review"] = or_null(rng, 0.5, |_| json!("changed my mind")),
            _ => row["stars"] = stars(rng),
        },
    )
    .await;
}

// Exact values from tiny histories delivered in reverse order.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invoice_total_exact_values() {
    let (env, model) = example_env("invoice_total").await;
    let mut history = History::new("invoices");
    history.upsert(
        1,
        json!({"name": "first", "customer_id": 7, "total": "10.00"}),
    );
    history.upsert(
        2,
        json!({"name": "second", "customer_id": 7, "total": "20.00"}),
    );
    deliver_reversed(&env, &model, &mut history).await;
    assert_eq!(
        read(&env, "SELECT total::text FROM invoice_total").await,
        "30.00"
    );
    assert_eq!(
        read(
            &env,
            "SELECT format('%s %s', total, invoices) FROM customer_totals WHERE customer_id = 7"
        )
        .await,
        "30.00 2"
    );

    // Invoice 2 moves to customer 8 at 25.00, invoice 1 is deleted.
    history.upsert(
        2,
        json!({"name": "second", "customer_id": 8, "total": "25.00"}),
    );
    history.delete(1);
    deliver_reversed(&env, &model, &mut history).await;
    assert_eq!(
        read(
            &env,
            "SELECT format('%s %s', total, invoices) FROM invoice_total"
        )
        .await,
        "25.00 1"
    );
    assert_eq!(
        read(
            &env,
            "SELECT string_agg(format('%s:%s', customer_id, total), ' ') FROM customer_totals"
        )
        .await,
        "8:25.00"
    );

    // The last invoice goes: the total is NULL again, as SUM over no rows.
    history.delete(2);
    deliver_reversed(&env, &model, &mut history).await;
    assert_eq!(
        read(
            &env,
            "SELECT format('%s|%s', total, invoices) FROM invoice_total"
        )
        .await,
        "|0"
    );
    assert_eq!(
        read(&env, "SELECT count(*)::text FROM customer_totals").await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn project_completion_exact_values() {
    let (env, model) = example_env("project_completion").await;
    let mut history = History::new("tasks");
    let task = |status: &str, hours: Value| json!({"project_id": 1, "title": "t", "status": status, "estimate_hours": hours});
    history.upsert(1, task("done", json!("2.0")));
    history.upsert(2, task("doing", json!("1.5")));
    history.upsert(3, task("todo", Value::Null));
    deliver_reversed(&env, &model, &mut history).await;
    let progress = "SELECT format('%s/%s %s %s', done, tasks, completion, hours_left) FROM project_progress WHERE project_id = 1";
    assert_eq!(read(&env, progress).await, "1/3 0.3333 1.5");

    history.upsert(2, task("done", json!("1.5")));
    history.upsert(3, task("doing", json!("4.0")));
    deliver_reversed(&env, &model, &mut history).await;
    assert_eq!(read(&env, progress).await, "2/3 0.6667 4.0");

    history.upsert(3, task("done", json!("4.0")));
    deliver_reversed(&env, &model, &mut history).await;
    assert_eq!(read(&env, progress).await, "3/3 1.0000 ");

    // A project whose last task moves away or is deleted has no row (and
    // its ratio is never divided by zero on the way out).
    history.upsert(
        1,
        json!({"project_id": 2, "title": "t", "status": "todo", "estimate_hours": null}),
    );
    history.delete(2);
    history.delete(3);
    deliver_reversed(&env, &model, &mut history).await;
    let all = "SELECT string_agg(format('%s:%s/%s=%s', project_id, done, tasks, completion), ' ') FROM project_progress";
    assert_eq!(read(&env, all).await, "2:0/1=0.0000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cms_word_count_exact_values() {
    let (env, model) = example_env("cms_word_count").await;
    let mut history = History::new("paragraphs");
    let paragraph = |body: Value, deleted_at: Value| json!({"article_id": 1, "position": 0, "body": body, "deleted_at": deleted_at});
    history.upsert(
        1,
        paragraph(json!("  Tally keeps\n\tviews exact. "), Value::Null),
    );
    history.upsert(2, paragraph(json!("one more"), Value::Null));
    history.upsert(3, paragraph(json!(" \n "), Value::Null));
    history.upsert(4, paragraph(Value::Null, Value::Null));
    history.upsert(5, paragraph(json!("gone"), json!("2026-02-01T00:00:00Z")));
    deliver_reversed(&env, &model, &mut history).await;
    let words = "SELECT format('%s words, %s paragraphs', words, paragraphs) FROM article_words WHERE article_id = 1";
    assert_eq!(read(&env, words).await, "6 words, 2 paragraphs");

    // Restore paragraph 5, fill paragraph 3, soft-delete paragraph 1.
    history.upsert(5, paragraph(json!("gone"), Value::Null));
    history.upsert(3, paragraph(json!("now three words"), Value::Null));
    history.upsert(
        1,
        paragraph(
            json!("  Tally keeps\n\tviews exact. "),
            json!("2026-02-02T00:00:00Z"),
        ),
    );
    deliver_reversed(&env, &model, &mut history).await;
    assert_eq!(read(&env, words).await, "6 words, 3 paragraphs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounting_exact_values() {
    let (env, model) = example_env("accounting").await;
    let mut history = History::new("documents");
    let document = |kind: &str, amount: &str, issued_on: &str| json!({"customer_id": 3, "kind": kind, "number": "N", "amount": amount, "issued_on": issued_on});
    history.upsert(1, document("invoice", "100.00", "2026-01-15"));
    history.upsert(2, document("invoice", "50.00", "2026-02-03"));
    history.upsert(3, document("payment", "120.00", "2026-02-10"));
    deliver_reversed(&env, &model, &mut history).await;
    let owed = "SELECT format('%s = %s - %s', owed, invoiced, paid) FROM customer_owed WHERE customer_id = 3";
    assert_eq!(read(&env, owed).await, "30.00 = 150.00 - 120.00");

    // Corrections: the payment was 150.00, and document 2 was a payment too.
    history.upsert(3, document("payment", "150.00", "2026-02-10"));
    history.upsert(2, document("payment", "50.00", "2026-02-03"));
    deliver_reversed(&env, &model, &mut history).await;
    assert_eq!(read(&env, owed).await, "-100.00 = 100.00 - 200.00");
    let months = "SELECT string_agg(format('%s:%s', month, invoiced), ' ' ORDER BY month) FROM monthly_invoiced";
    assert_eq!(read(&env, months).await, "2026-01:100.00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn product_ratings_exact_values() {
    let (env, model) = example_env("product_ratings").await;
    let mut history = History::new("ratings");
    for (id, stars) in [
        (1, json!(5)),
        (2, json!(4)),
        (3, Value::Null),
        (4, json!(4)),
    ] {
        history.upsert(
            id,
            json!({"product_id": 9, "user_id": id, "stars": stars, "review": null}),
        );
    }
    deliver_reversed(&env, &model, &mut history).await;
    let rating = "SELECT format('%s %s %s/%s', average, shown, rated, ratings) FROM product_rating WHERE product_id = 9";
    assert_eq!(read(&env, rating).await, "4.3333333333333333 4.3 3/4");
}
