//! `thermostat`: a radiator thermostat's 8-byte status frame → telemetry,
//! a `mode_changed` event and alerts. The same script as the AssemblyScript
//! example `thermostat-as`, written in Rust; both pass the same fixtures, so
//! the benchmark compares the two languages on equal work.
//!
//! Frame: version `0x01`; room temperature and setpoint, signed big-endian
//! 0.01 °C; humidity %; bits 0-3 mode (off, heat, cool, auto), bit 4 valve
//! open, bit 5 window open; battery %.
//!
//! Input (hex): `01 08 98 08 34 2d 11 4b`
//!
//! Output: telemetry `{"temperature": 22.0, "setpoint": 21.0, "humidity": 45,
//! "mode": "heat", "heating": true, "window_open": false, "battery": 75}`;
//! plus `mode_changed {from, to}` when the mode differs from the device's
//! previous frame (per-device state), a warning when the window is open while
//! the valve heats, a warning below `battery_low` % and a critical alert
//! below `frost_below` °C.

use sluice_guest::prelude::*;

const MODES: [&str; 4] = ["off", "heat", "cool", "auto"];

/// Decodes one frame.
pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    let payload = &message.payload;
    if payload.len() != 8 {
        return Err(ScriptError::new(
            "bad-length",
            format!(
                "a thermostat frame has 8 bytes, this one has {}",
                payload.len()
            ),
        ));
    }
    let mut r = message.reader();
    let version = r.u8()?;
    if version != 1 {
        return Err(ScriptError::new(
            "unknown-version",
            format!("frame version {version} is not supported (expected 1)"),
        ));
    }
    let temperature = f64::from(r.i16_be()?) / 100.0;
    let setpoint = f64::from(r.i16_be()?) / 100.0;
    let humidity = r.u8()?;
    let flags = r.u8()?;
    let battery = r.u8()?;
    let mode_code = flags & 0x0f;
    let Some(mode) = MODES.get(usize::from(mode_code)).copied() else {
        return Err(ScriptError::new(
            "unknown-mode",
            format!("mode {mode_code} is not one of 0 (off) to 3 (auto)"),
        ));
    };
    let heating = flags & 0x10 != 0;
    let window_open = flags & 0x20 != 0;

    let mut outputs = vec![Output::telemetry(
        Fields::new()
            .with("temperature", temperature)
            .with("setpoint", setpoint)
            .with("humidity", i64::from(humidity))
            .with("mode", mode)
            .with("heating", heating)
            .with("window_open", window_open)
            .with("battery", i64::from(battery)),
    )];

    let previous = message.state().filter(|s| s.len() == 1).map(|s| s[0]);
    if let Some(previous) = previous.filter(|p| *p != mode_code) {
        let from = MODES
            .get(usize::from(previous))
            .copied()
            .unwrap_or("unknown");
        outputs.push(Output::event(
            "mode_changed",
            Fields::new().with("from", from).with("to", mode),
        ));
    }
    if previous != Some(mode_code)
        && let Err(refused) = message.set_state(&[mode_code])
    {
        log(
            LogLevel::Warn,
            &format!("mode not remembered: {}", refused.message),
        );
    }

    if window_open && heating {
        outputs.push(Output::alert(
            Severity::Warning,
            "Window open while heating",
            format!("the valve is open at {temperature} °C with the window open"),
        ));
    }
    let battery_low = param_as::<f64>("battery_low")?.unwrap_or(15.0);
    if f64::from(battery) < battery_low {
        outputs.push(Output::alert(
            Severity::Warning,
            "Battery low",
            format!("battery at {battery} % (below {battery_low} %)"),
        ));
    }
    let frost_below = param_as::<f64>("frost_below")?.unwrap_or(5.0);
    if temperature < frost_below {
        outputs.push(Output::alert(
            Severity::Critical,
            "Frost risk",
            format!("room at {temperature} °C is below {frost_below} °C"),
        ));
    }
    Ok(outputs)
}

sluice_guest::script!(parse);
