//! `--mode lag`: a `--rate` stream of reports over MQTT for `--devices`
//! devices, one client that reads everything and one that subscribes and
//! then stops reading (a tiny TCP window); the server's memory while that
//! client lags, and when it is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::{Site, registry_of};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::Args;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) async fn run(args: &Args) {
    let redis = RedisServer::start();
    let broker = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let devices: Vec<String> = (0..args.devices).map(|i| format!("lag-{i:05}")).collect();
    site.write("devices.toml", &registry_of(&devices, "json-sensor"));
    let sluice = site
        .spawn(
            "lag",
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
                "#,
                redis.url(),
                broker.url()
            ),
        )
        .await;
    let subscribe = json!({"type": "subscribe", "id": "t", "channel": "telemetry"}).to_string();
    // The reader.
    let (mut reader, _) = tokio_tungstenite::connect_async(sluice.ws_url("/ws"))
        .await
        .expect("connected");
    reader
        .send(Message::text(subscribe.clone()))
        .await
        .expect("sent");
    let read = Arc::new(AtomicU64::new(0));
    let counter = read.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = reader.next().await {
            if matches!(message, Message::Text(_)) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    // The client that stops reading.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small window");
    let address = sluice
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    let stream = socket.connect(address).await.expect("connected");
    let request = sluice
        .ws_url("/ws")
        .into_client_request()
        .expect("a request");
    let (mut lagging, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgraded");
    lagging.send(Message::text(subscribe)).await.expect("sent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = sluice.rss();

    let mut options = MqttOptions::new("sluice-lag", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut events) = AsyncClient::new(options, 100_000);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let topics: Vec<String> = devices
        .iter()
        .map(|d| format!("devices/json-sensor/{d}/telemetry"))
        .collect();
    let per_tick = args.rate as f64 / 1000.0;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut owed = 0.0;
    let mut sent: u64 = 0;
    let mut peak = rss_before;
    let mut closed_after = None;
    let metrics = format!("{}/metrics", sluice.base_url());
    let mut last_sample = Instant::now();
    while started.elapsed() < Duration::from_secs(args.seconds) {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let topic = &topics[usize::try_from(sent).unwrap_or(0) % topics.len()];
            let payload = json!({"temperature": 21.5, "seq": sent, "pad": "x".repeat(100)});
            publisher
                .publish(topic, QoS::AtMostOnce, false, payload.to_string())
                .await
                .expect("queued");
            sent += 1;
        }
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            peak = peak.max(sluice.rss());
            if closed_after.is_none()
                && let Ok(response) = reqwest::get(&metrics).await
                && let Ok(text) = response.text().await
                && metric(&text, "sluice_ws_write_timeouts_total")
                    + metric(&text, "sluice_ws_slow_consumer_closes_total")
                    >= 1.0
            {
                closed_after = Some(started.elapsed());
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{sent} reports in {elapsed:.1} s ({:.0} msg/s) for {} devices; the reading client got {} frames",
        sent as f64 / elapsed,
        args.devices,
        read.load(Ordering::Relaxed)
    );
    println!(
        "server RSS: {:.1} MiB before, peak {:.1} MiB while one client lagged, {:.1} MiB at the end",
        rss_before as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        sluice.rss() as f64 / 1048576.0
    );
    match closed_after {
        Some(after) => println!(
            "the lagging client was closed {:.2} s after the stream started",
            after.as_secs_f64()
        ),
        None => println!("the lagging client was not closed"),
    }
    drop(lagging);
}
