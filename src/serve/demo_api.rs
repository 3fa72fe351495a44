//! The demo's endpoints: editing `invoices` on the source, the chaos
//! switch, the pipeline panel; and verify, which `tally serve` offers too.
//!
//! Writes exist only in demo mode (the router does not mount them
//! otherwise) and pass [`auth::same_origin_json`] first.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ServeError, Shared, auth, metrics};
use crate::ops::verify::{render_report, verify_views};

pub const LIST_INVOICES: &str = "SELECT coalesce(json_agg(i ORDER BY i.id), '[]')::text FROM (SELECT id, name, customer_id, total::text AS total FROM invoices ORDER BY id DESC LIMIT 200) i";
pub const CREATE_INVOICE: &str = "INSERT INTO invoices (name, customer_id, total) VALUES ($1, $2, CAST($3::text AS numeric)) RETURNING id";
pub const UPDATE_INVOICE: &str = "UPDATE invoices SET name = $2, customer_id = $3, total = CAST($4::text AS numeric) WHERE id = $1";
pub const DELETE_INVOICE: &str = "DELETE FROM invoices WHERE id = $1";

fn json_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /api/info`: what the page should show.
pub async fn info(State(state): State<Shared>) -> Response {
    let chaos = state.demo.as_ref().map(|d| d.chaos.load(Ordering::Relaxed));
    json_text(json!({ "demo": state.demo.is_some(), "chaos": chaos }).to_string())
}

/// An invoice as the page sends it; the total as text or number, so it
/// reaches `numeric` without passing through a float.
#[derive(Debug, Deserialize)]
pub struct InvoiceInput {
    pub name: String,
    pub customer_id: i32,
    pub total: Value,
}

impl InvoiceInput {
    fn total_text(&self) -> Result<String, ServeError> {
        match &self.total {
            Value::String(text) => Ok(text.trim().to_string()),
            Value::Number(number) => Ok(number.to_string()),
            _ => Err(ServeError::BadRequest("total must be a number".into())),
        }
    }
}

pub async fn list_invoices(State(state): State<Shared>) -> Result<Response, ServeError> {
    let source = state.source.get().await?;
    let rows: String = source.query_one(LIST_INVOICES, &[]).await?.get(0);
    Ok(json_text(rows))
}

pub async fn create_invoice(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(input): Json<InvoiceInput>,
) -> Result<Response, Response> {
    auth::same_origin_json(&headers)?;
    let run = async {
        let total = input.total_text()?;
        let source = state.source.get().await?;
        let row = source
            .query_one(CREATE_INVOICE, &[&input.name, &input.customer_id, &total])
            .await?;
        let id: i32 = row.get(0);
        Ok::<_, ServeError>(json_text(json!({ "id": id }).to_string()))
    };
    run.await.map_err(IntoResponse::into_response)
}

pub async fn update_invoice(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i32>,
    Json(input): Json<InvoiceInput>,
) -> Result<Response, Response> {
    auth::same_origin_json(&headers)?;
    let run = async {
        let total = input.total_text()?;
        let source = state.source.get().await?;
        let updated = source
            .execute(
                UPDATE_INVOICE,
                &[&id, &input.name, &input.customer_id, &total],
            )
            .await?;
        Ok::<_, ServeError>(updated)
    };
    match run.await {
        Ok(0) => Err((StatusCode::NOT_FOUND, "{\"error\":\"no such invoice\"}").into_response()),
        Ok(_) => Ok(json_text("{\"ok\":true}".into())),
        Err(err) => Err(err.into_response()),
    }
}

pub async fn delete_invoice(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i32>,
) -> Result<Response, Response> {
    auth::same_origin_json(&headers)?;
    let run = async {
        let source = state.source.get().await?;
        Ok::<_, ServeError>(source.execute(DELETE_INVOICE, &[&id]).await?)
    };
    match run.await {
        Ok(_) => Ok(json_text("{\"ok\":true}".into())),
        Err(err) => Err(err.into_response()),
    }
}

#[derive(Debug, Deserialize)]
pub struct ChaosInput {
    pub on: bool,
}

/// `POST /api/chaos {"on": true}`: shuffle, duplicate and delay deliveries
/// from now on (or stop).
pub async fn set_chaos(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(input): Json<ChaosInput>,
) -> Result<Response, Response> {
    auth::same_origin_json(&headers)?;
    let Some(demo) = &state.demo else {
        return Err(StatusCode::NOT_FOUND.into_response());
    };
    demo.chaos.store(input.on, Ordering::Relaxed);
    tracing::info!("chaos {}", if input.on { "on" } else { "off" });
    Ok(json_text(json!({ "chaos": input.on }).to_string()))
}

/// `POST /api/verify`: compares every view with its SELECT on the source.
pub async fn verify(State(state): State<Shared>, headers: HeaderMap) -> Result<Response, Response> {
    auth::same_origin_json(&headers)?;
    let run = async {
        let source = state.source.get().await?;
        let target = state.target.get().await?;
        let started = Instant::now();
        let differences = verify_views(&source, &target, &state.model)
            .await
            .map_err(|err| ServeError::Sql(err.to_string()))?;
        let report = render_report(&differences, state.model.views().count(), 20);
        Ok::<_, ServeError>(json_text(
            json!({
                "equal": differences.is_empty(),
                "differences": differences.len(),
                "report": report,
                "ms": started.elapsed().as_millis() as u64,
            })
            .to_string(),
        ))
    };
    run.await.map_err(IntoResponse::into_response)
}

/// The demo's pipeline panel: once a second, a `pipeline` event with the
/// rate of events and the counters, from this process's metrics (the
/// demo runs capture and apply in process).
pub fn spawn_pipeline_panel(state: Shared) {
    tokio::spawn(async move {
        let handle = metrics::install();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut last: Option<(Instant, f64)> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = super::sse::closed(&state) => return,
            }
            let text = handle.render();
            let handled = [
                "applied",
                "coalesced",
                "duplicate",
                "stale",
                "dead_lettered",
            ]
            .iter()
            .map(|outcome| metrics::value(&text, &format!("tally_events_{outcome}_total")))
            .sum::<f64>();
            let now = Instant::now();
            let rate = last.map_or(0.0, |(at, before)| {
                (handled - before) / now.duration_since(at).as_secs_f64()
            });
            last = Some((now, handled));
            let (dead_letters, slot_lag) = metrics::database_gauges(&state).await;
            let chaos = state
                .demo
                .as_ref()
                .is_some_and(|d| d.chaos.load(Ordering::Relaxed));
            state.hub.publish(
                "pipeline",
                json!({
                    "events_per_second": rate.round().max(0.0) as u64,
                    "captured": metrics::value(&text, "tally_events_captured_total") as u64,
                    "applied": metrics::value(&text, "tally_events_applied_total") as u64,
                    "duplicates": metrics::value(&text, "tally_events_duplicate_total") as u64,
                    "stale": metrics::value(&text, "tally_events_stale_total") as u64,
                    "dead_letters": dead_letters,
                    "lag_bytes": slot_lag.map(|lag| lag.max(0.0) as u64),
                    "lag_ms": (metrics::value(&text, "tally_apply_lag_seconds") * 1000.0).round() as u64,
                    "chaos": chaos,
                })
                .to_string(),
            );
        }
    });
}
