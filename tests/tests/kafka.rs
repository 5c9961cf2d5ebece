//! Kafka ingest through librdkafka's mock cluster: key = device id, product
//! from a header or the topic map, offsets committed only after processing.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use sluice_tests::sluice::{Site, eventually};

const WAIT: Duration = Duration::from_secs(20);
const TOPIC: &str = "uplinks";
const PARTITIONS: i32 = 3;
const GROUP: &str = "sluice-test";

async fn produce(
    producer: &FutureProducer,
    key: Option<&str>,
    product: Option<&str>,
    payload: &str,
) -> (i32, i64) {
    let mut record = FutureRecord::to(TOPIC).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(product) = product {
        record = record.headers(OwnedHeaders::new().insert(Header {
            key: "product",
            value: Some(product),
        }));
    }
    let delivery = producer
        .send(record, Duration::from_secs(5))
        .await
        .expect("the mock cluster takes the record");
    (delivery.partition, delivery.offset)
}

/// The offsets group `GROUP` has committed, per partition.
fn committed(bootstrap: &str) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", GROUP)
        .create()
        .expect("a consumer for reading commits");
    let mut partitions = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        partitions.add_partition(TOPIC, partition);
    }
    let offsets = consumer
        .committed_offsets(partitions, Duration::from_secs(5))
        .expect("committed offsets");
    (0..PARTITIONS)
        .map(
            |p| match offsets.find_partition(TOPIC, p).map(|e| e.offset()) {
                Some(Offset::Offset(n)) => n,
                _ => 0,
            },
        )
        .collect()
}

fn config(bootstrap: &str) -> String {
    format!(
        r#"
        [[sources.kafka]]
        brokers = "{bootstrap}"
        group_id = "{GROUP}"
        topics = ["{TOPIC}"]
        commit_interval = "100ms"
        topic_products = {{ {TOPIC} = "json-sensor" }}
        # The mock broker keeps a member that left until its session times
        # out, so a short session lets the second instance join quickly.
        options = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_processed_and_committed_after_processing() {
    let cluster = MockCluster::new(1).expect("a mock cluster");
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .expect("the topic");
    let bootstrap = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("a producer");

    let mut ends = vec![0i64; PARTITIONS as usize];
    let mut record = |partition: i32, offset: i64| {
        ends[partition as usize] = ends[partition as usize].max(offset + 1)
    };
    for i in 0..30 {
        let device = format!("k-{}", i % 6);
        // Half name the product in a header, half rely on the topic map.
        let product = (i % 2 == 0).then_some("json-sensor");
        let (p, o) = produce(
            &producer,
            Some(&device),
            product,
            &json!({"temperature": i}).to_string(),
        )
        .await;
        record(p, o);
    }
    let (p, o) = produce(&producer, None, None, "no key").await;
    record(p, o);
    let (p, o) = produce(&producer, Some("k-0"), Some("counter"), "{}").await;
    record(p, o);

    let site = Site::with_scripts(&["json-sensor", "counter"]);
    let running = site.start(&config(&bootstrap)).await;
    let state = running.state().clone();
    eventually(WAIT, "the last reading of every device", || async {
        (0..6)
            .all(|d| {
                state
                    .latest
                    .get(&format!("k-{d}"))
                    .is_some_and(|s| s.telemetry["temperature"] == json!(24 + d))
            })
            .then_some(())
    })
    .await;
    let letters = eventually(WAIT, "the keyless record's dead letter", || async {
        let letters = state.bus.dead_letters(10, None).await.ok()?;
        letters
            .iter()
            .any(|l| l.error.contains("no key"))
            .then_some(letters)
    })
    .await;
    assert_eq!(
        letters
            .iter()
            .filter(|l| l.reason.as_str() == "unroutable")
            .count(),
        1
    );
    let calls = |product: &str| {
        state
            .scripts
            .get(product)
            .and_then(|p| p.script.clone())
            .unwrap()
            .stats()
            .snapshot()
            .calls
    };
    eventually(WAIT, "the counter record", || async {
        (calls("counter") == 1).then_some(())
    })
    .await;
    assert_eq!(calls("json-sensor"), 30);
    running.stop().await;
    assert_eq!(
        committed(&bootstrap),
        ends,
        "every processed record is committed at stop"
    );

    // A new instance of the group starts after the committed offsets.
    for i in 0..6 {
        produce(
            &producer,
            Some(&format!("k-{i}")),
            Some("json-sensor"),
            &json!({"temperature": 100 + i}).to_string(),
        )
        .await;
    }
    let running = site.start(&config(&bootstrap)).await;
    let state = running.state().clone();
    eventually(WAIT, "the new readings", || async {
        (0..6)
            .all(|d| {
                state
                    .latest
                    .get(&format!("k-{d}"))
                    .is_some_and(|s| s.telemetry["temperature"] == json!(100 + d))
            })
            .then_some(())
    })
    .await;
    let processed = state
        .scripts
        .get("json-sensor")
        .and_then(|p| p.script.clone())
        .unwrap()
        .stats()
        .snapshot()
        .calls;
    assert_eq!(processed, 6, "committed records are not processed again");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_of_a_kafka_product_are_records_keyed_by_the_device() {
    use rdkafka::Message;
    let cluster = MockCluster::new(1).expect("a mock cluster");
    cluster
        .create_topic("commands.lht65", 1, 1)
        .expect("the topic");
    let bootstrap = cluster.bootstrap_servers();
    let site = Site::with_scripts(&["lht65"]);
    let running = site
        .start(&format!(
            r#"
            [products.lht65]
            limits = {{ deadline = "5s" }}
            commands = {{ transport = "kafka", brokers = "{bootstrap}", topic = "commands.{{product}}" }}
            "#
        ))
        .await;
    // The device reports once, so it is known.
    let url = format!(
        "{}/api/v1/ingest/lht65/a84041000181c061",
        sluice_tests::sluice::base_url(&running)
    );
    let http = reqwest::Client::new();
    let uplink = json!({"fPort": 2, "data": "y/YLDQN2AQrdf/8=", "deviceInfo": {"devEui": "a84041000181c061"}});
    assert_eq!(
        http.post(&url)
            .body(uplink.to_string())
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let commands = format!(
        "{}/api/v1/devices/a84041000181c061/commands",
        sluice_tests::sluice::base_url(&running)
    );
    let answer = eventually(WAIT, "the command to be sent", || async {
        let response = http
            .post(&commands)
            .json(&json!({"name": "set_interval", "params": {"seconds": 60}, "oneway": true, "wait": true}))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(response.json::<serde_json::Value>().await.ok()?)
    })
    .await;
    assert_eq!(answer["state"], "sent", "{answer}");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "command-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a consumer");
    consumer.subscribe(&["commands.lht65"]).expect("subscribed");
    let (key, payload) = eventually(WAIT, "the command record", || async {
        let message = consumer.poll(Duration::from_millis(200))?.ok()?;
        Some((
            message.key().map(<[u8]>::to_vec),
            message.payload().map(<[u8]>::to_vec),
        ))
    })
    .await;
    assert_eq!(key.as_deref(), Some(&b"a84041000181c061"[..]));
    assert_eq!(payload.as_deref(), Some(&[0x01, 0x00, 0x00, 0x3c][..]));
}
