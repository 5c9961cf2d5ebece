//! The pipeline with Redis as the bus (a real redis-server and mosquitto):
//! the channel contract, the interest gate, shared deadlines and the
//! status table across a restart.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use sluice_tests::mqtt::Publisher;
use sluice_tests::servers::{Mosquitto, RedisCluster, RedisServer, TlsFiles, redis_with_tls};
use sluice_tests::sluice::{Site, base_url, eventually, interest_is, sources_connected};

const WAIT: Duration = Duration::from_secs(15);

async fn connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers")
}

fn registry() -> &'static str {
    r#"
    [[devices]]
    id = "th-1"
    name = "Lab thermometer"
    product = "json-sensor"
    tenant = "acme"

    [[devices]]
    id = "hb-1"
    name = "Freezer"
    product = "hb"
    tenant = "acme"
    "#
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_message_reaches_a_redis_subscriber_with_the_contract_json() {
    let redis = RedisServer::start();
    let broker = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", registry());
    let running = site
        .start(&format!(
            r#"
            [bus.redis]
            url = "{}"
            flush = "50ms"

            [registry]
            file = "devices.toml"

            [[routes]]
            topic = "devices/{{product}}/{{device}}/telemetry"

            [[sources.mqtt]]
            url = "{}"

            [products.json-sensor]
            params = {{ temp_max = "30" }}
            "#,
            redis.url(),
            broker.url()
        ))
        .await;
    let mut subscriber = redis.client().get_async_pubsub().await.unwrap();
    subscriber.subscribe("ws:device:th-1").await.unwrap();
    subscriber.subscribe("sluice:alert:th-1").await.unwrap();
    redis.watch("th-1").await;
    interest_is(&running, "th-1", true).await;
    sources_connected(&running).await;

    let device = Publisher::connect(broker.port()).await;
    device
        .publish(
            "devices/json-sensor/th-1/telemetry",
            r#"{"ts": 1732262400000, "temperature": 31.5, "humidity": 40}"#,
        )
        .await;
    let mut messages = subscriber.on_message();
    let mut received = HashMap::new();
    while received.len() < 2 {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("publications arrive")
            .unwrap();
        let payload: Value = serde_json::from_slice(message.get_payload_bytes()).unwrap();
        received.insert(
            message.get_channel_name().to_owned(),
            (
                payload,
                String::from_utf8_lossy(message.get_payload_bytes()).into_owned(),
            ),
        );
    }
    let (telemetry, raw) = &received["ws:device:th-1"];
    assert_eq!(
        raw,
        r#"{"device_id":"th-1","tenant_id":"acme","timestamp":1732262400000,"data":{"temperature":31.5,"humidity":40}}"#
    );
    assert_eq!(telemetry["data"]["temperature"], json!(31.5));
    let (alert, _) = &received["sluice:alert:th-1"];
    assert_eq!(alert["severity"], "warning");
    assert_eq!(alert["title"], "Temperature high");

    // The latest snapshot is written behind to Redis, where any instance can read it.
    let latest: HashMap<String, String> =
        eventually(WAIT, "the latest snapshot in Redis", || async {
            let mut commands = connection(&redis).await;
            let map: HashMap<String, String> = redis::cmd("HGETALL")
                .arg("sluice:latest:th-1")
                .query_async(&mut commands)
                .await
                .ok()?;
            (map.len() == 3).then_some(map)
        })
        .await;
    assert_eq!(latest["t:temperature"], "31.5");
    assert_eq!(latest["t:humidity"], "40");
    assert_eq!(latest["systime"], "1732262400000");
    let (status, body) = {
        let response = reqwest::get(format!("{}/api/v1/devices/th-1", base_url(&running)))
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    assert_eq!(
        (status, &body["latest"]["telemetry"]["temperature"]),
        (200, &json!(31.5))
    );
    assert_eq!(body["device_name"], "Lab thermometer");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_watched_devices_cost_redis_commands() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let running = site
        .start(&format!("[bus.redis]\nurl = \"{}\"\nflush = \"50ms\"\n\n[sources.http]\nmax_body = \"8 MiB\"\nmax_batch = 10000", redis.url()))
        .await;
    let state = running.state().clone();
    let mut commands = connection(&redis).await;
    let watched = ["dev-17", "dev-4242", "dev-9999"];
    for device in watched {
        redis.watch(device).await;
    }
    eventually(WAIT, "the interest mirror to see 3 devices", || async {
        (state.interest.len() == 3).then_some(())
    })
    .await;

    let mut subscriber = redis.client().get_async_pubsub().await.unwrap();
    subscriber.psubscribe("ws:device:*").await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut commands)
        .await
        .unwrap();

    let batch: Vec<Value> = (0..10_000)
        .map(|i| json!({"device_id": format!("dev-{i}"), "payload": {"temperature": i, "humidity": 50}}))
        .collect();
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/ingest/json-sensor", base_url(&running)))
        .body(Value::Array(batch).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);

    let mut messages = subscriber.on_message();
    let mut published = Vec::new();
    while published.len() < 3 {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("the 3 publications arrive")
            .unwrap();
        published.push(message.get_channel_name().to_owned());
    }
    published.sort();
    assert_eq!(
        published,
        [
            "ws:device:dev-17",
            "ws:device:dev-4242",
            "ws:device:dev-9999"
        ]
    );
    // Every message is processed (its latest value is kept) ...
    eventually(WAIT, "all 10,000 devices processed", || async {
        (state.latest.len() == 10_000).then_some(())
    })
    .await;
    // ... and no further publication follows.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), messages.next())
            .await
            .is_err(),
        "only 3 publications"
    );
    drop(messages);

    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut commands)
        .await
        .unwrap();
    let calls = |command: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with(&format!("cmdstat_{command}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(calls("exists"), 0, "{stats}");
    assert_eq!(calls("get"), 0, "{stats}");
    assert_eq!(calls("publish"), 3, "{stats}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_deadlines_take_a_silent_device_offline_once_and_a_restart_knows_it() {
    let redis = RedisServer::start();
    let site = Site::with_renamed(&[("hb", "json-sensor")]);
    site.write("devices.toml", registry());
    let config = format!(
        r#"
        [bus.redis]
        url = "{}"
        flush = "50ms"

        [registry]
        file = "devices.toml"

        [status]
        tick = "50ms"

        [products.hb]
        status = {{ mode = "heartbeat", interval = "1s" }}
        "#,
        redis.url()
    );
    let first = site.start(&config).await;
    let second = site.start(&config).await;
    let mut commands = connection(&redis).await;
    let mut subscriber = redis.client().get_async_pubsub().await.unwrap();
    subscriber.subscribe("device:hb-1:status").await.unwrap();
    redis.watch("hb-1").await;
    for running in [&first, &second] {
        let state = running.state().clone();
        eventually(WAIT, "both interest mirrors to see hb-1", || async {
            state.interest.is_watched("hb-1").then_some(())
        })
        .await;
    }

    // The device reports to both instances (as with a shared MQTT subscription).
    for running in [&first, &second, &first] {
        let response = reqwest::Client::new()
            .post(format!("{}/api/v1/ingest/hb/hb-1", base_url(running)))
            .body(r#"{"temperature": -18}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
    }
    let mut messages = subscriber.on_message();
    let mut changes = Vec::new();
    // Online once (the second instance's local view also went online, but
    // the shared table took only one), then offline once after the silence.
    while changes.len() < 2 {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("status changes arrive")
            .unwrap();
        changes.push(serde_json::from_slice::<Value>(message.get_payload_bytes()).unwrap());
    }
    assert_eq!(changes[0]["is_online"], 1);
    assert_eq!(changes[0]["source"], "message");
    assert_eq!(changes[0]["device_name"], "Freezer");
    assert_eq!(changes[1]["is_online"], 0);
    assert_eq!(changes[1]["source"], "heartbeat_expired");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), messages.next())
            .await
            .is_err(),
        "each transition once"
    );
    drop(messages);

    let stored: String = redis::cmd("HGET")
        .arg("sluice:status")
        .arg("hb-1")
        .query_async(&mut commands)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&stored).unwrap()["is_online"],
        0
    );
    let transitions: i64 = redis::cmd("XLEN")
        .arg("sluice:status:transitions")
        .query_async(&mut commands)
        .await
        .unwrap();
    assert_eq!(transitions, 2);

    first.stop().await;
    second.stop().await;
    let restarted = site.start(&config).await;
    let status = restarted
        .state()
        .status
        .get("hb-1")
        .expect("the restarted instance knows hb-1");
    assert!(!status.online);
    assert_eq!(status.source.as_str(), "heartbeat_expired");
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_node_is_refused_at_start_naming_it() {
    let cluster = RedisCluster::start(3).await;
    let node = &cluster.nodes[1];
    let site = Site::with_scripts(&["json-sensor"]);
    let error = site
        .start_error(&format!("[bus.redis]\nurl = \"{}\"\n", node.url()))
        .await;
    assert!(
        error.contains("Redis Cluster is not supported")
            && error.contains(&format!("127.0.0.1:{}", node.port())),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_written_again_after_a_lost_answer_is_recorded_once() {
    use sluice::bus::{AlertRaised, Bus, Publication, RedisBus, RedisTarget};
    let redis = RedisServer::start();
    let config: sluice::config::RedisConfig =
        serde_json::from_value(json!({"url": redis.url()})).expect("a Redis configuration");
    let target = RedisTarget::connect(&config).await.expect("Redis answers");
    let bus = RedisBus::new(
        target,
        &config,
        100,
        None,
        sluice::bus::history::HistoryLimits::default(),
    );
    let alert = |n: u32| {
        Publication::Alert(AlertRaised {
            device_id: "th-1".into(),
            tenant_id: "acme".into(),
            timestamp: i64::from(n),
            severity: sluice::script::Severity::Warning,
            title: "Temperature high".into(),
            description: format!("alert {n}"),
            position: None,
        })
    };
    let entries = || async {
        let mut connection = connection(&redis).await;
        let n: usize = redis::cmd("XLEN")
            .arg("sluice:history:{acme}")
            .query_async(&mut connection)
            .await
            .expect("XLEN");
        n
    };
    let recorded = bus
        .record(
            &[alert(1), alert(2)],
            &[false, false],
            &[vec![], vec![]],
            &[1, 2],
        )
        .await
        .expect("recorded");
    assert!(recorded.iter().all(Option::is_some), "{recorded:?}");
    // The same batch again (its answer was lost), with a new entry behind
    // it: only the new one is recorded.
    let again = bus
        .record(
            &[alert(1), alert(2), alert(3)],
            &[false; 3],
            &[vec![], vec![], vec![]],
            &[1, 2, 3],
        )
        .await
        .expect("recorded");
    assert_eq!(again[..2], [None, None], "{again:?}");
    let third = again[2].as_ref().expect("the new entry is recorded");
    assert_eq!(third.offset, 3);
    assert_eq!(entries().await, 3);
    // Another writer (another instance, or this one restarted) has ids of
    // its own.
    let other = RedisBus::new(
        RedisTarget::connect(&config).await.expect("Redis answers"),
        &config,
        100,
        None,
        sluice::bus::history::HistoryLimits::default(),
    );
    let theirs = other
        .record(&[alert(4)], &[false], &[vec![]], &[1])
        .await
        .expect("recorded");
    assert_eq!(theirs[0].as_ref().map(|p| p.offset), Some(4));
    assert_eq!(entries().await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_checks_the_server_against_the_ca_and_shows_a_client_certificate() {
    let files = TlsFiles::generate();
    let (redis, tls_port) = redis_with_tls(&files);
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", registry());
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let path = |name: &str| files.path(name).display().to_string();
    let config = |tls: &str| {
        format!(
            "[bus.redis]\nurl = \"{url}\"\n{tls}\n[registry]\nfile = \"devices.toml\"\n[products.json-sensor]\nparams = {{ temp_max = \"30\" }}\n"
        )
    };
    // The test CA is not among the system's roots.
    let error = site.start_error(&config("")).await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    // The server wants a client certificate.
    let error = site
        .start_error(&config(&format!("tls_ca_file = \"{}\"", path("ca.crt"))))
        .await;
    assert!(error.contains("CertificateRequired"), "{error}");
    // With both, sluice records through TLS: the alert is in Redis.
    let running = site
        .start(&config(&format!(
            "tls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            path("ca.crt"),
            path("client.crt"),
            path("client.key")
        )))
        .await;
    let base = base_url(&running);
    sluice_tests::sluice::report_temperature(&base, "th-1", 35.0).await;
    let mut connection = connection(&redis).await;
    eventually(WAIT, "the alert recorded through TLS", || {
        let mut connection = connection.clone();
        async move {
            let n: usize = redis::cmd("XLEN")
                .arg("sluice:history:{acme}")
                .query_async(&mut connection)
                .await
                .unwrap_or(0);
            (n >= 1).then_some(())
        }
    })
    .await;
    let _: () = redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .expect("the plain port answers too");
    running.stop().await;
}
