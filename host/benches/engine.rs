//! Engine throughput: the `json-sensor` script on a ~150-byte payload,
//! through WebAssembly (one call per message, and batches) against the same
//! Rust source compiled natively, in one process, and the same script in
//! AssemblyScript; and the thermostat script in Rust against the same
//! script in AssemblyScript.
//!
//! Run with: `cargo bench -p sluice --bench engine`

use std::time::Duration;

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::message::{RawMessage, SourceKind};
use sluice::script::{
    EngineOptions, Fields, Output, OutputKind, Params, Script, ScriptEngine, ScriptSettings,
    Severity,
};

/// A typical sensor report: 152 bytes.
const PAYLOAD: &str = r#"{"ts":1732262400000,"temperature":21.57,"humidity":48.2,"pressure":1013.25,"battery":3.61,"rssi":-67,"status":"ok","firmware":"1.4.2","door_open":false}"#;

const BATCH: usize = 32;

fn message() -> RawMessage {
    RawMessage {
        device_id: "th-0001".into(),
        product: "json-sensor".into(),
        topic: "devices/json-sensor/th-0001/telemetry".into(),
        payload: PAYLOAD.as_bytes().to_vec(),
        received_at: 1_732_262_400_000,
        source: SourceKind::Mqtt,
    }
}

fn params() -> Params {
    [("temp_max".to_owned(), "30".to_owned())].into()
}

/// `json-sensor` (Rust) or `json-sensor-as` (AssemblyScript), with `temp_max = 30`.
fn load(engine: &ScriptEngine, product: &str) -> Script {
    let wasm = common::example_script(product);
    let settings = ScriptSettings {
        params: params(),
        ..ScriptSettings::default()
    };
    engine
        .load_file(product, &wasm, settings)
        .unwrap_or_else(|e| panic!("{product} loads: {e}"))
}

/// What the host does with a script's outputs after a call (checks and
/// conversion to its own types), done on the native script's outputs so
/// both sides end with the same values.
fn to_host(output: sluice_guest::Output) -> Output {
    use sluice_guest::{OutputKind as G, Value as V};
    let value = |v: V| match v {
        V::Null => serde_json::Value::Null,
        V::Boolean(b) => b.into(),
        V::Integer(i) => i.into(),
        V::Float(f) => serde_json::Number::from_f64(f).expect("finite").into(),
        V::Text(s) => s.into(),
        V::Json(text) => serde_json::from_str(&text).expect("valid JSON"),
    };
    let fields = |fields: Vec<sluice_guest::Field>| -> Fields {
        fields
            .into_iter()
            .map(|f| (f.key, value(f.value)))
            .collect()
    };
    let kind = match output.kind {
        G::Telemetry(f) => OutputKind::Telemetry { fields: fields(f) },
        G::Attributes(f) => OutputKind::Attributes { fields: fields(f) },
        G::Event(e) => OutputKind::Event {
            name: e.name,
            fields: fields(e.fields),
        },
        G::Alert(a) => OutputKind::Alert {
            severity: match a.severity {
                sluice_guest::Severity::Info => Severity::Info,
                sluice_guest::Severity::Warning => Severity::Warning,
                sluice_guest::Severity::Critical => Severity::Critical,
            },
            title: a.title,
            description: a.description,
        },
        G::Status(online) => OutputKind::Status { online },
        G::Reply(r) => OutputKind::Reply {
            command_id: r.command_id,
            ok: r.outcome.is_ok(),
            error: r.outcome.err().unwrap_or_default(),
            fields: fields(r.fields),
        },
    };
    Output {
        device_id: output.device_id,
        timestamp: output.timestamp,
        kind,
    }
}

/// `SLUICE_PERF_MAP=1` lets `perf record` name the script's functions.
fn engine(pooling: bool) -> ScriptEngine {
    ScriptEngine::new(&EngineOptions {
        cache: false,
        pooling,
        perf_map: std::env::var_os("SLUICE_PERF_MAP").is_some(),
        ..EngineOptions::default()
    })
    .expect("the engine starts")
}

fn json_sensor(c: &mut Criterion) {
    assert_eq!(PAYLOAD.len(), 152);
    let engine = engine(false);
    let script = load(&engine, "json-sensor");
    let mut group = c.benchmark_group("json-sensor");
    group.throughput(Throughput::Elements(1));

    sluice_guest::native::set_param("temp_max", "30");
    let native_message = sluice_guest::Message::new("th-0001", PAYLOAD.as_bytes().to_vec());
    group.bench_function("native", |b| {
        b.iter(|| json_sensor::parse(std::hint::black_box(&native_message)).expect("parses"))
    });
    group.bench_function("native-to-host-outputs", |b| {
        b.iter(|| {
            let outputs =
                json_sensor::parse(std::hint::black_box(&native_message)).expect("parses");
            outputs.into_iter().map(to_host).collect::<Vec<_>>()
        })
    });

    let mut instance = script.instantiate().expect("instantiates");
    let msg = message();
    group.bench_function("wasm", |b| {
        b.iter(|| instance.parse(std::hint::black_box(&msg)).expect("parses"))
    });

    let mut assemblyscript = load(&engine, "json-sensor-as")
        .instantiate()
        .expect("instantiates");
    group.bench_function("assemblyscript", |b| {
        b.iter(|| {
            assemblyscript
                .parse(std::hint::black_box(&msg))
                .expect("parses")
        })
    });

    let batch: Vec<RawMessage> = (0..BATCH).map(|_| message()).collect();
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(format!("wasm-batch-{BATCH}"), |b| {
        b.iter(|| instance.parse_batch(std::hint::black_box(&batch)))
    });
    group.finish();
}

fn instantiate(c: &mut Criterion) {
    let mut group = c.benchmark_group("instantiate");
    for (name, pooling) in [("on-demand", false), ("pooling", true)] {
        let script = load(&engine(pooling), "json-sensor");
        group.bench_function(name, |b| {
            b.iter(|| drop(script.instantiate().expect("instantiates")))
        });
    }
    group.finish();
}

/// The same thermostat script in Rust (`thermostat`) and AssemblyScript
/// (`thermostat-as`), on the same 8-byte frame: telemetry of seven fields,
/// one state read per message, two params.
fn languages(c: &mut Criterion) {
    let engine = engine(false);
    let frame = vec![0x01, 0x08, 0x98, 0x08, 0x34, 0x2d, 0x11, 0x4b];
    let mut group = c.benchmark_group("thermostat");
    group.throughput(Throughput::Elements(1));
    for (name, product) in [("rust", "thermostat"), ("assemblyscript", "thermostat-as")] {
        let settings = ScriptSettings {
            params: [("battery_low".to_owned(), "15".to_owned())].into(),
            ..ScriptSettings::default()
        };
        let script = engine
            .load_file(product, &common::example_script(product), settings)
            .expect("the thermostat script loads");
        let mut instance = script.instantiate().expect("instantiates");
        let msg = RawMessage {
            device_id: "trv-1".into(),
            product: product.into(),
            topic: format!("devices/{product}/trv-1/telemetry"),
            payload: frame.clone(),
            received_at: 1_732_262_400_000,
            source: SourceKind::Mqtt,
        };
        group.bench_function(name, |b| {
            b.iter(|| instance.parse(std::hint::black_box(&msg)).expect("parses"))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    targets = json_sensor, instantiate, languages
}
criterion_main!(benches);
