//! Sources: where device messages come from (MQTT, Kafka, HTTP).

pub mod http;
mod kafka;
mod mqtt;

pub use kafka::{KafkaSourceError, kafka_consumer, run_kafka};
pub use mqtt::{SourceHealth, filters, run_mqtt};
