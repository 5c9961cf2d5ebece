//! Telemetry subscriptions by group are carried by the group: one
//! `ws:sub:group:{group}` count and one `ws:group:{group}` channel for a
//! group of 10,000 devices, reports of its members reaching the watchers on
//! another instance, a member of several groups delivered once per
//! subscription, and a registry change moving a device between groups.
//! Two instances on one Redis, and the in-process bus.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use sluice::server::Running;
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::{Site, SluiceProcess, base_url, eventually, report_temperature, ws_url};
use sluice_tests::ws::{Received, WsClient};

const WAIT: Duration = Duration::from_secs(20);
const FLEET: usize = 10_000;

/// The registry: `fleet-00000` … in `fleet`, `both-1` in `fleet` and
/// `depot`, `depot-1` in `depot`, with `mover`'s groups as given.
fn registry(mover_groups: &str) -> String {
    let mut text = String::with_capacity(FLEET * 70);
    for i in 0..FLEET {
        text.push_str(&format!(
            "[[devices]]\nid = \"fleet-{i:05}\"\nproduct = \"json-sensor\"\ngroups = [\"fleet\"]\n"
        ));
    }
    text.push_str(
        "[[devices]]\nid = \"both-1\"\nproduct = \"json-sensor\"\ngroups = [\"fleet\", \"depot\"]\n",
    );
    text.push_str(
        "[[devices]]\nid = \"depot-1\"\nproduct = \"json-sensor\"\ngroups = [\"depot\"]\n",
    );
    text.push_str(&format!(
        "[[devices]]\nid = \"mover\"\nproduct = \"json-sensor\"\ngroups = {mover_groups}\n"
    ));
    text
}

/// `device_data` frames of the connection until it is quiet, as
/// (subscription, device) → temperatures.
async fn received(client: &mut WsClient) -> BTreeMap<(String, String), Vec<f64>> {
    let mut frames: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    while let Some(Received::Json(frame)) = client.quiet(Duration::from_millis(700)).await {
        if frame["type"] == "device_data" {
            let key = (
                frame["id"].as_str().unwrap_or_default().to_owned(),
                frame["device"].as_str().unwrap_or_default().to_owned(),
            );
            frames
                .entry(key)
                .or_default()
                .push(frame["data"]["temperature"].as_f64().unwrap_or(f64::NAN));
        }
    }
    frames
}

/// Two instances on `redis` with `registry`: A in this process ingests,
/// B (its own process) serves a native client.
async fn two_instances(
    redis: &RedisServer,
    site: &Site,
    registry: &str,
) -> (Running, SluiceProcess, WsClient) {
    site.write("devices.toml", registry);
    let config = format!(
        "[bus.redis]\nurl = \"{}\"\nflush = \"50ms\"\n[registry]\nfile = \"devices.toml\"\n",
        redis.url()
    );
    let a = site.start(&config).await;
    let b = site.spawn("b", &config).await;
    let client = WsClient::connect(&b.ws_url("/ws")).await;
    (a, b, client)
}

fn key(id: &str, device: &str) -> (String, String) {
    (id.to_owned(), device.to_owned())
}

async fn watch_keys(redis: &RedisServer) -> BTreeMap<String, i64> {
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("ws:sub:*")
        .query_async(&mut connection)
        .await
        .expect("Redis answers");
    let mut counts = BTreeMap::new();
    for key in keys {
        // A key may go between KEYS and GET.
        let count: Option<i64> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .expect("Redis answers");
        if let Some(count) = count {
            counts.insert(key, count);
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_ten_thousand_is_one_count_and_one_channel_across_instances() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let (a, b, mut client) = two_instances(&redis, &site, &registry("[\"fleet\"]")).await;
    let a_base = base_url(&a);
    let subscribed = client
        .subscribe(&json!({"type": "subscribe", "id": "fleet", "channel": "telemetry", "groups": ["fleet"], "snapshot": false}))
        .await;
    assert_eq!(
        subscribed["groups"],
        json!([{"group": "fleet", "members": FLEET + 2}]),
        "the group and its member count, not its members: {subscribed}"
    );
    assert!(subscribed.get("devices").is_none());
    assert_eq!(
        watch_keys(&redis).await,
        BTreeMap::from([("ws:sub:group:fleet".to_owned(), 1)]),
        "one group count, no device counts"
    );
    let interest = a.state().interest.clone();
    eventually(WAIT, "A to learn the group is watched", || async {
        (!interest.watched_groups(&["fleet".to_owned()]).is_empty()).then_some(())
    })
    .await;
    assert_eq!(interest.len(), 0, "no device is watched one by one");

    // A member's report, ingested on A, reaches the watcher on B.
    report_temperature(&a_base, "fleet-04242", 21.5).await;
    let frames = received(&mut client).await;
    assert_eq!(
        frames,
        BTreeMap::from([(key("fleet", "fleet-04242"), vec![21.5])])
    );

    // A second subscription holds both groups, a third the device itself:
    // each subscription takes a report once.
    client
        .subscribe(&json!({"type": "subscribe", "id": "both", "channel": "telemetry", "groups": ["fleet", "depot"], "snapshot": false}))
        .await;
    client
        .subscribe(&json!({"type": "subscribe", "id": "one", "channel": "telemetry", "device_ids": ["both-1"]}))
        .await;
    eventually(WAIT, "A to learn depot is watched", || async {
        (!interest.watched_groups(&["depot".to_owned()]).is_empty()).then_some(())
    })
    .await;
    let _ = received(&mut client).await;
    report_temperature(&a_base, "both-1", 30.0).await;
    report_temperature(&a_base, "depot-1", 31.0).await;
    let frames = received(&mut client).await;
    assert_eq!(
        frames,
        BTreeMap::from([
            (key("both", "both-1"), vec![30.0]),
            (key("both", "depot-1"), vec![31.0]),
            (key("fleet", "both-1"), vec![30.0]),
            (key("one", "both-1"), vec![30.0]),
        ])
    );

    // The registry moves `mover` from fleet to depot: within a second its
    // reports go to depot's watchers, not fleet's.
    report_temperature(&a_base, "mover", 10.0).await;
    let frames = received(&mut client).await;
    assert_eq!(
        frames,
        BTreeMap::from([
            (key("both", "mover"), vec![10.0]),
            (key("fleet", "mover"), vec![10.0])
        ])
    );
    site.write("devices.toml", &registry("[\"depot\"]"));
    let state = a.state().clone();
    eventually(WAIT, "A to reload the registry", || async {
        state
            .registry
            .load()
            .get("mover")
            .filter(|d| d.groups == ["depot"])
            .map(drop)
    })
    .await;
    report_temperature(&a_base, "mover", 11.0).await;
    let frames = received(&mut client).await;
    assert_eq!(frames, BTreeMap::from([(key("both", "mover"), vec![11.0])]));

    // A subscription that wants snapshots gets each reported member's.
    let mut late = WsClient::connect(&b.ws_url("/ws")).await;
    let depot = late
        .subscribe(
            &json!({"type": "subscribe", "id": "d", "channel": "telemetry", "groups": ["depot"]}),
        )
        .await;
    assert_eq!(depot["groups"], json!([{"group": "depot", "members": 3}]));
    let snapshots = received(&mut late).await;
    assert_eq!(
        snapshots,
        BTreeMap::from([
            (key("d", "both-1"), vec![30.0]),
            (key("d", "depot-1"), vec![31.0]),
            (key("d", "mover"), vec![11.0]),
        ])
    );
    drop(late);

    // The connection leaves: the counts go, and A stops publishing.
    drop(client);
    eventually(WAIT, "the counts to be given back", || async {
        watch_keys(&redis).await.is_empty().then_some(())
    })
    .await;
    eventually(WAIT, "A to learn nobody watches the groups", || async {
        (!interest.any_groups()).then_some(())
    })
    .await;
    b.terminate().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_subscriptions_on_the_in_process_bus_count_one_and_follow_the_registry() {
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", &registry("[\"fleet\"]"));
    let running = site
        .start("[registry]\nfile = \"devices.toml\"\n[websocket]\nmax_devices = 2\n")
        .await;
    let base = base_url(&running);
    let mut client = WsClient::connect(&ws_url(&running, "/ws")).await;
    // Two groups of 10,003 devices fit in a limit of two devices.
    client
        .subscribe(&json!({"type": "subscribe", "id": "g", "channel": "telemetry", "groups": ["fleet", "depot"], "snapshot": false, "keys": ["temperature"]}))
        .await;
    client
        .send(&json!({"type": "subscribe", "id": "more", "channel": "telemetry", "groups": ["elsewhere"]}))
        .await;
    assert_eq!(client.next_of("error").await["code"], "too_many_devices");
    client
        .send(&json!({"type": "subscribe", "id": "x", "channel": "telemetry", "groups": ["fleet"], "since": {"offset": 1, "epoch": "e"}}))
        .await;
    assert_eq!(client.next_of("error").await["code"], "bad_filter");
    report_temperature(&base, "both-1", 5.0).await;
    report_temperature(&base, "fleet-00001", 6.0).await;
    let frames = received(&mut client).await;
    let expected: BTreeMap<(String, String), Vec<f64>> = BTreeMap::from([
        (key("g", "both-1"), vec![5.0]),
        (key("g", "fleet-00001"), vec![6.0]),
    ]);
    assert_eq!(frames, expected);
    client
        .send(&json!({"type": "unsubscribe", "id": "g"}))
        .await;
    assert_eq!(client.next_json().await["type"], "unsubscribed");
    assert!(!running.state().interest.any_groups());
    report_temperature(&base, "both-1", 7.0).await;
    assert_eq!(received(&mut client).await, BTreeMap::new());
    running.stop().await;
}

/// What the Redis subscribers hold of group channels: patterns in all,
/// and group channels subscribed by name.
async fn group_subscriptions(redis: &RedisServer) -> (i64, Vec<String>) {
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let patterns: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut connection)
        .await
        .expect("Redis answers");
    let mut channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("ws:group:*")
        .query_async(&mut connection)
        .await
        .expect("Redis answers");
    channels.sort();
    (patterns, channels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_watching_many_groups_takes_them_with_one_pattern() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let many = sluice::gateway::hub::GROUP_PATTERN_AT + 200;
    let groups: Vec<String> = (0..many).map(|i| format!("site-{i:04}")).collect();
    let registry: String = groups
        .iter()
        .map(|g| {
            format!(
                "[[devices]]\nid = \"dev-{g}\"\nproduct = \"json-sensor\"\ngroups = [\"{g}\"]\n"
            )
        })
        .collect();
    let (a, _b, mut client) = two_instances(&redis, &site, &registry).await;
    let a_base = base_url(&a);

    // A few groups: a channel each.
    let few_channels: Vec<String> = groups[..3]
        .iter()
        .map(|g| format!("ws:group:{g}"))
        .collect();
    client
        .subscribe(&json!({"type": "subscribe", "id": "few", "channel": "telemetry", "groups": groups[..3], "snapshot": false}))
        .await;
    assert_eq!(group_subscriptions(&redis).await, (0, few_channels.clone()));
    // Many: one pattern, no channel by name; reports of any member arrive
    // once per subscription.
    client
        .subscribe(&json!({"type": "subscribe", "id": "many", "channel": "telemetry", "groups": groups, "snapshot": false}))
        .await;
    assert_eq!(group_subscriptions(&redis).await, (1, Vec::new()));
    for (device, temperature) in [("dev-site-0001", 21.0), ("dev-site-1100", 22.0)] {
        eventually(WAIT, "A to learn the groups are watched", || async {
            let interest = a.state().interest.clone();
            let group = device.trim_start_matches("dev-").to_owned();
            (!interest.watched_groups(&[group]).is_empty()).then_some(())
        })
        .await;
        report_temperature(&a_base, device, temperature).await;
    }
    assert_eq!(
        received(&mut client).await,
        BTreeMap::from([
            (key("few", "dev-site-0001"), vec![21.0]),
            (key("many", "dev-site-0001"), vec![21.0]),
            (key("many", "dev-site-1100"), vec![22.0]),
        ])
    );
    // Back to few: a channel each again, and no pattern.
    client
        .send(&json!({"type": "unsubscribe", "id": "many"}))
        .await;
    assert_eq!(client.next_of("unsubscribed").await["id"], "many");
    assert_eq!(group_subscriptions(&redis).await, (0, few_channels.clone()));
    report_temperature(&a_base, "dev-site-0002", 23.0).await;
    report_temperature(&a_base, "dev-site-1100", 24.0).await;
    assert_eq!(
        received(&mut client).await,
        BTreeMap::from([(key("few", "dev-site-0002"), vec![23.0])])
    );
}
