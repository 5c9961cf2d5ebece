//! Subscriptions by group are carried by the group: one
//! `ws:sub:group:{group}` count and one channel per kind for a group of
//! 10,000 devices, reports of its members reaching the watchers on another
//! instance, a member of several groups delivered once per subscription, a
//! registry change moving a device between groups; alerts and status
//! changes (expiries swept on another instance included) by group, with
//! positions, resumed with `since`; a group spanning tenants shows each
//! client its own members only, live and replayed.
//! Two instances on one Redis, and the in-process bus.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use sluice::server::Running;
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::{
    Site, SluiceProcess, base_url, eventually, report_temperature, report_temperature_as, ws_url,
};
use sluice_tests::ws::{Received, WsClient, offset};

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
        .start("[registry]\nfile = \"devices.toml\"\n[websocket]\nmax_devices = 2\n[products.json-sensor]\nparams = { temp_max = \"30\" }\n")
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
    // Alerts by group: a member's, with its position; not another's.
    client
        .subscribe(
            &json!({"type": "subscribe", "id": "al", "channel": "alerts", "groups": ["depot"]}),
        )
        .await;
    report_temperature(&base, "fleet-00002", 44.0).await;
    report_temperature(&base, "depot-1", 45.0).await;
    let alert = client.next_of("alert").await;
    assert_eq!(alert["device"], "depot-1", "{alert}");
    assert!(alert["position"]["offset"].is_u64(), "{alert}");
    let _ = received(&mut client).await;
    client
        .send(&json!({"type": "unsubscribe", "id": "al"}))
        .await;
    assert_eq!(client.next_of("unsubscribed").await["id"], "al");
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

/// `cold`: c-1, c-2 and both-1 (also in `warm`); `warm`: w-1; o-1 in none.
const SMALL_REGISTRY: &str = r#"
[[devices]]
id = "c-1"
product = "json-sensor"
groups = ["cold"]

[[devices]]
id = "c-2"
product = "json-sensor"
groups = ["cold"]

[[devices]]
id = "both-1"
product = "json-sensor"
groups = ["cold", "warm"]

[[devices]]
id = "w-1"
product = "json-sensor"
groups = ["warm"]

[[devices]]
id = "o-1"
product = "json-sensor"
"#;

/// (device, what) of each frame of subscription `id`: the alert's
/// description, or the status `online`/`offline`.
fn seen(frames: &sluice_tests::ws::Frames, id: &str) -> Vec<(String, String)> {
    frames
        .get(id)
        .map(|frames| {
            frames
                .iter()
                .filter(|f| f["type"] != "subscribed")
                .map(|f| {
                    assert!(f["position"]["offset"].is_u64(), "a position in {f}");
                    let device = f["device"].as_str().unwrap_or_default().to_owned();
                    let what = match f["type"].as_str() {
                        Some("alert") => f["description"].as_str().unwrap_or_default().to_owned(),
                        Some("status") => if f["is_online"] == true {
                            "online"
                        } else {
                            "offline"
                        }
                        .to_owned(),
                        other => panic!("an unexpected frame {other:?}: {f}"),
                    };
                    (device, what)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_alerts_by_group_are_carried_by_the_group_and_resume() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", SMALL_REGISTRY);
    let config = format!(
        r#"
        [bus.redis]
        url = "{}"
        flush = "50ms"

        [status]
        tick = "50ms"

        [registry]
        file = "devices.toml"

        [products.json-sensor]
        params = {{ temp_max = "30" }}
        status = {{ mode = "heartbeat", interval = "1s" }}
        "#,
        redis.url()
    );
    // A ingests and sweeps deadlines; B serves the dashboard.
    let a = site.start(&config).await;
    let b = site.spawn("b", &config).await;
    let a_base = base_url(&a);
    let mut client = WsClient::connect(&b.ws_url("/ws")).await;
    let alerts = client
        .subscribe(&json!({"type": "subscribe", "id": "a", "channel": "alerts", "groups": ["cold", "warm"]}))
        .await;
    assert_eq!(
        alerts["groups"],
        json!([{"group": "cold", "members": 3}, {"group": "warm", "members": 2}]),
        "{alerts}"
    );
    assert!(alerts["positions"].is_array(), "{alerts}");
    // At once, before A's mirror may know the group is watched: the
    // record script checks the group's count itself.
    report_temperature(&a_base, "w-1", 31.0).await;
    let first = client.next_of("alert").await;
    assert_eq!(first["device"], "w-1", "{first}");
    let status = client
        .subscribe(&json!({"type": "subscribe", "id": "s", "channel": "status", "groups": ["cold"], "snapshot": false}))
        .await;
    assert_eq!(status["channel"], "status");
    assert_eq!(
        watch_keys(&redis).await,
        BTreeMap::from([
            ("ws:sub:group:cold".to_owned(), 1),
            ("ws:sub:group:warm".to_owned(), 1)
        ]),
        "one count per group, no device counts"
    );
    let interest = a.state().interest.clone();
    eventually(WAIT, "A to learn both groups are watched", || async {
        (interest
            .watched_groups(&["cold".to_owned(), "warm".to_owned()])
            .len()
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(interest.len(), 0, "no device is watched one by one");

    // Alerts of members once per subscription (both-1 is in both groups),
    // none of a device outside them; status of cold's members, online and
    // then offline when their heartbeat deadline passes (the sweep on A).
    report_temperature(&a_base, "c-1", 35.0).await;
    report_temperature(&a_base, "both-1", 40.0).await;
    report_temperature(&a_base, "o-1", 50.0).await;
    report_temperature(&a_base, "w-1", 20.0).await;
    let mut frames = sluice_tests::ws::Frames::new();
    client
        .collect_until(&mut frames, WAIT, "alerts and expiries", |f| {
            seen(f, "a").len() >= 2 && seen(f, "s").len() >= 4
        })
        .await;
    for (id, more) in client.drain(Duration::from_millis(700)).await {
        frames.entry(id).or_default().extend(more);
    }
    let mut alerts_seen = seen(&frames, "a");
    alerts_seen.sort();
    assert_eq!(alerts_seen.len(), 2, "{frames:?}");
    assert_eq!(alerts_seen[0].0, "both-1");
    assert_eq!(alerts_seen[1].0, "c-1");
    let mut status_seen = seen(&frames, "s");
    status_seen.sort();
    let expected: Vec<(String, String)> = [
        ("both-1", "offline"),
        ("both-1", "online"),
        ("c-1", "offline"),
        ("c-1", "online"),
    ]
    .iter()
    .map(|(d, w)| ((*d).to_owned(), (*w).to_owned()))
    .collect();
    assert_eq!(status_seen, expected, "{frames:?}");
    let expiry = frames["s"]
        .iter()
        .find(|f| f["is_online"] == false)
        .expect("an expiry");
    assert_eq!(expiry["source"], "heartbeat_expired", "{expiry}");

    // The dashboard drops; alerts are raised meanwhile. Resuming after the
    // last alert it saw, it gets the members' alerts it missed, once,
    // then live ones.
    let last = frames["a"]
        .iter()
        .filter(|f| f["type"] == "alert")
        .max_by_key(|f| offset(f))
        .expect("alerts")["position"]
        .clone();
    drop(client);
    report_temperature(&a_base, "c-2", 33.0).await;
    report_temperature(&a_base, "o-1", 60.0).await;
    report_temperature(&a_base, "w-1", 34.0).await;
    // Recorded before the client comes back (c-2's expiry follows in 1 s).
    let tenant_top = || async {
        reqwest::get(format!("{a_base}/api/v1/alerts?limit=100"))
            .await
            .expect("the API answers")
            .json::<serde_json::Value>()
            .await
            .expect("JSON")["items"]
            .as_array()
            .map_or(0, Vec::len)
    };
    eventually(WAIT, "the missed alerts to be recorded", || async {
        (tenant_top().await >= 7).then_some(())
    })
    .await;
    let mut client = WsClient::connect(&b.ws_url("/ws")).await;
    let resumed = client
        .subscribe(&json!({"type": "subscribe", "id": "a", "channel": "alerts", "groups": ["cold", "warm"], "since": last}))
        .await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    let mut frames = sluice_tests::ws::Frames::new();
    client
        .collect_until(&mut frames, WAIT, "the missed alerts", |f| {
            seen(f, "a").len() >= 2
        })
        .await;
    report_temperature(&a_base, "c-1", 36.0).await;
    client
        .collect_until(&mut frames, WAIT, "a live alert", |f| {
            seen(f, "a").len() >= 3
        })
        .await;
    for (id, more) in client.drain(Duration::from_millis(700)).await {
        frames.entry(id).or_default().extend(more);
    }
    let devices: Vec<String> = seen(&frames, "a").into_iter().map(|(d, _)| d).collect();
    assert_eq!(devices, ["c-2", "w-1", "c-1"], "{frames:?}");
    let offsets: Vec<u64> = frames["a"].iter().map(offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "in order: {offsets:?}"
    );
    b.terminate().await;
    a.stop().await;
}

/// Two tenants' devices in one group.
const SHARED_REGISTRY: &str = r#"
[[devices]]
id = "a-1"
product = "json-sensor"
tenant = "acme"
groups = ["shared"]

[[devices]]
id = "a-2"
product = "json-sensor"
tenant = "acme"
groups = ["shared"]

[[devices]]
id = "g-1"
product = "json-sensor"
tenant = "globex"
groups = ["shared"]
"#;

const ACME: &str = "key-acme-reads-0123456789";
const GLOBEX: &str = "key-globex-reads-0123456789";
const INGEST: &str = "key-admin-ingests-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_several_tenants_shows_each_client_its_own_members_only() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", SHARED_REGISTRY);
    let config = format!(
        r#"
        [bus.redis]
        url = "{}"
        flush = "50ms"

        [registry]
        file = "devices.toml"

        [products.json-sensor]
        params = {{ temp_max = "30" }}

        [auth]
        [auth.api_keys]
        "{ACME}" = "acme"
        "{GLOBEX}" = "globex"
        "{INGEST}" = {{ scopes = ["ingest", "admin"] }}
        "#,
        redis.url()
    );
    let a = site.start(&config).await;
    let b = site.spawn("b", &config).await;
    let a_base = base_url(&a);
    let mut acme = WsClient::connect_with(&b.ws_url("/ws"), &[("x-api-key", ACME)])
        .await
        .expect("acme connects");
    let subscribed = acme
        .subscribe(
            &json!({"type": "subscribe", "id": "al", "channel": "alerts", "groups": ["shared"]}),
        )
        .await;
    assert_eq!(
        subscribed["groups"],
        json!([{"group": "shared", "members": 2}]),
        "only acme's members are counted: {subscribed}"
    );
    assert_eq!(
        subscribed["positions"].as_array().map(Vec::len),
        Some(1),
        "only acme's history: {subscribed}"
    );
    let last = subscribed["positions"][0].clone();
    let telemetry = acme
        .subscribe(&json!({"type": "subscribe", "id": "t", "channel": "telemetry", "groups": ["shared"], "snapshot": false}))
        .await;
    assert_eq!(
        telemetry["groups"],
        json!([{"group": "shared", "members": 2}])
    );
    let interest = a.state().interest.clone();
    eventually(WAIT, "A to learn the group is watched", || async {
        (!interest.watched_groups(&["shared".to_owned()]).is_empty()).then_some(())
    })
    .await;
    report_temperature_as(&a_base, Some(INGEST), "g-1", 50.0).await;
    report_temperature_as(&a_base, Some(INGEST), "a-1", 40.0).await;
    let mut frames = sluice_tests::ws::Frames::new();
    acme.collect_until(&mut frames, WAIT, "acme's alert and report", |f| {
        !seen(f, "al").is_empty() && f.get("t").is_some_and(|t| !t.is_empty())
    })
    .await;
    for (id, more) in acme.drain(Duration::from_millis(700)).await {
        frames.entry(id).or_default().extend(more);
    }
    let devices = |id: &str| -> Vec<String> {
        frames
            .get(id)
            .map(|f| {
                f.iter()
                    .map(|f| f["device"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(devices("al"), ["a-1"], "{frames:?}");
    assert_eq!(devices("t"), ["a-1"], "{frames:?}");

    // Resuming from before both: acme's alert only, from acme's history.
    drop(acme);
    let mut acme = WsClient::connect_with(&b.ws_url("/ws"), &[("x-api-key", ACME)])
        .await
        .expect("acme connects");
    let resumed = acme
        .subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts", "groups": ["shared"], "since": last}))
        .await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    let replayed = acme.drain(Duration::from_millis(700)).await;
    let replayed: Vec<&str> = replayed
        .get("al")
        .map(|f| f.iter().filter_map(|f| f["device"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(replayed, ["a-1"]);
    // Naming another tenant's history is refused.
    acme.send(&json!({"type": "subscribe", "id": "x", "channel": "alerts", "groups": ["shared"], "since": {"tenant": "globex", "offset": 0, "epoch": "e"}}))
        .await;
    assert_eq!(acme.next_of("error").await["code"], "bad_field");
    b.terminate().await;
    a.stop().await;
}
