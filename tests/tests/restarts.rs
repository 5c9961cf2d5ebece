//! The broker and Redis restart while devices keep sending: sluice
//! reconnects and resumes without crashing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use sluice_tests::mqtt::Publisher;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::{Site, base_url, eventually, interest_is, sources_connected};

const WAIT: Duration = Duration::from_secs(30);

/// Collects the `seq` of every telemetry publication of `th-1`.
fn collect(redis: &RedisServer, highest: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let client = redis.client();
    tokio::spawn(async move {
        let Ok(mut subscriber) = client.get_async_pubsub().await else {
            return;
        };
        if subscriber.subscribe("ws:device:th-1").await.is_err() {
            return;
        }
        let mut messages = subscriber.on_message();
        while let Some(message) = messages.next().await {
            let payload: Value =
                serde_json::from_slice(message.get_payload_bytes()).unwrap_or_default();
            if let Some(seq) = payload["data"]["seq"].as_u64() {
                highest.fetch_max(seq, Ordering::Relaxed);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_redis_restarts_do_not_stop_sluice() {
    let mut redis = RedisServer::start();
    let mut broker = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let running = site
        .start(&format!(
            r#"
            [bus.redis]
            url = "{}"
            flush = "50ms"
            resync = "300ms"
            timeout = "500ms"

            [[routes]]
            topic = "devices/{{product}}/{{device}}/telemetry"

            [[sources.mqtt]]
            url = "{}"
            reconnect_max = "500ms"
            "#,
            redis.url(),
            broker.url()
        ))
        .await;
    let state = running.state().clone();
    redis.watch("th-1").await;
    interest_is(&running, "th-1", true).await;
    sources_connected(&running).await;

    // A device that reports every 20 ms for the whole test.
    let sent = Arc::new(AtomicU64::new(0));
    let device = {
        let (sent, port) = (sent.clone(), broker.port());
        tokio::spawn(async move {
            // Its client reconnects by itself after the broker restart.
            let publisher = Publisher::connect(port).await;
            loop {
                let seq = sent.fetch_add(1, Ordering::Relaxed) + 1;
                publisher
                    .publish(
                        "devices/json-sensor/th-1/telemetry",
                        json!({"seq": seq}).to_string(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let highest = Arc::new(AtomicU64::new(0));
    let mut collector = collect(&redis, highest.clone());
    let seen = || highest.load(Ordering::Relaxed);
    let latest_seq = |state: &sluice::pipeline::PipelineState| {
        state
            .latest
            .get("th-1")
            .and_then(|s| s.telemetry["seq"].as_u64())
            .unwrap_or(0)
    };

    eventually(WAIT, "publications before the restarts", || async {
        (seen() >= 20).then_some(())
    })
    .await;

    // The broker restarts: sluice reconnects, subscribes again and resumes.
    broker.restart();
    let before = latest_seq(&state);
    eventually(WAIT, "processing after the broker restart", || async {
        (latest_seq(&state) > before + 20).then_some(())
    })
    .await;
    let published_before = seen();
    eventually(WAIT, "publications after the broker restart", || async {
        (seen() > published_before + 20).then_some(())
    })
    .await;

    // Redis goes away: processing goes on (latest values in memory), live
    // publications are dropped, and everything resumes when it is back.
    assert!(
        state.bus.dead_letters(10, None).await.unwrap().is_empty(),
        "no message failed across the broker restart"
    );
    redis.stop();
    collector.abort();
    let ready = format!("{}/ready", base_url(&running));
    let not_ready = eventually(WAIT, "/ready to report Redis down", || async {
        let response = reqwest::get(&ready).await.ok()?;
        (response.status().as_u16() == 503).then_some(())?;
        response.json::<serde_json::Value>().await.ok()
    })
    .await;
    assert_eq!(not_ready["status"], "not_ready");
    assert_eq!(not_ready["checks"][0]["name"], "bus redis");
    assert_eq!(not_ready["checks"][0]["ready"], false);
    let during = latest_seq(&state);
    eventually(WAIT, "processing while Redis is down", || async {
        (latest_seq(&state) > during + 20).then_some(())
    })
    .await;
    redis.restart();
    eventually(WAIT, "/ready to recover with Redis", || async {
        let response = reqwest::get(&ready).await.ok()?;
        (response.status().as_u16() == 200).then_some(())
    })
    .await;
    // Redis came back empty: the gateway side registers its watcher again.
    redis.watch("th-1").await;
    highest.store(0, Ordering::Relaxed);
    collector = collect(&redis, highest.clone());
    interest_is(&running, "th-1", true).await;
    eventually(WAIT, "publications after the Redis restart", || async {
        redis.watch("th-1").await;
        (seen() > 0).then_some(())
    })
    .await;
    eventually(WAIT, "latest values written behind again", || async {
        let mut connection = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let seq: Option<String> = redis::cmd("HGET")
            .arg("sluice:latest:th-1")
            .arg("t:seq")
            .query_async(&mut connection)
            .await
            .ok()?;
        seq.map(|_| ())
    })
    .await;
    let health = reqwest::get(format!("{}/health", base_url(&running)))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(
        state.bus.dead_letters(10, None).await.unwrap().is_empty(),
        "no message failed across the Redis restart"
    );

    device.abort();
    collector.abort();
    running.stop().await;
}
