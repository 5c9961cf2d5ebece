//! `--mode delivery`: drives reports through MQTT → sluice → Redis →
//! WebSocket at a fixed rate and reports delivered frames per second,
//! end-to-end latency (the device's send time, carried in the payload, to
//! the client's receipt) and the server's RSS per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::{Site, registry_of};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::{Args, Watch};

fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros(),
    )
    .unwrap_or(u64::MAX)
}

fn device(i: usize) -> String {
    format!("load-{i:05}")
}

#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    latencies: Mutex<Vec<u32>>,
    measuring: std::sync::atomic::AtomicBool,
}

pub(crate) async fn run(args: &Args) {
    let redis = RedisServer::start();
    let broker = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let devices: Vec<String> = (0..args.devices).map(device).collect();
    site.write("devices.toml", &registry_of(&devices, "json-sensor"));
    let sluice = site
        .spawn(
            "load",
            &format!(
                r#"
                [bus.redis]
                url = "{}"

                [registry]
                file = "devices.toml"

                [[routes]]
                topic = "devices/{{product}}/{{device}}/telemetry"

                [[sources.mqtt]]
                url = "{}"
                qos = 0

                [websocket]
                max_connections = 100000
                max_devices = 100000
                send_queue = 100000
                "#,
                redis.url(),
                broker.url()
            ),
        )
        .await;
    eprintln!(
        "sluice pid {} on {}; {} clients, {} devices, watch {:?}, {} msg/s",
        sluice.pid(),
        sluice.base_url(),
        args.clients,
        args.devices,
        args.watch,
        args.rate
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = sluice.rss();

    let tally = Arc::new(Tally::default());
    let url = sluice.ws_url("/ws");
    let mut clients = Vec::with_capacity(args.clients);
    let opened = Instant::now();
    for i in 0..args.clients {
        let devices: Vec<String> = match args.watch {
            Watch::One => vec![device(i % args.devices)],
            Watch::All => (0..args.devices).map(device).collect(),
        };
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
                .await
                .unwrap_or_else(|e| panic!("client {i} cannot connect: {e}"));
        let subscribe =
            json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": devices});
        socket
            .send(Message::text(subscribe.to_string()))
            .await
            .expect("subscribe is sent");
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) if text.contains("\"subscribed\"") => break,
                Some(Ok(_)) => {}
                other => panic!("client {i}: no subscribed frame: {other:?}"),
            }
        }
        let tally = tally.clone();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let received = now_us();
                if !tally.measuring.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(sent) = frame["data"]["sent_us"].as_u64() {
                    tally.delivered.fetch_add(1, Ordering::Relaxed);
                    latencies
                        .push(u32::try_from(received.saturating_sub(sent)).unwrap_or(u32::MAX));
                }
            }
            tally.latencies.lock().await.extend(latencies);
        }));
    }
    eprintln!(
        "{} clients connected and subscribed in {:.1} s",
        args.clients,
        opened.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = sluice.rss();
    let per_connection =
        rss_connected.saturating_sub(rss_before) as f64 / args.clients.max(1) as f64;
    println!(
        "server RSS: {:.1} MiB before, {:.1} MiB with {} connections: {:.0} bytes ({:.2} KiB) per connection",
        rss_before as f64 / 1048576.0,
        rss_connected as f64 / 1048576.0,
        args.clients,
        per_connection,
        per_connection / 1024.0
    );
    if args.rate == 0 {
        return;
    }

    let mut options = MqttOptions::new("sluice-load", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut events) = AsyncClient::new(options, 100_000);
    let mut network = events.network_options();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let topics: Vec<String> = (0..args.devices)
        .map(|i| format!("devices/json-sensor/{}/telemetry", device(i)))
        .collect();
    // Paced in 1 ms ticks; the first second warms up and is not measured.
    let per_tick = args.rate as f64 / 1000.0;
    let total_ticks = (args.seconds + 1) * 1000;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut owed = 0.0;
    let mut sent: u64 = 0;
    let mut measured_from = Instant::now();
    for tick in 0..total_ticks {
        ticker.tick().await;
        if tick == 1000 {
            tally.measuring.store(true, Ordering::Relaxed);
            measured_from = Instant::now();
            sent = 0;
        }
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let n = usize::try_from(sent).unwrap_or(0) % topics.len();
            let payload = json!({"ts": now_us() / 1000, "sent_us": now_us(), "temperature": 21.5});
            publisher
                .publish(&topics[n], QoS::AtMostOnce, false, payload.to_string())
                .await
                .expect("the publish is queued");
            sent += 1;
        }
    }
    // Let what is in flight arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tally.measuring.store(false, Ordering::Relaxed);
    let elapsed = measured_from.elapsed().as_secs_f64() - 0.5;
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let rss_loaded = sluice.rss();
    let metrics = reqwest::get(format!("{}/metrics", sluice.base_url()))
        .await
        .expect("sluice answers /metrics")
        .text()
        .await
        .unwrap_or_default();
    drop(sluice);
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
    }
    let mut latencies = std::mem::take(&mut *tally.latencies.lock().await);
    latencies.sort_unstable();
    let at = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((latencies.len() - 1) as f64 * q).round() as usize;
        f64::from(latencies[index]) / 1000.0
    };
    let fanout = match args.watch {
        Watch::One => (args.clients as f64 / args.devices as f64).max(1.0),
        Watch::All => args.clients as f64,
    };
    println!(
        "published {sent} reports in {elapsed:.1} s ({:.0} msg/s); expected deliveries {:.0}",
        sent as f64 / elapsed,
        sent as f64 * fanout
    );
    println!(
        "delivered {delivered} frames: {:.0} frames/s",
        delivered as f64 / elapsed
    );
    println!(
        "latency (device send → client receive): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!(
        "server RSS under load: {:.1} MiB",
        rss_loaded as f64 / 1048576.0
    );
    // What sluice counted (since it started, warm-up included).
    for line in metrics.lines().filter(|l| {
        [
            "sluice_ingest_messages_total",
            "sluice_publishes_total",
            "sluice_ws_frames_sent_total",
            "sluice_ws_frames_conflated_total",
            "sluice_ws_frames_dropped_total",
        ]
        .iter()
        .any(|name| l.starts_with(name))
    }) {
        println!("  {line}");
    }
}
