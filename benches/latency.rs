//! End-to-end latency: from a source transaction's commit to the target
//! transaction that makes the view row reflect it, under an open-loop load
//! of single-row transactions at a fixed rate.
//!
//! ```sh
//! cargo bench --bench latency                                   # embedded and NATS, 1,000 and 5,000 tx/s, 10 s each
//! TALLY_BENCH_TRANSPORTS=embedded TALLY_BENCH_RATES=5000 cargo bench --bench latency
//! ```
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `TALLY_BENCH_RATES` | `1000,5000` | source transactions per second, one run each |
//! | `TALLY_BENCH_SECONDS` | 10 | measured load per run |
//! | `TALLY_BENCH_WARMUP` | 2 | seconds of load before the measured window (not counted) |
//! | `TALLY_BENCH_TRANSPORTS` | `embedded,nats` | `embedded`: `tally run`; `nats`: `tally capture` and `tally apply` through a private `nats-server` |
//! | `TALLY_BENCH_WRITERS` | 16 | writer connections sharing the rate |
//! | `TALLY_BENCH_GROUPS` | 1000 | rows in the source table = groups in the view |
//! | `TALLY_BENCH_PARALLEL` | 2 | appliers (`--parallel`) |
//! | `TALLY_BENCH_CLUSTERS` | 2 | 2: source and target in clusters of their own; 1: one cluster for both |
//! | `TALLY_BENCH_FSYNC` | 1 | `fsync` (and `synchronous_commit`) on both clusters; 0 turns it off |
//! | `TALLY_BENCH_JSON` | unset | also write the results as JSON to this file (for `scripts/bench`'s plots) |
//! | `TALLY_BENCH_SAMPLE_SECONDS` | 0 | when > 0, a timeline per run: for each interval of this many seconds, the achieved rate, p50/p99 latency, the tally processes' resident memory and the slot's lag in bytes (`scripts/soak` uses it) |
//!
//! How a transaction is matched to the target write that reflects it,
//! exactly, whatever order the parallel appliers commit their batches in:
//! the source table `accounts(id, grp, balance)` has one row per group
//! (`grp = id`), and every source transaction is one autocommit
//! `UPDATE accounts SET balance = balance + 1 WHERE id = $1`. Each row is
//! written by one writer only, serially, so its k-th update sets its balance
//! to k, and the view `balances` (`SUM(balance) AS total` per `grp`) shows
//! `total = k` exactly when the row's version from update k (or a later one,
//! which includes it) is applied: Tally's ledger guard applies a row's
//! versions in commit order and drops older ones, so a group's `total`
//! never goes down. A target-side `AFTER INSERT OR UPDATE FOR EACH ROW`
//! trigger on `balances` records `(grp, total, clock_timestamp())` in a side
//! table, in the apply transaction itself; update k's latency ends at the
//! first recorded write of its group with `total >= k`.
//!
//! Clocks (all the same machine's `CLOCK_REALTIME`):
//! * source commit: the source transaction's commit timestamp
//!   (`track_commit_timestamp = on`; the writer reads its transaction id with
//!   `RETURNING`), taken as the commit record is written, before its WAL
//!   flush — so the source's commit flush counts towards the latency;
//! * target commit: the commit timestamp of the apply transaction that wrote
//!   the trigger's row, likewise taken just before that commit's WAL flush:
//!   readers see the row once that flush is done, a fraction of a
//!   millisecond to a few milliseconds later (the headline figures stop
//!   here);
//! * also reported: the writer's wall clock right after `COMMIT` returned
//!   (what an application sees, but on a busy 2-core machine the writer task
//!   may record it late, which makes latencies look shorter), and the
//!   trigger's `clock_timestamp()` (just before the view statement ends,
//!   earlier still than the target commit).
//!
//! The load is open-loop: each writer has a tokio interval at
//! `rate / writers` and sends on every tick whether or not the system keeps
//! up (missed ticks are sent at once, so the total count is kept), and the
//! achieved rate is reported. Each run gets fresh source and target
//! databases and its own slot; before the load starts, `tally` is running,
//! its slot is active and every group is in the view. After the load, the
//! bench waits until every update is in the view, checks `verify_views` and
//! the dead letters, and stops the processes with SIGTERM.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tally::apply::Model;
use tally::ops::verify::verify_views;
use tally::pgcluster::{ClusterOptions, PgCluster};
use tokio_postgres::Client;

const SOURCE_SCHEMA: &str =
    "CREATE TABLE accounts (id bigint PRIMARY KEY, grp int NOT NULL, balance numeric NOT NULL)";

const VIEWS: &str = "
CREATE MATERIALIZED VIEW balances AS
SELECT grp, SUM(balance) AS total, COUNT(*) AS n FROM accounts GROUP BY grp;";

/// The side table and trigger in the target that record when each view row
/// was written. Unlogged: the marks are read back by this benchmark only,
/// and should add as little as possible to the apply transaction. The view
/// table is named unqualified, as Tally creates it: through the search path
/// (with the role `tally`, that is the schema `tally`).
const TARGET_MARKS: &str = "
CREATE UNLOGGED TABLE public.latency_marks (grp int NOT NULL, total bigint NOT NULL, at timestamptz NOT NULL);
CREATE FUNCTION public.latency_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.latency_marks VALUES (NEW.grp, NEW.total, clock_timestamp());
    RETURN NULL;
END $$;
CREATE TRIGGER latency_mark AFTER INSERT OR UPDATE ON balances
    FOR EACH ROW EXECUTE FUNCTION public.latency_mark();";

// ---------------------------------------------------------------- settings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Embedded,
    Nats,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Embedded => "embedded",
            Transport::Nats => "nats",
        }
    }
}

#[derive(Debug, Clone)]
struct Settings {
    rates: Vec<f64>,
    seconds: f64,
    warmup: f64,
    transports: Vec<Transport>,
    writers: usize,
    groups: i64,
    parallel: usize,
    clusters: usize,
    fsync: bool,
    /// 0: no timeline; else the width of the timeline's intervals.
    sample_seconds: f64,
}

fn env_text(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match env_text(name) {
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
        let rates = env_text("TALLY_BENCH_RATES")
            .unwrap_or_else(|| "1000,5000".into())
            .split(',')
            .map(|r| {
                r.replace('_', "")
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| *r > 0.0)
                    .ok_or_else(|| anyhow!("TALLY_BENCH_RATES: {r:?} is not a positive rate"))
            })
            .collect::<Result<Vec<_>>>()?;
        let transports = env_text("TALLY_BENCH_TRANSPORTS")
            .unwrap_or_else(|| "embedded,nats".into())
            .split(',')
            .map(|t| match t.trim() {
                "embedded" => Ok(Transport::Embedded),
                "nats" => Ok(Transport::Nats),
                other => bail!("TALLY_BENCH_TRANSPORTS: {other:?} is not embedded or nats"),
            })
            .collect::<Result<Vec<_>>>()?;
        let settings = Settings {
            rates,
            seconds: env_number("TALLY_BENCH_SECONDS", 10.0)?,
            warmup: env_number("TALLY_BENCH_WARMUP", 2.0)?,
            transports,
            writers: env_number("TALLY_BENCH_WRITERS", 16)?,
            groups: env_number("TALLY_BENCH_GROUPS", 1000)?,
            parallel: env_number("TALLY_BENCH_PARALLEL", 2)?,
            clusters: env_number("TALLY_BENCH_CLUSTERS", 2)?,
            fsync: env_number::<u8>("TALLY_BENCH_FSYNC", 1)? != 0,
            sample_seconds: env_number("TALLY_BENCH_SAMPLE_SECONDS", 0.0)?,
        };
        ensure!(settings.seconds > 0.0, "TALLY_BENCH_SECONDS must be > 0");
        ensure!(settings.writers > 0, "TALLY_BENCH_WRITERS must be > 0");
        ensure!(
            settings.groups >= settings.writers as i64,
            "TALLY_BENCH_GROUPS must be at least TALLY_BENCH_WRITERS (each writer owns its groups)"
        );
        ensure!(settings.parallel > 0, "TALLY_BENCH_PARALLEL must be > 0");
        ensure!(
            matches!(settings.clusters, 1 | 2),
            "TALLY_BENCH_CLUSTERS is 1 or 2"
        );
        Ok(settings)
    }
}

// ---------------------------------------------------------------- NATS

use tally::natsserver::NatsServer as Nats;

// ---------------------------------------------------------------- helpers

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A memory field of `/proc/PID/status` (`VmHWM:`, `VmRSS:`) in MiB.
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

fn machine() -> Vec<(&'static str, String)> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let date = Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    vec![
        ("date", date),
        ("CPU", cpu),
        ("nproc", nproc),
        ("memory", memory),
        ("kernel", read("/proc/sys/kernel/osrelease").trim().into()),
    ]
}

/// A `tally` subcommand with warnings on stderr, stdout discarded.
fn spawn_tally(args: &[&str]) -> Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting tally {}", args.join(" ")))
}

/// SIGTERM, then wait (in a blocking section: `wait` blocks the thread).
fn terminate(child: &mut Child) -> Result<std::process::ExitStatus> {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    Ok(tokio::task::block_in_place(|| child.wait())?)
}

fn ensure_running(children: &mut [(&str, Child)], when: &str) -> Result<()> {
    for (name, child) in children.iter_mut() {
        if let Some(status) = child.try_wait()? {
            bail!("tally {name} exited ({status}) {when}");
        }
    }
    Ok(())
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    while !done().await? {
        if started.elapsed() > limit {
            bail!("{what}: not after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- the load

/// One source transaction: the k-th update of group `grp`.
struct Tx {
    grp: i32,
    k: i64,
    xid: i64,
    /// The writer's wall clock right after `COMMIT` returned (µs since 1970).
    returned_us: i64,
}

/// One writer: owns groups `w, w + writers, …`, updates them round-robin,
/// one autocommit transaction per tick of its own interval.
async fn writer(
    url: String,
    w: usize,
    settings: Arc<Settings>,
    rate: f64,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Result<Vec<Tx>> {
    let client = tally::db::connect(&url).await?;
    // `::xid` drops the epoch, which is 0 in a fresh cluster.
    let update = client
        .prepare(
            "UPDATE accounts SET balance = balance + 1 WHERE id = $1 RETURNING pg_current_xact_id()::xid::text::bigint",
        )
        .await?;
    let owned: Vec<i64> = (w as i64..settings.groups)
        .step_by(settings.writers)
        .collect();
    let mut counts = vec![0i64; owned.len()];
    let period = Duration::from_secs_f64(settings.writers as f64 / rate);
    // Staggered, so the writers' ticks do not all fall on the same instant.
    let offset = period.mul_f64(w as f64 / settings.writers as f64);
    let mut ticker = tokio::time::interval_at(start + offset, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut out = Vec::with_capacity(((end - start).as_secs_f64() / period.as_secs_f64()) as usize);
    let mut next = 0;
    loop {
        if ticker.tick().await >= end {
            return Ok(out);
        }
        let slot = next % owned.len();
        next += 1;
        let row = client.query_one(&update, &[&owned[slot]]).await?;
        let returned_us = now_us();
        counts[slot] += 1;
        out.push(Tx {
            grp: owned[slot] as i32,
            k: counts[slot],
            xid: row.get(0),
            returned_us,
        });
    }
}

// ---------------------------------------------------------------- one run

struct Clusters {
    source: PgCluster,
    /// `None`: the target databases live in the source's cluster.
    target: Option<PgCluster>,
}

impl Clusters {
    fn target(&self) -> &PgCluster {
        self.target.as_ref().unwrap_or(&self.source)
    }
}

#[derive(Default, Clone, Copy)]
struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
}

/// p50, p99 and max in milliseconds of latencies in microseconds.
fn summarize(mut micros: Vec<i64>) -> Summary {
    if micros.is_empty() {
        return Summary::default();
    }
    micros.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
        micros[rank - 1] as f64 / 1000.0
    };
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        max: *micros.last().unwrap() as f64 / 1000.0,
    }
}

struct RunResult {
    transport: Transport,
    rate: f64,
    achieved: f64,
    measured: usize,
    total: usize,
    /// Source commit timestamp → target commit timestamp (headline).
    commit_to_commit: Summary,
    /// Writer's clock after COMMIT returned → target commit timestamp.
    returned_to_commit: Summary,
    /// Source commit timestamp → trigger's clock_timestamp().
    commit_to_trigger: Summary,
    /// Peak RSS of the tally process(es), MiB.
    peak_rss: Vec<(&'static str, f64)>,
    catch_up: Duration,
    load_before: String,
    load_after: String,
    timeline: Vec<TimelineRow>,
}

/// What the sampler saw at one instant of the load.
struct Sample {
    at_us: i64,
    /// `VmRSS` of each tally process, MiB.
    rss: Vec<(&'static str, f64)>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn` of the slot.
    slot_lag_bytes: i64,
}

/// One interval of a run's timeline.
struct TimelineRow {
    /// End of the interval, seconds since the load began.
    at: f64,
    rate: f64,
    latency: Summary,
    rss: Vec<(&'static str, f64)>,
    slot_lag_bytes: i64,
}

async fn run_one(
    clusters: &Clusters,
    settings: &Arc<Settings>,
    transport: Transport,
    rate: f64,
    index: usize,
) -> Result<RunResult> {
    let load_before = load_average();
    let source_url = clusters
        .source
        .create_database(&format!("source_{index}"))?;
    let target_url = clusters
        .target()
        .create_database(&format!("target_{index}"))?;
    let source = tally::db::connect(&source_url).await?;
    source.batch_execute(SOURCE_SCHEMA).await?;

    let dir = tempfile::tempdir()?;
    let views_path = dir.path().join("views.sql");
    std::fs::write(&views_path, VIEWS)?;
    let slot = format!("latency_{index}");
    let nats = match transport {
        Transport::Embedded => None,
        Transport::Nats => Some(tokio::task::block_in_place(Nats::start)?),
    };
    let transport_section = match &nats {
        None => String::new(),
        Some(nats) => format!("[transport]\nkind = \"nats\"\nurl = \"{}\"\n", nats.url()),
    };
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "views = \"views.sql\"\n[source]\nurl = \"{source_url}\"\n[target]\nurl = \"{target_url}\"\n[capture]\nslot = \"{slot}\"\n{transport_section}"
        ),
    )?;
    let config = config.to_str().context("config path")?;

    // The view table exists before tally starts, so the trigger can be on it
    // from the first write (tally creates its tables idempotently).
    let views = tally::views::load_views(&views_path)?;
    let model = Model::load(&source, views).await?;
    let mut target = tally::db::connect(&target_url).await?;
    model.ensure_target_schema(&mut target).await?;
    target.batch_execute(TARGET_MARKS).await?;

    let parallel = settings.parallel.to_string();
    let mut children: Vec<(&str, Child)> = match transport {
        Transport::Embedded => vec![(
            "run",
            spawn_tally(&["run", "--config", config, "--parallel", &parallel])?,
        )],
        Transport::Nats => vec![
            ("capture", spawn_tally(&["capture", "--config", config])?),
            (
                "apply",
                spawn_tally(&["apply", "--config", config, "--parallel", &parallel])?,
            ),
        ],
    };
    let result = drive(
        &source,
        &target,
        &model,
        &source_url,
        settings,
        rate,
        &slot,
        &mut children,
    )
    .await;
    // Stop the processes whatever happened, then report.
    let mut peak_rss = Vec::new();
    let mut exits = Vec::new();
    for (name, child) in children.iter_mut() {
        if let Some(mib) = proc_status_mib(child.id(), "VmHWM:") {
            peak_rss.push((*name, mib));
        }
        exits.push((*name, terminate(child)?));
    }
    // (The NATS server, if any, stops when `nats` goes out of scope.)
    let (marks, txs, catch_up, samples) = result?;
    for (name, status) in exits {
        ensure!(
            status.success(),
            "tally {name} exited with {status} on SIGTERM"
        );
    }
    // The server notices the replication connection is gone a moment after
    // the process exits; the slot can be dropped once it is inactive.
    wait_until("slot inactive", Duration::from_secs(30), || async {
        Ok(source
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await?
            .is_some())
    })
    .await?;
    source
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;

    // Source commit timestamps of every transaction, by transaction id.
    let xids: Vec<i64> = txs.iter().map(|t| t.xid).collect();
    let committed: HashMap<i64, i64> = source
        .query(
            "SELECT x, (extract(epoch FROM pg_xact_commit_timestamp(x::text::xid)) * 1e6)::bigint
             FROM unnest($1::bigint[]) AS x",
            &[&xids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Per group, the marks in time order; the running maximum of `total`
    // says, for each k, the first write that reflects update k.
    let first_reflecting = |by: fn(&Mark) -> i64| -> HashMap<i32, (Vec<i64>, Vec<i64>)> {
        let mut per_group: HashMap<i32, Vec<&Mark>> = HashMap::new();
        for mark in &marks {
            per_group.entry(mark.grp).or_default().push(mark);
        }
        per_group
            .into_iter()
            .map(|(grp, mut marks)| {
                marks.sort_by_key(|m| by(m));
                let mut running = i64::MIN;
                let (times, maxima) = marks
                    .iter()
                    .map(|m| {
                        running = running.max(m.total);
                        (by(m), running)
                    })
                    .unzip();
                (grp, (times, maxima))
            })
            .collect()
    };
    let by_commit = first_reflecting(|m| m.committed_us);
    let by_trigger = first_reflecting(|m| m.trigger_us);
    let when = |index: &HashMap<i32, (Vec<i64>, Vec<i64>)>, tx: &Tx| -> Result<i64> {
        let (times, maxima) = index
            .get(&tx.grp)
            .ok_or_else(|| anyhow!("group {} was never written", tx.grp))?;
        let first = maxima.partition_point(|total| *total < tx.k);
        times
            .get(first)
            .copied()
            .ok_or_else(|| anyhow!("update {} of group {} is in no target write", tx.k, tx.grp))
    };

    let window_start = window_start(&txs, settings);
    let window_end = window_start + (settings.seconds * 1e6) as i64;
    let mut commit_to_commit = Vec::new();
    let mut returned_to_commit = Vec::new();
    let mut commit_to_trigger = Vec::new();
    let mut latency_by_xid = HashMap::with_capacity(txs.len());
    for tx in &txs {
        let source_commit = *committed
            .get(&tx.xid)
            .ok_or_else(|| anyhow!("no commit timestamp for xid {}", tx.xid))?;
        let target_commit = when(&by_commit, tx)?;
        let trigger = when(&by_trigger, tx)?;
        latency_by_xid.insert(tx.xid, target_commit - source_commit);
        if tx.returned_us < window_start || tx.returned_us >= window_end {
            continue;
        }
        commit_to_commit.push(target_commit - source_commit);
        returned_to_commit.push(target_commit - tx.returned_us);
        commit_to_trigger.push(trigger - source_commit);
    }
    let measured = commit_to_commit.len();
    let first_us = txs.iter().map(|t| t.returned_us).min().unwrap_or(0);
    let timeline = timeline(&txs, &latency_by_xid, &samples, first_us);
    Ok(RunResult {
        transport,
        rate,
        achieved: measured as f64 / settings.seconds,
        measured,
        total: txs.len(),
        commit_to_commit: summarize(commit_to_commit),
        returned_to_commit: summarize(returned_to_commit),
        commit_to_trigger: summarize(commit_to_trigger),
        peak_rss,
        catch_up,
        load_before,
        load_after: load_average(),
        timeline,
    })
}

/// The measured window starts `warmup` seconds after the first transaction
/// returned.
fn window_start(txs: &[Tx], settings: &Settings) -> i64 {
    txs.iter().map(|t| t.returned_us).min().unwrap_or(0) + (settings.warmup * 1e6) as i64
}

/// A write of the trigger: group, its total then, and two clocks (µs).
struct Mark {
    grp: i32,
    total: i64,
    trigger_us: i64,
    committed_us: i64,
}

/// With tally running: waits for its slot, seeds the groups, runs the load,
/// waits until the view holds every update, checks it, reads the marks.
#[allow(clippy::too_many_arguments)]
async fn drive(
    source: &Client,
    target: &Client,
    model: &Model,
    source_url: &str,
    settings: &Arc<Settings>,
    rate: f64,
    slot: &str,
    children: &mut [(&str, Child)],
) -> Result<(Vec<Mark>, Vec<Tx>, Duration, Vec<Sample>)> {
    let groups = settings.groups;
    wait_until("slot active", Duration::from_secs(60), || async {
        Ok(source
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await?
            .is_some())
    })
    .await?;
    // The rows come in through the stream, so the view starts complete.
    source
        .execute(
            "INSERT INTO accounts SELECT g, g, 0 FROM generate_series(0, $1::bigint - 1) g",
            &[&groups],
        )
        .await?;
    wait_until(
        "every group in the view",
        Duration::from_secs(60),
        || async {
            let n: i64 = target
                .query_one("SELECT count(*) FROM balances", &[])
                .await?
                .get(0);
            Ok(n == groups)
        },
    )
    .await?;
    target
        .batch_execute("TRUNCATE public.latency_marks")
        .await?;
    ensure_running(children, "before the load")?;

    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(settings.warmup + settings.seconds);
    let writers: Vec<_> = (0..settings.writers)
        .map(|w| {
            tokio::spawn(writer(
                source_url.to_string(),
                w,
                settings.clone(),
                rate,
                start,
                end,
            ))
        })
        .collect();
    let sampler = (settings.sample_seconds > 0.0).then(|| {
        let pids: Vec<(&'static str, u32)> = children
            .iter()
            .map(|(name, child)| (process_label(name), child.id()))
            .collect();
        tokio::spawn(sample(
            source_url.to_string(),
            slot.to_string(),
            pids,
            Duration::from_secs_f64(settings.sample_seconds),
            end,
        ))
    });
    let mut txs = Vec::new();
    for w in writers {
        txs.extend(w.await??);
    }
    let samples = match sampler {
        Some(task) => task.await??,
        None => Vec::new(),
    };
    let written_at = Instant::now();
    ensure_running(children, "during the load")?;
    let expected = txs.len() as i64;
    wait_until(
        "every update in the view",
        Duration::from_secs(120),
        || async {
            let applied: i64 = target
                .query_one("SELECT COALESCE(SUM(total), 0)::bigint FROM balances", &[])
                .await?
                .get(0);
            Ok(applied == expected)
        },
    )
    .await?;
    let catch_up = written_at.elapsed();
    let differences = verify_views(source, target, model).await?;
    ensure!(
        differences.is_empty(),
        "the view differs from its SELECT on the source: {:?}",
        &differences[..differences.len().min(3)]
    );
    let dead: i64 = target
        .query_one("SELECT count(*) FROM tally.dead_letters", &[])
        .await?
        .get(0);
    ensure!(dead == 0, "{dead} dead letters");
    let marks = target
        .query(
            "SELECT grp, total,
                    (extract(epoch FROM at) * 1e6)::bigint,
                    (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::bigint
             FROM public.latency_marks",
            &[],
        )
        .await?
        .iter()
        .map(|r| Mark {
            grp: r.get(0),
            total: r.get(1),
            trigger_us: r.get(2),
            committed_us: r.get(3),
        })
        .collect();
    Ok((marks, txs, catch_up, samples))
}

/// The tally process names as `'static` labels for the timeline.
fn process_label(name: &str) -> &'static str {
    match name {
        "run" => "run",
        "capture" => "capture",
        _ => "apply",
    }
}

/// Every `every` until `end`: the tally processes' memory and the slot's
/// lag, on a connection of its own.
async fn sample(
    source_url: String,
    slot: String,
    pids: Vec<(&'static str, u32)>,
    every: Duration,
    end: tokio::time::Instant,
) -> Result<Vec<Sample>> {
    let source = tally::db::connect(&source_url).await?;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::new();
    loop {
        if ticker.tick().await > end {
            return Ok(samples);
        }
        let lag: Option<i64> = source
            .query_one(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        samples.push(Sample {
            at_us: now_us(),
            rss: pids
                .iter()
                .filter_map(|(name, pid)| Some((*name, proc_status_mib(*pid, "VmRSS:")?)))
                .collect(),
            slot_lag_bytes: lag.unwrap_or(0),
        });
    }
}

/// Cuts the load into intervals ending at the samples: per interval the
/// rate of returned commits, their latency, and what the sample saw.
fn timeline(
    txs: &[Tx],
    latencies: &HashMap<i64, i64>,
    samples: &[Sample],
    first_us: i64,
) -> Vec<TimelineRow> {
    let mut rows = Vec::new();
    let mut from = first_us;
    for sample in samples {
        let to = sample.at_us;
        if to <= from {
            continue;
        }
        let inside: Vec<i64> = txs
            .iter()
            .filter(|t| t.returned_us >= from && t.returned_us < to)
            .filter_map(|t| latencies.get(&t.xid).copied())
            .collect();
        rows.push(TimelineRow {
            at: (to - first_us) as f64 / 1e6,
            rate: inside.len() as f64 / ((to - from) as f64 / 1e6),
            latency: summarize(inside),
            rss: sample.rss.clone(),
            slot_lag_bytes: sample.slot_lag_bytes,
        });
        from = to;
    }
    rows
}

// ---------------------------------------------------------------- main

fn start_cluster(fsync: bool) -> Result<PgCluster> {
    let mut extra_settings = vec![("track_commit_timestamp".to_string(), "on".to_string())];
    if !fsync {
        extra_settings.push(("synchronous_commit".into(), "off".into()));
    }
    // More room than the default 100 for 16 writers, appliers and checks.
    extra_settings.push(("max_connections".into(), "200".into()));
    Ok(PgCluster::start_with(ClusterOptions {
        fsync,
        extra_settings,
        ..ClusterOptions::default()
    })?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let settings = Arc::new(Settings::load()?);
    eprintln!("latency: {settings:?}; load {}", load_average());
    let fsync = settings.fsync;
    let two = settings.clusters == 2;
    let clusters = tokio::task::spawn_blocking(move || -> Result<Clusters> {
        Ok(Clusters {
            source: start_cluster(fsync)?,
            target: if two {
                Some(start_cluster(fsync)?)
            } else {
                None
            },
        })
    })
    .await??;
    let version: String = tally::db::connect(&clusters.source.url("postgres"))
        .await?
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);

    // Until the NATS launcher is merged, NATS runs are reported as skipped
    // rather than failing the embedded ones.
    let mut skipped = Vec::new();
    let mut transports = settings.transports.clone();
    if transports.contains(&Transport::Nats)
        && let Err(error) = tokio::task::block_in_place(Nats::start)
    {
        eprintln!("NATS runs skipped: {error:#}");
        skipped.push(format!("nats: {error:#}"));
        transports.retain(|t| *t != Transport::Nats);
    }
    let mut results = Vec::new();
    let mut index = 0;
    for &transport in &transports {
        for &rate in &settings.rates {
            index += 1;
            eprintln!(
                "run {index}: {} at {rate} tx/s for {} s (+{} s warm-up)…",
                transport.name(),
                settings.seconds,
                settings.warmup
            );
            let result = run_one(&clusters, &settings, transport, rate, index)
                .await
                .with_context(|| format!("run {index}: {} at {rate} tx/s", transport.name()))?;
            eprintln!(
                "  achieved {:.0} tx/s; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                result.achieved,
                result.commit_to_commit.p50,
                result.commit_to_commit.p99,
                result.commit_to_commit.max
            );
            results.push(result);
        }
    }
    print!("{}", report(&settings, &version, &results, &skipped));
    if let Some(path) = env_text("TALLY_BENCH_JSON") {
        std::fs::write(&path, serde_json::to_string_pretty(&to_json(&results))?)?;
    }
    Ok(())
}

/// The runs as JSON, for the plots of `scripts/bench`.
fn to_json(results: &[RunResult]) -> serde_json::Value {
    let three = |s: Summary| serde_json::json!({"p50_ms": s.p50, "p99_ms": s.p99, "max_ms": s.max});
    serde_json::Value::Array(
        results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "transport": r.transport.name(),
                    "rate": r.rate,
                    "achieved": r.achieved,
                    "latency": three(r.commit_to_commit),
                    "timeline": r.timeline.iter().map(|row| serde_json::json!({
                        "at_s": row.at,
                        "tx_per_s": row.rate,
                        "latency": three(row.latency),
                        "slot_lag_bytes": row.slot_lag_bytes,
                        "rss_mib": row.rss.iter().map(|(_, mib)| mib).sum::<f64>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn report(settings: &Settings, version: &str, results: &[RunResult], skipped: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### End-to-end latency\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    for (name, value) in machine() {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    let _ = writeln!(out, "| PostgreSQL | {version} |");
    let _ = writeln!(
        out,
        "| clusters | {} |",
        if settings.clusters == 2 {
            "source and target in separate clusters"
        } else {
            "source and target databases in one cluster"
        }
    );
    let _ = writeln!(
        out,
        "| durability | fsync {0}, synchronous_commit {0}, track_commit_timestamp on |",
        if settings.fsync { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "| load | {} writer connections, one-row autocommit UPDATE per transaction, {} groups (one row each), {} s measured after {} s warm-up; {} appliers |",
        settings.writers, settings.groups, settings.seconds, settings.warmup, settings.parallel
    );
    let _ = writeln!(
        out,
        "\nLatency from the source transaction's commit timestamp to the commit timestamp of the target transaction that first reflects it in the view:\n"
    );
    let _ = writeln!(
        out,
        "| transport | target rate | achieved rate | transactions | p50 ms | p99 ms | max ms |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|");
    for r in results {
        let s = r.commit_to_commit;
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {} | {:.1} | {:.1} | {:.1} |",
            r.transport.name(),
            r.rate,
            r.achieved,
            r.measured,
            s.p50,
            s.p99,
            s.max
        );
    }
    let _ = writeln!(
        out,
        "\nSame runs, other clocks (p50 / p99 / max ms), and the runs' circumstances:\n"
    );
    let _ = writeln!(
        out,
        "| transport | target rate | COMMIT returned → target commit | source commit → trigger | all transactions | caught up after load | peak RSS MiB | load before | load after |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|---|---|");
    for r in results {
        let three = |s: Summary| format!("{:.1} / {:.1} / {:.1}", s.p50, s.p99, s.max);
        let rss = r
            .peak_rss
            .iter()
            .map(|(name, mib)| format!("{name} {mib:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} ms | {rss} | {} | {} |",
            r.transport.name(),
            r.rate,
            three(r.returned_to_commit),
            three(r.commit_to_trigger),
            r.total,
            r.catch_up.as_millis(),
            r.load_before,
            r.load_after
        );
    }
    for r in results.iter().filter(|r| !r.timeline.is_empty()) {
        let _ = writeln!(
            out,
            "\nTimeline, {} at {:.0} tx/s (each row: the interval ending then; RSS at its end):\n",
            r.transport.name(),
            r.rate
        );
        let _ = writeln!(
            out,
            "| s | tx/s | p50 ms | p99 ms | max ms | RSS MiB | slot lag bytes |"
        );
        let _ = writeln!(out, "|--:|--:|--:|--:|--:|---|--:|");
        for row in &r.timeline {
            let rss = row
                .rss
                .iter()
                .map(|(name, mib)| format!("{name} {mib:.1}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                out,
                "| {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {rss} | {} |",
                row.at,
                row.rate,
                row.latency.p50,
                row.latency.p99,
                row.latency.max,
                row.slot_lag_bytes
            );
        }
    }
    for line in skipped {
        let _ = writeln!(out, "\nSkipped: {line}");
    }
    out
}
