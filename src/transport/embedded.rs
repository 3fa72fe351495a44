//! The in-process transport of `tally run`: capture and apply in one
//! process, joined by a bounded queue.
//!
//! Capture writes into an [`EmbeddedSink`]; its `make_durable` waits until
//! apply has committed every event handed over so far, so the slot is
//! confirmed only up to what is in the target and a crash of the process
//! loses nothing. The queue is bounded, so a slow target slows capture
//! (backpressure) instead of growing memory.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, watch};

use crate::apply::{Applier, ApplyError, ApplyStats, Model};
use crate::capture::EventSink;

/// A batch of messages with its sequence number.
struct Batch {
    sequence: u64,
    messages: Vec<String>,
}

/// Capture's end of the queue.
pub struct EmbeddedSink {
    sender: mpsc::Sender<Batch>,
    pending: Vec<String>,
    batch_size: usize,
    next_sequence: u64,
    committed: watch::Receiver<u64>,
}

/// Apply's end: tracks which batches are committed.
#[derive(Clone)]
pub struct EmbeddedQueue {
    receiver: Arc<Mutex<mpsc::Receiver<Batch>>>,
    done: Arc<Mutex<(u64, BTreeSet<u64>)>>,
    committed: Arc<watch::Sender<u64>>,
}

/// A queue holding at most `capacity` batches of up to `batch_size` events.
pub fn channel(capacity: usize, batch_size: usize) -> (EmbeddedSink, EmbeddedQueue) {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    let (committed_tx, committed_rx) = watch::channel(0u64);
    (
        EmbeddedSink {
            sender,
            pending: Vec::with_capacity(batch_size),
            batch_size: batch_size.max(1),
            next_sequence: 1,
            committed: committed_rx,
        },
        EmbeddedQueue {
            receiver: Arc::new(Mutex::new(receiver)),
            done: Arc::new(Mutex::new((0, BTreeSet::new()))),
            committed: Arc::new(committed_tx),
        },
    )
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the appliers stopped")
}

impl EmbeddedSink {
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

impl EventSink for EmbeddedSink {
    async fn write_event(&mut self, event: &str) -> std::io::Result<()> {
        self.pending.push(event.to_string());
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
        self.committed
            .wait_for(|committed| *committed >= last_sent)
            .await
            .map_err(|_| closed())?;
        Ok(())
    }
}

impl EmbeddedQueue {
    /// Runs one applier until capture's end closes; returns its counters.
    pub async fn run_applier(&self, mut applier: Applier) -> Result<ApplyStats, ApplyError> {
        let mut total = ApplyStats::default();
        loop {
            let batch = self.receiver.lock().await.recv().await;
            let Some(batch) = batch else { return Ok(total) };
            total += applier.apply_messages(&batch.messages).await?;
            self.mark_committed(batch.sequence).await;
        }
    }

    /// Batches finish out of order across appliers; the committed mark
    /// advances only over a gapless prefix.
    async fn mark_committed(&self, sequence: u64) {
        let mut done = self.done.lock().await;
        done.1.insert(sequence);
        let mut prefix = done.0;
        while done.1.remove(&(prefix + 1)) {
            prefix += 1;
        }
        done.0 = prefix;
        self.committed.send_replace(prefix);
    }
}

/// Starts `parallel` appliers on the queue.
pub async fn spawn_appliers(
    queue: &EmbeddedQueue,
    target_url: &str,
    model: Arc<Model>,
    parallel: usize,
) -> Result<Vec<tokio::task::JoinHandle<Result<ApplyStats, ApplyError>>>, ApplyError> {
    let mut handles = Vec::new();
    for _ in 0..parallel.max(1) {
        let applier = Applier::connect(target_url, model.clone()).await?;
        let queue = queue.clone();
        handles.push(tokio::spawn(
            async move { queue.run_applier(applier).await },
        ));
    }
    Ok(handles)
}
