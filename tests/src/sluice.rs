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

    /// Starts the `sluice` binary as its own process on a free loopback
    /// port with `config` (TOML, without `[server]`) as `<name>.toml`, and
    /// waits until it answers `/health`.
    pub async fn spawn(&self, name: &str, config: &str) -> SluiceProcess {
        let port = crate::servers::free_port();
        let file = format!("{name}.toml");
        self.write(
            &file,
            &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{config}\n"),
        );
        launch(self.dir.path(), &["run", "--config", &file], port).await
    }

    /// Starts `sluice demo` as its own process on a free loopback port, on
    /// the built scripts of this site, and waits until it answers `/health`.
    pub async fn spawn_demo(&self) -> SluiceProcess {
        let port = crate::servers::free_port();
        let listen = format!("127.0.0.1:{port}");
        launch(
            self.dir.path(),
            &["demo", "--listen", &listen, "--scripts", "scripts"],
            port,
        )
        .await
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

    /// Why sluice does not start with `config`, every cause included.
    pub async fn start_error(&self, config: &str) -> String {
        let file = self.write("sluice.toml", config);
        let loaded = Config::load(&file).expect("the test configuration is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        match sluice::server::start(loaded, listener).await {
            Ok(_) => panic!("sluice started with {config}"),
            Err(error) => format!("{:#}", anyhow::Error::from(error)),
        }
    }
}

/// Runs the `sluice` binary with `args` in `dir` (it listens on `port`) and
/// waits until it answers `/health`.
async fn launch(dir: &Path, args: &[&str], port: u16) -> SluiceProcess {
    let child = std::process::Command::new(crate::build::sluice_bin())
        .args(args)
        .current_dir(dir)
        .env("SLUICE_CACHE_DIR", dir.join("cache"))
        // `SLUICE_CHILD_LOG=debug` (a `RUST_LOG` filter) shows more of the child's log.
        .env(
            "RUST_LOG",
            std::env::var("SLUICE_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the sluice binary starts");
    let process = SluiceProcess {
        child: Some(child),
        port,
    };
    let health = format!("{}/health", process.base_url());
    eventually(Duration::from_secs(60), "sluice to listen", || async {
        reqwest::get(&health)
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(drop)
    })
    .await;
    process
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

/// sluice running as a child process; killed when dropped.
#[derive(Debug)]
pub struct SluiceProcess {
    child: Option<std::process::Child>,
    port: u16,
}

impl SluiceProcess {
    /// Its HTTP base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The WebSocket URL of `path`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// Its resident set size in bytes (Linux).
    pub fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(kill.success(), "SIGTERM was not delivered");
        let mut child = self.child.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("the wait finishes")
            .expect("the exit status")
    }

    /// Kills it at once (SIGKILL): no cleanup of any kind.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How long the helpers below wait.
const SETTLE: Duration = Duration::from_secs(20);

/// Waits until every source of `running` is connected.
pub async fn sources_connected(running: &Running) {
    eventually(SETTLE, "the sources to connect", || async {
        running.sources().iter().all(|(_, up)| *up).then_some(())
    })
    .await;
}

/// Waits until `running`'s interest set says `device` is `watched` (or not).
pub async fn interest_is(running: &Running, device: &str, watched: bool) {
    let state = running.state().clone();
    eventually(SETTLE, "the interest set to follow", || async {
        (state.interest.is_watched(device) == watched).then_some(())
    })
    .await;
}

/// Reports a `temperature` of `device` through HTTP ingest of the
/// `json-sensor` product at `base`.
pub async fn report_temperature(base: &str, device: &str, temperature: f64) {
    report_temperature_as(base, None, device, temperature).await;
}

/// The same, with the API key `key` (`X-API-Key`) when given.
pub async fn report_temperature_as(base: &str, key: Option<&str>, device: &str, temperature: f64) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/api/v1/ingest/json-sensor/{device}"))
        .body(serde_json::json!({"temperature": temperature}).to_string());
    if let Some(key) = key {
        request = request.header("X-API-Key", key);
    }
    let response = request.send().await.expect("ingest answers");
    assert_eq!(response.status(), 202);
}

/// A registry file with `devices` of `product`.
pub fn registry_of(devices: &[String], product: &str) -> String {
    devices
        .iter()
        .map(|d| format!("[[devices]]\nid = \"{d}\"\nproduct = \"{product}\"\n"))
        .collect()
}

/// Reports each of `devices` once (`payload` of its index) through batch
/// ingest of `product` at `base`, a thousand per request.
pub async fn report_all(
    base: &str,
    product: &str,
    devices: &[String],
    payload: impl Fn(usize) -> serde_json::Value,
) {
    let http = reqwest::Client::new();
    for (start, chunk) in (0..).step_by(1000).zip(devices.chunks(1000)) {
        let batch: Vec<serde_json::Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, d)| serde_json::json!({"device_id": d, "payload": payload(start + i)}))
            .collect();
        let response = http
            .post(format!("{base}/api/v1/ingest/{product}"))
            .json(&batch)
            .send()
            .await
            .expect("batch ingest answers");
        assert_eq!(response.status(), 202, "batch ingest");
    }
}
