//! Deliberate disorder: wraps a subscription and shuffles, duplicates and
//! delays its deliveries, reproducibly from a seed. For tests, and for the
//! demo, where a visitor can watch the views stay exact anyway.
//!
//! A duplicate is a copy whose settle does nothing; the original is settled
//! by the applier as usual. A held-back delivery stays unacknowledged until
//! it is released and applied, so nothing is confirmed early.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::{Delivery, NoSettle, Subscription, TransportError};
use crate::config::ChaosConfig;

pub struct ChaosSubscription<S> {
    inner: S,
    config: ChaosConfig,
    rng: StdRng,
    held: Vec<(Instant, Delivery)>,
    inner_closed: bool,
    /// When set and false, deliveries pass through unstirred (the demo's
    /// switch); held-back ones are still released when due.
    switch: Option<Arc<AtomicBool>>,
}

impl<S: Subscription> ChaosSubscription<S> {
    /// `stream` tells apart the random sequences of several wrapped
    /// subscriptions sharing one seed.
    pub fn new(inner: S, config: ChaosConfig, stream: u64) -> Self {
        ChaosSubscription {
            inner,
            config,
            rng: StdRng::seed_from_u64(config.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            held: Vec::new(),
            inner_closed: false,
            switch: None,
        }
    }

    /// Chaos that can be turned on and off while running, through `switch`.
    pub fn switchable(inner: S, config: ChaosConfig, stream: u64, switch: Arc<AtomicBool>) -> Self {
        ChaosSubscription {
            switch: Some(switch),
            ..ChaosSubscription::new(inner, config, stream)
        }
    }

    fn on(&self) -> bool {
        self.switch
            .as_ref()
            .is_none_or(|switch| switch.load(Ordering::Relaxed))
    }

    fn release_due(&mut self, now: Instant, out: &mut Vec<Delivery>) {
        let mut index = 0;
        while index < self.held.len() {
            if self.held[index].0 <= now {
                out.push(self.held.swap_remove(index).1);
            } else {
                index += 1;
            }
        }
    }

    /// Holds some back, copies some, shuffles the rest.
    fn stir(&mut self, batch: Vec<Delivery>, now: Instant) -> Vec<Delivery> {
        if !self.on() {
            return batch;
        }
        let mut out = Vec::with_capacity(batch.len());
        for delivery in batch {
            if self.rng.random_bool(self.config.duplicate) {
                out.push(Delivery {
                    payload: delivery.payload.clone(),
                    delivered: delivery.delivered,
                    settle: Box::new(NoSettle),
                });
            }
            if self.config.max_delay_ms > 0 && self.rng.random_bool(self.config.delay) {
                let delay =
                    Duration::from_millis(self.rng.random_range(1..=self.config.max_delay_ms));
                self.held.push((now + delay, delivery));
            } else {
                out.push(delivery);
            }
        }
        out.shuffle(&mut self.rng);
        out
    }
}

impl<S: Subscription> Subscription for ChaosSubscription<S> {
    async fn next_batch(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> Result<Option<Vec<Delivery>>, TransportError> {
        loop {
            let mut out = Vec::new();
            self.release_due(Instant::now(), &mut out);
            if !out.is_empty() {
                out.shuffle(&mut self.rng);
                return Ok(Some(out));
            }
            let next_due = self.held.iter().map(|(due, _)| *due).min();
            if self.inner_closed {
                match next_due {
                    None => return Ok(None),
                    Some(due) => {
                        tokio::time::sleep_until(due).await;
                        continue;
                    }
                }
            }
            let batch = tokio::select! {
                batch = self.inner.next_batch(max, linger) => batch?,
                _ = sleep_until_or_forever(next_due) => continue,
            };
            match batch {
                None => self.inner_closed = true,
                Some(batch) => {
                    let stirred = self.stir(batch, Instant::now());
                    if !stirred.is_empty() {
                        return Ok(Some(stirred));
                    }
                }
            }
        }
    }
}

async fn sleep_until_or_forever(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::TableName;
    use crate::transport::embedded::channel;
    use crate::transport::{CapturedEvent, Publisher};

    #[tokio::test]
    async fn every_event_arrives_some_twice_in_another_order() {
        let (mut publisher, subscription) = channel(100, 50);
        for n in 0..200u64 {
            publisher
                .publish(CapturedEvent {
                    table: Arc::new(TableName::new("public", "t")),
                    commit_lsn: n,
                    lsn: n,
                    row_key: String::new(),
                    json: n.to_string(),
                })
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        let config = ChaosConfig {
            seed: 3,
            duplicate: 0.2,
            delay: 0.3,
            max_delay_ms: 20,
        };
        let mut chaos = ChaosSubscription::new(subscription, config, 0);
        let mut seen = Vec::new();
        let durable = tokio::spawn(async move {
            publisher.make_durable().await.unwrap();
        });
        while seen.iter().collect::<std::collections::BTreeSet<_>>().len() < 200 {
            let batch = chaos.next_batch(64, Duration::ZERO).await.unwrap().unwrap();
            for delivery in batch {
                seen.push(delivery.payload.parse::<u64>().unwrap());
                delivery.ack().await.unwrap();
            }
        }
        durable.await.unwrap();
        assert!(seen.len() > 220, "some duplicates: {}", seen.len());
        assert!(
            seen.windows(2).any(|w| w[0] > w[1]),
            "delivery order was stirred"
        );
    }
}
