//! The dashboard of a running `sluice demo` in a real headless Chromium:
//! the simulated devices appear, a value updates and a status flips, and a
//! screenshot is kept as a test artifact (`target/sluice-tests/artifacts/`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::browser::Browser;
use sluice_tests::build::scratch_dir;
use sluice_tests::sluice::{Site, eventually};

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

    let screenshot = scratch_dir().join("artifacts").join("dashboard.png");
    browser.screenshot(&screenshot).await;
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(png.len() > 20_000, "a real page, {} bytes", png.len());
    eprintln!("screenshot: {}", screenshot.display());
}
