//! `--mode lateness`: two instances share deadlines in Redis (heartbeat
//! 2 s, default tick 100 ms and flush 200 ms); each of `--devices` devices
//! reports once, half through each instance, then stays silent. For each,
//! how long after its deadline (receipt + 2 s) the offline transition was
//! recorded, and when it reached a subscriber of its status channel.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::Site;

use crate::Args;

fn now_ms() -> i64 {
    sluice::message::now_ms()
}

fn quantiles(mut values: Vec<i64>) -> String {
    if values.is_empty() {
        return "none".into();
    }
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {} ms, p99 {} ms, max {} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

pub(crate) async fn run(args: &Args) {
    const INTERVAL: i64 = 2000;
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let config = format!(
        "[bus.redis]\nurl = \"{}\"\n[products.json-sensor]\nstatus = {{ mode = \"heartbeat\", interval = \"2s\" }}\n",
        redis.url()
    );
    let a = site.spawn("late-a", &config).await;
    let b = site.spawn("late-b", &config).await;
    let devices: Vec<String> = (0..args.devices).map(|i| format!("late-{i:05}")).collect();
    for device in &devices {
        redis.watch(device).await;
    }
    let mut subscriber = redis
        .client()
        .get_async_pubsub()
        .await
        .expect("a subscriber");
    subscriber
        .psubscribe("device:*:status")
        .await
        .expect("subscribed");
    let mut messages = subscriber.on_message();
    let http = reqwest::Client::new();
    let mut sent: HashMap<String, i64> = HashMap::new();
    for (i, device) in devices.iter().enumerate() {
        let base = if i % 2 == 0 {
            a.base_url()
        } else {
            b.base_url()
        };
        let before = now_ms();
        let response = http
            .post(format!("{base}/api/v1/ingest/json-sensor/{device}"))
            .body(json!({"temperature": 1}).to_string())
            .send()
            .await
            .expect("sluice answers");
        assert_eq!(response.status(), 202);
        sent.insert(device.clone(), before);
    }
    let mut recorded = Vec::new();
    let mut delivered = Vec::new();
    let mut offline = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while offline < devices.len() {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, messages.next()).await else {
            break;
        };
        let arrived = now_ms();
        let change: Value = serde_json::from_slice(message.get_payload_bytes()).unwrap_or_default();
        if change["is_online"] != 0 {
            continue;
        }
        let Some(device) = change["device_id"].as_str() else {
            continue;
        };
        let Some(at) = sent.get(device) else { continue };
        let due = at + INTERVAL;
        recorded.push(change["timestamp"].as_i64().unwrap_or(0) - due);
        delivered.push(arrived - due);
        offline += 1;
    }
    println!(
        "{offline} of {} devices went offline; heartbeat 2 s, tick 100 ms, flush 200 ms (bound: tick + flush = 300 ms)",
        devices.len()
    );
    println!(
        "offline recorded after the deadline: {}",
        quantiles(recorded)
    );
    println!(
        "offline received by a subscriber after the deadline: {}",
        quantiles(delivered)
    );
}
