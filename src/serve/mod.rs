//! `tally serve` and the demo's web server: the views as JSON, their
//! changes as Server-Sent Events, Prometheus metrics, a health check, and
//! the page (embedded in the binary, so the demo works offline).
//!
//! - [`views`]: reading view tables, with group-key filters.
//! - [`sse`]: how a view change reaches browsers (LISTEN on the target).
//! - [`auth`]: who may connect: loopback by default, a bearer token
//!   otherwise, and same-origin JSON for the demo's writes.
//! - [`metrics`]: the process's Prometheus recorder.
//! - [`demo_api`]: the demo's invoice editing, chaos switch and verify.
//!
//! One module serves both commands so the deployment API is exactly what
//! the demo page uses; the demo only adds its write endpoints.

pub mod auth;
pub mod demo_api;
pub mod metrics;
pub mod sse;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::apply::Model;
use crate::db::{self, ConnectError, describe};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {addr} without --auth-token: anyone who can reach that address could read every view. Pass --auth-token TOKEN (or set TALLY_AUTH_TOKEN) and send `Authorization: Bearer TOKEN`, or listen on a loopback address such as 127.0.0.1:8080"
    )]
    OpenWithoutToken { addr: SocketAddr },
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Sql(String),
    #[error("no view named {0:?}")]
    NoSuchView(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the HTTP server stopped: {0}")]
    Server(String),
}

impl From<tokio_postgres::Error> for ServeError {
    fn from(err: tokio_postgres::Error) -> Self {
        // A value the database cannot take (a filter "abc" on an integer
        // column, a total that is not a number) is the caller's mistake.
        let class_22 = err.code().is_some_and(|code| code.code().starts_with("22"));
        if class_22 {
            ServeError::BadRequest(describe(&err))
        } else {
            ServeError::Sql(describe(&err))
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status = match &self {
            ServeError::NoSuchView(_) => StatusCode::NOT_FOUND,
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::Connect(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// One database, connected on first use and again after the connection
/// is lost, so a target restart does not take the server down.
pub struct Db {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl Db {
    pub fn new(url: &str) -> Db {
        Db {
            url: url.to_string(),
            client: Mutex::new(None),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn get(&self) -> Result<Arc<Client>, ServeError> {
        let mut client = self.client.lock().await;
        if let Some(open) = client.as_ref().filter(|c| !c.is_closed()) {
            return Ok(open.clone());
        }
        let fresh = Arc::new(db::connect(&self.url).await?);
        *client = Some(fresh.clone());
        Ok(fresh)
    }
}

/// What the demo adds to the server.
pub struct DemoControls {
    /// Shared with the appliers' chaos wrappers.
    pub chaos: Arc<AtomicBool>,
}

/// Everything the handlers share.
pub struct AppState {
    pub model: Arc<Model>,
    pub source: Db,
    pub target: Db,
    /// The replication slot, for the lag gauge.
    pub slot: String,
    pub token: Option<String>,
    pub hub: sse::Hub,
    pub demo: Option<DemoControls>,
}

pub type Shared = Arc<AppState>;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page may run no script but its own and load nothing from elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

async fn index() -> Response {
    let mut response = asset("text/html; charset=utf-8", INDEX_HTML);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// The routes; the demo's write endpoints only when `state.demo` is set.
pub fn router(state: Shared) -> Router {
    let mut router = Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::endpoint))
        .route("/api/info", get(demo_api::info))
        .route("/api/views", get(views::list))
        .route("/api/views/{name}", get(views::one))
        .route("/api/stream", get(sse::stream))
        .route("/api/verify", post(demo_api::verify));
    if state.demo.is_some() {
        router = router
            .route(
                "/api/invoices",
                get(demo_api::list_invoices).post(demo_api::create_invoice),
            )
            .route(
                "/api/invoices/{id}",
                put(demo_api::update_invoice).delete(demo_api::delete_invoice),
            )
            .route("/api/chaos", post(demo_api::set_chaos));
    }
    router
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .with_state(state)
}

/// Binds `addr` after checking the exposure rule (see [`auth`]).
pub async fn bind(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<tokio::net::TcpListener, ServeError> {
    auth::check_exposure(addr, token)?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| ServeError::Bind {
            addr,
            reason: err.to_string(),
        })
}

/// Builds the shared state and starts the view listener.
pub async fn start_state(
    model: Arc<Model>,
    source_url: &str,
    target_url: &str,
    slot: &str,
    token: Option<String>,
    demo: Option<DemoControls>,
) -> Result<Shared, ServeError> {
    metrics::install();
    let state = Arc::new(AppState {
        model,
        source: Db::new(source_url),
        target: Db::new(target_url),
        slot: slot.to_string(),
        token,
        hub: sse::Hub::new(),
        demo,
    });
    sse::start(state.clone()).await?;
    Ok(state)
}

/// Serves `listener` until `stop` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: Shared,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let closing = state.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            stop.await;
            closing.hub.close();
        })
        .await
        .map_err(|err| ServeError::Server(err.to_string()))
}

/// `tally serve`: the API over an existing target, for deployments.
pub async fn serve(
    config: &crate::config::Config,
    model: Arc<Model>,
    listen: SocketAddr,
    token: Option<String>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = bind(listen, token.as_deref()).await?;
    let state = start_state(
        model,
        &config.source_url,
        &config.target_url,
        &config.capture.slot,
        token,
        None,
    )
    .await?;
    let local = listener
        .local_addr()
        .map_err(|err| ServeError::Server(err.to_string()))?;
    tracing::info!(
        "serving on http://{local}/ (GET /api/views, /api/views/NAME, /api/stream, /metrics, /healthz)"
    );
    println!("listening on http://{local}/");
    run(listener, state, stop).await
}
