//! A script that misbehaves in the way its payload names, and behaves when
//! the payload is `ok`: the engine's limits are tested against it.

use std::hint::black_box;

use sluice_guest::prelude::*;
use sluice_guest::{Field, OutputKind};

pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    match message.text()? {
        "ok" => Ok(vec![Output::telemetry(Fields::new().with("ok", true))]),
        "loop" => spin(),
        "alloc" => hoard(),
        "panic" => panic!("hostile script panics on purpose"),
        "stack" => Ok(vec![Output::telemetry(
            Fields::new().with("depth", recurse(black_box(1))),
        )]),
        "huge" => {
            // 48 outputs of 64 KiB each: 3 MiB of text, three times the
            // output cap. Packed, the answer takes as much memory again,
            // which still fits the 8 MiB memory cap of the tests.
            let blob = "x".repeat(64 << 10);
            Ok((0..48)
                .map(|i| Output::telemetry(Fields::new().with(format!("blob{i}"), blob.clone())))
                .collect())
        }
        "many" => Ok((0..5000)
            .map(|i| Output::telemetry(Fields::new().with("i", i)))
            .collect()),
        "nan" => Ok(vec![Output::telemetry(Fields::new().with("t", f64::NAN))]),
        "bad-json" => Ok(vec![Output::telemetry(vec![Field {
            key: "nested".into(),
            value: Value::Json("{not json".into()),
        }])]),
        "empty-key" => Ok(vec![Output::telemetry(Fields::new().with("", 1))]),
        "empty-event" => Ok(vec![Output {
            device_id: None,
            timestamp: None,
            kind: OutputKind::Event(sluice_guest::Event {
                name: String::new(),
                fields: vec![],
            }),
        }]),
        "fs" => match std::fs::read("/etc/passwd") {
            Ok(bytes) => Err(ScriptError::new(
                "escaped",
                format!("read {} bytes of /etc/passwd", bytes.len()),
            )),
            Err(error) => Err(ScriptError::new("fs-denied", error.to_string())),
        },
        "env" => Ok(vec![Output::telemetry(
            Fields::new()
                .with("vars", std::env::vars().count() as i64)
                .with("args", std::env::args().count() as i64),
        )]),
        "state-big" => {
            message.set_state(&vec![1u8; 1 << 20])?;
            Ok(vec![])
        }
        "state-then-panic" => {
            message.set_state(b"written before the panic")?;
            panic!("after writing state");
        }
        "state-read" => Ok(vec![Output::telemetry(
            Fields::new().with(
                "state",
                message
                    .state()
                    .map(|s| String::from_utf8_lossy(&s).into_owned()),
            ),
        )]),
        "log-spam" => {
            for i in 0..10_000 {
                log(LogLevel::Info, &format!("line {i}"));
            }
            Ok(vec![])
        }
        other => Err(ScriptError::new(
            "unknown-mode",
            format!("no mode {other:?}"),
        )),
    }
}

/// Recurses until the stack runs out (the depth check never stops it).
fn recurse(depth: i64) -> i64 {
    let frame = black_box([depth; 64]);
    if frame[0] < 0 {
        0
    } else {
        recurse(frame[0] + 1) + frame[63]
    }
}

/// Runs until the deadline stops it.
fn spin() -> ! {
    loop {
        black_box(());
    }
}

/// Allocates until the memory cap stops it.
fn hoard() -> ! {
    let mut hoard = Vec::new();
    loop {
        hoard.push(black_box(vec![7u8; 1 << 20]));
    }
}

/// Commands misbehave the way their name says.
pub fn encode(command: &Command) -> Result<Vec<Downlink>, ScriptError> {
    match command.name.as_str() {
        "ok" => Ok(vec![Downlink::new(b"ok".to_vec())]),
        "loop" => spin(),
        "alloc" => hoard(),
        "panic" => panic!("hostile script panics in encode on purpose"),
        "none" => Ok(Vec::new()),
        "many" => Ok((0..17).map(|_| Downlink::new(vec![1])).collect()),
        "bad-fport" => Ok(vec![Downlink::new(vec![1]).fport(0)]),
        "bad-qos" => Ok(vec![Downlink::new(vec![1]).qos(3)]),
        "wildcard" => Ok(vec![Downlink::new(vec![1]).topic("devices/+/cmd")]),
        "huge" => Ok(vec![Downlink::new(vec![0u8; 2 << 20])]),
        _ => Err(command.unknown()),
    }
}

sluice_guest::script!(parse, encode);
