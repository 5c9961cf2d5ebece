//! Settings of the sources: MQTT brokers, Kafka clusters and HTTP ingest.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::load::ConfigError;

/// Where device messages come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// MQTT brokers to subscribe to.
    pub mqtt: Vec<MqttConfig>,
    /// Kafka clusters to consume from.
    pub kafka: Vec<KafkaConfig>,
    /// `POST /api/v1/ingest/...`.
    pub http: HttpIngestConfig,
}

impl SourcesConfig {
    pub(super) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        for (i, mqtt) in self.mqtt.iter().enumerate() {
            if let Err(reason) = mqtt.address() {
                return Err(ConfigError::invalid(
                    file,
                    format!("sources.mqtt[{i}].url"),
                    reason,
                ));
            }
            if mqtt.qos > 1 {
                return Err(ConfigError::invalid(
                    file,
                    format!("sources.mqtt[{i}].qos"),
                    "expected 0 or 1",
                ));
            }
            if let Some(group) = &mqtt.shared_group
                && (group.is_empty() || group.contains(['/', '+', '#']))
            {
                return Err(ConfigError::invalid(
                    file,
                    format!("sources.mqtt[{i}].shared_group"),
                    "expected a non-empty name without '/', '+' or '#'",
                ));
            }
        }
        for (i, kafka) in self.kafka.iter().enumerate() {
            if kafka.topics.is_empty() {
                return Err(ConfigError::invalid(
                    file,
                    format!("sources.kafka[{i}].topics"),
                    "expected at least one topic",
                ));
            }
        }
        Ok(())
    }
}

/// One MQTT broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` (port 1883 when left out).
    pub url: String,
    /// The client id; default `sluice-<random>`. Required for a persistent session.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (use `${VAR}`).
    #[serde(default)]
    pub password: Option<String>,
    /// Topic filters; default: every route and the status topic.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Subscription QoS, 0 or 1. With 1 a message is acknowledged only
    /// after a worker has taken it.
    #[serde(default = "defaults::qos")]
    pub qos: u8,
    /// Subscribe as `$share/<group>/<filter>` so several instances split
    /// the messages (MQTT 5 shared subscriptions; mosquitto also grants
    /// them to 3.1.1 clients).
    #[serde(default)]
    pub shared_group: Option<String>,
    /// The MQTT version spoken: `"5"` (the default) or `"3.1.1"`, for
    /// brokers without MQTT 5.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Largest message processed. A larger one, up to four times this, is
    /// acknowledged and dead-lettered (`too_large`, its first 1 KiB kept);
    /// with MQTT 5 the broker is told the four-fold limit in CONNECT and
    /// drops anything larger for this client.
    #[serde(default = "defaults::max_packet")]
    pub max_packet_size: ByteSize,
    /// QoS 1 messages the broker may send before sluice has acknowledged
    /// them (MQTT 5 Receive Maximum); the broker's own limit applies too
    /// (mosquitto: `max_inflight_messages`, default 20).
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: u16,
    /// MQTT keep-alive.
    #[serde(default = "defaults::keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Keep the session (and QoS 1 messages queued while disconnected) on
    /// the broker; needs a fixed `client_id`.
    #[serde(default)]
    pub persistent_session: bool,
    /// The longest wait between reconnection attempts.
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

/// The MQTT version a source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MqttProtocol {
    /// MQTT 5.
    #[default]
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
}

impl MqttConfig {
    /// Host and port from the URL.
    pub fn address(&self) -> Result<(String, u16), String> {
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .or_else(|| self.url.strip_prefix("tcp://"))
            .ok_or_else(|| format!("expected mqtt://host:port, got {:?}", self.url))?;
        let rest = rest.trim_end_matches('/');
        match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() => port
                .parse()
                .map(|port| (host.to_owned(), port))
                .map_err(|_| format!("{port:?} is not a port number")),
            _ if !rest.is_empty() && !rest.contains(':') => Ok((rest.to_owned(), 1883)),
            _ => Err(format!("expected mqtt://host:port, got {:?}", self.url)),
        }
    }
}

/// One Kafka cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Consumer group: instances with the same group share partitions.
    #[serde(default = "defaults::group")]
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// The record header that names the product.
    #[serde(default = "defaults::product_header")]
    pub product_header: String,
    /// The product of each topic, for records without the header.
    #[serde(default)]
    pub topic_products: BTreeMap<String, String>,
    /// How often processed offsets are committed.
    #[serde(default = "defaults::commit", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Largest record value processed; a larger one is dead-lettered
    /// (`too_large`, its first 1 KiB kept) and committed.
    #[serde(default = "defaults::max_packet")]
    pub max_message_size: ByteSize,
    /// Extra librdkafka consumer settings.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// HTTP ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpIngestConfig {
    /// Serve `POST /api/v1/ingest/...`.
    pub enabled: bool,
    /// Largest request body.
    pub max_body: ByteSize,
    /// Most messages in one batch request.
    pub max_batch: usize,
    /// How long a request waits for queue space before answering 503.
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
}

impl Default for HttpIngestConfig {
    fn default() -> Self {
        HttpIngestConfig {
            enabled: true,
            max_body: ByteSize::mib(1),
            max_batch: 1000,
            enqueue_timeout: Duration::from_secs(5),
        }
    }
}

mod defaults {
    use std::time::Duration;

    use bytesize::ByteSize;

    pub(super) fn qos() -> u8 {
        1
    }
    pub(super) fn max_packet() -> ByteSize {
        ByteSize::mib(1)
    }
    pub(super) fn max_inflight() -> u16 {
        1000
    }
    pub(super) fn keep_alive() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn group() -> String {
        "sluice".into()
    }
    pub(super) fn product_header() -> String {
        "product".into()
    }
    pub(super) fn commit() -> Duration {
        Duration::from_secs(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mqtt(url: &str) -> MqttConfig {
        serde_json::from_value(serde_json::json!({ "url": url })).unwrap()
    }

    #[test]
    fn mqtt_urls_give_host_and_port() {
        assert_eq!(
            mqtt("mqtt://127.0.0.1:1884").address().unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            mqtt("mqtt://broker").address().unwrap(),
            ("broker".into(), 1883)
        );
        assert!(
            mqtt("http://broker")
                .address()
                .unwrap_err()
                .contains("expected mqtt://")
        );
        assert!(
            mqtt("mqtt://broker:x")
                .address()
                .unwrap_err()
                .contains("not a port")
        );
        let m = mqtt("mqtt://b");
        assert_eq!((m.qos, m.max_packet_size), (1, ByteSize::mib(1)));
    }
}
