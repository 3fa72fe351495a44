//! `tally demo`: the whole idea in one command. A private PostgreSQL
//! (source and target databases, or existing ones with `--source` and
//! `--target`), the essay's `invoices` table and views, the pipeline with
//! the embedded transport behind a chaos switch, and the web page on
//! 127.0.0.1:8080: edit invoices on the left, watch the views on the
//! right. `--story` plays the older scripted terminal story instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;

use crate::apply::consumer::{ConsumeOptions, consume_all};
use crate::apply::{ApplyError, Model};
use crate::capture::{self, CaptureError};
use crate::config::{CaptureConfig, ChaosConfig};
use crate::db::{self, ConnectError, describe};
use crate::ops::verify::{render_report, verify_views};
use crate::pgcluster::{ClusterError, PgCluster};
use crate::progress::Counter;
use crate::serve::{self, DemoControls, ServeError};
use crate::transport::chaos::ChaosSubscription;
use crate::transport::embedded;

/// What `tally demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the page is served.
    pub listen: SocketAddr,
    /// Existing databases instead of a private cluster (both or neither).
    pub source: Option<String>,
    pub target: Option<String>,
    /// The scripted terminal story instead of the page.
    pub story: bool,
}

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("starting the demo's private PostgreSQL: {0}")]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Views(#[from] crate::views::ViewError),
    #[error("{0}")]
    Sql(String),
    #[error("the view did not reach the source's value within 10 s")]
    Timeout,
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("--source and --target go together: pass both, or neither for a private PostgreSQL")]
    HalfExisting,
}

impl From<tokio_postgres::Error> for DemoError {
    fn from(err: tokio_postgres::Error) -> Self {
        DemoError::Sql(describe(&err))
    }
}

const SOURCE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS invoices (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    customer_id integer NOT NULL,
    total       numeric(20,2) NOT NULL
)";

const VIEWS: &str = "
CREATE MATERIALIZED VIEW invoice_total AS
SELECT SUM(total) AS total, COUNT(*) AS invoices FROM invoices;

CREATE MATERIALIZED VIEW customer_totals AS
SELECT customer_id, SUM(total) AS total, COUNT(*) AS invoices
FROM invoices GROUP BY customer_id;";

/// Waits until the view's total equals the source's, and says how long
/// that took.
async fn show(step: &str, source: &Client, target: &Client) -> Result<(), DemoError> {
    let started = Instant::now();
    let expected: Option<String> = source
        .query_one("SELECT SUM(total)::text FROM invoices", &[])
        .await?
        .get(0);
    loop {
        let found: Option<String> = target
            .query_one("SELECT total::text FROM invoice_total", &[])
            .await?
            .get(0);
        if found == expected {
            println!(
                "  {step:<44} source SUM = {:>12}   view = {:>12}   ({} ms)",
                expected.as_deref().unwrap_or("NULL"),
                found.as_deref().unwrap_or("NULL"),
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(DemoError::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The databases of the demo; the cluster, when private, lives as long
/// as this.
struct Databases {
    cluster: Option<PgCluster>,
    source_url: String,
    target_url: String,
}

async fn databases(options: &DemoOptions) -> Result<Databases, DemoError> {
    match (&options.source, &options.target) {
        (Some(source), Some(target)) => Ok(Databases {
            cluster: None,
            source_url: source.clone(),
            target_url: target.clone(),
        }),
        (None, None) => {
            println!("Starting a private PostgreSQL (wal_level = logical)…");
            let cluster = tokio::task::spawn_blocking(PgCluster::start)
                .await
                .map_err(|e| DemoError::Sql(e.to_string()))??;
            let source_url = cluster.create_database("shop")?;
            let target_url = cluster.create_database("aggregates")?;
            Ok(Databases {
                cluster: Some(cluster),
                source_url,
                target_url,
            })
        }
        _ => Err(DemoError::HalfExisting),
    }
}

/// Capture and two appliers over the embedded queue, each applier behind
/// a chaos wrapper that `chaos` turns on and off.
struct Pipeline {
    model: Arc<Model>,
    stop: tokio::sync::oneshot::Sender<()>,
    capture: tokio::task::JoinHandle<Result<capture::CaptureStats, CaptureError>>,
    appliers: tokio::task::JoinHandle<Result<crate::apply::ApplyStats, ApplyError>>,
}

async fn start_pipeline(
    source: &Client,
    source_url: &str,
    target_url: &str,
    chaos: Arc<AtomicBool>,
) -> Result<Pipeline, DemoError> {
    source.batch_execute(SOURCE_SCHEMA).await?;
    let database: String = source
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    let views = crate::views::parse_views(VIEWS)?;
    let model = Model::load(source, views).await?;
    let mut target = db::connect(target_url).await?;
    model.ensure_target_schema(&mut target).await?;
    let model = Arc::new(model);

    let capture_config = CaptureConfig::default();
    let tables: Vec<_> = model.tables.keys().cloned().collect();
    capture::prepare_source(source, &capture_config, &tables).await?;
    capture::ensure_slot(source, source_url, &capture_config.slot).await?;
    let (mut sink, queue) = embedded::channel(4, 2000);
    let chaos_config = ChaosConfig {
        seed: rand::random(),
        duplicate: 0.3,
        delay: 0.4,
        max_delay_ms: 400,
    };
    let appliers = {
        let (target_url, model) = (target_url.to_string(), model.clone());
        // The appliers stop when capture stops and the queue drains.
        let (_never, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let subscriptions: Vec<_> = (0..2u64)
                .map(|i| {
                    ChaosSubscription::switchable(queue.clone(), chaos_config, i, chaos.clone())
                })
                .collect();
            consume_all(
                subscriptions,
                &target_url,
                model,
                ConsumeOptions::default(),
                stop,
                Counter::default(),
            )
            .await
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let source_url = source_url.to_string();
    let capture = tokio::spawn(async move {
        let result =
            capture::stream_changes(&source_url, &capture_config, &database, &mut sink, async {
                let _ = stopped.await;
            })
            .await;
        drop(sink);
        result
    });
    Ok(Pipeline {
        model,
        stop,
        capture,
        appliers,
    })
}

impl Pipeline {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.capture.await;
        let _ = self.appliers.await;
    }
}

/// Runs the demo until `stop` completes (Ctrl-C).
pub async fn run(
    options: DemoOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    if options.story {
        return run_story(options, stop).await;
    }
    let started = Instant::now();
    // Refuse a bad address before starting anything.
    let listener = serve::bind(options.listen, None).await?;
    crate::serve::metrics::install();
    let dbs = databases(&options).await?;
    let source = db::connect(&dbs.source_url).await?;
    let chaos = Arc::new(AtomicBool::new(false));
    let pipeline = start_pipeline(&source, &dbs.source_url, &dbs.target_url, chaos.clone()).await?;
    let state = serve::start_state(
        pipeline.model.clone(),
        &dbs.source_url,
        &dbs.target_url,
        &CaptureConfig::default().slot,
        None,
        Some(DemoControls { chaos }),
    )
    .await?;
    serve::demo_api::spawn_pipeline_panel(state.clone());
    let local = listener
        .local_addr()
        .map_err(|e| DemoError::Sql(e.to_string()))?;
    println!("Source:  {}", crate::config::redact_url(&dbs.source_url));
    println!("Target:  {}", crate::config::redact_url(&dbs.target_url));
    println!(
        "Tally demo is up in {:.1} s: open http://{local}/",
        started.elapsed().as_secs_f64()
    );
    println!(
        "Ctrl-C stops the demo{}.",
        if dbs.cluster.is_some() {
            " and removes the private PostgreSQL"
        } else {
            ""
        }
    );
    serve::run(listener, state, stop).await?;
    pipeline.stop().await;
    let private = dbs.cluster.is_some();
    drop(dbs);
    if private {
        println!("Stopped; the private PostgreSQL is removed.");
    } else {
        println!("Stopped.");
    }
    Ok(())
}

/// The scripted terminal story: the essay's invoice 2, then a burst of
/// concurrent writes, each checked against the source.
async fn run_story(
    options: DemoOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let dbs = databases(&options).await?;
    let (source_url, target_url) = (dbs.source_url.clone(), dbs.target_url.clone());
    let source = db::connect(&source_url).await?;
    let target = db::connect(&target_url).await?;
    let pipeline = start_pipeline(
        &source,
        &source_url,
        &target_url,
        Arc::new(AtomicBool::new(false)),
    )
    .await?;
    let model = pipeline.model.clone();

    println!("\nSource:  {source_url}\nTarget:  {target_url}");
    println!(
        "Views:   invoice_total (SUM, COUNT over all invoices), customer_totals (per customer)\n"
    );
    println!(
        "The essay's story: invoice 1 of 10, then invoice 2 created at 20, updated to 40, deleted."
    );
    let write = |sql: &'static str| {
        let source = &source;
        async move { source.batch_execute(sql).await }
    };
    write("INSERT INTO invoices (name, customer_id, total) VALUES ('first', 1, 10)").await?;
    show("create invoice 1 (10)", &source, &target).await?;
    write("INSERT INTO invoices (name, customer_id, total) VALUES ('second', 2, 20)").await?;
    show("create invoice 2 (20)", &source, &target).await?;
    write("UPDATE invoices SET total = 40 WHERE id = 2").await?;
    show("update invoice 2 to 40", &source, &target).await?;
    write("DELETE FROM invoices WHERE id = 2").await?;
    show("delete invoice 2", &source, &target).await?;

    println!("\nA burst: 4 writers, 2,500 transactions each (inserts, updates, deletes)…");
    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..4i32 {
        let url = source_url.clone();
        writers.push(tokio::spawn(async move {
            let client = db::connect(&url).await?;
            for i in 0..2500i32 {
                let id = 2 + (i * 4 + writer) % 3000;
                let sql = match i % 5 {
                    0 | 1 => "INSERT INTO invoices (name, customer_id, total) VALUES ('burst', $1 % 25, ($1 % 997) / 10.0)",
                    2 | 3 => "UPDATE invoices SET total = total + 1.25, customer_id = ($1 + customer_id) % 25 WHERE id = $1",
                    _ => "DELETE FROM invoices WHERE id = $1",
                };
                client.execute(sql, &[&id]).await?;
            }
            Ok::<(), DemoError>(())
        }));
    }
    for writer in writers {
        writer.await.map_err(|e| DemoError::Sql(e.to_string()))??;
    }
    let written = started.elapsed();
    show("after the burst", &source, &target).await?;
    println!(
        "  10,000 source transactions in {:.1} s; the view caught up {} ms after the last commit",
        written.as_secs_f64(),
        (started.elapsed() - written).as_millis()
    );
    let differences = verify_views(&source, &target, &model)
        .await
        .map_err(|e| DemoError::Sql(e.to_string()))?;
    print!(
        "  {}",
        render_report(&differences, model.views().count(), 10)
    );

    println!("\nThe pipeline keeps running: change `invoices` with psql at the source URL and");
    println!(
        "read the views at the target URL (SELECT * FROM customer_totals). Ctrl-C stops and removes everything."
    );
    stop.await;
    pipeline.stop().await;
    drop(dbs);
    println!("Stopped; the private PostgreSQL is removed.");
    Ok(())
}
