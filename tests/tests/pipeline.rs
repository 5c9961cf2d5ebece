//! The pipeline on the in-process bus: HTTP ingest, dead letters, gateway
//! fan-out, and every status mode through MQTT (a real mosquitto).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sluice::bus::Publication;
use sluice::status::StatusSource;
use sluice_tests::mqtt::Publisher;
use sluice_tests::servers::Mosquitto;
use sluice_tests::sluice::{Site, base_url, eventually, sources_connected};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(10);

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.expect("GET works");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .expect("POST works");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_accepts_single_and_batch_and_refuses_clearly() {
    let site = Site::with_scripts(&["json-sensor"]);
    let running = site
        .start("[sources.http]\nmax_body = \"1 KiB\"\nmax_batch = 3")
        .await;
    let base = base_url(&running);

    let (status, body) = post(
        &format!("{base}/api/v1/ingest/json-sensor/th-1"),
        r#"{"temperature": 21.5}"#,
    )
    .await;
    assert_eq!((status, body), (202, json!({"accepted": 1})));
    let latest = eventually(WAIT, "th-1's latest values", || async {
        let (status, body) = get(&format!("{base}/api/v1/devices/th-1")).await;
        (status == 200).then_some(body["latest"]["telemetry"].clone())
    })
    .await;
    assert_eq!(latest, json!({"temperature": 21.5}));

    let batch = json!([
        {"device_id": "th-2", "payload": {"temperature": 1}},
        {"device_id": "th-3", "payload_text": "{\"temperature\": 2}"},
        {"device_id": "th-4", "payload_base64": "eyJ0ZW1wZXJhdHVyZSI6IDN9"}
    ]);
    let (status, body) = post(
        &format!("{base}/api/v1/ingest/json-sensor"),
        batch.to_string(),
    )
    .await;
    assert_eq!((status, body), (202, json!({"accepted": 3})));
    for (device, value) in [("th-2", 1), ("th-3", 2), ("th-4", 3)] {
        eventually(WAIT, device, || async {
            let (_, body) = get(&format!("{base}/api/v1/devices/{device}")).await;
            (body["latest"]["telemetry"]["temperature"] == json!(value)).then_some(())
        })
        .await;
    }

    let (status, body) = post(&format!("{base}/api/v1/ingest/nope/th-1"), "{}").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_product"))
    );
    let (status, body) = post(
        &format!("{base}/api/v1/ingest/json-sensor/th-1"),
        vec![b'x'; 2048],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("1024 bytes"),
        "{body}"
    );
    let (status, body) = post(&format!("{base}/api/v1/ingest/json-sensor"), "[1, 2]").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_batch")));
    let four = json!([{"device_id": "a", "payload": 1}, {"device_id": "b", "payload": 1}, {"device_id": "c", "payload": 1}, {"device_id": "d", "payload": 1}]);
    let (status, body) = post(
        &format!("{base}/api/v1/ingest/json-sensor"),
        four.to_string(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("batch_too_large"))
    );
    let (status, body) = post(&format!("{base}/api/v1/ingest/json-sensor/bad%2Fid"), "{}").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_device")));

    // A payload the script refuses is kept as a dead letter, raw payload included.
    let (status, _) = post(
        &format!("{base}/api/v1/ingest/json-sensor/th-9"),
        "not json",
    )
    .await;
    assert_eq!(status, 202);
    let letter = eventually(WAIT, "a dead letter", || async {
        let (_, body) = get(&format!("{base}/api/v1/deadletter")).await;
        body.as_array().and_then(|l| l.first().cloned())
    })
    .await;
    assert_eq!(letter["reason"], "script_error");
    assert_eq!(letter["device_id"], "th-9");
    assert_eq!(letter["product"], "json-sensor");
    assert_eq!(letter["payload_base64"], "bm90IGpzb24=");
    assert_eq!(letter["script_version"].as_str().unwrap().len(), 12);
    assert!(
        letter["error"].as_str().unwrap().contains("invalid-json"),
        "{letter}"
    );
    running.stop().await;
}

/// Publications received from the in-process bus, one at a time.
struct Watch {
    publications: broadcast::Receiver<Arc<Publication>>,
}

impl Watch {
    async fn next(&mut self) -> Arc<Publication> {
        tokio::time::timeout(WAIT, self.publications.recv())
            .await
            .expect("a publication arrives in time")
            .expect("the bus is open")
    }

    /// The next status change of `device`, skipping other publications.
    async fn status(&mut self, device: &str) -> (bool, StatusSource) {
        loop {
            if let Publication::Status(change) = &*self.next().await
                && change.device_id == device
            {
                return (change.is_online, change.source);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_payload_fans_out_to_sub_devices() {
    let site = Site::with_scripts(&["gateway"]);
    // No registry, no tenants: every device is of the gateway's (empty) tenant.
    let running = site
        .start("[products.gateway]\nchildren = \"same_tenant\"\nlimits = { deadline = \"5s\" }\n")
        .await;
    let state = running.state().clone();
    for device in ["gw-1", "th-01", "th-02", "door-03"] {
        state.interest.set(device, true);
    }
    let mut watch = Watch {
        publications: running.subscribe().expect("the in-process bus"),
    };
    let payload = json!({
        "ts": 1732262400000_i64,
        "gateway": {"uptime_s": 10},
        "devices": [
            {"id": "th-01", "temperature": 21.4},
            {"id": "th-02", "online": false},
            {"id": "door-03", "open": true, "event": "door_opened"}
        ]
    });
    let (status, _) = post(
        &format!("{}/api/v1/ingest/gateway/gw-1", base_url(&running)),
        payload.to_string(),
    )
    .await;
    assert_eq!(status, 202);

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let publication = watch.next().await;
        seen.push((publication.device().to_owned(), publication.kind()));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("door-03".to_owned(), "event"),
            ("gw-1".to_owned(), "telemetry"),
            ("th-01".to_owned(), "telemetry"),
            ("th-02".to_owned(), "status"),
        ]
    );
    assert_eq!(
        state.latest.get("th-01").unwrap().telemetry["temperature"],
        json!(21.4)
    );
    assert_eq!(
        state.latest.get("gw-1").unwrap().telemetry["sub_devices"],
        json!(3)
    );
    assert!(!state.status.get("th-02").unwrap().online);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_mode_end_to_end_over_mqtt() {
    let broker = Mosquitto::start();
    let site = Site::with_renamed(&[
        ("hb", "json-sensor"),
        ("to", "json-sensor"),
        ("msg", "json-sensor"),
    ]);
    let running = site
        .start(&format!(
            r#"
            [status]
            tick = "20ms"

            [[routes]]
            topic = "devices/{{product}}/{{device}}/telemetry"

            [[sources.mqtt]]
            url = "{}"

            [products.hb]
            status = {{ mode = "heartbeat", interval = "400ms" }}
            limits = {{ deadline = "5s" }}

            # Long enough that the explicit 0 always comes before the expiry.
            [products.to]
            status = {{ mode = "timeout", after = "2s" }}
            limits = {{ deadline = "5s" }}

            [products.msg]
            status = {{ mode = "message" }}
            limits = {{ deadline = "5s" }}
            "#,
            broker.url()
        ))
        .await;
    let state = running.state().clone();
    for device in ["hb-1", "to-1", "msg-1"] {
        state.interest.set(device, true);
    }
    let mut watch = Watch {
        publications: running.subscribe().expect("the in-process bus"),
    };
    sources_connected(&running).await;
    let device = Publisher::connect(broker.port()).await;
    let reading = r#"{"temperature": 20}"#;

    // Heartbeat: the first message makes it online, silence offline; its own
    // status signals are ignored.
    device.publish("devices/hb/hb-1/telemetry", reading).await;
    assert_eq!(watch.status("hb-1").await, (true, StatusSource::Message));
    device.publish("devices/status/hb-1", "0").await;
    assert_eq!(
        watch.status("hb-1").await,
        (false, StatusSource::HeartbeatExpired),
        "the 0 was ignored"
    );
    device.publish("devices/hb/hb-1/telemetry", reading).await;
    assert_eq!(
        watch.status("hb-1").await,
        (true, StatusSource::Message),
        "offline → online on the first message"
    );

    // Timeout: messages keep it online, an explicit 0 takes it offline with
    // no expiry after it, silence expires it.
    device.publish("devices/to/to-1/telemetry", reading).await;
    assert_eq!(watch.status("to-1").await, (true, StatusSource::Message));
    device.publish("devices/status/to-1", "0").await;
    assert_eq!(
        watch.status("to-1").await,
        (false, StatusSource::StatusMessage)
    );
    device.publish("devices/status/to-1", "1").await;
    assert_eq!(
        watch.status("to-1").await,
        (true, StatusSource::StatusMessage)
    );
    assert_eq!(
        watch.status("to-1").await,
        (false, StatusSource::TimeoutExpired)
    );

    // Message mode: only explicit signals count.
    device.publish("devices/msg/msg-1/telemetry", reading).await;
    device.publish("devices/status/msg-1", "1").await;
    assert_eq!(
        watch.status("msg-1").await,
        (true, StatusSource::StatusMessage)
    );
    device.publish("devices/status/msg-1", "0").await;
    assert_eq!(
        watch.status("msg-1").await,
        (false, StatusSource::StatusMessage)
    );

    // An unroutable topic and a bad status payload are dead letters.
    device.publish("devices/status/msg-1", "maybe").await;
    let letters = eventually(WAIT, "a dead letter for the bad status payload", || async {
        let letters = state.bus.dead_letters(10, None).await.ok()?;
        letters
            .iter()
            .any(|l| l.error.contains("not 1 or 0"))
            .then_some(letters)
    })
    .await;
    assert_eq!(letters[0].reason.as_str(), "unroutable");
    running.stop().await;
}
