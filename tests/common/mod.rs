//! Shared test harness: a private Postgres cluster with a source and a
//! target database, config and views files, Debezium event builders,
//! running `tally` processes, random writers and the `orders` fixture of the
//! pipeline tests.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
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

    /// Points the config at a NATS server: `tally capture` without
    /// `--output` publishes there and `tally apply` without `--input`
    /// consumes from there.
    pub fn use_nats(&self, url: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.config_path())
            .unwrap();
        // A killed applier's unacknowledged events go to another after
        // ack_wait: short, so tests converge quickly.
        write!(
            file,
            "[transport]\nkind = \"nats\"\nurl = \"{url}\"\nack_wait_seconds = 3\n"
        )
        .unwrap();
    }

    /// Runs `tally bootstrap` into `boot.jsonl` in the test's directory (the
    /// rows that exist now, as `r` events) and returns that file.
    pub fn bootstrap(&self) -> PathBuf {
        let boot = self.dir.path().join("boot.jsonl");
        let state = self.dir.path().join("boot.state");
        let status = tally_command(&[
            "bootstrap",
            "--config",
            self.config_path().to_str().unwrap(),
            "--output",
            boot.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ])
        .status()
        .unwrap();
        assert!(status.success(), "bootstrap: {status}");
        boot
    }

    /// Brings the rows that exist now into the target as a new installation
    /// would: [`bootstrap`](Self::bootstrap), then applied with `parallel`
    /// appliers in batches of `batch`. Returns the model.
    pub async fn bootstrap_and_apply(&self, parallel: usize, batch: usize) -> Arc<Model> {
        let boot = self.bootstrap();
        let model = self.model().await;
        let snapshot: Vec<String> = std::fs::read_to_string(&boot)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        self.apply(&model, &snapshot, parallel, batch).await;
        model
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

    /// Waits until every view equals its SELECT on the source, as a running
    /// pipeline catches up on its own; fails with the first differences
    /// after `limit`.
    pub async fn wait_until_converged(&self, model: &Model, limit: Duration) {
        let started = Instant::now();
        loop {
            let differences = self.verify(model).await;
            if differences.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "no convergence in {limit:?}; {} differences, the first: {:#?}",
                differences.len(),
                &differences[..differences.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Rows in `tally.dead_letters`.
    pub async fn dead_letters(&self) -> i64 {
        self.target()
            .await
            .query_one("SELECT count(*) FROM tally.dead_letters", &[])
            .await
            .unwrap()
            .get(0)
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

/// A `tally` process that is killed if it still runs when this is dropped,
/// so that a failing test does not leave its pipeline running behind it.
pub struct Spawned(pub Child);

impl Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `tally ARGS` (see [`tally_command`]).
pub fn spawn_tally(args: &[&str]) -> Spawned {
    Spawned(tally_command(args).spawn().unwrap())
}

/// Waits for `child` to exit; kills it and fails if that takes over `limit`.
pub fn wait_for(child: &mut Child, limit: Duration) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not finish in {limit:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What [`Writers`] do to one table, as single-statement transactions
/// chosen at random: insert a new row, change a row's measure and move it
/// to another group, move it in or out of the views' `WHERE`, delete it.
#[derive(Debug, Clone, Copy)]
pub struct RandomWrites {
    /// `$1`: the new row's id (bigint); `$2`: its group (integer).
    pub insert: &'static str,
    /// `$1`: the id (bigint).
    pub update: &'static str,
    /// `$1`: the id (bigint).
    pub toggle: &'static str,
    /// `$1`: the id (bigint).
    pub delete: &'static str,
    /// Updates and deletes pick ids in `1..existing_ids`.
    pub existing_ids: i64,
    /// Inserts pick groups in `0..groups`.
    pub groups: i32,
    /// Writer `seed` inserts ids from `first_new_id + seed * 1_000_000 + 1`,
    /// so writers never collide.
    pub first_new_id: i64,
}

/// Concurrent writers on the source, each with its own connection and seed.
pub struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Starts `count` writers (seeds `0..count`) doing `writes` until
    /// [`stop`](Self::stop).
    pub fn start(url: &str, writes: RandomWrites, count: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..count)
            .map(|seed| tokio::spawn(random_writer(url.to_string(), writes, seed, stop.clone())))
            .collect();
        Writers { stop, tasks }
    }

    /// Stops the writers and waits for them (a writer's failure fails the test).
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            task.await.unwrap();
        }
    }
}

impl Drop for Writers {
    /// A test that fails while writers run stops them, so that they do not
    /// report errors of their own while the cluster goes away.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn random_writer(url: String, writes: RandomWrites, seed: u64, stop: Arc<AtomicBool>) {
    let client = tally::db::connect(&url).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next_id = writes.first_new_id + seed as i64 * 1_000_000;
    while !stop.load(Ordering::Relaxed) {
        let id: i64 = rng.random_range(1..writes.existing_ids);
        let (sql, result) = match rng.random_range(0..4) {
            0 => {
                next_id += 1;
                let group = rng.random_range(0..writes.groups);
                let sql = writes.insert;
                (sql, client.execute(sql, &[&next_id, &group]).await)
            }
            1 => (writes.update, client.execute(writes.update, &[&id]).await),
            2 => (writes.toggle, client.execute(writes.toggle, &[&id]).await),
            _ => (writes.delete, client.execute(writes.delete, &[&id]).await),
        };
        if let Err(error) = result {
            if stop.load(Ordering::Relaxed) {
                return; // The test is over (failed); the cluster is going away.
            }
            let reason = error
                .as_db_error()
                .map_or_else(|| error.to_string(), ToString::to_string);
            panic!("writer {seed}: {sql}: {reason}");
        }
    }
}

/// The `orders` fixture of the pipeline tests (`tally run`, NATS): 2,000
/// orders of 50 customers, a view with SUM, COUNT and AVG under a WHERE.
pub const ORDERS_SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, customer integer NOT NULL, total numeric(12,2), cancelled boolean NOT NULL DEFAULT false);
INSERT INTO orders SELECT g, g % 50, g % 300, false FROM generate_series(1, 2000) g;";

pub const ORDERS_VIEWS: &str = "
CREATE MATERIALIZED VIEW customer_orders AS
SELECT customer, SUM(total) AS total, COUNT(*) AS orders, AVG(total) AS average
FROM orders WHERE NOT cancelled GROUP BY customer;";

pub const ORDERS_WRITES: RandomWrites = RandomWrites {
    insert: "INSERT INTO orders VALUES ($1, $2, 9.99)",
    update: "UPDATE orders SET total = total + 1, customer = (customer + 1) % 50 WHERE id = $1",
    toggle: "UPDATE orders SET cancelled = NOT cancelled WHERE id = $1",
    delete: "DELETE FROM orders WHERE id = $1",
    existing_ids: 2000,
    groups: 50,
    first_new_id: 10_000,
};

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
