//! The script engine against real compiled scripts: hostile guests, in Rust
//! and in AssemblyScript, end in the right typed error within their limit and
//! the engine keeps serving; every example script passes its fixtures.

use std::time::Duration;

use bytesize::ByteSize;
use serde_json::json;
use sluice::message::{RawMessage, SourceKind};
use sluice::script::fixture::Fixtures;
use sluice::script::{
    CacheOutcome, CommandCall, EngineOptions, Limits, OutputKind, ScriptEngine, ScriptError,
    ScriptInstance, ScriptSettings,
};
use sluice_tests::build::{engine, example_script, example_scripts, guest};

fn message(payload: &str) -> RawMessage {
    RawMessage {
        device_id: "device-1".into(),
        product: "hostile".into(),
        topic: "devices/hostile/device-1/telemetry".into(),
        payload: payload.as_bytes().to_vec(),
        received_at: 1_732_262_400_000,
        source: SourceKind::Internal,
    }
}

/// The misbehaving guests: the same behaviours, by payload text, in Rust
/// and in AssemblyScript (wrapped into a component at load time).
const HOSTILE: [&str; 2] = ["hostile", "hostile-as"];

fn guest_with(name: &str, limits: Limits) -> ScriptInstance {
    let settings = ScriptSettings {
        limits,
        ..ScriptSettings::default()
    };
    engine()
        .load_file(name, &guest(name), settings)
        .unwrap_or_else(|e| panic!("{name} loads: {e}"))
        .instantiate()
        .unwrap_or_else(|e| panic!("{name} instantiates: {e}"))
}

fn hostile_with(limits: Limits) -> ScriptInstance {
    guest_with("hostile", limits)
}

/// A small memory cap, and a deadline long enough that only an endless
/// loop reaches it even when the tests share two busy cores (the deadline is
/// wall-clock time).
fn strict_limits() -> Limits {
    Limits {
        deadline: Duration::from_secs(5),
        memory: ByteSize::mib(8),
        ..Limits::default()
    }
}

/// The default settings with a deadline that two busy cores never reach
/// by accident, for tests about something other than time.
fn relaxed() -> ScriptSettings {
    ScriptSettings {
        limits: Limits {
            deadline: Duration::from_secs(5),
            ..Limits::default()
        },
        ..ScriptSettings::default()
    }
}

fn hostile() -> ScriptInstance {
    hostile_with(strict_limits())
}

/// After any failure the same instance object serves a good message.
fn assert_still_serves(instance: &mut ScriptInstance) {
    let outputs = instance
        .parse(&message("ok"))
        .expect("the next message is served");
    assert!(
        matches!(&outputs[0].kind, OutputKind::Telemetry { fields } if fields["ok"] == json!(true))
    );
}

#[test]
fn an_endless_loop_hits_the_deadline_and_the_next_message_is_served() {
    for name in HOSTILE {
        // Long enough that the good message after it is never cut short on
        // two busy cores; the endless loop reaches it all the same.
        let mut instance = guest_with(
            name,
            Limits {
                deadline: Duration::from_millis(250),
                ..strict_limits()
            },
        );
        let error = instance.parse(&message("loop")).unwrap_err();
        match &error {
            ScriptError::Timeout { script, limit } => {
                assert_eq!(script.product, name);
                assert_eq!(script.version.len(), 12);
                assert_eq!(*limit, Duration::from_millis(250));
            }
            other => panic!("{name}: expected a timeout, got {other}"),
        }
        assert!(error.to_string().contains("time limit of 250ms"), "{error}");
        assert_still_serves(&mut instance);
    }
}

#[test]
fn a_memory_bomb_hits_the_memory_cap() {
    for name in HOSTILE {
        let mut instance = guest_with(name, strict_limits());
        let error = instance.parse(&message("alloc")).unwrap_err();
        match &error {
            ScriptError::MemoryExceeded {
                requested, limit, ..
            } => {
                assert_eq!(*limit, 8 << 20);
                assert!(*requested > *limit);
            }
            other => panic!("{name}: expected the memory limit, got {other}"),
        }
        assert!(error.to_string().contains("memory limit"), "{error}");
        assert_still_serves(&mut instance);
    }
}

#[test]
fn an_assemblyscript_abort_is_a_trap_and_the_instance_is_replaced() {
    let mut instance = guest_with("hostile-as", strict_limits());
    let before = instance.script().stats().snapshot();
    match instance.parse(&message("panic")).unwrap_err() {
        ScriptError::Trap { trap, panic, .. } => {
            assert!(trap.contains("unreachable"), "{trap}");
            assert_eq!(panic, None);
        }
        other => panic!("expected a trap, got {other}"),
    }
    assert_still_serves(&mut instance);
    let after = instance.script().stats().snapshot();
    assert_eq!(after.traps, before.traps + 1);
    assert_eq!(after.instantiations, before.instantiations + 1);
}

#[test]
fn a_panic_is_a_trap_that_carries_the_panic_message() {
    let mut instance = hostile();
    let before = instance.script().stats().snapshot();
    let error = instance.parse(&message("panic")).unwrap_err();
    match &error {
        ScriptError::Trap {
            trap,
            panic,
            backtrace,
            ..
        } => {
            assert!(trap.contains("unreachable"), "{trap}");
            let panic = panic
                .as_deref()
                .expect("the panic message reaches the host");
            assert!(
                panic.contains("hostile script panics on purpose"),
                "{panic}"
            );
            assert!(backtrace.contains("hostile.wasm!"), "{backtrace}");
        }
        other => panic!("expected a trap, got {other}"),
    }
    assert!(error.discards_instance());
    assert_still_serves(&mut instance);
    let after = instance.script().stats().snapshot();
    assert_eq!(
        after.instantiations,
        before.instantiations + 1,
        "the poisoned instance was replaced"
    );
    assert_eq!(after.traps, before.traps + 1);
}

#[test]
fn a_stack_overflow_is_a_trap() {
    let mut instance = hostile();
    assert!(matches!(
        instance.parse(&message("stack")),
        Err(ScriptError::Trap { .. })
    ));
    assert_still_serves(&mut instance);
}

#[test]
fn huge_and_numerous_outputs_are_refused() {
    let mut instance = hostile();
    match instance.parse(&message("huge")).unwrap_err() {
        ScriptError::OutputTooLarge { size, limit, .. } => {
            assert!(size > 3_000_000, "{size}");
            assert_eq!(limit, 1 << 20);
        }
        other => panic!("expected output too large, got {other}"),
    }
    assert_still_serves(&mut instance);
    for name in HOSTILE {
        let mut instance = guest_with(name, strict_limits());
        match instance.parse(&message("many")).unwrap_err() {
            ScriptError::OutputTooLarge {
                count, max_count, ..
            } => {
                assert_eq!((count, max_count), (5000, 1000), "{name}");
            }
            other => panic!("{name}: expected too many outputs, got {other}"),
        }
        assert_still_serves(&mut instance);
    }
}

#[test]
fn wrong_outputs_are_refused_with_the_reason() {
    let mut instance = hostile();
    for (mode, reason) in [
        ("nan", "field \"t\": NaN is not a finite number"),
        ("bad-json", "field \"nested\": nested JSON does not parse"),
        ("empty-key", "a field has an empty key"),
        ("empty-event", "event name is empty"),
    ] {
        match instance.parse(&message(mode)).unwrap_err() {
            ScriptError::BadOutput {
                index, reason: got, ..
            } => {
                assert_eq!(index, 0);
                assert!(got.starts_with(reason), "{mode}: {got}");
            }
            other => panic!("{mode}: expected a bad output, got {other}"),
        }
    }
    assert_still_serves(&mut instance);
}

#[test]
fn a_script_sees_no_files_environment_or_arguments() {
    let mut instance = hostile();
    match instance.parse(&message("fs")).unwrap_err() {
        ScriptError::Rejected { code, .. } => assert_eq!(code, "fs-denied"),
        other => panic!("expected the script's own fs error, got {other}"),
    }
    let outputs = instance.parse(&message("env")).unwrap();
    let OutputKind::Telemetry { fields } = &outputs[0].kind else {
        panic!("expected telemetry")
    };
    assert_eq!(
        (fields["vars"].clone(), fields["args"].clone()),
        (json!(0), json!(0))
    );
}

#[test]
fn a_script_that_imports_sockets_does_not_load() {
    let error = engine()
        .load_file("net", &guest("net"), ScriptSettings::default())
        .unwrap_err();
    assert!(matches!(error, ScriptError::Link { .. }), "{error}");
    assert!(error.to_string().contains("wasi:sockets"), "{error}");
}

#[test]
fn a_component_of_another_world_does_not_load() {
    let error = engine()
        .load_file("wrong", &guest("wrong-world"), ScriptSettings::default())
        .unwrap_err();
    assert!(matches!(error, ScriptError::Link { .. }), "{error}");
    assert!(error.to_string().contains("parse"), "{error}");
}

#[test]
fn a_script_built_for_the_previous_world_is_refused_with_a_rebuild_hint() {
    let error = engine()
        .load_file("legacy", &guest("legacy"), ScriptSettings::default())
        .unwrap_err();
    assert!(matches!(error, ScriptError::Link { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("sluice:script/"), "{text}");
    assert!(text.contains("@0.1.0`"), "{text}");
    assert!(
        text.contains("must be rebuilt with the current one"),
        "{text}"
    );
}

#[test]
fn a_script_built_for_0_2_0_still_parses_and_does_not_accept_commands() {
    let mut instance = guest_with("v020", Limits::default());
    let outputs = instance
        .parse(&message("abcd"))
        .expect("a 0.2.0 script parses");
    let OutputKind::Telemetry { fields } = &outputs[0].kind else {
        panic!("telemetry: {outputs:?}")
    };
    assert_eq!(fields.get("bytes"), Some(&json!(4)));
    let error = instance.encode(&command("reset")).unwrap_err();
    assert!(matches!(error, ScriptError::NotSupported { .. }), "{error}");
}

#[test]
fn a_rust_script_without_encode_does_not_accept_commands() {
    let counter = example_script("counter");
    let mut instance = engine()
        .load_file("counter", &counter.wasm, ScriptSettings::default())
        .expect("counter loads")
        .instantiate()
        .expect("counter instantiates");
    let error = instance.encode(&command("reset")).unwrap_err();
    assert!(matches!(error, ScriptError::NotSupported { .. }), "{error}");
    assert!(
        error.to_string().contains("does not accept commands"),
        "{error}"
    );
}

#[test]
fn a_hostile_encode_ends_in_its_typed_error_and_the_instance_goes_on() {
    let mut instance = hostile_with(strict_limits());
    let cases: [(&str, &str); 10] = [
        ("loop", "timeout"),
        ("alloc", "memory"),
        ("panic", "trap"),
        ("none", "bad_output"),
        ("many", "bad_output"),
        ("bad-fport", "bad_output"),
        ("bad-qos", "bad_output"),
        ("wildcard", "bad_output"),
        ("huge", "output_too_large"),
        ("nope", "rejected"),
    ];
    for (name, kind) in cases {
        let error = instance.encode(&command(name)).unwrap_err();
        assert_eq!(error.kind(), kind, "{name}: {error}");
        // Every failure leaves a working script behind, for commands and
        // for messages.
        assert_eq!(
            instance.encode(&command("ok")).expect("ok encodes")[0].payload,
            b"ok"
        );
        assert!(instance.parse(&message("ok")).is_ok(), "{name}");
    }
    let error = instance.encode(&command("panic")).unwrap_err();
    assert!(error.to_string().contains("panics in encode"), "{error}");
}

fn command(name: &str) -> CommandCall {
    CommandCall {
        id: "c-1".into(),
        device_id: "device-1".into(),
        product: "p".into(),
        name: name.into(),
        params: "{}".into(),
        issued_at: 1_732_262_400_000,
    }
}

#[test]
fn files_that_are_not_components_are_refused() {
    let engine = engine();
    // A core module is wrapped into a component only when it implements
    // the world; an empty one does not.
    let core_module = b"\0asm\x01\x00\x00\x00";
    let error = engine
        .load("core", core_module, ScriptSettings::default())
        .unwrap_err();
    assert!(matches!(error, ScriptError::Compile { .. }));
    assert!(
        error
            .to_string()
            .contains("does not implement the `sluice:script/script` world"),
        "{error}"
    );
    let error = engine
        .load("junk", b"hello world", ScriptSettings::default())
        .unwrap_err();
    assert!(
        error.to_string().contains("not a WebAssembly file"),
        "{error}"
    );
    let mut truncated = std::fs::read(&example_script("json-sensor").wasm).unwrap();
    truncated.truncate(truncated.len() / 2);
    let error = engine
        .load("cut", &truncated, ScriptSettings::default())
        .unwrap_err();
    assert!(matches!(error, ScriptError::Compile { .. }), "{error}");
}

#[test]
fn an_initial_memory_over_the_cap_fails_at_load() {
    let settings = ScriptSettings {
        limits: Limits {
            memory: ByteSize::kib(64),
            ..Limits::default()
        },
        ..ScriptSettings::default()
    };
    let error = engine()
        .load_file("hostile", &guest("hostile"), settings)
        .unwrap_err();
    assert!(matches!(error, ScriptError::Instantiate { .. }), "{error}");
    assert!(
        error.to_string().contains("over the limit of 65536 bytes"),
        "{error}"
    );
}

#[test]
fn state_writes_of_a_trapped_call_are_discarded() {
    let mut instance = hostile();
    assert!(instance.parse(&message("state-then-panic")).is_err());
    let outputs = instance.parse(&message("state-read")).unwrap();
    let OutputKind::Telemetry { fields } = &outputs[0].kind else {
        panic!("expected telemetry")
    };
    assert_eq!(fields["state"], json!(null));
}

#[test]
fn oversized_state_is_refused_by_the_host() {
    let mut instance = hostile();
    match instance.parse(&message("state-big")).unwrap_err() {
        ScriptError::Rejected { code, message, .. } => {
            assert_eq!(code, "state-too-large");
            assert!(message.contains("the limit is 4096"), "{message}");
        }
        other => panic!("expected the state limit, got {other}"),
    }
}

#[test]
fn log_spam_is_cut_to_the_budget_without_failing_the_call() {
    // A generous deadline: this test is about the log budget, not time.
    let mut instance = hostile_with(Limits {
        deadline: Duration::from_secs(10),
        log_lines: 5,
        ..Limits::default()
    });
    assert_eq!(instance.parse(&message("log-spam")).unwrap(), vec![]);
    assert_eq!(
        instance.script().stats().snapshot().logs_dropped,
        10_000 - 5
    );
    assert_still_serves(&mut instance);
}

#[test]
fn a_batch_gives_what_single_calls_give_even_when_one_message_traps() {
    let modes = ["ok", "nan", "panic", "ok", "unknown", "loop", "ok"];
    let batch: Vec<RawMessage> = modes.iter().map(|m| message(m)).collect();
    let mut batched = hostile();
    let mut single = hostile();
    let batch_results = batched.parse_batch(&batch);
    assert_eq!(batch_results.len(), modes.len());
    for (i, (got, message)) in batch_results.iter().zip(&batch).enumerate() {
        let expected = single.parse(message);
        match (got, &expected) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "message {i}"),
            (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind(), "message {i}: {a} vs {b}"),
            _ => panic!("message {i}: batch {got:?} vs single {expected:?}"),
        }
    }
    let kinds: Vec<&str> = batch_results
        .iter()
        .map(|r| r.as_ref().map_or_else(ScriptError::kind, |_| "ok"))
        .collect();
    assert_eq!(
        kinds,
        [
            "ok",
            "bad_output",
            "trap",
            "ok",
            "rejected",
            "timeout",
            "ok"
        ]
    );
}

#[test]
fn a_batch_of_good_messages_is_one_call() {
    let script = engine()
        .load_file(
            "json-sensor",
            &example_script("json-sensor").wasm,
            relaxed(),
        )
        .unwrap();
    let mut instance = script.instantiate().unwrap();
    let messages: Vec<RawMessage> = (0..32)
        .map(|i| RawMessage {
            payload: format!(r#"{{"temperature": {i}}}"#).into_bytes(),
            ..message("")
        })
        .collect();
    let results = instance.parse_batch(&messages);
    for (i, result) in results.iter().enumerate() {
        let outputs = result.as_ref().unwrap();
        assert!(
            matches!(&outputs[0].kind, OutputKind::Telemetry { fields } if fields["temperature"] == json!(i))
        );
    }
    assert_eq!(script.stats().snapshot().calls, 32);
}

#[test]
fn every_example_script_passes_its_fixtures() {
    let engine = engine();
    for script in example_scripts() {
        let fixtures_path = script
            .crate_dir
            .join(format!("{}.examples.json", script.name));
        let fixtures = Fixtures::load(&fixtures_path).unwrap();
        assert!(
            !fixtures.examples.is_empty(),
            "{} has examples",
            script.name
        );
        let settings = ScriptSettings {
            params: fixtures.params.clone(),
            ..relaxed()
        };
        let loaded = engine
            .load_file(&script.name, &script.wasm, settings)
            .unwrap();
        let mut instance = loaded.instantiate().unwrap();
        for report in fixtures.run(&mut instance, &script.name) {
            assert!(
                report.passed(),
                "{} / {}: {:?}",
                script.name,
                report.name,
                report.failures
            );
        }
    }
    let names: Vec<&str> = example_scripts().iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "json-sensor",
        "lht65",
        "gateway",
        "counter",
        "thermostat-as",
    ] {
        assert!(names.contains(&expected), "{expected} is built: {names:?}");
    }
}

#[test]
fn compiled_scripts_are_cached_by_content_and_a_broken_artifact_is_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let engine = || {
        ScriptEngine::new(&EngineOptions {
            cache_dir: Some(cache.path().to_path_buf()),
            ..EngineOptions::default()
        })
        .unwrap()
    };
    let wasm = std::fs::read(&example_script("counter").wasm).unwrap();
    let first = engine().load("counter", &wasm, relaxed()).unwrap();
    assert_eq!(first.info().cache, CacheOutcome::Compiled);
    let second = engine().load("counter", &wasm, relaxed()).unwrap();
    assert_eq!(second.info().cache, CacheOutcome::Hit);
    assert_eq!(first.id(), second.id());

    for entry in std::fs::read_dir(cache.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not an artifact").unwrap();
    }
    let third = engine().load("counter", &wasm, relaxed()).unwrap();
    assert_eq!(third.info().cache, CacheOutcome::Compiled);
    let mut instance = third.instantiate().unwrap();
    let outputs = instance
        .parse(&RawMessage {
            payload: br#"{"total": 5}"#.to_vec(),
            ..message("")
        })
        .unwrap();
    assert_eq!(outputs.len(), 1);
}

#[test]
fn the_pooling_allocator_runs_scripts_too() {
    let engine = ScriptEngine::new(&EngineOptions {
        cache: false,
        pooling: true,
        pool_instances: 8,
        ..EngineOptions::default()
    })
    .unwrap();
    let script = engine
        .load_file("hostile", &guest("hostile"), relaxed())
        .unwrap();
    let mut instance = script.instantiate().unwrap();
    for _ in 0..20 {
        assert!(instance.parse(&message("panic")).is_err());
        assert_still_serves(&mut instance);
    }
}
