//! The in-process transport of `tally run`: capture and apply in one
//! process, joined by a bounded queue.
//!
//! Capture publishes into an [`EmbeddedPublisher`]; its `make_durable` waits
//! until apply has acknowledged every event handed over so far, so the slot
//! is confirmed only up to what is in the target and a crash of the process
//! loses nothing. The queue is bounded, so a slow target slows capture
//! (backpressure) instead of growing memory. A refused delivery (`nak`)
//! comes back after its delay, and its batch counts as unacknowledged until
//! it is finally acknowledged.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Mutex, mpsc, watch};

use super::{CapturedEvent, Delivery, Publisher, Settle, Subscription, TransportError};

/// A batch of events with its sequence number.
struct Batch {
    sequence: u64,
    messages: Vec<String>,
}

/// Capture's end of the queue.
pub struct EmbeddedPublisher {
    sender: mpsc::Sender<Batch>,
    pending: Vec<String>,
    batch_size: usize,
    next_sequence: u64,
    acknowledged: watch::Receiver<u64>,
}

/// A refused delivery on its way back into the queue.
struct Retry {
    payload: Arc<str>,
    delivered: u64,
    ticket: Arc<Ticket>,
}

/// What appliers take deliveries from.
struct Inbox {
    batches: mpsc::Receiver<Batch>,
    retries: mpsc::UnboundedReceiver<Retry>,
    closed: bool,
    /// Deliveries taken from the queue for a batch not yet returned.
    gathered: Vec<Delivery>,
}

/// State shared by every applier's subscription.
struct Shared {
    inbox: Mutex<Inbox>,
    retry_sender: mpsc::UnboundedSender<Retry>,
    /// The highest sequence below which every batch is acknowledged, and
    /// the acknowledged sequences above it.
    progress: SyncMutex<(u64, BTreeSet<u64>)>,
    acknowledged: watch::Sender<u64>,
    /// Deliveries handed out and not yet acknowledged.
    outstanding: AtomicUsize,
}

/// One batch's acknowledgement count.
struct Ticket {
    sequence: u64,
    remaining: AtomicUsize,
    shared: Arc<Shared>,
}

/// Apply's end; clone one per applier.
#[derive(Clone)]
pub struct EmbeddedSubscription {
    shared: Arc<Shared>,
}

/// A queue holding at most `capacity` batches of up to `batch_size` events.
pub fn channel(capacity: usize, batch_size: usize) -> (EmbeddedPublisher, EmbeddedSubscription) {
    let (sender, batches) = mpsc::channel(capacity.max(1));
    let (retry_sender, retries) = mpsc::unbounded_channel();
    let (acknowledged_tx, acknowledged_rx) = watch::channel(0u64);
    (
        EmbeddedPublisher {
            sender,
            pending: Vec::with_capacity(batch_size),
            batch_size: batch_size.max(1),
            next_sequence: 1,
            acknowledged: acknowledged_rx,
        },
        EmbeddedSubscription {
            shared: Arc::new(Shared {
                inbox: Mutex::new(Inbox {
                    batches,
                    retries,
                    closed: false,
                    gathered: Vec::new(),
                }),
                retry_sender,
                progress: SyncMutex::new((0, BTreeSet::new())),
                acknowledged: acknowledged_tx,
                outstanding: AtomicUsize::new(0),
            }),
        },
    )
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the appliers stopped")
}

impl EmbeddedPublisher {
    async fn send_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = Batch {
            sequence: self.next_sequence,
            messages: std::mem::replace(&mut self.pending, Vec::with_capacity(self.batch_size)),
        };
        self.next_sequence += 1;
        self.sender.send(batch).await.map_err(|_| closed())
    }
}

impl Publisher for EmbeddedPublisher {
    async fn publish(&mut self, event: CapturedEvent) -> std::io::Result<()> {
        self.pending.push(event.json);
        if self.pending.len() >= self.batch_size {
            self.send_pending().await?;
        }
        Ok(())
    }

    /// Hands the events over when the appliers have room; while they are
    /// busy, events keep accumulating into bigger batches.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() || self.sender.capacity() == 0 {
            return Ok(());
        }
        self.send_pending().await
    }

    async fn make_durable(&mut self) -> std::io::Result<()> {
        self.send_pending().await?;
        let last_sent = self.next_sequence - 1;
        self.acknowledged
            .wait_for(|acknowledged| *acknowledged >= last_sent)
            .await
            .map_err(|_| closed())?;
        Ok(())
    }
}

impl Shared {
    /// Batches finish out of order across appliers; the acknowledged mark
    /// advances only over a gapless prefix.
    fn batch_acknowledged(&self, sequence: u64) {
        let prefix = {
            let mut progress = self.progress.lock().expect("progress lock");
            progress.1.insert(sequence);
            let mut prefix = progress.0;
            while progress.1.remove(&(prefix + 1)) {
                prefix += 1;
            }
            progress.0 = prefix;
            prefix
        };
        self.acknowledged.send_replace(prefix);
    }

    fn deliver(
        self: &Arc<Self>,
        payload: Arc<str>,
        delivered: u64,
        ticket: Arc<Ticket>,
    ) -> Delivery {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        Delivery {
            payload: payload.to_string(),
            delivered,
            settle: Box::new(EmbeddedSettle {
                payload,
                delivered,
                ticket,
            }),
        }
    }
}

struct EmbeddedSettle {
    payload: Arc<str>,
    delivered: u64,
    ticket: Arc<Ticket>,
}

impl Settle for EmbeddedSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        let shared = self.ticket.shared.clone();
        if self.ticket.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            shared.batch_acknowledged(self.ticket.sequence);
        }
        shared.outstanding.fetch_sub(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn nak(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), TransportError>> {
        let retry = Retry {
            payload: self.payload,
            delivered: self.delivered + 1,
            ticket: self.ticket,
        };
        let shared = retry.ticket.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // Counted as outstanding until it is back in the inbox.
            let _ = shared.retry_sender.send(retry);
            shared.outstanding.fetch_sub(1, Ordering::SeqCst);
        });
        Box::pin(async { Ok(()) })
    }
}

impl Subscription for EmbeddedSubscription {
    /// Takes what is ready; then, while the batch is short of `max`, waits
    /// up to `linger` for more. Capture hands over each transaction as soon
    /// as there is room, so without the wait a busy source would be applied
    /// in many tiny target transactions, each paying for its own statements
    /// and commit.
    ///
    /// Cancel-safe (the chaos layer drops this future when a held-back
    /// delivery falls due): what was gathered waits in the inbox for the
    /// next call, of this applier or another.
    async fn next_batch(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> Result<Option<Vec<Delivery>>, TransportError> {
        let shared = &self.shared;
        let mut inbox = shared.inbox.lock().await;
        let Inbox {
            batches,
            retries,
            closed,
            gathered,
        } = &mut *inbox;
        loop {
            while gathered.len() < max {
                match retries.try_recv() {
                    Ok(retry) => {
                        gathered.push(shared.deliver(retry.payload, retry.delivered, retry.ticket))
                    }
                    Err(_) => break,
                }
            }
            while gathered.len() < max && !*closed {
                match batches.try_recv() {
                    Ok(batch) => self.take_batch(batch, gathered),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => *closed = true,
                }
            }
            if !gathered.is_empty() {
                let deadline = tokio::time::Instant::now() + linger;
                while gathered.len() < max && !*closed {
                    tokio::select! {
                        batch = batches.recv() => match batch {
                            Some(batch) => self.take_batch(batch, gathered),
                            None => *closed = true,
                        },
                        retry = retries.recv() => if let Some(retry) = retry {
                            gathered.push(shared.deliver(retry.payload, retry.delivered, retry.ticket));
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                return Ok(Some(std::mem::take(gathered)));
            }
            if *closed && shared.outstanding.load(Ordering::SeqCst) == 0 {
                return Ok(None);
            }
            tokio::select! {
                batch = batches.recv(), if !*closed => match batch {
                    Some(batch) => self.take_batch(batch, gathered),
                    None => *closed = true,
                },
                retry = retries.recv() => if let Some(retry) = retry {
                    gathered.push(shared.deliver(retry.payload, retry.delivered, retry.ticket));
                },
                // Others' deliveries may still come back refused.
                _ = tokio::time::sleep(Duration::from_millis(50)), if *closed => {}
            }
        }
    }
}

impl EmbeddedSubscription {
    fn take_batch(&self, batch: Batch, out: &mut Vec<Delivery>) {
        if batch.messages.is_empty() {
            self.shared.batch_acknowledged(batch.sequence);
            return;
        }
        let ticket = Arc::new(Ticket {
            sequence: batch.sequence,
            remaining: AtomicUsize::new(batch.messages.len()),
            shared: self.shared.clone(),
        });
        for message in batch.messages {
            out.push(self.shared.deliver(message.into(), 1, ticket.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TableName;

    fn event(n: u64) -> CapturedEvent {
        CapturedEvent {
            table: Arc::new(TableName::new("public", "t")),
            commit_lsn: n,
            lsn: n,
            row_key: String::new(),
            json: format!("event {n}"),
        }
    }

    #[tokio::test]
    async fn durable_only_after_every_delivery_is_acknowledged() {
        let (mut publisher, mut subscription) = channel(4, 2);
        for n in 0..3 {
            publisher.publish(event(n)).await.unwrap();
        }
        publisher.flush().await.unwrap();
        let mut durable = Box::pin(publisher.make_durable());
        let batch = subscription
            .next_batch(10, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.len(), 3);
        let mut batch = batch.into_iter();
        // Refuse one: durability waits for its redelivery and ack.
        let refused = batch.next().unwrap();
        assert_eq!(refused.payload, "event 0");
        refused.nak(Duration::from_millis(10)).await.unwrap();
        for delivery in batch {
            delivery.ack().await.unwrap();
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut durable)
                .await
                .is_err(),
            "durable before the refused event came back"
        );
        let again = subscription
            .next_batch(10, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].payload, "event 0");
        assert_eq!(again[0].delivered, 2);
        for delivery in again {
            delivery.ack().await.unwrap();
        }
        durable.await.unwrap();
        drop(publisher);
        assert!(
            subscription
                .next_batch(10, Duration::ZERO)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_batch_lingers_for_what_arrives_soon_and_no_longer() {
        let (mut publisher, mut subscription) = channel(4, 100);
        publisher.publish(event(1)).await.unwrap();
        publisher.flush().await.unwrap();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            publisher.publish(event(2)).await.unwrap();
            publisher.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
            publisher.publish(event(3)).await.unwrap();
            publisher.flush().await.unwrap();
            publisher
        });
        let began = tokio::time::Instant::now();
        let batch = subscription
            .next_batch(10, Duration::from_millis(200))
            .await
            .unwrap()
            .unwrap();
        let payloads: Vec<&str> = batch.iter().map(|d| d.payload.as_str()).collect();
        assert_eq!(payloads, ["event 1", "event 2"]);
        let waited = began.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_millis(400), "{waited:?}");
        // Without a linger, what is there goes at once.
        let _publisher = late.await.unwrap();
        let batch = subscription
            .next_batch(10, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].payload, "event 3");
    }

    #[tokio::test]
    async fn a_full_batch_does_not_linger() {
        let (mut publisher, mut subscription) = channel(4, 2);
        for n in 0..2 {
            publisher.publish(event(n)).await.unwrap();
        }
        let began = tokio::time::Instant::now();
        let batch = subscription
            .next_batch(2, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.len(), 2);
        assert!(began.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_cancelled_linger_loses_nothing() {
        let (mut publisher, mut subscription) = channel(4, 100);
        publisher.publish(event(1)).await.unwrap();
        publisher.flush().await.unwrap();
        // Cancelled while lingering, with event 1 already taken.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(50),
            subscription.next_batch(10, Duration::from_secs(60)),
        )
        .await;
        assert!(cancelled.is_err());
        publisher.publish(event(2)).await.unwrap();
        publisher.flush().await.unwrap();
        let batch = subscription
            .next_batch(10, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        let payloads: Vec<&str> = batch.iter().map(|d| d.payload.as_str()).collect();
        assert_eq!(payloads, ["event 1", "event 2"]);
    }
}
