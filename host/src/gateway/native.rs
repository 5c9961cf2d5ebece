//! The native endpoint `GET /ws`: several filtered subscriptions per
//! connection, service calls, JSON frames tagged by `type`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::ws::WebSocket;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::{check_device, latest_of, resolve, status_of, visible_devices};
use super::auth::{AuthError, Credentials, Identity};
use super::compat::unreadable;
use super::frames::{
    self, Call, Channel, ClientFrame, FrameError, Rendered, Subscribe, parse_client_frame,
    select_keys,
};
use super::hub::{Watcher, WatcherId};
use super::outbox::Outbox;
use super::socket::{Incoming, Session, Slot, close};
use super::{AppState, upgrade};
use crate::bus::Publication;

/// `?token=` or `?api_key=` on the upgrade request.
#[derive(Debug, Default, Deserialize)]
pub(super) struct AuthQuery {
    token: Option<String>,
    api_key: Option<String>,
}

/// `GET /ws`.
pub(super) async fn native(
    ws: WebSocketUpgrade,
    State(app): State<AppState>,
    Query(query): Query<AuthQuery>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let credentials = Credentials {
        token: bearer.or(query.token),
        api_key: query.api_key,
    };
    upgrade(ws, &app, move |socket, app, slot| {
        serve(socket, app, slot, credentials)
    })
}

struct Subscription {
    request: Subscribe,
    devices: BTreeSet<String>,
}

struct NativeWatcher {
    outbox: Arc<Outbox>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
}

impl NativeWatcher {
    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscription>> {
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Watcher for NativeWatcher {
    fn deliver(&self, rendered: &Rendered<'_>) {
        let publication = rendered.publication;
        let device = publication.device();
        for (id, subscription) in self.subscriptions().iter() {
            if !subscription.devices.contains(device) {
                continue;
            }
            let request = &subscription.request;
            match (request.channel, publication) {
                (Channel::Telemetry, Publication::Telemetry(report)) => {
                    let frame = if request.keys.is_empty() {
                        frames::device_data_with(id, rendered.device_data_tail())
                    } else {
                        let data = select_keys(&report.data, &request.keys);
                        if data.is_empty() {
                            continue;
                        }
                        frames::device_data(id, device, report.timestamp, &data)
                    };
                    self.outbox
                        .push_latest(&format!("{id}\u{0}{device}"), frame);
                }
                (Channel::Status, Publication::Status(change)) => {
                    self.outbox.push(frames::status(
                        id,
                        device,
                        &change.device_name,
                        Some(crate::status::DeviceStatus {
                            online: change.is_online,
                            since_ms: change.timestamp,
                            source: change.source,
                        }),
                    ));
                }
                (Channel::Alerts, Publication::Alert(alert))
                    if request.alert_levels.is_empty()
                        || request.alert_levels.contains(&alert.severity) =>
                {
                    self.outbox.push(frames::alert(id, alert));
                }
                (Channel::Events, Publication::Event(event)) => {
                    self.outbox.push(frames::event(id, event));
                }
                _ => {}
            }
        }
    }
}

/// One authenticated connection.
struct Client {
    app: AppState,
    identity: Option<Identity>,
    id: WatcherId,
    watcher: Arc<NativeWatcher>,
    /// Device → how many of this connection's subscriptions cover it.
    devices: HashMap<String, usize>,
}

async fn authenticate(
    session: &mut Session,
    app: &AppState,
    credentials: Credentials,
) -> Result<Option<Identity>, ()> {
    if !app.ws.auth.enabled() {
        return Ok(None);
    }
    let refuse = |session: &Session, error: AuthError| {
        session.send(FrameError::new(error.code(), error.to_string()).frame());
    };
    if credentials.token.is_some() || credentials.api_key.is_some() {
        return match app.ws.auth.check(&credentials) {
            Ok(identity) => Ok(identity),
            Err(error) => {
                refuse(session, error);
                Err(())
            }
        };
    }
    let deadline = tokio::time::Instant::now() + app.ws.config.auth_timeout;
    loop {
        let incoming = tokio::select! {
            incoming = session.next() => incoming.ok_or(())?,
            _ = tokio::time::sleep_until(deadline) => {
                session.send(FrameError::new("auth_timeout", "no auth frame in time").frame());
                return Err(());
            }
        };
        let Incoming::Text(text) = incoming else {
            session.send(unreadable(&incoming).frame());
            continue;
        };
        match parse_client_frame(&text) {
            Ok(ClientFrame::Auth(credentials)) => match app.ws.auth.check(&credentials) {
                Ok(identity) => {
                    session.send(
                        json!({"type": "authenticated", "tenant_id": identity.as_ref().map(|i| &i.tenant)})
                            .to_string(),
                    );
                    return Ok(identity);
                }
                Err(error) => {
                    refuse(session, error);
                    return Err(());
                }
            },
            Ok(_) => {
                session.send(FrameError::new("unauthenticated", "send an auth frame first").frame())
            }
            Err(error) => session.send(error.frame()),
        }
    }
}

async fn serve(socket: WebSocket, app: AppState, slot: Slot, credentials: Credentials) {
    let mut session = Session::start(socket, &app.ws.config, slot);
    // Rare, large futures are boxed so an idle connection stays small.
    let Ok(identity) = Box::pin(authenticate(&mut session, &app, credentials)).await else {
        Box::pin(session.close(close::POLICY, "not authenticated")).await;
        return;
    };
    let mut registry_changes = app.ws.registry_changes.clone();
    registry_changes.mark_unchanged();
    let mut client = Client {
        id: app.ws.hub.register(),
        watcher: Arc::new(NativeWatcher {
            outbox: session.outbox().clone(),
            subscriptions: Mutex::default(),
        }),
        app,
        identity,
        devices: HashMap::new(),
    };
    loop {
        tokio::select! {
            incoming = session.next() => {
                let Some(incoming) = incoming else { break };
                let Incoming::Text(text) = incoming else {
                    session.send(unreadable(&incoming).frame());
                    continue;
                };
                let reply = match parse_client_frame(&text) {
                    Ok(frame) => Box::pin(client.handle(frame)).await,
                    Err(error) => Err(error),
                };
                match reply {
                    Ok(frames) => frames.into_iter().for_each(|f| session.send(f)),
                    Err(error) => session.send(error.frame()),
                }
            }
            changed = registry_changes.changed() => {
                if changed.is_err() {
                    continue;
                }
                Box::pin(client.follow_registry()).await;
            }
        }
    }
    Box::pin(client.leave()).await;
    Box::pin(session.close(close::NORMAL, "bye")).await;
}

impl Client {
    async fn handle(&mut self, frame: ClientFrame) -> Result<Vec<String>, FrameError> {
        match frame {
            ClientFrame::Auth(_) => Err(FrameError::new(
                "already_authenticated",
                "this connection is already authenticated",
            )),
            ClientFrame::Ping => Ok(vec![json!({"type": "pong"}).to_string()]),
            ClientFrame::Subscribe(request) => {
                let id = request.id.clone();
                self.subscribe(*request).await.map_err(|e| e.about(&id))
            }
            ClientFrame::Unsubscribe(id) => self.unsubscribe(&id).await.map_err(|e| e.about(&id)),
            ClientFrame::Call(call) => {
                let request_id = call.request_id.clone();
                self.call(call).await.map_err(|e| e.about(&request_id))
            }
        }
    }

    async fn subscribe(&mut self, request: Subscribe) -> Result<Vec<String>, FrameError> {
        let config = &self.app.ws.config;
        {
            let subscriptions = self.watcher.subscriptions();
            if subscriptions.contains_key(&request.id) {
                return Err(FrameError::new(
                    "duplicate_subscription",
                    format!("subscription {:?} exists; unsubscribe it first", request.id),
                ));
            }
            if subscriptions.len() >= config.max_subscriptions {
                return Err(FrameError::new(
                    "too_many_subscriptions",
                    format!(
                        "a connection holds at most {} subscriptions",
                        config.max_subscriptions
                    ),
                ));
            }
        }
        if !request.alert_levels.is_empty() && request.channel != Channel::Alerts {
            return Err(FrameError::new(
                "bad_filter",
                "alert_levels filters the alerts channel only",
            ));
        }
        if !request.keys.is_empty() && request.channel != Channel::Telemetry {
            return Err(FrameError::new(
                "bad_filter",
                "keys filters the telemetry channel only",
            ));
        }
        let devices = resolve(&self.app.pipeline, self.identity.as_ref(), &request)?;
        let added = devices
            .iter()
            .filter(|d| !self.devices.contains_key(*d))
            .count();
        if self.devices.len() + added > config.max_devices {
            return Err(FrameError::new(
                "too_many_devices",
                format!(
                    "a connection watches at most {} devices; this subscription covers {}",
                    config.max_devices,
                    devices.len()
                ),
            ));
        }
        let id = request.id.clone();
        let channel = request.channel;
        let keys = request.keys.clone();
        self.watcher.subscriptions().insert(
            id.clone(),
            Subscription {
                request,
                devices: devices.clone(),
            },
        );
        if let Err(error) = self.hold(&devices).await {
            self.watcher.subscriptions().remove(&id);
            return Err(error);
        }
        let mut frames = vec![
            json!({"type": "subscribed", "id": id, "channel": channel_name(channel), "devices": devices})
                .to_string(),
        ];
        let state = &self.app.pipeline;
        for device in &devices {
            match channel {
                Channel::Telemetry => {
                    if let Some(snapshot) = latest_of(state, device).await {
                        let data = select_keys(&snapshot.telemetry, &keys);
                        if keys.is_empty() || !data.is_empty() {
                            frames.push(frames::device_data(
                                &id,
                                device,
                                snapshot.updated_ms,
                                &data,
                            ));
                        }
                    }
                }
                Channel::Status => frames.push(frames::status(
                    &id,
                    device,
                    &state.name_of(device),
                    status_of(state, device).await,
                )),
                Channel::Alerts | Channel::Events => {}
            }
        }
        Ok(frames)
    }

    async fn unsubscribe(&mut self, id: &str) -> Result<Vec<String>, FrameError> {
        let Some(subscription) = self.watcher.subscriptions().remove(id) else {
            return Err(FrameError::new(
                "unknown_subscription",
                format!("no subscription {id:?} on this connection"),
            ));
        };
        self.release(&subscription.devices).await;
        Ok(vec![json!({"type": "unsubscribed", "id": id}).to_string()])
    }

    /// Counts `devices` as covered once more, watching newly covered ones;
    /// on failure, nothing stays counted.
    async fn hold(&mut self, devices: &BTreeSet<String>) -> Result<(), FrameError> {
        let mut held = BTreeSet::new();
        for device in devices {
            let count = self.devices.entry(device.clone()).or_default();
            *count += 1;
            if *count == 1
                && let Err(error) = self
                    .app
                    .ws
                    .hub
                    .watch(self.id, self.watcher.clone(), device)
                    .await
            {
                self.devices.remove(device);
                self.release(&held).await;
                return Err(FrameError::new("unavailable", error.to_string()));
            }
            held.insert(device.clone());
        }
        Ok(())
    }

    /// Counts `devices` as covered once less, unwatching uncovered ones.
    async fn release(&mut self, devices: &BTreeSet<String>) {
        for device in devices {
            let Some(count) = self.devices.get_mut(device) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.devices.remove(device);
                if let Err(error) = self.app.ws.hub.unwatch(self.id, device).await {
                    tracing::warn!(%error, device, "could not release a watch");
                }
            }
        }
    }

    /// Re-resolves subscriptions that select from the registry.
    async fn follow_registry(&mut self) {
        let changes: Vec<(String, BTreeSet<String>, BTreeSet<String>)> = {
            let subscriptions = self.watcher.subscriptions();
            subscriptions
                .iter()
                .filter(|(_, s)| s.request.selects_from_registry())
                .filter_map(|(id, s)| {
                    let now =
                        resolve(&self.app.pipeline, self.identity.as_ref(), &s.request).ok()?;
                    (now != s.devices).then(|| (id.clone(), s.devices.clone(), now))
                })
                .collect()
        };
        for (id, before, now) in changes {
            let added: BTreeSet<String> = now.difference(&before).cloned().collect();
            let removed: BTreeSet<String> = before.difference(&now).cloned().collect();
            // Held first, so a failure leaves the subscription as it was.
            if let Err(error) = self.hold(&added).await {
                tracing::warn!(%error.message, "could not follow a registry change");
                continue;
            }
            if let Some(subscription) = self.watcher.subscriptions().get_mut(&id) {
                subscription.devices = now;
            }
            self.release(&removed).await;
        }
    }

    async fn leave(&mut self) {
        let devices: BTreeSet<String> = self.devices.keys().cloned().collect();
        self.watcher.subscriptions().clear();
        for device in devices {
            if let Err(error) = self.app.ws.hub.unwatch(self.id, &device).await {
                tracing::warn!(%error, device, "could not release a watch");
            }
        }
        self.devices.clear();
    }

    async fn call(&mut self, call: Call) -> Result<Vec<String>, FrameError> {
        let result = self.service(&call.service, &call.args).await?;
        Ok(vec![
            json!({
                "type": "response",
                "request_id": call.request_id,
                "service": call.service,
                "code": 0,
                "msg": "ok",
                "values": call.args,
                "result": result,
            })
            .to_string(),
        ])
    }

    async fn service(&self, service: &str, args: &Value) -> Result<Value, FrameError> {
        let state = &self.app.pipeline;
        let identity = self.identity.as_ref();
        match service {
            "devices.list" => {
                let filter: Subscribe = parse_args(args, |object| {
                    object.insert("id".into(), json!(""));
                    object.insert("channel".into(), json!("status"));
                })?;
                let devices: Vec<_> = visible_devices(state, identity)
                    .into_iter()
                    .filter(|d| super::access::matches(d, &filter))
                    .collect();
                Ok(json!(devices))
            }
            "devices.status" => {
                let ids = self.named_devices(args)?;
                let mut out = Vec::with_capacity(ids.len());
                for device in ids {
                    let status = status_of(state, &device).await;
                    out.push(json!({
                        "device_id": device,
                        "device_name": state.name_of(&device),
                        "is_online": status.map(|s| s.online),
                        "timestamp": status.map(|s| s.since_ms),
                        "source": status.map(|s| s.source.as_str()),
                    }));
                }
                Ok(Value::Array(out))
            }
            "telemetry.latest" => {
                let ids = self.named_devices(args)?;
                let keys: Vec<String> = match args.get("keys") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(keys) => serde_json::from_value(keys.clone())
                        .map_err(|e| FrameError::new("bad_args", format!("keys: {e}")))?,
                };
                let mut out = serde_json::Map::new();
                for device in ids {
                    let snapshot = latest_of(state, &device).await;
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
            "scripts.list" => Ok(json!(super::api::script_views(state))),
            "stats" => Ok(json!({
                "connections": self.app.ws.connections.open(),
                "watched_devices": self.app.ws.hub.watched_devices(),
                "interest_devices": state.interest.len(),
                "subscriptions": self.watcher.subscriptions().len(),
                "connection_devices": self.devices.len(),
                "tracked_devices": state.status.len(),
                "bus": state.bus.kind(),
            })),
            other => Err(FrameError::new(
                "unknown_service",
                format!(
                    "unknown service {other:?} (devices.list, devices.status, telemetry.latest, scripts.list or stats)"
                ),
            )),
        }
    }

    /// `args.device_ids`, each checked; absent means every visible device.
    fn named_devices(&self, args: &Value) -> Result<Vec<String>, FrameError> {
        let state = &self.app.pipeline;
        match args.get("device_ids") {
            None | Some(Value::Null) => Ok(visible_devices(state, self.identity.as_ref())
                .into_iter()
                .map(|d| d.id)
                .collect()),
            Some(ids) => {
                let ids: Vec<String> = serde_json::from_value(ids.clone())
                    .map_err(|e| FrameError::new("bad_args", format!("device_ids: {e}")))?;
                for device in &ids {
                    check_device(state, self.identity.as_ref(), device)?;
                }
                Ok(ids)
            }
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

fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Telemetry => "telemetry",
        Channel::Status => "status",
        Channel::Alerts => "alerts",
        Channel::Events => "events",
    }
}
