//! The WebSocket gateway end to end, with real clients: the compatibility
//! endpoints, the native protocol's filters and services, auth and
//! tenants, malformed frames and a slow reader.

use std::time::Duration;

use serde_json::{Value, json};
use sluice::gateway::auth::sign_jwt;
use sluice_tests::mqtt::Publisher;
use sluice_tests::servers::Mosquitto;
use sluice_tests::sluice::{Site, base_url, eventually, sources_connected, ws_url};
use sluice_tests::ws::{Received, WsClient};

const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "test-secret-of-at-least-32-bytes!";

const REGISTRY: &str = r#"
[[devices]]
id = "th-1"
name = "Lab thermometer"
product = "json-sensor"
tenant = "acme"
type = "thermometer"
location = "lab"
groups = ["cold-chain"]

[[devices]]
id = "th-2"
name = "Office thermometer"
product = "json-sensor"
tenant = "acme"
type = "thermometer"
location = "office"
groups = ["comfort"]

[[devices]]
id = "door-1"
name = "Lab door"
product = "json-sensor"
tenant = "acme"
type = "door"
location = "lab"
groups = ["cold-chain", "security"]

[[devices]]
id = "other-1"
name = "Someone else's"
product = "json-sensor"
tenant = "globex"
type = "thermometer"
location = "lab"
"#;

/// sluice with `json-sensor` and the registry above, started with `config`.
async fn start(config: &str) -> (Site, sluice::server::Running) {
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let running = site.start(config).await;
    (site, running)
}

fn report(ts: i64, temperature: f64) -> String {
    json!({"ts": ts, "temperature": temperature, "humidity": 48.2, "status": "ok"}).to_string()
}

async fn ingest(base: &str, device: &str, payload: &str) {
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/ingest/json-sensor/{device}"))
        .body(payload.to_owned())
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(response.status(), 202);
}

fn now_ms() -> i64 {
    sluice::message::now_ms()
}

fn keys(frame: &Value) -> Vec<&str> {
    frame
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatibility_endpoints_follow_mqtt_reports_and_status() {
    let broker = Mosquitto::start();
    let (_site, running) = start(&format!(
        r#"
            [registry]
            file = "devices.toml"

            [[routes]]
            topic = "devices/{{product}}/{{device}}/telemetry"

            [[sources.mqtt]]
            url = "{}"

            [products.json-sensor]
            status = {{ mode = "timeout", after = "1s" }}
            params = {{ temp_max = "30" }}
            "#,
        broker.url()
    ))
    .await;

    let mut status = WsClient::connect(&ws_url(&running, "/api/v1/device/online/status/ws")).await;
    status
        .send(&json!({"device_id": "th-1", "token": ""}))
        .await;
    let first = status.next_json().await;
    assert_eq!(
        first,
        json!({"device_id": "th-1", "device_name": "Lab thermometer", "is_online": 0, "timestamp": 0, "source": "unknown"})
    );

    let mut telemetry =
        WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/ws")).await;
    telemetry
        .send(&json!({"device_id": "th-1", "token": ""}))
        .await;
    let empty = telemetry.next_json().await;
    assert_eq!(keys(&empty), ["systime"]);

    let mut keyed =
        WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/keys/ws")).await;
    keyed
        .send(&json!({"device_id": "th-1", "token": "", "keys": ["temperature"]}))
        .await;
    assert_eq!(keys(&keyed.next_json().await), ["systime"]);

    sources_connected(&running).await;
    let device = Publisher::connect(broker.port()).await;
    device
        .publish(
            "devices/json-sensor/th-1/telemetry",
            report(1_732_262_400_000, 21.5),
        )
        .await;

    let frame = telemetry.next_json().await;
    assert_eq!(
        frame,
        json!({"temperature": 21.5, "humidity": 48.2, "status": "ok", "systime": "2024-11-22T08:00:00.000Z"})
    );
    assert_eq!(
        keyed.next_json().await,
        json!({"temperature": 21.5, "systime": "2024-11-22T08:00:00.000Z"})
    );

    let online = status.next_json().await;
    assert_eq!(
        keys(&online),
        [
            "device_id",
            "device_name",
            "is_online",
            "timestamp",
            "source"
        ]
    );
    assert_eq!(online["is_online"], 1);
    assert_eq!(online["source"], "message");
    // One second of silence: offline, by timeout.
    let offline = status.next_json().await;
    assert_eq!(offline["is_online"], 0);
    assert_eq!(offline["source"], "timeout_expired");

    // A report without the chosen key sends nothing on the keys endpoint.
    device
        .publish(
            "devices/json-sensor/th-1/telemetry",
            json!({"ts": 1_732_262_460_000_i64, "humidity": 50.0}).to_string(),
        )
        .await;
    let humidity = telemetry.next_json().await;
    assert_eq!(humidity["humidity"], 50.0);
    assert_eq!(keyed.quiet(Duration::from_millis(500)).await, None);

    // Text ping → pong; a later subscriber gets the merged snapshot at once.
    telemetry.send_text("ping").await;
    assert_eq!(
        telemetry.receive(WAIT).await,
        Some(Received::Text("pong".into()))
    );
    let mut late = WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/ws")).await;
    late.send(&json!({"device_id": "th-1", "token": ""})).await;
    assert_eq!(
        late.next_json().await,
        json!({"temperature": 21.5, "humidity": 50.0, "status": "ok", "systime": "2024-11-22T08:01:00.000Z"})
    );
    running.stop().await;
}

fn native_config() -> &'static str {
    r#"
    [registry]
    file = "devices.toml"

    [products.json-sensor]
    status = { mode = "timeout", after = "1h" }
    params = { temp_max = "30" }

    [websocket]
    max_subscriptions = 8
    max_frame = "1 KiB"
    "#
}

async fn subscribe(client: &mut WsClient, frame: Value) -> Value {
    client.subscribe(&frame).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_protocol_filters_unsubscribes_and_answers_calls() {
    let (_site, running) = start(native_config()).await;
    let base = base_url(&running);
    ingest(&base, "th-2", &report(now_ms(), 19.0)).await;
    // The 202 means queued: wait until th-2 is online, which the status
    // snapshot below shows.
    let state = running.state().clone();
    eventually(WAIT, "th-2 to be online", || async {
        state.status.get("th-2").filter(|s| s.online).map(drop)
    })
    .await;

    let mut client = WsClient::connect(&ws_url(&running, "/ws")).await;
    // Thermometers in the lab: th-1 (other-1 is in the lab too, but with
    // authentication off every registered device is visible).
    let lab_thermometers = subscribe(
        &mut client,
        json!({"type": "subscribe", "id": "lab-t", "channel": "telemetry",
               "device_types": ["thermometer"], "locations": ["lab"], "keys": ["temperature"]}),
    )
    .await;
    assert_eq!(lab_thermometers["devices"], json!(["other-1", "th-1"]));
    // Devices of the cold chain: th-1 and door-1; alerts of level warning.
    let cold = subscribe(
        &mut client,
        json!({"type": "subscribe", "id": "cold-alerts", "channel": "alerts",
               "groups": ["cold-chain"], "alert_levels": ["warning"]}),
    )
    .await;
    // Carried by the group: its member count, not its members.
    assert_eq!(
        cold["groups"],
        json!([{"group": "cold-chain", "members": 2}])
    );
    subscribe(
        &mut client,
        json!({"type": "subscribe", "id": "critical", "channel": "alerts",
               "device_ids": ["th-2"], "alert_levels": ["critical"]}),
    )
    .await;
    // The status channel answers with the current status of each device.
    subscribe(
        &mut client,
        json!({"type": "subscribe", "id": "st", "channel": "status", "device_ids": ["th-2"]}),
    )
    .await;
    let current = client.next_json().await;
    assert_eq!(current["type"], "status");
    assert_eq!(current["device"], "th-2");
    assert_eq!(current["is_online"], true);

    ingest(&base, "th-2", &report(now_ms(), 35.0)).await; // warning alert, office: filtered out
    ingest(&base, "th-1", &report(now_ms(), 31.0)).await; // lab thermometer, cold chain
    let data = client.next_of("device_data").await;
    assert_eq!(data["id"], "lab-t");
    assert_eq!(data["device"], "th-1");
    assert_eq!(data["data"], json!({"temperature": 31.0}));
    let alert = client.next_of("alert").await;
    assert_eq!(alert["id"], "cold-alerts");
    assert_eq!(alert["device"], "th-1");
    assert_eq!(alert["severity"], "warning");

    // Unsubscribed: no more frames for it.
    client
        .send(&json!({"type": "unsubscribe", "id": "lab-t"}))
        .await;
    assert_eq!(client.next_json().await["type"], "unsubscribed");
    ingest(&base, "th-1", &report(now_ms(), 22.0)).await;
    // Processed (its latest values show it) and published before the ping:
    // only the pong comes, the report on th-1 no longer reaches this client.
    eventually(WAIT, "th-1's report to be processed", || async {
        state
            .latest
            .get("th-1")
            .filter(|s| s.telemetry["temperature"] == json!(22.0))
            .map(drop)
    })
    .await;
    client.send(&json!({"type": "ping"})).await;
    assert_eq!(client.next_json().await, json!({"type": "pong"}));
    assert_eq!(client.quiet(Duration::from_millis(300)).await, None);

    // Services.
    let call = |service: &str, args: Value| json!({"type": "call", "request_id": format!("r-{service}"), "service": service, "args": args});
    client
        .send(&call("devices.list", json!({"locations": ["lab"]})))
        .await;
    let listed = client.next_of("response").await;
    assert_eq!(listed["code"], 0);
    let ids: Vec<&str> = listed["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{listed}");
    client
        .send(&call(
            "devices.status",
            json!({"device_ids": ["th-1", "door-1"]}),
        ))
        .await;
    let statuses = client.next_of("response").await;
    assert_eq!(statuses["result"][0]["is_online"], true);
    assert_eq!(statuses["result"][1]["is_online"], Value::Null);
    client
        .send(&call(
            "telemetry.latest",
            json!({"device_ids": ["th-1"], "keys": ["temperature"]}),
        ))
        .await;
    let latest = client.next_of("response").await;
    assert_eq!(
        latest["result"]["th-1"]["data"],
        json!({"temperature": 22.0})
    );
    client.send(&call("scripts.list", json!({}))).await;
    let scripts = client.next_of("response").await;
    assert_eq!(scripts["result"][0]["product"], "json-sensor");
    client.send(&call("stats", json!({}))).await;
    let stats = client.next_of("response").await;
    assert_eq!(stats["result"]["subscriptions"], 3);
    assert_eq!(stats["request_id"], "r-stats");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_frame_gets_its_error_code_and_the_connection_stays() {
    let (_site, running) =
        start(&native_config().replace("max_subscriptions = 8", "max_subscriptions = 2")).await;
    let mut client = WsClient::connect(&ws_url(&running, "/ws")).await;
    let sub = |id: &str| json!({"type": "subscribe", "id": id, "channel": "status", "device_ids": ["th-1"]});
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "bad_json"),
        ("[1, 2]".into(), "bad_frame"),
        (json!({"id": "x"}).to_string(), "missing_field"),
        (json!({"type": "dance"}).to_string(), "unknown_type"),
        (json!({"type": "subscribe", "id": "s"}).to_string(), "missing_field"),
        (json!({"type": "subscribe", "id": "s", "channel": "weather"}).to_string(), "unknown_channel"),
        (json!({"type": "subscribe", "id": "s", "channel": "status", "colour": 1}).to_string(), "unknown_field"),
        (json!({"type": "subscribe", "id": "s", "channel": "alerts", "alert_levels": ["loud"]}).to_string(), "bad_field"),
        (json!({"type": "subscribe", "id": "s", "channel": "status", "keys": ["t"]}).to_string(), "bad_filter"),
        (json!({"type": "subscribe", "id": "s", "channel": "status", "device_ids": ["nope"]}).to_string(), "unknown_device"),
        (json!({"type": "unsubscribe", "id": "never"}).to_string(), "unknown_subscription"),
        (json!({"type": "call", "request_id": "r", "service": "reboot"}).to_string(), "unknown_service"),
        (json!({"type": "call", "request_id": "r", "service": "devices.status", "args": {"device_ids": "th-1"}}).to_string(), "bad_args"),
        (json!({"type": "auth", "token": "x"}).to_string(), "already_authenticated"),
        ("x".repeat(2000), "frame_too_large"),
    ];
    for (frame, code) in cases {
        client.send_text(&frame).await;
        let error = client.next_of("error").await;
        assert_eq!(error["code"], code, "{frame:.60} → {error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
        if code == "unknown_device" {
            // The device is named.
            assert!(
                error["message"].as_str().unwrap().contains("nope"),
                "{error}"
            );
        }
    }
    let unknown = {
        client.send(&sub("a")).await;
        client.next_of("subscribed").await;
        client.send(&sub("a")).await;
        client.next_of("error").await
    };
    assert_eq!(unknown["code"], "duplicate_subscription");
    assert_eq!(unknown["id"], "a");
    client.send(&sub("b")).await;
    client.next_of("subscribed").await;
    client.send(&sub("c")).await;
    assert_eq!(
        client.next_of("error").await["code"],
        "too_many_subscriptions"
    );
    // Still open.
    client.send(&json!({"type": "ping"})).await;
    assert_eq!(client.next_of("pong").await, json!({"type": "pong"}));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_refuses_missing_expired_forged_tokens_and_other_tenants() {
    let (_site, running) = start(&format!(
        r#"
            [registry]
            file = "devices.toml"

            [auth]
            jwt_secret = "{SECRET}"
            api_keys = {{ "key-acme-0123456789" = "acme" }}

            [websocket]
            auth_timeout = "1s"
            "#
    ))
    .await;
    let url = ws_url(&running, "/ws");
    let later = now_ms() / 1000 + 3600;

    // No credentials: frames are refused, then the auth timeout closes it.
    let mut anonymous = WsClient::connect(&url).await;
    anonymous
        .send(&json!({"type": "subscribe", "id": "s", "channel": "status"}))
        .await;
    assert_eq!(anonymous.next_of("error").await["code"], "unauthenticated");
    assert_eq!(anonymous.next_of("error").await["code"], "auth_timeout");
    assert_eq!(anonymous.closed(WAIT).await.0, 1008);

    // Expired (past the 30 s leeway), in the query.
    let expired = sign_jwt(SECRET.as_bytes(), "ann", "acme", now_ms() / 1000 - 120);
    let mut client = WsClient::connect(&format!("{url}?token={expired}")).await;
    assert_eq!(client.next_of("error").await["code"], "token_expired");
    assert_eq!(client.closed(WAIT).await.0, 1008);

    // Signed with another secret, in the header.
    let forged = sign_jwt(b"not-the-secret", "ann", "acme", later);
    let mut client =
        WsClient::connect_with(&url, &[("authorization", &format!("Bearer {forged}"))])
            .await
            .unwrap();
    assert_eq!(client.next_of("error").await["code"], "auth_failed");
    assert_eq!(client.closed(WAIT).await.0, 1008);

    // A valid token in an auth frame: its tenant's devices only.
    let valid = sign_jwt(SECRET.as_bytes(), "ann", "acme", later);
    let mut client = WsClient::connect(&url).await;
    client.send(&json!({"type": "auth", "token": valid})).await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "authenticated", "tenant_id": "acme"})
    );
    client
        .send(&json!({"type": "subscribe", "id": "s", "channel": "status", "device_ids": ["other-1"]}))
        .await;
    // Another tenant's device looks exactly like one that does not exist.
    let refused = client.next_of("error").await;
    assert_eq!(refused["code"], "unknown_device");
    client
        .send(&json!({"type": "subscribe", "id": "s", "channel": "status", "device_ids": ["nobody-9"]}))
        .await;
    let nonexistent = client.next_of("error").await;
    assert_eq!(
        refused["message"].as_str().unwrap().replace("other-1", "X"),
        nonexistent["message"]
            .as_str()
            .unwrap()
            .replace("nobody-9", "X"),
    );
    let mine = subscribe(
        &mut client,
        json!({"type": "subscribe", "id": "lab", "channel": "status", "locations": ["lab"]}),
    )
    .await;
    assert_eq!(mine["devices"], json!(["door-1", "th-1"]));

    // An API key on a compatibility endpoint works; a wrong one is refused.
    let telemetry = ws_url(&running, "/api/v1/telemetry/datas/current/ws");
    let mut compat = WsClient::connect(&telemetry).await;
    compat
        .send(&json!({"device_id": "th-1", "api_key": "key-acme-0123456789"}))
        .await;
    assert!(compat.next_json().await.get("systime").is_some());
    let mut wrong = WsClient::connect(&telemetry).await;
    wrong
        .send(&json!({"device_id": "th-1", "api_key": "key-guess"}))
        .await;
    assert_eq!(wrong.next_of("error").await["code"], "auth_failed");
    assert_eq!(wrong.closed(WAIT).await.0, 1008);
    let mut other = WsClient::connect(&telemetry).await;
    other
        .send(&json!({"device_id": "other-1", "api_key": "key-acme-0123456789"}))
        .await;
    assert_eq!(other.next_of("error").await["code"], "unknown_device");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_without_auth_is_refused() {
    let site = Site::with_scripts(&["json-sensor"]);
    let file = site.write("sluice.toml", "");
    let loaded = sluice::config::Config::load(&file).unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let error = sluice::server::start(loaded, listener)
        .await
        .expect_err("a public address needs auth");
    assert!(
        error.to_string().contains("without authentication"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_conflated_then_closed_with_1013() {
    let (_site, running) = start(
        r#"
            [registry]
            file = "devices.toml"

            [products.json-sensor]
            params = { temp_max = "30" }
            limits = { deadline = "5s" }

            # Closed by its queue, not by a write timeout or for idleness.
            [websocket]
            send_queue = 64
            write_timeout = "10m"
            ping_interval = "5m"
            idle_timeout = "10m"
            "#,
    )
    .await;
    let base = base_url(&running);
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let metrics = || async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let closes_before = metric(&metrics().await, "sluice_ws_slow_consumer_closes_total");
    let conflated_before = metric(&metrics().await, "sluice_ws_frames_conflated_total");

    // A small receive buffer: once the client stops reading, the server's
    // writer is blocked after a few kilobytes, and frames wait in its queue.
    let mut slow = WsClient::connect_with_receive_buffer(&ws_url(&running, "/ws"), 4096).await;
    subscribe(
        &mut slow,
        json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": ["th-1"]}),
    )
    .await;
    subscribe(
        &mut slow,
        json!({"type": "subscribe", "id": "a", "channel": "alerts", "device_ids": ["th-1"]}),
    )
    .await;
    // Every report is telemetry (conflated) and an alert (kept). Batches
    // are far smaller than the queue, so only a client that stopped
    // reading, never a burst, can fill it.
    let client = reqwest::Client::new();
    let sent = std::cell::Cell::new(0u32);
    let send_batch = |temperature: f64, count: u32| {
        let client = client.clone();
        let url = format!("{base}/api/v1/ingest/json-sensor");
        let first = sent.replace(sent.get() + count);
        async move {
            let start = now_ms();
            let batch: Vec<Value> = (0..count)
                .map(|i| json!({"device_id": "th-1", "payload": {"ts": start + i64::from(i), "temperature": temperature + f64::from(first + i), "pad": "x".repeat(200)}}))
                .collect();
            let response = client.post(url).json(&batch).send().await.unwrap();
            assert_eq!(response.status(), 202);
        }
    };

    // 1. The client stops reading until telemetry is being conflated.
    eventually(
        Duration::from_secs(120),
        "telemetry to be conflated",
        || {
            let batch = send_batch(40.0, 8);
            let metrics = metrics();
            async move {
                batch.await;
                (metric(&metrics.await, "sluice_ws_frames_conflated_total") > conflated_before)
                    .then_some(())
            }
        },
    )
    .await;
    let alerts_sent = sent.get();
    // A last report under the limit: telemetry only, and the newest.
    send_batch(-1000.0, 1).await;
    // Reading again, it gets every alert, and one telemetry frame for each
    // report that was not replaced while it waited.
    let (mut telemetry, mut alerts, mut newest) = (0u32, 0u32, false);
    while alerts < alerts_sent || !newest {
        match slow.receive(WAIT).await {
            Some(Received::Json(frame)) if frame["type"] == "device_data" => {
                telemetry += 1;
                newest = frame["data"]["temperature"].as_f64() < Some(0.0);
            }
            Some(Received::Json(frame)) if frame["type"] == "alert" => alerts += 1,
            other => panic!(
                "{other:?} after {alerts} of {alerts_sent} alerts and {telemetry} telemetry frames"
            ),
        }
    }
    let conflated = metric(&metrics().await, "sluice_ws_frames_conflated_total") - conflated_before;
    assert_eq!(alerts, alerts_sent);
    assert!(conflated >= 1.0);
    assert_eq!(
        f64::from(telemetry),
        f64::from(sent.get()) - conflated,
        "{} reports, {conflated} replaced while waiting",
        sent.get()
    );
    assert!(telemetry <= alerts);

    // 2. It stops reading again: alerts pile up until the queue is full.
    let dropped_before = metric(&metrics().await, "sluice_ws_frames_dropped_total");
    eventually(
        Duration::from_secs(120),
        "the slow client's queue to fill",
        || {
            let batch = send_batch(40.0, 8);
            let metrics = metrics();
            async move {
                batch.await;
                (metric(&metrics.await, "sluice_ws_frames_dropped_total") > dropped_before)
                    .then_some(())
            }
        },
    )
    .await;
    // Reading again, it gets what was written before (the writer was
    // blocked on a frame), then 1013.
    let code = loop {
        match slow.receive(WAIT).await {
            Some(Received::Json(frame))
                if frame["type"] == "device_data" || frame["type"] == "alert" => {}
            Some(Received::Closed(code, reason)) => {
                assert!(reason.contains("too slow"), "{reason}");
                break code;
            }
            other => panic!("{other:?} before the close frame"),
        }
    };
    assert_eq!(code, 1013);
    assert!(metric(&metrics().await, "sluice_ws_slow_consumer_closes_total") > closes_before);
    running.stop().await;
}
