//! Apply throughput: Tally against the per-event baseline, on one private
//! PostgreSQL cluster with durable commits (`fsync = on`,
//! `synchronous_commit = on`).
//!
//! ```sh
//! cargo bench --bench apply_throughput
//! TALLY_BENCH_EVENTS=20000 TALLY_BENCH_ROWS=2000 cargo bench --bench apply_throughput
//! ```
//!
//! One run:
//! 1. generates the history (creates on first touch, updates of the amount
//!    and sometimes of the account, deletes and re-creates) as Debezium JSON
//!    lines with strictly increasing `(commit_lsn, lsn)`, and shuffles them
//!    with a fixed seed; all in memory, untimed;
//! 2. starts a private cluster (fsync on) with a `source` database holding
//!    `movements` (the history's final state) and the view `account_balance`
//!    over 1,000 accounts;
//! 3. runs the per-event baseline (one durable transaction per event:
//!    lock the row's entry, drop the event unless it is newer, else upsert
//!    the entry and add the delta to the group rows, commit) over the first
//!    `TALLY_BENCH_BASELINE_EVENTS` events of the shuffled stream, on one
//!    connection and on several;
//! 4. runs Tally's `apply_lines` in several configurations, each into a
//!    fresh target database;
//! 5. checks every run: the view (or the baseline's `aggregates`) equals the
//!    aggregates of the events it was given, computed here in Rust, and, for
//!    whole-stream Tally runs, `verify_views` against the source holding the
//!    history's final state finds no difference;
//! 6. prints a Markdown report on stdout (progress goes to stderr).
//!
//! Settings, from the environment or as `--name value` arguments after
//! `--` (`cargo bench --bench apply_throughput -- --events 20000`):
//!
//! | variable | argument | default |
//! |---|---|---|
//! | `TALLY_BENCH_EVENTS` | `--events` | 1,000,000 |
//! | `TALLY_BENCH_ROWS` | `--rows` | 100,000 |
//! | `TALLY_BENCH_ACCOUNTS` | `--accounts` | 1,000 |
//! | `TALLY_BENCH_BASELINE_EVENTS` | `--baseline-events` | events / 10, at most 100,000 |
//! | `TALLY_BENCH_BASELINE_CONNECTIONS` | `--baseline-connections` | `1,4` |
//! | `TALLY_BENCH_CONFIGS` | `--configs` | see [`DEFAULT_CONFIGS`] |
//! | `TALLY_BENCH_DUPLICATES` | `--duplicates` | 0 (share of events delivered twice) |
//! | `TALLY_BENCH_SEED` | `--seed` | 20260425 |
//! | `TALLY_BENCH_PROFILE=1` | `--profile` | off: per-statement server time (`pg_stat_statements`), WAL counters, client decode time, sampled `EXPLAIN ANALYZE` plans |
//!
//! A configuration is `STREAM:PARALLELxBATCH`, with STREAM one of
//! `shuffled` (the whole stream, shuffled), `ordered` (the whole stream in
//! commit order: every event applies, little coalescing) and `prefix` (the
//! baseline's events: the first `baseline-events` of the shuffled stream).
//! `sharded` is an experiment, not a Tally feature: the shuffled stream split
//! by row id into PARALLEL inputs, each applied at the same time by its own
//! `apply_lines` with one applier, so that appliers never share ledger rows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tally::apply::runner::apply_lines;
use tally::apply::{ApplyStats, Model};
use tally::ops::verify::verify_views;
use tally::pgcluster::{ClusterOptions, PgCluster};
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio_postgres::{Client, Statement};

const SOURCE_SCHEMA: &str = "
CREATE TABLE movements (
    id         bigint PRIMARY KEY,
    account_id int NOT NULL,
    amount     numeric(12,2) NOT NULL
)";

const VIEWS: &str = "
CREATE MATERIALIZED VIEW account_balance AS
SELECT account_id, SUM(amount) AS balance, COUNT(*) AS movements
FROM movements
GROUP BY account_id;";

const BASELINE_SCHEMA: &str = "
CREATE TABLE cdc_entries (
    id         bigint PRIMARY KEY,
    account_id int,
    amount     numeric(12,2),
    lsn        bigint,
    deleted    bool
);
CREATE TABLE aggregates (
    account_id int PRIMARY KEY,
    balance    numeric,
    movements  bigint
)";

/// The configurations run when `TALLY_BENCH_CONFIGS` is not set.
const DEFAULT_CONFIGS: &str = "prefix:1x4000,shuffled:1x4000,shuffled:2x4000,shuffled:4x4000,shuffled:1x1000,shuffled:1x10000,ordered:1x4000,sharded:2x4000,sharded:4x4000";

/// The batch size of `tally apply` when none is configured.
const DEFAULT_BATCH: usize = 4000;

// ---------------------------------------------------------------- settings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Shuffled,
    Ordered,
    Prefix,
    /// Experiment, not a Tally feature: the shuffled stream split by row id
    /// into PARALLEL inputs, each applied by its own `apply_lines` with one
    /// applier, all at once, so that no two appliers share a ledger row.
    Sharded,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Shuffled => "shuffled",
            Stream::Ordered => "ordered",
            Stream::Prefix => "prefix",
            Stream::Sharded => "sharded by row",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct RunSpec {
    stream: Stream,
    parallel: usize,
    batch: usize,
}

#[derive(Debug, Clone)]
struct Settings {
    events: usize,
    rows: usize,
    accounts: i32,
    baseline_events: usize,
    baseline_connections: Vec<usize>,
    configs: Vec<RunSpec>,
    duplicates: f64,
    seed: u64,
    /// Per-statement server times, WAL counters, client decode time and
    /// sampled EXPLAIN ANALYZE plans (slows the server a little).
    profile: bool,
}

impl Settings {
    fn load() -> Result<Settings> {
        let mut values: BTreeMap<String, String> = BTreeMap::new();
        for (name, variable) in [
            ("events", "TALLY_BENCH_EVENTS"),
            ("rows", "TALLY_BENCH_ROWS"),
            ("accounts", "TALLY_BENCH_ACCOUNTS"),
            ("baseline-events", "TALLY_BENCH_BASELINE_EVENTS"),
            ("baseline-connections", "TALLY_BENCH_BASELINE_CONNECTIONS"),
            ("configs", "TALLY_BENCH_CONFIGS"),
            ("duplicates", "TALLY_BENCH_DUPLICATES"),
            ("seed", "TALLY_BENCH_SEED"),
            ("profile", "TALLY_BENCH_PROFILE"),
        ] {
            if let Ok(value) = std::env::var(variable) {
                values.insert(name.to_string(), value);
            }
        }
        // Arguments win over the environment. `cargo bench` adds `--bench`.
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                continue; // a name filter; there is only one benchmark
            };
            if name == "bench" {
                continue;
            }
            if name == "profile" {
                values.insert(name.to_string(), "1".to_string());
                continue;
            }
            let (name, value) = match name.split_once('=') {
                Some((name, value)) => (name.to_string(), value.to_string()),
                None => (
                    name.to_string(),
                    args.next()
                        .ok_or_else(|| anyhow!("--{name} needs a value"))?,
                ),
            };
            values.insert(name, value);
        }
        let number = |name: &str, default: usize| -> Result<usize> {
            match values.get(name) {
                Some(text) => text
                    .replace('_', "")
                    .parse()
                    .with_context(|| format!("{name}: {text:?} is not a whole number")),
                None => Ok(default),
            }
        };
        let events = number("events", 1_000_000)?;
        let rows = number("rows", 100_000)?.max(1);
        let accounts = number("accounts", 1_000)?.clamp(1, i32::MAX as usize) as i32;
        let baseline_events = number("baseline-events", (events / 10).min(100_000))?.min(events);
        let baseline_connections = values
            .get("baseline-connections")
            .map(String::as_str)
            .unwrap_or("1,4")
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .with_context(|| format!("baseline-connections: {s:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let configs = values
            .get("configs")
            .map(String::as_str)
            .unwrap_or(DEFAULT_CONFIGS)
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(parse_spec)
            .collect::<Result<Vec<_>>>()?;
        let duplicates: f64 = match values.get("duplicates") {
            Some(text) => text
                .parse()
                .with_context(|| format!("duplicates: {text:?} is not a number"))?,
            None => 0.0,
        };
        if !(0.0..=1.0).contains(&duplicates) {
            bail!("duplicates must be between 0 and 1");
        }
        let seed = number("seed", 20_260_425)? as u64;
        let profile = values
            .get("profile")
            .is_some_and(|v| !matches!(v.as_str(), "" | "0" | "false" | "off"));
        if let Some(unknown) = values.keys().find(|k| {
            ![
                "events",
                "rows",
                "accounts",
                "baseline-events",
                "baseline-connections",
                "configs",
                "duplicates",
                "seed",
                "profile",
            ]
            .contains(&k.as_str())
        }) {
            bail!("unknown setting --{unknown}");
        }
        Ok(Settings {
            events,
            rows,
            accounts,
            baseline_events,
            baseline_connections,
            configs,
            duplicates,
            seed,
            profile,
        })
    }
}

fn parse_spec(text: &str) -> Result<RunSpec> {
    let text = text.trim();
    let (stream, shape) = text.split_once(':').unwrap_or(("shuffled", text));
    let stream = match stream {
        "shuffled" => Stream::Shuffled,
        "ordered" => Stream::Ordered,
        "prefix" => Stream::Prefix,
        "sharded" => Stream::Sharded,
        other => bail!("configuration {text:?}: unknown stream {other:?}"),
    };
    let (parallel, batch) = shape
        .split_once('x')
        .ok_or_else(|| anyhow!("configuration {text:?}: expected STREAM:PARALLELxBATCH"))?;
    Ok(RunSpec {
        stream,
        parallel: parallel.parse().context("parallel")?,
        batch: batch.parse().context("batch")?,
    })
}

// --------------------------------------------------------------- generator

/// What one event says about its row, for computing expected aggregates.
#[derive(Debug, Clone, Copy)]
struct EventMeta {
    id: u32,
    lsn: u64,
    /// `(account_id, amount in cents)`, `None` for a delete.
    after: Option<(i32, i64)>,
}

struct History {
    /// Debezium JSON, one per event, in commit order.
    lines: Vec<String>,
    meta: Vec<EventMeta>,
    /// Final state per row id (`None`: never created or deleted).
    rows: Vec<Option<(i32, i64)>>,
    creates: usize,
    updates: usize,
    account_moves: usize,
    deletes: usize,
}

fn cents_text(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

/// Parses `-12.30`, `7`, `0.5` into cents; errors on more precision.
fn parse_cents(text: &str) -> Result<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let mut fraction = fraction.to_string();
    while fraction.len() > 2 && fraction.ends_with('0') {
        fraction.pop();
    }
    if fraction.len() > 2 {
        bail!("{text} has more than two decimals");
    }
    while fraction.len() < 2 {
        fraction.push('0');
    }
    let value = whole.parse::<i64>().with_context(|| text.to_string())? * 100
        + fraction.parse::<i64>().with_context(|| text.to_string())?;
    Ok(if negative { -value } else { value })
}

/// A Debezium envelope as the PostgreSQL connector writes it (bare, with
/// `decimal.handling.mode=string`), plus Tally's `commit_lsn`.
fn envelope(op: char, id: u32, after: Option<(i32, i64)>, commit_lsn: u64, lsn: u64) -> String {
    let (before, after) = match after {
        Some((account, cents)) => (
            "null".to_string(),
            format!(
                r#"{{"id":{id},"account_id":{account},"amount":"{}"}}"#,
                cents_text(cents)
            ),
        ),
        None => (format!(r#"{{"id":{id}}}"#), "null".to_string()),
    };
    let ts = 1_766_000_000_000u64 + lsn / 1000;
    format!(
        r#"{{"before":{before},"after":{after},"source":{{"version":"2.7.3.Final","connector":"postgresql","name":"shop","ts_ms":{ts},"snapshot":"false","db":"shop","sequence":"[null,\"{lsn}\"]","schema":"public","table":"movements","txId":{tx},"lsn":{lsn},"xmin":null,"commit_lsn":{commit_lsn}}},"op":"{op}","ts_ms":{ts},"transaction":null}}"#,
        tx = commit_lsn / 100,
    )
}

fn generate(settings: &Settings) -> History {
    let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed);
    let mut history = History {
        lines: Vec::with_capacity(settings.events),
        meta: Vec::with_capacity(settings.events),
        rows: vec![None; settings.rows + 1],
        creates: 0,
        updates: 0,
        account_moves: 0,
        deletes: 0,
    };
    let mut next_lsn: u64 = 0x1_0000_0000;
    let amount = |rng: &mut rand::rngs::StdRng| rng.random_range(-50_000i64..=100_000);
    while history.lines.len() < settings.events {
        // One source transaction of 1 to 3 changes: the changes' LSNs, then
        // the commit's, all above everything before.
        let size = rng.random_range(1..=3usize);
        let start = next_lsn;
        next_lsn += 100;
        let commit_lsn = next_lsn;
        for i in 0..size {
            if history.lines.len() == settings.events {
                break;
            }
            let lsn = start + i as u64 * 10;
            let id = rng.random_range(1..=settings.rows as u32);
            let (op, after) = match history.rows[id as usize] {
                None => {
                    history.creates += 1;
                    let account = rng.random_range(1..=settings.accounts);
                    ('c', Some((account, amount(&mut rng))))
                }
                Some(_) if rng.random_bool(0.05) => {
                    history.deletes += 1;
                    ('d', None)
                }
                Some((account, _)) => {
                    history.updates += 1;
                    let account = if rng.random_bool(0.1) {
                        history.account_moves += 1;
                        rng.random_range(1..=settings.accounts)
                    } else {
                        account
                    };
                    ('u', Some((account, amount(&mut rng))))
                }
            };
            history.rows[id as usize] = after;
            history.lines.push(envelope(op, id, after, commit_lsn, lsn));
            history.meta.push(EventMeta { id, lsn, after });
        }
    }
    history
}

/// A delivery: the order in which events reach the applier, as indices
/// into the history, and the same lines joined into one text.
struct Delivery {
    order: Vec<u32>,
    text: String,
}

impl Delivery {
    fn new(history: &History, order: Vec<u32>) -> Delivery {
        let bytes: usize = order
            .iter()
            .map(|&i| history.lines[i as usize].len() + 1)
            .sum();
        let mut text = String::with_capacity(bytes);
        for &i in &order {
            text.push_str(&history.lines[i as usize]);
            text.push('\n');
        }
        Delivery { order, text }
    }

    /// The first `n` lines' byte length.
    fn prefix_bytes(&self, n: usize) -> usize {
        if n >= self.order.len() {
            return self.text.len();
        }
        self.text
            .match_indices('\n')
            .nth(n - 1)
            .map(|(at, _)| at + 1)
            .unwrap_or(0)
    }
}

/// Per account: (balance in cents, number of rows).
type Aggregates = BTreeMap<i32, (i64, i64)>;

/// The aggregates the view must hold after the given events, whatever
/// their order: per row, the event with the greatest key wins.
fn expected_after(history: &History, events: &[u32]) -> Aggregates {
    let mut latest: BTreeMap<u32, EventMeta> = BTreeMap::new();
    for &i in events {
        let event = history.meta[i as usize];
        match latest.get(&event.id) {
            Some(kept) if kept.lsn >= event.lsn => {}
            _ => {
                latest.insert(event.id, event);
            }
        }
    }
    let mut aggregates = Aggregates::new();
    for event in latest.values() {
        if let Some((account, cents)) = event.after {
            let entry = aggregates.entry(account).or_default();
            entry.0 += cents;
            entry.1 += 1;
        }
    }
    aggregates
}

fn compare(expected: &Aggregates, found: &Aggregates) -> Result<()> {
    let mut wrong = Vec::new();
    for (account, value) in expected {
        if found.get(account) != Some(value) {
            wrong.push(format!(
                "account {account}: expected {value:?}, found {:?}",
                found.get(account)
            ));
        }
    }
    for (account, value) in found {
        if !expected.contains_key(account) {
            wrong.push(format!(
                "account {account}: expected no row, found {value:?}"
            ));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        let shown: Vec<&String> = wrong.iter().take(5).collect();
        bail!("{} groups differ, e.g. {shown:?}", wrong.len())
    }
}

async fn read_aggregates(client: &Client, sql: &str) -> Result<Aggregates> {
    let mut out = Aggregates::new();
    for row in client.query(sql, &[]).await? {
        let account: i32 = row.get(0);
        let balance: Option<String> = row.get(1);
        let count: i64 = row.get(2);
        let cents = match balance {
            Some(text) => parse_cents(&text)?,
            None => 0,
        };
        if count == 0 {
            if cents != 0 {
                bail!("account {account}: no rows but a balance of {cents} cents");
            }
            continue;
        }
        out.insert(account, (cents, count));
    }
    Ok(out)
}

// ------------------------------------------------------------- the reader

/// Feeds the in-memory text to `apply_lines`, publishing how far it got.
struct ProgressReader<'a> {
    data: &'a [u8],
    position: usize,
    consumed: Arc<AtomicUsize>,
}

impl AsyncRead for ProgressReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &self.data[self.position..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.as_mut().consume_bytes(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncBufRead for ProgressReader<'_> {
    fn poll_fill_buf(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        Poll::Ready(Ok(&this.data[this.position..]))
    }

    fn consume(self: Pin<&mut Self>, amount: usize) {
        self.consume_bytes(amount);
    }
}

impl ProgressReader<'_> {
    fn consume_bytes(self: Pin<&mut Self>, amount: usize) {
        let this = self.get_mut();
        this.position = (this.position + amount).min(this.data.len());
        this.consumed.store(this.position, Ordering::Relaxed);
    }
}

/// Prints `label: done/total, rate` on stderr every few seconds until dropped.
struct Ticker(tokio::task::JoinHandle<()>);

impl Ticker {
    fn start(label: String, total: usize, done: impl Fn() -> usize + Send + 'static) -> Ticker {
        let began = Instant::now();
        Ticker(tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(5));
            interval.tick().await;
            loop {
                interval.tick().await;
                let done = done().min(total);
                let seconds = began.elapsed().as_secs_f64();
                eprintln!(
                    "  {label}: {done}/{total} events after {seconds:.0} s ({:.0} events/s)",
                    done as f64 / seconds
                );
            }
        }))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------- baseline

struct BaselineStatements {
    select: Statement,
    placeholder: Statement,
    upsert: Statement,
    add: Statement,
}

impl BaselineStatements {
    async fn prepare(client: &Client) -> Result<BaselineStatements> {
        Ok(BaselineStatements {
            select: client
                .prepare(
                    "SELECT account_id, amount::text, lsn, deleted FROM cdc_entries WHERE id = $1 FOR UPDATE",
                )
                .await?,
            placeholder: client
                .prepare(
                    "INSERT INTO cdc_entries (id, lsn, deleted) VALUES ($1, 0, true) ON CONFLICT (id) DO NOTHING",
                )
                .await?,
            upsert: client
                .prepare(
                    "INSERT INTO cdc_entries (id, account_id, amount, lsn, deleted)
                     VALUES ($1, $2, $3::text::numeric, $4, $5)
                     ON CONFLICT (id) DO UPDATE SET account_id = EXCLUDED.account_id,
                         amount = EXCLUDED.amount, lsn = EXCLUDED.lsn, deleted = EXCLUDED.deleted",
                )
                .await?,
            add: client
                .prepare(
                    "INSERT INTO aggregates (account_id, balance, movements)
                     VALUES ($1, $2::text::numeric, $3)
                     ON CONFLICT (account_id) DO UPDATE SET
                         balance = aggregates.balance + EXCLUDED.balance,
                         movements = aggregates.movements + EXCLUDED.movements",
                )
                .await?,
        })
    }
}

/// The fields the baseline needs from an event, parsed from its JSON.
struct BaselineEvent {
    id: i64,
    lsn: i64,
    after: Option<(i32, i64)>,
}

fn parse_baseline_event(line: &str) -> Result<BaselineEvent> {
    let value: serde_json::Value = serde_json::from_str(line)?;
    let lsn = value["source"]["lsn"]
        .as_i64()
        .ok_or_else(|| anyhow!("no source.lsn"))?;
    let after = &value["after"];
    if after.is_object() {
        let id = after["id"].as_i64().ok_or_else(|| anyhow!("no after.id"))?;
        let account = after["account_id"]
            .as_i64()
            .ok_or_else(|| anyhow!("no after.account_id"))? as i32;
        let amount = after["amount"]
            .as_str()
            .ok_or_else(|| anyhow!("no after.amount"))?;
        Ok(BaselineEvent {
            id,
            lsn,
            after: Some((account, parse_cents(amount)?)),
        })
    } else {
        let id = value["before"]["id"]
            .as_i64()
            .ok_or_else(|| anyhow!("no before.id"))?;
        Ok(BaselineEvent {
            id,
            lsn,
            after: None,
        })
    }
}

/// The essay's algorithm: one transaction per event. Returns whether the
/// event was applied (else it was dropped as not newer).
async fn baseline_event(
    client: &mut Client,
    statements: &BaselineStatements,
    event: &BaselineEvent,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut stored = tx.query_opt(&statements.select, &[&event.id]).await?;
    if stored.is_none() {
        // First sight of the row: a placeholder to lock, so that two
        // connections cannot both take the row for new.
        tx.execute(&statements.placeholder, &[&event.id]).await?;
        stored = tx.query_opt(&statements.select, &[&event.id]).await?;
    }
    let stored = stored.expect("the row exists once the placeholder is in");
    let stored_lsn: i64 = stored.get(2);
    if event.lsn <= stored_lsn {
        // Duplicate or stale: nothing to write.
        tx.rollback().await?;
        return Ok(false);
    }
    let deleted: bool = stored.get(3);
    let old = if deleted {
        None
    } else {
        let account: i32 = stored.get(0);
        let amount: String = stored.get(1);
        Some((account, parse_cents(&amount).expect("stored amount")))
    };
    let (account, amount) = match event.after {
        Some((account, cents)) => (Some(account), Some(cents_text(cents))),
        None => (None, None),
    };
    tx.execute(
        &statements.upsert,
        &[
            &event.id,
            &account,
            &amount,
            &event.lsn,
            &event.after.is_none(),
        ],
    )
    .await?;
    // Delta = new contribution - old contribution, per group, in group order.
    let mut deltas: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    if let Some((account, cents)) = old {
        let entry = deltas.entry(account).or_default();
        entry.0 -= cents;
        entry.1 -= 1;
    }
    if let Some((account, cents)) = event.after {
        let entry = deltas.entry(account).or_default();
        entry.0 += cents;
        entry.1 += 1;
    }
    for (account, (cents, count)) in deltas {
        if cents == 0 && count == 0 {
            continue;
        }
        tx.execute(&statements.add, &[&account, &cents_text(cents), &count])
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

struct RunResult {
    label: String,
    stream: &'static str,
    events: usize,
    parallel: usize,
    batch: Option<usize>,
    elapsed: Duration,
    applied: u64,
    coalesced: u64,
    dropped: u64,
    check: String,
    baseline: bool,
    profile: Option<String>,
    wal: Wal,
}

/// The cluster's WAL counters (`pg_stat_wal`), or their growth over a run.
#[derive(Debug, Clone, Copy, Default)]
struct Wal {
    bytes: f64,
    syncs: i64,
    sync_ms: f64,
}

impl Wal {
    /// Reads the counters, after `settle`: backends publish theirs when
    /// they exit (the run's connections are closed by then) or go idle.
    async fn read(cluster: &PgCluster, settle: Duration) -> Result<Wal> {
        tokio::time::sleep(settle).await;
        let admin = tally::db::connect(&cluster.url("postgres")).await?;
        let row = admin
            .query_one(
                "SELECT wal_bytes::float8, wal_sync, wal_sync_time FROM pg_stat_wal",
                &[],
            )
            .await?;
        Ok(Wal {
            bytes: row.get(0),
            syncs: row.get(1),
            sync_ms: row.get(2),
        })
    }

    fn since(self, before: Wal) -> Wal {
        Wal {
            bytes: self.bytes - before.bytes,
            syncs: self.syncs - before.syncs,
            sync_ms: self.sync_ms - before.sync_ms,
        }
    }

    fn describe(self) -> String {
        let average = if self.syncs > 0 {
            self.sync_ms / self.syncs as f64
        } else {
            0.0
        };
        format!(
            "{:.0} MB WAL, {} syncs, {average:.2} ms per sync",
            self.bytes / 1e6,
            self.syncs
        )
    }
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

async fn run_baseline(
    cluster: &PgCluster,
    history: &History,
    delivery: &Delivery,
    events: usize,
    connections: usize,
) -> Result<RunResult> {
    let name = format!("baseline_c{connections}");
    let url = block(|| cluster.create_database(&name))?;
    let admin = tally::db::connect(&url).await?;
    admin.batch_execute(BASELINE_SCHEMA).await?;
    admin.batch_execute("CHECKPOINT").await?;

    let lines: Arc<Vec<String>> = Arc::new(
        delivery.text[..delivery.prefix_bytes(events)]
            .lines()
            .map(str::to_string)
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let wal_before = Wal::read(cluster, Duration::ZERO).await?;
    let label = format!("baseline, {connections} connection(s)");
    eprintln!("{label}: {events} events, one transaction each");
    let ticker = {
        let done = done.clone();
        Ticker::start(label.clone(), events, move || done.load(Ordering::Relaxed))
    };
    let began = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let mut client = tally::db::connect(&url).await?;
        let statements = BaselineStatements::prepare(&client).await?;
        let lines = lines.clone();
        let next = next.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut applied = 0u64;
            let mut retries = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(line) = lines.get(i) else { break };
                let event = parse_baseline_event(line)?;
                loop {
                    match baseline_event(&mut client, &statements, &event).await {
                        Ok(was_applied) => {
                            applied += was_applied as u64;
                            break;
                        }
                        Err(err) if tally::db::is_transient(&err) && retries < 1_000_000 => {
                            retries += 1;
                        }
                        Err(err) => return Err(anyhow::Error::from(err)),
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(u64, u64), anyhow::Error>((applied, retries))
        }));
    }
    let mut applied = 0;
    let mut retries = 0;
    for worker in workers {
        let (a, r) = worker.await??;
        applied += a;
        retries += r;
    }
    let elapsed = began.elapsed();
    drop(ticker);
    let wal = Wal::read(cluster, Duration::from_millis(500))
        .await?
        .since(wal_before);

    let expected = expected_after(history, &delivery.order[..events]);
    let found = read_aggregates(
        &admin,
        "SELECT account_id, balance::text, movements FROM aggregates",
    )
    .await?;
    compare(&expected, &found).context("baseline aggregates differ from the expected")?;
    let mut check = format!("= expected ({} groups)", expected.len());
    if retries > 0 {
        let _ = write!(check, ", {retries} retries");
    }
    eprintln!(
        "{label}: {events} events in {:.1} s = {:.0} events/s; applied {applied}; aggregates {check}; {}",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        wal.describe()
    );
    Ok(RunResult {
        label: format!("baseline, {connections} conn"),
        stream: "prefix",
        events,
        parallel: connections,
        batch: None,
        elapsed,
        applied,
        coalesced: 0,
        dropped: events as u64 - applied,
        check,
        baseline: true,
        profile: None,
        wal,
    })
}

// ------------------------------------------------------------------- tally

#[allow(clippy::too_many_arguments)]
async fn run_tally(
    cluster: &PgCluster,
    source: &Client,
    model: &Arc<Model>,
    history: &History,
    delivery: &Delivery,
    events: usize,
    spec: RunSpec,
    index: usize,
    baseline_aggregates: Option<&Aggregates>,
    profiler: Option<&Profiler>,
) -> Result<RunResult> {
    let name = format!(
        "tally_{index}_{:?}_p{}_b{}",
        spec.stream, spec.parallel, spec.batch
    )
    .to_lowercase();
    let url = block(|| cluster.create_database(&name))?;
    let mut target = tally::db::connect(&url).await?;
    model.ensure_target_schema(&mut target).await?;
    target.batch_execute("CHECKPOINT").await?;

    let bytes = delivery.prefix_bytes(events);
    let data = &delivery.text.as_bytes()[..bytes];
    // The inputs: the stream, or for `sharded` one part per row-id shard.
    let shards: Vec<String> = if spec.stream == Stream::Sharded {
        let count = spec.parallel.max(1);
        let mut shards = vec![String::new(); count];
        for (line, &i) in delivery.text[..bytes].lines().zip(&delivery.order) {
            let shard = &mut shards[history.meta[i as usize].id as usize % count];
            shard.push_str(line);
            shard.push('\n');
        }
        shards
    } else {
        Vec::new()
    };
    let (parts, per_part_parallel): (Vec<&[u8]>, usize) = if shards.is_empty() {
        (vec![data], spec.parallel)
    } else {
        (shards.iter().map(|s| s.as_bytes()).collect(), 1)
    };
    let counters: Vec<Arc<AtomicUsize>> = parts
        .iter()
        .map(|_| Arc::new(AtomicUsize::new(0)))
        .collect();
    let label = format!(
        "tally {}, parallel {}, batch {}",
        spec.stream.name(),
        spec.parallel,
        spec.batch
    );
    eprintln!("{label}: {events} events");
    let ticker = {
        let counters = counters.clone();
        Ticker::start(label.clone(), events, move || {
            // Lines read so far, estimated from bytes (lines are about the
            // same length); the queue holds at most 2 x parallel batches.
            let consumed: usize = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
            (consumed as f64 / bytes as f64 * events as f64) as usize
        })
    };
    if let Some(profiler) = profiler {
        profiler.reset().await?;
    }
    let wal_before = Wal::read(cluster, Duration::ZERO).await?;
    let began = Instant::now();
    let runs = parts.iter().zip(&counters).map(|(part, consumed)| {
        let reader = ProgressReader {
            data: part,
            position: 0,
            consumed: consumed.clone(),
        };
        apply_lines(reader, &url, model.clone(), per_part_parallel, spec.batch)
    });
    let mut stats = ApplyStats::default();
    for part in futures::future::try_join_all(runs).await? {
        stats += part;
    }
    let elapsed = began.elapsed();
    drop(ticker);
    let wal = Wal::read(cluster, Duration::from_millis(500))
        .await?
        .since(wal_before);
    let profile = match profiler {
        Some(profiler) => {
            let mut text = profiler.report(&name, &label, elapsed).await?;
            text.push('\n');
            text.push_str(&time_client_side(
                model,
                &delivery.text[..bytes],
                spec.batch,
            ));
            text.push('\n');
            eprintln!("{text}");
            Some(text)
        }
        None => None,
    };

    // Checks: the view equals the aggregates of these events; for the whole
    // stream, `verify` against the source finds nothing; for the baseline's
    // events, the view equals the baseline's table.
    let expected = expected_after(history, &delivery.order[..events]);
    let found = read_aggregates(
        &target,
        "SELECT account_id, balance::text, movements FROM account_balance",
    )
    .await?;
    compare(&expected, &found).with_context(|| format!("{label}: the view is wrong"))?;
    let mut check = format!("view = expected ({} groups)", expected.len());
    if events == delivery.order.len() {
        let differences = verify_views(source, &target, model).await?;
        if !differences.is_empty() {
            bail!(
                "{label}: verify_views found {} differences: {:?}",
                differences.len(),
                &differences[..differences.len().min(5)]
            );
        }
        check.push_str("; verify_views: 0 differences");
    }
    if let Some(baseline) = baseline_aggregates {
        compare(baseline, &found).with_context(|| format!("{label}: differs from the baseline"))?;
        check.push_str("; = baseline aggregates");
    }
    if stats.dead_lettered > 0 {
        bail!("{label}: {} events dead-lettered", stats.dead_lettered);
    }
    eprintln!(
        "{label}: {events} events in {:.1} s = {:.0} events/s; {stats}; {check}; {}",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        wal.describe()
    );
    drop(target);
    let admin = tally::db::connect(&cluster.url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE \"{name}\""))
        .await?;
    Ok(RunResult {
        label: if spec.stream == Stream::Sharded {
            format!(
                "experiment: {} x tally parallel 1, batch {}",
                spec.parallel, spec.batch
            )
        } else {
            format!("tally, parallel {}, batch {}", spec.parallel, spec.batch)
        },
        stream: spec.stream.name(),
        events,
        parallel: spec.parallel,
        batch: Some(spec.batch),
        elapsed,
        applied: stats.applied,
        coalesced: stats.coalesced,
        dropped: stats.duplicates + stats.stale,
        check,
        baseline: false,
        profile,
        wal,
    })
}

// ----------------------------------------------------------------- profile

/// Server-side counters around one run (`--profile`): statements by total
/// time in the run's database, and the WAL the cluster wrote.
struct Profiler {
    admin: Client,
}

impl Profiler {
    async fn new(cluster: &PgCluster) -> Result<Profiler> {
        let admin = tally::db::connect(&cluster.url("postgres")).await?;
        admin
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
        Ok(Profiler { admin })
    }

    async fn reset(&self) -> Result<()> {
        self.admin
            .batch_execute("SELECT pg_stat_statements_reset(); SELECT pg_stat_reset_shared('wal')")
            .await?;
        Ok(())
    }

    async fn report(&self, database: &str, label: &str, elapsed: Duration) -> Result<String> {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n#### {label}: {:.1} s wall\n\n| statement | calls | exec ms total | exec ms/call | plan ms total | rows | WAL MB | WAL FPI | blocks hit / read / dirtied |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|",
            elapsed.as_secs_f64()
        );
        let rows = self
            .admin
            .query(
                "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 110), calls, total_exec_time,
                        mean_exec_time, total_plan_time, rows, wal_bytes::float8 / 1e6, wal_fpi,
                        shared_blks_hit, shared_blks_read, shared_blks_dirtied
                 FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                 WHERE d.datname = $1
                 ORDER BY total_exec_time DESC LIMIT 12",
                &[&database],
            )
            .await?;
        let mut total_exec = 0.0;
        for row in &rows {
            let query: String = row.get(0);
            let exec: f64 = row.get(2);
            total_exec += exec;
            let _ = writeln!(
                out,
                "| `{}` | {} | {:.0} | {:.2} | {:.0} | {} | {:.1} | {} | {} / {} / {} |",
                query.replace('|', "\\|"),
                row.get::<_, i64>(1),
                exec,
                row.get::<_, f64>(3),
                row.get::<_, f64>(4),
                row.get::<_, i64>(5),
                row.get::<_, f64>(6),
                row.get::<_, i64>(7),
                row.get::<_, i64>(8),
                row.get::<_, i64>(9),
                row.get::<_, i64>(10),
            );
        }
        let wal = self
            .admin
            .query_one(
                "SELECT wal_records, wal_fpi, wal_bytes::float8 / 1e6, wal_write, wal_sync,
                        wal_write_time, wal_sync_time FROM pg_stat_wal",
                &[],
            )
            .await?;
        let _ = writeln!(
            out,
            "\nServer execution time of these statements: {:.1} s of {:.1} s. WAL: {} records, {} full-page images, {:.0} MB, {} writes ({:.1} s), {} syncs ({:.1} s).",
            total_exec / 1000.0,
            elapsed.as_secs_f64(),
            wal.get::<_, i64>(0),
            wal.get::<_, i64>(1),
            wal.get::<_, f64>(2),
            wal.get::<_, i64>(3),
            wal.get::<_, f64>(5) / 1000.0,
            wal.get::<_, i64>(4),
            wal.get::<_, f64>(6) / 1000.0,
        );
        Ok(out)
    }
}

/// Client CPU of what an applier does before it talks to the target:
/// parse, decode and coalesce, per batch, on one thread.
fn time_client_side(model: &Model, text: &str, batch: usize) -> String {
    use tally::apply::core::coalesce;
    use tally::apply::validate::{Decoded, decode};
    use tally::event::{Parsed, parse_event};
    let lines: Vec<&str> = text.lines().collect();
    let (mut parse, mut validate, mut merge) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for chunk in lines.chunks(batch) {
        let began = Instant::now();
        let events: Vec<_> = chunk
            .iter()
            .filter_map(|line| match parse_event(line) {
                Ok(Parsed::Event(event)) => Some(event),
                _ => None,
            })
            .collect();
        let parsed = Instant::now();
        let mut changes = Vec::new();
        let mut truncates = Vec::new();
        for event in &events {
            let table = &model.tables[&event.table];
            match decode(event, &table.meta, &table.stored_columns, &table.views) {
                Ok(Decoded::Rows(rows)) => changes.extend(rows),
                Ok(Decoded::Truncate(table, key)) => truncates.push((table, key)),
                Err(_) => {}
            }
        }
        let decoded = Instant::now();
        std::hint::black_box(coalesce(changes, truncates));
        merge += decoded.elapsed();
        validate += decoded - parsed;
        parse += parsed - began;
    }
    let n = lines.len() as f64;
    format!(
        "Client side, one thread, batches of {batch}: parse_event {:.2} s ({:.2} us/event), decode {:.2} s, coalesce {:.2} s; total {:.2} s for {} events.",
        parse.as_secs_f64(),
        parse.as_secs_f64() * 1e6 / n,
        validate.as_secs_f64(),
        merge.as_secs_f64(),
        (parse + validate + merge).as_secs_f64(),
        lines.len()
    )
}

/// One untimed run with `auto_explain` sampling plans (`EXPLAIN ANALYZE`,
/// buffers, WAL) of the apply statements; returns one plan per statement.
async fn explain_run(
    cluster: &PgCluster,
    model: &Arc<Model>,
    delivery: &Delivery,
    events: usize,
) -> Result<String> {
    let name = "tally_explain";
    let url = block(|| cluster.create_database(name))?;
    let admin = tally::db::connect(&cluster.url("postgres")).await?;
    for (setting, value) in [
        ("session_preload_libraries", "auto_explain"),
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_analyze", "on"),
        ("auto_explain.log_buffers", "on"),
        ("auto_explain.log_wal", "on"),
        ("auto_explain.log_verbose", "off"),
        ("auto_explain.sample_rate", "0.05"),
    ] {
        admin
            .batch_execute(&format!("ALTER DATABASE {name} SET {setting} = '{value}'"))
            .await?;
    }
    let mut target = tally::db::connect(&url).await?;
    model.ensure_target_schema(&mut target).await?;
    let log = cluster
        .data_dir()
        .parent()
        .map(|p| p.join("server.log"))
        .ok_or_else(|| anyhow!("no cluster directory"))?;
    let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
    let bytes = delivery.prefix_bytes(events);
    eprintln!(
        "explain run (auto_explain, untimed): {events} events, parallel 1, batch {DEFAULT_BATCH}"
    );
    let reader = ProgressReader {
        data: &delivery.text.as_bytes()[..bytes],
        position: 0,
        consumed: Arc::new(AtomicUsize::new(0)),
    };
    apply_lines(reader, &url, model.clone(), 1, DEFAULT_BATCH).await?;
    let text = std::fs::read(&log)?;
    let text = String::from_utf8_lossy(&text[log_start.min(text.len())..]).into_owned();
    // Entries start with a `LOG:  duration: … plan:` line; the plan follows
    // on lines that begin with a tab. Keep the slowest plan per statement.
    let mut plans: BTreeMap<String, (f64, String)> = BTreeMap::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(at) = line.find("duration: ") else {
            continue;
        };
        if !line.ends_with("plan:") {
            continue;
        }
        let duration: f64 = line[at + 10..]
            .split_whitespace()
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0.0);
        let mut plan = String::new();
        while let Some(next) = lines.peek() {
            if !next.starts_with('\t') {
                break;
            }
            plan.push_str(&next[1..]);
            plan.push('\n');
            lines.next();
        }
        let key: String = plan
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        if plans.get(&key).is_none_or(|(d, _)| *d < duration) {
            plans.insert(key, (duration, plan));
        }
    }
    drop(target);
    admin
        .batch_execute(&format!("DROP DATABASE {name}"))
        .await?;
    let mut out =
        String::from("\n### Sampled plans (auto_explain, the slowest sample of each statement)\n");
    for (duration, plan) in plans.values() {
        let _ = writeln!(out, "\n```\n-- {duration:.1} ms\n{}```", plan);
    }
    Ok(out)
}

// ----------------------------------------------------------------- helpers

/// Runs a blocking cluster call from async code.
fn block<T, E>(f: impl FnOnce() -> std::result::Result<T, E>) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    Ok(tokio::task::block_in_place(f)?)
}

fn machine() -> Vec<(String, String)> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    vec![
        ("CPU".into(), model),
        ("nproc".into(), nproc),
        ("memory".into(), memory),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().into(),
        ),
    ]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// -------------------------------------------------------------------- main

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(settings))
}

async fn bench(settings: Settings) -> Result<()> {
    let load_before = load_average();
    let date = date_utc();
    eprintln!(
        "apply_throughput: {} events over {} rows, {} accounts; baseline over the first {} (connections {:?}); load {load_before}",
        settings.events,
        settings.rows,
        settings.accounts,
        settings.baseline_events,
        settings.baseline_connections
    );

    // The history, untimed.
    let began = Instant::now();
    let history = generate(&settings);
    let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed ^ 0x5eed);
    let mut shuffled: Vec<u32> = (0..history.lines.len() as u32).collect();
    for i in 0..history.lines.len() as u32 {
        if settings.duplicates > 0.0 && rng.random_bool(settings.duplicates) {
            shuffled.push(i);
        }
    }
    shuffled.shuffle(&mut rng);
    let total_events = shuffled.len();
    let shuffled = Delivery::new(&history, shuffled);
    let ordered = settings
        .configs
        .iter()
        .any(|c| c.stream == Stream::Ordered)
        .then(|| Delivery::new(&history, (0..history.lines.len() as u32).collect()));
    let alive = history.rows.iter().filter(|r| r.is_some()).count();
    eprintln!(
        "generated {} events ({} creates, {} updates of which {} move account, {} deletes; {} rows alive at the end; {:.1} MB of JSON) in {:.1} s",
        history.lines.len(),
        history.creates,
        history.updates,
        history.account_moves,
        history.deletes,
        alive,
        shuffled.text.len() as f64 / 1e6,
        began.elapsed().as_secs_f64()
    );

    // The cluster: fsync on, synchronous_commit on (the default).
    // WAL sync timing is always on: it costs two clock reads per sync and
    // says how long each durable commit waited for the disk.
    let mut extra_settings = vec![("track_wal_io_timing", "on")];
    if settings.profile {
        extra_settings.extend([
            ("shared_preload_libraries", "pg_stat_statements"),
            ("pg_stat_statements.track", "all"),
            ("pg_stat_statements.track_planning", "on"),
            ("track_io_timing", "on"),
        ]);
    }
    let extra_settings: Vec<(String, String)> = extra_settings
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let cluster = tokio::task::spawn_blocking(|| {
        PgCluster::start_with(ClusterOptions {
            fsync: true,
            extra_settings,
            ..ClusterOptions::default()
        })
    })
    .await??;
    let profiler = match settings.profile {
        true => Some(Profiler::new(&cluster).await?),
        false => None,
    };
    let source_url = block(|| cluster.create_database("source"))?;
    let source = tally::db::connect(&source_url).await?;
    source.batch_execute(SOURCE_SCHEMA).await?;
    let mut server = Vec::new();
    let version: String = source.query_one("SELECT version()", &[]).await?.get(0);
    server.push(("PostgreSQL".to_string(), version));
    for setting in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_sync_method",
        "wal_level",
        "shared_buffers",
        "max_wal_size",
        "track_wal_io_timing",
    ] {
        let value: String = source
            .query_one(&format!("SHOW {setting}"), &[])
            .await?
            .get(0);
        server.push((setting.to_string(), value));
    }
    for (name, value) in &server {
        eprintln!("  {name}: {value}");
    }
    if server.iter().any(|(n, v)| n == "fsync" && v != "on")
        || server
            .iter()
            .any(|(n, v)| n == "synchronous_commit" && v != "on")
    {
        bail!("the cluster must run with fsync and synchronous_commit on");
    }

    // The source holds the history's final state, for `verify_views`.
    let (ids, accounts, amounts): (Vec<i64>, Vec<i32>, Vec<String>) = history
        .rows
        .iter()
        .enumerate()
        .filter_map(|(id, row)| row.map(|(a, c)| (id as i64, a, cents_text(c))))
        .fold((vec![], vec![], vec![]), |mut acc, (id, a, c)| {
            acc.0.push(id);
            acc.1.push(a);
            acc.2.push(c);
            acc
        });
    source
        .execute(
            "INSERT INTO movements SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[]::numeric[])",
            &[&ids, &accounts, &amounts],
        )
        .await?;
    let final_expected = expected_after(&history, &shuffled.order);
    let in_source = read_aggregates(
        &source,
        "SELECT account_id, SUM(amount)::text, COUNT(*) FROM movements GROUP BY account_id",
    )
    .await?;
    compare(&final_expected, &in_source).context("the generator's final state")?;

    let views = tally::views::parse_views(VIEWS)?;
    let model = Arc::new(Model::load(&source, views).await?);

    let mut results: Vec<RunResult> = Vec::new();

    // The baseline over the first events of the shuffled stream.
    let baseline_events = settings.baseline_events.min(total_events);
    let mut baseline_aggregates = None;
    if baseline_events > 0 {
        for &connections in &settings.baseline_connections {
            let result = run_baseline(
                &cluster,
                &history,
                &shuffled,
                baseline_events,
                connections.max(1),
            )
            .await?;
            results.push(result);
        }
        baseline_aggregates = Some(expected_after(&history, &shuffled.order[..baseline_events]));
    }

    for (index, spec) in settings.configs.iter().enumerate() {
        let (delivery, events) = match spec.stream {
            Stream::Shuffled | Stream::Sharded => (&shuffled, total_events),
            Stream::Prefix => {
                if baseline_events == 0 {
                    continue;
                }
                (&shuffled, baseline_events)
            }
            Stream::Ordered => (ordered.as_ref().expect("built"), history.lines.len()),
        };
        let compare_with = (spec.stream == Stream::Prefix)
            .then_some(baseline_aggregates.as_ref())
            .flatten();
        let result = run_tally(
            &cluster,
            &source,
            &model,
            &history,
            delivery,
            events,
            *spec,
            index,
            compare_with,
            profiler.as_ref(),
        )
        .await?;
        results.push(result);
    }
    let plans = match settings.profile {
        true => Some(explain_run(&cluster, &model, &shuffled, total_events).await?),
        false => None,
    };
    drop(profiler);

    let load_after = load_average();
    drop(source);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;

    // The report.
    let mut out = String::new();
    let _ = writeln!(out, "## apply_throughput\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    for (name, value) in machine() {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    for (name, value) in &server {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    let _ = writeln!(out, "| date | {date} |");
    let _ = writeln!(
        out,
        "| load average (1, 5, 15 min) | before {load_before}; after {load_after} |"
    );
    let _ = writeln!(
        out,
        "| events | {} ({} creates, {} updates, {} deletes; {:.0}% duplicates added) |",
        thousands(total_events),
        thousands(history.creates),
        thousands(history.updates),
        thousands(history.deletes),
        settings.duplicates * 100.0
    );
    let _ = writeln!(
        out,
        "| rows, accounts | {}, {} |",
        thousands(settings.rows),
        thousands(settings.accounts as usize)
    );
    let _ = writeln!(
        out,
        "| baseline events | first {} of the shuffled stream |",
        thousands(baseline_events)
    );
    let _ = writeln!(out, "| seed | {} |", settings.seed);

    let baseline_rate = results
        .iter()
        .find(|r| r.baseline && r.parallel == 1)
        .or_else(|| results.iter().find(|r| r.baseline))
        .map(RunResult::rate);
    let _ = writeln!(
        out,
        "\n| run | stream | events | connections | batch | elapsed (s) | events/s | vs baseline (1 conn) | applied | coalesced | dropped (dup + stale) | WAL MB | WAL syncs (avg ms) | check |"
    );
    let _ = writeln!(
        out,
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    );
    for r in &results {
        let ratio = baseline_rate
            .map(|b| format!("{:.1}x", r.rate() / b))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {:.0} | {} ({:.2}) | {} |",
            r.label,
            r.stream,
            thousands(r.events),
            r.parallel,
            r.batch
                .map(|b| b.to_string())
                .unwrap_or_else(|| "1 event".into()),
            r.elapsed.as_secs_f64(),
            thousands(r.rate().round() as usize),
            ratio,
            thousands(r.applied as usize),
            thousands(r.coalesced as usize),
            thousands(r.dropped as usize),
            r.wal.bytes / 1e6,
            thousands(r.wal.syncs.max(0) as usize),
            if r.wal.syncs > 0 {
                r.wal.sync_ms / r.wal.syncs as f64
            } else {
                0.0
            },
            r.check
        );
    }
    let tally_runs: Vec<&RunResult> = results
        .iter()
        .filter(|r| !r.baseline && r.stream == "shuffled")
        .collect();
    if let Some(best) = tally_runs
        .iter()
        .max_by(|a, b| a.rate().total_cmp(&b.rate()))
    {
        let _ = writeln!(
            out,
            "\nBest Tally run on the shuffled stream: {} events/s ({}).",
            thousands(best.rate().round() as usize),
            best.label
        );
    }
    if let Some(default) = tally_runs
        .iter()
        .find(|r| r.parallel == 1 && r.batch == Some(DEFAULT_BATCH))
    {
        let _ = writeln!(
            out,
            "Default (parallel 1, batch {DEFAULT_BATCH}) on the shuffled stream: {} events/s.",
            thousands(default.rate().round() as usize)
        );
    }
    if settings.profile {
        let _ = writeln!(
            out,
            "\n### Profile (pg_stat_statements and pg_stat_wal per run; the server ran with tracking on)"
        );
        for r in &results {
            if let Some(profile) = &r.profile {
                out.push_str(profile);
            }
        }
        if let Some(plans) = &plans {
            out.push_str(plans);
        }
    }
    println!("{out}");
    Ok(())
}
