//! The `tally` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use tally::apply::consumer::{ConsumeOptions, consume_all};
use tally::apply::runner::apply_lines_counted;
use tally::apply::{ApplyStats, Model};
use tally::config::{Config, TransportKind, redact_url};
use tally::event::TableName;
use tally::ops::bootstrap::RowOp;
use tally::ops::recalc::recalc;
use tally::ops::replay::{DirectApply, ReplaySink, find_table, replay};
use tally::ops::verify::{VerifyOptions, render_full, repair as repair_drift, verify_all};
use tally::progress::{Counter, Reporter};
use tally::transport::chaos::ChaosSubscription;
use tally::transport::embedded::EmbeddedSubscription;
use tally::transport::file::LinesPublisher;
use tally::transport::file::open_input;
use tally::transport::nats::NatsTransport;
use tally::transport::{AnyPublisher, DynSubscription};

/// Tally keeps SQL-defined aggregates (sums, counts, averages, ratios) of a
/// PostgreSQL database exactly right in a target database, from change
/// events that may arrive late, twice and out of order.
#[derive(Parser)]
#[command(name = "tally", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The configuration file: views = "views.sql", [source] url,
    /// [target] url, [transport] kind. Environment variables
    /// TALLY_SOURCE_URL, TALLY_TARGET_URL, TALLY_VIEWS override it.
    #[arg(long, short, default_value = "tally.toml", value_name = "FILE")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Apply Debezium JSON change events to the target's ledger and view
    /// tables: from a file (one per line), or, without --input, from the
    /// configured transport ([transport] kind = "nats") until Ctrl-C or
    /// SIGTERM. Run as many `tally apply` processes as you like; they share
    /// the work.
    ///
    /// Events may come in any order, more than once: each row change is
    /// counted once, stale and duplicate deliveries are dropped, malformed
    /// events go to tally.dead_letters with the reason.
    Apply {
        #[command(flatten)]
        config: ConfigArg,
        /// Read events from FILE, or from stdin with `-`. Without it, events
        /// come from the configured transport.
        #[arg(long, short, value_name = "FILE|-")]
        input: Option<PathBuf>,
        /// Exit with status 2 if any event was dead-lettered.
        #[arg(long)]
        strict: bool,
        /// Run N appliers at once, each on its own target connection.
        #[arg(long, default_value_t = 1, value_name = "N")]
        parallel: usize,
        /// Events per target transaction (default: [apply] batch_size, 4000).
        #[arg(long, value_name = "N")]
        batch_size: Option<usize>,
    },
    /// The whole idea in one command: a private PostgreSQL, the essay's
    /// invoices and views, the pipeline, and a web page to edit invoices
    /// and watch the views (with a chaos switch and a verify button).
    /// Needs only PostgreSQL's server package. Ctrl-C stops and removes
    /// everything.
    Demo {
        /// Where to serve the page (loopback only: the demo has no auth).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// An existing source database (wal_level = logical) instead of a
        /// private cluster; needs --target too.
        #[arg(long, value_name = "URL", requires = "target")]
        source: Option<String>,
        /// An existing target database; needs --source too.
        #[arg(long, value_name = "URL", requires = "source")]
        target: Option<String>,
        /// Play the scripted story in the terminal instead (invoice 2
        /// created, updated, deleted; a burst of 10,000 transactions).
        #[arg(long)]
        story: bool,
    },
    /// Serve the views: GET /api/views, /api/views/NAME?group_col=value,
    /// /api/stream (Server-Sent Events on every change), /metrics
    /// (Prometheus), /healthz. Listens on loopback unless given a token.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// Require `Authorization: Bearer TOKEN` on every request but
        /// /healthz; needed to listen on a non-loopback address.
        #[arg(
            long,
            env = "TALLY_AUTH_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true
        )]
        auth_token: Option<String>,
    },
    /// Capture and apply in one process, joined by an in-process queue
    /// (or by NATS when [transport] kind = "nats"): the source's changes
    /// flow into the views within milliseconds. The slot is confirmed only
    /// up to what the target has committed (or NATS has stored), so a crash
    /// loses nothing. Stop with Ctrl-C or SIGTERM.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Appliers running at once, each on its own target connection.
        #[arg(long, default_value_t = 2, value_name = "N")]
        parallel: usize,
    },
    /// Stream the source's changes (logical replication) as Debezium JSON
    /// events: to the configured transport ([transport] kind = "nats"), or
    /// with --output as lines to a file or stdout. Creates the publication
    /// and the replication slot if missing; resumes where the slot was
    /// confirmed. Stop with Ctrl-C or SIGTERM.
    Capture {
        #[command(flatten)]
        config: ConfigArg,
        /// Append events to FILE, or write them to stdout with `-`, instead
        /// of publishing them to the configured transport.
        #[arg(long, short, value_name = "FILE|-")]
        output: Option<PathBuf>,
    },
    /// Emit the rows that exist now as `op: "r"` events, read in a snapshot
    /// consistent with a new replication slot; `tally capture` then streams
    /// from that slot, and the two together converge exactly. Resumable:
    /// run it again after an interruption to continue.
    Bootstrap {
        #[command(flatten)]
        config: ConfigArg,
        /// Append events to FILE, or write them to stdout with `-`, instead
        /// of publishing them to the configured transport.
        #[arg(long, short, value_name = "FILE|-")]
        output: Option<PathBuf>,
        /// Where progress is kept between runs.
        #[arg(long, default_value = "tally-bootstrap.state", value_name = "FILE")]
        state: PathBuf,
    },
    /// Compare the ledger with the source's rows, every view with its
    /// ledger, and every view with its SELECT on the source; print the
    /// differences; exit 1 if there are any. Safe while the pipeline runs.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Show at most N differing rows per comparison (totals are always
        /// complete).
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: usize,
        /// Fix the drift found (replay the rows, delete the extra ones,
        /// rebuild the views from the ledger), then verify again.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Re-send the current rows of a source table (those matching --where)
    /// with a key that beats every change already in them and loses to
    /// every later one: to the transport, to --output, or, with the embedded
    /// transport, straight into the target. Safe while the pipeline runs.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// The source table (`name` or `schema.name`).
        #[arg(long, value_name = "TABLE")]
        table: String,
        /// Only rows matching this SQL condition, run in a READ ONLY
        /// transaction on the source.
        #[arg(long = "where", value_name = "SQL")]
        filter: Option<String>,
        /// Send the rows as this operation: c (create), u (update), d
        /// (delete); default r (a snapshot read).
        #[arg(long, value_name = "c|u|d")]
        op: Option<String>,
        /// Append events to FILE, or write them to stdout with `-`.
        #[arg(long, short, value_name = "FILE|-")]
        output: Option<PathBuf>,
    },
    /// Delete ledger tombstones below the horizon no deliverable event can
    /// be under (the slots' confirmed LSN; with NATS, only when nothing is
    /// left unacknowledged); report how many and the horizon.
    Vacuum {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Slot lag, messages waiting in the transport, the last key applied
    /// per table, dead letters, rows per view.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the status as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild view tables from the ledger, one view per transaction,
    /// locking out only that view's appliers meanwhile.
    Recalc {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this view.
        #[arg(long, value_name = "NAME")]
        view: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its own story; its logs would only interleave.
    // Client libraries' own info lines (every NOTICE, every reconnect
    // attempt) would drown Tally's, which say the same once.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info,async_nats=warn,tokio_postgres=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("cannot start the async runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_text(&err));
            ExitCode::FAILURE
        }
    }
}

/// The config and the tables the views read, for the commands that read
/// the source's changes.
fn capture_setup(config_path: &std::path::Path) -> Result<(Config, Vec<TableName>)> {
    let config = Config::load(config_path)?;
    let views = tally::views::load_views(&config.views)?;
    let mut tables: Vec<_> = views.iter().map(|v| v.source.clone()).collect();
    tables.sort();
    tables.dedup();
    Ok((config, tables))
}

/// Where captured events go: `--output`, else the configured transport.
async fn open_publisher(config: &Config, output: Option<PathBuf>) -> Result<AnyPublisher> {
    match (output, config.transport.kind) {
        (Some(output), _) => Ok(AnyPublisher::Lines(
            LinesPublisher::open(&output)
                .await
                .with_context(|| format!("cannot open output {}", output.display()))?,
        )),
        (None, TransportKind::Nats) => Ok(AnyPublisher::Nats(Box::new(
            NatsTransport::connect(&config.transport).await?.publisher(),
        ))),
        (None, TransportKind::Embedded) => anyhow::bail!(
            "nowhere to send events: pass --output FILE (or - for stdout), or set [transport] kind = \"nats\" and url in the config; to capture and apply in one process, use `tally run`"
        ),
    }
}

/// The name of the source database, as events carry it.
async fn database_name(source: &tokio_postgres::Client) -> Result<String> {
    Ok(source
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0))
}

/// A flag raised on Ctrl-C or SIGTERM, for the appliers.
fn stop_flag_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (raise, flag) = tokio::sync::watch::channel(false);
    let signal = shutdown_signal();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("stopping: finishing the batches in flight");
        let _ = raise.send(true);
    });
    flag
}

/// One subscription per applier on the configured transport, wrapped in
/// chaos when the config asks for it.
async fn subscriptions(
    config: &Config,
    parallel: usize,
    embedded: Option<&EmbeddedSubscription>,
) -> Result<Vec<Box<dyn DynSubscription>>> {
    let mut out: Vec<Box<dyn DynSubscription>> = Vec::new();
    let nats = match embedded {
        Some(_) => None,
        None => Some(NatsTransport::connect(&config.transport).await?),
    };
    for index in 0..parallel.max(1) {
        let plain: Box<dyn DynSubscription> = match (&nats, embedded) {
            (Some(nats), _) => Box::new(nats.subscription().await?),
            (None, Some(queue)) => Box::new(queue.clone()),
            (None, None) => unreachable!("one transport is chosen"),
        };
        out.push(match config.transport.chaos {
            Some(chaos) => {
                if index == 0 {
                    tracing::warn!(
                        "chaos is on (seed {}): deliveries are shuffled, duplicated and delayed",
                        chaos.seed
                    );
                }
                Box::new(ChaosSubscription::new(plain, chaos, index as u64))
            }
            None => plain,
        });
    }
    Ok(out)
}

fn consume_options(config: &Config, batch_size: usize) -> ConsumeOptions {
    ConsumeOptions {
        batch_size,
        linger: std::time::Duration::from_millis(config.apply.linger_ms),
        max_deliveries: config.transport.max_deliveries,
    }
}

/// `tally run`: capture into `publisher` and apply from `subscriptions`
/// until Ctrl-C or SIGTERM; then capture makes everything durable and
/// confirms the slot, and the appliers finish what they hold.
#[allow(clippy::too_many_arguments)]
async fn run_pipeline<P: tally::transport::Publisher + Send>(
    config: &Config,
    database: &str,
    mut publisher: P,
    subscriptions: Vec<Box<dyn DynSubscription>>,
    model: Arc<Model>,
    parallel: usize,
    stop_appliers: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(tally::capture::CaptureStats, ApplyStats)> {
    let target_url = config.target_url.clone();
    let options = consume_options(config, config.apply.batch_size);
    let appliers = tokio::spawn(async move {
        consume_all(
            subscriptions,
            &target_url,
            model,
            options,
            stop,
            Counter::default(),
        )
        .await
    });
    let mut appliers = std::pin::pin!(appliers);
    tracing::info!(
        "running: capture from slot \"{}\" with {parallel} appliers",
        config.capture.slot
    );
    let captured = tokio::select! {
        captured = tally::capture::stream_changes(
            &config.source_url,
            &config.capture,
            database,
            &mut publisher,
            shutdown_signal(),
        ) => captured?,
        stopped = &mut appliers => {
            let err = match stopped {
                Ok(Ok(_)) => anyhow::anyhow!("the appliers stopped"),
                Ok(Err(err)) => err.into(),
                Err(join) => anyhow::anyhow!("an applier panicked: {join}"),
            };
            return Err(err.context("applying to the target"));
        }
    };
    drop(publisher);
    let _ = stop_appliers.send(true);
    let applied = appliers.await??;
    Ok((captured, applied))
}

/// Completes on Ctrl-C or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is
/// first polled, so a signal that arrives in between is not lost (it would
/// otherwise kill the process with the default action).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
    let mut terminate = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}

/// The error and its causes, each said once (module errors often quote
/// their source in their own message already).
fn error_text(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Loads the config, the views and the source's table shapes, and makes
/// sure the target schema is in place. Returns the source and target
/// connections it opened.
async fn open(
    config_path: &std::path::Path,
) -> Result<(
    Config,
    tokio_postgres::Client,
    tokio_postgres::Client,
    Arc<Model>,
)> {
    let config = Config::load(config_path)?;
    let views = tally::views::load_views(&config.views)?;
    let source = tally::db::connect(&config.source_url).await?;
    let model = Model::load(&source, views).await?;
    let mut target = tally::db::connect(&config.target_url).await?;
    model.ensure_target_schema(&mut target).await?;
    Ok((config, source, target, Arc::new(model)))
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Apply {
            config,
            input,
            strict,
            parallel,
            batch_size,
        } => {
            let (config, _source, _target, model) = open(&config.config).await?;
            let started = Instant::now();
            let batch_size = batch_size.unwrap_or(config.apply.batch_size).max(1);
            let committed = Counter::default();
            let stats = match input {
                Some(input) => {
                    let reader = open_input(&input)
                        .await
                        .with_context(|| format!("cannot open input {}", input.display()))?;
                    let reporter = Reporter::start("events applied", committed.clone(), None);
                    let stats = apply_lines_counted(
                        reader,
                        &config.target_url,
                        model,
                        parallel,
                        batch_size,
                        committed,
                    )
                    .await
                    .with_context(|| format!("applying to {}", redact_url(&config.target_url)))?;
                    drop(reporter);
                    stats
                }
                None => {
                    if config.transport.kind == TransportKind::Embedded {
                        anyhow::bail!(
                            "nothing to apply from: pass --input FILE (or - for stdin), or set [transport] kind = \"nats\" and url in the config; to capture and apply in one process, use `tally run`"
                        );
                    }
                    let stop = stop_flag_on_signal();
                    let subscriptions = subscriptions(&config, parallel, None).await?;
                    tracing::info!(
                        "applying from NATS at {} with {parallel} applier{}; stop with Ctrl-C or SIGTERM",
                        redact_url(config.transport.url.as_deref().unwrap_or_default()),
                        if parallel == 1 { "" } else { "s" }
                    );
                    consume_all(
                        subscriptions,
                        &config.target_url,
                        model,
                        consume_options(&config, batch_size),
                        stop,
                        committed,
                    )
                    .await
                    .with_context(|| format!("applying to {}", redact_url(&config.target_url)))?
                }
            };
            let elapsed = started.elapsed().as_secs_f64();
            let events = stats.applied
                + stats.coalesced
                + stats.duplicates
                + stats.stale
                + stats.dead_lettered;
            println!("{stats}");
            println!(
                "{events} row events in {elapsed:.2} s ({:.0} events/s, {parallel} applier{})",
                events as f64 / elapsed.max(1e-9),
                if parallel == 1 { "" } else { "s" }
            );
            if strict && stats.dead_lettered > 0 {
                eprintln!(
                    "error: {} events were dead-lettered (see SELECT reason, payload FROM tally.dead_letters)",
                    stats.dead_lettered
                );
                return Ok(ExitCode::from(2));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            listen,
            source,
            target,
            story,
        } => {
            let options = tally::demo::DemoOptions {
                listen,
                source,
                target,
                story,
            };
            tally::demo::run(options, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            listen,
            auth_token,
        } => {
            // Refuse an exposed address before touching any database.
            tally::serve::auth::check_exposure(listen, auth_token.as_deref())?;
            let (config, _source, _target, model) = open(&config.config).await?;
            tally::serve::serve(&config, model, listen, auth_token, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config, parallel } => {
            let (config, mut source, mut target, model) = open(&config.config).await?;
            tally::ops::live_views::backfill(
                &mut source,
                &config.source_url,
                &mut target,
                &config.target_url,
                &model,
            )
            .await?;
            let tables: Vec<_> = model.tables.keys().cloned().collect();
            tally::capture::prepare_source(&source, &config.capture, &tables).await?;
            tally::capture::ensure_slot(&source, &config.source_url, &config.capture.slot).await?;
            let database = database_name(&source).await?;
            let (stop_appliers, stop) = tokio::sync::watch::channel(false);
            let (publisher, subscriptions) = match config.transport.kind {
                TransportKind::Embedded => {
                    let (publisher, queue) =
                        tally::transport::embedded::channel(parallel * 2, config.apply.batch_size);
                    let subscriptions = subscriptions(&config, parallel, Some(&queue)).await?;
                    (AnyPublisher::Embedded(publisher), subscriptions)
                }
                TransportKind::Nats => {
                    let publisher = NatsTransport::connect(&config.transport).await?.publisher();
                    let subscriptions = subscriptions(&config, parallel, None).await?;
                    (AnyPublisher::Nats(Box::new(publisher)), subscriptions)
                }
            };
            let (captured, applied) = run_pipeline(
                &config,
                &database,
                publisher,
                subscriptions,
                model,
                parallel,
                stop_appliers,
                stop,
            )
            .await?;
            eprintln!(
                "stopped: captured {} events, {applied}; slot confirmed up to {}",
                captured.events,
                tally::event::format_lsn(captured.confirmed_lsn)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bootstrap {
            config,
            output,
            state,
        } => {
            let (config, tables) = capture_setup(&config.config)?;
            let mut source = tally::db::connect(&config.source_url).await?;
            tally::capture::prepare_source(&source, &config.capture, &tables).await?;
            let mut publisher = open_publisher(&config, output).await?;
            let stats = tally::ops::bootstrap::bootstrap(
                &mut source,
                &config.source_url,
                &config.capture.slot,
                &tables,
                &state,
                &mut publisher,
            )
            .await?;
            eprintln!(
                "bootstrap {}: {} rows emitted at consistent point {}; now run `tally capture` to stream from slot \"{}\"",
                if stats.resumed {
                    "resumed and finished"
                } else {
                    "finished"
                },
                stats.rows,
                tally::event::format_lsn(stats.consistent_point),
                config.capture.slot
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Capture { config, output } => {
            let (config, tables) = capture_setup(&config.config)?;
            let source = tally::db::connect(&config.source_url).await?;
            tally::capture::prepare_source(&source, &config.capture, &tables).await?;
            tally::capture::ensure_slot(&source, &config.source_url, &config.capture.slot).await?;
            let database = database_name(&source).await?;
            let mut publisher = open_publisher(&config, output).await?;
            let stats = tally::capture::stream_changes(
                &config.source_url,
                &config.capture,
                &database,
                &mut publisher,
                shutdown_signal(),
            )
            .await?;
            eprintln!(
                "captured {} events in {} transactions; slot confirmed up to {}",
                stats.events,
                stats.transactions,
                tally::event::format_lsn(stats.confirmed_lsn)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            config,
            limit,
            repair,
            json,
        } => {
            let (config, mut source, mut target, model) = open(&config.config).await?;
            let options = VerifyOptions {
                slot: config.capture.slot.clone(),
                ..VerifyOptions::default()
            };
            let mut report = verify_all(
                &mut source,
                &config.source_url,
                &mut target,
                &model,
                &options,
            )
            .await?;
            let mut repaired = None;
            if repair && report.drift {
                if !json {
                    print!("{}", render_full(&report, limit));
                }
                let mut sink = ReplaySink::Direct(Box::new(
                    DirectApply::connect(&config.target_url, model.clone(), 1000).await?,
                ));
                let summary = repair_drift(&report, &mut sink, &mut target, &model).await?;
                eprintln!(
                    "repair: {} rows replayed, {} extra rows deleted, views rebuilt: {}; verifying again",
                    summary.rows_replayed,
                    summary.rows_deleted,
                    if summary.views_recalculated.is_empty() {
                        "none".to_string()
                    } else {
                        summary.views_recalculated.join(", ")
                    }
                );
                repaired = Some(summary);
                report = verify_all(
                    &mut source,
                    &config.source_url,
                    &mut target,
                    &model,
                    &options,
                )
                .await?;
            }
            if json {
                let value = serde_json::json!({ "report": report, "repair": repaired });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_full(&report, limit));
            }
            Ok(if report.drift {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Replay {
            config,
            table,
            filter,
            op,
            output,
        } => {
            let op = match op.as_deref() {
                None | Some("r") => RowOp::Read,
                Some("c") => RowOp::Create,
                Some("u") => RowOp::Update,
                Some("d") => RowOp::Delete,
                Some(other) => anyhow::bail!(
                    "--op {other:?}: not an operation; use c (create), u (update) or d (delete), or leave it out for r (read)"
                ),
            };
            let (config, mut source, _target, model) = open(&config.config).await?;
            let meta = find_table(&model, &table)?.clone();
            let mut sink = match (&output, config.transport.kind) {
                (None, TransportKind::Embedded) => ReplaySink::Direct(Box::new(
                    DirectApply::connect(
                        &config.target_url,
                        model.clone(),
                        config.apply.batch_size,
                    )
                    .await?,
                )),
                _ => ReplaySink::Transport(open_publisher(&config, output).await?),
            };
            let stats = replay(
                &mut source,
                &config.source_url,
                &meta,
                filter.as_deref(),
                op,
                &mut sink,
            )
            .await?;
            match sink.applied() {
                Some(applied) => eprintln!(
                    "replay: {} rows of {} at {} applied to the target ({applied})",
                    stats.rows,
                    meta.name,
                    tally::event::format_lsn(stats.consistent_point)
                ),
                None => eprintln!(
                    "replay: {} rows of {} sent at {}",
                    stats.rows,
                    meta.name,
                    tally::event::format_lsn(stats.consistent_point)
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Vacuum { config, json } => {
            let (config, source, mut target, _model) = open(&config.config).await?;
            let slots = tally::ops::vacuum::slots_horizon(&source).await?;
            let unacknowledged = match config.transport.kind {
                TransportKind::Embedded => None,
                TransportKind::Nats => Some(
                    NatsTransport::connect(&config.transport)
                        .await?
                        .pending()
                        .await?,
                ),
            };
            let horizon = tally::ops::vacuum::combine(slots, unacknowledged);
            let report = tally::ops::vacuum::vacuum(&mut target, horizon).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                match (&report.horizon, &report.skipped) {
                    (Some(horizon), _) => println!(
                        "vacuum: deleted {} tombstones below horizon {horizon}; {} kept",
                        report.deleted, report.kept
                    ),
                    (None, Some(reason)) => println!("vacuum: {reason}"),
                    (None, None) => {}
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config, json } => {
            let (config, source, target, model) = open(&config.config).await?;
            let transport = match config.transport.kind {
                TransportKind::Embedded => tally::ops::status::TransportStatus {
                    kind: "embedded".into(),
                    pending: None,
                    ack_pending: None,
                },
                TransportKind::Nats => {
                    let (pending, ack_pending) = NatsTransport::connect(&config.transport)
                        .await?
                        .backlog()
                        .await?;
                    tally::ops::status::TransportStatus {
                        kind: "nats".into(),
                        pending: Some(pending),
                        ack_pending: Some(ack_pending),
                    }
                }
            };
            let status = tally::ops::status::collect(
                &source,
                &target,
                &model,
                &config.capture.slot,
                transport,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", tally::ops::status::render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Recalc { config, view } => {
            let (_config, _source, mut target, model) = open(&config.config).await?;
            let rebuilt = recalc(&mut target, &model, view.as_deref()).await?;
            for view in &rebuilt {
                println!(
                    "{}: {} rows, {} changed",
                    view.view,
                    view.rows,
                    view.differences.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
