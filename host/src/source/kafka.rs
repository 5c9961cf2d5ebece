//! Kafka ingest: a consumer group member whose record key is the device id
//! and whose product comes from a header or a topic → product map. Offsets
//! are committed only up to the last record whose effects the bus has
//! accepted, so a crash replays what was not finished (at-least-once). A
//! record that cannot be used (no key, no product, larger than
//! `max_message_size`) is dead-lettered and committed like any other.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::mqtt::SourceHealth;
use crate::config::KafkaConfig;
use crate::deadletter::DeadLetter;
use crate::message::{RawMessage, SourceKind, now_ms};
use crate::pipeline::{Completion, Envelope, Inbound, Ingest};

/// The Kafka consumer could not be created.
#[derive(Debug, thiserror::Error)]
#[error("Kafka source {brokers}: {reason}")]
pub struct KafkaSourceError {
    brokers: String,
    reason: String,
}

/// Offsets handed to workers and not yet finished, per partition.
#[derive(Debug, Default)]
struct Offsets {
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    /// The highest offset handed to a worker.
    highest: i64,
    /// The offset last committed (the next to read).
    committed: i64,
}

impl Offsets {
    fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let entry = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| Partition {
                committed: offset,
                ..Partition::default()
            });
        entry.in_flight.insert(offset);
        entry.highest = entry.highest.max(offset);
    }

    fn finish(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(entry) = self.partitions.get_mut(&(topic.to_owned(), partition)) {
            entry.in_flight.remove(&offset);
        }
    }

    fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }

    /// Per partition, the offset to commit (the next one to read) when it moved:
    /// everything below the oldest unfinished record is done.
    fn committable(&mut self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), entry) in &mut self.partitions {
            let next = entry
                .in_flight
                .first()
                .copied()
                .unwrap_or(entry.highest + 1);
            if next > entry.committed {
                entry.committed = next;
                out.push((topic.clone(), *partition, next));
            }
        }
        out
    }
}

fn lock(offsets: &Mutex<Offsets>) -> std::sync::MutexGuard<'_, Offsets> {
    // Held for a set insert or removal; never across an await.
    offsets
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Creates the consumer and subscribes it.
pub fn kafka_consumer(config: &KafkaConfig) -> Result<StreamConsumer, KafkaSourceError> {
    let fail = |reason: String| KafkaSourceError {
        brokers: config.brokers.clone(),
        reason,
    };
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    for (key, value) in &config.options {
        client.set(key, value);
    }
    let consumer: StreamConsumer = client.create().map_err(|e| fail(e.to_string()))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| fail(e.to_string()))?;
    Ok(consumer)
}

/// Consumes until `shutdown`, then waits up to `drain` for the workers to
/// finish what they were given and commits it.
pub async fn run_kafka(
    config: KafkaConfig,
    consumer: Arc<StreamConsumer>,
    ingest: Ingest,
    health: Arc<SourceHealth>,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let offsets = Arc::new(Mutex::new(Offsets::default()));
    let received = metrics::counter!("sluice_ingest_messages_total", "source" => "kafka");
    let mut commit_ticker = tokio::time::interval(config.commit_interval);
    commit_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(brokers = %config.brokers, group = %config.group_id, topics = ?config.topics, "Kafka source starting");
    loop {
        tokio::select! {
            message = consumer.recv() => match message {
                Ok(message) => {
                    health.set_connected(true);
                    received.increment(1);
                    let (topic, partition, offset) = (message.topic().to_owned(), message.partition(), message.offset());
                    lock(&offsets).start(&topic, partition, offset);
                    let done = {
                        let offsets = Arc::clone(&offsets);
                        let topic = topic.clone();
                        Completion::new(move || lock(&offsets).finish(&topic, partition, offset))
                    };
                    let payload = message.payload().unwrap_or_default();
                    let limit = config.max_message_size.as_u64();
                    if payload.len() as u64 > limit {
                        metrics::counter!("sluice_ingest_too_large_total", "source" => "kafka").increment(1);
                        let letter = DeadLetter::too_large(SourceKind::Kafka, &topic, payload, limit);
                        ingest.dead_letter_then(letter, Some(done)).await;
                        continue;
                    }
                    match route(&config, &message) {
                        Ok(raw) => {
                            let envelope = Envelope { inbound: Inbound::Data(raw), done: Some(done) };
                            let submitted = tokio::select! {
                                result = ingest.submit(envelope) => result.is_ok(),
                                _ = shutdown.changed() => false,
                            };
                            if !submitted {
                                break;
                            }
                        }
                        Err(reason) => {
                            let letter = DeadLetter::unroutable(SourceKind::Kafka, &topic, payload, reason);
                            ingest.dead_letter_then(letter, Some(done)).await;
                        }
                    }
                }
                Err(error) => {
                    health.set_connected(false);
                    metrics::counter!("sluice_source_errors_total", "source" => "kafka").increment(1);
                    tracing::warn!(brokers = %config.brokers, %error, "Kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = commit_ticker.tick() => commit(&consumer, &offsets, CommitMode::Async),
            _ = shutdown.changed() => break,
        }
    }
    // Let the workers finish what they hold, then commit it.
    drop(ingest);
    let deadline = tokio::time::Instant::now() + drain;
    while lock(&offsets).in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unfinished = lock(&offsets).in_flight();
    if unfinished > 0 {
        tracing::warn!(
            unfinished,
            "stopping with Kafka records unfinished; they will be consumed again"
        );
    }
    commit(&consumer, &offsets, CommitMode::Sync);
    // Leave the group now rather than at the session timeout, so the
    // partitions move to the other members at once.
    consumer.unsubscribe();
    health.set_connected(false);
    tracing::info!(brokers = %config.brokers, "Kafka source stopped");
}

fn commit(consumer: &StreamConsumer, offsets: &Mutex<Offsets>, mode: CommitMode) {
    let committable = lock(offsets).committable();
    if committable.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition, next) in &committable {
        if let Err(error) = list.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::warn!(%error, topic, partition, "cannot build a Kafka commit");
        }
    }
    if let Err(error) = consumer.commit(&list, mode) {
        metrics::counter!("sluice_source_errors_total", "source" => "kafka").increment(1);
        tracing::warn!(%error, "Kafka offset commit failed; it is retried with the next one");
    }
}

/// The raw message of a record, or why it cannot be routed: the key is
/// the device id; the product comes from the header, else from the topic map.
fn route<M: Message>(config: &KafkaConfig, message: &M) -> Result<RawMessage, String> {
    let topic = message.topic();
    let payload = message.payload().unwrap_or_default();
    let device = match message.key().map(std::str::from_utf8) {
        Some(Ok(key)) if crate::config::check_name(key).is_ok() => key.to_owned(),
        Some(Ok(key)) => return Err(format!("record key {key:?} is not a device id")),
        Some(Err(_)) => return Err("record key is not UTF-8".into()),
        None => return Err("record has no key (the device id)".into()),
    };
    let from_header = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == config.product_header)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    });
    let product = from_header
        .or_else(|| config.topic_products.get(topic).cloned())
        .ok_or_else(|| {
            format!(
                "no `{}` header and no product for topic {topic:?}",
                config.product_header
            )
        })?;
    Ok(RawMessage {
        device_id: device,
        product,
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        received_at: now_ms(),
        source: SourceKind::Kafka,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_oldest_unfinished_record() {
        let mut offsets = Offsets::default();
        for offset in 10..15 {
            offsets.start("t", 0, offset);
        }
        offsets.finish("t", 0, 10);
        offsets.finish("t", 0, 12);
        assert_eq!(offsets.committable(), [("t".to_owned(), 0, 11)]);
        assert_eq!(offsets.committable(), [], "nothing new");
        offsets.finish("t", 0, 11);
        offsets.finish("t", 0, 13);
        offsets.finish("t", 0, 14);
        assert_eq!(offsets.committable(), [("t".to_owned(), 0, 15)]);
        assert_eq!(offsets.in_flight(), 0);
    }

    #[test]
    fn partitions_commit_independently() {
        let mut offsets = Offsets::default();
        offsets.start("t", 0, 0);
        offsets.start("t", 1, 7);
        offsets.finish("t", 1, 7);
        let mut committed = offsets.committable();
        committed.sort();
        assert_eq!(committed, [("t".to_owned(), 1, 8)]);
    }
}
