//! The compatibility endpoints: a dashboard written for the seed platform
//! works unchanged. Each takes one first frame naming a device (and
//! credentials), answers at once with what is known now, then follows; and
//! after its instance lost Redis, sends what is known now again.

use std::sync::Arc;

use axum::extract::ws::WebSocket;
use axum::extract::{State, WebSocketUpgrade};
use axum::routing::{MethodRouter, get};
use serde_json::json;

use super::access::{check_device, latest_of, sees_device, status_of};
use super::auth::{AuthError, Identity, Scope};
use super::caller::UpgradeAuth;
use super::frames::{CompatHello, FrameError, Rendered, compat_telemetry, parse_json, select_keys};
use super::hub::{Kinds, Watcher};
use super::outbox::Outbox;
use super::socket::{Incoming, Session, Slot, close};
use super::{AppState, upgrade};
use crate::bus::Publication;
use crate::message::now_ms;

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `/api/v1/device/online/status/ws`.
    Status,
    /// `/api/v1/telemetry/datas/current/ws`.
    Telemetry,
    /// `/api/v1/telemetry/datas/current/keys/ws`.
    TelemetryKeys,
}

/// The `GET` route of one endpoint: credentials from the upgrade request
/// when given, otherwise from the first frame.
pub(super) fn route(endpoint: Endpoint) -> MethodRouter<AppState> {
    get(
        move |ws: WebSocketUpgrade,
              State(app): State<AppState>,
              UpgradeAuth(checked): UpgradeAuth| async move {
            upgrade(ws, &app, move |socket, app, slot| {
                serve(socket, app, slot, endpoint, checked)
            })
        },
    )
}

struct CompatWatcher {
    outbox: Arc<Outbox>,
    endpoint: Endpoint,
    keys: Vec<String>,
    /// Woken when the hub delivers again after losing Redis: what is
    /// known now is sent again, as on connect.
    resumed: tokio::sync::Notify,
}

impl Watcher for CompatWatcher {
    fn resumed(&self) {
        self.resumed.notify_one();
    }

    fn deliver(&self, rendered: &Rendered<'_>) {
        match (self.endpoint, rendered.publication) {
            (Endpoint::Status, Publication::Status(_)) => {
                if let Some(frame) = rendered.compat() {
                    self.outbox.push(frame.to_owned());
                }
            }
            (Endpoint::Telemetry, Publication::Telemetry(report)) => {
                if let Some(frame) = rendered.compat() {
                    self.outbox.push_latest(&report.device_id, frame.to_owned());
                }
            }
            (Endpoint::TelemetryKeys, Publication::Telemetry(report)) => {
                let fields = select_keys(&report.data, &self.keys);
                if !self.keys.is_empty() && fields.is_empty() {
                    return;
                }
                if let Some(frame) = compat_telemetry(&fields, report.timestamp) {
                    self.outbox.push_latest(&report.device_id, frame);
                }
            }
            _ => {}
        }
    }
}

/// Waits for a valid first frame; `None` when the client left or was
/// refused (and told why). Its credentials are the frame's, else those
/// that came with the upgrade.
async fn hello(
    session: &mut Session,
    app: &AppState,
    endpoint: Endpoint,
    upgrade: Option<Result<Option<Identity>, AuthError>>,
) -> Option<(CompatHello, Option<Identity>)> {
    let deadline = tokio::time::Instant::now() + app.ws.config.auth_timeout;
    loop {
        let incoming = tokio::select! {
            incoming = session.next() => incoming?,
            _ = tokio::time::sleep_until(deadline) => {
                session.send(FrameError::new("auth_timeout", "no first frame with device_id and credentials in time").frame());
                return None;
            }
        };
        let text = match incoming {
            Incoming::Text(text) => text,
            other => {
                session.send(unreadable(&other).frame());
                continue;
            }
        };
        let hello: CompatHello = match parse_json(&text) {
            Ok(hello) => hello,
            Err(error) => {
                session.send(error.frame());
                continue;
            }
        };
        if endpoint == Endpoint::TelemetryKeys && hello.keys.as_ref().is_none_or(Vec::is_empty) {
            session.send(
                FrameError::new("missing_field", "this endpoint needs \"keys\": [...]").frame(),
            );
            continue;
        }
        let credentials = hello.credentials();
        let checked = match (&upgrade, credentials.is_empty()) {
            (Some(from_upgrade), true) => from_upgrade.clone(),
            _ => app.ws.auth.check(&credentials),
        };
        let identity = match checked {
            Ok(identity) => identity,
            Err(error) => {
                metrics::counter!("sluice_auth_failures_total", "code" => error.code())
                    .increment(1);
                session.send(FrameError::new(error.code(), error.to_string()).frame());
                return None;
            }
        };
        if identity.as_ref().is_some_and(|i| !i.allows(Scope::Read)) {
            session.send(
                FrameError::new("insufficient_scope", "this endpoint needs the read scope").frame(),
            );
            return None;
        }
        if let Err(error) = check_device(&app.pipeline, identity.as_ref(), &hello.device_id) {
            session.send(error.frame());
            continue;
        }
        return Some((hello, identity));
    }
}

/// The error frame for a frame that is not readable text.
pub(super) fn unreadable(incoming: &Incoming) -> FrameError {
    match incoming {
        Incoming::TooLarge(size) => FrameError::new(
            "frame_too_large",
            format!("a frame of {size} bytes is over the limit"),
        ),
        _ => FrameError::new("bad_frame", "frames are JSON text"),
    }
}

async fn serve(
    socket: WebSocket,
    app: AppState,
    slot: Slot,
    endpoint: Endpoint,
    upgrade: Option<Result<Option<Identity>, AuthError>>,
) {
    let mut session = Session::start(socket, &app.ws.config, slot, app.ws.shutdown.clone());
    // Rare, large futures are boxed so an idle connection stays small.
    let Some((hello, identity)) = Box::pin(hello(&mut session, &app, endpoint, upgrade)).await
    else {
        Box::pin(session.close(close::POLICY, "not authenticated")).await;
        return;
    };
    let expires = super::credential_deadline(identity.as_ref());
    let mut registry_changes = app.ws.registry_reloads();
    let device = hello.device_id;
    let keys = hello.keys.unwrap_or_default();
    let watcher = Arc::new(CompatWatcher {
        outbox: session.outbox().clone(),
        endpoint,
        keys: keys.clone(),
        resumed: tokio::sync::Notify::new(),
    });
    let id = app.ws.hub.register();
    let kinds = match endpoint {
        Endpoint::Status => Kinds::STATUS,
        Endpoint::Telemetry | Endpoint::TelemetryKeys => Kinds::TELEMETRY,
    };
    if let Err(error) = Box::pin(app.ws.hub.watch(id, watcher.clone(), &device, kinds)).await {
        session.send(FrameError::new("unavailable", error.to_string()).frame());
        Box::pin(session.close(close::GOING_AWAY, "bus unavailable")).await;
        return;
    }
    if let Some(first) = Box::pin(first_frame(&app, endpoint, &device, &keys)).await {
        session.send(first);
    }
    // Why the session ends, when the server ends it: a close code and reason.
    let mut ended: Option<(u16, &str)> = None;
    loop {
        tokio::select! {
            incoming = session.next() => {
                let Some(incoming) = incoming else { break };
                let error = match incoming {
                    Incoming::Text(_) => FrameError::new(
                        "unexpected_frame",
                        "this endpoint takes one first frame; send text ping to keep alive",
                    ),
                    other => unreadable(&other),
                };
                session.send(error.frame());
            }
            () = watcher.resumed.notified() => {
                // What the gap missed is not replayed: the present is.
                if let Some(now) = Box::pin(first_frame(&app, endpoint, &device, &keys)).await {
                    session.send(now);
                }
            }
            changed = registry_changes.changed() => {
                // The device moved to another tenant, or left the registry.
                if changed.is_ok() && !sees_device(&app.pipeline, identity.as_ref(), &device) {
                    session.send(FrameError::new("unknown_device", super::access::unknown_device(&device)).frame());
                    ended = Some((close::POLICY, "device no longer known"));
                    break;
                }
            }
            _ = tokio::time::sleep_until(expires.unwrap_or_else(tokio::time::Instant::now)), if expires.is_some() => {
                session.send(FrameError::new("token_expired", "the token of this connection has expired; connect again with a new one").frame());
                ended = Some((close::POLICY, "token expired"));
                break;
            }
        }
    }
    if let Err(error) = Box::pin(app.ws.hub.unwatch(id, &device)).await {
        tracing::warn!(%error, device, "could not release a watch");
    }
    let (code, reason) = ended.unwrap_or((close::NORMAL, "bye"));
    Box::pin(session.close(code, reason)).await;
}

/// What is known of `device` now, as the endpoint's first frame.
async fn first_frame(
    app: &AppState,
    endpoint: Endpoint,
    device: &str,
    keys: &[String],
) -> Option<String> {
    let state = &app.pipeline;
    match endpoint {
        Endpoint::Status => {
            let status = status_of(state, device).await;
            Some(
                json!({
                    "device_id": device,
                    "device_name": state.name_of(device),
                    "is_online": status.map_or(0, |s| u8::from(s.online)),
                    "timestamp": status.map_or(0, |s| s.since_ms),
                    "source": status.map_or("unknown", |s| s.source.as_str()),
                })
                .to_string(),
            )
        }
        Endpoint::Telemetry | Endpoint::TelemetryKeys => match latest_of(state, device).await {
            Some(snapshot) => {
                compat_telemetry(&select_keys(&snapshot.telemetry, keys), snapshot.updated_ms)
            }
            None => compat_telemetry(&crate::script::Fields::new(), now_ms()),
        },
    }
}
