//! History: a native client that lost its connection resumes with
//! `since` and gets every alert and status change it missed, once, in
//! order, then live ones; a gap older than what is kept is answered
//! `recovered: false`; the history API pages a tenant's alerts and shows
//! nothing of another tenant's. Two instances on one Redis, and one
//! instance on the in-process bus.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::{Site, base_url, eventually, report_temperature_as, ws_url};
use sluice_tests::ws::{Frames, WsClient, offset};

const WAIT: Duration = Duration::from_secs(20);
const ACME: &str = "key-acme-history-0123456789";
const GLOBEX: &str = "key-globex-history-012345678";
const ADMIN: &str = "key-admin-history-0123456789";

const REGISTRY: &str = r#"
[[devices]]
id = "th-1"
name = "Lab thermometer"
product = "json-sensor"
tenant = "acme"

[[devices]]
id = "th-2"
name = "Office thermometer"
product = "json-sensor"
tenant = "acme"

[[devices]]
id = "gx-1"
name = "Globex freezer"
product = "json-sensor"
tenant = "globex"
"#;

fn config(bus: &str, max_entries: usize) -> String {
    format!(
        r#"
        {bus}

        [status]
        tick = "50ms"

        [registry]
        file = "devices.toml"

        [products.json-sensor]
        params = {{ temp_max = "30" }}
        status = {{ mode = "heartbeat", interval = "1s" }}
        limits = {{ deadline = "5s" }}

        [auth]
        [auth.api_keys]
        "{ACME}" = {{ tenant = "acme", scopes = ["read", "ingest", "command"] }}
        "{GLOBEX}" = {{ tenant = "globex", scopes = ["read", "ingest"] }}
        "{ADMIN}" = {{ scopes = ["read", "admin"] }}

        [history]
        max_entries = {max_entries}
        "#
    )
}

/// Reports a temperature of `device` (above 30: an alert).
async fn report(base: &str, key: &str, device: &str, temperature: f64) {
    report_temperature_as(base, Some(key), device, temperature).await;
}

async fn get(base: &str, key: &str, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .header("X-API-Key", key)
        .send()
        .await
        .expect("the API answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// Every item of `path` (a history endpoint), paging with `limit` and `after`.
async fn all_pages(base: &str, key: &str, path: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut query = format!("{path}{separator}limit={limit}");
        if let Some(after) = &after {
            query.push_str(&format!("&after={after}"));
        }
        let (status, page) = get(base, key, &query).await;
        assert_eq!(status, 200, "{page}");
        let page_items = page["items"].as_array().expect("items").clone();
        assert!(page_items.len() <= limit);
        items.extend(page_items);
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return items,
        }
    }
}

fn mentions(frames: &Frames, id: &str, text: &str) -> bool {
    frames.get(id).is_some_and(|f| {
        f.iter()
            .any(|a| a["description"].as_str().is_some_and(|d| d.contains(text)))
    })
}

/// The newest position a subscription has seen: its `subscribed` frame's,
/// or the last of its frames.
fn last_position(subscribed: &Value, frames: &[Value]) -> Value {
    let mut newest = subscribed["positions"][0].clone();
    for frame in frames {
        if frame["position"].is_object() && offset(frame) > newest["offset"].as_u64().unwrap_or(0) {
            newest = frame["position"].clone();
        }
    }
    newest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_instance_with_what_it_missed_once_in_order() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let bus = format!("[bus.redis]\nurl = \"{}\"\nflush = \"50ms\"", redis.url());
    let config = config(&bus, 60);
    // A ingests; B serves the dashboard.
    let a = site.start(&config).await;
    let a_base = base_url(&a);
    let b = site.spawn("b", &config).await;
    let b_ws = b.ws_url(&format!("/ws?api_key={ACME}"));

    let mut first = WsClient::connect(&b_ws).await;
    let alerts = first
        .subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts"}))
        .await;
    assert_eq!(alerts["devices"], json!(["th-1", "th-2"]));
    let positions = alerts["positions"].as_array().expect("positions");
    assert_eq!(positions.len(), 1, "{alerts}");
    assert_eq!(positions[0]["tenant"], "acme");
    let status = first
        .subscribe(&json!({"type": "subscribe", "id": "st", "channel": "status"}))
        .await;
    report(&a_base, ACME, "th-1", 35.0).await;
    let mut seen = Frames::new();
    first
        .collect_until(&mut seen, WAIT, "alert and status of th-1", |seen| {
            mentions(seen, "al", "35")
                && seen
                    .get("st")
                    .is_some_and(|f| f.iter().any(|s| s["is_online"] == true))
        })
        .await;
    let first_alert = &seen["al"][0];
    assert_eq!(first_alert["device"], "th-1");
    assert_eq!(first_alert["position"]["tenant"], "acme");
    let alerts_since = last_position(&alerts, &seen["al"]);
    let status_since = last_position(&status, &seen["st"]);
    drop(first);

    // While the dashboard is away: alerts of both acme devices, one of
    // globex, and the devices go offline after their heartbeat.
    for temperature in [31.0, 32.0, 33.0] {
        report(&a_base, ACME, "th-1", temperature).await;
    }
    for temperature in [41.0, 42.0] {
        report(&a_base, ACME, "th-2", temperature).await;
    }
    report(&a_base, GLOBEX, "gx-1", 50.0).await;
    for device in ["th-1", "th-2"] {
        eventually(WAIT, "the device to go offline", || async {
            let (_, page) = get(
                &a_base,
                ACME,
                &format!("/api/v1/devices/{device}/transitions"),
            )
            .await;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            items.last().filter(|last| last["is_online"] == 0).map(drop)
        })
        .await;
    }
    // What the history API says was missed, to compare with what is replayed.
    let missed_status: Vec<(String, u64)> = {
        let mut missed = Vec::new();
        for device in ["th-1", "th-2"] {
            let path = format!("/api/v1/devices/{device}/transitions");
            for item in all_pages(&a_base, ACME, &path, 1000).await {
                if offset(&item) > status_since["offset"].as_u64().unwrap() {
                    missed.push((device.to_owned(), offset(&item)));
                }
            }
        }
        missed.sort_by_key(|(_, offset)| *offset);
        missed
    };
    assert!(
        missed_status.len() >= 3,
        "th-1 offline, th-2 online and offline: {missed_status:?}"
    );

    let mut back = WsClient::connect(&b_ws).await;
    back.send(
        &json!({"type": "subscribe", "id": "al", "channel": "alerts", "since": alerts_since}),
    )
    .await;
    back.send(&json!({"type": "subscribe", "id": "st", "channel": "status", "since": {"offset": status_since["offset"], "epoch": status_since["epoch"]}}))
        .await;
    let mut frames = Frames::new();
    back.collect_until(&mut frames, WAIT, "both subscriptions", |f| {
        f.get("al").is_some_and(|a| !a.is_empty()) && f.get("st").is_some_and(|s| !s.is_empty())
    })
    .await;
    report(&a_base, ACME, "th-1", 34.0).await;
    back.collect_until(&mut frames, WAIT, "the replay and the live alert", |f| {
        mentions(f, "al", "temperature 34")
    })
    .await;
    // Anything that would come twice would come by now.
    for (id, more) in back.drain(Duration::from_millis(500)).await {
        frames.entry(id).or_default().extend(more);
    }
    for id in ["al", "st"] {
        let first = frames.get_mut(id).expect("frames").remove(0);
        assert_eq!(first["type"], "subscribed", "{first}");
        assert_eq!(first["recovered"], true, "{first}");
    }
    let replayed = &frames["al"];
    let temperatures: Vec<(String, String)> = replayed
        .iter()
        .map(|a| {
            let description = a["description"].as_str().unwrap_or_default();
            (
                a["device"].as_str().unwrap_or_default().to_owned(),
                description.split(' ').nth(1).unwrap_or_default().to_owned(),
            )
        })
        .collect();
    // Every missed alert once, per device in order, no globex one; then the live one.
    assert_eq!(
        temperatures
            .iter()
            .filter(|(d, _)| d == "th-1")
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>(),
        ["31", "32", "33", "34"],
        "{replayed:?}"
    );
    assert_eq!(
        temperatures
            .iter()
            .filter(|(d, _)| d == "th-2")
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>(),
        ["41", "42"]
    );
    assert_eq!(replayed.len(), 6);
    let offsets: Vec<u64> = replayed.iter().map(offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {offsets:?}"
    );
    assert!(offsets[0] > alerts_since["offset"].as_u64().unwrap());
    assert_eq!(
        replayed.last().unwrap()["description"]
            .as_str()
            .map(|d| d.contains("34")),
        Some(true),
        "the live alert comes after what was missed"
    );
    // The status subscription replays exactly the transitions the history
    // API shows after its position (and no snapshots).
    let status_frames: Vec<(String, u64)> = frames["st"]
        .iter()
        .map(|s| (s["device"].as_str().unwrap().to_owned(), offset(s)))
        .filter(|(_, o)| missed_status.iter().any(|(_, m)| m == o))
        .collect();
    assert_eq!(status_frames, missed_status);
    let unique: HashSet<u64> = frames["st"].iter().map(offset).collect();
    assert_eq!(unique.len(), frames["st"].len(), "no status frame twice");

    // A gap older than what is kept: 60 entries per tenant, so the first
    // alert's position is gone after 70 more.
    for n in 0..70 {
        report(&a_base, ACME, "th-1", 60.0 + f64::from(n)).await;
    }
    eventually(WAIT, "the alerts to be recorded", || async {
        let (_, page) = get(&a_base, ACME, "/api/v1/alerts?limit=1000").await;
        page["items"]
            .as_array()
            .and_then(|items| items.last().cloned())
            .filter(|last| {
                last["description"]
                    .as_str()
                    .is_some_and(|d| d.contains("129"))
            })
            .map(drop)
    })
    .await;
    let mut late = WsClient::connect(&b_ws).await;
    let stale = late.subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts", "since": first_alert["position"]}),
    )
    .await;
    assert_eq!(stale["recovered"], false, "{stale}");
    assert_eq!(
        late.quiet(Duration::from_millis(300)).await,
        None,
        "nothing replayed"
    );
    let other_epoch = late.subscribe(&json!({"type": "subscribe", "id": "al2", "channel": "alerts", "since": {"offset": 1, "epoch": "not-this-one"}}),
    )
    .await;
    assert_eq!(other_epoch["recovered"], false);
    // Positions of a tenant the connection does not see, or on a channel
    // without history, are refused.
    late.send(&json!({"type": "subscribe", "id": "x", "channel": "alerts", "since": {"tenant": "globex", "offset": 1, "epoch": "e"}}))
        .await;
    let refused = late.next_of("error").await;
    assert_eq!(refused["code"], "bad_field");
    late.send(&json!({"type": "subscribe", "id": "y", "channel": "telemetry", "since": {"offset": 1, "epoch": "e"}}))
        .await;
    assert_eq!(late.next_of("error").await["code"], "bad_filter");
    for since in [
        json!({"offset": "one", "epoch": "e"}),
        json!({"offset": -1, "epoch": "e"}),
        json!({"offset": 1}),
        json!({"offset": 1, "epoch": "e", "colour": "red"}),
        json!([{"tenant": "acme", "offset": 1, "epoch": "e"}, {"tenant": "acme", "offset": 2, "epoch": "e"}]),
        json!(vec![
            json!({"tenant": "acme", "offset": 1, "epoch": "e"});
            65
        ]),
        json!("yesterday"),
    ] {
        late.send(&json!({"type": "subscribe", "id": "z", "channel": "alerts", "since": since}))
            .await;
        let refused = late.next_of("error").await;
        assert_eq!(refused["code"], "bad_field", "{since}: {refused}");
    }
    // A position from the future, or of a huge offset, is a gap, not an error.
    let future = late.subscribe(&json!({"type": "subscribe", "id": "al3", "channel": "alerts", "since": {"offset": u64::MAX, "epoch": first_alert["position"]["epoch"]}}),
    )
    .await;
    assert_eq!(future["recovered"], false);

    // The history API: per tenant, paged, from either instance.
    let whole = all_pages(&b.base_url(), ACME, "/api/v1/alerts", 1000).await;
    let paged = all_pages(&b.base_url(), ACME, "/api/v1/alerts", 7).await;
    assert_eq!(
        paged, whole,
        "pages of 7 give the same, without gaps or repeats"
    );
    let mut backwards = all_pages(&b.base_url(), ACME, "/api/v1/alerts?order=newest", 7).await;
    backwards.reverse();
    assert_eq!(backwards, whole, "newest first, the same in reverse");
    assert!(whole.len() >= 50, "{}", whole.len());
    assert!(whole.iter().all(|a| a["tenant_id"] == "acme"));
    let globex = all_pages(&b.base_url(), GLOBEX, "/api/v1/alerts", 10).await;
    assert_eq!(globex.len(), 1);
    assert_eq!(globex[0]["device_id"], "gx-1");
    let recorded = whole[whole.len() / 2]["recorded_at"].as_i64().unwrap();
    let since = all_pages(
        &a_base,
        ACME,
        &format!("/api/v1/alerts?since={recorded}"),
        1000,
    )
    .await;
    assert!(
        since
            .iter()
            .all(|a| a["recorded_at"].as_i64().unwrap() >= recorded)
    );
    assert!(since.len() < whole.len() && !since.is_empty());
    for (path, code, wanted) in [
        ("/api/v1/alerts?limit=0", 400, "bad_query"),
        ("/api/v1/alerts?since=yesterday", 400, "bad_query"),
        ("/api/v1/alerts?after=nonsense", 400, "bad_query"),
        ("/api/v1/alerts?colour=red", 400, "bad_query"),
        ("/api/v1/alerts?order=sideways", 400, "bad_query"),
        ("/api/v1/alerts?tenant=globex", 404, "unknown_tenant"),
        ("/api/v1/devices/gx-1/transitions", 404, "unknown_device"),
    ] {
        let (status, body) = get(&a_base, ACME, path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (code, Some(wanted)),
            "{path}: {body}"
        );
    }

    // An admin's subscription covers both tenants: the newest position of
    // each, read in one round trip, is the newest its history API shows.
    let mut admin = WsClient::connect(&b.ws_url(&format!("/ws?api_key={ADMIN}"))).await;
    let all = admin
        .subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts"}))
        .await;
    let tops = all["positions"].as_array().expect("positions").clone();
    assert_eq!(
        tops.iter().map(|p| p["tenant"].clone()).collect::<Vec<_>>(),
        [json!("acme"), json!("globex")],
        "{all}"
    );
    let (_, newest) = get(&a_base, GLOBEX, "/api/v1/alerts?order=newest&limit=1").await;
    assert!(tops[1]["offset"].as_u64() >= Some(offset(&newest["items"][0])));
    drop(admin);

    // Redis restarts empty: the history starts over in a new epoch, and a
    // position of the old one is answered `recovered: false` with the new
    // epoch to go on from.
    let mut redis = redis;
    redis.restart();
    let epoch = first_alert["position"]["epoch"].clone();
    let fresh = eventually(WAIT, "a subscription after Redis came back", || async {
        let mut client = WsClient::connect(&b_ws).await;
        client
            .send(&json!({"type": "subscribe", "id": "al", "channel": "alerts", "since": first_alert["position"]}))
            .await;
        let answer = client.next_json().await;
        (answer["type"] == "subscribed").then_some(answer)
    })
    .await;
    assert_eq!(fresh["recovered"], false, "{fresh}");
    let new_epoch = &fresh["positions"][0]["epoch"];
    assert!(
        new_epoch.as_str().is_some_and(|e| !e.is_empty()) && *new_epoch != epoch,
        "{fresh}"
    );
    b.terminate().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_bus_resumes_too_and_a_restart_starts_a_new_epoch() {
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let config = config("", 1000);
    let running = site.start(&config).await;
    let base = base_url(&running);
    let url = ws_url(&running, &format!("/ws?api_key={ACME}"));
    let mut client = WsClient::connect(&url).await;
    let subscribed = client
        .subscribe(
            &json!({"type": "subscribe", "id": "al", "channel": "alerts", "device_ids": ["th-1"]}),
        )
        .await;
    let top = subscribed["positions"][0].clone();
    assert_eq!(top["offset"], 0, "nothing recorded yet: {subscribed}");
    drop(client);
    for temperature in [31.0, 32.0] {
        report(&base, ACME, "th-1", temperature).await;
    }
    eventually(WAIT, "the alerts to be recorded", || async {
        let (_, page) = get(&base, ACME, "/api/v1/alerts").await;
        (page["items"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;
    // Resuming from before the first entry (offset 0) replays both.
    let mut back = WsClient::connect(&url).await;
    let resumed = back.subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts", "device_ids": ["th-1"], "since": top}),
    )
    .await;
    assert_eq!(resumed["recovered"], true);
    let replayed = [back.next_of("alert").await, back.next_of("alert").await];
    // Offsets count the tenant's status transitions too (th-1 came online).
    let offsets: Vec<u64> = replayed.iter().map(offset).collect();
    assert!(offsets[0] >= 1 && offsets[0] < offsets[1], "{replayed:?}");
    assert!(replayed[1]["description"].as_str().unwrap().contains("32"));
    assert_eq!(back.quiet(Duration::from_millis(300)).await, None);
    drop(back);

    // Command state changes are recorded too: a command sent while the
    // client is away is replayed on its `commands` subscription.
    let mut commands = WsClient::connect(&url).await;
    let subscribed = commands
        .subscribe(&json!({"type": "subscribe", "id": "cmd", "channel": "commands", "device_ids": ["th-1"]}))
        .await;
    let since = subscribed["positions"][0].clone();
    drop(commands);
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/devices/th-1/commands"))
        .header("X-API-Key", ACME)
        .json(&json!({"name": "configure", "params": {"temp_max": 28.5}}))
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.expect("JSON")["id"].clone();
    eventually(WAIT, "the command to settle", || async {
        let (_, body) = get(&base, ACME, &format!("/api/v1/commands/{}", id.as_str()?)).await;
        (body["state"] == "failed").then_some(())
    })
    .await;
    let mut back = WsClient::connect(&url).await;
    let resumed = back
        .subscribe(&json!({"type": "subscribe", "id": "cmd", "channel": "commands", "device_ids": ["th-1"], "since": since}))
        .await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    // Nothing carries it to the device here: it failed at once.
    let failed = back.next_of("command").await;
    assert_eq!(failed["command"]["id"], id);
    assert_eq!(failed["command"]["state"], "failed", "{failed}");
    assert!(offset(&failed) > since["offset"].as_u64().unwrap());
    assert_eq!(failed["position"], failed["command"]["position"]);
    assert_eq!(back.quiet(Duration::from_millis(300)).await, None);
    drop(back);
    running.stop().await;

    // A new process: a new epoch, so the old position is not taken for one of its.
    let again = site.start(&config).await;
    let mut late = WsClient::connect(&ws_url(&again, &format!("/ws?api_key={ACME}"))).await;
    let stale = late.subscribe(&json!({"type": "subscribe", "id": "al", "channel": "alerts", "since": replayed[1]["position"]}),
    )
    .await;
    assert_eq!(stale["recovered"], false);
    assert_ne!(stale["positions"][0]["epoch"], top["epoch"]);
    again.stop().await;
}
