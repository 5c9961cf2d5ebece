//! The HTTP side of sluice (axum): ingest, the API, health and metrics,
//! and the WebSocket gateway (compatibility endpoints and `/ws`), every
//! route behind one authentication layer ([`caller`]).

mod access;
mod api;
pub mod auth;
pub mod caller;
mod commands;
mod compat;
mod dashboard;
mod error;
pub mod frames;
mod history;
pub mod hub;
mod ingest;
mod native;
pub mod outbox;
mod services;
pub mod socket;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::WebSocketUpgrade;
use axum::extract::ws::WebSocket;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

pub use error::AppError;

use crate::config::{HttpIngestConfig, WebSocketConfig};
use crate::pipeline::{Ingest, PipelineState};
use crate::source::SourceHealth;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Shared pipeline state.
    pub pipeline: Arc<PipelineState>,
    /// The way into the pipeline; `None` when HTTP ingest is off.
    pub ingest: Option<Ingest>,
    /// HTTP ingest settings.
    pub http: HttpIngestConfig,
    /// HTTP ingest may create devices the registry does not know (with
    /// authentication, for the caller's tenant).
    pub accept_unregistered: bool,
    /// The metrics recorder.
    pub metrics: PrometheusHandle,
    /// The WebSocket gateway.
    pub ws: Arc<WsContext>,
    /// The broker sources and whether each is connected, for readiness.
    pub sources: Vec<(String, Arc<SourceHealth>)>,
}

/// What WebSocket connections share.
#[derive(Debug)]
pub struct WsContext {
    /// Local watchers and the way publications reach them.
    pub hub: Arc<hub::Hub>,
    /// Checks credentials.
    pub auth: auth::Authenticator,
    /// Limits.
    pub config: WebSocketConfig,
    /// History bounds (how much a resuming subscription may replay).
    pub history: crate::config::HistoryConfig,
    /// Open connections.
    pub connections: Arc<socket::Connections>,
    /// Bumped whenever the device registry is reloaded.
    pub registry_changes: watch::Receiver<u64>,
    /// Turns true when sluice stops: every session ends with 1001.
    pub shutdown: watch::Receiver<bool>,
}

impl WsContext {
    /// A receiver of registry reloads that fires only for reloads after
    /// this call: a session checks what it may see when one arrives.
    pub(crate) fn registry_reloads(&self) -> watch::Receiver<u64> {
        let mut changes = self.registry_changes.clone();
        changes.mark_unchanged();
        changes
    }
}

/// When a session authenticated by `identity` must end: a session lasts
/// as long as its credential, and one without an expiry never ends for it.
pub(crate) fn credential_deadline(
    identity: Option<&auth::Identity>,
) -> Option<tokio::time::Instant> {
    let exp = identity?.expires_at?;
    let left = exp.saturating_sub(crate::message::now_ms() / 1000).max(0);
    Some(tokio::time::Instant::now() + std::time::Duration::from_secs(left.unsigned_abs()))
}

/// Upgrades to a WebSocket served by `serve`, unless the instance holds
/// its connection limit (503).
fn upgrade<F, Fut>(ws: WebSocketUpgrade, app: &AppState, serve: F) -> Response
where
    F: FnOnce(WebSocket, AppState, socket::Slot) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let config = &app.ws.config;
    let Some(slot) = app.ws.connections.acquire(config.max_connections) else {
        metrics::counter!("sluice_ws_refused_total", "reason" => "connection_limit").increment(1);
        return AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!(
                "this instance holds its limit of {} WebSocket connections",
                config.max_connections
            ),
        )
        .into_response();
    };
    // Frames up to four times the limit are read and refused with an
    // error frame; larger ones end the connection (1009).
    let hard_limit = usize::try_from(config.max_frame.as_u64())
        .unwrap_or(usize::MAX / 4)
        .saturating_mul(4);
    let app = app.clone();
    ws.max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .read_buffer_size(512)
        .write_buffer_size(0)
        .on_upgrade(move |socket| serve(socket, app, slot))
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

/// The router, so tests can drive it without a socket. Every route is
/// behind the authentication layer of its kind: public (`/health`,
/// `/ready`, the dashboard page), WebSocket upgrades (credentials checked
/// when given; the endpoints ask for them otherwise), and the rest
/// (credentials required; `/api/v1/scripts` and `/metrics` need `admin`).
pub fn app(state: AppState) -> Router {
    let body_limit = usize::try_from(state.http.max_body.as_u64()).unwrap_or(usize::MAX);
    let public = Router::new()
        .route("/", get(dashboard::page))
        .route("/health", get(api::health))
        .route("/ready", get(api::ready));
    let upgrades = Router::new()
        .route(
            "/api/v1/device/online/status/ws",
            compat::route(compat::Endpoint::Status),
        )
        .route(
            "/api/v1/telemetry/datas/current/ws",
            compat::route(compat::Endpoint::Telemetry),
        )
        .route(
            "/api/v1/telemetry/datas/current/keys/ws",
            compat::route(compat::Endpoint::TelemetryKeys),
        )
        .route("/ws", get(native::native))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            caller::upgrade_credentials,
        ));
    let admin = Router::new()
        .route("/api/v1/scripts", get(api::scripts))
        .route("/metrics", get(api::metrics))
        .route_layer(middleware::from_fn(caller::require_admin));
    let protected = Router::new()
        .route(
            "/api/v1/ingest/{product}/{device}",
            post(ingest::ingest_one),
        )
        .route("/api/v1/ingest/{product}", post(ingest::ingest_batch))
        .layer(DefaultBodyLimit::max(body_limit))
        .route("/api/v1/deadletter", get(api::dead_letters))
        .route("/api/v1/devices/{device}", get(api::device))
        .route(
            "/api/v1/devices/{device}/transitions",
            get(history::transitions),
        )
        .route("/api/v1/alerts", get(history::alerts))
        .route("/api/v1/events", get(history::events))
        .route("/api/v1/devices/{device}/commands", post(commands::send))
        .route("/api/v1/commands/{id}", get(commands::get))
        .merge(admin)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            caller::require_credentials,
        ));
    Router::new()
        .merge(public)
        .merge(upgrades)
        .merge(protected)
        .with_state(state)
}

/// `GET /metrics` alone, without credentials: for `[server] metrics_listen`.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(api::metrics))
        .with_state(state)
}
