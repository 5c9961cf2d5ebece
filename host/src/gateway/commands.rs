//! Device commands over HTTP (`POST /api/v1/devices/{id}/commands`, `GET
//! /api/v1/commands/{id}`) and the answers of the native endpoint's
//! `device.command` service.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::access::{sees_device, unknown_device};
use super::auth::Scope;
use super::caller::Caller;
use super::frames::Call;
use super::{AppError, AppState};
use crate::commands::{CommandError, CommandRecord, CommandRequest, CommandState, Failure};

/// What a waiting caller is given beyond the reply timeout: the deadline
/// sweep's period and a margin.
const WAIT_MARGIN: Duration = Duration::from_secs(2);

/// The body of `POST /api/v1/devices/{id}/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandBody {
    name: String,
    #[serde(default)]
    params: Option<serde_json::Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Answer when the command settles instead of at once.
    #[serde(default)]
    wait: bool,
    #[serde(default)]
    oneway: bool,
    #[serde(default)]
    persistent: bool,
    #[serde(default)]
    expires_in_ms: Option<u64>,
}

/// The args of the `device.command` service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandArgs {
    pub(super) device_id: String,
    #[serde(flatten)]
    pub(super) request: CommandRequest,
}

/// The numeric `code` of a `device.command` response, and the HTTP
/// status of the same outcome.
fn outcome(result: Result<&CommandRecord, &CommandError>) -> (u16, StatusCode) {
    match result {
        Ok(record) => match (record.state, record.failure) {
            (CommandState::Failed, Some(Failure::TimedOut)) => (408, StatusCode::GATEWAY_TIMEOUT),
            (CommandState::Failed, Some(Failure::Send)) => (502, StatusCode::BAD_GATEWAY),
            (CommandState::Failed, _) => (409, StatusCode::OK),
            (CommandState::Expired, _) => (410, StatusCode::OK),
            (CommandState::Queued, _) => (0, StatusCode::ACCEPTED),
            // Sent and not settled: the wait ran out before the deadline
            // sweep answered.
            (CommandState::Sent, _) if !record.oneway => (408, StatusCode::GATEWAY_TIMEOUT),
            _ => (0, StatusCode::OK),
        },
        Err(error) => match error {
            CommandError::UnknownDevice(_) | CommandError::UnknownCommand(_) => {
                (404, StatusCode::NOT_FOUND)
            }
            CommandError::NotSupported { .. } => (501, StatusCode::NOT_IMPLEMENTED),
            CommandError::Encode { .. } => (422, StatusCode::UNPROCESSABLE_ENTITY),
            CommandError::Invalid(_) => (400, StatusCode::BAD_REQUEST),
            CommandError::QueueFull { .. } => (429, StatusCode::TOO_MANY_REQUESTS),
            CommandError::Unavailable(_) | CommandError::Closed => {
                (503, StatusCode::SERVICE_UNAVAILABLE)
            }
        },
    }
}

/// The stable error name of `error`, as in HTTP error bodies.
fn error_name(error: &CommandError) -> &'static str {
    match error {
        CommandError::UnknownDevice(_) => "unknown_device",
        CommandError::UnknownCommand(_) => "unknown_command",
        CommandError::NotSupported { .. } => "not_supported",
        CommandError::Encode { .. } => "encode_error",
        CommandError::Invalid(_) => "bad_request",
        CommandError::QueueFull { .. } => "queue_full",
        CommandError::Unavailable(_) => "unavailable",
        CommandError::Closed => "shutting_down",
    }
}

fn app_error(error: &CommandError) -> AppError {
    let message = match error {
        CommandError::UnknownDevice(device) => unknown_device(device),
        other => other.to_string(),
    };
    AppError::new(outcome(Err(error)).1, error_name(error), message)
}

/// The `response` frame answering a `device.command` call.
pub(super) fn response_frame(call: &Call, result: Result<&CommandRecord, &CommandError>) -> String {
    let (code, _) = outcome(result);
    let (msg, result_value) = match result {
        Ok(record) => {
            let msg = match (code, &record.error) {
                (0, _) => "ok".to_owned(),
                (_, Some(error)) => error.clone(),
                _ => format!("the command is {}", record.state.as_str()),
            };
            let mut value = json!({"state": record.state.as_str(), "command": record.view()});
            if let Some(reply) = &record.reply {
                value["reply"] = reply.clone();
            }
            (msg, value)
        }
        Err(CommandError::UnknownDevice(device)) => (unknown_device(device), json!(null)),
        Err(error) => (error.to_string(), json!(null)),
    };
    json!({
        "type": "response",
        "request_id": call.request_id,
        "service": call.service,
        "code": code,
        "msg": msg,
        "values": call.args,
        "result": result_value,
    })
    .to_string()
}

/// `POST /api/v1/devices/{id}/commands`: 202 with the command at once, or
/// with `"wait": true` its state once it settles (200; 504 when the reply
/// did not come in time; 202 when it was queued for an offline device).
pub(super) async fn send(
    State(app): State<AppState>,
    caller: Caller,
    Path(device): Path<String>,
    body: Result<Json<CommandBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AppError> {
    caller.require(Scope::Command)?;
    let Json(body) =
        body.map_err(|e| AppError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let pipeline = &app.pipeline;
    if !sees_device(pipeline, caller.identity(), &device) {
        return Err(app_error(&CommandError::UnknownDevice(device)));
    }
    let request = CommandRequest {
        name: body.name,
        params: body.params,
        timeout_ms: body.timeout_ms,
        oneway: body.oneway,
        persistent: body.persistent,
        expires_in_ms: body.expires_in_ms,
    };
    let commands = &pipeline.commands;
    let record = commands
        .submit(pipeline, &device, request)
        .await
        .map_err(|e| app_error(&e))?;
    if !body.wait {
        return Ok((StatusCode::ACCEPTED, Json(record.view())).into_response());
    }
    let limit = Duration::from_millis(record.timeout_ms) + WAIT_MARGIN;
    let record = commands
        .wait(&record.id, limit)
        .await
        .map_err(|e| app_error(&e))?;
    let (_, status) = outcome(Ok(&record));
    Ok((status, Json(record.view())).into_response())
}

/// `GET /api/v1/commands/{id}`: a command of the caller's tenant.
pub(super) async fn get(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    caller.require(Scope::Read)?;
    let unknown = || app_error(&CommandError::UnknownCommand(id.clone()));
    let record = app
        .pipeline
        .commands
        .get(&id)
        .await
        .map_err(|e| app_error(&e))?
        .ok_or_else(unknown)?;
    if !caller.sees(&record.tenant_id) {
        return Err(unknown());
    }
    Ok(Json(record.view()))
}
