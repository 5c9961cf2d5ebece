//! Hostile input over MQTT, HTTP and the bus itself: timestamps out of
//! range, oversized messages on a persistent session, tens of thousands
//! of keys, deep nesting, bytes that are not UTF-8, a poisoned
//! publication. Afterwards every WebSocket endpoint still delivers normal
//! reports of other devices, and each bad message is a dead letter.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::mqtt::Publisher;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::{Site, base_url, eventually, sources_connected, ws_url};
use sluice_tests::ws::{Received, WsClient};

const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    sluice::message::now_ms()
}

async fn post(url: &str, body: impl Into<reqwest::Body>) -> u16 {
    reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .expect("the HTTP API answers")
        .status()
        .as_u16()
}

/// Dead letters by device: reason and error.
async fn dead_letters(base: &str) -> BTreeMap<String, (String, String)> {
    let letters: Vec<Value> = reqwest::get(format!("{base}/api/v1/deadletter?limit=1000"))
        .await
        .expect("the API answers")
        .json()
        .await
        .expect("a JSON list");
    letters
        .into_iter()
        .map(|l| {
            let device = l["device_id"].as_str().unwrap_or_default().to_owned();
            let device = if device.is_empty() {
                l["topic"].as_str().unwrap_or_default().to_owned()
            } else {
                device
            };
            (
                device,
                (
                    l["reason"].as_str().unwrap_or_default().to_owned(),
                    l["error"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect()
}

/// The temperatures of `device_data` frames before the first that shows
/// `wanted`.
async fn next_temperatures(client: &mut WsClient, wanted: f64) -> Vec<f64> {
    let mut before = Vec::new();
    loop {
        let frame = client.next_of("device_data").await;
        let temperature = frame["data"]["temperature"].as_f64().unwrap_or(f64::NAN);
        if temperature == wanted {
            return before;
        }
        before.push(temperature);
    }
}

/// A JSON array nested `depth` deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_dead_lettered_and_delivery_goes_on() {
    let redis = RedisServer::start();
    let broker = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write(
        "devices.toml",
        "[[devices]]\nid = \"good\"\nproduct = \"json-sensor\"\n",
    );
    let running = site
        .start(&format!(
            r#"
            [bus.redis]
            url = "{redis}"
            flush = "50ms"

            [registry]
            file = "devices.toml"

            [[routes]]
            topic = "devices/{{product}}/{{device}}/telemetry"

            [[sources.mqtt]]
            url = "{broker}"
            client_id = "sluice-hostile"
            persistent_session = true
            max_packet_size = "64KiB"

            [products.json-sensor]
            limits = {{ deadline = "5s" }}
            "#,
            redis = redis.url(),
            broker = broker.url()
        ))
        .await;
    let base = base_url(&running);

    // A client on every endpoint, each following the well-behaved `good`.
    let mut compat =
        WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/ws")).await;
    compat
        .send(&json!({"device_id": "good", "token": ""}))
        .await;
    compat.next_json().await;
    let mut keyed =
        WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/keys/ws")).await;
    keyed
        .send(&json!({"device_id": "good", "token": "", "keys": ["temperature"]}))
        .await;
    keyed.next_json().await;
    let mut status = WsClient::connect(&ws_url(&running, "/api/v1/device/online/status/ws")).await;
    status
        .send(&json!({"device_id": "good", "token": ""}))
        .await;
    status.next_json().await;
    let mut native = WsClient::connect(&ws_url(&running, "/ws")).await;
    native
        .send(&json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": ["good"]}))
        .await;
    native.next_of("subscribed").await;
    sources_connected(&running).await;

    let device = Publisher::connect(broker.port()).await;
    let mqtt = |name: &str| format!("devices/json-sensor/{name}/telemetry");
    // Timestamps past the year 9999, negative, before the window, not an integer.
    device
        .publish(
            &mqtt("ts-9999"),
            json!({"ts": 253_402_300_800_001_i64, "temperature": 1}).to_string(),
        )
        .await;
    device
        .publish(
            &mqtt("ts-max"),
            json!({"ts": i64::MAX, "temperature": 1}).to_string(),
        )
        .await;
    device
        .publish(
            &mqtt("ts-negative"),
            json!({"ts": -5, "temperature": 1}).to_string(),
        )
        .await;
    device
        .publish(
            &mqtt("ts-float"),
            json!({"ts": 1.5, "temperature": 1}).to_string(),
        )
        .await;
    assert_eq!(
        post(
            &format!("{base}/api/v1/ingest/json-sensor/ts-1970"),
            json!({"ts": 0, "t": 1}).to_string()
        )
        .await,
        202
    );
    // Over max_packet_size (64 KiB), on a persistent session: dead-lettered
    // once, acknowledged, and the session goes on. Over four times the
    // limit: the broker drops it for this client (MQTT 5 Maximum Packet Size).
    let big = format!(
        "{{\"temperature\": 1, \"pad\": \"{}\"}}",
        "x".repeat(100 * 1024)
    );
    device.publish(&mqtt("too-large"), big).await;
    let huge = format!(
        "{{\"temperature\": 1, \"pad\": \"{}\"}}",
        "x".repeat(400 * 1024)
    );
    device.publish(&mqtt("far-too-large"), huge).await;
    // Not UTF-8, not JSON.
    device
        .publish(&mqtt("binary"), vec![0xff, 0xfe, 0x00, 0x80])
        .await;
    // Deep nesting: past the parser's limit, and within it.
    assert_eq!(
        post(
            &format!("{base}/api/v1/ingest/json-sensor/deep"),
            format!("{{\"v\": {}}}", nested(100_000))
        )
        .await,
        202
    );
    assert_eq!(
        post(
            &format!("{base}/api/v1/ingest/json-sensor/nested"),
            format!("{{\"v\": {}}}", nested(100))
        )
        .await,
        202
    );
    // Sixty thousand distinct keys (about 1 MB): more fields than an output holds.
    let wide: serde_json::Map<String, Value> =
        (0..60_000).map(|i| (format!("k{i}"), json!(i))).collect();
    let wide = Value::Object(wide).to_string();
    assert!(
        wide.len() < 1 << 20,
        "within the HTTP body limit: {}",
        wide.len()
    );
    assert_eq!(
        post(&format!("{base}/api/v1/ingest/json-sensor/wide"), wide).await,
        202
    );
    // A device id that is not valid UTF-8 is refused at the door.
    assert_eq!(
        post(&format!("{base}/api/v1/ingest/json-sensor/%FF%FE"), "{}").await,
        400
    );
    // A publication on the bus that no frame can show (another writer of
    // the contract channel): the hub skips it and goes on.
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    redis::cmd("PUBLISH")
        .arg("ws:device:good")
        .arg(
            json!({"device_id": "good", "tenant_id": "", "timestamp": 253_402_300_800_001_i64, "data": {"temperature": 99}})
                .to_string(),
        )
        .query_async::<i64>(&mut connection)
        .await
        .expect("Redis takes the publish");
    redis::cmd("PUBLISH")
        .arg("ws:device:good")
        .arg("not json at all")
        .query_async::<i64>(&mut connection)
        .await
        .expect("Redis takes the publish");

    // Every bad message became a dead letter with its reason.
    let expected = [
        ("ts-9999", "bad_timestamp"),
        ("ts-max", "bad_timestamp"),
        ("ts-negative", "bad_timestamp"),
        ("ts-1970", "bad_timestamp"),
        ("ts-float", "script_error"),
        ("binary", "script_error"),
        ("deep", "script_error"),
        ("wide", "bad_output"),
    ];
    let letters = eventually(WAIT, "a dead letter for each bad message", || async {
        let letters = dead_letters(&base).await;
        let all = expected.iter().all(|(d, _)| letters.contains_key(*d))
            && letters.contains_key(&mqtt("too-large"));
        all.then_some(letters)
    })
    .await;
    for (device, reason) in expected {
        assert_eq!(letters[device].0, reason, "{device}: {:?}", letters[device]);
    }
    let (reason, error) = &letters[&mqtt("too-large")];
    assert_eq!(reason, "too_large");
    assert!(error.contains("over the limit of 65536"), "{error}");
    assert!(
        !letters.contains_key("nested"),
        "nesting within the parser's limit is data: {:?}",
        letters.get("nested")
    );

    // Normal reports of another device reach every endpoint, through MQTT
    // (the session was not wedged) and HTTP.
    device
        .publish(
            &mqtt("good"),
            json!({"ts": now_ms(), "temperature": 21.5}).to_string(),
        )
        .await;
    let frame = compat.next_json().await;
    assert_eq!(frame["temperature"], 21.5, "{frame}");
    assert_eq!(keyed.next_json().await["temperature"], 21.5);
    // The native frame needs no date, so the poisoned report did reach it.
    let temperatures = next_temperatures(&mut native, 21.5).await;
    assert!(temperatures.iter().all(|t| *t == 99.0), "{temperatures:?}");
    assert_eq!(
        post(
            &format!("{base}/api/v1/ingest/json-sensor/good"),
            json!({"ts": now_ms(), "temperature": 22.5}).to_string()
        )
        .await,
        202
    );
    assert_eq!(compat.next_json().await["temperature"], 22.5);
    assert!(next_temperatures(&mut native, 22.5).await.is_empty());
    // The status endpoint is alive too: it answers its keep-alive.
    status.send_text("ping").await;
    assert_eq!(
        status.receive(WAIT).await,
        Some(Received::Text("pong".into()))
    );
    // The message over four times the limit never reached sluice.
    assert!(
        !dead_letters(&base)
            .await
            .contains_key(&mqtt("far-too-large"))
    );
    running.stop().await;
}
