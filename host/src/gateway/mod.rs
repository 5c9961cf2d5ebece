//! The HTTP side of sluice (axum): ingest, the API, health and metrics.

mod api;
mod error;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

pub use error::AppError;

use crate::config::HttpIngestConfig;
use crate::pipeline::{Ingest, PipelineState};
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
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .with_state(state)
}
