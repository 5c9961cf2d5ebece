//! The raw message: a device's payload as it arrived, before any script ran.

/// How a message reached sluice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// An MQTT publish.
    Mqtt,
    /// A Kafka record.
    Kafka,
    /// An HTTP ingest request.
    Http,
    /// Produced inside sluice: the device simulator, `sluice script test`, fixtures.
    Internal,
}

impl SourceKind {
    /// The lower-case name used in logs, metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Mqtt => "mqtt",
            SourceKind::Kafka => "kafka",
            SourceKind::Http => "http",
            SourceKind::Internal => "internal",
        }
    }
}

/// One raw message from a device, exactly as it arrived. A script receives
/// it in the packed encoding of `sluice:script` (see `docs/script-abi.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct RawMessage {
    /// The device the message was routed to (for a gateway: the gateway itself).
    pub device_id: String,
    /// The product whose script parses it.
    pub product: String,
    /// The MQTT topic, Kafka topic or HTTP path it came from.
    pub topic: String,
    /// The payload bytes, unchanged.
    pub payload: Vec<u8>,
    /// When sluice received it, in milliseconds since the Unix epoch.
    pub received_at: i64,
    /// How it arrived.
    pub source: SourceKind,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}
