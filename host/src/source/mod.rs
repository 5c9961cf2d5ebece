//! Sources: the transports device messages come from (MQTT, Kafka, and the
//! demo's device simulator); HTTP ingest is a route of the gateway.

mod kafka;
mod mqtt;
pub mod simulator;

pub use kafka::{KafkaSourceError, kafka_consumer, run_kafka};
pub use mqtt::{MqttClient, SourceHealth, filters, run_mqtt};
