//! Sources: where device messages come from (MQTT, Kafka, HTTP, and the
//! demo's device simulator).

pub mod http;
mod kafka;
mod mqtt;
pub mod simulator;

pub use kafka::{KafkaSourceError, kafka_consumer, run_kafka};
pub use mqtt::{SourceHealth, filters, run_mqtt};
