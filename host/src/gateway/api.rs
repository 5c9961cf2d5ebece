//! The HTTP API: dead letters, scripts, a device's status and latest
//! values, health and metrics.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

use super::access::{sees_device, unknown_device};
use super::auth::Scope;
use super::caller::Caller;
use super::{AppError, AppState};
use crate::deadletter::DeadLetter;
use crate::latest::Snapshot;
use crate::pipeline::PipelineState;
use crate::script::StatsSnapshot;

/// `?limit=` of list endpoints.
#[derive(Debug, Deserialize)]
pub(super) struct Limit {
    limit: Option<usize>,
}

/// `GET /api/v1/deadletter?limit=100`: the newest dead letters of the
/// caller's devices (an admin's: all), newest first.
pub(super) async fn dead_letters(
    State(app): State<AppState>,
    caller: Caller,
    Query(query): Query<Limit>,
) -> Result<Json<Vec<DeadLetter>>, AppError> {
    caller.require(Scope::Read)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let tenant = match caller.identity() {
        Some(identity) if !identity.allows(Scope::Admin) => Some(identity.tenant_name()),
        _ => None,
    };
    app.pipeline
        .bus
        .dead_letters(limit, tenant)
        .await
        .map(Json)
        .map_err(|e| {
            AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                e.to_string(),
            )
        })
}

/// One product in `GET /api/v1/scripts`.
#[derive(Debug, Serialize)]
pub(super) struct ScriptView {
    /// The product.
    pub(super) product: String,
    /// `loaded` or `failed`.
    pub(super) state: &'static str,
    /// The script version (content hash), when loaded.
    pub(super) version: Option<String>,
    /// The script file.
    pub(super) path: String,
    /// When the running version was loaded (RFC 3339).
    pub(super) loaded_at: Option<String>,
    /// Why the last load or reload failed, if it did (a rejected reload
    /// leaves the previous version `loaded`).
    pub(super) last_error: Option<String>,
    /// The product's status mode.
    pub(super) status_mode: &'static str,
    /// Call counters of the loaded version.
    pub(super) stats: Option<StatsSnapshot>,
    /// Mean time per call in microseconds.
    pub(super) mean_call_us: Option<f64>,
    /// How many times hot reload swapped in a new version.
    pub(super) reloads: u64,
    /// How many changed files hot reload refused.
    pub(super) rejected_reloads: u64,
    /// How many times hot reload compiled and validated a changed file.
    pub(super) validations: u64,
}

/// `GET /api/v1/scripts`: every product and its script.
pub(super) async fn scripts(State(app): State<AppState>) -> Json<Vec<ScriptView>> {
    Json(script_views(&app.pipeline))
}

/// Every product and its script.
pub(super) fn script_views(pipeline: &PipelineState) -> Vec<ScriptView> {
    pipeline
        .scripts
        .list()
        .iter()
        .map(|product| {
            let stats = product.script.as_ref().map(|s| s.stats().snapshot());
            ScriptView {
                product: product.name.clone(),
                state: if product.script.is_some() {
                    "loaded"
                } else {
                    "failed"
                },
                version: product.script.as_ref().map(|s| s.id().version.clone()),
                path: product.path.display().to_string(),
                loaded_at: product
                    .script
                    .as_ref()
                    .map(|s| humantime::format_rfc3339_millis(s.info().loaded_at).to_string()),
                last_error: product.error.clone(),
                status_mode: product.mode.name(),
                mean_call_us: stats
                    .filter(|s| s.calls > 0)
                    .map(|s| s.nanos as f64 / s.calls as f64 / 1000.0),
                stats,
                reloads: product.reloads,
                rejected_reloads: product.rejected,
                validations: product.validations,
            }
        })
        .collect()
}

/// `GET /api/v1/devices/{device}`.
#[derive(Debug, Serialize)]
pub(super) struct DeviceView {
    /// The device.
    pub(super) device_id: String,
    /// Its name.
    pub(super) device_name: String,
    /// `1` online, `0` offline, absent when unknown.
    pub(super) is_online: Option<u8>,
    /// Why its status last changed.
    pub(super) status_source: Option<&'static str>,
    /// When its status last changed, ms.
    pub(super) status_since: Option<i64>,
    /// Its latest values.
    pub(super) latest: Option<Snapshot>,
}

/// `GET /api/v1/devices/{device}`: status and latest values. Another
/// tenant's device is answered exactly like one that does not exist.
pub(super) async fn device(
    State(app): State<AppState>,
    caller: Caller,
    Path(device): Path<String>,
) -> Result<Json<DeviceView>, AppError> {
    let pipeline = &app.pipeline;
    let unknown = || {
        AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_device",
            unknown_device(&device),
        )
    };
    if caller.identity().is_some() && !sees_device(pipeline, caller.identity(), &device) {
        return Err(unknown());
    }
    caller.require(Scope::Read)?;
    let status = pipeline.status.get(&device);
    let latest = match pipeline.latest.get(&device) {
        Some(snapshot) => Some(snapshot),
        None => pipeline.bus.load_latest(&device).await.map_err(|e| {
            AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                e.to_string(),
            )
        })?,
    };
    if status.is_none() && latest.is_none() && pipeline.registry.load().get(&device).is_none() {
        return Err(unknown());
    }
    Ok(Json(DeviceView {
        device_name: pipeline.name_of(&device),
        is_online: status.map(|s| u8::from(s.online)),
        status_source: status.map(|s| s.source.as_str()),
        status_since: status.map(|s| s.since_ms),
        device_id: device,
        latest,
    }))
}

/// `GET /health`: liveness. The process serves requests; what it depends
/// on is `/ready`'s business.
pub(super) async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// How long `/ready` waits for the bus to answer.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /ready`: readiness. 200 when the bus answers, every broker source
/// (MQTT, Kafka) is connected and subscribed, and no task keeps failing;
/// 503 naming what is not, otherwise.
pub(super) async fn ready(State(app): State<AppState>) -> impl IntoResponse {
    let bus = app.pipeline.bus.kind();
    let bus_error = match tokio::time::timeout(READY_TIMEOUT, app.pipeline.bus.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.to_string()),
        Err(_) => Some(format!("no answer within {READY_TIMEOUT:?}")),
    };
    let mut checks = vec![serde_json::json!({
        "name": format!("bus {bus}"),
        "ready": bus_error.is_none(),
        "error": bus_error,
    })];
    for (name, source) in &app.sources {
        checks.push(serde_json::json!({
            "name": name,
            "ready": source.is_connected(),
            "error": (!source.is_connected()).then_some("not connected (or a subscription was refused)"),
        }));
    }
    for failing in app.pipeline.tasks.failing() {
        checks.push(serde_json::json!({
            "name": format!("task {}", failing.task),
            "ready": false,
            "error": format!(
                "panicked {} times in the last minute; last: {}",
                failing.recent_panics, failing.last_panic
            ),
        }));
    }
    let ready = checks.iter().all(|c| c["ready"] == true);
    if !ready {
        metrics::counter!("sluice_not_ready_total").increment(1);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (status, Json(body))
}

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}
