//! Prometheus metrics: the process's recorder and `GET /metrics`.
//!
//! Apply and capture record through the `metrics` facade (a no-op until a
//! recorder is installed, so `tally run` without a server pays nothing).
//! The server installs `metrics-exporter-prometheus`'s recorder without
//! its own HTTP listener and renders it in our handler, behind the same
//! auth as the API. Since appliers may be other processes, the endpoint
//! adds gauges read from the databases at scrape time, which hold for the
//! whole pipeline: dead letters in the target, and the slot's distance
//! behind the source's WAL.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::Shared;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];

pub const DEAD_LETTERS_SQL: &str = "SELECT count(*) FROM tally.dead_letters";
pub const SLOT_LAG_SQL: &str = "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1";

/// Installs the recorder once per process; returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tally_apply_batch_size".into()),
                        BATCH_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics shows only database gauges"
                );
            }
            // Histograms keep raw samples until upkeep folds them in.
            let upkeep = handle.clone();
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

/// The sum of every series of `name` in a rendered exposition.
pub fn value(rendered: &str, name: &str) -> f64 {
    rendered
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value)
}

/// Dead letters in the target and the slot's lag in bytes; `None` where a
/// database does not answer.
pub async fn database_gauges(state: &Shared) -> (Option<i64>, Option<f64>) {
    let dead = match state.target.get().await {
        Ok(target) => target
            .query_one(DEAD_LETTERS_SQL, &[])
            .await
            .ok()
            .map(|r| r.get(0)),
        Err(_) => None,
    };
    let lag = match state.source.get().await {
        Ok(source) => source
            .query_opt(SLOT_LAG_SQL, &[&state.slot])
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<f64>>(0)),
        Err(_) => None,
    };
    (dead, lag)
}

/// `GET /metrics`.
pub async fn endpoint(State(state): State<Shared>) -> Response {
    let mut text = install().render();
    let (dead, lag) = database_gauges(&state).await;
    if let Some(dead) = dead {
        text.push_str(&format!(
            "# HELP tally_dead_letters Events in the target's tally.dead_letters.\n# TYPE tally_dead_letters gauge\ntally_dead_letters {dead}\n"
        ));
    }
    if let Some(lag) = lag {
        text.push_str(&format!(
            "# HELP tally_slot_lag_bytes WAL the replication slot has not confirmed yet.\n# TYPE tally_slot_lag_bytes gauge\ntally_slot_lag_bytes {lag}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_series_by_exact_name() {
        let text = "# TYPE a counter\na 2\na{x=\"1\"} 3\nab 100\n";
        assert_eq!(super::value(text, "a"), 5.0);
        assert_eq!(super::value(text, "missing"), 0.0);
    }
}
