//! Script fixtures: `<product>.examples.json` pairs inputs with the outputs
//! (or the error) a script must produce. `sluice script check` runs them,
//! and a hot reload runs them before a new version may serve.
//!
//! ```json
//! {
//!   "params": {"temp_max": "30"},
//!   "examples": [
//!     {"name": "a reading",
//!      "device_id": "sensor-1",
//!      "payload": {"temperature": 21.5},
//!      "expect": [{"type": "telemetry", "fields": {"temperature": 21.5}}]},
//!     {"name": "not JSON",
//!      "payload_text": "hello",
//!      "expect_error": {"code": "invalid-json"}},
//!     {"name": "a command",
//!      "command": {"name": "set_interval", "params": {"seconds": 60}},
//!      "expect_downlinks": [{"payload_hex": "0100003c", "fport": 2}]}
//!   ]
//! }
//! ```
//!
//! A `command` example runs the script's `encode` (its id is `command-1`
//! unless it gives `id`, so a later example's device can reply to it).
//!
//! Examples run in order on one instance, so per-device state written by
//! one example is seen by the next.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::command::{CommandCall, Downlink};
use super::error::ScriptError;
use super::host::Params;
use super::instance::ScriptInstance;
use super::output::Output;
use crate::message::{RawMessage, SourceKind};

/// The receive time examples get unless they set `received_at`:
/// 2024-11-22T08:00:00Z.
pub const DEFAULT_RECEIVED_AT: i64 = 1_732_262_400_000;

/// The device id examples get unless they set `device_id`.
pub const DEFAULT_DEVICE: &str = "device-1";

/// A fixture file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixtures {
    /// Product parameters the script runs with.
    #[serde(default)]
    pub params: Params,
    /// The examples, run in order.
    pub examples: Vec<Example>,
}

/// One input and what the script must answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// Shown in reports.
    pub name: String,
    /// The message's device id (default `device-1`).
    #[serde(default)]
    pub device_id: Option<String>,
    /// The message's topic (default empty).
    #[serde(default)]
    pub topic: Option<String>,
    /// The message's receive time in ms (default 2024-11-22T08:00:00Z).
    #[serde(default)]
    pub received_at: Option<i64>,
    /// The payload: a JSON document, sent as its compact text.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// The payload as literal text.
    #[serde(default)]
    pub payload_text: Option<String>,
    /// The payload as hex digits.
    #[serde(default)]
    pub payload_hex: Option<String>,
    /// The payload as standard base64.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// A command for `encode` instead of a message for `parse`.
    #[serde(default)]
    pub command: Option<CommandExample>,
    /// The outputs the script must produce, in order.
    #[serde(default)]
    pub expect: Option<Vec<Output>>,
    /// The downlinks `encode` must answer, in order.
    #[serde(default)]
    pub expect_downlinks: Option<Vec<Downlink>>,
    /// The error the script must fail with instead.
    #[serde(default)]
    pub expect_error: Option<ExpectedError>,
}

/// The command of a `command` example.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandExample {
    /// The command's name.
    pub name: String,
    /// Its params (default `{}`).
    #[serde(default)]
    pub params: Option<serde_json::Value>,
    /// Its id (default `command-1`).
    #[serde(default)]
    pub id: Option<String>,
}

/// The id of a fixture's command unless it gives one.
pub const DEFAULT_COMMAND_ID: &str = "command-1";

/// An expected failure: the script's own error code (or the kind of
/// failure, such as `timeout` or `trap`), and optionally a part of the message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedError {
    /// The script's error code, or a failure kind from [`ScriptError::kind`].
    pub code: String,
    /// Text the error message must contain.
    #[serde(default)]
    pub message: Option<String>,
}

/// A fixture file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// It could not be read.
    #[error("cannot read fixtures {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid fixture JSON.
    #[error("fixtures {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        reason: String,
    },
}

impl Fixtures {
    /// Reads and checks a fixture file.
    pub fn load(path: &Path) -> Result<Self, FixtureError> {
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let fixtures: Fixtures =
            serde_json::from_str(&text).map_err(|e| FixtureError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        for example in &fixtures.examples {
            example.check().map_err(|reason| FixtureError::Invalid {
                path: path.to_path_buf(),
                reason: format!("example {:?}: {reason}", example.name),
            })?;
        }
        Ok(fixtures)
    }

    /// The fixture file beside a script: `<dir>/<stem>.examples.json`.
    pub fn path_for(wasm: &Path) -> PathBuf {
        let stem = wasm.file_stem().unwrap_or_default().to_string_lossy();
        wasm.with_file_name(format!("{stem}.examples.json"))
    }

    /// Runs every example on `instance`, in order.
    pub fn run(&self, instance: &mut ScriptInstance, product: &str) -> Vec<CaseReport> {
        self.examples
            .iter()
            .map(|example| {
                let failures = match &example.command {
                    Some(_) => {
                        let call = example.command_call(product);
                        example.judge_downlinks(instance.encode(&call))
                    }
                    None => match example.message(product) {
                        Ok(message) => example.judge(instance.parse(&message)),
                        Err(reason) => vec![reason],
                    },
                };
                CaseReport {
                    name: example.name.clone(),
                    failures,
                }
            })
            .collect()
    }
}

impl Example {
    fn check(&self) -> Result<(), String> {
        let payloads = [
            self.payload.is_some(),
            self.payload_text.is_some(),
            self.payload_hex.is_some(),
            self.payload_base64.is_some(),
        ];
        let inputs = payloads.iter().filter(|p| **p).count() + usize::from(self.command.is_some());
        if inputs != 1 {
            return Err(
                "give exactly one of payload, payload_text, payload_hex, payload_base64, command"
                    .into(),
            );
        }
        let expected = if self.command.is_some() {
            (self.expect_downlinks.is_some(), "expect_downlinks")
        } else {
            (self.expect.is_some(), "expect")
        };
        if expected.0 == self.expect_error.is_some()
            || (self.command.is_some() && self.expect.is_some())
            || (self.command.is_none() && self.expect_downlinks.is_some())
        {
            return Err(format!("give exactly one of {}, expect_error", expected.1));
        }
        Ok(())
    }

    /// The command this example sends to `encode`.
    pub fn command_call(&self, product: &str) -> CommandCall {
        let command = self.command.as_ref();
        CommandCall {
            id: command
                .and_then(|c| c.id.clone())
                .unwrap_or_else(|| DEFAULT_COMMAND_ID.to_owned()),
            device_id: self
                .device_id
                .clone()
                .unwrap_or_else(|| DEFAULT_DEVICE.to_owned()),
            product: product.to_owned(),
            name: command.map(|c| c.name.clone()).unwrap_or_default(),
            params: command
                .and_then(|c| c.params.as_ref())
                .map_or_else(|| "{}".to_owned(), ToString::to_string),
            issued_at: self.received_at.unwrap_or(DEFAULT_RECEIVED_AT),
        }
    }

    /// What differs between `encode`'s answer and the expectation.
    fn judge_downlinks(&self, result: Result<Vec<Downlink>, ScriptError>) -> Vec<String> {
        match (result, &self.expect_downlinks) {
            (Ok(downlinks), Some(expected)) => {
                let mut diffs = Vec::new();
                let expected = serde_json::to_value(expected).expect("downlinks serialise to JSON");
                let actual = serde_json::to_value(&downlinks).expect("downlinks serialise to JSON");
                json_diff("downlinks", &expected, &actual, &mut diffs);
                diffs
            }
            (Ok(downlinks), None) => vec![format!(
                "expected an error, got downlinks {}",
                serde_json::to_string(&downlinks).unwrap_or_default()
            )],
            (Err(error), _) => self.judge_error(&error),
        }
    }

    /// The raw message this example sends.
    pub fn message(&self, product: &str) -> Result<RawMessage, String> {
        let payload = if let Some(doc) = &self.payload {
            doc.to_string().into_bytes()
        } else if let Some(text) = &self.payload_text {
            text.clone().into_bytes()
        } else if let Some(digits) = &self.payload_hex {
            let digits: String = digits.split_whitespace().collect();
            hex::decode(digits).map_err(|e| format!("payload_hex: {e}"))?
        } else if let Some(text) = &self.payload_base64 {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("payload_base64: {e}"))?
        } else {
            Vec::new()
        };
        Ok(RawMessage {
            device_id: self
                .device_id
                .clone()
                .unwrap_or_else(|| DEFAULT_DEVICE.to_owned()),
            product: product.to_owned(),
            topic: self.topic.clone().unwrap_or_default(),
            payload,
            received_at: self.received_at.unwrap_or(DEFAULT_RECEIVED_AT),
            source: SourceKind::Internal,
        })
    }

    /// What differs between the script's answer and the expectation.
    fn judge(&self, result: Result<Vec<Output>, ScriptError>) -> Vec<String> {
        match (result, &self.expect, &self.expect_error) {
            (Ok(outputs), Some(expected), _) => {
                let mut diffs = Vec::new();
                let expected = serde_json::to_value(expected).expect("outputs serialise to JSON");
                let actual = serde_json::to_value(&outputs).expect("outputs serialise to JSON");
                json_diff("outputs", &expected, &actual, &mut diffs);
                diffs
            }
            (Ok(outputs), None, Some(error)) => vec![format!(
                "expected error {:?}, got outputs {}",
                error.code,
                serde_json::to_string(&outputs).unwrap_or_default()
            )],
            (Err(error), Some(_), _) => vec![format!("expected outputs, got error: {error}")],
            (Err(error), None, Some(_)) => self.judge_error(&error),
            (_, None, None) => vec!["the example expects nothing".into()],
        }
    }

    /// What differs between a failure and the expected one.
    fn judge_error(&self, error: &ScriptError) -> Vec<String> {
        let Some(expected) = &self.expect_error else {
            return vec![format!("expected downlinks, got error: {error}")];
        };
        let (code, message) = match error {
            ScriptError::Rejected { code, message, .. } => (code.as_str(), message.clone()),
            other => (other.kind(), other.to_string()),
        };
        let mut diffs = Vec::new();
        if code != expected.code {
            diffs.push(format!(
                "error code: expected {:?}, got {code:?} ({error})",
                expected.code
            ));
        }
        if let Some(part) = &expected.message
            && !message.contains(part.as_str())
        {
            diffs.push(format!(
                "error message: expected it to contain {part:?}, got {message:?}"
            ));
        }
        diffs
    }
}

/// The outcome of one example.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseReport {
    /// The example's name.
    pub name: String,
    /// One line per difference; empty when it passed.
    pub failures: Vec<String>,
}

impl CaseReport {
    /// Whether the script answered as expected.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Appends one line per place where `actual` differs from `expected`.
pub fn json_diff(
    path: &str,
    expected: &serde_json::Value,
    actual: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, ev) in e {
                let here = format!("{path}.{key}");
                match a.get(key) {
                    Some(av) => json_diff(&here, ev, av, out),
                    None => out.push(format!("{here}: missing, expected {ev}")),
                }
            }
            for (key, av) in a {
                if !e.contains_key(key) {
                    out.push(format!("{path}.{key}: unexpected {av}"));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            for (i, ev) in e.iter().enumerate() {
                let here = format!("{path}[{i}]");
                match a.get(i) {
                    Some(av) => json_diff(&here, ev, av, out),
                    None => out.push(format!("{here}: missing, expected {ev}")),
                }
            }
            for (i, av) in a.iter().enumerate().skip(e.len()) {
                out.push(format!("{path}[{i}]: unexpected {av}"));
            }
        }
        (e, a) if !same_value(e, a) => out.push(format!("{path}: expected {e}, got {a}")),
        _ => {}
    }
}

/// Equality where `1` and `1.0` are the same number.
fn same_value(expected: &serde_json::Value, actual: &serde_json::Value) -> bool {
    match (expected, actual) {
        (serde_json::Value::Number(e), serde_json::Value::Number(a)) => {
            match (e.as_i64(), a.as_i64()) {
                (Some(e), Some(a)) => e == a,
                _ => e.as_f64() == a.as_f64(),
            }
        }
        _ => expected == actual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diffs_name_the_path_of_each_difference() {
        let mut out = Vec::new();
        json_diff(
            "outputs",
            &json!([{"type": "telemetry", "fields": {"a": 1, "b": 2.5}}]),
            &json!([{"type": "telemetry", "fields": {"a": 1.0, "c": true}}, {"type": "status"}]),
            &mut out,
        );
        assert_eq!(
            out,
            [
                "outputs[0].fields.b: missing, expected 2.5",
                "outputs[0].fields.c: unexpected true",
                r#"outputs[1]: unexpected {"type":"status"}"#,
            ]
        );
    }

    #[test]
    fn examples_need_one_payload_and_one_expectation() {
        let example: Example = serde_json::from_value(json!({
            "name": "x", "payload": {}, "payload_hex": "00", "expect": []
        }))
        .unwrap();
        assert!(
            example
                .check()
                .unwrap_err()
                .contains("exactly one of payload")
        );
        let example: Example =
            serde_json::from_value(json!({"name": "x", "payload_hex": "00"})).unwrap();
        assert!(
            example
                .check()
                .unwrap_err()
                .contains("exactly one of expect")
        );
    }

    #[test]
    fn payload_forms_become_bytes() {
        let example: Example = serde_json::from_value(json!({
            "name": "x", "payload_hex": "CB F6 0b", "expect": [], "device_id": "d", "topic": "t"
        }))
        .unwrap();
        let message = example.message("p").unwrap();
        assert_eq!(message.payload, [0xCB, 0xF6, 0x0B]);
        assert_eq!(
            (message.device_id.as_str(), message.product.as_str()),
            ("d", "p")
        );
        let example: Example = serde_json::from_value(json!({
            "name": "x", "payload": {"a": [1]}, "expect": []
        }))
        .unwrap();
        assert_eq!(example.message("p").unwrap().payload, br#"{"a":[1]}"#);
    }
}
