//! A real browser for dashboard tests: Debian's headless Chromium driven by
//! ChromeDriver over the W3C WebDriver protocol (plain JSON over HTTP).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::servers::{ChildGuard, free_port};
use crate::sluice::eventually;

/// Where Debian's packages `chromium` and `chromium-driver` put them.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A ChromeDriver process with one headless Chromium session; both end on
/// drop (the session is closed, then ChromeDriver's whole process group,
/// Chromium included, is killed), on a panic too.
#[derive(Debug)]
pub struct Browser {
    _driver: ChildGuard,
    port: u16,
    session: String,
    base: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts ChromeDriver on a free loopback port and opens a session.
    pub async fn start() -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).is_file(),
                "{binary} is missing: install Debian's chromium and chromium-driver (tests/run.sh does)"
            );
        }
        let port = free_port();
        let driver = ChildGuard::spawn(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            true,
        )
        .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let status = format!("{base}/status");
        eventually(Duration::from_secs(20), "chromedriver to answer", || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                let body: Value = http.get(status).send().await.ok()?.json().await.ok()?;
                (body["value"]["ready"] == true).then_some(())
            }
        })
        .await;
        let profile = tempfile::tempdir().expect("a profile directory");
        // The flags keep Chromium off the network it cannot reach here.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let created = answer(http.post(format!("{base}/session")).json(
            &json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }}}),
        ))
        .await;
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Browser {
            _driver: driver,
            port,
            session,
            base,
            http,
            _profile: profile,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let request = self.http.request(method.clone(), url);
        // ChromeDriver refuses a body on GET.
        let request = if method == reqwest::Method::GET {
            request
        } else {
            request.json(&body)
        };
        let answer = answer(request).await;
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    /// Opens `url`.
    pub async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "url", json!({"url": url}))
            .await;
    }

    /// Runs `script` (a function body) in the page and returns its result.
    pub async fn eval(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Saves a screenshot of the page as PNG at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let encoded = self
            .command(reqwest::Method::GET, "screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("valid base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the artifact directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

/// Sends a WebDriver request and returns ChromeDriver's JSON answer.
async fn answer(request: reqwest::RequestBuilder) -> Value {
    request
        .send()
        .await
        .expect("chromedriver answers")
        .json()
        .await
        .expect("a JSON answer")
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask ChromeDriver to quit Chromium (a blocking request: Drop cannot
        // await); the process group is killed after it either way.
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            self.session
        );
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        if let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            if stream.write_all(request.as_bytes()).is_ok() {
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
            }
        }
    }
}
