//! At-least-once end to end: sluice is killed (SIGKILL) in the middle of
//! a stream and started again; every message the source had accepted has
//! its record in the records stream afterwards (duplicates allowed, no
//! gaps), through an MQTT QoS 1 persistent session and through Kafka.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sluice_tests::mqtt::Publisher;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::{Site, eventually};

const WAIT: Duration = Duration::from_secs(60);
const MESSAGES: u64 = 3000;

/// The `seq` of every record in the records stream.
async fn recorded(redis: &RedisServer) -> BTreeSet<u64> {
    let Ok(mut connection) = redis.client().get_multiplexed_async_connection().await else {
        return BTreeSet::new();
    };
    let mut seqs = BTreeSet::new();
    let mut from = "-".to_owned();
    loop {
        let entries: Vec<(String, Vec<(String, String)>)> = match redis::cmd("XRANGE")
            .arg("sluice:records")
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut connection)
            .await
        {
            Ok(entries) => entries,
            Err(_) => return seqs,
        };
        let Some((last, _)) = entries.last().cloned() else {
            return seqs;
        };
        let count = entries.len();
        for (_, fields) in entries {
            for (_, record) in fields {
                let record: Value = serde_json::from_str(&record).unwrap_or_default();
                if let Some(seq) = record["output"]["fields"]["seq"].as_u64() {
                    seqs.insert(seq);
                }
            }
        }
        if count < 5000 {
            return seqs;
        }
        from = format!("({last}");
    }
}

fn config(redis: &RedisServer, source: &str) -> String {
    format!(
        r#"
        [bus.redis]
        url = "{}"
        flush = "50ms"

        [records.redis_stream]
        key = "sluice:records"
        maxlen = 1000000

        [products.json-sensor]
        limits = {{ deadline = "5s" }}

        {source}
        "#,
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_no_accepted_mqtt_message() {
    let redis = RedisServer::start();
    let broker = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let source = format!(
        r#"
        [[routes]]
        topic = "devices/{{product}}/{{device}}/telemetry"

        [[sources.mqtt]]
        url = "{}"
        client_id = "sluice-alo"
        persistent_session = true
        qos = 1
        "#,
        broker.url()
    );
    let mut first = site.spawn("alo-mqtt", &config(&redis, &source)).await;
    eventually(WAIT, "the source to subscribe", || async {
        let ready = reqwest::get(format!("{}/ready", first.base_url()))
            .await
            .ok()?;
        (ready.status() == 200).then_some(())
    })
    .await;
    let device = Publisher::connect(broker.port()).await;
    for seq in 1..=MESSAGES {
        device
            .publish(
                "devices/json-sensor/alo-1/telemetry",
                json!({"seq": seq}).to_string(),
            )
            .await;
        if seq == MESSAGES / 3 {
            // Mid-stream, once records are flowing.
            eventually(WAIT, "the first records", || async {
                (!recorded(&redis).await.is_empty()).then_some(())
            })
            .await;
            first.kill();
        }
    }
    eventually(WAIT, "the broker to accept every message", || async {
        (device.acked() >= MESSAGES).then_some(())
    })
    .await;
    let second = site.spawn("alo-mqtt", &config(&redis, &source)).await;
    let seqs = eventually(WAIT, "a record of every accepted message", || async {
        let seqs = recorded(&redis).await;
        (seqs.len() as u64 == MESSAGES).then_some(seqs)
    })
    .await;
    assert_eq!(seqs.first(), Some(&1));
    assert_eq!(seqs.last(), Some(&MESSAGES));
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_no_kafka_record() {
    let redis = RedisServer::start();
    let cluster = MockCluster::new(1).expect("a mock cluster");
    cluster.create_topic("alo", 2, 1).expect("the topic");
    let bootstrap = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("a producer");
    let site = Site::with_scripts(&["json-sensor"]);
    let source = format!(
        r#"
        [[sources.kafka]]
        brokers = "{bootstrap}"
        group_id = "alo"
        topics = ["alo"]
        commit_interval = "100ms"
        topic_products = {{ alo = "json-sensor" }}
        options = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
        "#
    );
    let mut first = site.spawn("alo-kafka", &config(&redis, &source)).await;
    for seq in 1..=MESSAGES {
        let device = format!("k-{}", seq % 4);
        let payload = json!({"seq": seq}).to_string();
        producer
            .send(
                FutureRecord::to("alo").key(&device).payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .expect("the mock cluster takes the record");
        if seq == MESSAGES / 3 {
            eventually(WAIT, "the first records", || async {
                (!recorded(&redis).await.is_empty()).then_some(())
            })
            .await;
            first.kill();
        }
    }
    let second = site.spawn("alo-kafka", &config(&redis, &source)).await;
    let seqs = eventually(WAIT, "a record of every produced record", || async {
        let seqs = recorded(&redis).await;
        (seqs.len() as u64 == MESSAGES).then_some(seqs)
    })
    .await;
    assert_eq!(seqs.last(), Some(&MESSAGES));
    drop(second);
}
