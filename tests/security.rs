//! Security end to end: identifiers from the views file and the source's
//! catalog are always quoted, so hostile table, column and view names are
//! just names; and passwords in connection URLs (Postgres and NATS) never
//! reach stdout or stderr, whatever fails and at any log level.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A source table whose name closes the identifier and appends a statement,
/// columns with quotes, spaces and semicolons, and view and output names
/// that try the same on the target.
const HOSTILE_SCHEMA: &str = r#"
CREATE TABLE victim (x int);
INSERT INTO victim VALUES (1);
CREATE TABLE "a""; DROP TABLE victim; --" (
    id int PRIMARY KEY,
    "cust ""id""; --" int,
    "am'ount" numeric(10,2),
    "note); DROP TABLE victim; --" text
);
INSERT INTO "a""; DROP TABLE victim; --" VALUES
    (1, 7, 10.50, 'x'), (2, 7, 20.00, 'y'), (3, 8, 5.25, NULL);
"#;

const HOSTILE_VIEWS: &str = r#"
CREATE MATERIALIZED VIEW "v""; DROP TABLE victim; --" AS
SELECT "cust ""id""; --" AS "k'); DROP TABLE victim; --",
       SUM("am'ount") AS "to""tal",
       COUNT("note); DROP TABLE victim; --") AS "n; DROP TABLE victim",
       COUNT(*) AS rows
FROM "a""; DROP TABLE victim; --"
WHERE "am'ount" > 0
GROUP BY "cust ""id""; --";
"#;

const TABLE: &str = r#""a""; DROP TABLE victim; --""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identifiers_are_only_names_end_to_end() {
    let env = TestEnv::new(HOSTILE_SCHEMA, HOSTILE_VIEWS).await;
    env.target()
        .await
        .batch_execute("CREATE TABLE victim (x int); INSERT INTO victim VALUES (1);")
        .await
        .unwrap();
    let config = env.config_path();
    let config = config.to_str().unwrap();

    // Bootstrap (snapshot reads of the table), apply (ledger and view
    // tables), then capture and apply of live changes through pgoutput.
    let boot = env.bootstrap();
    let model = env.model().await;
    let snapshot: Vec<String> = std::fs::read_to_string(&boot)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(snapshot.len(), 3, "{snapshot:#?}");
    env.apply(&model, &snapshot, 1, 100).await;
    assert!(env.verify(&model).await.is_empty());

    let mut process = spawn_tally(&["run", "--config", config]);
    let source = env.source().await;
    source
        .batch_execute(&format!(
            "INSERT INTO {TABLE} VALUES (4, 9, 1.00, 'it''s; DROP TABLE victim; --');
             UPDATE {TABLE} SET \"am'ount\" = 40.00 WHERE id = 2;
             UPDATE {TABLE} SET \"cust \"\"id\"\"; --\" = 9 WHERE id = 3;
             DELETE FROM {TABLE} WHERE id = 1;"
        ))
        .await
        .unwrap();
    env.wait_until_converged(&model, Duration::from_secs(60))
        .await;
    assert!(terminate(&mut process).success());

    let view = env
        .value(r#"SELECT "to""tal"::text FROM "v""; DROP TABLE victim; --" WHERE "k'); DROP TABLE victim; --" = 7"#)
        .await;
    assert_eq!(view.as_deref(), Some("40.00"));
    let nines = env
        .value(r#"SELECT "n; DROP TABLE victim"::text FROM "v""; DROP TABLE victim; --" WHERE "k'); DROP TABLE victim; --" = 9"#)
        .await;
    assert_eq!(nines.as_deref(), Some("1"), "the NULL note is not counted");
    // Nothing was injected: both victims are still there, whole.
    for client in [env.source().await, env.target().await] {
        let count: i64 = client
            .query_one("SELECT count(*) FROM victim", &[])
            .await
            .expect("victim table still exists")
            .get(0);
        assert_eq!(count, 1);
    }
    assert_eq!(env.dead_letters().await, 0);
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `tally ARGS` with debug logs, stops it after `limit` if it still
/// runs (commands that wait for a server to come back), and returns its
/// stdout and stderr.
fn output_of(args: &[&str], limit: Duration) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_LOG", "debug")
        .env_remove("TALLY_SOURCE_URL")
        .env_remove("TALLY_TARGET_URL")
        .env_remove("TALLY_TRANSPORT_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(1500));
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait().unwrap();
    (out.join().unwrap(), err.join().unwrap())
}

/// Writes a config and a views file into `dir` and returns the config path.
fn write_config(dir: &std::path::Path, source: &str, target: &str, transport: &str) -> String {
    std::fs::write(
        dir.join("views.sql"),
        "CREATE MATERIALIZED VIEW totals AS SELECT customer_id, SUM(total) AS total FROM invoices GROUP BY customer_id;",
    )
    .unwrap();
    let path = dir.join("tally.toml");
    std::fs::write(
        &path,
        format!(
            "views = \"views.sql\"\n[source]\nurl = \"{source}\"\n[target]\nurl = \"{target}\"\n{transport}"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Every command that connects, run against `config`: the password must be
/// in neither stream, and each run must have said something about the
/// connection (so the test cannot pass by printing nothing).
fn assert_no_password(config: &str, password: &str, dir: &std::path::Path, mentions: &str) {
    let input = dir.join("events.jsonl");
    std::fs::write(
        &input,
        create(
            "invoices",
            serde_json::json!({"id": 1, "customer_id": 7, "total": "1.00"}),
            10,
        ) + "\n",
    )
    .unwrap();
    let state = dir.join("boot.state");
    let commands: Vec<Vec<&str>> = vec![
        vec![
            "apply",
            "--config",
            config,
            "--input",
            input.to_str().unwrap(),
        ],
        vec!["apply", "--config", config],
        vec!["run", "--config", config],
        vec!["capture", "--config", config, "--output", "-"],
        vec!["capture", "--config", config],
        vec![
            "bootstrap",
            "--config",
            config,
            "--output",
            "-",
            "--state",
            state.to_str().unwrap(),
        ],
        vec!["verify", "--config", config],
    ];
    for args in commands {
        let (stdout, stderr) = output_of(&args, Duration::from_secs(4));
        for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            assert!(
                !text.contains(password),
                "`tally {}` leaked the password on {stream}:\n{text}",
                args.join(" ")
            );
        }
        assert!(
            stderr.contains(mentions),
            "`tally {}` said nothing about {mentions}:\nstdout: {stdout}\nstderr: {stderr}",
            args.join(" ")
        );
    }
}

#[test]
fn passwords_never_appear_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = dead_port();
    let password = "Pg-S3cret-Pw";
    let url = format!("postgres://tally:{password}@127.0.0.1:{port}/source");
    let config = write_config(dir.path(), &url, &url.replace("source", "target"), "");
    assert_no_password(&config, password, dir.path(), &port.to_string());
}

#[test]
fn nats_passwords_never_appear_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let pg = dead_port();
    let nats = dead_port();
    let password = "Nats-S3cret-Pw";
    let pg_password = "Pg-0ther-Pw";
    let source = format!("postgres://tally:{pg_password}@127.0.0.1:{pg}/source");
    let transport = format!(
        "[transport]\nkind = \"nats\"\nurl = \"nats://natsuser:{password}@127.0.0.1:{nats}\"\n"
    );
    let config = write_config(
        dir.path(),
        &source,
        &source.replace("source", "target"),
        &transport,
    );
    assert_no_password(&config, password, dir.path(), "127.0.0.1");
    assert_no_password(&config, pg_password, dir.path(), "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_when_the_password_is_wrong() {
    let env = TestEnv::new(
        "CREATE TABLE invoices (id int PRIMARY KEY, customer_id int, total numeric);",
        "",
    )
    .await;
    // A role that must log in with a password (scram), ahead of the
    // cluster's trust rules.
    let hba = env.cluster.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all guarded 127.0.0.1/32 scram-sha-256\nhost replication guarded 127.0.0.1/32 scram-sha-256\n{rules}"
        ),
    )
    .unwrap();
    let admin = env.source().await;
    admin
        .batch_execute(
            "CREATE ROLE guarded LOGIN REPLICATION SUPERUSER PASSWORD 'the-right-one';
             SELECT pg_reload_conf();",
        )
        .await
        .unwrap();
    let port = env.cluster.port();
    let password = "Wr0ng-Pg-Pw";
    let source = format!("postgres://guarded:{password}@127.0.0.1:{port}/source");
    let target = format!("postgres://guarded:{password}@127.0.0.1:{port}/target");
    let config = write_config(env.dir.path(), &source, &target, "");
    // The right password works, so the failure below is the wrong one's.
    tally::db::connect(&source.replace(password, "the-right-one"))
        .await
        .expect("the right password logs in");
    let dir = env.dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        assert_no_password(&config, password, &dir, "password authentication failed")
    })
    .await
    .unwrap();
}
