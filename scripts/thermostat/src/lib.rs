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
//!
//! Commands: `set_setpoint {"celsius": 21.5}` (5 to 30 °C) becomes the
//! downlink `02` + the setpoint, signed big-endian 0.01 °C (`02 08 66`).
//! The device's next frame answers it: a `reply` when its setpoint is the
//! one asked, a failed reply when it is not. The pending command is kept in
//! the device's state: byte 0 the last mode (`ff` before any frame), then,
//! while a command waits, the asked setpoint (2 bytes) and the command id.

use sluice_guest::prelude::*;

const MODES: [&str; 4] = ["off", "heat", "cool", "auto"];
/// The state's mode byte before the device's first frame.
const NO_MODE: u8 = 0xff;
/// The downlink that sets the setpoint.
const SET_SETPOINT: u8 = 0x02;

/// What the device's state holds.
struct Remembered {
    mode: Option<u8>,
    /// The setpoint asked (0.01 °C) and the command's id.
    pending: Option<(i16, String)>,
}

impl Remembered {
    fn of(device_id: &str) -> Self {
        let state = sluice_guest::host::state_get(device_id).unwrap_or_default();
        let mode = state.first().copied().filter(|m| *m != NO_MODE);
        let pending = match state.get(1..3) {
            Some(&[hi, lo]) => std::str::from_utf8(&state[3..])
                .ok()
                .map(|id| (i16::from_be_bytes([hi, lo]), id.to_owned())),
            _ => None,
        };
        Remembered { mode, pending }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut bytes = vec![self.mode.unwrap_or(NO_MODE)];
        if let Some((setpoint, id)) = &self.pending {
            bytes.extend_from_slice(&setpoint.to_be_bytes());
            bytes.extend_from_slice(id.as_bytes());
        }
        bytes
    }
}

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

    let remembered = Remembered::of(&message.device_id);
    let previous = remembered.mode;
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
    if let Some((asked, id)) = &remembered.pending {
        let reported = i16::from_be_bytes([payload[3], payload[4]]);
        outputs.push(if reported == *asked {
            Output::reply(id.clone(), Fields::new().with("setpoint", setpoint))
        } else {
            Output::reply_error(
                id.clone(),
                format!(
                    "the thermostat reports a setpoint of {setpoint} °C, not the {} °C asked",
                    f64::from(*asked) / 100.0
                ),
            )
        });
    }
    if (previous != Some(mode_code) || remembered.pending.is_some())
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSetpoint {
    celsius: f64,
}

/// Turns `set_setpoint` into its downlink and remembers it, so the next
/// frame can answer it.
pub fn encode(command: &Command) -> Result<Vec<Downlink>, ScriptError> {
    if command.name != "set_setpoint" {
        return Err(command.unknown());
    }
    let SetSetpoint { celsius } = command.params()?;
    if !(5.0..=30.0).contains(&celsius) {
        return Err(ScriptError::new(
            "invalid-params",
            format!("a setpoint of {celsius} °C is outside 5 to 30 °C"),
        ));
    }
    let setpoint = (celsius * 100.0).round() as i16;
    let mut remembered = Remembered::of(&command.device_id);
    remembered.pending = Some((setpoint, command.id.clone()));
    sluice_guest::host::state_set(&command.device_id, &remembered.bytes())?;
    let [hi, lo] = setpoint.to_be_bytes();
    Ok(vec![Downlink::new(vec![SET_SETPOINT, hi, lo])])
}

sluice_guest::script!(parse, encode);
