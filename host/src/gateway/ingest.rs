//! HTTP ingest: `POST /api/v1/ingest/{product}/{device}` with the raw
//! payload as the body, and `POST /api/v1/ingest/{product}` with a JSON
//! array of messages. Answered once the messages are queued for a worker.
//!
//! With `[auth]`, the caller needs the `ingest` scope and every target
//! device must be its tenant's (another tenant's device and an unknown one
//! get the same 404); a device of its own registered under another product
//! gets 409. With `accept_unregistered`, an unknown device is created and
//! belongs to the caller's tenant.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::access::{sees_device, unknown_device};
use super::auth::Scope;
use super::caller::Caller;
use super::{AppError, AppState};
use crate::config::check_name;
use crate::message::{RawMessage, SourceKind, now_ms};
use crate::pipeline::{Envelope, Inbound, Ingest};

/// The answer to an accepted ingest request.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Accepted {
    /// How many messages were queued.
    pub accepted: usize,
}

/// One message of a batch: `device_id` and exactly one of `payload` (a JSON
/// document, sent as its text), `payload_text` or `payload_base64`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchMessage {
    device_id: String,
    #[serde(default)]
    payload: Option<serde_json::Value>,
    #[serde(default)]
    payload_text: Option<String>,
    #[serde(default)]
    payload_base64: Option<String>,
}

fn body(body: Result<Bytes, BytesRejection>, limit: u64) -> Result<Bytes, AppError> {
    body.map_err(|rejection| match rejection {
        BytesRejection::FailedToBufferBody(_) => AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the limit of {limit} bytes"),
        ),
        other => AppError::new(StatusCode::BAD_REQUEST, "bad_body", other.body_text()),
    })
}

fn ingest_of(app: &AppState, product: &str) -> Result<Ingest, AppError> {
    let ingest = app.ingest.clone().ok_or_else(|| {
        AppError::new(
            StatusCode::NOT_FOUND,
            "ingest_disabled",
            "HTTP ingest is disabled",
        )
    })?;
    if app.pipeline.scripts.get(product).is_none() {
        return Err(AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_product",
            format!("unknown product {product:?}"),
        ));
    }
    Ok(ingest)
}

fn message(product: &str, device: String, payload: Vec<u8>) -> Result<RawMessage, AppError> {
    check_name(&device).map_err(|reason| {
        AppError::new(
            StatusCode::BAD_REQUEST,
            "bad_device",
            format!("device id: {reason}"),
        )
    })?;
    Ok(RawMessage {
        topic: format!("/api/v1/ingest/{product}/{device}"),
        device_id: device,
        product: product.to_owned(),
        payload,
        received_at: now_ms(),
        source: SourceKind::Http,
    })
}

/// Whether `caller` may send data of `product` for `device`: the checks of
/// the module's head, in the order that tells nothing of other tenants.
fn authorize(app: &AppState, caller: &Caller, product: &str, device: &str) -> Result<(), AppError> {
    let Some(identity) = caller.identity() else {
        return Ok(());
    };
    let state = &app.pipeline;
    let unknown = || {
        AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_device",
            unknown_device(device),
        )
    };
    match state.registry.load().get(device) {
        Some(registered) => {
            if !identity.sees(&registered.tenant) {
                return Err(unknown());
            }
            caller.require(Scope::Ingest)?;
            if registered.product != product {
                return Err(AppError::new(
                    StatusCode::CONFLICT,
                    "wrong_product",
                    format!(
                        "device {device:?} is registered as a {:?}, not a {product:?}; send to /api/v1/ingest/{}/{device}",
                        registered.product, registered.product
                    ),
                ));
            }
            Ok(())
        }
        None => {
            let exists = state.seen.get(device).is_some();
            if exists && !sees_device(state, Some(identity), device)
                || !exists && !app.accept_unregistered
            {
                return Err(unknown());
            }
            caller.require(Scope::Ingest)?;
            // Created now for the caller's tenant, so its data is the tenant's.
            if !exists
                && !state
                    .seen
                    .admit(device, product, now_ms(), identity.tenant_name())
            {
                return Err(AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "device_limit",
                    "this instance keeps track of as many unregistered devices as it may (registry.max_unregistered)",
                ));
            }
            Ok(())
        }
    }
}

async fn submit(app: &AppState, ingest: &Ingest, message: RawMessage) -> Result<(), AppError> {
    let timeout = app.http.enqueue_timeout;
    match tokio::time::timeout(
        timeout,
        ingest.submit(Envelope::new(Inbound::Data(message))),
    )
    .await
    {
        Ok(Ok(())) => {
            metrics::counter!("sluice_ingest_messages_total", "source" => "http").increment(1);
            Ok(())
        }
        Ok(Err(closed)) => Err(AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            closed.to_string(),
        )),
        Err(_) => Err(AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("the workers' queues stayed full for {timeout:?}; try again"),
        )),
    }
}

/// `POST /api/v1/ingest/{product}/{device}`.
pub(super) async fn ingest_one(
    State(app): State<AppState>,
    caller: Caller,
    Path((product, device)): Path<(String, String)>,
    payload: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), AppError> {
    let payload = body(payload, app.http.max_body.as_u64())?;
    let ingest = ingest_of(&app, &product)?;
    let message = message(&product, device, payload.to_vec())?;
    authorize(&app, &caller, &product, &message.device_id)?;
    submit(&app, &ingest, message).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: 1 })))
}

/// `POST /api/v1/ingest/{product}` with `[{"device_id": …, "payload": …}, …]`;
/// every device is checked before any message is queued.
pub(super) async fn ingest_batch(
    State(app): State<AppState>,
    caller: Caller,
    Path(product): Path<String>,
    payload: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), AppError> {
    let payload = body(payload, app.http.max_body.as_u64())?;
    let ingest = ingest_of(&app, &product)?;
    let batch: Vec<BatchMessage> = serde_json::from_slice(&payload).map_err(|e| {
        AppError::new(
            StatusCode::BAD_REQUEST,
            "bad_batch",
            format!("expected a JSON array of messages: {e}"),
        )
    })?;
    if batch.len() > app.http.max_batch {
        return Err(AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "{} messages; a batch holds at most {}",
                batch.len(),
                app.http.max_batch
            ),
        ));
    }
    let messages = batch
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |reason: String| {
                AppError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_batch",
                    format!("message {i}: {reason}"),
                )
            };
            let bytes = match (m.payload, m.payload_text, m.payload_base64) {
                (Some(doc), None, None) => doc.to_string().into_bytes(),
                (None, Some(text), None) => text.into_bytes(),
                (None, None, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| bad(format!("payload_base64: {e}")))?,
                _ => {
                    return Err(bad(
                        "give exactly one of payload, payload_text, payload_base64".into(),
                    ));
                }
            };
            message(&product, m.device_id, bytes).map_err(|e| bad(e.message))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (i, message) in messages.iter().enumerate() {
        authorize(&app, &caller, &product, &message.device_id).map_err(|mut error| {
            error.message = format!("message {i}: {}", error.message);
            error
        })?;
    }
    let total = messages.len();
    for (accepted, message) in messages.into_iter().enumerate() {
        if let Err(mut error) = submit(&app, &ingest, message).await {
            error.message = format!(
                "{} ({accepted} of {total} messages were accepted)",
                error.message
            );
            return Err(error);
        }
    }
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: total })))
}
