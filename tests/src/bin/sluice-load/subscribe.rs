//! `--mode subscribe`: one connection subscribes to the telemetry (or with
//! `--channel status`, the status) of (no filter, or with `--by-group` the
//! one group they are all in) every one of
//! `--devices` registered devices that have all reported, with Redis on
//! loopback; how long until `subscribed`, until every snapshot, how many
//! Redis commands it cost and how much Redis memory it took.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::{Site, registry_of, report_all};
use tokio_tungstenite::tungstenite::Message;

use crate::Args;

/// Commands Redis has executed since it started (`INFO commandstats`).
pub(crate) async fn redis_commands(redis: &RedisServer) -> u64 {
    let Ok(mut connection) = redis.client().get_multiplexed_async_connection().await else {
        return 0;
    };
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Redis's `used_memory` (`INFO memory`).
async fn redis_memory(redis: &RedisServer) -> u64 {
    let Ok(mut connection) = redis.client().get_multiplexed_async_connection().await else {
        return 0;
    };
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) async fn run(args: &Args) {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let devices: Vec<String> = (0..args.devices).map(|i| format!("sub-{i:06}")).collect();
    let registry = if args.by_group {
        registry_of(&devices, "json-sensor").replace(
            "product = \"json-sensor\"\n",
            "product = \"json-sensor\"\ngroups = [\"fleet\"]\n",
        )
    } else {
        registry_of(&devices, "json-sensor")
    };
    site.write("devices.toml", &registry);
    let sluice = site
        .spawn(
            "subscribe",
            &format!(
                "[bus.redis]\nurl = \"{}\"\n[registry]\nfile = \"devices.toml\"\n[websocket]\nmax_devices = {}\n",
                redis.url(),
                args.devices
            ),
        )
        .await;
    report_all(
        &sluice.base_url(),
        "json-sensor",
        &devices,
        |_| json!({"temperature": 21.5, "humidity": 40}),
    )
    .await;
    // Wait until the last device's values are in.
    let last = format!(
        "{}/api/v1/devices/{}",
        sluice.base_url(),
        devices.last().expect("at least one device")
    );
    loop {
        let body: Value = reqwest::get(&last)
            .await
            .expect("answers")
            .json()
            .await
            .unwrap_or_default();
        if !body["latest"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Until the write-behind of those reports is done: Redis is quiet.
    let mut last = redis_commands(&redis).await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = redis_commands(&redis).await;
        if now.saturating_sub(last) < 100 {
            break;
        }
        last = now;
    }
    let rss_before = sluice.rss();
    let memory_before = redis_memory(&redis).await;
    let commands_before = redis_commands(&redis).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(sluice.ws_url("/ws"))
        .await
        .expect("connected");
    let started = Instant::now();
    let mut subscribe = json!({"type": "subscribe", "id": "all", "channel": args.channel});
    if args.by_group {
        subscribe["groups"] = json!(["fleet"]);
    }
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .expect("sent");
    // A telemetry snapshot is a `device_data` frame, a status one a `status`.
    let snapshot = if args.channel == "status" {
        "{\"type\":\"status\""
    } else {
        "{\"type\":\"device_data\""
    };
    let mut subscribed_after = None;
    let mut snapshots = 0;
    while snapshots < args.devices {
        let Some(Ok(message)) = socket.next().await else {
            panic!("the connection ended after {snapshots} snapshots");
        };
        let Message::Text(text) = message else {
            continue;
        };
        if subscribed_after.is_none() && text.starts_with("{\"type\":\"subscribed\"") {
            subscribed_after = Some(started.elapsed());
        } else if text.starts_with(snapshot) {
            snapshots += 1;
        } else if text.contains("\"error\"") {
            panic!("refused: {text}");
        }
    }
    let all_after = started.elapsed();
    let commands = redis_commands(&redis).await.saturating_sub(commands_before);
    let memory = redis_memory(&redis).await.saturating_sub(memory_before);
    println!(
        "subscribe to {} devices: `subscribed` after {:.3} s, all {} snapshots after {:.3} s",
        args.devices,
        subscribed_after.unwrap_or_default().as_secs_f64(),
        snapshots,
        all_after.as_secs_f64()
    );
    println!(
        "Redis commands issued: {commands} ({:.3} per device, INFO commandstats before/after, this tool's own two INFO calls included)",
        commands as f64 / args.devices as f64
    );
    println!(
        "Redis memory taken: {:.1} KiB (INFO memory used_memory before/after)",
        memory as f64 / 1024.0
    );
    println!(
        "server RSS: {:.1} MiB before, {:.1} MiB after",
        rss_before as f64 / 1048576.0,
        sluice.rss() as f64 / 1048576.0
    );
}
