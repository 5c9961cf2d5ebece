//! `--mode commands`: the command round trip through real servers. Two
//! `sluice` processes share one Redis and one mosquitto; a simulated
//! json-sensor listens on its command topic and answers every `configure`
//! at once. Each of `--messages` commands is sent over HTTP with `"wait":
//! true` to instance B, encoded, published by B, received by the device,
//! answered over MQTT, ingested by instance A, completed in Redis and
//! answered to the caller on B: the time from request to answer, as the
//! caller sees it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::mqtt::Subscriber;
use sluice_tests::servers::{Mosquitto, RedisServer};
use sluice_tests::sluice::Site;

use crate::Args;

fn quantiles(mut values: Vec<Duration>) -> String {
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        at(1.0).as_secs_f64() * 1000.0
    )
}

pub(crate) async fn run(args: &Args) {
    let redis = RedisServer::start();
    let mqtt = Mosquitto::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write(
        "devices.toml",
        "[[devices]]\nid = \"bench-1\"\nproduct = \"json-sensor\"\n",
    );
    let config = |route: &str| {
        format!(
            r#"
            [registry]
            file = "devices.toml"
            [bus.redis]
            url = "{}"
            [[sources.mqtt]]
            url = "{}"
            qos = 1
            [[routes]]
            topic = "{route}"
            [products.json-sensor]
            status = {{ mode = "message" }}
            "#,
            redis.url(),
            mqtt.url()
        )
    };
    // A ingests the device's answers; B only takes and sends commands.
    let _a = site
        .spawn("cmd-a", &config("devices/{product}/{device}/telemetry"))
        .await;
    let b = site
        .spawn("cmd-b", &config("elsewhere/{product}/{device}/telemetry"))
        .await;
    let mut device = Subscriber::connect(mqtt.port(), "devices/json-sensor/bench-1/command").await;
    // Both MQTT sources must be subscribed before the first command: the
    // device's first report must reach A.
    let http = reqwest::Client::new();
    let known = format!("{}/api/v1/devices/bench-1", b.base_url());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        device
            .publish(
                "devices/json-sensor/bench-1/telemetry",
                json!({"temperature": 20}).to_string(),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if http
            .get(&known)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the device never became known");
    }
    let answering = tokio::spawn(async move {
        while let Some((_, payload)) = device.next(Duration::from_secs(3600)).await {
            let Ok(command) = serde_json::from_slice::<Value>(&payload) else {
                continue;
            };
            let mut answer = command["configure"].clone();
            answer["reply_to"] = command["id"].clone();
            device
                .publish("devices/json-sensor/bench-1/telemetry", answer.to_string())
                .await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let url = format!("{}/api/v1/devices/bench-1/commands", b.base_url());
    let mut times = Vec::with_capacity(args.messages as usize);
    let mut failed = 0;
    let mut first_failure: Option<String> = None;
    let started = Instant::now();
    for i in 0..args.messages {
        let body =
            json!({"name": "configure", "params": {"interval_s": 10 + i % 1000}, "wait": true});
        let sent = Instant::now();
        let response = http.post(&url).json(&body).send().await;
        let took = sent.elapsed();
        match response {
            Ok(r) if r.status() == 200 => {
                let answer: Value = r.json().await.unwrap_or_default();
                if answer["state"] == "replied" {
                    times.push(took);
                } else {
                    failed += 1;
                    first_failure.get_or_insert_with(|| answer.to_string());
                }
            }
            Ok(r) => {
                failed += 1;
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                first_failure.get_or_insert_with(|| format!("{status}: {body}"));
            }
            Err(error) => {
                failed += 1;
                first_failure.get_or_insert_with(|| error.to_string());
            }
        }
    }
    let elapsed = started.elapsed();
    answering.abort();
    println!(
        "commands    {} replied, {failed} not, in {:.1} s ({:.0} round trips/s, one at a time)",
        times.len(),
        elapsed.as_secs_f64(),
        times.len() as f64 / elapsed.as_secs_f64()
    );
    if let Some(failure) = first_failure {
        println!("first one not replied: {failure}");
    }
    if !times.is_empty() {
        println!("round trip  {}", quantiles(times));
    }
}
