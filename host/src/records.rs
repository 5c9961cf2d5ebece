//! Processed-record output: every output of every message, as one JSON
//! line each, for a database writer to consume from a capped Redis stream
//! or a Kafka topic.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Serialize;

use crate::bus::{Bus, BusError};
use crate::config::RecordsConfig;
use crate::message::RawMessage;
use crate::script::Output;

/// One processed output, as written to the records stream or topic:
/// `{"device_id","product","tenant_id","timestamp","received_at","script_version","source","output":{…}}`.
#[derive(Debug, Serialize)]
pub struct ProcessedRecord<'a> {
    /// The device the output is about.
    pub device_id: &'a str,
    /// The product whose script produced it.
    pub product: &'a str,
    /// The device's tenant.
    pub tenant_id: &'a str,
    /// When measured, ms since the Unix epoch.
    pub timestamp: i64,
    /// When the message was received, ms since the Unix epoch.
    pub received_at: i64,
    /// The script version.
    pub script_version: &'a str,
    /// How the message arrived.
    pub source: &'a str,
    /// The output, as `sluice script test` prints it.
    pub output: &'a Output,
}

impl ProcessedRecord<'_> {
    /// The record as one JSON line; `None` (counted) if it cannot be written.
    pub fn to_json(&self) -> Option<String> {
        crate::bus::json_text(self, "record")
    }
}

/// Builds the record of `output` of `message`.
pub fn record_json(
    message: &RawMessage,
    output: &Output,
    device: &str,
    tenant: &str,
    version: &str,
) -> Option<String> {
    ProcessedRecord {
        device_id: device,
        product: &message.product,
        tenant_id: tenant,
        timestamp: output.timestamp.unwrap_or(message.received_at),
        received_at: message.received_at,
        script_version: version,
        source: message.source.as_str(),
        output,
    }
    .to_json()
}

/// Where records go.
pub struct RecordsOutput {
    redis: bool,
    kafka: Option<(FutureProducer, String)>,
}

impl std::fmt::Debug for RecordsOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordsOutput")
            .field("redis", &self.redis)
            .field("kafka", &self.kafka.as_ref().map(|(_, topic)| topic))
            .finish()
    }
}

/// The Kafka producer could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the Kafka records producer: {0}")]
pub struct RecordsError(String);

impl RecordsOutput {
    /// The outputs `config` asks for; `None` when records are off.
    pub fn new(config: &RecordsConfig) -> Result<Option<Self>, RecordsError> {
        if config.redis_stream.is_none() && config.kafka.is_none() {
            return Ok(None);
        }
        let kafka = match &config.kafka {
            Some(kafka) => {
                let mut client = ClientConfig::new();
                client
                    .set("bootstrap.servers", &kafka.brokers)
                    .set("message.timeout.ms", "30000");
                for (key, value) in &kafka.options {
                    client.set(key, value);
                }
                let producer: FutureProducer =
                    client.create().map_err(|e| RecordsError(e.to_string()))?;
                Some((producer, kafka.topic.clone()))
            }
            None => None,
        };
        Ok(Some(RecordsOutput {
            redis: config.redis_stream.is_some(),
            kafka,
        }))
    }

    /// Writes a batch of records.
    pub async fn write(&self, bus: &dyn Bus, batch: &[String]) -> Result<(), BusError> {
        if self.redis {
            bus.add_records(batch).await?;
        }
        if let Some((producer, topic)) = &self.kafka {
            let sends = batch.iter().map(|record| {
                producer.send(
                    FutureRecord::<(), String>::to(topic).payload(record),
                    Duration::from_secs(5),
                )
            });
            for result in futures::future::join_all(sends).await {
                if let Err((error, _)) = result {
                    return Err(BusError::Unavailable(format!(
                        "Kafka records topic: {error}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Waits for records in flight to reach Kafka.
    pub fn flush(&self, timeout: Duration) {
        if let Some((producer, _)) = &self.kafka
            && let Err(error) = producer.flush(timeout)
        {
            tracing::warn!(%error, "records still in flight to Kafka at shutdown");
        }
    }
}
