//! `lht65`: Dragino LHT65 temperature & humidity sensor uplinks, as a
//! LoRaWAN network server's MQTT integration delivers them (ChirpStack v4
//! event JSON).
//!
//! Input payload:
//!
//! ```json
//! {"fPort": 2, "data": "y/YLDQN2AQrdf/8=", "deviceInfo": {"devEui": "a84041000181c061"}}
//! ```
//!
//! Output: telemetry of device `a84041000181c061` (the `devEui`):
//!
//! ```json
//! {"BatV": 3.062, "Bat_status": 3, "TempC_SHT": 28.29, "Hum_SHT": 88.6,
//!  "Ext_sensor": "Temperature Sensor", "TempC_DS": 27.81}
//! ```
//!
//! Commands (the vendor's downlinks, on fPort 2): `set_interval
//! {"seconds": 60}` → `01 00 00 3C`; `reset` → `04 FF`.
//!
//! The 11-byte fPort 2 frame, big-endian, as the vendor documents it:
//!
//! | bytes | content |
//! |---|---|
//! | 0-1 | battery: bits 15-14 status (0 ultra low … 3 good), bits 13-0 millivolts |
//! | 2-3 | built-in SHT temperature, signed, /100 °C |
//! | 4-5 | built-in SHT humidity, bits 11-0, /10 %RH |
//! | 6 | bit 7 external sensor not connected, bit 6 datalog poll reply, bits 3-0 external sensor type |
//! | 7-10 | external sensor value, by type |
//!
//! External sensor types and their fields (names as in the vendor's decoder):
//! 0 no sensor (`Ext_sensor`; the frame may stop after byte 6);
//! 1 DS18B20 temperature (`Ext_sensor`, `TempC_DS`, signed /100; 327.67
//! means no probe); 4 interrupt (`Work_mode`, `Exti_pin_level` High/Low,
//! `Exti_status` True/False); 5 illumination (`ILL_lx`); 6 ADC (`ADC_V`,
//! mV/1000); 7 16-bit counter and 8 32-bit counter (`Exit_count`);
//! 9 DS18B20 with timestamp (`TempC_DS` moves to bytes 0-1, `Bat_status` to
//! byte 4 bits 7-6, no `BatV`, `Systimestamp` in Unix seconds also becomes
//! the output timestamp); 15 probe ID (`ID`, the DS18B20 ROM as 16 hex
//! digits; no SHT readings). Other types (LHT65N-only sensors) keep the
//! built-in readings and leave the external value out. Bit 7 of byte 6 adds
//! `No_connect: "Sensor no connection"`.
//!
//! A datalog poll reply (bit 6 of byte 6) carries one or more 11-byte
//! records (external value, SHT temperature, humidity, flags, Unix time);
//! each becomes telemetry at its own time. Other fPorts are refused with
//! error code `unknown-fport`.

use serde::Deserialize;
use sluice_guest::prelude::*;

/// The parts of a ChirpStack v4 uplink event this script reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Uplink {
    f_port: u8,
    data: String,
    device_info: Option<DeviceInfo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceInfo {
    dev_eui: String,
}

const NO_CONNECTION: u8 = 0x80;
const POLL_REPLY: u8 = 0x40;
const FRAME_LEN: usize = 11;

/// Decodes one uplink event.
pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    let uplink: Uplink = message.json()?;
    if uplink.f_port != 2 {
        return Err(ScriptError::new(
            "unknown-fport",
            format!(
                "unknown FPort {} (the LHT65 reports on FPort 2)",
                uplink.f_port
            ),
        ));
    }
    let frame = base64_decode(&uplink.data)?;
    let mut outputs = if frame.len() > 6 && frame[6] & POLL_REPLY != 0 {
        decode_datalog(&frame)?
    } else {
        vec![decode_frame(&frame)?]
    };
    if let Some(info) = uplink.device_info {
        for output in &mut outputs {
            output.device_id = Some(info.dev_eui.clone());
        }
    }
    Ok(outputs)
}

/// A signed 16-bit reading in hundredths.
fn hundredths(raw: i16) -> f64 {
    f64::from(raw) / 100.0
}

/// Humidity in tenths of %RH from the low 12 bits.
fn humidity(raw: u16) -> f64 {
    f64::from(raw & 0x0FFF) / 10.0
}

/// One regular 11-byte uplink (7 bytes when no external sensor is fitted).
fn decode_frame(frame: &[u8]) -> Result<Output, ScriptError> {
    let mut r = Reader::new(frame);
    let battery = r.u16_be()?;
    let sht_temperature = r.i16_be()?;
    let sht_humidity = r.u16_be()?;
    let ext = r.u8()?;
    let sensor = ext & 0x0F;
    if sensor != 0 && frame.len() < FRAME_LEN {
        return Err(ScriptError::new(
            "payload-too-short",
            format!(
                "an LHT65 frame with external sensor type {sensor} has 11 bytes, got {}",
                frame.len()
            ),
        ));
    }

    let mut fields = Fields::new();
    if sensor == 9 {
        // Timestamp mode: the DS18B20 reading takes the battery voltage's
        // place and the battery status moves to the humidity word.
        fields.push("TempC_DS", hundredths(battery as i16));
        fields.push("Bat_status", sht_humidity >> 14);
    } else {
        fields.push("BatV", f64::from(battery & 0x3FFF) / 1000.0);
        fields.push("Bat_status", battery >> 14);
    }
    if sensor != 15 {
        fields.push("TempC_SHT", hundredths(sht_temperature));
        fields.push("Hum_SHT", humidity(sht_humidity));
    }
    if ext & NO_CONNECTION != 0 {
        fields.push("No_connect", "Sensor no connection");
    }

    let mut timestamp = None;
    match sensor {
        0 => fields.push("Ext_sensor", "No external sensor"),
        1 => {
            fields.push("Ext_sensor", "Temperature Sensor");
            fields.push("TempC_DS", hundredths(r.i16_be()?));
        }
        4 => {
            fields.push("Work_mode", "Interrupt Sensor send");
            fields.push("Exti_pin_level", if r.u8()? != 0 { "High" } else { "Low" });
            fields.push("Exti_status", if r.u8()? != 0 { "True" } else { "False" });
        }
        5 => {
            fields.push("Work_mode", "Illumination Sensor");
            fields.push("ILL_lx", r.u16_be()?);
        }
        6 => {
            fields.push("Work_mode", "ADC Sensor");
            fields.push("ADC_V", f64::from(r.u16_be()?) / 1000.0);
        }
        7 => {
            fields.push("Work_mode", "Interrupt Sensor count");
            fields.push("Exit_count", r.u16_be()?);
        }
        8 => {
            fields.push("Work_mode", "Interrupt Sensor count");
            fields.push("Exit_count", r.u32_be()?);
        }
        9 => {
            let seconds = r.u32_be()?;
            fields.push("Work_mode", "DS18B20 & timestamp");
            fields.push("Systimestamp", seconds);
            timestamp = Some(i64::from(seconds) * 1000);
        }
        15 => {
            let mut id = frame[2..6].to_vec();
            id.extend_from_slice(r.bytes(4)?);
            fields.push("Work_mode", "DS18B20ID");
            fields.push("ID", hex_encode(&id));
        }
        other => log(
            LogLevel::Warn,
            &format!("external sensor type {other} is not an LHT65 type; its value is left out"),
        ),
    }
    let output = Output::telemetry(fields);
    Ok(match timestamp {
        Some(ms) => output.at(ms),
        None => output,
    })
}

/// A datalog poll reply: 11-byte records of external value, SHT
/// temperature, humidity, flags and Unix time.
fn decode_datalog(frame: &[u8]) -> Result<Vec<Output>, ScriptError> {
    if !frame.len().is_multiple_of(FRAME_LEN) {
        return Err(ScriptError::new(
            "bad-datalog",
            format!(
                "a datalog reply holds 11-byte records, got {} bytes",
                frame.len()
            ),
        ));
    }
    frame
        .chunks_exact(FRAME_LEN)
        .map(|record| {
            let mut r = Reader::new(record);
            let ext_value = r.i16_be()?;
            let mut fields = Fields::new();
            fields.push("TempC_SHT", hundredths(r.i16_be()?));
            fields.push("Hum_SHT", humidity(r.u16_be()?));
            let ext = r.u8()?;
            if ext & 0x0F == 1 {
                fields.push("TempC_DS", hundredths(ext_value));
            }
            let seconds = r.u32_be()?;
            Ok(Output::telemetry(fields).at(i64::from(seconds) * 1000))
        })
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetInterval {
    seconds: u32,
}

/// The vendor's downlinks (fPort 2): `set_interval {"seconds": n}` →
/// `01` + n as 3 bytes big-endian (60 s → `01 00 00 3C`); `reset` → `04 FF`.
pub fn encode(command: &Command) -> Result<Vec<Downlink>, ScriptError> {
    let payload = match command.name.as_str() {
        "set_interval" => {
            let SetInterval { seconds } = command.params()?;
            if !(1..=0x00ff_ffff).contains(&seconds) {
                return Err(ScriptError::new(
                    "invalid-params",
                    format!("an interval of {seconds} s is outside 1 to 16777215 s"),
                ));
            }
            let [_, a, b, c] = seconds.to_be_bytes();
            vec![0x01, a, b, c]
        }
        "reset" => vec![0x04, 0xff],
        _ => return Err(command.unknown()),
    };
    Ok(vec![Downlink::new(payload).fport(2)])
}

sluice_guest::script!(parse, encode);
