//! MQTT ingest: subscribes to the route filters (or configured ones),
//! routes each publish to a product and device or a status signal, and
//! acknowledges a QoS 1 message only once its effects were accepted by the
//! bus, in the order the messages arrived (as MQTT requires).
//!
//! MQTT 5 by default (3.1.1 on request): the CONNECT tells the broker the
//! largest packet sluice reads (four times `max_packet_size`), so a broker
//! drops anything larger for this client instead of redelivering it to a
//! persistent session forever; a message over `max_packet_size` that does
//! arrive is acknowledged and dead-lettered (`too_large`). The source
//! counts as connected once every subscription is granted. Reconnects with
//! exponential backoff and subscribes again. At shutdown it stops taking
//! messages and stays connected, within the drain timeout, until what it
//! took is acknowledged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::{MqttConfig, MqttProtocol};
use crate::deadletter::DeadLetter;
use crate::message::{RawMessage, SourceKind, now_ms};
use crate::pipeline::{Completion, Envelope, Inbound, Ingest};
use crate::route::{Route, Router};

/// Requests (acks, subscriptions) the client may queue for its event loop.
const CLIENT_CAPACITY: usize = 4096;

/// Whether a source is connected, for readiness.
#[derive(Debug, Default)]
pub struct SourceHealth {
    connected: AtomicBool,
}

impl SourceHealth {
    /// Whether it is connected now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records the connection state.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }
}

/// The filters a broker connection subscribes to.
pub fn filters(config: &MqttConfig, router: &Router) -> Vec<String> {
    let filters = if config.topics.is_empty() {
        router.filters()
    } else {
        config.topics.clone()
    };
    match &config.shared_group {
        Some(group) => filters
            .into_iter()
            .map(|f| format!("$share/{group}/{f}"))
            .collect(),
        None => filters,
    }
}

/// The acknowledgement of one QoS 1 message: its PUBLISH without payload.
#[derive(Debug)]
enum AckToken {
    V5(v5::mqttbytes::v5::Publish),
    V311(rumqttc::Publish),
}

#[derive(Debug)]
struct Waiting {
    token: AckToken,
    done: bool,
}

#[derive(Debug, Default)]
struct Acks {
    /// In arrival order; the first has sequence number `front`.
    waiting: VecDeque<Waiting>,
    front: u64,
}

/// QoS 1 messages of the current connection in the order they arrived,
/// each acknowledged once it and every message before it are finished.
/// Its length is bounded by the broker's in-flight window.
#[derive(Debug, Default)]
struct AckQueue {
    acks: Mutex<Acks>,
    ready: Notify,
}

impl AckQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Acks> {
        // Held for a queue operation, never across an await.
        self.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a message; returns its sequence number.
    fn push(&self, token: AckToken) -> u64 {
        let mut acks = self.lock();
        acks.waiting.push_back(Waiting { token, done: false });
        acks.front + acks.waiting.len() as u64 - 1
    }

    /// Message `seq` is finished (a number from before the last
    /// [`AckQueue::clear`] is ignored).
    fn complete(&self, seq: u64) {
        let mut acks = self.lock();
        let Some(offset) = seq.checked_sub(acks.front) else {
            return;
        };
        let Some(waiting) = usize::try_from(offset)
            .ok()
            .and_then(|i| acks.waiting.get_mut(i))
        else {
            return;
        };
        waiting.done = true;
        let first = offset == 0;
        drop(acks);
        if first {
            self.ready.notify_one();
        }
    }

    /// The messages at the front that are finished, to acknowledge now.
    fn take_ready(&self) -> Vec<AckToken> {
        let mut acks = self.lock();
        let mut ready = Vec::new();
        while acks.waiting.front().is_some_and(|w| w.done) {
            if let Some(waiting) = acks.waiting.pop_front() {
                ready.push(waiting.token);
                acks.front += 1;
            }
        }
        ready
    }

    /// The connection is gone: its packet ids mean nothing any more (the
    /// broker delivers unacknowledged messages again).
    fn clear(&self) {
        let mut acks = self.lock();
        acks.front += acks.waiting.len() as u64;
        acks.waiting.clear();
    }

    fn is_empty(&self) -> bool {
        self.lock().waiting.is_empty()
    }
}

/// A publish as both protocol versions deliver it.
struct Incoming {
    topic: Result<String, Bytes>,
    payload: Bytes,
    token: Option<AckToken>,
}

/// What the event loop reported.
enum MqttEvent {
    Connected,
    /// Per filter, whether the broker granted it.
    Subscribed(Vec<bool>),
    Publish(Box<Incoming>),
    Other,
}

/// The request side of a broker connection of either protocol version;
/// clones share the connection (commands publish through it).
#[derive(Clone)]
pub struct MqttClient(Client);

impl std::fmt::Debug for MqttClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttClient").finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Client {
    V5(v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// The event loop of a broker connection of either protocol version.
enum Events {
    V5(Box<v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// Both sides of one broker connection.
fn connect(config: &MqttConfig, host: &str, port: u16, client_id: &str) -> (Client, Events) {
    let max_packet = config.max_packet_size.as_u64();
    // Read up to four times the limit, so a moderately oversized
    // message is dead-lettered rather than breaking the connection.
    let read_limit = u32::try_from(max_packet.saturating_mul(4)).unwrap_or(u32::MAX);
    match config.protocol {
        MqttProtocol::V5 => {
            let mut options = v5::MqttOptions::new(client_id, host, port);
            options
                .set_keep_alive(config.keep_alive)
                .set_clean_start(!config.persistent_session)
                .set_max_packet_size(Some(read_limit))
                .set_receive_maximum(Some(config.max_inflight))
                .set_manual_acks(true);
            if config.persistent_session {
                // 0xFFFFFFFF: the session never expires (as 3.1.1's
                // clean_session = false).
                options.set_session_expiry_interval(Some(u32::MAX));
            }
            if let (Some(user), Some(password)) = (&config.username, &config.password) {
                options.set_credentials(user, password);
            }
            // Acknowledgements are tiny and must not wait for Nagle's algorithm.
            let mut network = options.network_options();
            network.set_tcp_nodelay(true);
            options.set_network_options(network);
            let (client, events) = v5::AsyncClient::new(options, CLIENT_CAPACITY);
            (Client::V5(client), Events::V5(Box::new(events)))
        }
        MqttProtocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, host, port);
            let read_limit = read_limit as usize;
            options
                .set_keep_alive(config.keep_alive)
                .set_max_packet_size(read_limit, read_limit)
                .set_clean_session(!config.persistent_session)
                .set_manual_acks(true);
            if let (Some(user), Some(password)) = (&config.username, &config.password) {
                options.set_credentials(user, password);
            }
            let (client, mut events) = rumqttc::AsyncClient::new(options, CLIENT_CAPACITY);
            // Acknowledgements are tiny and must not wait for Nagle's algorithm.
            let mut network = events.network_options();
            network.set_tcp_nodelay(true);
            events.set_network_options(network);
            (Client::V311(client), Events::V311(Box::new(events)))
        }
    }
}

impl Events {
    async fn poll(&mut self) -> Result<MqttEvent, String> {
        match self {
            Events::V5(events) => {
                use v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                Ok(match events.poll().await.map_err(|e| e.to_string())? {
                    v5::Event::Incoming(Packet::ConnAck(_)) => MqttEvent::Connected,
                    v5::Event::Incoming(Packet::SubAck(ack)) => MqttEvent::Subscribed(
                        ack.return_codes
                            .iter()
                            .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                            .collect(),
                    ),
                    v5::Event::Incoming(Packet::Publish(mut publish)) => {
                        let payload = std::mem::take(&mut publish.payload);
                        let topic = String::from_utf8(publish.topic.to_vec())
                            .map_err(|_| publish.topic.clone());
                        let token = (publish.qos != v5::mqttbytes::QoS::AtMostOnce)
                            .then_some(AckToken::V5(publish));
                        MqttEvent::Publish(Box::new(Incoming {
                            topic,
                            payload,
                            token,
                        }))
                    }
                    _ => MqttEvent::Other,
                })
            }
            Events::V311(events) => {
                use rumqttc::{Event, Packet, SubscribeReasonCode};
                Ok(match events.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => MqttEvent::Connected,
                    Event::Incoming(Packet::SubAck(ack)) => MqttEvent::Subscribed(
                        ack.return_codes
                            .iter()
                            .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                            .collect(),
                    ),
                    Event::Incoming(Packet::Publish(mut publish)) => {
                        let payload = std::mem::take(&mut publish.payload);
                        let topic = Ok(publish.topic.clone());
                        let token = (publish.qos != rumqttc::QoS::AtMostOnce)
                            .then_some(AckToken::V311(publish));
                        MqttEvent::Publish(Box::new(Incoming {
                            topic,
                            payload,
                            token,
                        }))
                    }
                    _ => MqttEvent::Other,
                })
            }
        }
    }
}

impl MqttClient {
    /// Queues a publish on the connection, at the message's QoS.
    pub async fn publish(&self, message: crate::commands::Outgoing) -> Result<(), String> {
        match &self.0 {
            Client::V5(client) => {
                use v5::mqttbytes::QoS;
                let qos = match message.qos {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                client
                    .publish(message.topic, qos, false, message.payload)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V311(client) => {
                use rumqttc::QoS;
                let qos = match message.qos {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                client
                    .publish(message.topic, qos, false, message.payload)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

impl Client {
    /// Subscribes every filter in one SUBSCRIBE.
    async fn subscribe(&self, filters: &[String], qos: u8) -> Result<(), String> {
        match self {
            Client::V5(client) => {
                let qos = if qos == 0 {
                    v5::mqttbytes::QoS::AtMostOnce
                } else {
                    v5::mqttbytes::QoS::AtLeastOnce
                };
                let filters = filters
                    .iter()
                    .map(|f| v5::mqttbytes::v5::Filter::new(f.clone(), qos));
                client
                    .subscribe_many(filters)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V311(client) => {
                let qos = if qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                let filters = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos));
                client
                    .subscribe_many(filters)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn ack(&self, token: &AckToken) -> bool {
        match (self, token) {
            (Client::V5(client), AckToken::V5(publish)) => client.try_ack(publish).is_ok(),
            (Client::V311(client), AckToken::V311(publish)) => client.try_ack(publish).is_ok(),
            _ => false,
        }
    }

    fn disconnect(&self) {
        let sent = match self {
            Client::V5(client) => client.try_disconnect().is_ok(),
            Client::V311(client) => client.try_disconnect().is_ok(),
        };
        if !sent {
            tracing::debug!("could not queue the MQTT DISCONNECT");
        }
    }
}

/// Runs one broker connection until `shutdown`, then, for up to `drain`,
/// until what it took is acknowledged.
pub async fn run_mqtt(
    config: MqttConfig,
    router: Arc<Router>,
    ingest: Ingest,
    health: Arc<SourceHealth>,
    downlinks: Option<Arc<crate::commands::MqttDownlinks>>,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let (host, port) = match config.address() {
        Ok(address) => address,
        Err(reason) => {
            tracing::error!(url = %config.url, %reason, "MQTT source not started");
            return;
        }
    };
    let client_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("sluice-{:08x}", rand::random::<u32>()));
    let filters = filters(&config, &router);
    let (client, mut events) = connect(&config, &host, port, &client_id);
    if let Some(downlinks) = &downlinks {
        downlinks.install(Some(MqttClient(client.clone())));
    }
    let acks = Arc::new(AckQueue::default());
    let received = metrics::counter!("sluice_ingest_messages_total", "source" => "mqtt");
    let limit = config.max_packet_size.as_u64();
    let mut backoff = Duration::from_millis(100);
    let mut draining: Option<Instant> = None;
    tracing::info!(broker = %config.url, client_id, protocol = ?config.protocol, ?filters, "MQTT source starting");
    loop {
        for token in acks.take_ready() {
            if !client.ack(&token) {
                tracing::warn!("could not queue an MQTT acknowledgement");
            }
        }
        if let Some(until) = draining
            && (acks.is_empty() || Instant::now() >= until)
        {
            break;
        }
        let event = tokio::select! {
            event = events.poll() => event,
            _ = acks.ready.notified() => continue,
            _ = shutdown.changed(), if draining.is_none() => {
                draining = Some(Instant::now() + drain);
                continue;
            }
            _ = tokio::time::sleep_until(draining.unwrap_or_else(Instant::now)), if draining.is_some() => continue,
        };
        match event {
            Ok(MqttEvent::Connected) => {
                backoff = Duration::from_millis(100);
                tracing::info!(broker = %config.url, "MQTT connected; subscribing");
                if let Err(error) = client.subscribe(&filters, config.qos).await {
                    tracing::error!(%error, "cannot queue the MQTT subscriptions");
                }
            }
            Ok(MqttEvent::Subscribed(granted)) => {
                let refused: Vec<&String> = filters
                    .iter()
                    .zip(&granted)
                    .filter(|(_, ok)| !**ok)
                    .map(|(f, _)| f)
                    .collect();
                if refused.is_empty() {
                    health.set_connected(true);
                    tracing::info!(broker = %config.url, "MQTT subscriptions granted");
                } else {
                    health.set_connected(false);
                    tracing::error!(broker = %config.url, ?refused, "the broker refused subscriptions (check its ACLs, and that shared subscriptions are supported)");
                }
            }
            Ok(MqttEvent::Publish(incoming)) => {
                if draining.is_some() {
                    // Not taken, so not acknowledged: a persistent session
                    // gets it again.
                    continue;
                }
                received.increment(1);
                let done = incoming.token.map(|token| {
                    let seq = acks.push(token);
                    let acks = acks.clone();
                    Completion::new(move || acks.complete(seq))
                });
                if !take(
                    &router,
                    &ingest,
                    incoming.topic,
                    incoming.payload,
                    limit,
                    done,
                    &mut shutdown,
                )
                .await
                {
                    draining = Some(Instant::now() + drain);
                }
            }
            Ok(MqttEvent::Other) => {}
            Err(error) => {
                health.set_connected(false);
                acks.clear();
                if draining.is_some() {
                    break;
                }
                metrics::counter!("sluice_source_errors_total", "source" => "mqtt").increment(1);
                tracing::warn!(broker = %config.url, %error, retry_in = ?backoff, "MQTT connection lost");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(config.reconnect_max);
            }
        }
    }
    if !acks.is_empty() {
        tracing::warn!(
            "stopping with MQTT messages unacknowledged; a persistent session gets them again"
        );
    }
    health.set_connected(false);
    if let Some(downlinks) = &downlinks {
        downlinks.install(None);
    }
    client.disconnect();
    // Let the event loop send the last acknowledgements and the DISCONNECT.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while events.poll().await.is_ok() {}
    })
    .await;
    tracing::info!(broker = %config.url, "MQTT source stopped");
}

/// Hands one publish to the pipeline: as a message, a status signal, or
/// a dead letter (unroutable, or over `limit` bytes). `done` acknowledges
/// it once its effects are applied. False when sluice is stopping and the
/// message was not taken.
async fn take(
    router: &Router,
    ingest: &Ingest,
    topic: Result<String, Bytes>,
    payload: Bytes,
    limit: u64,
    done: Option<Completion>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let topic = match topic {
        Ok(topic) => topic,
        Err(raw) => {
            let letter = DeadLetter::unroutable(
                SourceKind::Mqtt,
                &String::from_utf8_lossy(&raw),
                &payload,
                "the topic is not UTF-8".into(),
            );
            ingest.dead_letter_then(letter, done).await;
            return true;
        }
    };
    if payload.len() as u64 > limit {
        metrics::counter!("sluice_ingest_too_large_total", "source" => "mqtt").increment(1);
        let letter = DeadLetter::too_large(SourceKind::Mqtt, &topic, &payload, limit);
        ingest.dead_letter_then(letter, done).await;
        return true;
    }
    match envelope(router, &topic, &payload) {
        Ok(mut envelope) => {
            envelope.done = done;
            // Waits while the worker's queue is full: the event loop is not
            // polled meanwhile, so the broker holds further messages back.
            tokio::select! {
                result = ingest.submit(envelope) => result.is_ok(),
                _ = shutdown.changed() => false,
            }
        }
        Err(reason) => {
            let letter = DeadLetter::unroutable(SourceKind::Mqtt, &topic, &payload, reason);
            ingest.dead_letter_then(letter, done).await;
            true
        }
    }
}

/// The envelope for a publish, or why it cannot be routed.
fn envelope(router: &Router, topic: &str, payload: &[u8]) -> Result<Envelope, String> {
    match router.route(topic, payload) {
        Route::Data { product, device } => Ok(Envelope::new(Inbound::Data(RawMessage {
            device_id: device.to_owned(),
            product: product.to_owned(),
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            received_at: now_ms(),
            source: SourceKind::Mqtt,
        }))),
        Route::Status { device, online } => Ok(Envelope::new(Inbound::Status {
            device: device.to_owned(),
            online,
            source: SourceKind::Mqtt,
        })),
        Route::Unroutable(reason) => Err(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(pkid: u16) -> AckToken {
        let mut publish = rumqttc::Publish::new("t", rumqttc::QoS::AtLeastOnce, Vec::new());
        publish.pkid = pkid;
        AckToken::V311(publish)
    }

    fn pkids(tokens: Vec<AckToken>) -> Vec<u16> {
        tokens
            .into_iter()
            .map(|t| match t {
                AckToken::V311(p) => p.pkid,
                AckToken::V5(p) => p.pkid,
            })
            .collect()
    }

    #[test]
    fn acknowledgements_leave_in_arrival_order() {
        let acks = AckQueue::default();
        let seqs: Vec<u64> = (1..=4).map(|pkid| acks.push(token(pkid))).collect();
        acks.complete(seqs[1]);
        acks.complete(seqs[3]);
        assert!(acks.take_ready().is_empty(), "the first is not finished");
        acks.complete(seqs[0]);
        assert_eq!(pkids(acks.take_ready()), [1, 2]);
        acks.complete(seqs[2]);
        assert_eq!(pkids(acks.take_ready()), [3, 4]);
        assert!(acks.is_empty());
    }

    #[test]
    fn a_lost_connection_forgets_its_packet_ids() {
        let acks = AckQueue::default();
        let old = acks.push(token(1));
        acks.clear();
        let new = acks.push(token(7));
        acks.complete(old);
        assert!(
            acks.take_ready().is_empty(),
            "a finish from before the loss is ignored"
        );
        acks.complete(new);
        assert_eq!(pkids(acks.take_ready()), [7]);
    }
}
