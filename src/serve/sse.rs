//! View changes as Server-Sent Events, across processes.
//!
//! Appliers may run in other processes and on other machines, so the
//! server learns of changes from the one place they all write: the target.
//! Each apply transaction that changes views runs `pg_notify('tally_views',
//! 'name,name')` (see `apply::store::VIEWS_CHANNEL`); Postgres delivers it
//! to listeners only when the transaction commits, so the server never
//! announces a change it cannot read yet, and it costs no table and no
//! polling. The server keeps one connection that `LISTEN`s, marks the
//! named views dirty, and one task re-reads dirty views and pushes each
//! whole view (not a delta) to every client through a broadcast channel.
//! Whole views make a client that missed messages (slow, or reconnecting)
//! right again with the next one, and a burst of commits coalesces into
//! one read per view per round.
//!
//! Why not the alternatives: polling the views costs reads while nothing
//! changes and adds its period to the latency; logical replication of the
//! target would need `wal_level = logical` there. `NOTIFY` payloads are
//! best-effort (lost while the listener reconnects), so after every
//! (re)connect all views are read again.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use tokio::sync::{Notify, broadcast};
use tokio_postgres::{AsyncMessage, NoTls};

use super::{ServeError, Shared};
use crate::apply::store::VIEWS_CHANNEL;
use crate::event::quote_ident;

/// One message to every client: its SSE event name and JSON data.
#[derive(Debug, Clone)]
pub struct Message {
    pub event: &'static str,
    pub data: Arc<str>,
}

/// The broadcast channel, the last state of every view, and the views
/// waiting to be read again.
pub struct Hub {
    pub sender: broadcast::Sender<Message>,
    latest: std::sync::Mutex<BTreeMap<String, Arc<str>>>,
    dirty: std::sync::Mutex<BTreeSet<String>>,
    wake: Notify,
    /// Raised when the server stops: streams end, so that the graceful
    /// shutdown (which waits for open connections) is not held up by
    /// browsers that would keep listening forever.
    closing: tokio::sync::watch::Sender<bool>,
}

/// The least time between two rounds of reading views: under a burst of
/// commits, a browser needs no more than this.
const ROUND_INTERVAL: Duration = Duration::from_millis(25);

impl Hub {
    pub fn new() -> Hub {
        Hub {
            sender: broadcast::channel(256).0,
            latest: std::sync::Mutex::new(BTreeMap::new()),
            dirty: std::sync::Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            closing: tokio::sync::watch::channel(false).0,
        }
    }

    /// Ends every stream.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    fn mark_dirty<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut dirty = self.dirty.lock().expect("dirty set");
        dirty.extend(names.into_iter().map(str::to_string));
        drop(dirty);
        self.wake.notify_one();
    }

    /// Sends a message to every connected client.
    pub fn publish(&self, event: &'static str, data: String) {
        let _ = self.sender.send(Message {
            event,
            data: data.into(),
        });
    }

    /// The current state of every view, as messages.
    fn snapshot(&self) -> Vec<Message> {
        let latest = self.latest.lock().expect("latest views");
        latest
            .values()
            .map(|data| Message {
                event: "view",
                data: data.clone(),
            })
            .collect()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// Starts the listener and the reader; reads every view once first, so
/// the first client gets them at once.
pub async fn start(state: Shared) -> Result<(), ServeError> {
    let names: Vec<String> = state.model.views().map(|v| v.name().to_string()).collect();
    state.hub.mark_dirty(names.iter().map(String::as_str));
    read_dirty(&state).await?;
    tokio::spawn(listen(state.clone()));
    tokio::spawn(reader(state));
    Ok(())
}

/// Reads the dirty views and publishes those that changed.
async fn read_dirty(state: &Shared) -> Result<(), ServeError> {
    let names = std::mem::take(&mut *state.hub.dirty.lock().expect("dirty set"));
    for name in names {
        let Ok(view) = super::views::find(state, &name) else {
            continue; // a view another configuration declares
        };
        let rows = match super::views::read_rows(state, view, &BTreeMap::new()).await {
            Ok(rows) => rows,
            Err(err) => {
                // Read again next round.
                state.hub.dirty.lock().expect("dirty set").insert(name);
                return Err(err);
            }
        };
        let data: Arc<str> = format!(
            "{{\"view\":{},\"rows\":{rows}}}",
            serde_json::Value::from(name.as_str())
        )
        .into();
        let changed = {
            let mut latest = state.hub.latest.lock().expect("latest views");
            let changed = latest.get(&name) != Some(&data);
            latest.insert(name, data.clone());
            changed
        };
        if changed {
            let _ = state.hub.sender.send(Message {
                event: "view",
                data,
            });
        }
    }
    Ok(())
}

/// Completes when the server stops.
pub async fn closed(state: &Shared) {
    let mut closing = state.hub.closing.subscribe();
    let _ = closing.wait_for(|closing| *closing).await;
}

async fn reader(state: Shared) {
    let stop = state.clone();
    tokio::select! {
        _ = read_rounds(state) => {}
        _ = closed(&stop) => {}
    }
}

async fn read_rounds(state: Shared) {
    loop {
        state.hub.wake.notified().await;
        if let Err(err) = read_dirty(&state).await {
            tracing::warn!("reading views for the stream: {err}; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            state.hub.wake.notify_one();
        }
        tokio::time::sleep(ROUND_INTERVAL).await;
    }
}

async fn listen(state: Shared) {
    let stop = state.clone();
    tokio::select! {
        _ = listen_always(state) => {}
        _ = closed(&stop) => {}
    }
}

/// Keeps a connection to the target that LISTENs, reconnecting with
/// backoff; every (re)connect marks all views dirty.
async fn listen_always(state: Shared) {
    let listen_sql = format!("LISTEN {}", quote_ident(VIEWS_CHANNEL));
    let mut backoff = Duration::from_millis(100);
    loop {
        match tokio_postgres::connect(state.target.url(), NoTls).await {
            Ok((client, mut connection)) => {
                let (notes, mut received) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(note)) => {
                                let _ = notes.send(note.payload().to_string());
                            }
                            Ok(_) => {}
                            Err(err) => {
                                tracing::debug!("view listener connection: {err}");
                                break;
                            }
                        }
                    }
                });
                if client.batch_execute(&listen_sql).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    let names: Vec<String> =
                        state.model.views().map(|v| v.name().to_string()).collect();
                    state.hub.mark_dirty(names.iter().map(String::as_str));
                    while let Some(payload) = received.recv().await {
                        state.hub.mark_dirty(payload.split(','));
                    }
                }
                driver.abort();
                tracing::warn!(
                    "lost the target connection that listens for view changes; reconnecting"
                );
            }
            Err(err) => tracing::debug!("view listener cannot connect: {err}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn to_event(message: &Message) -> Event {
    Event::default().event(message.event).data(&*message.data)
}

/// `GET /api/stream`: every view now, then each view again whenever it
/// changes (`event: view`, data `{"view": name, "rows": [...]}`); in the
/// demo also `event: pipeline` once a second.
pub async fn stream(
    State(state): State<Shared>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.hub.sender.subscribe();
    let stop = state.clone();
    let closed = async move { closed(&stop).await };
    let first: Vec<Message> = state.hub.snapshot();
    let initial = futures::stream::iter(first.into_iter().map(|m| Ok(to_event(&m))));
    let hub_state = state.clone();
    let updates =
        futures::stream::unfold((receiver, hub_state), |(mut receiver, state)| async move {
            let events: Vec<_> = match receiver.recv().await {
                Ok(message) => vec![Ok(to_event(&message))],
                // This client fell behind: give it every view again.
                Err(broadcast::error::RecvError::Lagged(_)) => state
                    .hub
                    .snapshot()
                    .iter()
                    .map(|m| Ok(to_event(m)))
                    .collect(),
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((futures::stream::iter(events), (receiver, state)))
        })
        .flatten();
    Sse::new(initial.chain(updates).take_until(closed)).keep_alive(KeepAlive::default())
}
