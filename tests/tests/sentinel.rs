//! Redis through Sentinels: two instances on a master with two replicas
//! and three Sentinels. Killing the master loses no status change or
//! alert that was recorded (`wait_replicas = 1`), delivery to a dashboard
//! on the other instance resumes by itself, heartbeat deadlines expire on
//! the new master, and a client resuming with `since` gets what it
//! missed once, in order. Without enough replicas, what waits for them is
//! held, not lost and not written twice. Sentinels with a password are
//! asked with `sentinel_password`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::servers::{RedisServer, SentinelSet, wait_for_replicas};
use sluice_tests::sluice::{Site, base_url, eventually, report_temperature, ws_url};
use sluice_tests::ws::{Frames, WsClient, offset};

const WAIT: Duration = Duration::from_secs(30);

const REGISTRY: &str = r#"
[[devices]]
id = "sn-1"
name = "Pump"
product = "json-sensor"
tenant = "acme"

[[devices]]
id = "sn-2"
name = "Valve"
product = "json-sensor"
tenant = "acme"

[[devices]]
id = "sn-3"
name = "Tank"
product = "json-sensor"
tenant = "acme"
status = { mode = "heartbeat", interval = "1h" }
"#;

fn config(url: &str) -> String {
    config_with(url, "")
}

/// The configuration with `extra` lines in `[bus.redis]`.
fn config_with(url: &str, extra: &str) -> String {
    format!(
        r#"
        [bus.redis]
        url = "{url}"
        flush = "50ms"
        timeout = "1s"
        wait_replicas = 1
        {extra}

        [status]
        tick = "50ms"

        [registry]
        file = "devices.toml"

        [products.json-sensor]
        params = {{ temp_max = "30" }}
        status = {{ mode = "heartbeat", interval = "1s" }}
        limits = {{ deadline = "5s" }}
        "#
    )
}

async fn get(base: &str, path: &str) -> Value {
    let response = reqwest::get(format!("{base}{path}"))
        .await
        .expect("the API answers");
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.expect("JSON")
}

async fn transitions(base: &str, device: &str) -> Vec<Value> {
    get(
        base,
        &format!("/api/v1/devices/{device}/transitions?limit=1000"),
    )
    .await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The device and offset of each frame of subscription `id` that has a
/// position, in the order received.
fn positioned(frames: &Frames, id: &str) -> Vec<(String, u64)> {
    frames
        .get(id)
        .map(|f| {
            f.iter()
                .filter(|s| s["position"].is_object())
                .map(|s| {
                    (
                        s["device"].as_str().unwrap_or_default().to_owned(),
                        offset(s),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn has_status(frames: &Frames, device: &str, online: bool) -> bool {
    frames.get("st").is_some_and(|f| {
        f.iter()
            .any(|s| s["device"] == device && s["is_online"] == online)
    })
}

fn has_temperature(frames: &Frames, device: &str, temperature: f64) -> bool {
    frames.get("tm").is_some_and(|f| {
        f.iter().any(|t| {
            t["device"] == device && t["data"]["temperature"].as_f64() == Some(temperature)
        })
    })
}

/// The status table of the node on `port`: device → is_online.
async fn status_table(set: &SentinelSet, port: u16) -> BTreeMap<String, i64> {
    let mut connection = set
        .node(port)
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("the master answers");
    let table: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg("sluice:status")
        .query_async(&mut connection)
        .await
        .expect("HGETALL");
    table
        .into_iter()
        .map(|(device, json)| {
            let change: Value = serde_json::from_str(&json).expect("a status entry is JSON");
            (device, change["is_online"].as_i64().expect("is_online"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_loses_nothing_recorded_and_delivery_resumes_by_itself() {
    let mut set = SentinelSet::start(2).await;
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let config = config(&set.url());
    // A ingests; B serves the dashboard.
    let a = site.start(&config).await;
    let a_base = base_url(&a);
    let b = site.spawn("b", &config).await;
    let b_ws = b.ws_url("/ws");

    let mut dashboard = WsClient::connect(&b_ws).await;
    let status = dashboard
        .subscribe(
            &json!({"type": "subscribe", "id": "st", "channel": "status", "snapshot": false}),
        )
        .await;
    assert_eq!(status["devices"], json!(["sn-1", "sn-2", "sn-3"]));
    let status_since = status["positions"][0].clone();
    dashboard
        .subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts"}))
        .await;
    dashboard
        .subscribe(&json!({"type": "subscribe", "id": "tm", "channel": "telemetry", "device_ids": ["sn-1", "sn-3"], "snapshot": false}))
        .await;

    // Before: sn-1 and sn-2 go online, sn-1 raises an alert.
    report_temperature(&a_base, "sn-1", 21.0).await;
    report_temperature(&a_base, "sn-2", 22.0).await;
    report_temperature(&a_base, "sn-1", 35.0).await;
    let mut seen = Frames::new();
    dashboard
        .collect_until(&mut seen, WAIT, "the first changes", |f| {
            has_status(f, "sn-1", true)
                && has_status(f, "sn-2", true)
                && f.get("al").is_some_and(|a| !a.is_empty())
        })
        .await;

    // sn-1 keeps reporting through the failover; sn-2 falls silent and its
    // heartbeat runs out while the master is down or just after.
    let reporter = {
        let base = a_base.clone();
        tokio::spawn(async move {
            let mut temperature = 20.0;
            loop {
                report_temperature(&base, "sn-1", temperature).await;
                temperature = if temperature >= 25.0 {
                    20.0
                } else {
                    temperature + 0.5
                };
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let old_master = set.master_port().await;
    let failover = tokio::spawn(async move {
        let new = set.fail_over().await;
        (set, new)
    });
    // While the master is gone: a new device comes online and raises an
    // alert; both are accepted by the pipeline and held until recorded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    report_temperature(&a_base, "sn-3", 40.0).await;
    let (set, new_master) = failover.await.expect("the failover completes");
    assert_ne!(new_master, old_master);

    // Every change made it to the new master's status table.
    eventually(WAIT, "the new master to hold every change", || async {
        let table = status_table(&set, new_master).await;
        (table.get("sn-1") == Some(&1)
            && table.get("sn-2") == Some(&0)
            && table.get("sn-3") == Some(&1))
        .then_some(())
    })
    .await;
    // Telemetry sent after the failover reaches the dashboard on B through
    // the new master.
    report_temperature(&a_base, "sn-3", 26.5).await;
    dashboard
        .collect_until(&mut seen, WAIT, "telemetry after the failover", |f| {
            has_temperature(f, "sn-3", 26.5)
        })
        .await;

    // The history each device has: alternating, once each, positions that
    // only go up.
    let mut history = Vec::new();
    for device in ["sn-1", "sn-2", "sn-3"] {
        let items = transitions(&a_base, device).await;
        let flags: Vec<i64> = items
            .iter()
            .map(|t| t["is_online"].as_i64().unwrap_or(-1))
            .collect();
        let expected: Vec<i64> = match device {
            "sn-2" => vec![1, 0],
            _ => vec![1],
        };
        assert_eq!(flags, expected, "{device}: {items:?}");
        history.extend(items.iter().map(|t| (device.to_owned(), offset(t))));
    }
    history.sort_by_key(|(_, offset)| *offset);
    let alerts = get(&a_base, "/api/v1/alerts?limit=1000").await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let alerted: Vec<&str> = alerts
        .iter()
        .map(|a| a["device_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        {
            let mut sorted = alerted.clone();
            sorted.sort();
            sorted
        },
        ["sn-1", "sn-3"],
        "each alert once: {alerts:?}"
    );

    // A dashboard that resumes from where the first one started gets every
    // status change once, in order, from the new master.
    let mut back = WsClient::connect(&b_ws).await;
    back.send(
        &json!({"type": "subscribe", "id": "st", "channel": "status", "since": status_since}),
    )
    .await;
    let mut frames = Frames::new();
    back.collect_until(&mut frames, WAIT, "the replayed changes", |f| {
        f.get("st").is_some_and(|s| {
            s.iter().filter(|s| s["position"].is_object()).count() >= history.len()
        })
    })
    .await;
    let subscribed = frames.get_mut("st").expect("frames").remove(0);
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    assert_eq!(positioned(&frames, "st"), history);

    // The dashboard that stayed connected was told of the gap and got
    // every change it missed, once, in order; the same for alerts.
    dashboard
        .collect_until(&mut seen, WAIT, "the gap to be filled", |f| {
            positioned(f, "st").len() >= history.len() && positioned(f, "al").len() >= 2
        })
        .await;
    for id in ["st", "al"] {
        let gaps: Vec<&Value> = seen[id].iter().filter(|f| f["type"] == "gap").collect();
        assert!(!gaps.is_empty(), "{id}: a gap frame: {:?}", seen[id]);
        assert!(gaps.iter().all(|g| g["recovered"] == true), "{gaps:?}");
    }
    assert_eq!(positioned(&seen, "st"), history);
    assert_eq!(
        positioned(&seen, "al")
            .iter()
            .map(|(d, _)| d.as_str())
            .collect::<Vec<_>>(),
        ["sn-1", "sn-3"]
    );
    // Deadlines keep expiring on the new master: sn-1 stops and goes
    // offline, live to both dashboards.
    reporter.abort();
    back.collect_until(&mut frames, WAIT, "sn-1 offline after the failover", |f| {
        has_status(f, "sn-1", false)
    })
    .await;
    dashboard
        .collect_until(
            &mut seen,
            WAIT,
            "sn-1 offline on the first dashboard",
            |f| has_status(f, "sn-1", false),
        )
        .await;
    let flags: Vec<i64> = transitions(&a_base, "sn-1")
        .await
        .iter()
        .map(|t| t["is_online"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(flags, [1, 0]);
    let metrics = reqwest::get(format!("{}/metrics", b.base_url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_bus_failovers_total") && !l.ends_with(" 0")),
        "B counted the failover: {metrics}"
    );
}

fn counter(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enough_replicas_records_are_held_until_one_confirms() {
    let master = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let sluice = site.spawn("alone", &config(&master.url())).await;
    let base = sluice.base_url();
    let waits = || async {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        counter(&text, "sluice_bus_errors_total{op=\"replicas\"}")
    };

    // The first alert is written, and waits for a replica that is not there.
    report_temperature(&base, "sn-1", 35.0).await;
    let before = eventually(WAIT, "a wait for replicas", || async {
        let n = waits().await;
        (n > 0).then_some(n)
    })
    .await;
    // The second one is taken in, and held behind the first.
    report_temperature(&base, "sn-1", 36.0).await;
    eventually(WAIT, "more waits for replicas", || async {
        (waits().await > before + 1).then_some(())
    })
    .await;
    let descriptions = || async {
        get(&base, "/api/v1/alerts?limit=100").await["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| a["description"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    let held = descriptions().await;
    assert!(
        held.iter().all(|d| !d.contains("36")),
        "nothing behind an unconfirmed write is recorded: {held:?}"
    );

    // A replica arrives: the first is confirmed, the second recorded, each once.
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    wait_for_replicas(&master, 1).await;
    let recorded = eventually(WAIT, "the held alert to be recorded", || async {
        let recorded = descriptions().await;
        recorded
            .iter()
            .any(|d| d.contains("36"))
            .then_some(recorded)
    })
    .await;
    assert_eq!(recorded.len(), 2, "each alert once: {recorded:?}");
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_client_is_told_when_redis_lost_what_it_missed() {
    let mut redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let config = format!(
        r#"
        [bus.redis]
        url = "{}"
        flush = "50ms"

        [registry]
        file = "devices.toml"

        [products.json-sensor]
        params = {{ temp_max = "30" }}
        "#,
        redis.url()
    );
    let sluice = site.start(&config).await;
    let base = base_url(&sluice);
    let mut client = WsClient::connect(&ws_url(&sluice, "/ws")).await;
    client
        .subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts"}))
        .await;
    client
        .subscribe(&json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": ["sn-1"]}))
        .await;
    report_temperature(&base, "sn-1", 35.0).await;
    let mut frames = Frames::new();
    let telemetry = |f: &Frames| {
        f.get("t").map_or(0, |t| {
            t.iter()
                .filter(|d| d["data"]["temperature"] == 35.0)
                .count()
        })
    };
    client
        .collect_until(&mut frames, WAIT, "the first alert", |f| {
            !positioned(f, "al").is_empty() && telemetry(f) == 1
        })
        .await;
    let before = frames["al"].last().expect("an alert")["position"].clone();
    // A dashboard on the seed's telemetry endpoint: the latest values first.
    let mut seed = WsClient::connect(&ws_url(&sluice, "/api/v1/telemetry/datas/current/ws")).await;
    seed.send(&json!({"device_id": "sn-1"})).await;
    assert_eq!(seed.next_json().await["temperature"], 35.0);

    // Redis comes back empty: the history the client was following is gone.
    redis.restart();
    client
        .collect_until(&mut frames, WAIT, "a gap frame", |f| {
            f.get("al")
                .is_some_and(|a| a.iter().any(|g| g["type"] == "gap"))
        })
        .await;
    // Telemetry has no history: both dashboards get the latest values
    // again once their instance has Redis back, with no new report.
    client
        .collect_until(&mut frames, WAIT, "the latest values again", |f| {
            telemetry(f) == 2
        })
        .await;
    assert_eq!(seed.next_json().await["temperature"], 35.0);
    let gap = frames["al"]
        .iter()
        .find(|g| g["type"] == "gap")
        .expect("a gap frame")
        .clone();
    assert_eq!(gap["recovered"], false, "{gap}");
    // Live again, in the new history.
    report_temperature(&base, "sn-1", 36.0).await;
    client
        .collect_until(&mut frames, WAIT, "the alert after the restart", |f| {
            f.get("al").is_some_and(|a| {
                a.iter()
                    .any(|f| f["description"].as_str().is_some_and(|d| d.contains("36")))
            })
        })
        .await;
    let after = frames["al"].last().expect("an alert")["position"].clone();
    assert_ne!(after["epoch"], before["epoch"], "{after} {before}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_with_a_password_are_asked_with_it() {
    let set = SentinelSet::start_with_password(1, Some("s3nt1nel-pw")).await;
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);

    // Asked without it, they refuse: sluice does not start, and says why.
    let error = site.start_error(&config(&set.url())).await;
    assert!(
        error.contains("no Sentinel named the master") && error.contains("NOAUTH"),
        "{error}"
    );

    // With it: sluice finds the master and records through it.
    let running = site
        .start(&config_with(
            &set.url(),
            "sentinel_password = \"s3nt1nel-pw\"",
        ))
        .await;
    let base = base_url(&running);
    report_temperature(&base, "sn-1", 35.0).await;
    eventually(WAIT, "the alert to be recorded", || async {
        let alerts = get(&base, "/api/v1/alerts?limit=10").await;
        (alerts["items"].as_array().map_or(0, Vec::len) == 1).then_some(())
    })
    .await;
    running.stop().await;
}
