//! The native endpoint `GET /ws`: several filtered subscriptions per
//! connection, service calls (see [`super::services`]), JSON frames tagged
//! by `type`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::ws::WebSocket;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::Response;
use serde_json::json;

use super::access::{covered, latest_of_many, resolve, sees_device, status_of_many};
use super::auth::{AuthError, Identity, Scope};
use super::caller::UpgradeAuth;
use super::compat::unreadable;
use super::frames::{
    self, Channel, ClientFrame, FrameError, Rendered, Subscribe, parse_client_frame, select_keys,
};
use super::hub::{Kinds, Watcher, WatcherId};
use super::outbox::Outbox;
use super::services::{self, ServiceContext};
use super::socket::{Incoming, Session, Slot, close};
use super::{AppState, upgrade};
use crate::bus::Publication;
use crate::bus::history::Position;

/// Devices whose snapshots are looked up in one go.
const SNAPSHOT_CHUNK: usize = 1000;
/// Positions one `since` may name (one per tenant).
const MAX_SINCE: usize = 64;
/// `device.command` calls one connection may wait for at once.
const MAX_WAITING_CALLS: usize = 64;

/// `GET /ws`: credentials may come with the upgrade (header, or query
/// where allowed), else in an `auth` frame.
pub(super) async fn native(
    ws: WebSocketUpgrade,
    State(app): State<AppState>,
    UpgradeAuth(checked): UpgradeAuth,
) -> Response {
    upgrade(ws, &app, move |socket, app, slot| {
        serve(socket, app, slot, checked)
    })
}

pub(super) struct Subscription {
    pub(super) request: Subscribe,
    pub(super) devices: BTreeSet<String>,
    /// The groups it watches as a whole (a subscription carried by its
    /// groups has no `devices`).
    groups: BTreeSet<String>,
    /// While a resuming subscription replays what was missed, the live
    /// frames that arrive meanwhile (with their positions), sent after it.
    pending: Option<Vec<(Option<Position>, String)>>,
    /// The newest position sent, per tenant, of a subscription with
    /// positions: where it catches up from after the hub lost Redis.
    seen: Vec<Position>,
    /// The hub lost its subscriber connection since this subscription
    /// last caught up: publications of the gap did not arrive.
    gap: bool,
}

impl Subscription {
    fn new(request: Subscribe, devices: BTreeSet<String>, pending: bool) -> Self {
        Subscription {
            request,
            devices,
            groups: BTreeSet::new(),
            pending: pending.then(Vec::new),
            seen: Vec::new(),
            gap: false,
        }
    }

    /// Notes that a frame at `position` was sent.
    fn saw(&mut self, position: Option<&Position>) {
        let Some(position) = position else {
            return;
        };
        // Per live frame: the same epoch only moves the offset (no copy).
        match self.seen.iter_mut().find(|p| p.tenant == position.tenant) {
            Some(seen) if seen.epoch == position.epoch => {
                seen.offset = seen.offset.max(position.offset);
            }
            Some(seen) => *seen = position.clone(),
            None => self.seen.push(position.clone()),
        }
    }

    /// The frame of `publication` for this subscription (`id`), unless it
    /// does not want it; telemetry is framed by the caller.
    fn frame(&self, id: &str, publication: &Publication) -> Option<String> {
        let request = &self.request;
        match (request.channel, publication) {
            (Channel::Status, Publication::Status(change)) => {
                Some(frames::status_change(id, change))
            }
            (Channel::Alerts, Publication::Alert(alert))
                if request.alert_levels.is_empty()
                    || request.alert_levels.contains(&alert.severity) =>
            {
                Some(frames::alert(id, alert))
            }
            (Channel::Events, Publication::Event(event)) => Some(frames::event(id, event)),
            (Channel::Commands, Publication::Command(record)) => {
                let mut frame = json!({"type": "command", "id": id, "device_id": record.device_id, "command": record.view()});
                if let Some(position) = &record.position {
                    frame["position"] = json!(position);
                }
                Some(frame.to_string())
            }
            _ => None,
        }
    }

    /// Sends (or, while replaying, holds) the frame of `publication`, a
    /// device's alert, event, status change or command state change, if
    /// this subscription (`id`) wants it.
    fn route(&mut self, id: &str, publication: &Publication, outbox: &Outbox) {
        if self.devices.contains(publication.device()) {
            self.send(id, publication, outbox);
        }
    }

    /// Sends (or, while replaying, holds) the frame of `publication`, if
    /// this subscription (`id`) wants its kind.
    fn send(&mut self, id: &str, publication: &Publication, outbox: &Outbox) {
        let Some(frame) = self.frame(id, publication) else {
            return;
        };
        match &mut self.pending {
            Some(pending) => pending.push((publication.position().cloned(), frame)),
            None => {
                outbox.push(frame);
                self.saw(publication.position());
            }
        }
    }
}

struct NativeWatcher {
    outbox: Arc<Outbox>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    /// Woken when the hub delivers again after losing Redis: the session
    /// then replays what its subscriptions missed.
    catch_up: tokio::sync::Notify,
    /// Who the connection is for: a group's channel carries every tenant's
    /// members, and each report is checked against it.
    identity: Option<Identity>,
    /// The registry a member's groups are read from.
    pipeline: Arc<crate::pipeline::PipelineState>,
}

impl NativeWatcher {
    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscription>> {
        // Held while frames are queued, never across an await.
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NativeWatcher {
    /// Queues the `device_data` frame of `report` for subscription `id`
    /// (only `keys`, when given; nothing when it has none of them),
    /// conflated with the device's frame still waiting.
    fn push_report(
        &self,
        id: &str,
        keys: &[String],
        rendered: &Rendered<'_>,
        report: &crate::bus::TelemetryReport,
    ) {
        let device = report.device_id.as_str();
        let frame = if keys.is_empty() {
            rendered
                .device_data_tail()
                .map(|tail| frames::device_data_with(id, tail))
        } else {
            let data = select_keys(&report.data, keys);
            if data.is_empty() {
                return;
            }
            frames::device_data(id, device, report.timestamp, &data)
        };
        if let Some(frame) = frame {
            self.outbox
                .push_latest(&format!("{id}\u{0}{device}"), frame);
        }
    }
}

impl Watcher for NativeWatcher {
    fn interrupted(&self) {
        for subscription in self.subscriptions().values_mut() {
            subscription.gap = true;
            if positioned(subscription.request.channel) {
                // Live frames from now wait for what the gap missed.
                subscription.pending.get_or_insert_with(Vec::new);
            }
        }
    }

    fn resumed(&self) {
        self.catch_up.notify_one();
    }

    fn deliver_group(&self, group: &str, rendered: &Rendered<'_>) {
        let publication = rendered.publication;
        // A group's channel carries every tenant's members: the tenant the
        // publication names, and the one the registry gives the device
        // now (a status change may name the tenant it was recorded under).
        if self
            .identity
            .as_ref()
            .is_some_and(|i| !i.sees(publication.tenant()))
            || !super::access::sees_device(
                &self.pipeline,
                self.identity.as_ref(),
                publication.device(),
            )
        {
            return;
        }
        // A member of several of a subscription's groups comes on each of
        // their channels: taken from the first only. A report names its
        // device's groups as the publisher saw them; the rest are read
        // from the registry, and a copy on a channel the registry here
        // does not list for the device (it was just moved, and the
        // publisher's registry is not this one yet) is taken too.
        let registered;
        let member_of: &[String] = match publication {
            Publication::Telemetry(report) => &report.groups,
            _ => {
                registered = self
                    .pipeline
                    .registry
                    .load()
                    .get(publication.device())
                    .map(|d| d.groups.clone())
                    .unwrap_or_default();
                &registered
            }
        };
        for (id, subscription) in self.subscriptions().iter_mut() {
            if !subscription.groups.contains(group) {
                continue;
            }
            let first = member_of.iter().find(|g| subscription.groups.contains(*g));
            let listed = member_of.iter().any(|g| g == group);
            if listed && first.is_some_and(|first| first != group) {
                continue;
            }
            match publication {
                Publication::Telemetry(report) => {
                    if subscription.request.channel == Channel::Telemetry {
                        self.push_report(id, &subscription.request.keys, rendered, report);
                    }
                }
                _ => subscription.send(id, publication, &self.outbox),
            }
        }
    }

    fn deliver(&self, rendered: &Rendered<'_>) {
        let publication = rendered.publication;
        let device = publication.device();
        for (id, subscription) in self.subscriptions().iter_mut() {
            if !subscription.devices.contains(device) {
                continue;
            }
            let request = &subscription.request;
            if let (Channel::Telemetry, Publication::Telemetry(report)) =
                (request.channel, publication)
            {
                self.push_report(id, &request.keys, rendered, report);
                continue;
            }
            subscription.route(id, publication, &self.outbox);
        }
    }
}

/// Whether frames of `channel` carry positions (and can be resumed).
fn positioned(channel: Channel) -> bool {
    matches!(
        channel,
        Channel::Alerts | Channel::Events | Channel::Status | Channel::Commands
    )
}

/// What a resuming subscription replays.
#[derive(Debug, Default)]
struct Replay {
    /// Every position resumed after was recovered.
    recovered: bool,
    /// What was missed, oldest first.
    entries: Vec<crate::bus::history::Recorded>,
    /// The newest position of each recovered tenant when its history was
    /// read: live frames up to it were replayed.
    replayed: Vec<Position>,
    /// The newest position of each tenant the subscription covers.
    tops: Vec<Position>,
}

/// One authenticated connection.
struct Client {
    app: AppState,
    identity: Option<Identity>,
    id: WatcherId,
    watcher: Arc<NativeWatcher>,
    /// Device → how many of this connection's subscriptions cover it, per channel.
    devices: HashMap<String, Coverage>,
    /// Group → how many of this connection's subscriptions watch it as a whole.
    groups: HashMap<String, u32>,
    /// Forwards command state changes, once a `commands` subscription exists.
    commands: Option<tokio::task::JoinHandle<()>>,
    /// `device.command` calls waiting for their command to settle.
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

/// How many subscriptions of one connection cover a device, per channel.
#[derive(Debug, Clone, Copy, Default)]
struct Coverage([u32; 5]);

impl Coverage {
    fn slot(channel: Channel) -> usize {
        match channel {
            Channel::Telemetry => 0,
            Channel::Status => 1,
            Channel::Alerts => 2,
            Channel::Events => 3,
            // Never held in the hub: command frames come from the
            // commands service, not publications.
            Channel::Commands => 4,
        }
    }

    /// The channels some subscription covers.
    fn kinds(self) -> Kinds {
        [
            Kinds::TELEMETRY,
            Kinds::STATUS,
            Kinds::ALERTS,
            Kinds::EVENTS,
        ]
        .into_iter()
        .zip(self.0)
        .filter(|(_, count)| *count > 0)
        .fold(Kinds::NONE, |kinds, (kind, _)| kinds.union(kind))
    }
}

/// Who the session is for: the credential checked at the upgrade, or the
/// first `auth` frame within `auth_timeout`. `Ok(None)` without `[auth]`.
async fn authenticate(
    session: &mut Session,
    app: &AppState,
    checked: Option<Result<Option<Identity>, AuthError>>,
) -> Result<Option<Identity>, ()> {
    if !app.ws.auth.enabled() {
        return Ok(None);
    }
    let refuse = |session: &Session, error: AuthError| {
        metrics::counter!("sluice_auth_failures_total", "code" => error.code()).increment(1);
        session.send(FrameError::new(error.code(), error.to_string()).frame());
    };
    match checked {
        Some(Ok(identity)) => return Ok(identity),
        Some(Err(error)) => {
            refuse(session, error);
            return Err(());
        }
        None => {}
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
                        json!({"type": "authenticated", "tenant_id": identity.as_ref().and_then(|i| i.tenant.as_ref())})
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

async fn serve(
    socket: WebSocket,
    app: AppState,
    slot: Slot,
    checked: Option<Result<Option<Identity>, AuthError>>,
) {
    let mut session = Session::start(socket, &app.ws.config, slot, app.ws.shutdown.clone());
    // Rare, large futures are boxed so an idle connection stays small.
    let Ok(identity) = Box::pin(authenticate(&mut session, &app, checked)).await else {
        Box::pin(session.close(close::POLICY, "not authenticated")).await;
        return;
    };
    let expires = super::credential_deadline(identity.as_ref());
    let mut registry_changes = app.ws.registry_reloads();
    let mut client = Client {
        id: app.ws.hub.register(),
        watcher: Arc::new(NativeWatcher {
            outbox: session.outbox().clone(),
            subscriptions: Mutex::default(),
            catch_up: tokio::sync::Notify::new(),
            identity: identity.clone(),
            pipeline: app.pipeline.clone(),
        }),
        app,
        identity,
        devices: HashMap::new(),
        groups: HashMap::new(),
        commands: None,
        calls: Arc::default(),
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
                    // Replies wait for the writer: a response listing
                    // thousands of devices is answered, not refused.
                    Ok(frames) => {
                        for frame in frames {
                            if !session.outbox().push_paced(frame).await {
                                break;
                            }
                        }
                    }
                    Err(error) => session.send(error.frame()),
                }
            }
            changed = registry_changes.changed() => {
                if changed.is_err() {
                    continue;
                }
                Box::pin(client.follow_registry()).await;
            }
            () = client.watcher.catch_up.notified() => {
                Box::pin(client.catch_up()).await;
            }
            _ = tokio::time::sleep_until(expires.unwrap_or_else(tokio::time::Instant::now)), if expires.is_some() => {
                session.send(FrameError::new("token_expired", "the token of this connection has expired; connect again with a new one").frame());
                Box::pin(client.leave()).await;
                Box::pin(session.close(close::POLICY, "token expired")).await;
                return;
            }
        }
    }
    Box::pin(client.leave()).await;
    Box::pin(session.close(close::NORMAL, "bye")).await;
}

impl Client {
    /// An `insufficient_scope` error unless the connection's credential
    /// allows `scope`.
    fn require(&self, scope: Scope) -> Result<(), FrameError> {
        if self.identity.as_ref().is_none_or(|i| i.allows(scope)) {
            Ok(())
        } else {
            Err(FrameError::new(
                "insufficient_scope",
                format!("this needs the {} scope", scope.as_str()),
            ))
        }
    }

    async fn handle(&mut self, frame: ClientFrame) -> Result<Vec<String>, FrameError> {
        match frame {
            ClientFrame::Auth(_) => Err(FrameError::new(
                "already_authenticated",
                "this connection is already authenticated",
            )),
            ClientFrame::Ping => Ok(vec![json!({"type": "pong"}).to_string()]),
            ClientFrame::Subscribe(request) => {
                let id = request.id.clone();
                self.require(Scope::Read).map_err(|e| e.about(&id))?;
                self.subscribe(*request).await.map_err(|e| e.about(&id))
            }
            ClientFrame::Unsubscribe(id) => self.unsubscribe(&id).await.map_err(|e| e.about(&id)),
            ClientFrame::Call(call) if call.service == "device.command" => {
                let request_id = call.request_id.clone();
                self.command(call).await.map_err(|e| e.about(&request_id))
            }
            ClientFrame::Call(call) => {
                let request_id = call.request_id.clone();
                let context = ServiceContext {
                    app: &self.app,
                    identity: self.identity.as_ref(),
                    subscriptions: self.watcher.subscriptions().len(),
                    connection_devices: self.devices.len(),
                };
                services::call(&context, call)
                    .await
                    .map(|frame| vec![frame])
                    .map_err(|e| e.about(&request_id))
            }
        }
    }

    /// `device.command`: accepts the command, then answers one `response`
    /// frame when it settles (replied, failed, expired; or sent for a
    /// one-way command, queued for a persistent one), without holding up
    /// the connection's other frames meanwhile.
    async fn command(&mut self, call: frames::Call) -> Result<Vec<String>, FrameError> {
        self.require(Scope::Command)?;
        let calls = self.calls.clone();
        if calls.load(std::sync::atomic::Ordering::Relaxed) >= MAX_WAITING_CALLS {
            return Err(FrameError::new(
                "too_many_commands",
                format!("a connection waits for at most {MAX_WAITING_CALLS} commands at once"),
            ));
        }
        let args: super::commands::CommandArgs = serde_json::from_value(call.args.clone())
            .map_err(|e| FrameError::new("bad_args", format!("device.command args: {e}")))?;
        let device = args.device_id.clone();
        if !sees_device(&self.app.pipeline, self.identity.as_ref(), &device) {
            return Ok(vec![super::commands::response_frame(
                &call,
                Err(&crate::commands::CommandError::UnknownDevice(device)),
            )]);
        }
        let commands = self.app.pipeline.commands.clone();
        let record = match commands
            .submit(&self.app.pipeline, &device, args.request)
            .await
        {
            Ok(record) => record,
            Err(error) => return Ok(vec![super::commands::response_frame(&call, Err(&error))]),
        };
        if record.settled() {
            return Ok(vec![super::commands::response_frame(&call, Ok(&record))]);
        }
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let outbox = self.watcher.outbox.clone();
        // The reply's timeout, and a little for the deadline's sweep.
        let limit =
            std::time::Duration::from_millis(record.timeout_ms) + std::time::Duration::from_secs(2);
        tokio::spawn(async move {
            let frame = match commands.wait(&record.id, limit).await {
                Ok(record) => super::commands::response_frame(&call, Ok(&record)),
                Err(error) => super::commands::response_frame(&call, Err(&error)),
            };
            outbox.push(frame);
            calls.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
        Ok(Vec::new())
    }

    /// Checks and holds a subscription, then answers `subscribed` and the
    /// snapshot of every device it covers, paced by the writer.
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
        if request.carried_by_groups() {
            return self.subscribe_groups(request).await;
        }
        let started = std::time::Instant::now();
        let devices = resolve(&self.app.pipeline, self.identity.as_ref(), &request)?;
        let resolved = started.elapsed();
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
        let resumes = self.resumes(&request, &devices)?;
        let positioned = positioned(request.channel);
        let id = request.id.clone();
        let channel = request.channel;
        let keys = request.keys.clone();
        let resuming = request.since.is_some();
        let wants_snapshots = request.snapshot != Some(false);
        let list: Vec<String> = devices.iter().cloned().collect();
        if positioned {
            // Held before its devices are watched, live frames waiting:
            // they follow `subscribed` and what is replayed.
            self.watcher.subscriptions().insert(
                id.clone(),
                Subscription::new(request.clone(), devices.clone(), true),
            );
        }
        if let Err(error) = self.hold(&devices, channel).await {
            self.watcher.subscriptions().remove(&id);
            return Err(error);
        }
        if channel == Channel::Commands {
            self.follow_commands();
        }
        tracing::debug!(
            devices = devices.len(),
            resolve_ms = resolved.as_secs_f64() * 1000.0,
            hold_ms = (started.elapsed() - resolved).as_secs_f64() * 1000.0,
            "subscription held"
        );
        let mut subscribed = json!({"type": "subscribed", "id": id, "channel": channel_name(channel), "devices": devices});
        let outbox = self.watcher.outbox.clone();
        if !positioned {
            // `subscribed` first, then live frames and snapshots: each
            // snapshot is read after the subscription delivers, so it is
            // never older than a live frame before it.
            let answered = outbox.push_paced(subscribed.to_string()).await;
            self.watcher
                .subscriptions()
                .insert(id.clone(), Subscription::new(request, devices, false));
            if answered && wants_snapshots {
                self.snapshots(&id, channel, &keys, &list).await;
            }
            return Ok(Vec::new());
        }
        let recovery = self.recover(&resumes, &devices).await;
        subscribed["positions"] = json!(recovery.tops);
        if resuming {
            subscribed["recovered"] = json!(recovery.recovered);
        }
        if !outbox.push_paced(subscribed.to_string()).await {
            return Ok(Vec::new());
        }
        if !self.replay(&id, &recovery, &devices).await {
            return Ok(Vec::new());
        }
        // A status subscription that recovered has what it missed instead
        // of snapshots.
        if wants_snapshots && !(resuming && recovery.recovered) {
            self.snapshots(&id, channel, &keys, &list).await;
        }
        Ok(Vec::new())
    }

    /// A subscription carried by its groups: each group is watched as a
    /// whole (one count and one channel per kind, whatever its size) and
    /// counts as one device against `max_devices`; `subscribed` names each
    /// group and how many of its members the connection sees. Then, as for
    /// devices: what a resuming subscription missed of those members, and
    /// the snapshots of those members, paced by the writer (unless
    /// `snapshot` is false).
    async fn subscribe_groups(&mut self, request: Subscribe) -> Result<Vec<String>, FrameError> {
        let config = &self.app.ws.config;
        let groups: BTreeSet<String> = request.groups.iter().cloned().collect();
        // The groups this connection does not watch yet.
        let new: Vec<String> = groups
            .iter()
            .filter(|g| !self.groups.contains_key(*g))
            .cloned()
            .collect();
        if self.devices.len() + self.groups.len() + new.len() > config.max_devices {
            return Err(FrameError::new(
                "too_many_devices",
                format!(
                    "a connection watches at most {} devices (a group counts as one)",
                    config.max_devices
                ),
            ));
        }
        let members = covered(&self.app.pipeline, self.identity.as_ref(), &request);
        let resumes = self.resumes(&request, &members)?;
        let id = request.id.clone();
        let channel = request.channel;
        let keys = request.keys.clone();
        let resuming = request.since.is_some();
        let wants_snapshots = request.snapshot != Some(false);
        let positioned = positioned(channel);
        let subscription = |request: Subscribe| Subscription {
            groups: groups.clone(),
            ..Subscription::new(request, BTreeSet::new(), positioned)
        };
        if positioned {
            // Held before its groups are watched, live frames waiting:
            // they follow `subscribed` and what is replayed.
            self.watcher
                .subscriptions()
                .insert(id.clone(), subscription(request.clone()));
        }
        if let Err(error) = self
            .app
            .ws
            .hub
            .watch_groups(self.id, self.watcher.clone(), &new)
            .await
        {
            self.watcher.subscriptions().remove(&id);
            return Err(FrameError::new("unavailable", error.to_string()));
        }
        for group in &groups {
            *self.groups.entry(group.clone()).or_default() += 1;
        }
        let counts: Vec<serde_json::Value> = {
            let registry = self.app.pipeline.registry.load();
            groups
                .iter()
                .map(|group| {
                    let count = members
                        .iter()
                        .filter(|d| {
                            registry
                                .get(d)
                                .is_some_and(|device| device.groups.contains(group))
                        })
                        .count();
                    json!({"group": group, "members": count})
                })
                .collect()
        };
        let mut subscribed = json!({"type": "subscribed", "id": id, "channel": channel_name(channel), "groups": counts});
        let outbox = self.watcher.outbox.clone();
        let list: Vec<String> = members.iter().cloned().collect();
        if !positioned {
            let answered = outbox.push_paced(subscribed.to_string()).await;
            self.watcher
                .subscriptions()
                .insert(id.clone(), subscription(request));
            if answered && wants_snapshots {
                self.snapshots(&id, channel, &keys, &list).await;
            }
            return Ok(Vec::new());
        }
        let recovery = self.recover(&resumes, &members).await;
        subscribed["positions"] = json!(recovery.tops);
        if resuming {
            subscribed["recovered"] = json!(recovery.recovered);
        }
        if !outbox.push_paced(subscribed.to_string()).await
            || !self.replay(&id, &recovery, &members).await
        {
            return Ok(Vec::new());
        }
        if wants_snapshots && !(resuming && recovery.recovered) {
            self.snapshots(&id, channel, &keys, &list).await;
        }
        Ok(Vec::new())
    }

    /// Counts `groups` as watched once less; those no subscription of the
    /// connection watches any more are unwatched.
    async fn release_groups(&mut self, groups: &BTreeSet<String>) {
        let mut last = Vec::new();
        for group in groups {
            if let Some(count) = self.groups.get_mut(group) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.groups.remove(group);
                    last.push(group.clone());
                }
            }
        }
        if let Err(error) = self.app.ws.hub.unwatch_groups(self.id, &last).await {
            tracing::warn!(%error, groups = last.len(), "could not release group watches");
        }
    }

    /// The positions `request` resumes after, each with its tenant: the
    /// one it names, else the connection's, else the one tenant of the
    /// subscription's devices.
    fn resumes(
        &self,
        request: &Subscribe,
        devices: &BTreeSet<String>,
    ) -> Result<Vec<Position>, FrameError> {
        let Some(since) = &request.since else {
            return Ok(Vec::new());
        };
        if !matches!(
            request.channel,
            Channel::Alerts | Channel::Events | Channel::Status | Channel::Commands
        ) {
            return Err(FrameError::new(
                "bad_filter",
                "since resumes the alerts, events, status and commands channels only",
            ));
        }
        if since.positions().len() > MAX_SINCE {
            return Err(FrameError::new(
                "bad_field",
                format!("since: at most {MAX_SINCE} positions, one per tenant"),
            ));
        }
        let state = &self.app.pipeline;
        let tenants: BTreeSet<String> = devices.iter().map(|d| state.tenant_of(d)).collect();
        let own = self.identity.as_ref().and_then(|i| i.tenant.clone());
        let resumes: Vec<Position> = since
            .positions()
            .iter()
            .map(|given| {
                let tenant = match (&given.tenant, &own) {
                    (Some(tenant), _) => tenant.clone(),
                    (None, Some(own)) => own.clone(),
                    (None, None) if tenants.len() == 1 => tenants.first().cloned().unwrap_or_default(),
                    (None, None) => {
                        return Err(FrameError::new(
                            "bad_field",
                            "since: name the tenant of each position; this subscription covers devices of several",
                        ));
                    }
                };
                if self.identity.as_ref().is_some_and(|i| !i.sees(&tenant)) {
                    return Err(FrameError::new(
                        "bad_field",
                        format!("since: no history of tenant {tenant:?} is known to this connection"),
                    ));
                }
                Ok(Position {
                    tenant,
                    offset: given.offset,
                    epoch: given.epoch.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        let named: BTreeSet<&str> = resumes.iter().map(|p| p.tenant.as_str()).collect();
        if named.len() < resumes.len() {
            return Err(FrameError::new(
                "bad_field",
                "since: one position per tenant",
            ));
        }
        Ok(resumes)
    }

    /// Sends subscription `id` what `recovery` replays of `devices`, then
    /// the live frames held meanwhile that it did not replay (under the
    /// lock, so no newer frame overtakes them); false when the client is
    /// gone.
    async fn replay(&self, id: &str, recovery: &Replay, devices: &BTreeSet<String>) -> bool {
        let outbox = self.watcher.outbox.clone();
        let frames: Vec<String> = {
            let subscriptions = self.watcher.subscriptions();
            let Some(subscription) = subscriptions.get(id) else {
                return true;
            };
            recovery
                .entries
                .iter()
                .filter(|entry| devices.contains(entry.publication.device()))
                .filter_map(|entry| subscription.frame(id, &entry.publication))
                .collect()
        };
        for frame in frames {
            if !outbox.push_paced(frame).await {
                return false;
            }
        }
        let mut subscriptions = self.watcher.subscriptions();
        let Some(held) = subscriptions.get_mut(id) else {
            return true;
        };
        for top in &recovery.tops {
            held.saw(Some(top));
        }
        for (position, frame) in held.pending.take().unwrap_or_default() {
            let replayed = position.as_ref().is_some_and(|p| {
                recovery.replayed.iter().any(|top| {
                    top.tenant == p.tenant && top.epoch == p.epoch && p.offset <= top.offset
                })
            });
            if !replayed {
                outbox.push(frame);
                held.saw(position.as_ref());
            }
        }
        true
    }

    /// After the hub lost Redis and delivers again: each subscription with
    /// positions that had a gap is told so with a `gap` frame (`recovered`,
    /// `positions`) and gets what was recorded meanwhile, once, in order,
    /// before live frames; `recovered: false` when the gap cannot be
    /// replayed (the client then reloads). A telemetry subscription gets
    /// the latest values of its devices again, unless it wants no
    /// snapshots.
    async fn catch_up(&mut self) {
        let gaps: Vec<(String, Vec<Position>, BTreeSet<String>, Subscribe)> = self
            .watcher
            .subscriptions()
            .iter_mut()
            .filter(|(_, subscription)| subscription.gap)
            .map(|(id, subscription)| {
                subscription.gap = false;
                // Carried by groups: their members as the registry is now.
                let devices = if subscription.groups.is_empty() {
                    subscription.devices.clone()
                } else {
                    covered(
                        &self.app.pipeline,
                        self.identity.as_ref(),
                        &subscription.request,
                    )
                };
                (
                    id.clone(),
                    subscription.seen.clone(),
                    devices,
                    subscription.request.clone(),
                )
            })
            .collect();
        for (id, seen, devices, request) in gaps {
            if !positioned(request.channel) {
                if request.snapshot != Some(false) {
                    let list: Vec<String> = devices.iter().cloned().collect();
                    self.snapshots(&id, request.channel, &request.keys, &list)
                        .await;
                }
                continue;
            }
            let mut recovery = self.recover(&seen, &devices).await;
            // A tenant with no position to start from cannot be replayed.
            let state = &self.app.pipeline;
            if devices
                .iter()
                .any(|d| !seen.iter().any(|p| p.tenant == state.tenant_of(d)))
            {
                recovery.recovered = false;
            }
            metrics::counter!("sluice_ws_gaps_total", "recovered" => if recovery.recovered { "true" } else { "false" })
                .increment(1);
            let gap = json!({"type": "gap", "id": id, "recovered": recovery.recovered, "positions": recovery.tops});
            if !self.watcher.outbox.push_paced(gap.to_string()).await
                || !self.replay(&id, &recovery, &devices).await
            {
                return;
            }
        }
    }

    /// What a subscription of `devices` missed after `resumes`, and the
    /// newest position of each tenant it covers. A history the bus cannot
    /// read now is not recovered.
    async fn recover(&self, resumes: &[Position], devices: &BTreeSet<String>) -> Replay {
        let state = &self.app.pipeline;
        let limit = self.app.ws.history.max_replay;
        let mut replay = Replay {
            recovered: true,
            ..Replay::default()
        };
        for since in resumes {
            match state.bus.history_after(since, limit).await {
                Ok(recovery) => {
                    if recovery.recovered {
                        replay.entries.extend(recovery.entries);
                        replay.replayed.push(recovery.top.clone());
                    } else {
                        replay.recovered = false;
                    }
                    replay.tops.push(recovery.top);
                }
                Err(error) => {
                    tracing::warn!(%error, tenant = %since.tenant, "cannot read history; the subscription is not recovered");
                    replay.recovered = false;
                }
            }
        }
        let others: Vec<String> = devices
            .iter()
            .map(|d| state.tenant_of(d))
            .collect::<BTreeSet<String>>()
            .into_iter()
            .filter(|tenant| !replay.tops.iter().any(|top| top.tenant == *tenant))
            .collect();
        match state.bus.history_tops(&others).await {
            Ok(tops) => replay.tops.extend(tops),
            Err(error) => {
                tracing::warn!(%error, tenants = others.len(), "cannot read the newest history positions");
            }
        }
        // Tenants' histories interleaved by when they were recorded.
        replay.entries.sort_by_key(|entry| entry.recorded_ms);
        replay
    }

    /// The snapshot of each of `list` on `channel`, paced by the writer.
    async fn snapshots(&self, id: &str, channel: Channel, keys: &[String], list: &[String]) {
        let state = &self.app.pipeline;
        let outbox = &self.watcher.outbox;
        for chunk in list.chunks(SNAPSHOT_CHUNK) {
            let snapshots: Vec<String> = match channel {
                Channel::Telemetry => latest_of_many(state, chunk)
                    .await
                    .into_iter()
                    .zip(chunk)
                    .filter_map(|(snapshot, device)| {
                        let snapshot = snapshot?;
                        let data = select_keys(&snapshot.telemetry, keys);
                        (keys.is_empty() || !data.is_empty())
                            .then(|| frames::device_data(id, device, snapshot.updated_ms, &data))
                            .flatten()
                    })
                    .collect(),
                Channel::Status => status_of_many(state, chunk)
                    .await
                    .into_iter()
                    .zip(chunk)
                    .map(|(status, device)| {
                        frames::status(id, device, &state.name_of(device), status)
                    })
                    .collect(),
                Channel::Alerts | Channel::Events | Channel::Commands => Vec::new(),
            };
            for frame in snapshots {
                if !outbox.push_paced(frame).await {
                    return;
                }
            }
        }
    }

    async fn unsubscribe(&mut self, id: &str) -> Result<Vec<String>, FrameError> {
        let Some(subscription) = self.watcher.subscriptions().remove(id) else {
            return Err(FrameError::new(
                "unknown_subscription",
                format!("no subscription {id:?} on this connection"),
            ));
        };
        self.release(&subscription.devices, subscription.request.channel)
            .await;
        self.release_groups(&subscription.groups).await;
        Ok(vec![json!({"type": "unsubscribed", "id": id}).to_string()])
    }

    /// Counts `devices` as covered once more on `channel`, watching what
    /// is newly covered in one batch; on failure, nothing stays counted.
    async fn hold(
        &mut self,
        devices: &BTreeSet<String>,
        channel: Channel,
    ) -> Result<(), FrameError> {
        if channel == Channel::Commands {
            return Ok(());
        }
        let slot = Coverage::slot(channel);
        let mut changed: Vec<(String, Kinds)> = Vec::new();
        for device in devices {
            let mut coverage = self.devices.get(device).copied().unwrap_or_default();
            let before = coverage.kinds();
            coverage.0[slot] += 1;
            if coverage.kinds() != before {
                changed.push((device.clone(), coverage.kinds()));
            }
        }
        self.app
            .ws
            .hub
            .watch_many(self.id, self.watcher.clone(), &changed)
            .await
            .map_err(|error| FrameError::new("unavailable", error.to_string()))?;
        for device in devices {
            self.devices.entry(device.clone()).or_default().0[slot] += 1;
        }
        Ok(())
    }

    /// Counts `devices` as covered once less on `channel`: what no
    /// subscription covers any more is unwatched, what still is keeps only
    /// the channels it needs.
    async fn release(&mut self, devices: &BTreeSet<String>, channel: Channel) {
        if channel == Channel::Commands {
            return;
        }
        let slot = Coverage::slot(channel);
        let mut uncovered = Vec::new();
        let mut narrowed = Vec::new();
        for device in devices {
            let Some(coverage) = self.devices.get_mut(device) else {
                continue;
            };
            let before = coverage.kinds();
            coverage.0[slot] = coverage.0[slot].saturating_sub(1);
            let now = coverage.kinds();
            if now.is_empty() {
                self.devices.remove(device);
                uncovered.push(device.clone());
            } else if now != before {
                narrowed.push((device.clone(), now));
            }
        }
        let hub = &self.app.ws.hub;
        if let Err(error) = hub.unwatch_many(self.id, &uncovered).await {
            tracing::warn!(%error, devices = uncovered.len(), "could not release watches");
        }
        if let Err(error) = hub
            .watch_many(self.id, self.watcher.clone(), &narrowed)
            .await
        {
            tracing::warn!(%error, devices = narrowed.len(), "could not narrow watches");
        }
    }

    /// Follows a registry reload: a device the connection may no longer
    /// see (moved to another tenant, removed) leaves every subscription at
    /// once, each with an `error` frame naming it; subscriptions that select
    /// from the registry take in what now matches.
    async fn follow_registry(&mut self) {
        let state = self.app.pipeline.clone();
        let identity = self.identity.clone();
        let changes: Vec<(String, Channel, BTreeSet<String>, BTreeSet<String>)> = {
            let subscriptions = self.watcher.subscriptions();
            subscriptions
                .iter()
                // Carried by its groups: the publisher follows the registry.
                .filter(|(_, s)| s.groups.is_empty())
                .filter_map(|(id, s)| {
                    let now = if s.request.selects_from_registry() {
                        covered(&state, identity.as_ref(), &s.request)
                    } else {
                        s.devices
                            .iter()
                            .filter(|d| sees_device(&state, identity.as_ref(), d))
                            .cloned()
                            .collect()
                    };
                    (now != s.devices)
                        .then(|| (id.clone(), s.request.channel, s.devices.clone(), now))
                })
                .collect()
        };
        for (id, channel, before, now) in changes {
            let added: BTreeSet<String> = now.difference(&before).cloned().collect();
            let removed: BTreeSet<String> = before.difference(&now).cloned().collect();
            for device in &removed {
                if !sees_device(&state, identity.as_ref(), device) {
                    let frame = serde_json::json!({
                        "type": "error",
                        "code": "unknown_device",
                        "id": id,
                        "device": device,
                        "message": format!("device {device:?} is no longer known to this connection; it left the subscription"),
                    });
                    self.watcher.outbox.push(frame.to_string());
                }
            }
            // Held first, so a failure leaves the subscription as it was.
            if let Err(error) = self.hold(&added, channel).await {
                tracing::warn!(%error.message, "could not follow a registry change");
                continue;
            }
            if let Some(subscription) = self.watcher.subscriptions().get_mut(&id) {
                subscription.devices = now;
            }
            self.release(&removed, channel).await;
        }
    }

    /// Starts forwarding command state changes to this connection's
    /// `commands` subscriptions (once per connection).
    fn follow_commands(&mut self) {
        if self.commands.is_some() {
            return;
        }
        let mut updates = self.app.pipeline.commands.updates();
        let watcher = self.watcher.clone();
        self.commands = Some(tokio::spawn(async move {
            loop {
                let record = match updates.recv().await {
                    Ok(record) => record,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        watcher.outbox.push(
                            FrameError::new(
                                "commands_missed",
                                format!("{missed} command state changes were missed; read the commands again"),
                            )
                            .frame(),
                        );
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let change = Publication::Command(Box::new((*record).clone()));
                for (id, subscription) in watcher.subscriptions().iter_mut() {
                    subscription.route(id, &change, &watcher.outbox);
                }
            }
        }));
    }

    async fn leave(&mut self) {
        if let Some(task) = self.commands.take() {
            task.abort();
        }
        let devices: Vec<String> = self.devices.keys().cloned().collect();
        self.watcher.subscriptions().clear();
        if let Err(error) = self.app.ws.hub.unwatch_many(self.id, &devices).await {
            tracing::warn!(%error, devices = devices.len(), "could not release watches");
        }
        self.devices.clear();
        let groups: Vec<String> = self.groups.drain().map(|(g, _)| g).collect();
        if let Err(error) = self.app.ws.hub.unwatch_groups(self.id, &groups).await {
            tracing::warn!(%error, groups = groups.len(), "could not release group watches");
        }
    }
}

fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Telemetry => "telemetry",
        Channel::Status => "status",
        Channel::Alerts => "alerts",
        Channel::Events => "events",
        Channel::Commands => "commands",
    }
}
