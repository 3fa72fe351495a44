//! Appliers fed by a transport subscription: take a batch, apply it in one
//! target transaction, acknowledge after the commit.
//!
//! When the target goes away the batch is refused (`nak`) so it comes back
//! later, and the applier waits for the target with backoff before taking
//! more work, so an outage neither loses events nor piles them up in
//! memory. An event delivered more than `max_deliveries` times is not tried
//! again but dead-lettered with the reason, so one poison event cannot
//! stall the pipeline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::sync::watch;

use super::{Applier, ApplyError, ApplyStats, Model};
use crate::config::redact_url;
use crate::progress::Counter;
use crate::transport::{Delivery, Subscription, TransportError};

/// How appliers take work from a subscription.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Events per target transaction at most.
    pub batch_size: usize,
    /// After the first event of a batch, how long to wait for more.
    pub linger: Duration,
    /// Deliveries after which an event is dead-lettered instead of tried.
    pub max_deliveries: u64,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            batch_size: 4000,
            linger: Duration::from_millis(5),
            max_deliveries: 20,
        }
    }
}

/// Waits before retrying, doubling up to a ceiling.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CEILING: Duration = Duration::from_secs(5);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::CEILING);
        now
    }
}

/// Completes when `stop` is raised; never, if its sender is gone without
/// raising it.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Connects an applier, retrying with backoff while the target is
/// unavailable; says so once when it starts failing and once when it is
/// back. Returns `None` if `stop` is raised meanwhile.
async fn connect_patiently(
    target_url: &str,
    model: &Arc<Model>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Applier>, ApplyError> {
    let mut backoff = Backoff::new();
    let mut failing_since: Option<Instant> = None;
    loop {
        match Applier::connect(target_url, model.clone()).await {
            Ok(applier) => {
                if let Some(since) = failing_since {
                    tracing::info!(
                        "target {} is reachable again after {:.1} s; applying",
                        redact_url(target_url),
                        since.elapsed().as_secs_f64()
                    );
                }
                return Ok(Some(applier));
            }
            Err(err) if err.is_unavailable() => {
                if failing_since.is_none() {
                    tracing::warn!("{err}; retrying with backoff until it is back");
                    failing_since = Some(Instant::now());
                }
            }
            Err(err) => return Err(err),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.step()) => {}
            _ = stopped(stop) => return Ok(None),
        }
    }
}

/// Runs one applier on `subscription` until the transport closes or `stop`
/// is raised; a batch in flight is finished and acknowledged first.
pub async fn consume<S: Subscription>(
    mut subscription: S,
    target_url: &str,
    model: Arc<Model>,
    options: &ConsumeOptions,
    mut stop: watch::Receiver<bool>,
    committed: Counter,
) -> Result<ApplyStats, ApplyError> {
    let mut total = ApplyStats::default();
    let Some(mut applier) = connect_patiently(target_url, &model, &mut stop).await? else {
        return Ok(total);
    };
    let mut transport_backoff = Backoff::new();
    let mut transport_failing = false;
    loop {
        if *stop.borrow() {
            return Ok(total);
        }
        let next = tokio::select! {
            next = subscription.next_batch(options.batch_size, options.linger) => next,
            _ = stopped(&mut stop) => return Ok(total),
        };
        let batch = match next {
            Ok(Some(batch)) => batch,
            Ok(None) => return Ok(total),
            Err(TransportError::Unavailable(reason)) => {
                if !transport_failing {
                    tracing::warn!("transport unavailable ({reason}); retrying with backoff");
                    transport_failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(transport_backoff.step()) => {}
                    _ = stopped(&mut stop) => return Ok(total),
                }
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        if transport_failing {
            tracing::info!("transport is back; applying");
            transport_failing = false;
            transport_backoff = Backoff::new();
        }
        let count = batch.len() as u64;
        match apply_batch(&mut applier, batch, options).await? {
            BatchOutcome::Applied(stats) => {
                total += stats;
                committed.add(count);
            }
            BatchOutcome::TargetUnavailable(err) => {
                tracing::warn!("{err}; the batch will be delivered again");
                let Some(reconnected) = connect_patiently(target_url, &model, &mut stop).await?
                else {
                    return Ok(total);
                };
                applier = reconnected;
            }
        }
    }
}

enum BatchOutcome {
    Applied(ApplyStats),
    TargetUnavailable(ApplyError),
}

/// Applies one batch and settles every delivery in it.
async fn apply_batch(
    applier: &mut Applier,
    batch: Vec<Delivery>,
    options: &ConsumeOptions,
) -> Result<BatchOutcome, ApplyError> {
    let (worn, fresh): (Vec<Delivery>, Vec<Delivery>) = batch
        .into_iter()
        .partition(|d| d.delivered > options.max_deliveries);
    let mut stats = ApplyStats::default();
    let outcome = async {
        if !worn.is_empty() {
            let payloads: Vec<&str> = worn.iter().map(|d| d.payload.as_str()).collect();
            let reason = format!(
                "delivered {} times without being applied (limit: [transport] max_deliveries = {}); earlier attempts failed or their applier stopped before acknowledging",
                worn.iter().map(|d| d.delivered).max().unwrap_or(0),
                options.max_deliveries
            );
            tracing::warn!("dead-lettering {} events: {reason}", worn.len());
            stats += applier.dead_letter(&payloads, &reason).await?;
        }
        if !fresh.is_empty() {
            let payloads: Vec<&str> = fresh.iter().map(|d| d.payload.as_str()).collect();
            stats += applier.apply_messages(&payloads).await?;
        }
        Ok::<_, ApplyError>(())
    }
    .await;
    let deliveries = worn.into_iter().chain(fresh);
    match outcome {
        Ok(()) => {
            settle_all(deliveries.map(|d| d.ack())).await;
            Ok(BatchOutcome::Applied(stats))
        }
        Err(err) if err.is_unavailable() => {
            settle_all(deliveries.map(|d| d.nak(Duration::from_millis(500)))).await;
            Ok(BatchOutcome::TargetUnavailable(err))
        }
        Err(err) => {
            // Give the events back at once so another applier (or the next
            // start) takes them; this applier stops with the error.
            settle_all(deliveries.map(|d| d.nak(Duration::ZERO))).await;
            Err(err)
        }
    }
}

/// Sends every acknowledgement; a lost one only means a redelivery, which
/// the ordering guard drops as a duplicate.
async fn settle_all<F>(settlements: impl Iterator<Item = F>)
where
    F: std::future::Future<Output = Result<(), TransportError>>,
{
    let results = join_all(settlements).await;
    if let Some(err) = results.into_iter().find_map(Result::err) {
        tracing::debug!("an acknowledgement was not sent ({err}); the event will come again");
    }
}

/// Runs one applier per subscription; returns the sum of their counters,
/// or the first error once all have stopped.
pub async fn consume_all<S: Subscription + 'static>(
    subscriptions: Vec<S>,
    target_url: &str,
    model: Arc<Model>,
    options: ConsumeOptions,
    stop: watch::Receiver<bool>,
    committed: Counter,
) -> Result<ApplyStats, ApplyError> {
    let mut handles = Vec::new();
    for subscription in subscriptions {
        let target_url = target_url.to_string();
        let model = model.clone();
        let options = options.clone();
        let stop = stop.clone();
        let committed = committed.clone();
        handles.push(tokio::spawn(async move {
            consume(subscription, &target_url, model, &options, stop, committed).await
        }));
    }
    let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
    let mut running: futures::stream::FuturesUnordered<_> = handles.into_iter().collect();
    let mut total = ApplyStats::default();
    while let Some(result) = futures::StreamExt::next(&mut running).await {
        let err = match result {
            Ok(Ok(stats)) => {
                total += stats;
                continue;
            }
            Ok(Err(err)) => err,
            Err(join) => ApplyError::Target(format!("an applier stopped: {join}")),
        };
        // One applier's fatal error stops them all: what they hold
        // unacknowledged is delivered again on the next start.
        for abort in &aborts {
            abort.abort();
        }
        return Err(err);
    }
    Ok(total)
}
