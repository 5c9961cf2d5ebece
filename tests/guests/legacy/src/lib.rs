//! A script built against `sluice:script@0.1.0` (the world before outputs
//! crossed the boundary packed; `wit/script.wit` here is that version): it
//! must be refused at load with an error that says to rebuild it.

// The bindings generated for the 0.1.0 world have a function of ten flat
// arguments, as every 0.1 script had.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "wit",
    world: "sluice:script/script@0.1.0",
});

use sluice::script::host::{LogLevel, log};
use sluice::script::types::{Field, OutputKind, Value};

struct Legacy;

impl Guest for Legacy {
    fn parse(message: Message) -> Result<Vec<Output>, ScriptError> {
        log(LogLevel::Debug, "parsing the 0.1.0 way");
        Ok(vec![Output {
            device_id: None,
            timestamp: None,
            kind: OutputKind::Telemetry(vec![Field {
                key: "bytes".into(),
                value: Value::Integer(message.payload.len() as i64),
            }]),
        }])
    }

    fn parse_batch(messages: Vec<Message>) -> Vec<Result<Vec<Output>, ScriptError>> {
        messages.into_iter().map(Self::parse).collect()
    }
}

export!(Legacy);
