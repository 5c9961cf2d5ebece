//! `--mode recovery`: a native client subscribed to alerts drops its
//! connection; `--messages` alerts are raised while it is away; it comes
//! back with `since`. How long until `subscribed`, until the last missed
//! alert, how many Redis commands the replay cost, and how long one page of
//! 1,000 alerts takes from the history API. With `--memory-bus`, the same
//! on the in-process bus; with `--wait-replicas N`, on a Redis with N
//! replicas that must confirm every batch.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice_tests::servers::{RedisServer, wait_for_replicas};
use sluice_tests::sluice::{Site, registry_of};
use tokio_tungstenite::tungstenite::Message;

use crate::Args;
use crate::subscribe::redis_commands;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(socket: &mut Socket) -> String {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return text.to_string(),
            Some(Ok(_)) => {}
            other => panic!("the connection ended: {other:?}"),
        }
    }
}

pub(crate) async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON")
}

/// Every alert `GET /api/v1/alerts` pages through at `base`, oldest first.
pub(crate) async fn all_alerts(http: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/v1/alerts?limit=1000");
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let page = get_json(http, &url).await;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return items,
        }
    }
}

pub(crate) async fn run(args: &Args) {
    let missed = usize::try_from(args.messages).expect("a count");
    let redis = (!args.memory_bus).then(RedisServer::start);
    let replicas: Vec<RedisServer> = match &redis {
        Some(master) => {
            let port = master.port().to_string();
            let replicas = (0..args.wait_replicas)
                .map(|_| RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]))
                .collect();
            wait_for_replicas(master, args.wait_replicas).await;
            replicas
        }
        None => Vec::new(),
    };
    let site = Site::with_scripts(&["json-sensor"]);
    let devices: Vec<String> = (0..args.devices).map(|i| format!("rec-{i:04}")).collect();
    site.write("devices.toml", &registry_of(&devices, "json-sensor"));
    let bus = redis
        .as_ref()
        .map(|r| {
            format!(
                "[bus.redis]\nurl = \"{}\"\nwait_replicas = {}\n",
                r.url(),
                replicas.len()
            )
        })
        .unwrap_or_default();
    let sluice = site
        .spawn(
            "recovery",
            &format!(
                "{bus}[registry]\nfile = \"devices.toml\"\n[products.json-sensor]\nparams = {{ temp_max = \"30\" }}\n[history]\nmax_entries = {}\nmax_replay = {}\n",
                missed * 2,
                missed * 2
            ),
        )
        .await;
    let base = sluice.base_url();
    let (mut socket, _) = tokio_tungstenite::connect_async(sluice.ws_url("/ws"))
        .await
        .expect("connected");
    socket
        .send(Message::text(
            json!({"type": "subscribe", "id": "al", "channel": "alerts"}).to_string(),
        ))
        .await
        .expect("sent");
    let subscribed: Value = serde_json::from_str(&next_text(&mut socket).await).expect("JSON");
    let since = subscribed["positions"].clone();
    drop(socket);

    // Alerts while the client is away, in batches of the ingest API.
    let http = reqwest::Client::new();
    let raised = Instant::now();
    for chunk in (0..missed).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"device_id": devices[i % devices.len()], "payload": {"temperature": 31 + i % 50}}))
            .collect();
        let response = http
            .post(format!("{base}/api/v1/ingest/json-sensor"))
            .json(&batch)
            .send()
            .await
            .expect("ingest answers");
        assert_eq!(response.status(), 202);
    }
    // Until the history holds them all: the last page of the API ends at
    // the last one.
    let recorded = loop {
        let count = all_alerts(&http, &base).await.len();
        if count >= missed {
            break raised.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let page_started = Instant::now();
    let page = get_json(&http, &format!("{base}/api/v1/alerts?limit=1000")).await;
    let page_time = page_started.elapsed();
    assert_eq!(
        page["items"].as_array().map(Vec::len),
        Some(missed.min(1000))
    );

    let commands_before = match &redis {
        Some(redis) => redis_commands(redis).await,
        None => 0,
    };
    let (mut socket, _) = tokio_tungstenite::connect_async(sluice.ws_url("/ws"))
        .await
        .expect("connected");
    let started = Instant::now();
    socket
        .send(Message::text(
            json!({"type": "subscribe", "id": "al", "channel": "alerts", "since": since})
                .to_string(),
        ))
        .await
        .expect("sent");
    let answer: Value = serde_json::from_str(&next_text(&mut socket).await).expect("JSON");
    let subscribed_after = started.elapsed();
    assert_eq!(answer["recovered"], true, "{answer}");
    let mut replayed = 0;
    let mut last_offset = 0;
    while replayed < missed {
        let frame: Value = serde_json::from_str(&next_text(&mut socket).await).expect("JSON");
        if frame["type"] == "alert" {
            let offset = frame["position"]["offset"].as_u64().unwrap_or_default();
            assert!(offset > last_offset, "in order");
            last_offset = offset;
            replayed += 1;
        }
    }
    let all_after = started.elapsed();
    let commands = match &redis {
        Some(redis) => redis_commands(redis).await.saturating_sub(commands_before),
        None => 0,
    };
    println!(
        "{} bus{}: {missed} alerts raised and recorded in {:.3} s",
        if redis.is_some() {
            "Redis"
        } else {
            "in-process"
        },
        if replicas.is_empty() {
            String::new()
        } else {
            format!(" (wait_replicas = {})", replicas.len())
        },
        recorded.as_secs_f64()
    );
    println!(
        "resume: `subscribed` (recovered) after {:.3} s, all {replayed} missed alerts after {:.3} s",
        subscribed_after.as_secs_f64(),
        all_after.as_secs_f64()
    );
    if redis.is_some() {
        println!(
            "Redis commands for the resume: {commands} (INFO commandstats before/after, this tool's own INFO calls included)"
        );
    }
    println!(
        "GET /api/v1/alerts?limit=1000: {:.1} ms",
        page_time.as_secs_f64() * 1000.0
    );
}
