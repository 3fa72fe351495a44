//! Shared test harness: a private Postgres cluster with a source and a
//! target database, config and views files, and Debezium event builders.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use tally::apply::runner::apply_lines;
use tally::apply::{ApplyStats, Model};
use tally::config::Config;
use tally::ops::verify::{Difference, verify_views};
use tally::pgcluster::PgCluster;
use tokio_postgres::Client;

/// One test's world: a real Postgres with `source` and `target` databases.
pub struct TestEnv {
    pub cluster: PgCluster,
    pub source_url: String,
    pub target_url: String,
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// Starts a cluster, creates the source schema and writes the views and
    /// config files.
    pub async fn new(source_schema: &str, views_sql: &str) -> TestEnv {
        let cluster = tokio::task::spawn_blocking(PgCluster::start)
            .await
            .unwrap()
            .expect("start a private Postgres");
        let source_url = cluster.create_database("source").expect("create source db");
        let target_url = cluster.create_database("target").expect("create target db");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("views.sql"), views_sql).unwrap();
        std::fs::write(
            dir.path().join("tally.toml"),
            format!(
                "views = \"views.sql\"\n[source]\nurl = \"{source_url}\"\n[target]\nurl = \"{target_url}\"\n"
            ),
        )
        .unwrap();
        let env = TestEnv {
            cluster,
            source_url,
            target_url,
            dir,
        };
        env.source()
            .await
            .batch_execute(source_schema)
            .await
            .expect("source schema");
        env
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tally.toml")
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path()).unwrap()
    }

    pub async fn source(&self) -> Client {
        tally::db::connect(&self.source_url).await.unwrap()
    }

    pub async fn target(&self) -> Client {
        tally::db::connect(&self.target_url).await.unwrap()
    }

    /// Loads the views, reads the source's shapes, prepares the target.
    pub async fn model(&self) -> Arc<Model> {
        let views = tally::views::load_views(&self.config().views).expect("views load");
        let model = Model::load(&self.source().await, views)
            .await
            .expect("model");
        model
            .ensure_target_schema(&mut self.target().await)
            .await
            .expect("target schema");
        Arc::new(model)
    }

    pub async fn apply(
        &self,
        model: &Arc<Model>,
        lines: &[String],
        parallel: usize,
        batch: usize,
    ) -> ApplyStats {
        let text = lines.join("\n") + "\n";
        apply_lines(
            text.as_bytes(),
            &self.target_url,
            model.clone(),
            parallel,
            batch,
        )
        .await
        .expect("apply")
    }

    pub async fn verify(&self, model: &Model) -> Vec<Difference> {
        verify_views(&self.source().await, &self.target().await, model)
            .await
            .expect("verify runs")
    }

    /// One value of a view, read with plain SQL as a user would.
    pub async fn value(&self, sql: &str) -> Option<String> {
        let rows = self.target().await.query(sql, &[]).await.expect(sql);
        rows.first().and_then(|r| r.get::<_, Option<String>>(0))
    }
}

/// Builds Debezium envelopes with Tally's `commit_lsn`.
pub fn envelope(
    op: &str,
    table: &str,
    before: Value,
    after: Value,
    commit_lsn: u64,
    lsn: u64,
) -> String {
    json!({
        "before": before,
        "after": after,
        "source": {"schema": "public", "table": table, "lsn": lsn, "commit_lsn": commit_lsn, "txId": commit_lsn, "ts_ms": 1_700_000_000_000u64},
        "op": op,
        "ts_ms": 1_700_000_000_000u64
    })
    .to_string()
}

pub fn create(table: &str, after: Value, lsn: u64) -> String {
    envelope("c", table, Value::Null, after, lsn, lsn)
}

pub fn update(table: &str, after: Value, lsn: u64) -> String {
    envelope("u", table, Value::Null, after, lsn, lsn)
}

pub fn delete(table: &str, before: Value, lsn: u64) -> String {
    envelope("d", table, before, Value::Null, lsn, lsn)
}

pub fn truncate(table: &str, lsn: u64) -> String {
    envelope("t", table, Value::Null, Value::Null, lsn, lsn)
}

/// Shuffles `events` and adds duplicates of a `duplicate_share` of them,
/// deterministically from `seed`.
pub fn shuffle_with_duplicates(events: &[String], duplicate_share: f64, seed: u64) -> Vec<String> {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<String> = events.to_vec();
    for event in events {
        if rng.random_bool(duplicate_share) {
            out.push(event.clone());
        }
    }
    out.shuffle(&mut rng);
    out
}

/// The `tally` binary with quiet logs, stdout discarded, stderr shown.
pub fn tally_command(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(args)
        .env("TALLY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    command
}

/// Stops a long-running `tally` process the way an operator does.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap()
}

/// Waits until `active` replication connections use slots on the source.
pub async fn wait_for_active_slots(source: &Client, active: i64) {
    let started = std::time::Instant::now();
    loop {
        let now: i64 = source
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE active",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if now >= active {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "no active slot after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Waits until the `tally` slot is confirmed up to the source's current
/// end of WAL: everything written so far has been captured.
pub async fn wait_until_captured(source: &Client) {
    let end: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let started = std::time::Instant::now();
    loop {
        let caught_up: bool = source
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'tally'",
                &[&end],
            )
            .await
            .unwrap()
            .get(0);
        if caught_up {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "capture did not catch up in 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl TestEnv {
    /// Like [`TestEnv::new`], but the target database lives in a cluster of
    /// its own, returned alongside, so a test can stop and restart the
    /// target (connections refused meanwhile) while the source keeps
    /// running. `env.cluster` is the source's cluster; `env.target_url`
    /// points at the returned one, whose port survives `restart()`.
    pub async fn with_separate_target(
        source_schema: &str,
        views_sql: &str,
    ) -> (TestEnv, PgCluster) {
        let start = || async {
            tokio::task::spawn_blocking(PgCluster::start)
                .await
                .unwrap()
                .expect("start a private Postgres")
        };
        let cluster = start().await;
        let target_cluster = start().await;
        let source_url = cluster.create_database("source").expect("create source db");
        let target_url = target_cluster
            .create_database("target")
            .expect("create target db");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("views.sql"), views_sql).unwrap();
        std::fs::write(
            dir.path().join("tally.toml"),
            format!(
                "views = \"views.sql\"\n[source]\nurl = \"{source_url}\"\n[target]\nurl = \"{target_url}\"\n"
            ),
        )
        .unwrap();
        let env = TestEnv {
            cluster,
            source_url,
            target_url,
            dir,
        };
        env.source()
            .await
            .batch_execute(source_schema)
            .await
            .expect("source schema");
        (env, target_cluster)
    }
}

/// The shape of a random write load on one table with an integer group
/// column: an insert of a new row, or one of three statements on an
/// existing row, each with probability 1/4.
pub struct RandomWrites {
    /// `INSERT` with `$1` the new row's id (bigint), `$2` its group (int).
    pub insert: &'static str,
    /// Three statements on the row with id `$1` (bigint): updates and a
    /// delete.
    pub others: [&'static str; 3],
    /// Existing rows have ids in `1..rows`.
    pub rows: i64,
    /// Groups are `0..groups`.
    pub groups: i32,
    /// New rows get ids from `first_new_id + seed * 1_000_000` up, so
    /// writers with different seeds never collide.
    pub first_new_id: i64,
}

/// Writes `load` on one connection until `stop`; returns the number of
/// transactions (each statement autocommits). The same `seed` gives the
/// same sequence of statements.
pub async fn random_writer(
    url: String,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    load: &'static RandomWrites,
) -> u64 {
    use rand::{Rng, SeedableRng};
    let client = tally::db::connect(&url).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next_id = load.first_new_id + seed as i64 * 1_000_000;
    let mut transactions = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let id: i64 = rng.random_range(1..load.rows);
        // i32, as the writers this replaced drew it: same seed, same load.
        match rng.random_range(0..4i32) {
            0 => {
                next_id += 1;
                let group = rng.random_range(0..load.groups);
                client
                    .execute(load.insert, &[&next_id, &group])
                    .await
                    .unwrap();
            }
            other => {
                client
                    .execute(load.others[other as usize - 1], &[&id])
                    .await
                    .unwrap();
            }
        }
        transactions += 1;
    }
    transactions
}

/// Samples a process's resident set size (`VmRSS`) every `every` on a
/// thread of its own, until [`RssSampler::finish`]. Unlike `VmHWM` it can
/// say *when* memory peaked (the test prints the peak per phase).
pub struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(std::time::Duration, u64)>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: std::time::Duration) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = vm_rss_kib(pid) {
                    samples.push((started.elapsed(), kib));
                }
                std::thread::sleep(every);
            }
            samples
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling; returns `(time since start, VmRSS in KiB)` samples.
    pub fn finish(self) -> Vec<(std::time::Duration, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `VmRSS` of a live process in KiB; `None` once it is gone.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
