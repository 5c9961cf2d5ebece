//! `gateway`: one payload from a gateway carrying readings of several
//! sub-devices → outputs for each sub-device, plus the gateway's own
//! telemetry.
//!
//! Input payload:
//!
//! ```json
//! {"ts": 1732262400000,
//!  "gateway": {"uptime_s": 86400},
//!  "devices": [
//!    {"id": "th-01", "temperature": 21.4, "humidity": 40.1},
//!    {"id": "th-02", "online": false},
//!    {"id": "door-03", "open": true, "event": "door_opened"}]}
//! ```
//!
//! Outputs: telemetry `{uptime_s, sub_devices: 3}` for the gateway itself;
//! per sub-device, named by `id`: a `status` output when `online` is given,
//! an event when `event` names one (with the entry's readings as details),
//! and telemetry of the remaining readings. `ts` (milliseconds) stamps every
//! output.

use serde::Deserialize;
use sluice_guest::prelude::*;

#[derive(Deserialize)]
struct Report {
    ts: Option<i64>,
    #[serde(default)]
    gateway: Fields,
    devices: Vec<SubDevice>,
}

#[derive(Deserialize)]
struct SubDevice {
    id: String,
    online: Option<bool>,
    event: Option<String>,
    #[serde(flatten)]
    readings: serde_json::Map<String, serde_json::Value>,
}

/// Splits one gateway report into per-device outputs.
pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    let report: Report = message.json()?;
    let stamp = |output: Output| match report.ts {
        Some(ms) => output.at(ms),
        None => output,
    };
    let mut gateway = report.gateway;
    gateway.push("sub_devices", report.devices.len() as i64);
    let mut outputs = vec![stamp(Output::telemetry(gateway))];
    for device in report.devices {
        if device.id.is_empty() {
            return Err(ScriptError::new(
                "bad-device",
                "a sub-device entry has an empty `id`",
            ));
        }
        let readings: Fields = device.readings.into_iter().collect();
        if let Some(online) = device.online {
            outputs.push(stamp(Output::status(online).for_device(&device.id)));
        }
        match device.event {
            Some(name) => outputs.push(stamp(Output::event(name, readings).for_device(&device.id))),
            None if !readings.is_empty() => {
                outputs.push(stamp(Output::telemetry(readings).for_device(&device.id)));
            }
            None => {}
        }
    }
    Ok(outputs)
}

sluice_guest::script!(parse);
