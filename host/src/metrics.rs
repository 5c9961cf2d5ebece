//! Metrics in Prometheus text format: one recorder per process, rendered
//! by `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process's Prometheus recorder, installed on first use. Several
/// pipelines in one process (tests) share it.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => handle,
            Err(error) => {
                // Another recorder is installed; render an empty registry.
                tracing::warn!(%error, "a metrics recorder is already installed; /metrics shows sluice's own only");
                PrometheusBuilder::new().build_recorder().handle()
            }
        })
        .clone()
}
