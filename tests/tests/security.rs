//! Every route authenticated, every answer scoped to its tenant: a matrix
//! of routes and credentials, ingest and gateway outputs across tenants,
//! sessions that end with their credentials or when their device moves,
//! and configurations that could be unsafe refused at start.

use std::time::Duration;

use serde_json::{Value, json};
use sluice::gateway::auth::sign_claims;
use sluice_tests::cli::sluice;
use sluice_tests::sluice::{Site, base_url, eventually, ws_url};
use sluice_tests::ws::WsClient;

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes";
const A_READ: &str = "tenant-a-read-0123456789";
const A_INGEST: &str = "tenant-a-ingest-0123456789";
const B_READ: &str = "tenant-b-read-0123456789";
const ADMIN: &str = "the-admin-key-0123456789";

const REGISTRY: &str = r#"
[[devices]]
id = "a-1"
product = "json-sensor"
tenant = "tenant-a"

[[devices]]
id = "a-gw"
product = "gateway"
tenant = "tenant-a"

[[devices]]
id = "a-child"
product = "gateway"
tenant = "tenant-a"
parent = "a-gw"

[[devices]]
id = "b-1"
product = "json-sensor"
tenant = "tenant-b"
"#;

fn config() -> String {
    format!(
        r#"
        [registry]
        file = "devices.toml"

        [auth]
        jwt_secret = "{SECRET}"

        [auth.api_keys]
        "{A_READ}" = "tenant-a"
        "{A_INGEST}" = {{ tenant = "tenant-a", scopes = ["ingest"] }}
        "{B_READ}" = "tenant-b"
        "{ADMIN}" = {{ scopes = ["admin"] }}

        [products.json-sensor]
        limits = {{ deadline = "5s" }}

        [products.gateway]
        limits = {{ deadline = "5s" }}
        "#
    )
}

async fn start() -> (Site, sluice::server::Running) {
    let site = Site::with_scripts(&["json-sensor", "gateway"]);
    site.write("devices.toml", REGISTRY);
    let running = site.start(&config()).await;
    (site, running)
}

/// A request's status and body text, with `key` (if any) as `X-API-Key`.
async fn call(method: &str, url: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let http = reqwest::Client::new();
    let mut request = match method {
        "POST" => http.post(url).body(body.to_owned()),
        _ => http.get(url),
    };
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = request.send().await.expect("sluice answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_credential_as_the_matrix_says() {
    let (_site, running) = start().await;
    let base = base_url(&running);
    // Data of both tenants, and a dead letter of each.
    for (device, temperature) in [("a-1", 111.5), ("b-1", 222.5)] {
        let url = format!("{base}/api/v1/ingest/json-sensor/{device}");
        assert_eq!(
            call(
                "POST",
                &url,
                Some(ADMIN),
                &json!({"temperature": temperature}).to_string()
            )
            .await
            .0,
            202
        );
        assert_eq!(call("POST", &url, Some(ADMIN), "not json").await.0, 202);
    }
    let state = running.state().clone();
    eventually(WAIT, "both dead letters", || async {
        (state.bus.dead_letters(10, None).await.ok()?.len() == 2).then_some(())
    })
    .await;
    eventually(WAIT, "both reports", || async {
        (state.latest.get("a-1").is_some() && state.latest.get("b-1").is_some()).then_some(())
    })
    .await;

    let none = None;
    let columns = [
        none,
        Some(B_READ),
        Some(A_READ),
        Some(A_INGEST),
        Some(ADMIN),
    ];
    let ingest = format!("{base}/api/v1/ingest/json-sensor/a-1");
    let rows: [(&str, String, [u16; 5]); 9] = [
        ("GET", format!("{base}/health"), [200, 200, 200, 200, 200]),
        ("GET", format!("{base}/ready"), [200, 200, 200, 200, 200]),
        ("GET", format!("{base}/"), [200, 200, 200, 200, 200]),
        (
            "GET",
            format!("{base}/api/v1/devices/a-1"),
            [401, 404, 200, 403, 200],
        ),
        (
            "GET",
            format!("{base}/api/v1/deadletter"),
            [401, 200, 200, 403, 200],
        ),
        (
            "GET",
            format!("{base}/api/v1/scripts"),
            [401, 403, 403, 403, 200],
        ),
        ("POST", ingest.clone(), [401, 404, 403, 202, 202]),
        ("GET", format!("{base}/metrics"), [401, 403, 403, 403, 200]),
        (
            "GET",
            format!("{base}/api/v1/no-such-route"),
            [404, 404, 404, 404, 404],
        ),
    ];
    for (method, url, expected) in &rows {
        for (key, want) in columns.iter().zip(expected) {
            let (status, body) = call(method, url, *key, r#"{"temperature": 1}"#).await;
            assert_eq!(status, *want, "{method} {url} with {key:?}: {body}");
            // Nothing of the other tenant, anywhere.
            match *key {
                Some(A_READ) | Some(A_INGEST) => {
                    assert!(
                        !body.contains("b-1")
                            && !body.contains("222.5")
                            && !body.contains("tenant-b"),
                        "{url}: {body}"
                    );
                }
                Some(B_READ) => {
                    // The device id it asked for may be echoed, nothing else.
                    assert!(
                        !body.contains("111.5") && !body.contains("tenant-a"),
                        "{url}: {body}"
                    );
                    assert!(
                        !body.contains("a-1") || url.contains("a-1"),
                        "{url}: {body}"
                    );
                }
                _ => {}
            }
        }
    }
    // Dead letters: each tenant its own, the admin all.
    let letters = |key: &'static str| {
        let url = format!("{base}/api/v1/deadletter");
        async move {
            let (_, body) = call("GET", &url, Some(key), "").await;
            let letters: Vec<Value> = serde_json::from_str(&body).expect("a JSON list");
            letters
                .iter()
                .map(|l| l["device_id"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(letters(A_READ).await, ["a-1"]);
    assert_eq!(letters(B_READ).await, ["b-1"]);
    assert_eq!(letters(ADMIN).await.len(), 2);
    // Another tenant's device is answered exactly like one that does not exist.
    let (_, theirs) = call(
        "GET",
        &format!("{base}/api/v1/devices/a-1"),
        Some(B_READ),
        "",
    )
    .await;
    let (_, nobody) = call(
        "GET",
        &format!("{base}/api/v1/devices/zz-9"),
        Some(B_READ),
        "",
    )
    .await;
    assert_eq!(theirs.replace("a-1", "X"), nobody.replace("zz-9", "X"));
    let (_, theirs) = call("POST", &ingest, Some(B_READ), "{}").await;
    let (_, nobody) = call(
        "POST",
        &format!("{base}/api/v1/ingest/json-sensor/zz-9"),
        Some(B_READ),
        "{}",
    )
    .await;
    assert_eq!(theirs.replace("a-1", "X"), nobody.replace("zz-9", "X"));
    // Credentials in the query string count on WebSocket upgrades only.
    let (status, _) = call(
        "GET",
        &format!("{base}/api/v1/devices/a-1?api_key={A_READ}"),
        None,
        "",
    )
    .await;
    assert_eq!(status, 401);
    // A JWT in the header works like a key; scopes from `scope`.
    let token = sign_claims(
        SECRET.as_bytes(),
        &json!({"sub": "ann", "tenant_id": "tenant-a", "exp": sluice::message::now_ms() / 1000 + 600, "scope": "read ingest"}),
    );
    let response = reqwest::Client::new()
        .get(format!("{base}/api/v1/devices/a-1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // WebSocket upgrades without credentials: /ws is upgraded and answers
    // frames before `auth` with `unauthenticated`; a compatibility endpoint
    // takes its credentials in the first frame.
    let mut native = WsClient::connect(&ws_url(&running, "/ws")).await;
    native.send(&json!({"type": "ping"})).await;
    assert_eq!(native.next_of("error").await["code"], "unauthenticated");
    let mut compat =
        WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/ws")).await;
    compat
        .send(&json!({"device_id": "a-1", "api_key": A_READ}))
        .await;
    // The matrix left a-1 at the value its last ingest sent.
    assert_eq!(compat.next_json().await["temperature"], 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tenant_can_write_into_another_tenants_device() {
    let (_site, running) = start().await;
    let base = base_url(&running);
    let state = running.state().clone();
    // B's own report, its baseline.
    let url_b = format!("{base}/api/v1/ingest/json-sensor/b-1");
    assert_eq!(
        call(
            "POST",
            &url_b,
            Some(ADMIN),
            &json!({"temperature": 5.0}).to_string()
        )
        .await
        .0,
        202
    );
    eventually(WAIT, "b-1's report", || async {
        state.latest.get("b-1").map(drop)
    })
    .await;
    let before = state.latest.get("b-1").expect("reported");

    // HTTP ingest by A into B's device: 404, as an unknown device.
    let (status, body) = call(
        "POST",
        &url_b,
        Some(A_INGEST),
        &json!({"temperature": 66.6}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body.contains("unknown_device")),
        (404, true),
        "{body}"
    );
    // A's own device under another product: 409.
    let (status, body) = call(
        "POST",
        &format!("{base}/api/v1/ingest/gateway/a-1"),
        Some(A_INGEST),
        "{}",
    )
    .await;
    assert_eq!(status, 409, "{body}");
    // An unregistered device, with accept_unregistered off (the default): 404.
    let (status, _) = call(
        "POST",
        &format!("{base}/api/v1/ingest/json-sensor/new-1"),
        Some(A_INGEST),
        "{}",
    )
    .await;
    assert_eq!(status, 404);

    // A's gateway names its declared child (applied) and B's device (not).
    let payload = json!({
        "gateway": {"uptime_s": 1},
        "devices": [
            {"id": "a-child", "temperature": 7.5},
            {"id": "b-1", "temperature": 66.6, "online": false, "event": "tampered"}
        ]
    });
    let (status, _) = call(
        "POST",
        &format!("{base}/api/v1/ingest/gateway/a-gw"),
        Some(A_INGEST),
        &payload.to_string(),
    )
    .await;
    assert_eq!(status, 202);
    eventually(WAIT, "the declared child's report", || async {
        state
            .latest
            .get("a-child")
            .filter(|s| s.telemetry["temperature"] == json!(7.5))
            .map(drop)
    })
    .await;
    let letters = eventually(WAIT, "a foreign_device dead letter", || async {
        let letters = state.bus.dead_letters(10, None).await.ok()?;
        letters
            .into_iter()
            .find(|l| l.reason.as_str() == "foreign_device")
    })
    .await;
    assert_eq!(letters.device_id, "a-gw");
    assert_eq!(letters.tenant_id, "tenant-a", "A's dead letter, not B's");
    assert!(letters.error.contains("b-1"), "{}", letters.error);
    // B's device is as it was: values and status.
    assert_eq!(state.latest.get("b-1"), Some(before));
    assert!(state.status.get("b-1").is_none_or(|s| s.online));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_with_their_token_and_when_their_device_moves() {
    let (site, running) = start().await;
    let now = sluice::message::now_ms() / 1000;
    // Expires in 2 s (plus the 30 s leeway the configuration allows).
    let short = sign_claims(
        SECRET.as_bytes(),
        &json!({"sub": "ann", "tenant_id": "tenant-a", "exp": now + 2 - 30}),
    );
    let mut native = WsClient::connect_with(
        &ws_url(&running, "/ws"),
        &[("authorization", &format!("Bearer {short}"))],
    )
    .await
    .unwrap();
    native
        .send(&json!({"type": "subscribe", "id": "s", "channel": "status", "device_ids": ["a-1"]}))
        .await;
    native.next_of("subscribed").await;
    let mut compat = WsClient::connect(&ws_url(&running, "/api/v1/device/online/status/ws")).await;
    compat
        .send(&json!({"device_id": "a-1", "token": short}))
        .await;
    compat.next_json().await;
    for client in [&mut native, &mut compat] {
        assert_eq!(client.next_of("error").await["code"], "token_expired");
        assert_eq!(client.closed(WAIT).await.0, 1008);
    }

    // A device moved to another tenant stops streaming to the old one.
    let mut native = WsClient::connect_with(&ws_url(&running, "/ws"), &[("x-api-key", A_READ)])
        .await
        .unwrap();
    native
        .send(
            &json!({"type": "subscribe", "id": "t", "channel": "telemetry", "device_ids": ["a-1"]}),
        )
        .await;
    native.next_of("subscribed").await;
    let mut compat =
        WsClient::connect(&ws_url(&running, "/api/v1/telemetry/datas/current/ws")).await;
    compat
        .send(&json!({"device_id": "a-1", "api_key": A_READ}))
        .await;
    compat.next_json().await;
    site.write(
        "devices.toml",
        &REGISTRY.replacen("tenant = \"tenant-a\"", "tenant = \"tenant-b\"", 1),
    );
    let error = native.next_of("error").await;
    assert_eq!(
        (
            error["code"].as_str(),
            error["id"].as_str(),
            error["device"].as_str()
        ),
        (Some("unknown_device"), Some("t"), Some("a-1"))
    );
    assert_eq!(compat.next_of("error").await["code"], "unknown_device");
    assert_eq!(compat.closed(WAIT).await.0, 1008);
    // Reports of a-1 no longer reach the old tenant's native client.
    let base = base_url(&running);
    let url = format!("{base}/api/v1/ingest/json-sensor/a-1");
    assert_eq!(
        call(
            "POST",
            &url,
            Some(ADMIN),
            &json!({"temperature": 1.0}).to_string()
        )
        .await
        .0,
        202
    );
    let state = running.state().clone();
    eventually(WAIT, "the report to be processed", || async {
        state
            .latest
            .get("a-1")
            .filter(|s| s.telemetry["temperature"] == json!(1.0))
            .map(drop)
    })
    .await;
    native.send(&json!({"type": "ping"})).await;
    assert_eq!(native.next_json().await, json!({"type": "pong"}));
    running.stop().await;
}

#[test]
fn unsafe_configurations_are_refused_at_start_naming_the_key() {
    let site = Site::with_scripts(&["json-sensor"]);
    for (text, key) in [
        ("[auth]\n", "auth"),
        ("[auth]\njwt_secret = \"\"\n", "auth.jwt_secret"),
        ("[auth]\njwt_secret = \"too-short\"\n", "auth.jwt_secret"),
        (
            "[auth.api_keys]\nshort = \"acme\"\n",
            "auth.api_keys.<key of 5 characters>",
        ),
        (
            "[auth.api_keys]\n\"key-without-a-tenant-1234\" = { scopes = [\"read\"] }\n",
            "auth.api_keys.<key of 25 characters>.tenant",
        ),
        (
            "[auth.api_keys]\n\"key-of-a-tenant-12345678\" = \"a\"\n\"key-of-a-tenant-12345678\" = \"b\"\n",
            "duplicate key",
        ),
    ] {
        site.write("bad.toml", text);
        let output = sluice(site.path(), &["check", "--config", "bad.toml"]);
        assert_ne!(output.code, 0, "{text}: {output:?}");
        assert!(
            output.stderr.contains(&format!("`{key}`")) || output.stderr.contains(key),
            "{text}: {}",
            output.stderr
        );
        assert!(
            !output.stderr.contains("12345678"),
            "no key is quoted in an error: {}",
            output.stderr
        );
    }
    // A cache directory others may write to is refused at start.
    let open = site.path().join("open-cache");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    site.write("ok.toml", "[server]\nlisten = \"127.0.0.1:0\"\n");
    let output = sluice(
        site.path(),
        &[
            "run",
            "--config",
            "ok.toml",
            "--cache-dir",
            open.to_str().unwrap(),
        ],
    );
    assert_ne!(output.code, 0, "{output:?}");
    assert!(
        output
            .stderr
            .contains("writable by its group or by everyone"),
        "{}",
        output.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_metrics_on_loopback_without_credentials() {
    let site = Site::with_scripts(&["json-sensor"]);
    site.write("devices.toml", REGISTRY);
    let port = sluice_tests::servers::free_port();
    let running = site
        .start(&format!(
            "[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
            config()
        ))
        .await;
    let scraped = eventually(WAIT, "the metrics listener", || async {
        let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?;
        (response.status() == 200).then_some(response.text().await.ok()?)
    })
    .await;
    assert!(scraped.contains("# TYPE"), "{scraped}");
    // Only /metrics there.
    let other = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/devices/a-1"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    // On the main listener it still needs an admin.
    let (status, _) = call("GET", &format!("{}/metrics", base_url(&running)), None, "").await;
    assert_eq!(status, 401);
    running.stop().await;
}
