//! Moving change events from capture to apply.
//!
//! Two small traits are the whole contract, so another broker (Kafka,
//! Pulsar) fits by implementing them:
//!
//! - [`Publisher`]: capture's end. `publish` hands one event on;
//!   `make_durable` returns once everything published would survive a crash
//!   (the slot is confirmed only after it).
//! - [`Subscription`]: apply's end. `next_batch` yields [`Delivery`]s; each is
//!   acknowledged after the target commit, or refused with a delay
//!   (`nak`) so that it comes again later. No ordering is assumed: apply's
//!   ordering guard makes any order and any repetition safe.
//!
//! The implementations: [`embedded`] (in process, for `tally run`),
//! [`nats`] (JetStream, for capture and apply on different machines),
//! [`file`] (JSON lines), and [`chaos`], a wrapper that shuffles,
//! duplicates and delays deliveries for tests and the demo.

pub mod chaos;
pub mod embedded;
pub mod file;
pub mod nats;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use thiserror::Error;

use crate::event::TableName;

#[derive(Debug, Error)]
pub enum TransportError {
    /// The transport cannot be reached now; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The transport is set up in a way Tally cannot use; the message says
    /// how to fix it.
    #[error("{0}")]
    Misconfigured(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One captured change on its way to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct CapturedEvent {
    pub table: Arc<TableName>,
    pub commit_lsn: u64,
    pub lsn: u64,
    /// Tells apart events at one WAL position (bootstrap's rows share the
    /// snapshot's); empty for streamed changes, whose LSN is their own.
    pub row_key: String,
    /// The Debezium envelope.
    pub json: String,
}

impl CapturedEvent {
    /// A stable identity, the same each time the same change is captured
    /// again (after a restart), so a broker can drop republished copies.
    pub fn message_id(&self) -> String {
        let mut id = format!("{}:{:X}:{:X}", self.table, self.commit_lsn, self.lsn);
        if !self.row_key.is_empty() {
            id.push(':');
            id.push_str(&format!("{:016x}", fnv1a(self.row_key.as_bytes())));
        }
        id
    }
}

/// A small, stable hash (FNV-1a); std's hasher may change between releases
/// and message ids must not.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Capture's end of a transport.
pub trait Publisher {
    fn publish(&mut self, event: CapturedEvent)
    -> impl Future<Output = std::io::Result<()>> + Send;
    /// Hands published events on promptly (e.g. flushes a pipe) without the
    /// cost of durability; called at each source commit.
    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Returns once every event published so far would survive a crash.
    fn make_durable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// The publishers a command line can choose between.
pub enum AnyPublisher {
    Lines(file::LinesPublisher),
    Embedded(embedded::EmbeddedPublisher),
    Nats(Box<nats::NatsPublisher>),
}

impl Publisher for AnyPublisher {
    async fn publish(&mut self, event: CapturedEvent) -> std::io::Result<()> {
        match self {
            AnyPublisher::Lines(p) => p.publish(event).await,
            AnyPublisher::Embedded(p) => p.publish(event).await,
            AnyPublisher::Nats(p) => p.publish(event).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            AnyPublisher::Lines(p) => p.flush().await,
            AnyPublisher::Embedded(p) => p.flush().await,
            AnyPublisher::Nats(p) => p.flush().await,
        }
    }

    async fn make_durable(&mut self) -> std::io::Result<()> {
        match self {
            AnyPublisher::Lines(p) => p.make_durable().await,
            AnyPublisher::Embedded(p) => p.make_durable().await,
            AnyPublisher::Nats(p) => p.make_durable().await,
        }
    }
}

/// Settles one delivery: the transport's acknowledgement handle.
pub trait Settle: Send + Sync {
    /// The event is applied (its target transaction committed).
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>>;
    /// The event could not be applied now: deliver it again after `delay`.
    fn nak(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), TransportError>>;
}

/// One event as apply receives it.
pub struct Delivery {
    pub payload: String,
    /// How many times it has been delivered, this time included.
    pub delivered: u64,
    pub settle: Box<dyn Settle>,
}

impl Delivery {
    pub async fn ack(self) -> Result<(), TransportError> {
        self.settle.ack().await
    }

    pub async fn nak(self, delay: Duration) -> Result<(), TransportError> {
        self.settle.nak(delay).await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("payload", &self.payload)
            .field("delivered", &self.delivered)
            .finish()
    }
}

/// A settle handle that does nothing: for copies the chaos wrapper makes,
/// whose original is settled on its own.
pub struct NoSettle;

impl Settle for NoSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }

    fn nak(self: Box<Self>, _delay: Duration) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Apply's end of a transport. One per applier.
pub trait Subscription: Send {
    /// Waits for deliveries and returns up to `max` of them; after the first
    /// arrives it waits at most `linger` for more. `None` when the transport
    /// is closed and drained (the embedded queue after capture stopped).
    fn next_batch(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> impl Future<Output = Result<Option<Vec<Delivery>>, TransportError>> + Send;
}

/// [`Subscription`] in a form that can be boxed, so a command can choose
/// its transport at run time.
pub trait DynSubscription: Send {
    fn next_batch_boxed(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> BoxFuture<'_, Result<Option<Vec<Delivery>>, TransportError>>;
}

impl<S: Subscription> DynSubscription for S {
    fn next_batch_boxed(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> BoxFuture<'_, Result<Option<Vec<Delivery>>, TransportError>> {
        Box::pin(self.next_batch(max, linger))
    }
}

impl Subscription for Box<dyn DynSubscription> {
    fn next_batch(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> impl Future<Output = Result<Option<Vec<Delivery>>, TransportError>> + Send {
        self.as_mut().next_batch_boxed(max, linger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(row_key: &str) -> CapturedEvent {
        CapturedEvent {
            table: Arc::new(TableName::new("public", "invoices")),
            commit_lsn: 0x1_0000_0010,
            lsn: 0x1_0000_0008,
            row_key: row_key.into(),
            json: "{}".into(),
        }
    }

    #[test]
    fn message_ids_are_stable_and_tell_rows_apart() {
        assert_eq!(
            event("").message_id(),
            "public.invoices:100000010:100000008"
        );
        let a = event("{\"id\": 1}").message_id();
        let b = event("{\"id\": 2}").message_id();
        assert_ne!(a, b);
        assert_eq!(a, event("{\"id\": 1}").message_id());
        // FNV-1a's published test vector: the id must not change between builds.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
