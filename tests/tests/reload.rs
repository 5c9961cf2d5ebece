//! Hot reload of scripts under a steady message stream: swaps lose and
//! fail nothing, each message runs on exactly one version, and broken,
//! failing, half-written and removed files are handled as documented.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sluice::script::Script;
use sluice::server::Running;
use sluice_tests::build::{example_script, repo_root};
use sluice_tests::sluice::{Site, base_url, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// The product `sensor` runs json-sensor (telemetry of every field) or
/// counter (telemetry with `delta`); both take `{"total": …, "temperature": …}`.
fn wasm(script: &str) -> Vec<u8> {
    std::fs::read(&example_script(script).wasm).expect("an example script")
}

async fn start(site: &Site) -> Running {
    site.start(
        r#"
        [scripts]
        settle = "100ms"
        unload_grace = "1s"

        [products.sensor]
        status = { mode = "message" }
        params = { temp_max = "1000" }
        limits = { deadline = "5s" }
        "#,
    )
    .await
}

fn current(running: &Running) -> Option<Script> {
    running
        .state()
        .scripts
        .get("sensor")
        .and_then(|p| p.script.clone())
}

/// Replaces `sensor.wasm` the way build tools do: write aside, rename over.
fn install(site: &Site, bytes: &[u8]) {
    let partial = site.path().join("scripts/.sensor.wasm.partial");
    std::fs::write(&partial, bytes).expect("write the new script");
    std::fs::rename(&partial, site.path().join("scripts/sensor.wasm"))
        .expect("rename it into place");
}

async fn scripts_view(running: &Running) -> Value {
    reqwest::get(format!("{}/api/v1/scripts", base_url(running)))
        .await
        .expect("sluice answers")
        .json::<Value>()
        .await
        .expect("sluice answers")
        .as_array()
        .expect("sluice answers")
        .iter()
        .find(|p| p["product"] == "sensor")
        .cloned()
        .expect("sensor is listed")
}

async fn dead_letters(running: &Running) -> Vec<Value> {
    reqwest::get(format!("{}/api/v1/deadletter", base_url(running)))
        .await
        .expect("sluice answers")
        .json::<Vec<Value>>()
        .await
        .expect("sluice answers")
}

async fn ingest(http: &reqwest::Client, base: &str, batch: &[Value]) {
    let response = http
        .post(format!("{base}/api/v1/ingest/sensor"))
        .json(batch)
        .send()
        .await
        .expect("sluice answers");
    assert_eq!(response.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_a_steady_stream_lose_nothing() {
    let site = Site::with_renamed(&[("sensor", "json-sensor")]);
    let running = start(&site).await;
    let base = base_url(&running);

    // Every version that serves, by script object (their call counters).
    let seen: Arc<std::sync::Mutex<HashMap<usize, Script>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (seen, done, state) = (seen.clone(), done.clone(), running.state().clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(script) = state.scripts.get("sensor").and_then(|p| p.script.clone()) {
                    seen.lock()
                        .unwrap()
                        .entry(script.identity())
                        .or_insert(script);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let sent = Arc::new(AtomicU64::new(0));
    let stream = {
        let (sent, done, base) = (sent.clone(), done.clone(), base.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut total = 0.0;
            while !done.load(Ordering::Relaxed) {
                total += 1.0;
                let batch: Vec<Value> = (0..100)
                    .map(|d| json!({"device_id": format!("d-{d}"), "payload": {"total": total, "temperature": 20.0}}))
                    .collect();
                ingest(&http, &base, &batch).await;
                sent.fetch_add(100, Ordering::Relaxed);
            }
        })
    };
    let (json_sensor, counter) = (wasm("json-sensor"), wasm("counter"));
    let started = tokio::time::Instant::now();
    for swap in 0..=10 {
        let before = current(&running).unwrap().id().version.clone();
        install(
            &site,
            if swap % 2 == 0 {
                &counter
            } else {
                &json_sensor
            },
        );
        eventually(WAIT, "the new version to serve", || async {
            (current(&running).unwrap().id().version != before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    stream.await.unwrap();
    sampler.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    eprintln!(
        "{sent} messages in {elapsed:?} ({:.0}/s) across 11 swaps",
        sent as f64 / elapsed.as_secs_f64()
    );
    // Every message ran exactly once, on one version; none failed.
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 12, "{} versions served", seen.len());
    let calls = || -> u64 { seen.values().map(|s| s.stats().snapshot().calls).sum() };
    eventually(WAIT, "every accepted message to run", || async {
        (calls() == sent).then_some(())
    })
    .await;
    assert_eq!(calls(), sent);
    assert!(dead_letters(&running).await.is_empty());
    for script in seen.values() {
        let stats = script.stats().snapshot();
        assert_eq!((stats.errors, stats.traps), (0, 0));
    }
    // The last version installed is counter: outputs have its shape.
    let http = reqwest::Client::new();
    for total in [1.0, 3.5] {
        ingest(
            &http,
            &base,
            &[json!({"device_id": "probe", "payload": {"total": total, "temperature": 20.0}})],
        )
        .await;
    }
    let latest = eventually(WAIT, "the probe's delta", || async {
        running
            .state()
            .latest
            .get("probe")
            .filter(|s| s.telemetry.get("delta").is_some())
    })
    .await;
    assert_eq!(latest.telemetry.get("delta"), Some(&2.5.into()));
    assert!(latest.telemetry.get("temperature").is_none());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_failing_half_written_and_removed_files() {
    let site = Site::with_renamed(&[("sensor", "json-sensor")]);
    let running = start(&site).await;
    let first = current(&running).unwrap().id().version.clone();
    let base = base_url(&running);
    let http = reqwest::Client::new();
    let report =
        |device: &str| json!({"device_id": device, "payload": {"total": 1.0, "temperature": 20.0}});

    // A broken file: the old version keeps serving; the error shows.
    std::fs::write(site.path().join("scripts/sensor.wasm"), b"\0asm broken").unwrap();
    let view = eventually(WAIT, "the broken file to be rejected", || async {
        let view = scripts_view(&running).await;
        view["last_error"].is_string().then_some(view)
    })
    .await;
    assert_eq!(view["state"], "loaded");
    assert_eq!(view["version"], first.as_str());
    assert!(
        view["last_error"].as_str().unwrap().contains("compile"),
        "{view}"
    );
    assert!(view["rejected_reloads"].as_u64() >= Some(1), "{view}");
    ingest(&http, &base, &[report("a")]).await;
    eventually(WAIT, "the old version to serve a", || async {
        running.state().latest.get("a").map(drop)
    })
    .await;

    // The good file again, then examples that counter fails.
    install(&site, &wasm("json-sensor"));
    eventually(WAIT, "the error to clear", || async {
        scripts_view(&running).await["last_error"]
            .is_null()
            .then_some(())
    })
    .await;
    std::fs::copy(
        repo_root().join("scripts/json-sensor/json-sensor.examples.json"),
        site.path().join("scripts/sensor.examples.json"),
    )
    .unwrap();
    install(&site, &wasm("counter"));
    let view = eventually(WAIT, "counter to fail the examples", || async {
        let view = scripts_view(&running).await;
        view["last_error"].is_string().then_some(view)
    })
    .await;
    assert_eq!(view["version"], first.as_str());
    assert!(
        view["last_error"].as_str().unwrap().contains("examples"),
        "{view}"
    );
    assert!(view["rejected_reloads"].as_u64() >= Some(2), "{view}");
    assert!(view["reloads"].as_u64() >= Some(1), "{view}");
    std::fs::remove_file(site.path().join("scripts/sensor.examples.json")).unwrap();
    // Without the examples, counter passes and takes over.
    let counter_version = eventually(WAIT, "counter to serve", || async {
        let view = scripts_view(&running).await;
        (view["version"] != first.as_str() && view["last_error"].is_null())
            .then(|| view["version"].as_str().map(str::to_owned))
            .flatten()
    })
    .await;
    let rejected = scripts_view(&running).await["rejected_reloads"].as_u64();

    // json-sensor again, written in chunks, each within the settle time:
    // one clean swap, no half-written file tried.
    let sensor = wasm("json-sensor");
    let file = site.path().join("scripts/sensor.wasm");
    std::fs::write(&file, b"").unwrap();
    for chunk in sensor.chunks(sensor.len() / 5 + 1) {
        use std::io::Write;
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        out.write_all(chunk).unwrap();
        drop(out);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let view = eventually(WAIT, "json-sensor to serve again", || async {
        let view = scripts_view(&running).await;
        (view["version"] == first.as_str()).then_some(view)
    })
    .await;
    assert_ne!(view["version"].as_str(), Some(counter_version.as_str()));
    assert!(view["loaded_at"].is_string());
    assert!(view["last_error"].is_null(), "{view}");
    assert_eq!(
        view["rejected_reloads"].as_u64(),
        rejected,
        "no half-written file was tried: {view}"
    );

    // Removed: after the grace period, messages are dead-lettered with why.
    std::fs::remove_file(&file).unwrap();
    eventually(WAIT, "the product to unload", || async {
        current(&running).is_none().then_some(())
    })
    .await;
    ingest(&http, &base, &[report("b")]).await;
    let letters = eventually(WAIT, "a dead letter for b", || async {
        let letters = dead_letters(&running).await;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("was removed"),
        "{}",
        letters[0]
    );
    running.stop().await;
}
