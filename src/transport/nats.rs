//! NATS JetStream: capture and any number of `tally apply` processes on
//! different machines.
//!
//! One stream per source (`[transport] stream`), one subject per table
//! (`<stream>.<schema>.<table>`), and one durable pull consumer shared by
//! every applier (work-queue semantics; no ordering is assumed, apply's
//! guard makes any order safe). Publishing waits for the server's
//! acknowledgement before capture confirms the slot, and sets a message id
//! derived from the change's identity, so JetStream's duplicate window drops
//! what a restarted capture sends again. Appliers acknowledge after the
//! target commit and refuse (`nak`, with a delay) when the target is away.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;

use super::{CapturedEvent, Delivery, Publisher, Settle, Subscription, TransportError};
use crate::config::{TransportConfig, redact_url};
use crate::event::TableName;

/// Publishes not yet acknowledged by the server, at most; beyond it capture
/// waits for the oldest (and the source keeps the WAL meanwhile).
const MAX_UNACKNOWLEDGED: usize = 4096;

/// How long JetStream remembers message ids to drop republished copies.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Unacknowledged deliveries the shared consumer allows across all appliers.
const MAX_ACK_PENDING: i64 = 200_000;

/// A connected JetStream context with Tally's stream in place.
#[derive(Clone)]
pub struct NatsTransport {
    context: jetstream::Context,
    stream: stream::Stream,
    subject_prefix: String,
    config: TransportConfig,
}

fn unavailable(url: &str, what: &str, err: impl std::fmt::Display) -> TransportError {
    TransportError::Unavailable(format!("NATS at {}: {what}: {err}", redact_url(url)))
}

impl NatsTransport {
    /// Connects and creates the stream if it is missing. Fails with an
    /// explanation when nothing answers at the URL or JetStream is off.
    pub async fn connect(config: &TransportConfig) -> Result<NatsTransport, TransportError> {
        let url = config.url.clone().ok_or_else(|| {
            TransportError::Misconfigured(
                "[transport] kind = \"nats\" needs [transport] url (e.g. \"nats://127.0.0.1:4222\") or TALLY_TRANSPORT_URL".into(),
            )
        })?;
        let client = async_nats::ConnectOptions::new()
            .name("tally")
            .connection_timeout(Duration::from_secs(5))
            // Keep reconnecting for as long as the process runs: a NATS
            // restart must not stop the pipeline.
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                    async_nats::Event::Connected => tracing::info!("NATS connection (re)established"),
                    other => tracing::debug!("NATS: {other}"),
                }
            })
            .connect(url.as_str())
            .await
            .map_err(|err| {
                TransportError::Unavailable(format!(
                    "cannot connect to NATS at {}: {err}. Is nats-server running there, with JetStream (-js)? Check [transport] url or TALLY_TRANSPORT_URL",
                    redact_url(&url)
                ))
            })?;
        let context = jetstream::new(client);
        let stream_name = config.stream.clone();
        let subject_prefix = stream_name.to_lowercase();
        let stream = context
            .get_or_create_stream(stream::Config {
                name: stream_name.clone(),
                subjects: vec![format!("{subject_prefix}.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|err| {
                let text = err.to_string();
                if ["not enabled", "unavailable", "no responders", "timed out"]
                    .iter()
                    .any(|hint| text.contains(hint))
                {
                    TransportError::Misconfigured(format!(
                        "NATS at {} does not answer JetStream requests ({text}); start nats-server with JetStream enabled (`nats-server -js`, or `jetstream {{}}` in its config)",
                        redact_url(&url)
                    ))
                } else {
                    TransportError::Misconfigured(format!(
                        "cannot create or open JetStream stream \"{stream_name}\" at {}: {text}; check [transport] stream",
                        redact_url(&url)
                    ))
                }
            })?;
        Ok(NatsTransport {
            context,
            stream,
            subject_prefix,
            config: config.clone(),
        })
    }

    fn url(&self) -> String {
        self.config.url.clone().unwrap_or_default()
    }

    /// Capture's end.
    pub fn publisher(&self) -> NatsPublisher {
        NatsPublisher {
            transport: self.clone(),
            subjects: HashMap::new(),
            unacknowledged: VecDeque::new(),
        }
    }

    /// The shared durable consumer; created if missing.
    async fn consumer(&self) -> Result<consumer::Consumer<consumer::pull::Config>, TransportError> {
        let name = self.config.consumer.clone();
        self.stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(self.config.ack_wait_seconds),
                    max_deliver: -1,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await
            .map_err(|err| unavailable(&self.url(), &format!("opening consumer \"{name}\""), err))
    }

    /// Apply's end: one per applier, all on the shared consumer.
    pub async fn subscription(&self) -> Result<NatsSubscription, TransportError> {
        Ok(NatsSubscription {
            consumer: self.consumer().await?,
            messages: None,
            url: self.url(),
        })
    }

    /// Messages in the stream not yet acknowledged by an applier.
    pub async fn pending(&self) -> Result<u64, TransportError> {
        let (pending, ack_pending) = self.backlog().await?;
        Ok(pending + ack_pending)
    }

    /// The shared consumer's backlog: not yet delivered (`num_pending`) and
    /// delivered but not acknowledged (`num_ack_pending`).
    pub async fn backlog(&self) -> Result<(u64, u64), TransportError> {
        let mut consumer = self.consumer().await?;
        let info = consumer
            .info()
            .await
            .map_err(|err| unavailable(&self.url(), "reading consumer info", err))?;
        Ok((info.num_pending, info.num_ack_pending as u64))
    }

    /// `<prefix>.<schema>.<table>`, each name made a valid subject token.
    fn subject(&self, table: &TableName) -> String {
        format!(
            "{}.{}.{}",
            self.subject_prefix,
            subject_token(&table.schema),
            subject_token(&table.name)
        )
    }
}

/// Subject tokens may not hold `.`, `*`, `>` or whitespace; other
/// characters pass, and the few unsafe ones are written as `_xx` hex (so
/// are `_` themselves, keeping the mapping one-to-one).
fn subject_token(name: &str) -> String {
    let mut token = String::with_capacity(name.len());
    for ch in name.chars() {
        if ch.is_ascii_alphanumeric() || ch == '-' || (!ch.is_ascii() && !ch.is_whitespace()) {
            token.push(ch);
        } else {
            for byte in ch.to_string().bytes() {
                token.push_str(&format!("_{byte:02x}"));
            }
        }
    }
    if token.is_empty() {
        token.push('_');
    }
    token
}

fn io_error(kind: std::io::ErrorKind, text: String) -> std::io::Error {
    std::io::Error::new(kind, text)
}

/// Capture's end: publishes with message ids, keeps the server's pending
/// acknowledgements, and waits for them in `make_durable`.
pub struct NatsPublisher {
    transport: NatsTransport,
    subjects: HashMap<Arc<TableName>, String>,
    unacknowledged: VecDeque<jetstream::context::PublishAckFuture>,
}

impl NatsPublisher {
    async fn wait_oldest(&mut self) -> std::io::Result<()> {
        if let Some(ack) = self.unacknowledged.pop_front()
            && let Err(err) = ack.await
        {
            // The rest may have failed too; they are sent again from
            // the slot after a reconnect.
            self.unacknowledged.clear();
            return Err(io_error(
                std::io::ErrorKind::TimedOut,
                format!(
                    "NATS at {} did not acknowledge a publish: {err}",
                    redact_url(&self.transport.url())
                ),
            ));
        }
        Ok(())
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&mut self, event: CapturedEvent) -> std::io::Result<()> {
        if self.unacknowledged.len() >= MAX_UNACKNOWLEDGED {
            self.wait_oldest().await?;
        }
        let subject = match self.subjects.get(&event.table) {
            Some(subject) => subject.clone(),
            None => {
                let subject = self.transport.subject(&event.table);
                self.subjects.insert(event.table.clone(), subject.clone());
                subject
            }
        };
        let message = PublishMessage::build()
            .message_id(event.message_id())
            .payload(Bytes::from(event.json));
        let ack = self
            .transport
            .context
            .send_publish(subject, message)
            .await
            .map_err(|err| {
                self.unacknowledged.clear();
                io_error(
                    std::io::ErrorKind::NotConnected,
                    format!(
                        "publishing to NATS at {}: {err}",
                        redact_url(&self.transport.url())
                    ),
                )
            })?;
        self.unacknowledged.push_back(ack);
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    async fn make_durable(&mut self) -> std::io::Result<()> {
        while !self.unacknowledged.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(())
    }
}

/// One applier's pull subscription on the shared consumer.
pub struct NatsSubscription {
    consumer: consumer::Consumer<consumer::pull::Config>,
    messages: Option<consumer::pull::Stream>,
    url: String,
}

struct NatsSettle(jetstream::message::Acker);

impl Settle for NatsSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            self.0
                .ack()
                .await
                .map_err(|err| TransportError::Unavailable(format!("acknowledging: {err}")))
        })
    }

    fn nak(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            self.0
                .ack_with(jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(|err| TransportError::Unavailable(format!("refusing a delivery: {err}")))
        })
    }
}

fn delivery(message: jetstream::Message) -> Delivery {
    let delivered = message
        .info()
        .map(|info| info.delivered.max(1) as u64)
        .unwrap_or(1);
    let (message, acker) = message.split();
    let payload = match String::from_utf8(message.payload.to_vec()) {
        Ok(text) => text,
        // Not JSON either way: apply dead-letters it with the parse error.
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    };
    Delivery {
        payload,
        delivered,
        settle: Box::new(NatsSettle(acker)),
    }
}

impl Subscription for NatsSubscription {
    async fn next_batch(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> Result<Option<Vec<Delivery>>, TransportError> {
        if self.messages.is_none() {
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(max.max(1))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(|err| unavailable(&self.url, "pulling messages", err))?;
            self.messages = Some(stream);
        }
        let messages = self.messages.as_mut().expect("just set");
        let mut out = Vec::new();
        match messages.next().await {
            Some(Ok(message)) => out.push(delivery(message)),
            Some(Err(err)) => {
                self.messages = None;
                return Err(unavailable(&self.url, "pulling messages", err));
            }
            None => {
                self.messages = None;
                return Err(unavailable(
                    &self.url,
                    "pulling messages",
                    "the stream ended",
                ));
            }
        }
        let deadline = tokio::time::Instant::now() + linger;
        while out.len() < max {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(message))) => out.push(delivery(message)),
                Ok(Some(Err(err))) => {
                    tracing::debug!("pull stream error after a partial batch: {err}");
                    self.messages = None;
                    break;
                }
                Ok(None) => {
                    self.messages = None;
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_valid_and_distinct() {
        assert_eq!(subject_token("invoices"), "invoices");
        assert_eq!(subject_token("my table.x"), "my_20table_2ex");
        assert_eq!(subject_token("a_b"), "a_5fb");
        assert_eq!(subject_token("*>"), "_2a_3e");
        assert_eq!(subject_token(""), "_");
        assert_ne!(subject_token("a.b"), subject_token("a_2eb"));
    }
}
