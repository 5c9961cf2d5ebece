//! `counter`: a cumulative meter (energy, water, pulses) → the reading and
//! the consumption since the previous reading, using per-device state.
//!
//! Input payload: `{"total": 1520.5}` (optionally `"ts"` in milliseconds).
//!
//! Outputs: telemetry `{"total": 1520.5, "delta": 2.5, "interval_s": 60}`
//! when a previous reading is stored for the device, `{"total": 1520.5}` for
//! the first one. A total below the previous one means the meter was
//! replaced or rolled over: an event `counter_reset` with both totals, and
//! the new total counts as the delta.

use serde::{Deserialize, Serialize};
use sluice_guest::prelude::*;

#[derive(Deserialize)]
struct Reading {
    total: f64,
    ts: Option<i64>,
}

/// What is kept per device between messages.
#[derive(Serialize, Deserialize)]
struct Previous {
    total: f64,
    at: i64,
}

/// Turns a cumulative reading into total and delta.
pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    let reading: Reading = message.json()?;
    if !reading.total.is_finite() || reading.total < 0.0 {
        return Err(ScriptError::new(
            "bad-total",
            format!(
                "`total` must be a non-negative number, got {}",
                reading.total
            ),
        ));
    }
    let at = reading.ts.unwrap_or(message.received_at);
    let mut outputs = Vec::with_capacity(2);
    let mut fields = Fields::new().with("total", reading.total);
    if let Some(previous) = message.state_json::<Previous>() {
        let delta = if reading.total >= previous.total {
            reading.total - previous.total
        } else {
            outputs.push(
                Output::event(
                    "counter_reset",
                    Fields::new()
                        .with("previous_total", previous.total)
                        .with("total", reading.total),
                )
                .at(at),
            );
            reading.total
        };
        fields.push("delta", delta);
        fields.push("interval_s", (at - previous.at) / 1000);
    }
    message.set_state_json(&Previous {
        total: reading.total,
        at,
    })?;
    outputs.insert(0, Output::telemetry(fields).at(at));
    Ok(outputs)
}

sluice_guest::script!(parse);

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(total: f64, ts: i64) -> Message {
        Message::new(
            "meter-1",
            format!(r#"{{"total": {total}, "ts": {ts}}}"#).into_bytes(),
        )
    }

    #[test]
    fn deltas_follow_the_stored_total() {
        sluice_guest::native::reset();
        let first = parse(&reading(100.0, 0)).unwrap();
        let OutputKind::Telemetry(fields) = &first[0].kind else {
            panic!()
        };
        assert_eq!(fields.len(), 1);
        let second = parse(&reading(102.5, 60_000)).unwrap();
        let OutputKind::Telemetry(fields) = &second[0].kind else {
            panic!()
        };
        let fields = Fields::from(fields.clone());
        assert_eq!(fields.get("delta"), Some(&Value::Float(2.5)));
        assert_eq!(fields.get("interval_s"), Some(&Value::Integer(60)));
        let reset = parse(&reading(1.0, 120_000)).unwrap();
        assert!(matches!(&reset[1].kind, OutputKind::Event(e) if e.name == "counter_reset"));
    }
}
