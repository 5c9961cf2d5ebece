//! Two sluice instances sharing one Redis: a dashboard on one sees data
//! ingested on the other, `ws:sub:{device}` follows connections (and
//! expires when an instance dies without cleanup), and filtered
//! subscriptions follow registry changes.

use std::time::Duration;

use serde_json::json;
use sluice_tests::mqtt::Publisher;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::{Site, base_url, eventually, interest_is, sources_connected, ws_url};
use sluice_tests::ws::{Received, WsClient};

const WAIT: Duration = Duration::from_secs(20);

const REGISTRY: &str = r#"
[[devices]]
id = "th-1"
name = "Lab thermometer"
product = "json-sensor"
tenant = "acme"
groups = ["cold-chain"]
"#;

async fn redis_get(redis: &RedisServer, command: &str, key: &str) -> Option<i64> {
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    redis::cmd(command)
        .arg(key)
        .query_async(&mut connection)
        .await
        .expect("Redis answers")
}

async fn subscribers(redis: &RedisServer, channel: &str) -> i64 {
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut connection)
        .await
        .expect("Redis answers");
    count
}

async fn watchers(redis: &RedisServer) -> Option<i64> {
    redis_get(redis, "GET", "ws:sub:th-1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_one_instance_receives_data_ingested_on_the_other() {
    let redis = RedisServer::start();
    let broker = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let shared = format!(
        r#"
        [bus.redis]
        url = "{}"
        flush = "50ms"

        [registry]
        file = "devices.toml"
        "#,
        redis.url()
    );
    // A ingests from MQTT; B only serves WebSockets.
    let a = site
        .start(&format!(
            "{shared}\n[[routes]]\ntopic = \"devices/{{product}}/{{device}}/telemetry\"\n[[sources.mqtt]]\nurl = \"{}\"\n",
            broker.url()
        ))
        .await;
    let mut b = site.spawn("b", &shared).await;

    let mut compat = WsClient::connect(&b.ws_url("/api/v1/telemetry/datas/current/ws")).await;
    compat
        .send(&json!({"device_id": "th-1", "token": ""}))
        .await;
    compat.next_json().await;
    assert_eq!(watchers(&redis).await, Some(1));
    let mut native = WsClient::connect(&b.ws_url("/ws")).await;
    native
        .send(&json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": ["th-1"]}))
        .await;
    native.next_of("subscribed").await;
    assert_eq!(watchers(&redis).await, Some(2));
    let ttl = redis_get(&redis, "TTL", "ws:sub:th-1").await.unwrap();
    assert!((1..=300).contains(&ttl), "TTL {ttl}");
    // One subscriber connection per instance, whatever its client count.
    eventually(WAIT, "B to subscribe th-1's channel", || async {
        (subscribers(&redis, "ws:device:th-1").await == 1).then_some(())
    })
    .await;

    interest_is(&a, "th-1", true).await;
    sources_connected(&a).await;
    let device = Publisher::connect(broker.port()).await;
    device
        .publish(
            "devices/json-sensor/th-1/telemetry",
            json!({"ts": 1_732_262_400_000_i64, "temperature": 20.5}).to_string(),
        )
        .await;
    assert_eq!(
        compat.next_json().await,
        json!({"temperature": 20.5, "systime": "2024-11-22T08:00:00.000Z"})
    );
    let data = native.next_of("device_data").await;
    assert_eq!(data["data"], json!({"temperature": 20.5}));

    // Connections leave: the count falls; after the last, B unsubscribes
    // and the key is gone, and A stops publishing for th-1.
    drop(native);
    eventually(WAIT, "ws:sub:th-1 to fall to 1", || async {
        (watchers(&redis).await == Some(1)).then_some(())
    })
    .await;
    drop(compat);
    eventually(WAIT, "ws:sub:th-1 to go", || async {
        watchers(&redis).await.is_none().then_some(())
    })
    .await;
    eventually(WAIT, "B to unsubscribe th-1", || async {
        (subscribers(&redis, "ws:device:th-1").await == 0).then_some(())
    })
    .await;
    interest_is(&a, "th-1", false).await;

    // B dies without cleanup: its count stays, with a TTL, so it expires.
    let mut last = WsClient::connect(&b.ws_url("/api/v1/device/online/status/ws")).await;
    last.send(&json!({"device_id": "th-1", "token": ""})).await;
    last.next_json().await;
    assert_eq!(watchers(&redis).await, Some(1));
    b.kill();
    assert!(matches!(
        last.receive(WAIT).await,
        None | Some(Received::Closed(..))
    ));
    assert_eq!(watchers(&redis).await, Some(1));
    let ttl = redis_get(&redis, "TTL", "ws:sub:th-1").await.unwrap();
    assert!(
        (1..=300).contains(&ttl),
        "a dead instance's count expires: TTL {ttl}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_subscriptions_follow_registry_changes() {
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let running = site.start("[registry]\nfile = \"devices.toml\"\n").await;
    let mut client = WsClient::connect(&ws_url(&running, "/ws")).await;
    client
        .send(&json!({"type": "subscribe", "id": "g", "channel": "telemetry", "groups": ["freezers"]}))
        .await;
    // Carried by the group: its name and member count, not its members.
    assert_eq!(
        client.next_of("subscribed").await["groups"],
        json!([{"group": "freezers", "members": 0}])
    );

    // A device joins the group in the registry file.
    site.write(
        "devices.toml",
        &format!(
            "{REGISTRY}\n[[devices]]\nid = \"fz-1\"\nproduct = \"json-sensor\"\ngroups = [\"freezers\"]\n"
        ),
    );
    let base = base_url(&running);
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let data = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fz-1 data never reached the group subscriber"
        );
        http.post(format!("{base}/api/v1/ingest/json-sensor/fz-1"))
            .body(json!({"ts": sluice::message::now_ms(), "temperature": -18.0}).to_string())
            .send()
            .await
            .unwrap();
        if let Some(Received::Json(frame)) = client.receive(Duration::from_millis(200)).await
            && frame["type"] == "device_data"
        {
            break frame;
        }
    };
    assert_eq!(data["device"], "fz-1");
    assert_eq!(data["data"], json!({"temperature": -18.0}));
    running.stop().await;
}
