//! The gateway at its limits: a subscription to as many devices as a
//! connection may watch, a client that stops reading, and a shutdown with
//! clients connected.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::{Site, base_url, eventually, registry_of, ws_url};
use sluice_tests::ws::{Received, WsClient};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(30);

fn devices(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("d-{i:05}")).collect()
}

/// Reports every one of `devices` once, through batch ingest.
async fn report_all(base: &str, devices: &[String]) {
    sluice_tests::sluice::report_all(base, "json-sensor", devices, |i| json!({"temperature": i}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_max_devices_gets_every_snapshot_and_stays_connected() {
    const DEVICES: usize = 5000;
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let all = devices(DEVICES);
    site.write("devices.toml", &registry_of(&all, "json-sensor"));
    let running = site
        .start(&format!(
            r#"
            [bus.redis]
            url = "{}"

            [registry]
            file = "devices.toml"

            [websocket]
            max_devices = {DEVICES}
            send_queue = 64

            [products.json-sensor]
            limits = {{ deadline = "5s" }}
            "#,
            redis.url()
        ))
        .await;
    let base = base_url(&running);
    report_all(&base, &all).await;
    eventually(WAIT, "every device to report", || async {
        (running.state().latest.len() == DEVICES).then_some(())
    })
    .await;

    // No filter: every device the client may see, as the dashboard asks.
    let mut client = WsClient::connect(&ws_url(&running, "/ws")).await;
    client
        .send(&json!({"type": "subscribe", "id": "all", "channel": "telemetry"}))
        .await;
    let subscribed = client.next_of("subscribed").await;
    assert_eq!(
        subscribed["devices"].as_array().map(Vec::len),
        Some(DEVICES)
    );
    let mut snapshots = std::collections::BTreeSet::new();
    while snapshots.len() < DEVICES {
        match client.receive(WAIT).await {
            Some(Received::Json(frame)) if frame["type"] == "device_data" => {
                snapshots.insert(frame["device"].as_str().unwrap_or_default().to_owned());
            }
            Some(Received::Json(_)) => {}
            other => panic!("after {} snapshots: {other:?}", snapshots.len()),
        }
    }
    // And a status subscription over the same devices: no more devices
    // counted, every status answered.
    client
        .send(&json!({"type": "subscribe", "id": "s", "channel": "status"}))
        .await;
    let mut statuses = 0;
    loop {
        let frame = client.next_json().await;
        if frame["type"] == "status" && frame["id"] == "s" {
            statuses += 1;
            if statuses == DEVICES {
                break;
            }
        }
    }
    // Still connected, and every device is counted once in Redis.
    client.send(&json!({"type": "ping"})).await;
    client.next_of("pong").await;
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let counts: Vec<Option<i64>> = redis::cmd("MGET")
        .arg(&["ws:sub:d-00000", "ws:sub:d-02500", "ws:sub:d-04999"][..])
        .query_async(&mut connection)
        .await
        .expect("Redis answers");
    assert_eq!(counts, [Some(1), Some(1), Some(1)]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_memory_stays_bounded() {
    const DEVICES: usize = 1000;
    let site = Site::with_scripts(&["json-sensor"]);
    let all = devices(DEVICES);
    site.write("devices.toml", &registry_of(&all, "json-sensor"));
    let server = site
        .spawn(
            "lag",
            r#"
            [registry]
            file = "devices.toml"

            [websocket]
            write_timeout = "2s"
            send_buffer = "1MiB"

            [products.json-sensor]
            limits = { deadline = "5s" }
            "#,
        )
        .await;
    let base = server.base_url();
    report_all(&base, &all).await;

    // A client with a tiny receive window that subscribes, then never reads.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small window");
    let address = base
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    let stream = socket.connect(address).await.expect("connected");
    let request = server
        .ws_url("/ws")
        .into_client_request()
        .expect("a request");
    let (mut lagging, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgraded");
    lagging
        .send(Message::text(
            json!({"type": "subscribe", "id": "t", "channel": "telemetry"}).to_string(),
        ))
        .await
        .expect("sent");
    let before = server.rss();
    // Reports keep coming for every device; the client reads nothing.
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let peak = std::cell::Cell::new(before);
    let closed = eventually(WAIT, "the lagging client to be closed", || async {
        report_all(&base, &all).await;
        peak.set(peak.get().max(server.rss()));
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let closes = metric(&text, "sluice_ws_write_timeouts_total")
            + metric(&text, "sluice_ws_slow_consumer_closes_total");
        (closes >= 1.0).then_some(closes)
    })
    .await;
    assert!(closed >= 1.0);
    // Reading now: what had been sent, then a close (or just the end of
    // the connection, when the close frame could not be written).
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(message) = lagging.next().await {
            match message {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the connection ends");
    assert!(matches!(ended, None | Some(1013)), "{ended:?}");
    let growth = peak.get().saturating_sub(before);
    assert!(
        growth < 64 << 20,
        "the server grew {} MiB while the client lagged",
        growth >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_client_with_1001_and_gives_back_its_counts() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write(
        "devices.toml",
        "[[devices]]\nid = \"g-1\"\nproduct = \"json-sensor\"\n[[devices]]\nid = \"g-2\"\nproduct = \"json-sensor\"\n",
    );
    let server = site
        .spawn(
            "term",
            &format!(
                "[bus.redis]\nurl = \"{}\"\n[registry]\nfile = \"devices.toml\"\n[products.json-sensor]\nlimits = {{ deadline = \"5s\" }}\n",
                redis.url()
            ),
        )
        .await;
    let mut native = WsClient::connect(&server.ws_url("/ws")).await;
    native
        .send(&json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": ["g-1", "g-2"]}))
        .await;
    native.next_of("subscribed").await;
    let mut compat = WsClient::connect(&server.ws_url("/api/v1/device/online/status/ws")).await;
    compat.send(&json!({"device_id": "g-1", "token": ""})).await;
    compat.next_json().await;
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let counts = |connection: &mut redis::aio::MultiplexedConnection| {
        let mut connection = connection.clone();
        async move {
            redis::cmd("MGET")
                .arg(&["ws:sub:g-1", "ws:sub:g-2"][..])
                .query_async::<Vec<Option<i64>>>(&mut connection)
                .await
                .expect("Redis answers")
        }
    };
    assert_eq!(counts(&mut connection).await, [Some(2), Some(1)]);

    let exit = tokio::spawn(server.terminate());
    for client in [&mut native, &mut compat] {
        let (code, reason) = client.closed(WAIT).await;
        assert_eq!((code, reason.as_str()), (1001, "going away"));
    }
    let status = exit.await.expect("sluice exits");
    assert!(status.success(), "{status}");
    assert_eq!(
        counts(&mut connection).await,
        [None, None],
        "the counts are gone before the process exits"
    );
}
