//! Device commands end to end: real mosquitto (and Redis for two
//! instances), a simulated device that listens on its command topic and
//! answers, HTTP and `/ws` callers with API keys of two tenants.

use std::time::Duration;

use serde_json::{Value, json};
use sluice::server::Running;
use sluice_tests::mqtt::Subscriber;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::{Site, base_url, eventually, sources_connected, ws_url};
use sluice_tests::ws::WsClient;

const WAIT: Duration = Duration::from_secs(20);
const ACME: &str = "acme-commands-key-0123456789";
const ACME_READ: &str = "acme-read-only-key-0123456789";
const GLOBEX: &str = "globex-commands-key-0123456789";

const REGISTRY: &str = r#"
[[devices]]
id = "th-1"
product = "json-sensor"
tenant = "acme"

[[devices]]
id = "th-silent"
product = "json-sensor"
tenant = "acme"

[[devices]]
id = "th-sleepy"
product = "json-sensor"
tenant = "acme"

[[devices]]
id = "meter-1"
product = "counter"
tenant = "acme"

[[devices]]
id = "gx-1"
product = "json-sensor"
tenant = "globex"

[[devices]]
id = "a84041000181c061"
product = "lht65"
tenant = "acme"

[[devices]]
id = "a84041000181c062"
product = "lht65-ttn"
tenant = "acme"

[[devices]]
id = "a84041000181c063"
product = "lht65-learn"
tenant = "acme"
"#;

fn config(mqtt: &Mosquitto, route: &str, bus: &str) -> String {
    format!(
        r#"
        {bus}

        [registry]
        file = "devices.toml"

        [auth.api_keys]
        "{ACME}" = {{ tenant = "acme", scopes = ["read", "command"] }}
        "{ACME_READ}" = "acme"
        "{GLOBEX}" = {{ tenant = "globex", scopes = ["read", "command"] }}

        [[sources.mqtt]]
        url = "{}"
        qos = 1

        [[routes]]
        topic = "{route}"

        [[routes]]
        topic = "application/+/device/{{device}}/event/up"
        product = "lht65-learn"

        [status]
        tick = "50ms"

        [products.json-sensor]
        status = {{ mode = "message" }}
        limits = {{ deadline = "5s" }}

        [products.counter]
        limits = {{ deadline = "5s" }}

        [products.lht65]
        limits = {{ deadline = "5s" }}
        commands = {{ transport = "chirpstack", application = "app-1" }}

        [products.lht65-ttn]
        limits = {{ deadline = "5s" }}
        commands = {{ transport = "ttn", application = "cold-chain@ttn", qos = 0 }}

        [products.lht65-learn]
        limits = {{ deadline = "5s" }}
        commands = {{ transport = "chirpstack" }}
        "#,
        mqtt.url()
    )
}

fn site() -> Site {
    let site = Site::with_renamed(&[
        ("json-sensor", "json-sensor"),
        ("counter", "counter"),
        ("lht65", "lht65"),
        ("lht65-ttn", "lht65"),
        ("lht65-learn", "lht65"),
    ]);
    site.write("devices.toml", REGISTRY);
    site
}

/// A json-sensor that obeys `configure` commands on its command topic and
/// answers with a report naming the command; it refuses an interval below
/// 10 s.
fn obedient_sensor(mut device: Subscriber, id: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((_, payload)) = device.next(Duration::from_secs(3600)).await {
            let Ok(command) = serde_json::from_slice::<Value>(&payload) else {
                continue;
            };
            let mut answer = command["configure"].clone();
            answer["reply_to"] = command["id"].clone();
            if answer["interval_s"].as_u64().is_some_and(|s| s < 10) {
                answer = json!({"reply_to": command["id"], "error": "interval too short"});
            }
            device
                .publish(
                    &format!("devices/json-sensor/{id}/telemetry"),
                    answer.to_string(),
                )
                .await;
        }
    })
}

/// One instance with the in-process bus, its MQTT source connected.
async fn one_instance(mqtt: &Mosquitto) -> (Site, Running) {
    let site = site();
    let running = site
        .start(&config(mqtt, "devices/{product}/{device}/telemetry", ""))
        .await;
    sources_connected(&running).await;
    (site, running)
}

async fn post(running: &Running, device: &str, key: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/devices/{device}/commands",
            base_url(running)
        ))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .expect("sluice answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(running: &Running, path: &str, key: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", base_url(running)))
        .header("x-api-key", key)
        .send()
        .await
        .expect("sluice answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn native(running: &Running, key: &str) -> WsClient {
    let mut ws = WsClient::connect(&ws_url(running, "/ws")).await;
    ws.send(&json!({"type": "auth", "api_key": key})).await;
    let authed = ws.next_json().await;
    assert_eq!(authed["type"], "authenticated", "{authed}");
    ws
}

/// The `response` to `request_id`, skipping other frames.
async fn response(ws: &mut WsClient, request_id: &str) -> Value {
    loop {
        let frame = ws.next_of("response").await;
        if frame["request_id"] == request_id {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_way_commands_over_http_and_ws_reach_the_device_and_bring_its_reply() {
    let mqtt = Mosquitto::start();
    let (_site, running) = one_instance(&mqtt).await;
    let sensor = obedient_sensor(
        Subscriber::connect(mqtt.port(), "devices/json-sensor/th-1/command").await,
        "th-1",
    );

    // HTTP, waiting: the device got the encoded JSON and answered.
    let (status, body) = post(
        &running,
        "th-1",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 30}, "wait": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "replied", "{body}");
    assert_eq!(body["reply"], json!({"interval_s": 30}), "{body}");

    // HTTP, not waiting: 202 with the id, then its state.
    let (status, body) = post(
        &running,
        "th-1",
        ACME,
        json!({"name": "configure", "params": {"temp_max": 28.5}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("an id").to_owned();
    let replied = eventually(WAIT, "the command to be replied", || async {
        let (_, body) = get(&running, &format!("/api/v1/commands/{id}"), ACME_READ).await;
        (body["state"] == "replied").then_some(body)
    })
    .await;
    assert_eq!(replied["reply"], json!({"temp_max": 28.5}));
    // Another tenant sees no such command.
    let (status, _) = get(&running, &format!("/api/v1/commands/{id}"), GLOBEX).await;
    assert_eq!(status, 404);

    // The device refuses: a failed command, with its words.
    let (status, body) = post(
        &running,
        "th-1",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 5}, "wait": true}),
    )
    .await;
    assert_eq!((status, &body["state"]), (200, &json!("failed")), "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("interval too short"),
        "{body}"
    );

    // Over /ws: one response when it completes; the commands channel shows
    // every state change.
    let mut ws = native(&running, ACME).await;
    ws.send(
        &json!({"type": "subscribe", "id": "cmds", "channel": "commands", "device_ids": ["th-1"]}),
    )
    .await;
    assert_eq!(ws.next_of("subscribed").await["id"], "cmds");
    ws.send(
        &json!({"type": "call", "request_id": "r1", "service": "device.command",
        "args": {"device_id": "th-1", "name": "configure", "params": {"interval_s": 60}}}),
    )
    .await;
    // The response and the command frames, in whatever order they come.
    let mut answer = Value::Null;
    let mut states = Vec::new();
    while answer.is_null() || states.len() < 2 {
        let frame = ws.next_json().await;
        match frame["type"].as_str() {
            Some("response") if frame["request_id"] == "r1" => answer = frame,
            Some("command") => {
                assert_eq!(frame["id"], "cmds");
                states.push(frame["command"]["state"].as_str().unwrap().to_owned());
            }
            _ => {}
        }
    }
    assert_eq!(answer["code"], 0, "{answer}");
    assert_eq!(answer["result"]["state"], "replied", "{answer}");
    assert_eq!(
        answer["result"]["reply"],
        json!({"interval_s": 60}),
        "{answer}"
    );
    assert_eq!(states, ["sent", "replied"]);

    // One-way: answered once sent.
    let (status, body) = post(
        &running,
        "th-1",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 60}, "oneway": true, "wait": true}),
    )
    .await;
    assert_eq!((status, &body["state"]), (200, &json!("sent")), "{body}");
    sensor.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_timeouts_and_other_tenants_are_answered_clearly() {
    let mqtt = Mosquitto::start();
    let (_site, running) = one_instance(&mqtt).await;

    // Nobody answers: timed out at the deadline.
    let started = std::time::Instant::now();
    let (status, body) = post(
        &running,
        "th-silent",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 30}, "timeout_ms": 300, "wait": true}),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        (&body["state"], &body["failure"]),
        (&json!("failed"), &json!("timed_out")),
        "{body}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let mut ws = native(&running, ACME).await;
    ws.send(&json!({"type": "call", "request_id": "t", "service": "device.command",
        "args": {"device_id": "th-silent", "name": "configure", "params": {"interval_s": 30}, "timeout_ms": 300}}))
        .await;
    let answer = response(&mut ws, "t").await;
    assert_eq!(answer["code"], 408, "{answer}");
    assert!(
        answer["msg"].as_str().unwrap().contains("timed out"),
        "{answer}"
    );

    // The script refuses an unknown name: 422 with its words, and a dead letter.
    let (status, body) = post(&running, "th-1", ACME, json!({"name": "self_destruct"})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "encode_error");
    assert!(
        body["message"].as_str().unwrap().contains("self_destruct"),
        "{body}"
    );
    let letters = eventually(WAIT, "the encode_error dead letter", || async {
        let (_, letters) = get(&running, "/api/v1/deadletter", ACME).await;
        letters
            .as_array()
            .filter(|l| l.iter().any(|l| l["reason"] == "encode_error"))
            .cloned()
    })
    .await;
    assert!(letters.iter().any(|l| l["device_id"] == "th-1"));
    ws.send(
        &json!({"type": "call", "request_id": "u", "service": "device.command",
        "args": {"device_id": "th-1", "name": "self_destruct"}}),
    )
    .await;
    assert_eq!(response(&mut ws, "u").await["code"], 422);

    // A product whose script does not encode.
    let (status, body) = post(&running, "meter-1", ACME, json!({"name": "reset"})).await;
    assert_eq!(
        (status, &body["error"]),
        (501, &json!("not_supported")),
        "{body}"
    );

    // Another tenant's device answers exactly like a device that does not exist.
    let (status, theirs) = post(&running, "gx-1", ACME, json!({"name": "configure"})).await;
    let (unknown_status, unknown) =
        post(&running, "nope-1", ACME, json!({"name": "configure"})).await;
    assert_eq!((status, unknown_status), (404, 404));
    assert_eq!(
        theirs["message"].as_str().unwrap().replace("gx-1", "X"),
        unknown["message"].as_str().unwrap().replace("nope-1", "X")
    );
    ws.send(
        &json!({"type": "call", "request_id": "g", "service": "device.command",
        "args": {"device_id": "gx-1", "name": "configure"}}),
    )
    .await;
    let answer = response(&mut ws, "g").await;
    assert_eq!(answer["code"], 404, "{answer}");

    // A read-only key may not send commands; bad requests say what is wrong.
    let (status, _) = post(&running, "th-1", ACME_READ, json!({"name": "configure"})).await;
    assert_eq!(status, 403);
    let (status, body) = post(
        &running,
        "th-1",
        ACME,
        json!({"name": "configure", "params": [1]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(
        &running,
        "th-1",
        ACME,
        json!({"name": "configure", "timeout_ms": 86_400_000}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("max_timeout"),
        "{body}"
    );
    let (status, _) = post(&running, "th-1", ACME, json!({"nmae": "typo"})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_commands_wait_for_an_offline_device_and_expire_when_it_stays_away() {
    let mqtt = Mosquitto::start();
    let (_site, running) = one_instance(&mqtt).await;
    let status = Subscriber::connect(mqtt.port(), "nothing/at/all").await;
    // The device says it goes to sleep.
    status.publish("devices/status/th-sleepy", "0").await;
    eventually(WAIT, "th-sleepy to be offline", || async {
        let (_, device) = get(&running, "/api/v1/devices/th-sleepy", ACME_READ).await;
        (device["is_online"] == 0).then_some(())
    })
    .await;

    let (code, queued) = post(
        &running,
        "th-sleepy",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 600}, "persistent": true, "wait": true}),
    )
    .await;
    assert_eq!(
        (code, &queued["state"]),
        (202, &json!("queued")),
        "{queued}"
    );
    let (_, short) = post(
        &running,
        "th-sleepy",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 900}, "persistent": true, "expires_in_ms": 200}),
    )
    .await;
    assert_eq!(short["state"], "queued");
    let short_id = short["id"].as_str().unwrap().to_owned();
    eventually(WAIT, "the short-lived command to expire", || async {
        let (_, body) = get(&running, &format!("/api/v1/commands/{short_id}"), ACME).await;
        (body["state"] == "expired").then_some(())
    })
    .await;

    // It wakes up and reports: the queued command goes out, and is replied.
    let sensor = obedient_sensor(
        Subscriber::connect(mqtt.port(), "devices/json-sensor/th-sleepy/command").await,
        "th-sleepy",
    );
    status
        .publish(
            "devices/json-sensor/th-sleepy/telemetry",
            json!({"temperature": 19.5}).to_string(),
        )
        .await;
    let id = queued["id"].as_str().unwrap().to_owned();
    let done = eventually(WAIT, "the queued command to be replied", || async {
        let (_, body) = get(&running, &format!("/api/v1/commands/{id}"), ACME).await;
        (body["state"] == "replied").then_some(body)
    })
    .await;
    assert_eq!(done["reply"], json!({"interval_s": 600}));
    sensor.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lorawan_downlinks_have_the_shapes_chirpstack_and_the_things_stack_accept() {
    let mqtt = Mosquitto::start();
    let (_site, running) = one_instance(&mqtt).await;
    let mut chirpstack =
        Subscriber::connect(mqtt.port(), "application/app-1/device/+/command/down").await;
    let mut ttn = Subscriber::connect(mqtt.port(), "v3/+/devices/+/down/push").await;

    let (status, body) = post(
        &running,
        "a84041000181c061",
        ACME,
        json!({"name": "set_interval", "params": {"seconds": 60}, "oneway": true}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (topic, payload) = chirpstack.next(WAIT).await.expect("a ChirpStack downlink");
    assert_eq!(
        topic,
        "application/app-1/device/a84041000181c061/command/down"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        json!({"devEui": "a84041000181c061", "confirmed": false, "fPort": 2, "data": "AQAAPA=="})
    );

    let (status, _) = post(
        &running,
        "a84041000181c062",
        ACME,
        json!({"name": "reset", "oneway": true}),
    )
    .await;
    assert_eq!(status, 202);
    let (topic, payload) = ttn.next(WAIT).await.expect("a The Things Stack downlink");
    assert_eq!(
        topic,
        "v3/cold-chain@ttn/devices/a84041000181c062/down/push"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        json!({"downlinks": [{"f_port": 2, "frm_payload": "BP8=", "confirmed": false, "priority": "NORMAL"}]})
    );

    // Without a configured application, the device's uplinks name it:
    // before one, the downlink cannot be addressed; after, it goes there.
    let (status, body) = post(
        &running,
        "a84041000181c063",
        ACME,
        json!({"name": "reset", "oneway": true, "wait": true}),
    )
    .await;
    assert_eq!((status, &body["failure"]), (502, &json!("send")), "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("application"),
        "{body}"
    );
    let mut learned =
        Subscriber::connect(mqtt.port(), "application/app-7/device/+/command/down").await;
    learned
        .publish(
            "application/app-7/device/a84041000181c063/event/up",
            json!({"fPort": 2, "data": "y/YLDQN2AQrdf/8=", "deviceInfo": {"devEui": "a84041000181c063"}})
                .to_string(),
        )
        .await;
    eventually(WAIT, "the uplink to be processed", || async {
        let (_, device) = get(&running, "/api/v1/devices/a84041000181c063", ACME).await;
        device["latest"].is_object().then_some(())
    })
    .await;
    let (status, body) = post(
        &running,
        "a84041000181c063",
        ACME,
        json!({"name": "reset", "oneway": true}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (topic, _) = learned
        .next(WAIT)
        .await
        .expect("a downlink to the learned application");
    assert_eq!(
        topic,
        "application/app-7/device/a84041000181c063/command/down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_accepted_on_one_instance_completes_with_a_reply_ingested_on_another() {
    let mqtt = Mosquitto::start();
    let redis = RedisServer::start();
    let site = site();
    let bus = format!("[bus.redis]\nurl = \"{}\"\nflush = \"50ms\"", redis.url());
    // A ingests the device's reports; B only sends commands (its route
    // matches nothing the device publishes).
    let a = site
        .start(&config(&mqtt, "devices/{product}/{device}/telemetry", &bus))
        .await;
    let b = site
        .start(&config(
            &mqtt,
            "elsewhere/{product}/{device}/telemetry",
            &bus,
        ))
        .await;
    sources_connected(&a).await;
    sources_connected(&b).await;
    let sensor = obedient_sensor(
        Subscriber::connect(mqtt.port(), "devices/json-sensor/th-1/command").await,
        "th-1",
    );
    let (status, body) = post(
        &b,
        "th-1",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 45}, "wait": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "replied", "{body}");
    assert_eq!(body["reply"], json!({"interval_s": 45}));
    // Both instances read the same record.
    let id = body["id"].as_str().unwrap();
    let (_, on_a) = get(&a, &format!("/api/v1/commands/{id}"), ACME).await;
    assert_eq!(on_a["state"], "replied");

    // A timeout taken on B is failed by whichever instance sweeps first,
    // once; the caller on B learns it.
    let mut ws = native(&b, ACME).await;
    ws.send(&json!({"type": "call", "request_id": "t", "service": "device.command",
        "args": {"device_id": "th-silent", "name": "configure", "params": {"interval_s": 30}, "timeout_ms": 300}}))
        .await;
    assert_eq!(response(&mut ws, "t").await["code"], 408);
    drop(ws);

    // The instance that took a command stops while it waits: the command
    // lives in Redis, and the other instance times it out.
    let (status, body) = post(
        &b,
        "th-silent",
        ACME,
        json!({"name": "configure", "params": {"interval_s": 30}, "timeout_ms": 1500}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    b.stop().await;
    let failed = eventually(WAIT, "the other instance to time it out", || async {
        let (_, body) = get(&a, &format!("/api/v1/commands/{id}"), ACME).await;
        (body["state"] == "failed").then_some(body)
    })
    .await;
    assert_eq!(failed["failure"], "timed_out", "{failed}");
    sensor.abort();
}
