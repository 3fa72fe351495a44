//! Tally against the alternatives a team would otherwise pick, on the same
//! PostgreSQL in the same run:
//!
//! * **read side**: reading a view row against computing the aggregate with
//!   `SELECT SUM(…)` over the source table (per customer and global, with
//!   and without an index on the group column);
//! * **source overhead**: source transactions per second with no
//!   aggregation, with the aggregate kept by a PL/pgSQL trigger in the same
//!   transaction, and with Tally capturing and applying (`tally run`), with
//!   the CPU time each part used per transaction; in two layouts (`split`:
//!   the source and its writers on half the CPUs, Tally and its target on
//!   the other half, as on two machines; `shared`: all on all CPUs) and two
//!   shapes of aggregate (per customer; per customer and a global total);
//! * **bootstrap**: rows per second of `tally bootstrap` (and of the apply
//!   of its output, which builds the views);
//! * **memory**: peak RSS of `tally run` while it streams a run of changes.
//!
//! ```sh
//! cargo bench --bench alternatives                         # 10,000,000 rows, 1,000,000-change memory run
//! TALLY_BENCH_ROWS=1000000 TALLY_BENCH_CHANGES=100000 cargo bench --bench alternatives
//! ```
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `TALLY_BENCH_ROWS` | 10,000,000 | `invoices` rows for the read side and bootstrap |
//! | `TALLY_BENCH_CUSTOMERS` | 1,000 | groups of the per-customer view |
//! | `TALLY_BENCH_CHANGES` | 1,000,000 | changes streamed through `tally run` in the memory run |
//! | `TALLY_BENCH_OVERHEAD_SECONDS` | 15 | length of each source-overhead run |
//! | `TALLY_BENCH_OVERHEAD_WRITERS` | 8 | closed-loop writer connections in the source-overhead runs |
//! | `TALLY_BENCH_OVERHEAD_ROUNDS` | 2 | rounds of the three source-overhead runs, in rotated order, so that none profits from its place; the report gives the mean |
//! | `TALLY_BENCH_JSON` | unset | also write the results as JSON to this file (the plots read it) |
//!
//! The Markdown report goes to stdout, progress to stderr. Every Tally run
//! ends with its views checked against their `SELECT` on the source.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::json;
use tally::apply::Model;
use tally::ops::verify::verify_views;
use tally::pgcluster::{ClusterOptions, PgCluster};
use tokio_postgres::Client;

const INVOICES: &str = "
CREATE TABLE invoices (
    id          bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    total       numeric(12,2) NOT NULL
)";

const INVOICE_VIEWS: &str = "
CREATE MATERIALIZED VIEW invoice_total AS
SELECT SUM(total) AS total, COUNT(*) AS invoices FROM invoices;

CREATE MATERIALIZED VIEW customer_totals AS
SELECT customer_id, SUM(total) AS total, COUNT(*) AS invoices
FROM invoices GROUP BY customer_id;";

/// The source-overhead table: one row per account, updated by the writers.
const ACCOUNTS: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, customer_id integer NOT NULL, balance numeric(14,2) NOT NULL);
INSERT INTO accounts SELECT g, g % 100, 0 FROM generate_series(1, 10000) g;";

const ACCOUNT_VIEWS: &str = "
CREATE MATERIALIZED VIEW customer_balance AS
SELECT customer_id, SUM(balance) AS balance, COUNT(*) AS accounts
FROM accounts GROUP BY customer_id;";

/// The synchronous alternative: the same aggregate, kept in the writing
/// transaction by a row trigger (the classic approach Tally replaces).
const TRIGGER: &str = "
CREATE TABLE customer_balance_sync (customer_id integer PRIMARY KEY, balance numeric(14,2) NOT NULL, accounts bigint NOT NULL);
INSERT INTO customer_balance_sync SELECT customer_id, SUM(balance), COUNT(*) FROM accounts GROUP BY customer_id;
CREATE FUNCTION keep_customer_balance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE customer_balance_sync SET balance = balance - OLD.balance, accounts = accounts - 1
        WHERE customer_id = OLD.customer_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO customer_balance_sync VALUES (NEW.customer_id, NEW.balance, 1)
        ON CONFLICT (customer_id) DO UPDATE
        SET balance = customer_balance_sync.balance + EXCLUDED.balance,
            accounts = customer_balance_sync.accounts + 1;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER keep_customer_balance AFTER INSERT OR UPDATE OR DELETE ON accounts
FOR EACH ROW EXECUTE FUNCTION keep_customer_balance();";

/// The global total as well (the demo's second view): one row that every
/// writing transaction updates.
const GLOBAL_VIEW: &str = "
CREATE MATERIALIZED VIEW account_total AS
SELECT SUM(balance) AS balance, COUNT(*) AS accounts FROM accounts;";

/// The trigger that keeps the global total, for the same shape.
const GLOBAL_TRIGGER: &str = "
CREATE TABLE account_total_sync (balance numeric(14,2) NOT NULL, accounts bigint NOT NULL);
INSERT INTO account_total_sync SELECT SUM(balance), COUNT(*) FROM accounts;
CREATE FUNCTION keep_account_total() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE account_total_sync SET
        balance = balance
            + CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN NEW.balance ELSE 0 END
            - CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN OLD.balance ELSE 0 END,
        accounts = accounts
            + CASE TG_OP WHEN 'INSERT' THEN 1 WHEN 'DELETE' THEN -1 ELSE 0 END;
    RETURN NULL;
END $$;
CREATE TRIGGER keep_account_total AFTER INSERT OR UPDATE OR DELETE ON accounts
FOR EACH ROW EXECUTE FUNCTION keep_account_total();";

/// Which aggregates the source-overhead runs keep.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The balance per customer: 100 groups, writers rarely meet.
    PerCustomer,
    /// That and the global total, as in the demo: every writer changes
    /// the one total row.
    WithGlobal,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::PerCustomer => "per customer",
            Shape::WithGlobal => "per customer + global total",
        }
    }

    fn views(self) -> String {
        match self {
            Shape::PerCustomer => ACCOUNT_VIEWS.to_string(),
            Shape::WithGlobal => format!("{ACCOUNT_VIEWS}\n{GLOBAL_VIEW}"),
        }
    }

    fn triggers(self) -> String {
        match self {
            Shape::PerCustomer => TRIGGER.to_string(),
            Shape::WithGlobal => format!("{TRIGGER}\n{GLOBAL_TRIGGER}"),
        }
    }
}

const WRITE: &str = "UPDATE accounts SET balance = balance + 1 WHERE id = $1";

struct Settings {
    rows: i64,
    customers: i64,
    changes: i64,
    overhead_seconds: f64,
    overhead_writers: usize,
    overhead_rounds: usize,
    json: Option<String>,
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(text) => text
            .replace('_', "")
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}: {text:?} is not a number")),
    }
}

impl Settings {
    fn load() -> Result<Settings> {
        let settings = Settings {
            rows: env_number("TALLY_BENCH_ROWS", 10_000_000)?,
            customers: env_number("TALLY_BENCH_CUSTOMERS", 1_000)?,
            changes: env_number("TALLY_BENCH_CHANGES", 1_000_000)?,
            overhead_seconds: env_number("TALLY_BENCH_OVERHEAD_SECONDS", 15.0)?,
            overhead_writers: env_number("TALLY_BENCH_OVERHEAD_WRITERS", 8)?,
            overhead_rounds: env_number("TALLY_BENCH_OVERHEAD_ROUNDS", 2)?,
            json: std::env::var("TALLY_BENCH_JSON").ok(),
        };
        ensure!(settings.rows > 0, "TALLY_BENCH_ROWS must be > 0");
        ensure!(settings.customers > 0, "TALLY_BENCH_CUSTOMERS must be > 0");
        ensure!(settings.changes > 0, "TALLY_BENCH_CHANGES must be > 0");
        ensure!(
            settings.overhead_writers > 0,
            "TALLY_BENCH_OVERHEAD_WRITERS must be > 0"
        );
        Ok(settings)
    }
}

/// A private cluster whose processes run on `cpus` (any when empty).
fn start_cluster(cpus: Vec<usize>) -> Result<PgCluster> {
    Ok(PgCluster::start_with(ClusterOptions {
        fsync: true,
        extra_settings: vec![
            ("max_connections".into(), "100".into()),
            ("shared_buffers".into(), "512MB".into()),
            ("max_wal_size".into(), "4GB".into()),
        ],
        cpus,
        ..ClusterOptions::default()
    })?)
}

fn tally(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(args)
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

fn run_tally(args: &[&str]) -> Result<()> {
    let status = tokio::task::block_in_place(|| tally(args).status())?;
    ensure!(status.success(), "tally {}: {status}", args.join(" "));
    Ok(())
}

fn terminate(child: &mut Child) -> Result<()> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| child.wait())?;
    ensure!(status.success(), "tally exited {status} on SIGTERM");
    Ok(())
}

fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .map(|kib| kib / 1024.0)
}

/// A fresh pair of databases with a config and views file for Tally.
struct Pair {
    source_url: String,
    target_url: String,
    dir: tempfile::TempDir,
}

impl Pair {
    async fn new(
        source: &PgCluster,
        target: &PgCluster,
        name: &str,
        schema: &str,
        views: &str,
    ) -> Result<Pair> {
        let source_url = source.create_database(&format!("{name}_source"))?;
        let target_url = target.create_database(&format!("{name}_target"))?;
        tally::db::connect(&source_url)
            .await?
            .batch_execute(schema)
            .await?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("views.sql"), views)?;
        std::fs::write(
            dir.path().join("tally.toml"),
            format!(
                "views = \"views.sql\"\n[source]\nurl = \"{source_url}\"\n[target]\nurl = \"{target_url}\"\n[capture]\nslot = \"{name}\"\n"
            ),
        )?;
        Ok(Pair {
            source_url,
            target_url,
            dir,
        })
    }

    fn config(&self) -> String {
        self.dir.path().join("tally.toml").display().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    async fn model(&self, source: &Client) -> Result<Model> {
        let views = tally::views::load_views(Path::new(&self.path("views.sql")))?;
        Ok(Model::load(source, views).await?)
    }

    /// The views equal their SELECT on the source.
    async fn check(&self) -> Result<()> {
        let source = tally::db::connect(&self.source_url).await?;
        let target = tally::db::connect(&self.target_url).await?;
        let model = self.model(&source).await?;
        let differences = verify_views(&source, &target, &model).await?;
        ensure!(
            differences.is_empty(),
            "views differ from their SELECT: {:?}",
            &differences[..differences.len().min(3)]
        );
        Ok(())
    }

    async fn drop_slot(&self, slot: &str) -> Result<()> {
        let source = tally::db::connect(&self.source_url).await?;
        wait_until(Duration::from_secs(30), || async {
            Ok(source
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&slot],
                )
                .await?
                .is_none())
        })
        .await?;
        source
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        Ok(())
    }
}

async fn wait_until<F, Fut>(limit: Duration, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    while !done().await? {
        if started.elapsed() > limit {
            bail!("not done after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

// ------------------------------------------------------------ read side

#[derive(Clone, Copy, Default)]
struct Timing {
    /// Median and mean of the timed executions, milliseconds.
    p50: f64,
    mean: f64,
    runs: usize,
}

/// Times `runs` executions of `sql` with a parameter from `param(i)`.
async fn time_query(
    client: &Client,
    sql: &str,
    runs: usize,
    param: impl Fn(usize) -> Option<i32>,
) -> Result<Timing> {
    let statement = client.prepare(sql).await?;
    // One untimed execution warms the cache and the plan.
    run_query(client, &statement, param(0)).await?;
    let mut ms = Vec::with_capacity(runs);
    for i in 0..runs {
        let began = Instant::now();
        run_query(client, &statement, param(i + 1)).await?;
        ms.push(began.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timing {
        p50: ms[ms.len() / 2],
        mean: ms.iter().sum::<f64>() / ms.len() as f64,
        runs,
    })
}

async fn run_query(
    client: &Client,
    statement: &tokio_postgres::Statement,
    param: Option<i32>,
) -> Result<()> {
    match param {
        Some(p) => client.query(statement, &[&p]).await?,
        None => client.query(statement, &[]).await?,
    };
    Ok(())
}

struct ReadSide {
    rows: i64,
    /// (what, timing) in report order; the first two are the view row
    /// reads (per customer, global) that the others compare against.
    timings: Vec<(&'static str, Timing)>,
}

struct Bootstrap {
    rows: i64,
    seconds: f64,
    apply_seconds: f64,
}

/// Loads `rows` invoices, bootstraps them through Tally (timed), applies the
/// bootstrap (timed; it builds the views), then times the reads.
async fn read_side_and_bootstrap(
    cluster: &PgCluster,
    settings: &Settings,
) -> Result<(ReadSide, Bootstrap)> {
    let pair = Pair::new(cluster, cluster, "reads", INVOICES, INVOICE_VIEWS).await?;
    let source = tally::db::connect(&pair.source_url).await?;
    eprintln!("read side: loading {} invoices…", settings.rows);
    let began = Instant::now();
    source
        .execute(
            "INSERT INTO invoices
             SELECT g, (g * 7919 % $2::bigint)::int, ((g * 31) % 100000) / 100.0
             FROM generate_series(1, $1::bigint) g",
            &[&settings.rows, &settings.customers],
        )
        .await?;
    source.batch_execute("VACUUM ANALYZE invoices").await?;
    eprintln!("  loaded in {:.1} s", began.elapsed().as_secs_f64());

    eprintln!("bootstrap: {} rows…", settings.rows);
    let boot = pair.path("boot.jsonl");
    let state = pair.path("boot.state");
    let config = pair.config();
    let began = Instant::now();
    run_tally(&[
        "bootstrap",
        "--config",
        &config,
        "--output",
        &boot,
        "--state",
        &state,
    ])?;
    let bootstrap_seconds = began.elapsed().as_secs_f64();
    eprintln!(
        "  {:.1} s, {:.0} rows/s; applying…",
        bootstrap_seconds,
        settings.rows as f64 / bootstrap_seconds
    );
    let began = Instant::now();
    run_tally(&[
        "apply",
        "--config",
        &config,
        "--input",
        &boot,
        "--parallel",
        "2",
    ])?;
    let apply_seconds = began.elapsed().as_secs_f64();
    std::fs::remove_file(&boot)?;
    pair.check().await?;
    pair.drop_slot("reads").await?;
    eprintln!("  applied in {apply_seconds:.1} s; views verified");

    let target = tally::db::connect(&pair.target_url).await?;
    let customers = settings.customers as usize;
    let customer = move |i: usize| Some((i * 7 % customers) as i32);
    let scans = 5;
    let lookups = 1_000;
    let mut timings = Vec::new();
    eprintln!("read side: timing queries…");
    timings.push((
        "view row, one customer (`customer_totals`)",
        time_query(
            &target,
            "SELECT total FROM customer_totals WHERE customer_id = $1",
            lookups,
            customer,
        )
        .await?,
    ));
    timings.push((
        "view row, global (`invoice_total`)",
        time_query(&target, "SELECT total FROM invoice_total", lookups, |_| {
            None
        })
        .await?,
    ));
    timings.push((
        "`SUM` for one customer, no index",
        time_query(
            &source,
            "SELECT SUM(total) FROM invoices WHERE customer_id = $1",
            scans,
            customer,
        )
        .await?,
    ));
    timings.push((
        "`SUM` over all rows",
        time_query(&source, "SELECT SUM(total) FROM invoices", scans, |_| None).await?,
    ));
    eprintln!("read side: indexing customer_id…");
    source
        .batch_execute("CREATE INDEX invoices_customer ON invoices (customer_id, total)")
        .await?;
    source.batch_execute("VACUUM ANALYZE invoices").await?;
    timings.push((
        "`SUM` for one customer, index on (customer_id, total)",
        time_query(
            &source,
            "SELECT SUM(total) FROM invoices WHERE customer_id = $1",
            50,
            customer,
        )
        .await?,
    ));
    source.batch_execute("DROP TABLE invoices").await?;
    Ok((
        ReadSide {
            rows: settings.rows,
            timings,
        },
        Bootstrap {
            rows: settings.rows,
            seconds: bootstrap_seconds,
            apply_seconds,
        },
    ))
}

// ------------------------------------------------------- source overhead

#[derive(Clone, Copy, PartialEq, Eq)]
enum Aggregation {
    None,
    Trigger,
    Tally,
}

impl Aggregation {
    fn name(self) -> &'static str {
        match self {
            Aggregation::None => "no aggregation",
            Aggregation::Trigger => "PL/pgSQL trigger (synchronous)",
            Aggregation::Tally => "Tally capturing and applying (`tally run`)",
        }
    }
}

/// Where a source-overhead run puts its processes.
#[derive(Clone)]
struct Layout {
    name: &'static str,
    /// CPUs of the source cluster and its writers (empty: any).
    source_cpus: Vec<usize>,
    /// CPUs of `tally run` and the target cluster (empty: any).
    tally_cpus: Vec<usize>,
}

impl Layout {
    /// `split`: the source side on the first half of this process's CPUs,
    /// Tally and its target on the other half, as on two machines (what
    /// the source pays for capture is then its walsender alone); `shared`:
    /// everything on every CPU, as on one box. `split` needs two CPUs.
    fn all() -> Result<Vec<Layout>> {
        let cpus = tally::cpu::allowed_cpus()?;
        let mut layouts = Vec::new();
        if cpus.len() >= 2 {
            let (source, tally) = cpus.split_at(cpus.len() / 2);
            layouts.push(Layout {
                name: "split",
                source_cpus: source.to_vec(),
                tally_cpus: tally.to_vec(),
            });
        } else {
            eprintln!("source overhead: one CPU only, so no split layout");
        }
        layouts.push(Layout {
            name: "shared",
            source_cpus: Vec::new(),
            tally_cpus: Vec::new(),
        });
        Ok(layouts)
    }

    fn describe(cpus: &[usize]) -> String {
        if cpus.is_empty() {
            "any".into()
        } else {
            tally::cpu::describe(cpus)
        }
    }
}

/// What one source-overhead run measured.
#[derive(Clone, Copy, Default)]
struct OverheadRun {
    tx_per_s: f64,
    /// CPU time of the source cluster per committed transaction, during
    /// the write window (backends, walsender, WAL writer, checkpointer).
    source_cpu_us_per_tx: f64,
    /// The walsender's part of it: what capture costs the source.
    walsender_cpu_us_per_tx: f64,
    /// CPU time of `tally run`, and of the target cluster, per transaction,
    /// from the start of the load until Tally had caught up.
    tally_run_cpu_us_per_tx: f64,
    target_cpu_us_per_tx: f64,
}

/// The write window of one run.
struct Window {
    transactions: u64,
    seconds: f64,
    /// CPU seconds the source cluster, and its walsenders, used in it.
    source_cpu: f64,
    walsender_cpu: f64,
}

/// Closed-loop writers for `seconds`, on one thread pinned to `cpus` (any
/// when empty), and what the source used meanwhile.
fn write_load(
    url: &str,
    writers: usize,
    seconds: f64,
    cpus: &[usize],
    source: &PgCluster,
) -> Result<Window> {
    let url = url.to_string();
    let cpus = cpus.to_vec();
    let cpu = || -> Result<(f64, f64)> {
        Ok((
            source.cpu_seconds().context("CPU time of the source")?,
            source
                .cpu_seconds_of("walsender")
                .context("CPU time of the walsender")?,
        ))
    };
    let before = cpu()?;
    let (count, elapsed) = std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if !cpus.is_empty() {
                    tally::cpu::pin_current_thread(&cpus)?;
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(closed_loop(&url, writers, seconds))
            })
            .join()
            .map_err(|_| anyhow!("the writer thread panicked"))?
    })?;
    let after = cpu()?;
    Ok(Window {
        transactions: count,
        seconds: elapsed,
        source_cpu: after.0 - before.0,
        walsender_cpu: after.1 - before.1,
    })
}

async fn closed_loop(url: &str, writers: usize, seconds: f64) -> Result<(u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..writers {
        let client = tally::db::connect(url).await?;
        let statement = client.prepare(WRITE).await?;
        clients.push((client, statement));
    }
    let mut tasks = Vec::new();
    for (w, (client, statement)) in clients.into_iter().enumerate() {
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = w as i64 * 1_237 % 10_000;
            while !stop.load(Ordering::Relaxed) {
                id = id * 48_271 % 10_007 % 10_000 + 1;
                client.execute(&statement, &[&id]).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let count = done.load(Ordering::Relaxed);
    let elapsed = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok((count, elapsed))
}

struct Overhead {
    writers: usize,
    seconds: f64,
    scenarios: Vec<Scenario>,
}

/// The three aggregations' runs for one layout and shape.
struct Scenario {
    layout: Layout,
    shape: Shape,
    /// (aggregation, the mean over rounds, each round)
    runs: Vec<(Aggregation, OverheadRun, Vec<OverheadRun>)>,
}

fn mean(runs: &[OverheadRun]) -> OverheadRun {
    let n = runs.len().max(1) as f64;
    let sum = |f: fn(&OverheadRun) -> f64| runs.iter().map(f).sum::<f64>() / n;
    OverheadRun {
        tx_per_s: sum(|r| r.tx_per_s),
        source_cpu_us_per_tx: sum(|r| r.source_cpu_us_per_tx),
        walsender_cpu_us_per_tx: sum(|r| r.walsender_cpu_us_per_tx),
        tally_run_cpu_us_per_tx: sum(|r| r.tally_run_cpu_us_per_tx),
        target_cpu_us_per_tx: sum(|r| r.target_cpu_us_per_tx),
    }
}

async fn source_overhead(settings: &Settings) -> Result<Overhead> {
    let all = [Aggregation::None, Aggregation::Trigger, Aggregation::Tally];
    let mut scenarios = Vec::new();
    for layout in Layout::all()? {
        eprintln!(
            "source overhead, {} layout: source and writers on CPUs {}, Tally and target on CPUs {}",
            layout.name,
            Layout::describe(&layout.source_cpus),
            Layout::describe(&layout.tally_cpus)
        );
        // Source and target in clusters of their own, as in a deployment.
        let (source_cpus, tally_cpus) = (layout.source_cpus.clone(), layout.tally_cpus.clone());
        let source = tokio::task::spawn_blocking(move || start_cluster(source_cpus)).await??;
        let target = tokio::task::spawn_blocking(move || start_cluster(tally_cpus)).await??;
        for shape in [Shape::PerCustomer, Shape::WithGlobal] {
            eprintln!("  {}:", shape.name());
            let mut rounds: Vec<Vec<OverheadRun>> = vec![Vec::new(); all.len()];
            for round in 0..settings.overhead_rounds.max(1) {
                for step in 0..all.len() {
                    let index = (step + round) % all.len();
                    let name = format!("overhead_{}_{}_{round}_{index}", layout.name, shape as u8);
                    let run = overhead_run(
                        &source, &target, &layout, shape, settings, all[index], &name,
                    )
                    .await?;
                    eprintln!(
                        "    round {}: {}: {:.0} tx/s; CPU µs per tx: source {:.0} (walsender {:.0}), tally run {:.0}, target {:.0}",
                        round + 1,
                        all[index].name(),
                        run.tx_per_s,
                        run.source_cpu_us_per_tx,
                        run.walsender_cpu_us_per_tx,
                        run.tally_run_cpu_us_per_tx,
                        run.target_cpu_us_per_tx
                    );
                    rounds[index].push(run);
                }
            }
            scenarios.push(Scenario {
                layout: layout.clone(),
                shape,
                runs: all
                    .into_iter()
                    .zip(rounds)
                    .map(|(a, r)| (a, mean(&r), r))
                    .collect(),
            });
        }
    }
    Ok(Overhead {
        writers: settings.overhead_writers,
        seconds: settings.overhead_seconds,
        scenarios,
    })
}

/// One source-overhead run in fresh databases named after `name` (also the
/// slot's name), with `aggregation` in place.
async fn overhead_run(
    source_cluster: &PgCluster,
    target_cluster: &PgCluster,
    layout: &Layout,
    shape: Shape,
    settings: &Settings,
    aggregation: Aggregation,
    name: &str,
) -> Result<OverheadRun> {
    let pair = Pair::new(
        source_cluster,
        target_cluster,
        name,
        ACCOUNTS,
        &shape.views(),
    )
    .await?;
    let source = tally::db::connect(&pair.source_url).await?;
    let mut process = None;
    match aggregation {
        Aggregation::None => {}
        Aggregation::Trigger => source.batch_execute(&shape.triggers()).await?,
        Aggregation::Tally => {
            // The existing accounts reach the view through bootstrap.
            let boot = pair.path("boot.jsonl");
            let config = pair.config();
            run_tally(&[
                "bootstrap",
                "--config",
                &config,
                "--output",
                &boot,
                "--state",
                &pair.path("boot.state"),
            ])?;
            run_tally(&["apply", "--config", &config, "--input", &boot])?;
            let mut command = tally(&["run", "--config", &config, "--parallel", "2"]);
            tally::cpu::pin_command(&mut command, &layout.tally_cpus)?;
            process = Some(command.spawn()?);
            wait_until(Duration::from_secs(30), || async {
                Ok(source
                    .query_opt("SELECT 1 FROM pg_replication_slots WHERE active", &[])
                    .await?
                    .is_some())
            })
            .await?;
        }
    }
    let tally_cpu = |process: &Child| -> Result<(f64, f64)> {
        Ok((
            tally::cpu::process_cpu_seconds(process.id(), false)
                .context("CPU time of tally run")?,
            target_cluster
                .cpu_seconds()
                .context("CPU time of the target")?,
        ))
    };
    // Every run starts right after a checkpoint, so that none pays for one
    // (and its full-page writes) that another was spared.
    for cluster in [source_cluster, target_cluster] {
        tally::db::connect(&cluster.url("postgres"))
            .await?
            .batch_execute("CHECKPOINT")
            .await?;
    }
    let tally_before = process.as_ref().map(tally_cpu).transpose()?;
    let window = tokio::task::block_in_place(|| {
        write_load(
            &pair.source_url,
            settings.overhead_writers,
            settings.overhead_seconds,
            &layout.source_cpus,
            source_cluster,
        )
    })?;
    let mut tally_cpu_seconds = (0.0, 0.0);
    if let Some(mut process) = process {
        // Tally must have kept up exactly: wait until caught up, check.
        let end: String = source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        wait_until(Duration::from_secs(120), || async {
            Ok(source
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                    &[&end, &name],
                )
                .await?
                .get(0))
        })
        .await?;
        let (after, before) = (tally_cpu(&process)?, tally_before.unwrap_or_default());
        tally_cpu_seconds = (after.0 - before.0, after.1 - before.1);
        pair.check().await?;
        terminate(&mut process)?;
        pair.drop_slot(name).await?;
    }
    if aggregation == Aggregation::Trigger {
        let drift: i64 = source
            .query_one(
                "SELECT count(*) FROM customer_balance_sync s
                 FULL JOIN (SELECT customer_id, SUM(balance) AS balance FROM accounts GROUP BY 1) a
                 USING (customer_id) WHERE s.balance IS DISTINCT FROM a.balance",
                &[],
            )
            .await?
            .get(0);
        ensure!(
            drift == 0,
            "the trigger's aggregate drifted on {drift} rows"
        );
        if shape == Shape::WithGlobal {
            let exact: bool = source
                .query_one(
                    "SELECT (SELECT balance FROM account_total_sync) = (SELECT SUM(balance) FROM accounts)",
                    &[],
                )
                .await?
                .get(0);
            ensure!(exact, "the trigger's global total drifted");
        }
    }
    let per_tx = |cpu: f64| cpu * 1e6 / window.transactions.max(1) as f64;
    Ok(OverheadRun {
        tx_per_s: window.transactions as f64 / window.seconds,
        source_cpu_us_per_tx: per_tx(window.source_cpu),
        walsender_cpu_us_per_tx: per_tx(window.walsender_cpu),
        tally_run_cpu_us_per_tx: per_tx(tally_cpu_seconds.0),
        target_cpu_us_per_tx: per_tx(tally_cpu_seconds.1),
    })
}

// ---------------------------------------------------------------- memory

struct Memory {
    changes: i64,
    seconds: f64,
    peak_rss_mib: f64,
}

/// `tally run` streams `changes` row changes (inserts in transactions of
/// 1,000 rows, then an update of every row in transactions of 10,000),
/// while its memory is read; its views are checked at the end.
async fn memory(cluster: &PgCluster, settings: &Settings) -> Result<Memory> {
    eprintln!("memory: {} changes through tally run…", settings.changes);
    let pair = Pair::new(cluster, cluster, "memory", INVOICES, INVOICE_VIEWS).await?;
    let source = tally::db::connect(&pair.source_url).await?;
    let config = pair.config();
    let mut process = tally(&["run", "--config", &config, "--parallel", "2"]).spawn()?;
    wait_until(Duration::from_secs(30), || async {
        Ok(source
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE active", &[])
            .await?
            .is_some())
    })
    .await?;
    let began = Instant::now();
    let inserts = settings.changes / 2;
    let mut next = 1i64;
    while next <= inserts {
        let last = (next + 999).min(inserts);
        source
            .execute(
                "INSERT INTO invoices SELECT g, (g % 1000)::int, 10 FROM generate_series($1::bigint, $2::bigint) g",
                &[&next, &last],
            )
            .await?;
        next = last + 1;
    }
    let mut next = 1i64;
    while next <= inserts {
        let last = (next + 9_999).min(inserts);
        source
            .execute(
                "UPDATE invoices SET total = total + 1 WHERE id BETWEEN $1 AND $2",
                &[&next, &last],
            )
            .await?;
        next = last + 1;
    }
    let end: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    wait_until(Duration::from_secs(600), || async {
        Ok(source
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'memory'",
                &[&end],
            )
            .await?
            .get(0))
    })
    .await?;
    let seconds = began.elapsed().as_secs_f64();
    let peak_rss_mib = proc_status_mib(process.id(), "VmHWM:").context("VmHWM of tally run")?;
    pair.check().await?;
    terminate(&mut process)?;
    pair.drop_slot("memory").await?;
    eprintln!("  {seconds:.1} s, peak RSS {peak_rss_mib:.1} MiB");
    Ok(Memory {
        changes: inserts * 2,
        seconds,
        peak_rss_mib,
    })
}

// ---------------------------------------------------------------- report

fn report(
    version: &str,
    reads: &ReadSide,
    boot: &Bootstrap,
    overhead: &Overhead,
    memory: &Memory,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Read side ({} source rows)\n", reads.rows);
    let _ = writeln!(
        out,
        "PostgreSQL {version}; source and target in one private cluster (fsync on, shared_buffers 512MB); each query run once untimed, then timed (p50 and mean of the timed runs); the view tables were built by `tally bootstrap` + `tally apply` and verified.\n"
    );
    let (customer_row, global_row) = (reads.timings[0].1.p50, reads.timings[1].1.p50);
    let _ = writeln!(
        out,
        "| read | runs | p50 ms | mean ms | × its view row read (p50) |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|");
    for (what, t) in &reads.timings {
        let view_row = if what.contains("all rows") || what.contains("global") {
            global_row
        } else {
            customer_row
        };
        let _ = writeln!(
            out,
            "| {what} | {} | {:.3} | {:.3} | {:.0} |",
            t.runs,
            t.p50,
            t.mean,
            t.p50 / view_row
        );
    }
    let _ = writeln!(out, "\n### Source overhead\n");
    let _ = writeln!(
        out,
        "{} closed-loop writer connections (one thread), each transaction one `UPDATE` of one of 10,000 account rows (100 customers), {} s per run, the three configurations in rotated order each round, each run right after a `CHECKPOINT`; source and target in clusters of their own; the trigger's aggregates and Tally's views were checked exact after every run. CPU time is user + system of every process of the cluster (and of `tally run`), per committed source transaction.\n",
        overhead.writers, overhead.seconds
    );
    let _ = writeln!(
        out,
        "Two shapes of aggregate: **per customer** (`SUM(balance), COUNT(*) … GROUP BY customer_id`, 100 groups, so writers rarely touch the same aggregate row) and **per customer + global total** (the demo's two views; the trigger then updates the one total row in every transaction, holding its lock until commit).\n"
    );
    let mut seen = Vec::new();
    for scenario in &overhead.scenarios {
        let layout = &scenario.layout;
        if seen.contains(&layout.name) {
            continue;
        }
        seen.push(layout.name);
        let _ = match layout.name {
            "split" => writeln!(
                out,
                "- **split** layout: the source cluster and its writers on CPU {}, `tally run` and the target cluster on CPU {}, as on two machines. What Tally costs the source is then what runs on the source's own CPU: its walsender decoding the WAL.",
                Layout::describe(&layout.source_cpus),
                Layout::describe(&layout.tally_cpus)
            ),
            _ => writeln!(
                out,
                "- **shared** layout: everything on every CPU, as on one box: Tally's own work (capture, apply, the target) then competes with the source for the same cores."
            ),
        };
    }
    let _ = writeln!(
        out,
        "\n| layout | aggregates | aggregation | tx/s (mean) | each round | vs no aggregation | source CPU µs per tx | of which walsender | `tally run` CPU µs per tx | target CPU µs per tx |"
    );
    let _ = writeln!(out, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for scenario in &overhead.scenarios {
        let none = scenario.runs[0].1.tx_per_s;
        for (aggregation, run, rounds) in &scenario.runs {
            let tally_only = |us: f64| {
                if *aggregation == Aggregation::Tally {
                    format!("{us:.1}")
                } else {
                    "-".to_string()
                }
            };
            let each: Vec<String> = rounds
                .iter()
                .map(|r| format!("{:.0}", r.tx_per_s))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {:.2} | {:.1} | {} | {} | {} |",
                scenario.layout.name,
                scenario.shape.name(),
                aggregation.name(),
                run.tx_per_s,
                each.join(", "),
                run.tx_per_s / none,
                run.source_cpu_us_per_tx,
                tally_only(run.walsender_cpu_us_per_tx),
                tally_only(run.tally_run_cpu_us_per_tx),
                tally_only(run.target_cpu_us_per_tx),
            );
        }
    }
    let _ = writeln!(out, "\n### Bootstrap\n");
    let _ = writeln!(
        out,
        "| rows | `tally bootstrap` s | rows/s | `tally apply --parallel 2` of its output s | events/s |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|");
    let _ = writeln!(
        out,
        "| {} | {:.1} | {:.0} | {:.1} | {:.0} |",
        boot.rows,
        boot.seconds,
        boot.rows as f64 / boot.seconds,
        boot.apply_seconds,
        boot.rows as f64 / boot.apply_seconds
    );
    let _ = writeln!(out, "\n### Memory\n");
    let _ = writeln!(
        out,
        "| changes streamed through `tally run` | s until caught up | peak RSS MiB |"
    );
    let _ = writeln!(out, "|--:|--:|--:|");
    let _ = writeln!(
        out,
        "| {} | {:.1} | {:.1} |",
        memory.changes, memory.seconds, memory.peak_rss_mib
    );
    out
}

fn to_json(
    reads: &ReadSide,
    boot: &Bootstrap,
    overhead: &Overhead,
    memory: &Memory,
) -> serde_json::Value {
    json!({
        "read_side": {
            "rows": reads.rows,
            "timings": reads.timings.iter().map(|(what, t)| json!({
                "read": what, "p50_ms": t.p50, "mean_ms": t.mean, "runs": t.runs
            })).collect::<Vec<_>>(),
        },
        "source_overhead": overhead.scenarios.iter().flat_map(|l| l.runs.iter().map(|(a, run, rounds)| json!({
            "layout": l.layout.name,
            "shape": l.shape.name(),
            "source_cpus": Layout::describe(&l.layout.source_cpus),
            "tally_cpus": Layout::describe(&l.layout.tally_cpus),
            "aggregation": a.name(),
            "tx_per_s": run.tx_per_s,
            "source_cpu_us_per_tx": run.source_cpu_us_per_tx,
            "walsender_cpu_us_per_tx": run.walsender_cpu_us_per_tx,
            "tally_run_cpu_us_per_tx": run.tally_run_cpu_us_per_tx,
            "target_cpu_us_per_tx": run.target_cpu_us_per_tx,
            "rounds": rounds.iter().map(|r| r.tx_per_s).collect::<Vec<_>>(),
        }))).collect::<Vec<_>>(),
        "bootstrap": {
            "rows": boot.rows, "seconds": boot.seconds, "apply_seconds": boot.apply_seconds
        },
        "memory": {
            "changes": memory.changes, "seconds": memory.seconds, "peak_rss_mib": memory.peak_rss_mib
        },
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let settings = Settings::load()?;
    let cluster = tokio::task::spawn_blocking(|| start_cluster(Vec::new())).await??;
    let version: String = tally::db::connect(&cluster.url("postgres"))
        .await?
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    let overhead = source_overhead(&settings).await?;
    let memory = memory(&cluster, &settings).await?;
    let (reads, boot) = read_side_and_bootstrap(&cluster, &settings).await?;
    print!("{}", report(&version, &reads, &boot, &overhead, &memory));
    if let Some(path) = &settings.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&to_json(&reads, &boot, &overhead, &memory))?,
        )?;
    }
    Ok(())
}
