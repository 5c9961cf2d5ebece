//! `json-sensor`: a JSON object of readings → one telemetry output, plus an
//! alert when `temperature` exceeds the product parameter `temp_max`.
//!
//! Input payload:
//!
//! ```json
//! {"ts": 1732262400000, "temperature": 31.5, "humidity": 48.2, "status": "ok"}
//! ```
//!
//! Outputs (with `temp_max = "30"`):
//!
//! ```json
//! [{"type": "telemetry", "timestamp": 1732262400000,
//!   "fields": {"temperature": 31.5, "humidity": 48.2, "status": "ok"}},
//!  {"type": "alert", "timestamp": 1732262400000, "severity": "warning",
//!   "title": "Temperature high", "description": "temperature 31.5 is above the limit 30"}]
//! ```
//!
//! Every member of the object becomes a field (nested objects and arrays
//! stay JSON); an optional integer `ts` (milliseconds since the Unix epoch)
//! becomes the outputs' timestamp instead of a field.
//!
//! Commands: `configure {"interval_s": 30, "temp_max": 28.5}` (either
//! member, or both) becomes the JSON downlink
//! `{"id": "<command id>", "configure": {...}}`. The sensor answers with a
//! report that carries `"reply_to": "<command id>"` (and `"error"` when it
//! refused): a `reply` with the report's other members, instead of
//! telemetry.

use std::sync::OnceLock;

use sluice_guest::prelude::*;

/// Parses one JSON reading.
pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    let mut fields: Fields = message.json()?;
    if let Some(reply_to) = fields.take("reply_to") {
        let Value::Text(command_id) = reply_to else {
            return Err(ScriptError::new(
                "bad-reply",
                format!("`reply_to` must be a command id, got {reply_to:?}"),
            ));
        };
        return Ok(vec![match fields.take("error") {
            Some(Value::Text(error)) => Output::reply_error(command_id, error),
            Some(_) => Output::reply_error(command_id, "the sensor answered an error"),
            None => Output::reply(command_id, fields),
        }]);
    }
    let timestamp = match fields.take("ts") {
        None => None,
        Some(Value::Integer(ms)) => Some(ms),
        Some(other) => {
            return Err(ScriptError::new(
                "bad-timestamp",
                format!("`ts` must be an integer of milliseconds, got {other:?}"),
            ));
        }
    };
    let alert = match (
        temp_max()?,
        fields.get("temperature").and_then(Value::as_f64),
    ) {
        (Some(limit), Some(temperature)) if temperature > limit => Some(Output::alert(
            Severity::Warning,
            "Temperature high",
            format!("temperature {temperature} is above the limit {limit}"),
        )),
        _ => None,
    };
    let stamp = |output: Output| match timestamp {
        Some(ms) => output.at(ms),
        None => output,
    };
    let mut outputs = Vec::with_capacity(2);
    outputs.push(stamp(Output::telemetry(fields)));
    outputs.extend(alert.map(stamp));
    Ok(outputs)
}

/// The `temp_max` parameter, read once: parameters are fixed for the life of
/// a script instance.
fn temp_max() -> Result<Option<f64>, ScriptError> {
    static TEMP_MAX: OnceLock<Result<Option<f64>, ScriptError>> = OnceLock::new();
    TEMP_MAX.get_or_init(|| param_as::<f64>("temp_max")).clone()
}

/// `configure`: a JSON downlink naming the command, so the reply can.
pub fn encode(command: &Command) -> Result<Vec<Downlink>, ScriptError> {
    if command.name != "configure" {
        return Err(command.unknown());
    }
    let settings: serde_json::Map<String, serde_json::Value> = command.params()?;
    for (key, value) in &settings {
        let fits = match key.as_str() {
            "interval_s" => value.as_u64().is_some_and(|s| (1..=86_400).contains(&s)),
            "temp_max" => value.as_f64().is_some(),
            _ => {
                return Err(ScriptError::new(
                    "invalid-params",
                    format!("`configure` takes interval_s and temp_max, not {key:?}"),
                ));
            }
        };
        if !fits {
            return Err(ScriptError::new(
                "invalid-params",
                format!("`{key}` = {value} is not a valid value"),
            ));
        }
    }
    if settings.is_empty() {
        return Err(ScriptError::new(
            "invalid-params",
            "`configure` needs interval_s or temp_max",
        ));
    }
    let body = serde_json::json!({"id": command.id, "configure": settings});
    Ok(vec![Downlink::new(body.to_string())])
}

sluice_guest::script!(parse, encode);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_become_telemetry_and_ts_the_timestamp() {
        let msg = Message::new(
            "s-1",
            br#"{"ts": 5, "temperature": 21.5, "ok": true}"#.to_vec(),
        );
        let outputs = parse(&msg).unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].timestamp, Some(5));
        let OutputKind::Telemetry(fields) = &outputs[0].kind else {
            panic!("not telemetry")
        };
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn bad_payloads_are_script_errors() {
        let err = parse(&Message::new("s-1", b"[1, 2]".to_vec())).unwrap_err();
        assert_eq!(err.code, "invalid-json");
        let err = parse(&Message::new("s-1", br#"{"ts": "now"}"#.to_vec())).unwrap_err();
        assert_eq!(err.code, "bad-timestamp");
    }
}
