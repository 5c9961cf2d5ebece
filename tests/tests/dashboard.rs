//! The dashboard in a real headless Chromium: on a running `sluice demo`
//! the simulated devices appear, a value updates and a status flips; on a
//! fleet of 10,000 devices that have all reported it pages through them,
//! updates, filters and is never closed. Screenshots are kept as test
//! artifacts (`target/sluice-tests/artifacts/`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::browser::Browser;
use sluice_tests::build::scratch_dir;
use sluice_tests::sluice::{Site, eventually, registry_of, report_all};

const ROWS: &str = "return document.querySelectorAll('#devices tbody tr').length";
const VALUES: &str = "const cell = document.querySelector('#devices tr[data-device=\"th-01\"] td.values'); \
                      return cell && cell.textContent ? cell.textContent : null";
const STATES: &str = "return Object.fromEntries([...document.querySelectorAll('#devices tbody tr')]\
                      .map(r => [r.dataset.device, r.querySelector('td.state').dataset.state]))";

fn states(value: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_dashboard_shows_devices_values_and_status_flips() {
    let site = Site::with_scripts(&[
        "json-sensor",
        "lht65",
        "gateway",
        "counter",
        "thermostat-as",
    ]);
    let demo = site.spawn_demo().await;
    let browser = Browser::start().await;
    browser.open(&format!("{}/", demo.base_url())).await;

    // The registry's 16 devices, each with a row.
    eventually(Duration::from_secs(30), "the devices to appear", || async {
        let rows = browser.eval(ROWS).await.as_u64()?;
        (rows >= 16).then_some(())
    })
    .await;

    let first = eventually(Duration::from_secs(30), "th-01's first values", || async {
        browser.eval(VALUES).await.as_str().map(str::to_owned)
    })
    .await;
    assert!(first.contains("temperature"), "{first}");
    eventually(
        Duration::from_secs(30),
        "th-01's values to update",
        || async {
            let now = browser.eval(VALUES).await;
            (now.as_str().is_some_and(|v| v != first)).then_some(())
        },
    )
    .await;

    // Devices fall silent on a schedule: some device that was shown online
    // or offline is shown the other way within a minute.
    let known = |s: &str| s == "online" || s == "offline";
    let before = states(&browser.eval(STATES).await);
    let flipped = eventually(Duration::from_secs(90), "a status to flip", || async {
        let now = states(&browser.eval(STATES).await);
        now.iter()
            .find(|(device, state)| {
                known(state)
                    && before
                        .get(*device)
                        .is_some_and(|was| known(was) && was != *state)
            })
            .map(|(device, state)| (device.clone(), state.clone()))
    })
    .await;
    eprintln!("status flip seen on the dashboard: {flipped:?}");

    // At this width (the browser's window is 1400 px wide) no status cell's
    // text runs out of its cell into the values beside it.
    let overflowing = browser
        .eval(
            "return [...document.querySelectorAll('#devices td.state')]\
             .filter(td => td.scrollWidth > td.clientWidth + 1).map(td => td.parentElement.dataset.device)",
        )
        .await;
    assert_eq!(overflowing, serde_json::json!([]), "status cells overflow");

    // A command from the device view: a simulated thermostat takes the new
    // setpoint, its next frame reports it, and the command shows replied.
    browser
        .eval(
            "document.querySelector('#devices tr[data-device=\"trv-01\"]').click(); \
             document.getElementById('command-name').value = 'set_setpoint'; \
             document.getElementById('command-params').value = '{\"celsius\": 23.5}'; \
             document.getElementById('command-send').click(); return true",
        )
        .await;
    let state = eventually(
        Duration::from_secs(30),
        "the command to be replied",
        || async {
            let state = browser
                .eval("const li = document.querySelector('#commands li'); return li ? li.dataset.state : null")
                .await;
            state
                .as_str()
                .filter(|s| !["sending", "sent"].contains(s))
                .map(str::to_owned)
        },
    )
    .await;
    assert_eq!(state, "replied");
    // The report that carries the new setpoint is its own frame: it may
    // follow the reply by a moment.
    eventually(
        Duration::from_secs(10),
        "trv-01's row to show the new setpoint",
        || async {
            let values = browser
                .eval("return document.querySelector('#devices tr[data-device=\"trv-01\"] td.values').textContent")
                .await;
            values
                .as_str()
                .is_some_and(|v| v.contains("setpoint 23.5"))
                .then_some(())
        },
    )
    .await;

    let screenshot = scratch_dir().join("artifacts").join("dashboard.png");
    browser.screenshot(&screenshot).await;
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(png.len() > 20_000, "a real page, {} bytes", png.len());
    eprintln!("screenshot: {}", screenshot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_pages_through_ten_thousand_devices_without_being_closed() {
    const DEVICES: usize = 10_000;
    let site = Site::with_scripts(&["json-sensor"]);
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("fleet-{i:05}")).collect();
    site.write("devices.toml", &registry_of(&devices, "json-sensor"));
    let server = site
        .spawn(
            "fleet",
            "[registry]\nfile = \"devices.toml\"\n[products.json-sensor]\nlimits = { deadline = \"5s\" }\n",
        )
        .await;
    let base = server.base_url();
    report_all(
        &base,
        "json-sensor",
        &devices,
        |i| serde_json::json!({"temperature": i % 40, "humidity": 50}),
    )
    .await;
    // The first device of the first page keeps reporting.
    let feeder = {
        let url = format!("{base}/api/v1/ingest/json-sensor/fleet-00000");
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0u64.. {
                let body = serde_json::json!({"temperature": 100 + i % 50}).to_string();
                let _ = http.post(&url).body(body).send().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let browser = Browser::start().await;
    browser.open(&format!("{base}/")).await;
    let info = eventually(
        Duration::from_secs(60),
        "the table to page through every device",
        || async {
            let info = browser
                .eval("return document.getElementById('page-info').textContent")
                .await;
            info.as_str()
                .filter(|text| text.ends_with(&format!("of {DEVICES}")))
                .map(str::to_owned)
        },
    )
    .await;
    assert_eq!(info, format!("1–50 of {DEVICES}"));
    assert_eq!(
        browser.eval(ROWS).await.as_u64(),
        Some(50),
        "one page of rows"
    );
    const FIRST: &str = "const cell = document.querySelector('#devices tr[data-device=\"fleet-00000\"] td.values'); \
                         return cell && cell.textContent ? cell.textContent : null";
    let first = eventually(Duration::from_secs(30), "fleet-00000's values", || async {
        browser.eval(FIRST).await.as_str().map(str::to_owned)
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "fleet-00000's values to update",
        || async {
            let now = browser.eval(FIRST).await;
            now.as_str().is_some_and(|v| v != first).then_some(())
        },
    )
    .await;
    // The filter narrows the table to the matching devices.
    browser
        .eval("const f = document.getElementById('filter'); f.value = 'fleet-0999'; f.dispatchEvent(new Event('input')); return null")
        .await;
    assert_eq!(
        browser.eval(ROWS).await.as_u64(),
        Some(10),
        "fleet-09990 to fleet-09999"
    );
    // The connection was never closed (no 1013 for the snapshots).
    let closes = browser
        .eval("return document.getElementById('conn').dataset.closes || '0'")
        .await;
    assert_eq!(closes, Value::String("0".into()), "the socket stayed open");
    let screenshot = scratch_dir().join("artifacts").join("dashboard-fleet.png");
    browser.screenshot(&screenshot).await;
    feeder.abort();
}

/// The alerts panel's descriptions, top to bottom.
async fn shown(browser: &Browser) -> Vec<String> {
    let texts = browser
        .eval(
            "return [...document.querySelectorAll('#alerts li')]\
             .map(li => li.querySelector('div:not(.meta)').textContent)",
        )
        .await;
    serde_json::from_value::<Vec<String>>(texts).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_resumes_its_alerts_after_a_dropped_connection() {
    let site = Site::with_scripts(&["json-sensor"]);
    let devices = vec!["cold-1".to_owned(), "cold-2".to_owned()];
    site.write("devices.toml", &registry_of(&devices, "json-sensor"));
    let server = site
        .spawn(
            "alerts",
            "[registry]\nfile = \"devices.toml\"\n[products.json-sensor]\nparams = { temp_max = \"30\" }\nlimits = { deadline = \"5s\" }\n",
        )
        .await;
    let base = server.base_url();
    let report = |device: &'static str, temperature: u32| {
        let url = format!("{base}/api/v1/ingest/json-sensor/{device}");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .body(serde_json::json!({"temperature": temperature}).to_string())
                .send()
                .await
                .expect("ingest answers");
            assert_eq!(response.status(), 202);
        }
    };
    // Raised before the page opens: the panel starts from the history API.
    for temperature in [31, 32, 33] {
        report("cold-1", temperature).await;
    }
    let browser = Browser::start().await;
    browser.open(&format!("{base}/")).await;
    eventually(Duration::from_secs(30), "the night's alerts", || async {
        (shown(&browser).await.len() == 3).then_some(())
    })
    .await;
    report("cold-2", 34).await;
    eventually(Duration::from_secs(30), "a live alert", || async {
        (shown(&browser).await.len() == 4).then_some(())
    })
    .await;
    // The connection drops; it comes back in four seconds, and what was
    // raised meanwhile is replayed.
    browser
        .eval("retry = 4000; socket.close(); return null")
        .await;
    eventually(Duration::from_secs(10), "the socket to close", || async {
        let closes = browser
            .eval("return document.getElementById('conn').dataset.closes || '0'")
            .await;
        (closes == Value::String("1".into())).then_some(())
    })
    .await;
    for temperature in [41, 42, 43] {
        report("cold-1", temperature).await;
    }
    report("cold-2", 44).await;
    eventually(Duration::from_secs(30), "the missed alerts", || async {
        (shown(&browser).await.len() >= 8).then_some(())
    })
    .await;
    report("cold-1", 45).await;
    eventually(Duration::from_secs(30), "the next live alert", || async {
        (shown(&browser).await.len() >= 9).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts = shown(&browser).await;
    let mut temperatures: Vec<String> = texts
        .iter()
        .map(|t| t.split(' ').nth(1).unwrap_or_default().to_owned())
        .collect();
    // Newest first on the panel: 45 on top, the first alert at the bottom.
    assert_eq!(
        temperatures.first().map(String::as_str),
        Some("45"),
        "{texts:?}"
    );
    assert_eq!(
        temperatures.last().map(String::as_str),
        Some("31"),
        "{texts:?}"
    );
    temperatures.sort();
    assert_eq!(
        temperatures,
        ["31", "32", "33", "34", "41", "42", "43", "44", "45"],
        "every alert once: {texts:?}"
    );
    // Resumed, not reloaded: the history API was read once, at the start.
    let loads = browser
        .eval("return document.getElementById('alerts').dataset.loads")
        .await;
    assert_eq!(loads, Value::String("1".into()));
    let screenshot = scratch_dir().join("artifacts").join("dashboard-alerts.png");
    browser.screenshot(&screenshot).await;
}
