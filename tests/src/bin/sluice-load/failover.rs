//! `--mode failover`: one sluice on a master with two replicas watched by
//! three Sentinels; a device reports every 10 ms (its `seq` rising) and a
//! native client watches its telemetry. The master is killed: how long
//! until the Sentinels name a new one, until the client receives again,
//! how many reports were not delivered live meanwhile, and whether the
//! `--messages` alerts raised just after the kill are all recorded, once.
//! `--wait-replicas N` sets `wait_replicas`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::servers::SentinelSet;
use sluice_tests::sluice::{Site, registry_of, report_all};
use sluice_tests::ws::{Received, WsClient};

use crate::Args;
use crate::recovery::{all_alerts, get_json};

pub(crate) async fn run(args: &Args) {
    let alerts = usize::try_from(args.messages).expect("a count");
    let mut set = SentinelSet::start(2).await;
    let site = Site::with_scripts(&["json-sensor"]);
    site.write(
        "devices.toml",
        &registry_of(&["fo-1".to_owned(), "fo-2".to_owned()], "json-sensor"),
    );
    let sluice = site
        .spawn(
            "failover",
            &format!(
                "[bus.redis]\nurl = \"{}\"\nflush = \"50ms\"\nwait_replicas = {}\n[registry]\nfile = \"devices.toml\"\n[products.json-sensor]\nparams = {{ temp_max = \"1000\" }}\n[history]\nmax_entries = {}\n",
                set.url(),
                args.wait_replicas,
                alerts * 2 + 100
            ),
        )
        .await;
    let base = sluice.base_url();
    let mut client = WsClient::connect(&sluice.ws_url("/ws")).await;
    client
        .subscribe(&json!({"type": "subscribe", "id": "tm", "channel": "telemetry", "device_ids": ["fo-1"], "snapshot": false}))
        .await;

    // fo-1 reports its sequence number every 10 ms, through it all.
    let sent = Arc::new(AtomicU64::new(0));
    let reporter = {
        let (base, sent) = (base.clone(), sent.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            for seq in 1.. {
                ticker.tick().await;
                let _ = http
                    .post(format!("{base}/api/v1/ingest/json-sensor/fo-1"))
                    .body(json!({"temperature": 20, "seq": seq}).to_string())
                    .send()
                    .await;
                sent.store(seq, Ordering::SeqCst);
            }
        })
    };
    // Delivered live before the kill.
    let seq_of = |frame: &Value| frame["data"]["seq"].as_u64();
    loop {
        if let Some(Received::Json(frame)) = client.receive(Duration::from_secs(10)).await
            && seq_of(&frame).is_some_and(|s| s > 50)
        {
            break;
        }
    }

    let killed = Instant::now();
    let at_kill = sent.load(Ordering::SeqCst);
    let failover = tokio::spawn(async move {
        set.fail_over().await;
        (set, killed.elapsed())
    });
    // Alerts (fo-2 above its limit) raised while the master is gone.
    let http = reqwest::Client::new();
    report_all(
        &base,
        "json-sensor",
        &vec!["fo-2".to_owned(); alerts],
        |i| json!({"temperature": 2000 + i}),
    )
    .await;
    // The first report after the kill that the client receives.
    let (resumed_after, first_seq) = loop {
        match client.receive(Duration::from_secs(60)).await {
            Some(Received::Json(frame)) => {
                if let Some(seq) = seq_of(&frame)
                    && seq > at_kill
                {
                    break (killed.elapsed(), seq);
                }
            }
            Some(_) => {}
            None => panic!("no report delivered within 60 s of the kill"),
        }
    };
    let (_set, named_after) = failover.await.expect("the failover completes");
    // Every alert recorded, each once.
    let recorded_after = loop {
        let page = get_json(
            &http,
            &format!("{base}/api/v1/alerts?limit=1000&order=newest"),
        )
        .await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= alerts.min(1000) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "alerts not recorded within 120 s: {}",
            items.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recorded = all_alerts(&http, &base).await;
    let count = recorded.len();
    let descriptions: std::collections::BTreeSet<&str> = recorded
        .iter()
        .map(|item| item["description"].as_str().unwrap_or_default())
        .collect();
    reporter.abort();
    println!(
        "wait_replicas = {}: the Sentinels named a new master {:.2} s after the kill",
        args.wait_replicas,
        named_after.as_secs_f64()
    );
    println!(
        "the client received again {:.2} s after the kill; reports {}..{} ({} of them) were not delivered live",
        resumed_after.as_secs_f64(),
        at_kill + 1,
        first_seq - 1,
        first_seq - 1 - at_kill
    );
    println!(
        "{alerts} alerts raised after the kill: all recorded {:.2} s after it; {count} in the history, {} distinct",
        recorded_after.as_secs_f64(),
        descriptions.len()
    );
}
