//! AssemblyScript scripts through the same engine as Rust ones: state and
//! errors cross the boundary, guest memory does not leak across calls, and
//! the example runs in the pipeline. (The limits are proven for both
//! languages by the hostile-guest tests in `engine.rs`.)

use std::time::Duration;

use bytesize::ByteSize;
use serde_json::json;
use sluice::message::{RawMessage, SourceKind};
use sluice::script::{Limits, OutputKind, ScriptError, ScriptInstance, ScriptSettings};
use sluice_tests::build::{engine, example_script, guest, repo_root};
use sluice_tests::sluice::{Site, base_url, eventually};

fn message(device: &str, payload: &[u8]) -> RawMessage {
    RawMessage {
        device_id: device.into(),
        product: "hostile-as".into(),
        topic: format!("devices/hostile-as/{device}/telemetry"),
        payload: payload.to_vec(),
        received_at: 1_732_262_400_000,
        source: SourceKind::Internal,
    }
}

fn hostile() -> ScriptInstance {
    engine()
        .load_file(
            "hostile-as",
            &guest("hostile-as"),
            ScriptSettings {
                limits: sluice::script::Limits {
                    deadline: std::time::Duration::from_secs(5),
                    ..sluice::script::Limits::default()
                },
                ..ScriptSettings::default()
            },
        )
        .expect("the AssemblyScript module is wrapped and loads")
        .instantiate()
        .expect("it instantiates")
}

#[test]
fn assemblyscript_state_and_errors_cross_the_boundary() {
    let mut instance = hostile();
    let count = |instance: &mut ScriptInstance, device: &str| {
        let outputs = instance.parse(&message(device, b"state")).unwrap();
        match &outputs[0].kind {
            OutputKind::Telemetry { fields } => fields["count"].clone(),
            other => panic!("expected telemetry, got {other:?}"),
        }
    };
    assert_eq!(count(&mut instance, "a"), json!(1));
    assert_eq!(count(&mut instance, "a"), json!(2));
    assert_eq!(count(&mut instance, "b"), json!(1));
    match instance.parse(&message("a", b"what")).unwrap_err() {
        ScriptError::Rejected { code, message, .. } => {
            assert_eq!(code, "unknown-behaviour");
            assert_eq!(message, "no behaviour named what");
        }
        other => panic!("expected the script's error, got {other}"),
    }
}

#[test]
fn objects_a_script_keeps_survive_the_runtimes_arena() {
    // The SDK's runtime bumps a call's objects off an arena and starts the
    // arena over when nothing in it is reachable. `keep` keeps a string and
    // a pushed-to array of every call in globals, so arenas keep holding
    // survivors; `many` (5,000 outputs, which the host refuses) needs more
    // than an arena holds.
    // Every kept object must still hold its bytes, call after call.
    let mut instance = hostile();
    let telemetry = |instance: &mut ScriptInstance, what: &str| {
        let outputs = instance
            .parse(&message("a", what.as_bytes()))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        match &outputs[0].kind {
            OutputKind::Telemetry { fields } => fields.clone(),
            other => panic!("expected telemetry, got {other:?}"),
        }
    };
    let mut keeps = 0;
    for i in 0..800 {
        if i % 97 == 1 {
            // The host refuses the 5,000 outputs; the guest built them all.
            let refused = instance.parse(&message("a", b"many")).unwrap_err();
            assert!(
                matches!(refused, ScriptError::OutputTooLarge { count: 5000, .. }),
                "{refused}"
            );
        } else {
            keeps += 1;
            assert_eq!(telemetry(&mut instance, "keep")["kept"], json!(keeps));
        }
        if i % 50 == 0 {
            let kept = telemetry(&mut instance, "kept");
            assert_eq!(kept["kept"], json!(keeps), "after call {i}");
            assert_eq!(kept["intact"], json!(true), "after call {i}");
        }
    }
    let kept = telemetry(&mut instance, "kept");
    assert_eq!(kept["intact"], json!(true));
    assert_eq!(kept["kept"], json!(keeps));
}

#[test]
fn many_calls_do_not_leak_guest_memory() {
    // Every call allocates the message and the result in guest memory;
    // both are freed, so 20,000 calls fit in a 2 MiB cap.
    let settings = ScriptSettings {
        limits: Limits {
            memory: ByteSize::mib(2),
            // About memory, not time: no wall-clock deadline on busy cores.
            deadline: Duration::from_secs(5),
            ..Limits::default()
        },
        ..ScriptSettings::default()
    };
    let script = engine()
        .load_file(
            "thermostat-as",
            &example_script("thermostat-as").wasm,
            settings,
        )
        .unwrap();
    let mut instance = script.instantiate().unwrap();
    let frame = [0x01, 0x08, 0x98, 0x08, 0x34, 0x2d, 0x11, 0x4b];
    for i in 0..20_000 {
        let device = format!("trv-{}", i % 500);
        instance
            .parse(&message(&device, &frame))
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert_eq!(script.stats().snapshot().traps, 0);
}

#[test]
fn an_assemblyscript_batch_gives_what_single_calls_give() {
    // 300 frames in one call need more than the runtime's first arena, so
    // the batch also runs across the arena's overflow and regrowth; state
    // written by one message is read by the next of the same device.
    let load = || {
        engine()
            .load_file(
                "thermostat-as",
                &example_script("thermostat-as").wasm,
                ScriptSettings::default(),
            )
            .unwrap()
            .instantiate()
            .unwrap()
    };
    let (mut batched, mut single) = (load(), load());
    let messages: Vec<RawMessage> = (0..300u32)
        .map(|i| {
            let mode = (i % 4) as u8 | if i % 3 == 0 { 0x10 } else { 0 };
            let frame = [
                0x01,
                0x08,
                0x98,
                0x08,
                0x34,
                0x2d,
                mode,
                10 + (i % 90) as u8,
            ];
            RawMessage {
                product: "thermostat-as".into(),
                ..message(&format!("trv-{}", i % 7), &frame)
            }
        })
        .collect();
    for round in 0..3 {
        let results = batched.parse_batch(&messages);
        assert_eq!(results.len(), messages.len());
        for (i, (got, message)) in results.iter().zip(&messages).enumerate() {
            let expected = single.parse(message).unwrap();
            assert_eq!(
                got.as_ref().unwrap(),
                &expected,
                "round {round}, message {i}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assemblyscript_example_runs_in_the_pipeline() {
    let site = Site::with_scripts(&["thermostat-as"]);
    let running = site
        .start("[products.thermostat-as]\nparams = { battery_low = \"20\" }\nlimits = { deadline = \"5s\" }")
        .await;
    let base = base_url(&running);
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/api/v1/ingest/thermostat-as/trv-7"))
        .body(vec![0x01, 0x07, 0xd0, 0x08, 0x34, 0x32, 0x33, 0x0a])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let device = eventually(Duration::from_secs(10), "trv-7's latest values", || {
        let client = client.clone();
        let url = format!("{base}/api/v1/devices/trv-7");
        async move {
            let response = client.get(url).send().await.ok()?;
            let body: serde_json::Value = response.json().await.ok()?;
            body["latest"]["telemetry"].is_object().then_some(body)
        }
    })
    .await;
    let telemetry = &device["latest"]["telemetry"];
    assert_eq!(telemetry["temperature"], json!(20.0));
    assert_eq!(telemetry["mode"], json!("auto"));
    assert_eq!(telemetry["window_open"], json!(true));
    assert_eq!(telemetry["battery"], json!(10));

    let scripts: serde_json::Value = client
        .get(format!("{base}/api/v1/scripts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = scripts.to_string();
    assert!(text.contains("thermostat-as"), "{text}");
    running.stop().await;
}

#[test]
fn the_assemblyscript_json_sensor_shares_the_rust_scripts_fixtures() {
    let root = repo_root();
    let rust = std::fs::read_to_string(root.join("scripts/json-sensor/json-sensor.examples.json"))
        .expect("the Rust fixtures");
    let assemblyscript =
        std::fs::read_to_string(root.join("scripts/json-sensor-as/json-sensor-as.examples.json"))
            .expect("the AssemblyScript fixtures");
    assert_eq!(
        rust, assemblyscript,
        "the two json-sensor scripts must pass the same examples"
    );
}
