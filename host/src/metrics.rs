//! Metrics in Prometheus text format: one recorder per process, rendered
//! by `GET /metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of every `*_seconds` histogram: 1 µs to 1 s, for script calls
/// (microseconds) as well as deliveries (milliseconds).
const SECONDS_BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
];

fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .expect("the bucket list is not empty")
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes `/metrics` (until then they wait in lock-free queues).
const UPKEEP: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on first use. Several
/// pipelines in one process (tests) share it. Install it before anything
/// registers a metric: a handle taken before is a no-op for good.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = match builder().install_recorder() {
                Ok(handle) => handle,
                Err(error) => {
                    // Another recorder is installed; render an empty registry.
                    tracing::warn!(%error, "a metrics recorder is already installed; /metrics shows sluice's own only");
                    builder().build_recorder().handle()
                }
            };
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("sluice-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start the metrics upkeep thread; histograms are folded at each scrape only");
            }
            handle
        })
        .clone()
}
