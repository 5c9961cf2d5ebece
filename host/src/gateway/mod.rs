//! The HTTP side of sluice (axum): ingest, the API, health and metrics,
//! and the WebSocket gateway (compatibility endpoints and `/ws`).

mod access;
mod api;
pub mod auth;
mod compat;
mod dashboard;
mod error;
pub mod frames;
pub mod hub;
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
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

pub use error::AppError;

use crate::config::{HttpIngestConfig, WebSocketConfig};
use crate::pipeline::{Ingest, PipelineState};
use crate::source::SourceHealth;
use crate::source::http;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Shared pipeline state.
    pub pipeline: Arc<PipelineState>,
    /// The way into the pipeline; `None` when HTTP ingest is off.
    pub ingest: Option<Ingest>,
    /// HTTP ingest settings.
    pub http: HttpIngestConfig,
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
    /// Open connections.
    pub connections: Arc<socket::Connections>,
    /// Bumped whenever the device registry is reloaded.
    pub registry_changes: watch::Receiver<u64>,
    /// Turns true when sluice stops: every session ends with 1001.
    pub shutdown: watch::Receiver<bool>,
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

/// The router, so tests can drive it without a socket.
pub fn app(state: AppState) -> Router {
    let body_limit = usize::try_from(state.http.max_body.as_u64()).unwrap_or(usize::MAX);
    Router::new()
        .route("/api/v1/ingest/{product}/{device}", post(http::ingest_one))
        .route("/api/v1/ingest/{product}", post(http::ingest_batch))
        .layer(DefaultBodyLimit::max(body_limit))
        .route("/api/v1/deadletter", get(api::dead_letters))
        .route("/api/v1/scripts", get(api::scripts))
        .route("/api/v1/devices/{device}", get(api::device))
        .route("/api/v1/device/online/status/ws", get(compat::status))
        .route("/api/v1/telemetry/datas/current/ws", get(compat::telemetry))
        .route(
            "/api/v1/telemetry/datas/current/keys/ws",
            get(compat::telemetry_keys),
        )
        .route("/ws", get(native::native))
        .route("/", get(dashboard::page))
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/metrics", get(api::metrics))
        .with_state(state)
}
