//! MQTT ingest: subscribes to the route filters (or configured ones),
//! routes each publish to a product and device or a status signal, and
//! acknowledges QoS 1 messages only after a worker's queue has taken them.
//! Reconnects with exponential backoff and subscribes again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use crate::config::MqttConfig;
use crate::deadletter::DeadLetter;
use crate::message::{RawMessage, SourceKind, now_ms};
use crate::pipeline::{Envelope, Inbound, Ingest};
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

/// Runs one broker connection until `shutdown`.
pub async fn run_mqtt(
    config: MqttConfig,
    router: Arc<Router>,
    ingest: Ingest,
    health: Arc<SourceHealth>,
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
    let mut options = MqttOptions::new(&client_id, &host, port);
    let max_packet = usize::try_from(config.max_packet_size.as_u64()).unwrap_or(usize::MAX);
    options
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(max_packet, max_packet)
        .set_clean_session(!config.persistent_session)
        .set_manual_acks(true);
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        options.set_credentials(user, password);
    }
    let qos = if config.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let filters = filters(&config, &router);
    let (client, mut events) = AsyncClient::new(options, CLIENT_CAPACITY);
    // Acknowledgements are tiny and must not wait for Nagle's algorithm.
    let mut network = events.network_options();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    let received = metrics::counter!("sluice_ingest_messages_total", "source" => "mqtt");
    let mut backoff = Duration::from_millis(100);
    tracing::info!(broker = %config.url, client_id, ?filters, "MQTT source starting");
    loop {
        let event = tokio::select! {
            event = events.poll() => event,
            _ = shutdown.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                health.set_connected(true);
                backoff = Duration::from_millis(100);
                tracing::info!(broker = %config.url, "MQTT connected; subscribing");
                for filter in &filters {
                    if let Err(error) = client.subscribe(filter.as_str(), qos).await {
                        tracing::error!(%error, filter, "cannot queue an MQTT subscription");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                received.increment(1);
                let envelope = envelope(&router, &publish.topic, &publish.payload);
                let accepted = match envelope {
                    Ok(envelope) => {
                        // Waits while the worker's queue is full: the event
                        // loop is not polled meanwhile, so the broker holds
                        // further messages back.
                        tokio::select! {
                            result = ingest.submit(envelope) => result.is_ok(),
                            _ = shutdown.changed() => false,
                        }
                    }
                    Err(reason) => {
                        let letter = DeadLetter::unroutable(
                            SourceKind::Mqtt,
                            &publish.topic,
                            &publish.payload,
                            reason,
                        );
                        ingest.dead_letter(letter).await;
                        true
                    }
                };
                if !accepted {
                    // Not handed over (stopping): left unacknowledged, so the
                    // broker redelivers it to a persistent session.
                    break;
                }
                if publish.qos != QoS::AtMostOnce && client.try_ack(&publish).is_err() {
                    tracing::warn!(topic = %publish.topic, "could not queue an MQTT acknowledgement");
                }
            }
            Ok(_) => {}
            Err(error) => {
                health.set_connected(false);
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
    health.set_connected(false);
    let _ = client.try_disconnect();
    tracing::info!(broker = %config.url, "MQTT source stopped");
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
