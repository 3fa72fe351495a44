//! The HTTP side against real processes and a real PostgreSQL: the demo's
//! JSON API, writes and their cross-site refusal, /metrics and /healthz;
//! `tally serve` next to `tally run` (view changes cross processes through
//! the target's NOTIFY into Server-Sent Events); the auth rule.

mod common;
#[path = "support/web.rs"]
mod web;

use std::time::{Duration, Instant};

use common::{TestEnv, spawn_tally, tally_command};
use serde_json::Value;
use web::{EventStream, get, request, send_json, start_server, wait_for_json};

fn total_of(value: &Value) -> Option<String> {
    value["rows"][0]["total"].as_f64().map(|t| format!("{t}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_api_metrics_health_and_cross_site_writes() {
    let env = TestEnv::new("", "").await;
    let server = start_server(&[
        "demo",
        "--source",
        &env.source_url,
        "--target",
        &env.target_url,
        "--listen",
        "127.0.0.1:0",
    ]);
    let addr = server.addr;

    let health = get(addr, "/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    // The page and its assets are in the binary, with a strict CSP.
    let page = get(addr, "/");
    assert!(page.body.contains("<script src=\"/app.js\""));
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(get(addr, "/app.js").body.contains("textContent"));

    let views = get(addr, "/api/views").json();
    let names: Vec<&str> = views["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["invoice_total", "customer_totals"]);
    assert_eq!(views["views"][0]["group_columns"], serde_json::json!([]));
    assert_eq!(
        views["views"][1]["group_columns"],
        serde_json::json!(["customer_id"])
    );

    // Writes as the page sends them.
    for (name, customer, total) in [("a", 1, "10"), ("b", 1, "2.50"), ("c", 2, "7")] {
        let created = send_json(
            "POST",
            addr,
            "/api/invoices",
            &format!("{{\"name\":\"{name}\",\"customer_id\":{customer},\"total\":\"{total}\"}}"),
        );
        assert_eq!(created.status, 200, "{}", created.body);
    }
    let total = wait_for_json(
        addr,
        "/api/views/invoice_total",
        Duration::from_secs(10),
        |v| total_of(v).as_deref() == Some("19.5"),
    );
    assert_eq!(total["rows"][0]["invoices"], 3);

    // Filters on group columns, bound as parameters.
    let one = get(addr, "/api/views/customer_totals?customer_id=1").json();
    assert_eq!(one["rows"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["rows"][0]["total"], 12.5);
    let all = get(addr, "/api/views/customer_totals").json();
    assert_eq!(all["rows"].as_array().unwrap().len(), 2);
    let none = get(addr, "/api/views/customer_totals?customer_id=99").json();
    assert_eq!(none["rows"], serde_json::json!([]));
    let bad_value = get(
        addr,
        "/api/views/customer_totals?customer_id=1%27%20OR%201=1",
    );
    assert_eq!(bad_value.status, 400, "{}", bad_value.body);
    let not_a_key = get(addr, "/api/views/customer_totals?total=1");
    assert_eq!(not_a_key.status, 400);
    assert!(not_a_key.body.contains("customer_id"), "{}", not_a_key.body);
    assert_eq!(get(addr, "/api/views/nope").status, 404);

    // Cross-site writes are refused, and change nothing.
    let evil = "{\"name\":\"evil\",\"customer_id\":1,\"total\":\"1000\"}";
    let from_elsewhere = request(
        "POST",
        addr,
        "/api/invoices",
        &[
            ("Content-Type", "application/json"),
            ("Origin", "http://evil.example"),
        ],
        evil,
    );
    assert_eq!(from_elsewhere.status, 403, "{}", from_elsewhere.body);
    let cross_site = request(
        "POST",
        addr,
        "/api/invoices",
        &[
            ("Content-Type", "application/json"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        evil,
    );
    assert_eq!(cross_site.status, 403);
    let form = request(
        "POST",
        addr,
        "/api/invoices",
        &[("Content-Type", "text/plain")],
        evil,
    );
    assert!(form.status == 415 || form.status == 403, "{}", form.status);
    let chaos = request(
        "POST",
        addr,
        "/api/chaos",
        &[
            ("Content-Type", "application/json"),
            ("Origin", "http://evil.example"),
        ],
        "{\"on\":true}",
    );
    assert_eq!(chaos.status, 403);
    let invoices = get(addr, "/api/invoices").json();
    assert_eq!(invoices.as_array().unwrap().len(), 3, "{invoices}");

    // Chaos on: updates are shuffled, duplicated, delayed; the views end
    // right anyway, and verify says so.
    assert_eq!(
        send_json("POST", addr, "/api/chaos", "{\"on\":true}").status,
        200
    );
    let first_id = invoices[0]["id"].as_i64().unwrap();
    for step in 0..20 {
        let updated = send_json(
            "PUT",
            addr,
            &format!("/api/invoices/{first_id}"),
            &format!(
                "{{\"name\":\"a\",\"customer_id\":{},\"total\":\"{}\"}}",
                step % 3,
                step
            ),
        );
        assert_eq!(updated.status, 200, "{}", updated.body);
    }
    assert_eq!(
        send_json("POST", addr, "/api/chaos", "{\"on\":false}").status,
        200
    );
    // Invoice first_id (the list is in id order) ends at 19.
    let expected_total: f64 = invoices
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|i| i["total"].as_str().unwrap().parse::<f64>().unwrap())
        .sum::<f64>()
        + 19.0;
    wait_for_json(
        addr,
        "/api/views/invoice_total",
        Duration::from_secs(15),
        |v| v["rows"][0]["total"].as_f64() == Some(expected_total),
    );
    let verified = send_json("POST", addr, "/api/verify", "{}").json();
    assert_eq!(verified["equal"], true, "{verified}");

    // Metrics: counters of what just happened. The views can be right
    // before chaos has handed over every delivery it held back (an older
    // version or a copy, dropped when it comes), so the counters are read
    // until every captured event is accounted for.
    let started = Instant::now();
    let (metrics, value) = loop {
        let metrics = get(addr, "/metrics");
        assert_eq!(metrics.status, 200);
        let body = metrics.body.clone();
        let value = move |name: &str| -> f64 {
            body.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        // Every captured event was applied, or dropped as an older version
        // in its batch, a duplicate or a stale arrival.
        let handled = value("tally_events_applied_total")
            + value("tally_events_coalesced_total")
            + value("tally_events_duplicate_total")
            + value("tally_events_stale_total");
        let captured = value("tally_events_captured_total");
        if captured >= 23.0 && handled >= captured {
            break (metrics, value);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "captured events not all accounted for (handled {handled} of {captured}):\n{}",
            metrics.body
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        value("tally_events_applied_total") >= 4.0,
        "{}",
        metrics.body
    );
    assert!(
        value("tally_events_applied_total") <= value("tally_events_captured_total") + 1.0,
        "{}",
        metrics.body
    );
    assert!(value("tally_batches_total") >= 1.0);
    assert!(
        value("tally_apply_batch_size_count") >= 1.0,
        "{}",
        metrics.body
    );
    assert!(
        value("tally_apply_seconds_count") >= 1.0,
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("tally_dead_letters 0"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("tally_slot_lag_bytes"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("tally_capture_lag_bytes"),
        "{}",
        metrics.body
    );
    eprintln!(
        "after chaos: applied {}, duplicates dropped {}, stale dropped {}",
        value("tally_events_applied_total"),
        value("tally_events_duplicate_total"),
        value("tally_events_stale_total")
    );

    // Deleting works, and the pipeline panel arrives on the stream.
    let deleted = send_json("DELETE", addr, &format!("/api/invoices/{first_id}"), "");
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let mut stream = EventStream::open(addr, &[]);
    let panel = stream.wait_for("pipeline", Duration::from_secs(5), |_| true);
    assert!(panel["captured"].as_f64().unwrap() >= 23.0, "{panel}");
    assert_eq!(panel["dead_letters"], 0);
}

const INVOICES: &str = "CREATE TABLE invoices (id serial PRIMARY KEY, name text NOT NULL, customer_id integer NOT NULL, total numeric(20,2) NOT NULL);";
const INVOICE_VIEWS: &str = "CREATE MATERIALIZED VIEW invoice_total AS SELECT SUM(total) AS total, COUNT(*) AS invoices FROM invoices;\nCREATE MATERIALIZED VIEW customer_totals AS SELECT customer_id, SUM(total) AS total FROM invoices GROUP BY customer_id;";

#[tokio::test(flavor = "multi_thread")]
async fn serve_streams_changes_applied_by_another_process_and_checks_tokens() {
    let env = TestEnv::new(INVOICES, INVOICE_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let server = start_server(&[
        "serve",
        "--config",
        config,
        "--listen",
        "127.0.0.1:0",
        "--auth-token",
        "s3cret",
    ]);
    let addr = server.addr;
    let _pipeline = spawn_tally(&["run", "--config", config]);
    let auth = [("Authorization", "Bearer s3cret")];

    // The token rule: /healthz is open, the rest needs the token.
    assert_eq!(get(addr, "/healthz").status, 200);
    for path in [
        "/api/views",
        "/api/views/invoice_total",
        "/metrics",
        "/api/stream",
        "/",
    ] {
        assert_eq!(get(addr, path).status, 401, "{path} without a token");
        let wrong = request("GET", addr, path, &[("Authorization", "Bearer s3cres")], "");
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
    }
    assert_eq!(request("GET", addr, "/api/views", &auth, "").status, 200);
    // No demo writes in serve mode.
    let write = request(
        "POST",
        addr,
        "/api/invoices",
        &[auth[0], ("Content-Type", "application/json")],
        "{}",
    );
    assert!(
        write.status == 404 || write.status == 405,
        "{}",
        write.status
    );

    // A change on the source, applied by `tally run`, reaches the stream.
    let mut stream = EventStream::open(addr, &auth);
    let first = stream.wait_for("view", Duration::from_secs(10), |v| {
        v["view"] == "invoice_total"
    });
    assert_eq!(first["rows"][0]["invoices"], 0, "{first}");
    common::wait_for_active_slots(&env.source().await, 1).await;
    env.source()
        .await
        .batch_execute("INSERT INTO invoices (name, customer_id, total) VALUES ('x', 7, 42.50)")
        .await
        .unwrap();
    let changed = stream.wait_for("view", Duration::from_secs(10), |v| {
        v["view"] == "invoice_total" && v["rows"][0]["total"] == 42.5
    });
    assert_eq!(changed["rows"][0]["invoices"], 1);
    // (The per-customer view's event may come before or after that one.)
    let customer = request(
        "GET",
        addr,
        "/api/views/customer_totals?customer_id=7",
        &auth,
        "",
    )
    .json();
    assert_eq!(customer["rows"][0]["total"], 42.5, "{customer}");
}

#[test]
fn serve_refuses_an_open_address_without_a_token() {
    let out = tally_command(&[
        "serve",
        "--config",
        "/nonexistent/tally.toml",
        "--listen",
        "0.0.0.0:0",
    ])
    .env_remove("TALLY_AUTH_TOKEN")
    .stderr(std::process::Stdio::piped())
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without --auth-token"),
        "{stderr}"
    );
    let demo = tally_command(&["demo", "--listen", "0.0.0.0:0"])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!demo.status.success());
    assert!(String::from_utf8_lossy(&demo.stderr).contains("refusing"));
}

/// The demo from the command to a page that answers, with its own
/// private PostgreSQL: the figure the README quotes.
#[test]
fn demo_is_up_within_ten_seconds() {
    let mut server = start_server(&["demo", "--listen", "127.0.0.1:0"]);
    eprintln!(
        "tally demo answered after {:.2} s",
        server.ready_after.as_secs_f64()
    );
    assert!(server.ready_after < Duration::from_secs(10));
    assert_eq!(get(server.addr, "/api/info").json()["demo"], true);
    let status = common::terminate(&mut server.child);
    assert!(status.success());
}
