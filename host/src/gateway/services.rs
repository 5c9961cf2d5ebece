//! The `call` services of the native endpoint, one function each:
//! `devices.list`, `devices.status`, `telemetry.latest`, `scripts.list`
//! and `stats`, answered by one `response` frame.

use serde_json::{Value, json};

use super::AppState;
use super::access::{check_device, latest_of_many, matches, status_of_many, visible_devices};
use super::auth::{Identity, Scope};
use super::frames::{Call, FrameError, Subscribe, select_keys};

/// What a service may see of the calling connection.
#[derive(Debug)]
pub(super) struct ServiceContext<'a> {
    /// Everything the gateway shares.
    pub(super) app: &'a AppState,
    /// Who calls.
    pub(super) identity: Option<&'a Identity>,
    /// The connection's subscriptions.
    pub(super) subscriptions: usize,
    /// Devices the connection watches.
    pub(super) connection_devices: usize,
}

/// The scope a service needs: the instance-wide ones are for admins.
fn scope_of(service: &str) -> Scope {
    match service {
        "scripts.list" | "stats" => Scope::Admin,
        _ => Scope::Read,
    }
}

/// Runs `call` and returns its `response` frame.
pub(super) async fn call(context: &ServiceContext<'_>, call: Call) -> Result<String, FrameError> {
    let scope = scope_of(&call.service);
    if context.identity.is_some_and(|i| !i.allows(scope)) {
        return Err(FrameError::new(
            "insufficient_scope",
            format!("{} needs the {} scope", call.service, scope.as_str()),
        ));
    }
    let result = match call.service.as_str() {
        "devices.list" => devices_list(context, &call.args)?,
        "devices.status" => devices_status(context, &call.args).await?,
        "telemetry.latest" => telemetry_latest(context, &call.args).await?,
        "scripts.list" => scripts_list(context),
        "stats" => stats(context),
        other => {
            return Err(FrameError::new(
                "unknown_service",
                format!(
                    "unknown service {other:?} (devices.list, devices.status, telemetry.latest, scripts.list or stats)"
                ),
            ));
        }
    };
    Ok(json!({
        "type": "response",
        "request_id": call.request_id,
        "service": call.service,
        "code": 0,
        "msg": "ok",
        "values": call.args,
        "result": result,
    })
    .to_string())
}

/// `devices.list`: registered devices the caller may see, filtered like a
/// subscription.
fn devices_list(context: &ServiceContext<'_>, args: &Value) -> Result<Value, FrameError> {
    let filter: Subscribe = parse_args(args, |object| {
        object.insert("id".into(), json!(""));
        object.insert("channel".into(), json!("status"));
    })?;
    let devices: Vec<_> = visible_devices(&context.app.pipeline, context.identity)
        .into_iter()
        .filter(|d| matches(d, &filter))
        .collect();
    Ok(json!(devices))
}

/// `devices.status`: the status of the named (or every visible) device.
async fn devices_status(context: &ServiceContext<'_>, args: &Value) -> Result<Value, FrameError> {
    let state = &context.app.pipeline;
    let ids = named_devices(context, args)?;
    let statuses = status_of_many(state, &ids).await;
    Ok(Value::Array(
        ids.iter()
            .zip(statuses)
            .map(|(device, status)| {
                json!({
                    "device_id": device,
                    "device_name": state.name_of(device),
                    "is_online": status.map(|s| s.online),
                    "timestamp": status.map(|s| s.since_ms),
                    "source": status.map(|s| s.source.as_str()),
                })
            })
            .collect(),
    ))
}

/// `telemetry.latest`: the latest values of the named (or every visible)
/// device, optionally only `keys`.
async fn telemetry_latest(context: &ServiceContext<'_>, args: &Value) -> Result<Value, FrameError> {
    let ids = named_devices(context, args)?;
    let keys: Vec<String> = match args.get("keys") {
        None | Some(Value::Null) => Vec::new(),
        Some(keys) => serde_json::from_value(keys.clone())
            .map_err(|e| FrameError::new("bad_args", format!("keys: {e}")))?,
    };
    let snapshots = latest_of_many(&context.app.pipeline, &ids).await;
    let mut out = serde_json::Map::new();
    for (device, snapshot) in ids.into_iter().zip(snapshots) {
        out.insert(
            device,
            snapshot.map_or(Value::Null, |s| {
                json!({
                    "timestamp": s.updated_ms,
                    "data": select_keys(&s.telemetry, &keys),
                    "attributes": s.attributes,
                })
            }),
        );
    }
    Ok(Value::Object(out))
}

/// `scripts.list`: every product and its script, as `GET /api/v1/scripts`.
fn scripts_list(context: &ServiceContext<'_>) -> Value {
    json!(super::api::script_views(&context.app.pipeline))
}

/// `stats`: this instance's and this connection's figures.
fn stats(context: &ServiceContext<'_>) -> Value {
    let state = &context.app.pipeline;
    json!({
        "connections": context.app.ws.connections.open(),
        "watched_devices": context.app.ws.hub.watched_devices(),
        "interest_devices": state.interest.len(),
        "subscriptions": context.subscriptions,
        "connection_devices": context.connection_devices,
        "tracked_devices": state.status.len(),
        "bus": state.bus.kind(),
    })
}

/// `args.device_ids`, each checked; absent means every visible device.
fn named_devices(context: &ServiceContext<'_>, args: &Value) -> Result<Vec<String>, FrameError> {
    let state = &context.app.pipeline;
    match args.get("device_ids") {
        None | Some(Value::Null) => Ok(visible_devices(state, context.identity)
            .into_iter()
            .map(|d| d.id)
            .collect()),
        Some(ids) => {
            let ids: Vec<String> = serde_json::from_value(ids.clone())
                .map_err(|e| FrameError::new("bad_args", format!("device_ids: {e}")))?;
            for device in &ids {
                check_device(state, context.identity, device)?;
            }
            Ok(ids)
        }
    }
}

fn parse_args<T: serde::de::DeserializeOwned>(
    args: &Value,
    complete: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<T, FrameError> {
    let mut object = match args {
        Value::Object(object) => object.clone(),
        Value::Null => serde_json::Map::new(),
        other => {
            return Err(FrameError::new(
                "bad_args",
                format!("args must be an object, not {other}"),
            ));
        }
    };
    complete(&mut object);
    serde_json::from_value(Value::Object(object))
        .map_err(|e| FrameError::new("bad_args", e.to_string()))
}
