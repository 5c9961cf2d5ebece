//! Running sluice in the test process: a scripts directory with the
//! example scripts, a configuration file, and the HTTP API on a free port.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice::config::Config;
use sluice::server::Running;

use crate::build::example_script;

/// A directory with `scripts/<product>.wasm` for the named example
/// scripts, where tests write `sluice.toml` and `devices.toml`.
#[derive(Debug)]
pub struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    /// A site with the example scripts `products`, each under its own name.
    pub fn with_scripts(products: &[&str]) -> Self {
        Self::with_renamed(&products.iter().map(|p| (*p, *p)).collect::<Vec<_>>())
    }

    /// A site where example script `script` serves product `product`.
    pub fn with_renamed(scripts: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let scripts_dir = dir.path().join("scripts");
        std::fs::create_dir_all(&scripts_dir).expect("create the scripts directory");
        for (product, script) in scripts {
            std::fs::copy(
                &example_script(script).wasm,
                scripts_dir.join(format!("{product}.wasm")),
            )
            .expect("copy an example script");
        }
        Site { dir }
    }

    /// The site directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name` in the site directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write a site file");
        path
    }

    /// Starts sluice in this process with `config` (TOML) as `sluice.toml`.
    /// The compiled-script cache lives in the site, so tests share nothing.
    /// Logs go to stderr when `TEST_LOG` is set (`RUST_LOG` filters them).
    pub async fn start(&self, config: &str) -> Running {
        if std::env::var_os("TEST_LOG").is_some() {
            sluice::cli::init_logging(sluice::cli::LogFormat::Text, "info");
        }
        let config = format!("{config}\n");
        let file = self.write("sluice.toml", &config);
        let mut loaded = Config::load(&file).expect("the test configuration is valid");
        loaded.config.scripts.engine.cache_dir = Some(self.dir.path().join("cache"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        sluice::server::start(loaded, listener)
            .await
            .expect("sluice starts")
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The base URL of a running sluice's HTTP API.
pub fn base_url(running: &Running) -> String {
    format!("http://{}", running.addr())
}

/// The WebSocket URL of `path` on a running sluice.
pub fn ws_url(running: &Running, path: &str) -> String {
    format!("ws://{}{path}", running.addr())
}
