//! The `sluice script` commands as a user runs them.

use std::path::Path;

use serde_json::json;
use sluice_tests::build::{example_script, example_scripts, guest, repo_root, scratch_dir};
use sluice_tests::cli::sluice;

const LHT65_UPLINK: &str =
    r#"{"fPort": 2, "data": "y/YLDQN2AQrdf/8=", "deviceInfo": {"devEui": "a84041000181c061"}}"#;

#[test]
fn script_test_decodes_the_lht65_vendor_example() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("uplink.json");
    std::fs::write(&input, LHT65_UPLINK).unwrap();
    let wasm = example_script("lht65").wasm.to_str().unwrap().to_owned();
    let run = sluice(
        dir.path(),
        &["script", "test", &wasm, "--input", "uplink.json"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let printed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        printed,
        json!([{
            "type": "telemetry",
            "device_id": "a84041000181c061",
            "fields": {
                "BatV": 3.062,
                "Bat_status": 3,
                "TempC_SHT": 28.29,
                "Hum_SHT": 88.6,
                "Ext_sensor": "Temperature Sensor",
                "TempC_DS": 27.81
            }
        }])
    );
}

#[test]
fn script_test_reports_a_script_error_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("uplink.json"),
        r#"{"fPort": 3, "data": "y/YLDQN2AQrdf/8="}"#,
    )
    .unwrap();
    let wasm = example_script("lht65").wasm.to_str().unwrap().to_owned();
    let run = sluice(
        dir.path(),
        &["script", "test", &wasm, "--input", "uplink.json"],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("unknown-fport: unknown FPort 3"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("lht65@"),
        "the error names the script version: {}",
        run.stderr
    );
}

#[test]
fn script_test_takes_hex_input_params_and_device() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("in.hex"),
        "7b 22 74 65 6d 70 65 72 61 74 75 72 65 22 3a 20 33 35 7d",
    )
    .unwrap();
    let wasm = example_script("json-sensor")
        .wasm
        .to_str()
        .unwrap()
        .to_owned();
    let run = sluice(
        dir.path(),
        &[
            "script",
            "test",
            &wasm,
            "--input",
            "in.hex",
            "--hex",
            "--param",
            "temp_max=30",
            "--device",
            "th-9",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let printed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(printed[0]["fields"], json!({"temperature": 35}));
    assert_eq!(printed[1]["type"], "alert");
    assert_eq!(
        printed[1]["description"],
        "temperature 35 is above the limit 30"
    );
}

#[test]
fn script_check_passes_every_example_script_from_source() {
    let run = sluice(&repo_root(), &["script", "check", "scripts"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    for name in [
        "json-sensor@",
        "lht65@",
        "gateway@",
        "counter@",
        "thermostat@",
        "json-sensor-as@",
        "thermostat-as@",
    ] {
        assert!(
            run.stdout.contains(name),
            "{name} missing from:\n{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("7 script(s)"), "{}", run.stdout);
    assert!(run.stdout.contains(" 0 failed"), "{}", run.stdout);
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
}

/// A runtime scripts directory: `<product>.wasm` beside `<product>.examples.json`.
fn runtime_dir(dir: &Path) {
    for script in example_scripts() {
        std::fs::copy(&script.wasm, dir.join(format!("{}.wasm", script.name)))
            .expect("copy the script");
        let fixtures = script
            .crate_dir
            .join(format!("{}.examples.json", script.name));
        std::fs::copy(fixtures, dir.join(format!("{}.examples.json", script.name)))
            .expect("copy the fixtures");
    }
}

#[test]
fn script_check_runs_a_runtime_directory_and_shows_a_diff_per_failure() {
    let dir = tempfile::tempdir().unwrap();
    runtime_dir(dir.path());
    let run = sluice(dir.path(), &["script", "check", "."]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);

    let fixtures = dir.path().join("lht65.examples.json");
    let text = std::fs::read_to_string(&fixtures).unwrap();
    std::fs::write(&fixtures, text.replacen("27.81", "27.8", 1)).unwrap();
    let run = sluice(dir.path(), &["script", "check", "lht65.wasm"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout
            .contains("FAIL  vendor example: DS18B20 probe (Ext 1)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("outputs[0].fields.TempC_DS: expected 27.8, got 27.81"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("23 passed, 1 failed"), "{}", run.stdout);
}

#[test]
fn script_check_reports_a_script_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(guest("net"), dir.path().join("net.wasm")).unwrap();
    std::fs::write(
        dir.path().join("net.examples.json"),
        r#"{"examples": [{"name": "x", "payload_text": "127.0.0.1:1", "expect": []}]}"#,
    )
    .unwrap();
    let run = sluice(dir.path(), &["script", "check", "."]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("does not fit the sluice:script world"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("1 script(s) did not load"),
        "{}",
        run.stdout
    );
}

#[test]
fn script_new_scaffolds_a_crate_that_builds_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("scripts");
    std::fs::create_dir_all(workspace.join(".cargo")).unwrap();
    std::fs::copy(
        repo_root().join("scripts/.cargo/config.toml"),
        workspace.join(".cargo/config.toml"),
    )
    .unwrap();
    let sdk = repo_root().join("guest-sdk");
    std::fs::write(
        workspace.join("Cargo.toml"),
        format!(
            "[workspace]\nresolver = \"3\"\nmembers = []\n\n[workspace.dependencies]\nsluice-guest = {{ path = {:?} }}\n",
            sdk.display().to_string()
        ),
    )
    .unwrap();

    let run = sluice(dir.path(), &["script", "new", "door-sensor"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("added door-sensor to the workspace"),
        "{}",
        run.stdout
    );

    // Share a target directory between runs so the SDK's dependencies
    // are not rebuilt every time.
    let target = scratch_dir().join("scaffold-target");
    let status = std::process::Command::new(sluice_tests::build::sluice_bin())
        .args(["script", "check", "scripts"])
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", &target)
        .env("SLUICE_CACHE_DIR", dir.path().join("cache"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(stdout.contains("door-sensor@"), "{stdout}");
    assert!(
        stdout.contains("6 example(s): 6 passed, 0 failed"),
        "{stdout}"
    );

    let run = sluice(dir.path(), &["script", "new", "door-sensor"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);
}

#[test]
fn script_new_scaffolds_an_assemblyscript_project_that_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = repo_root().join("guest-sdk");
    let sdk = sdk.to_str().unwrap();
    let run = sluice(
        dir.path(),
        &[
            "script",
            "new",
            "valve",
            "--lang",
            "assemblyscript",
            "--dir",
            ".",
            "--sdk",
            sdk,
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("created"), "{}", run.stdout);

    let run = sluice(dir.path(), &["script", "check", "valve"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("valve@"), "{}", run.stdout);
    assert!(
        run.stdout.contains("5 example(s): 5 passed, 0 failed"),
        "{}",
        run.stdout
    );
}
