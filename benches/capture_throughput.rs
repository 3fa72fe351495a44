//! Capture throughput: `tally capture` against the server's own
//! `pg_recvlogical`, reading the same WAL (two slots created before the
//! changes) in the same run, plus the peak memory of `tally capture` while
//! one transaction of many rows streams through.
//!
//! ```sh
//! cargo bench --bench capture_throughput            # 1,000,000 rows
//! TALLY_BENCH_ROWS=100000 cargo bench --bench capture_throughput
//! ```

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally::pgcluster::{ClusterOptions, PgCluster};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn bindir() -> String {
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => {
            let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
                .expect("PostgreSQL binaries")
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect();
            versions.sort();
            versions
                .pop()
                .expect("a PostgreSQL version")
                .display()
                .to_string()
        }
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn count_lines(path: &Path) -> u64 {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
        .unwrap_or(0)
}

/// Runs `tally capture` until the slot is confirmed at `end_lsn`; returns
/// (seconds, events written, peak RSS in KiB).
async fn time_tally(
    config: &Path,
    slot: &str,
    output: &Path,
    source: &tokio_postgres::Client,
    end_lsn: &str,
) -> (f64, u64, u64) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "capture",
            "--config",
            config.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ])
        .env("TALLY_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tally capture");
    let mut peak = 0;
    loop {
        peak = peak.max(peak_rss_kib(child.id()));
        let done: bool = source
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&end_lsn, &slot],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    peak = peak.max(peak_rss_kib(child.id()));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    (elapsed, count_lines(output), peak)
}

fn time_pg_recvlogical(bindir: &str, url: &str, slot: &str, output: &Path, end_lsn: &str) -> f64 {
    let started = Instant::now();
    let status = Command::new(format!("{bindir}/pg_recvlogical"))
        .args([
            "-d",
            url,
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "-f",
            output.to_str().unwrap(),
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=tally",
            "--endpos",
            end_lsn,
        ])
        .stderr(Stdio::inherit())
        .status()
        .expect("run pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let rows = env_number("TALLY_BENCH_ROWS", 1_000_000) as i64;
    let cluster = tokio::task::spawn_blocking(|| {
        PgCluster::start_with(ClusterOptions {
            fsync: true,
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("start Postgres");
    let url = cluster.create_database("source").unwrap();
    let source = tally::db::connect(&url).await.unwrap();
    source
        .batch_execute(
            "CREATE TABLE movements (id bigint PRIMARY KEY, account integer NOT NULL, amount numeric(12,2) NOT NULL, note text);
             CREATE PUBLICATION tally FOR TABLE movements;",
        )
        .await
        .unwrap();
    // Each slot in a transaction of its own (a slot cannot be created in a
    // transaction that has written).
    for slot in ["tally_a", "reference_a", "tally_b", "reference_b"] {
        source
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("views.sql"), "CREATE MATERIALIZED VIEW balance AS SELECT account, SUM(amount) AS balance FROM movements GROUP BY account;").unwrap();
    let config_for = |slot: &str| {
        let config = dir.path().join(format!("{slot}.toml"));
        std::fs::write(
            &config,
            format!("views = \"views.sql\"\n[source]\nurl = \"{url}\"\n[target]\nurl = \"{url}\"\n[capture]\nslot = \"{slot}\"\n"),
        )
        .unwrap();
        config
    };

    // The workload: many small transactions, then one transaction with
    // `rows` rows (inserts), all in the WAL both slots read.
    eprintln!("writing {rows} rows in transactions of 100, then {rows} rows in one transaction…");
    let small = rows;
    let started = Instant::now();
    let mut first = 0i64;
    while first < small {
        let last = (first + 10_000).min(small);
        let mut batch = String::new();
        for start in (first..last).step_by(100) {
            batch.push_str(&format!(
                "BEGIN; INSERT INTO movements SELECT g, g % 1000, (g % 10000) / 100.0, 'n' FROM generate_series({}, {}) g; COMMIT;",
                start + 1,
                (start + 100).min(last)
            ));
        }
        source
            .batch_execute(&batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        first = last;
    }
    source
        .batch_execute(&format!(
            "INSERT INTO movements SELECT g, g % 1000, (g % 10000) / 100.0, 'big' FROM generate_series({}, {}) g",
            small + 1,
            small + rows
        ))
        .await
        .unwrap();
    let end_lsn: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "workload written in {:.1} s; WAL end {end_lsn}",
        started.elapsed().as_secs_f64()
    );
    let events = (small + rows) as f64;

    // Two rounds, alternating, so neither reader gains from going second
    // (warm caches); the table shows each round.
    let bindir = bindir();
    let mut rounds = Vec::new();
    let mut peak_kib = 0;
    for round in ["a", "b"] {
        let reference_out = dir.path().join(format!("reference_{round}.bin"));
        let reference_seconds = time_pg_recvlogical(
            &bindir,
            &url,
            &format!("reference_{round}"),
            &reference_out,
            &end_lsn,
        );
        let slot = format!("tally_{round}");
        let tally_out = dir.path().join(format!("tally_{round}.jsonl"));
        let (tally_seconds, tally_events, peak) =
            time_tally(&config_for(&slot), &slot, &tally_out, &source, &end_lsn).await;
        assert_eq!(tally_events as f64, events, "tally wrote every change once");
        peak_kib = peak_kib.max(peak);
        rounds.push((reference_seconds, tally_seconds));
    }
    let version: String = source
        .query_one("SELECT version()", &[])
        .await
        .unwrap()
        .get(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let date = String::from_utf8_lossy(&Command::new("date").arg("-u").output().unwrap().stdout)
        .trim()
        .to_string();
    println!("### Capture throughput ({date})\n");
    println!(
        "Machine: {} cores, {cpu}; {version}; fsync on.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "Workload: {small} rows in transactions of 100 rows, then one transaction of {rows} rows ({events} changes).\n"
    );
    println!(
        "| round | pg_recvlogical s | changes/s | tally capture s | changes/s | tally / pg_recvlogical |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (round, (reference, tally)) in rounds.iter().enumerate() {
        println!(
            "| {} | {reference:.2} | {:.0} | {tally:.2} | {:.0} | {:.2} |",
            round + 1,
            events / reference,
            events / tally,
            reference / tally
        );
    }
    println!(
        "\npg_recvlogical writes pgoutput's binary messages as they come; tally capture decodes them into Debezium JSON lines and fsyncs before confirming the slot."
    );
    println!(
        "\nPeak RSS of `tally capture` over the run, including the {rows}-row transaction: {:.1} MiB.",
        peak_kib as f64 / 1024.0
    );
}
