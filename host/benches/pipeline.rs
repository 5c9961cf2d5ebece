//! In-process pipeline throughput: `json-sensor` messages submitted
//! straight to the workers (no network source) through script, status,
//! latest values and the interest gate, on the in-process bus.
//!
//! Run with: `cargo bench -p sluice --bench pipeline`

use std::time::{Duration, Instant};

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::config::{Config, ProductConfig};
use sluice::message::{RawMessage, SourceKind, now_ms};
use sluice::pipeline::{Envelope, Inbound};
use sluice::status::StatusMode;

const MESSAGES: u64 = 20_000;
const DEVICES: u64 = 1_000;
const PAYLOAD: &str = r#"{"ts":1732262400000,"temperature":21.57,"humidity":48.2,"pressure":1013.25,"battery":3.61,"rssi":-67,"status":"ok","firmware":"1.4.2","door_open":false}"#;

fn pipeline(c: &mut Criterion) {
    let site = tempfile::tempdir().expect("a temporary directory");
    let scripts = site.path().join("scripts");
    std::fs::create_dir_all(&scripts).expect("a scripts directory");
    std::fs::copy(
        common::example_script("json-sensor"),
        scripts.join("json-sensor.wasm"),
    )
    .expect("copy the script");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(MESSAGES));
    group.sample_size(10);
    for (name, workers, mode) in [
        ("json-sensor/1-worker/message-mode", 1, StatusMode::Message),
        (
            "json-sensor/1-worker/heartbeat-mode",
            1,
            StatusMode::Heartbeat {
                interval: Duration::from_secs(60),
            },
        ),
    ] {
        let mut loaded = Config::embedded(&scripts);
        loaded.config.workers.count = workers;
        loaded.config.scripts.engine.cache_dir = Some(site.path().join("cache"));
        loaded.config.products.insert(
            "json-sensor".into(),
            ProductConfig {
                status: mode,
                params: [("temp_max".to_owned(), "30".to_owned())].into(),
                ..ProductConfig::default()
            },
        );
        let running = common::start(&runtime, loaded);
        let ingest = running.ingest();
        let script = running
            .state()
            .scripts
            .get("json-sensor")
            .and_then(|p| p.script.clone())
            .expect("loaded");
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let target = script.stats().snapshot().calls + MESSAGES;
                    let started = Instant::now();
                    runtime.block_on(async {
                        for i in 0..MESSAGES {
                            let message = RawMessage {
                                device_id: format!("th-{}", i % DEVICES),
                                product: "json-sensor".into(),
                                topic: "devices/json-sensor/th/telemetry".into(),
                                payload: PAYLOAD.as_bytes().to_vec(),
                                received_at: now_ms(),
                                source: SourceKind::Internal,
                            };
                            ingest
                                .submit(Envelope::new(Inbound::Data(message)))
                                .await
                                .expect("pipeline open");
                        }
                        while script.stats().snapshot().calls < target {
                            tokio::task::yield_now().await;
                        }
                    });
                    total += started.elapsed();
                }
                total
            })
        });
        drop(ingest);
        runtime.block_on(running.stop());
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
