//! What users hit first with capture gets a clear error that says how to
//! fix it; a source that goes away mid-stream is retried, not fatal.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tally::pgcluster::{ClusterOptions, PgCluster};

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, amount numeric(10,2));
CREATE TABLE loose (amount numeric(10,2));";
const VIEWS: &str = "CREATE MATERIALIZED VIEW total AS SELECT SUM(amount) AS amount FROM items;";

fn run(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > timeout {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn write_config(env: &TestEnv, name: &str, source_url: &str, views: &str) -> String {
    let dir = env.dir.path();
    std::fs::write(dir.join(format!("{name}.sql")), views).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "views = \"{name}.sql\"\n[source]\nurl = \"{source_url}\"\n[target]\nurl = \"{}\"\n",
            env.target_url
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_problems_are_explained() {
    let env = TestEnv::new(SCHEMA, VIEWS).await;
    let output = env.dir.path().join("out.jsonl");
    let output = output.to_str().unwrap();

    // A role without REPLICATION.
    env.source()
        .await
        .batch_execute(
            "CREATE ROLE plain LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO plain",
        )
        .await
        .unwrap();
    let plain_url = env.source_url.replace("tally@", "plain@");
    let config = write_config(&env, "plain", &plain_url, VIEWS);
    let out = run(
        &["capture", "--config", &config, "--output", output],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ALTER ROLE plain REPLICATION"),
        "{}",
        stderr(&out)
    );

    // A table without a primary key (and not REPLICA IDENTITY FULL).
    let config = write_config(
        &env,
        "loose",
        &env.source_url,
        "CREATE MATERIALIZED VIEW l AS SELECT SUM(amount) AS amount FROM loose;",
    );
    let out = run(
        &["capture", "--config", &config, "--output", output],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("REPLICA IDENTITY FULL"),
        "{}",
        stderr(&out)
    );

    // The slot in use by another capture.
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["capture", "--config", config, "--output", output])
        .env("TALLY_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let source = env.source().await;
    wait_for_active_slots(&source, 1).await;
    let out = run(
        &["capture", "--config", config, "--output", output],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another process"),
        "{}",
        stderr(&out)
    );
    first.kill().unwrap();
    first.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_level_replica_is_explained() {
    let cluster = tokio::task::spawn_blocking(|| {
        PgCluster::start_with(ClusterOptions {
            extra_settings: vec![("wal_level".into(), "replica".into())],
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let url = cluster.create_database("plainsource").unwrap();
    tally::db::connect(&url)
        .await
        .unwrap()
        .batch_execute(SCHEMA)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("views.sql"), VIEWS).unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!("views = \"views.sql\"\n[source]\nurl = \"{url}\"\n[target]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let out = run(
        &[
            "capture",
            "--config",
            config.to_str().unwrap(),
            "--output",
            "-",
        ],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("wal_level = replica")
            && text.contains("wal_level = logical")
            && text.contains("restart"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn source_restart_mid_stream_is_retried() {
    let mut env = TestEnv::new(SCHEMA, VIEWS).await;
    let output = env.dir.path().join("events.jsonl");
    let capture = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "capture",
            "--config",
            env.config_path().to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ])
        .env("TALLY_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_active_slots(&env.source().await, 1).await;
    env.source()
        .await
        .execute("INSERT INTO items VALUES (1, 1.00)", &[])
        .await
        .unwrap();
    env.cluster.restart().unwrap();
    env.source()
        .await
        .execute("INSERT INTO items VALUES (2, 2.00)", &[])
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        if text.contains("\"id\":2") && text.contains("\"id\":1") {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            unsafe { libc::kill(capture.id() as i32, libc::SIGTERM) };
            let out = capture.wait_with_output().unwrap();
            panic!(
                "capture did not resume after the restart: {text}\nstderr: {}",
                stderr(&out)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unsafe { libc::kill(capture.id() as i32, libc::SIGTERM) };
    let out = capture.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("reconnecting"),
        "says it retries: {}",
        stderr(&out)
    );
}
