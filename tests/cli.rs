//! The `tally` binary as a user runs it: apply from a file and from stdin,
//! the summary, `--strict`, `verify` with its exit status, and errors that
//! name the bad input.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::json;

const SCHEMA: &str = "
CREATE TABLE invoices (id int PRIMARY KEY, customer_id int NOT NULL, total numeric(20,2) NOT NULL);
INSERT INTO invoices VALUES (1, 1, 10.00), (3, 2, 7.50);";
const VIEWS: &str = "
CREATE MATERIALIZED VIEW invoice_total AS SELECT SUM(total) AS total, COUNT(*) AS invoices FROM invoices;
CREATE MATERIALIZED VIEW customer_total AS SELECT customer_id, SUM(total) AS total FROM invoices GROUP BY customer_id;";

fn tally(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_then_verify_through_the_binary() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let events = [
        create(
            "invoices",
            json!({"id": 2, "customer_id": 1, "total": "99.00"}),
            120,
        ),
        create(
            "invoices",
            json!({"id": 1, "customer_id": 1, "total": "10.00"}),
            100,
        ),
        delete("invoices", json!({"id": 2}), 130),
        create(
            "invoices",
            json!({"id": 1, "customer_id": 1, "total": "10.00"}),
            100,
        ),
    ];
    let file = env.dir.path().join("events.jsonl");
    std::fs::write(&file, events.join("\n") + "\n").unwrap();

    let out = tally(
        &[
            "apply",
            "--config",
            config,
            "--input",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("applied 2"), "{}", text(&out));
    assert!(stdout.contains("1 duplicate"), "{}", text(&out));

    // Not yet equal: invoice 3 has not been applied.
    let out = tally(&["verify", "--config", config], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("customer_total"), "{report}");
    assert!(report.contains("DRIFT"), "{report}");

    // From stdin, with --parallel and --strict.
    let more = create(
        "invoices",
        json!({"id": 3, "customer_id": 2, "total": "7.50"}),
        140,
    );
    let out = tally(
        &[
            "apply",
            "--config",
            config,
            "--input",
            "-",
            "--parallel",
            "2",
            "--strict",
        ],
        Some(&(more + "\n")),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = tally(&["verify", "--config", config], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("all 2 views equal"),
        "{}",
        text(&out)
    );

    // --strict turns a dead letter into exit status 2.
    let out = tally(
        &["apply", "--config", config, "--input", "-", "--strict"],
        Some("{oops\n"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dead-lettered"),
        "{}",
        text(&out)
    );

    // A user reads a view with plain SQL.
    assert_eq!(
        env.value("SELECT total::text FROM customer_total WHERE customer_id = 1")
            .await
            .as_deref(),
        Some("10.00")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_bad_input() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let dir = env.dir.path();

    let out = tally(&["verify", "--config", "/nonexistent/tally.toml"], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tally.toml"),
        "{}",
        text(&out)
    );

    let bad_key = dir.join("bad.toml");
    std::fs::write(
        &bad_key,
        "views = \"views.sql\"\n[source]\nurl = \"x\"\nuser = \"me\"\n",
    )
    .unwrap();
    let out = tally(&["verify", "--config", bad_key.to_str().unwrap()], None);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("user"),
        "{}",
        text(&out)
    );

    std::fs::write(
        dir.join("views.sql"),
        "CREATE MATERIALIZED VIEW m AS SELECT MAX(total) AS top FROM invoices;",
    )
    .unwrap();
    let out = tally(
        &["verify", "--config", env.config_path().to_str().unwrap()],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"m\"") && stderr.contains("MAX"),
        "{}",
        text(&out)
    );

    // A password in a URL never reaches the output.
    let secret = dir.join("secret.toml");
    std::fs::write(
        &secret,
        "views = \"views.sql\"\n[source]\nurl = \"postgres://tally:hunter2@127.0.0.1:1/db\"\n[target]\nurl = \"postgres://tally:hunter2@127.0.0.1:1/db\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("views.sql"), VIEWS).unwrap();
    let out = tally(&["verify", "--config", secret.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(!text(&out).contains("hunter2"), "{}", text(&out));
    assert!(
        text(&out).contains("tally:***@127.0.0.1:1"),
        "{}",
        text(&out)
    );
}

#[test]
fn demo_story_tells_the_story_and_cleans_up() {
    use std::io::{BufRead, BufReader};
    // The scripted terminal story; the web demo is tested in tests/serve.rs
    // and tests/browser.rs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["demo", "--story"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = line.contains("Ctrl-C stops");
        seen.push(line);
        if ready {
            break;
        }
    }
    eprintln!(
        "demo up and through its story in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let text = seen.join("\n");
    for expected in [
        "view =        10.00",
        "view =        30.00",
        "view =        50.00",
        "all 2 views equal",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(child.wait().unwrap().success());
    assert!(rest.join("\n").contains("removed"), "{rest:?}");
}
