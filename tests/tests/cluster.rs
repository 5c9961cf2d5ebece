//! Two instances on one Redis, as `examples/cluster` runs them: one status
//! truth whichever instance a device's messages reach, delivery that comes
//! back by itself after Redis restarts empty, and a shared scripts
//! directory that reloads only on real changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use sluice::server::Running;
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::{Site, base_url, eventually, ws_url};
use sluice_tests::ws::WsClient;

const WAIT: Duration = Duration::from_secs(20);

async fn ingest(running: &Running, device: &str, temperature: f64) {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/ingest/json-sensor/{device}",
            base_url(running)
        ))
        .body(json!({"temperature": temperature}).to_string())
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(response.status(), 202);
}

/// Collects every message of `channel` (JSON) from now on.
async fn collect(
    redis: &RedisServer,
    channel: &str,
) -> (Arc<Mutex<Vec<Value>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut subscriber = redis
        .client()
        .get_async_pubsub()
        .await
        .expect("a subscriber connection");
    subscriber.subscribe(channel).await.expect("subscribed");
    let into = seen.clone();
    let task = tokio::spawn(async move {
        let mut messages = subscriber.on_message();
        while let Some(message) = messages.next().await {
            if let Ok(value) = serde_json::from_slice::<Value>(message.get_payload_bytes()) {
                into.lock().expect("no panic while held").push(value);
            }
        }
    });
    (seen, task)
}

fn online_flags(seen: &Mutex<Vec<Value>>) -> Vec<i64> {
    seen.lock()
        .expect("no panic while held")
        .iter()
        .map(|v| v["is_online"].as_i64().unwrap_or(-1))
        .collect()
}

/// Reports `device` every 100 ms through `through` (in turn) until
/// `count` transitions are seen, then stays silent until `count + 1` are.
async fn cycle(device: &str, through: &[&Running], seen: &Mutex<Vec<Value>>, count: usize) {
    let mut turn = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while online_flags(seen).len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device} did not go online: {:?}",
            online_flags(seen)
        );
        ingest(through[turn % through.len()], device, 20.0 + turn as f64).await;
        turn += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more reports while online, through every instance in turn.
    for _ in 0..6 {
        ingest(through[turn % through.len()], device, 20.0 + turn as f64).await;
        turn += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(WAIT, "the device to go offline", || async {
        (online_flags(seen).len() > count).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_transitions_alternate_once_each_across_two_instances() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let config = format!(
        r#"
        [bus.redis]
        url = "{}"
        flush = "50ms"

        [status]
        tick = "50ms"

        [products.json-sensor]
        status = {{ mode = "heartbeat", interval = "1s" }}
        limits = {{ deadline = "5s" }}
        "#,
        redis.url()
    );
    let a = site.start(&config).await;
    let b = site.start(&config).await;
    // Watched, so every transition is published on its status channel.
    redis.watch("hb-1").await;
    let (seen, collector) = collect(&redis, "device:hb-1:status").await;

    // Through one instance only (as a Kafka partition owner sees it), then
    // through both in turn (as an MQTT shared subscription splits it).
    for round in 0..3 {
        cycle("hb-1", &[&a], &seen, round * 2 + 1).await;
    }
    for round in 3..6 {
        cycle("hb-1", &[&a, &b], &seen, round * 2 + 1).await;
    }
    // Nothing more comes: no duplicate, no late extra transition.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let flags = online_flags(&seen);
    let expected: Vec<i64> = (0..12).map(|i| if i % 2 == 0 { 1 } else { 0 }).collect();
    assert_eq!(flags, expected, "strictly alternating, each once");
    let sources: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|v| v["source"].as_str().unwrap_or_default().to_owned())
        .collect();
    for (i, source) in sources.iter().enumerate() {
        let wanted = if i % 2 == 0 {
            "message"
        } else {
            "heartbeat_expired"
        };
        assert_eq!(source, wanted, "transition {i}: {sources:?}");
    }
    // Both instances' trackers agree with the table.
    for running in [&a, &b] {
        let status = running.state().status.get("hb-1").expect("followed");
        assert!(!status.online);
    }
    collector.abort();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_receive_again_after_redis_restarts_empty() {
    let mut redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write(
        "devices.toml",
        "[[devices]]\nid = \"r-1\"\nproduct = \"json-sensor\"\n",
    );
    let running = site
        .start(&format!(
            "[bus.redis]\nurl = \"{}\"\nflush = \"50ms\"\ntimeout = \"500ms\"\n[registry]\nfile = \"devices.toml\"\n[products.json-sensor]\nlimits = {{ deadline = \"5s\" }}\n",
            redis.url()
        ))
        .await;
    let mut native = WsClient::connect(&ws_url(&running, "/ws")).await;
    native
        .send(
            &json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": ["r-1"]}),
        )
        .await;
    native.next_of("subscribed").await;
    let mut compat =
        WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/ws")).await;
    compat.send(&json!({"device_id": "r-1", "token": ""})).await;
    compat.next_json().await;
    let watchers = |redis: &RedisServer| {
        let client = redis.client();
        async move {
            let mut connection = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("GET")
                .arg("ws:sub:r-1")
                .query_async::<Option<i64>>(&mut connection)
                .await
                .ok()?
        }
    };
    assert_eq!(watchers(&redis).await, Some(2));
    ingest(&running, "r-1", 1.0).await;
    assert_eq!(
        native.next_of("device_data").await["data"]["temperature"],
        1.0
    );
    assert_eq!(compat.next_json().await["temperature"], 1.0);

    // Redis restarts without persistence: every key and subscription is gone.
    redis.restart();
    assert_eq!(watchers(&redis).await, None, "Redis came back empty");
    // The clients stay connected and, once sluice has registered them
    // again, receive reports again.
    let marker = 1000.0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no report after the restart"
        );
        ingest(&running, "r-1", marker).await;
        match native.quiet(Duration::from_millis(200)).await {
            Some(sluice_tests::ws::Received::Json(frame))
                if frame["type"] == "device_data" && frame["data"]["temperature"] == marker =>
            {
                break;
            }
            _ => {}
        }
    }
    // The subscriptions and the counts are put back by separate steps: a
    // report can arrive before the counts are written, so wait for them.
    let deadline = tokio::time::Instant::now() + WAIT;
    while watchers(&redis).await != Some(2) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(watchers(&redis).await, Some(2), "both counts are back");
    let frame = loop {
        let frame = compat.next_json().await;
        if frame["temperature"] == marker {
            break frame;
        }
    };
    assert_eq!(frame["temperature"], marker);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_a_scripts_directory_reload_only_on_real_changes() {
    let site = Site::with_scripts(&["json-sensor", "counter"]);
    let config =
        "[scripts]\nsettle = \"200ms\"\n[products.json-sensor]\nlimits = { deadline = \"5s\" }\n";
    let a = site.start(config).await;
    let b = site.start(config).await;
    let scripts = site.path().join("scripts");
    let sensor = scripts.join("json-sensor.wasm");
    let bytes = std::fs::read(&sensor).expect("the script is there");
    let checks = |running: &Running, product: &str| {
        let product = running
            .state()
            .scripts
            .get(product)
            .expect("the product is loaded");
        (product.validations, product.reloads)
    };
    // A minute of what instances, editors and builds do to a shared
    // directory: read the files, rewrite them with the same bytes, touch
    // them; meanwhile messages are processed.
    let started = tokio::time::Instant::now();
    let partial = scripts.join(".json-sensor.wasm.partial");
    while started.elapsed() < Duration::from_secs(60) {
        let _ = std::fs::read(&sensor).expect("readable");
        // As build tools write: a temporary file renamed into place.
        std::fs::write(&partial, &bytes).expect("written");
        std::fs::rename(&partial, &sensor).expect("rewritten with the same bytes");
        ingest(&a, "s-1", 1.0).await;
        ingest(&b, "s-2", 2.0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (name, running) in [("A", &a), ("B", &b)] {
        for product in ["json-sensor", "counter"] {
            assert_eq!(
                checks(running, product),
                (0, 0),
                "{name} {product}: no validation, no reload"
            );
        }
    }
    // One real change: exactly one reload on each.
    let counter = std::fs::read(scripts.join("counter.wasm")).expect("the other script");
    std::fs::write(&partial, &counter).expect("written");
    std::fs::rename(&partial, &sensor).expect("renamed into place");
    for running in [&a, &b] {
        eventually(WAIT, "the change to be reloaded", || async {
            (checks(running, "json-sensor").1 == 1).then_some(())
        })
        .await;
    }
    // Settled: the swap's own reads did not start another round.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for running in [&a, &b] {
        assert_eq!(checks(running, "json-sensor"), (1, 1));
        assert_eq!(checks(running, "counter"), (0, 0));
    }
    a.stop().await;
    b.stop().await;
}
