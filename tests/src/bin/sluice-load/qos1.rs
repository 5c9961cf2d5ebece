//! `--mode qos1`: `--messages` reports through one MQTT QoS 1 session as
//! fast as the broker lets them through; each is acknowledged by sluice
//! only after its effects (here: its record in a Redis stream) were
//! accepted by the bus, so the session's rate is its in-flight window
//! (mosquitto's `max_inflight_messages`, `--inflight`) over the time to an
//! acknowledgement.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::Site;

use crate::Args;

pub(crate) async fn run(args: &Args) {
    let broker = Mosquitto::start_with(&format!("max_inflight_messages {}", args.inflight));
    let redis = (!args.memory_bus).then(RedisServer::start);
    let bus = match &redis {
        Some(redis) => format!(
            "[bus.redis]\nurl = \"{}\"\n[records.redis_stream]\nkey = \"sluice:records\"\n",
            redis.url()
        ),
        None => String::new(),
    };
    let site = Site::with_scripts(&["json-sensor"]);
    let sluice = site
        .spawn(
            "qos1",
            &format!(
                r#"
                {bus}
                [[routes]]
                topic = "devices/{{product}}/{{device}}/telemetry"
                [[sources.mqtt]]
                url = "{}"
                qos = 1
                max_inflight = 65535
                "#,
                broker.url()
            ),
        )
        .await;
    let ready = format!("{}/ready", sluice.base_url());
    while reqwest::get(&ready)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut options = MqttOptions::new("sluice-qos1-device", "127.0.0.1", broker.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(u16::MAX);
    let (publisher, mut events) = AsyncClient::new(options, 100_000);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let devices = args.devices.max(1);
    let started = Instant::now();
    for seq in 1..=args.messages {
        let topic = format!("devices/json-sensor/q-{}/telemetry", seq % devices as u64);
        publisher
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                json!({"seq": seq}).to_string(),
            )
            .await
            .expect("queued");
    }
    let metrics = format!("{}/metrics", sluice.base_url());
    let processed = || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.lines()
            .find(|l| l.starts_with("sluice_worker_messages_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    loop {
        if processed().await.unwrap_or(0.0) >= args.messages as f64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all messages were processed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{} QoS 1 messages through one session in {elapsed:.2} s: {:.0} msg/s (max_inflight_messages {}, {} bus)",
        args.messages,
        args.messages as f64 / elapsed,
        args.inflight,
        if args.memory_bus {
            "in-process"
        } else {
            "Redis"
        }
    );
}
