//! Drives appliers over a stream of messages: N workers, each with its own
//! connection, taking batches from one bounded queue (so a slow target
//! slows the reader instead of filling memory).

use std::sync::Arc;

use tokio::io::AsyncBufRead;
use tokio::sync::{Mutex, mpsc};

use super::{Applier, ApplyError, ApplyStats, Model};
use crate::progress::Counter;
use crate::transport::file::for_each_chunk;

/// Applies every line of `input` with `parallel` appliers; returns the sum
/// of their counters once all is committed.
pub async fn apply_lines(
    input: impl AsyncBufRead + Unpin,
    target_url: &str,
    model: Arc<Model>,
    parallel: usize,
    batch_size: usize,
) -> Result<ApplyStats, ApplyError> {
    apply_lines_counted(
        input,
        target_url,
        model,
        parallel,
        batch_size,
        Counter::default(),
    )
    .await
}

/// [`apply_lines`], adding the number of committed messages to `committed`
/// as it goes (for progress display).
pub async fn apply_lines_counted(
    input: impl AsyncBufRead + Unpin,
    target_url: &str,
    model: Arc<Model>,
    parallel: usize,
    batch_size: usize,
    committed: Counter,
) -> Result<ApplyStats, ApplyError> {
    let parallel = parallel.max(1);
    let (sender, receiver) = mpsc::channel::<Vec<String>>(parallel * 2);
    let receiver = Arc::new(Mutex::new(receiver));
    let mut workers = Vec::with_capacity(parallel);
    for _ in 0..parallel {
        let mut applier = Applier::connect(target_url, model.clone()).await?;
        let receiver = receiver.clone();
        let committed = committed.clone();
        workers.push(tokio::spawn(async move {
            let mut total = ApplyStats::default();
            loop {
                let batch = receiver.lock().await.recv().await;
                let Some(batch) = batch else { break };
                total += applier.apply_messages(&batch).await?;
                committed.add(batch.len() as u64);
            }
            Ok::<ApplyStats, ApplyError>(total)
        }));
    }
    let read = for_each_chunk(input, batch_size, |chunk| {
        let sender = sender.clone();
        async move { sender.send(chunk).await.is_ok() }
    })
    .await;
    drop(sender);
    let mut total = ApplyStats::default();
    let mut first_error = None;
    for worker in workers {
        match worker.await {
            Ok(Ok(stats)) => total += stats,
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(join) => {
                first_error
                    .get_or_insert(ApplyError::Target(format!("an applier stopped: {join}")));
            }
        }
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    read.map_err(|err| ApplyError::Input(err.to_string()))?;
    Ok(total)
}
