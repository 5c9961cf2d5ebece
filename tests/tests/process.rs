//! sluice as a process: example configurations check out, and SIGTERM
//! drains every accepted message before exit.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use sluice::config::Config;
use sluice::devices::DeviceRegistry;
use sluice_tests::build::{example_scripts, repo_root, scratch_dir, sluice_bin};
use sluice_tests::servers::RedisServer;
use sluice_tests::sluice::Site;

#[test]
fn every_example_configuration_loads() {
    let examples = repo_root().join("examples");
    for file in [
        "quickstart.toml",
        "cluster/sluice-a.toml",
        "cluster/sluice-b.toml",
    ] {
        let loaded = Config::load(&examples.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let registry = loaded
            .config
            .registry
            .file
            .as_ref()
            .expect("the examples name a registry");
        assert!(DeviceRegistry::load(registry).unwrap().len() >= 5, "{file}");
    }
}

#[test]
fn sluice_check_reports_a_valid_configuration_and_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let examples = repo_root().join("examples");
    std::fs::copy(
        examples.join("quickstart.toml"),
        dir.path().join("sluice.toml"),
    )
    .unwrap();
    std::fs::copy(
        examples.join("devices.toml"),
        dir.path().join("devices.toml"),
    )
    .unwrap();
    // Build the example scripts into the site as sluice would run them
    // (into the harness's target directory, so nothing is rebuilt).
    example_scripts();
    let build = Command::new(sluice_bin())
        .args(["script", "build"])
        .arg(repo_root().join("scripts"))
        .arg("--out")
        .arg(dir.path().join("scripts"))
        .env("CARGO_TARGET_DIR", scratch_dir().join("scripts"))
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    assert!(dir.path().join("scripts/lht65.wasm").is_file());
    assert!(dir.path().join("scripts/lht65.examples.json").is_file());

    let check = |dir: &Path| {
        Command::new(sluice_bin())
            .args(["check", "--config", "sluice.toml"])
            .current_dir(dir)
            .env("SLUICE_CACHE_DIR", dir.join("cache"))
            .output()
            .unwrap()
    };
    let ok = check(dir.path());
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(stdout.contains("product lht65: lht65@"), "{stdout}");
    assert!(stdout.contains("6 device(s)"), "{stdout}");

    let config = std::fs::read_to_string(dir.path().join("sluice.toml")).unwrap();
    std::fs::write(
        dir.path().join("sluice.toml"),
        config.replace("qos = 1", "qos = \"one\""),
    )
    .unwrap();
    let bad = check(dir.path());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr.contains(
            "sluice.toml: key `sources.mqtt[0].qos`: invalid type: string \"one\", expected u8"
        ),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_accepted_message() {
    let redis = RedisServer::start();
    let site = Site::with_scripts(&["json-sensor"]);
    let sluice = site
        .spawn(
            "sluice",
            &format!(
                "[bus.redis]\nurl = \"{}\"\n[records.redis_stream]\nkey = \"sluice:records\"\n[sources.http]\nmax_body = \"8 MiB\"\nmax_batch = 5000\n[workers]\ncount = 1\n",
                redis.url()
            ),
        )
        .await;
    let base = sluice.base_url();

    let batch: Vec<Value> = (0..3000)
        .map(|i| json!({"device_id": format!("d-{i}"), "payload": {"n": i}}))
        .collect();
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/ingest/json-sensor"))
        .body(Value::Array(batch).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    // Stop at once: the queue still holds most of the batch.
    let status = sluice.terminate().await;
    assert!(
        status.success(),
        "sluice exits cleanly on SIGTERM: {status}"
    );

    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let records: i64 = redis::cmd("XLEN")
        .arg("sluice:records")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        records, 3000,
        "every accepted message was processed and its record written"
    );
}
