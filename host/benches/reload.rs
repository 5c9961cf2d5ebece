//! Hot reload: how long from a script file settling to its new version
//! serving, and message throughput while versions are swapped, against the
//! same stream with no swaps, in one process.
//!
//! Run with: `cargo bench -p sluice --bench reload`

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice::config::{Config, ProductConfig};
use sluice::message::{RawMessage, SourceKind, now_ms};
use sluice::pipeline::{Envelope, Inbound, Ingest};
use sluice::server::Running;

const SETTLE: Duration = Duration::from_millis(50);
const SWAPS: usize = 20;

fn install(scripts: &Path, bytes: &[u8]) {
    let partial = scripts.join(".sensor.wasm.partial");
    std::fs::write(&partial, bytes).expect("write the script");
    std::fs::rename(&partial, scripts.join("sensor.wasm")).expect("rename it into place");
}

fn version(running: &Running) -> String {
    running
        .state()
        .scripts
        .get("sensor")
        .and_then(|p| p.script.clone())
        .map(|s| s.id().version.clone())
        .unwrap_or_default()
}

/// Feeds messages as fast as the workers take them until `stop`; returns
/// how many were submitted.
async fn stream(ingest: Ingest, stop: Arc<AtomicBool>) -> u64 {
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let message = RawMessage {
            device_id: format!("d-{}", sent % 1000),
            product: "sensor".into(),
            topic: "devices/sensor/d/telemetry".into(),
            payload: format!(r#"{{"total":{sent},"temperature":20.5}}"#).into_bytes(),
            received_at: now_ms(),
            source: SourceKind::Internal,
        };
        ingest
            .submit(Envelope::new(Inbound::Data(message)))
            .await
            .expect("pipeline open");
        sent += 1;
    }
    sent
}

fn main() {
    let site = tempfile::tempdir().expect("a temporary directory");
    let scripts = site.path().join("scripts");
    std::fs::create_dir_all(&scripts).expect("a scripts directory");
    let versions = [
        std::fs::read(common::example_script("json-sensor")).expect("json-sensor"),
        std::fs::read(common::example_script("counter")).expect("counter"),
    ];
    install(&scripts, &versions[0]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut loaded = Config::embedded(&scripts);
    loaded.config.workers.count = 1;
    loaded.config.scripts.settle = SETTLE;
    loaded.config.scripts.engine.cache_dir = Some(site.path().join("cache"));
    loaded.config.products.insert(
        "sensor".into(),
        ProductConfig {
            params: [("temp_max".to_owned(), "1000".to_owned())].into(),
            ..ProductConfig::default()
        },
    );
    let running = common::start(&runtime, loaded);

    let measure = |swapping: bool| -> (f64, Vec<Duration>) {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let feeder = runtime.spawn(stream(running.ingest(), stop.clone()));
        let mut latencies = Vec::new();
        for swap in 0..SWAPS {
            let before = version(&running);
            if swapping {
                install(&scripts, &versions[(swap + 1) % 2]);
                let written = Instant::now();
                while version(&running) == before {
                    std::thread::sleep(Duration::from_micros(200));
                }
                latencies.push(written.elapsed().saturating_sub(SETTLE));
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        stop.store(true, Ordering::Relaxed);
        let sent = runtime.block_on(feeder).expect("the feeder runs");
        (sent as f64 / started.elapsed().as_secs_f64(), latencies)
    };
    let (steady, _) = measure(false);
    let (during, mut latencies) = measure(true);
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("hot reload, json-sensor <-> counter, {SWAPS} swaps, settle {SETTLE:?}, one worker:");
    println!(
        "  settled -> serving: median {:.1} ms, max {:.1} ms",
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() - 1])
    );
    println!("  throughput without swaps: {steady:.0} msg/s");
    println!(
        "  throughput during swaps:  {during:.0} msg/s ({:.1}% of it)",
        during / steady * 100.0
    );
    runtime.block_on(running.stop());
}
