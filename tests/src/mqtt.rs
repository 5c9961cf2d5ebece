//! An MQTT client for tests: publishes as a device would, and counts the
//! broker's acknowledgements of its QoS 1 messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A connected MQTT publisher; its event loop runs in a task.
#[derive(Debug)]
pub struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects to the broker on `port` and waits for the connection.
    pub async fn connect(port: u16) -> Self {
        let mut options = MqttOptions::new(format!("test-{:08x}", rand_id()), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(8 << 20, 8 << 20)
            .set_inflight(1000);
        let (client, mut events) = AsyncClient::new(options, 10_000);
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        let acked = Arc::new(AtomicU64::new(0));
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            let mut connected = Some(connected_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), connected_rx)
            .await
            .expect("the test publisher connects within 10 s")
            .expect("the connection task runs");
        Publisher {
            client,
            acked,
            task,
        }
    }

    /// Publishes `payload` on `topic` at QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("the publish is queued");
    }

    /// How many QoS 1 messages the broker has acknowledged (accepted).
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rand_id() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

/// An MQTT client that subscribes to a topic filter, as a device listening
/// for its commands does, and can publish its answers.
#[derive(Debug)]
pub struct Subscriber {
    client: AsyncClient,
    received: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects to the broker on `port` and waits until `filter` is subscribed.
    pub async fn connect(port: u16, filter: &str) -> Self {
        let mut options = MqttOptions::new(format!("test-{:08x}", rand_id()), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(options, 1000);
        // A device answers at once; Nagle's algorithm must not hold it back.
        let mut network = events.network_options();
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let (received_tx, received) = tokio::sync::mpsc::unbounded_channel();
        let subscriber = client.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = subscriber.subscribe(&filter, QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = received_tx.send((publish.topic.clone(), publish.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("the test subscriber subscribes within 10 s")
            .expect("the connection task runs");
        Subscriber {
            client,
            received,
            task,
        }
    }

    /// The next message on the filter, if one comes within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(wait, self.received.recv())
            .await
            .ok()
            .flatten()
    }

    /// Publishes `payload` on `topic` at QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("the publish is queued");
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
