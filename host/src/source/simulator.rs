//! A built-in device simulator for `sluice demo`: realistic payloads for the
//! example products, submitted through the same ingest as HTTP requests (the
//! product's script, status modes, latest values, the bus), with some devices
//! falling silent for a while so that status modes visibly flip.
//!
//! The fleet comes from the device registry: every registered device of a
//! product the simulator knows reports on its own period; a `gateway` device
//! carries the devices whose `groups` name it as its sub-devices.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::devices::DeviceRegistry;
use crate::message::{RawMessage, SourceKind};
use crate::pipeline::{Envelope, Inbound, Ingest};

/// What the simulator produces for one device.
#[derive(Debug, Clone, PartialEq)]
enum Payload {
    /// `json-sensor`: a JSON report of temperature, humidity and more.
    JsonSensor,
    /// `lht65`: a LoRaWAN uplink as a network server forwards it.
    Lht65,
    /// `counter`: a cumulative meter reading.
    Counter,
    /// `thermostat` / `thermostat-as`: the 8-byte status frame.
    Thermostat,
    /// `gateway`: readings of its sub-devices in one payload.
    Gateway {
        /// The sub-devices' ids, and whether each is a door contact (the
        /// others are thermometers).
        subs: Vec<(String, bool)>,
    },
}

impl Payload {
    fn for_product(product: &str) -> Option<(Payload, Duration)> {
        let secs = Duration::from_secs;
        match product {
            "json-sensor" => Some((Payload::JsonSensor, secs(2))),
            "lht65" => Some((Payload::Lht65, secs(5))),
            "counter" => Some((Payload::Counter, secs(5))),
            "thermostat" | "thermostat-as" => Some((Payload::Thermostat, secs(3))),
            "gateway" => Some((Payload::Gateway { subs: Vec::new() }, secs(4))),
            _ => None,
        }
    }
}

/// A value that wanders within bounds, like a real reading.
#[derive(Debug, Clone, Copy)]
struct Walk {
    value: f64,
    min: f64,
    max: f64,
    step: f64,
}

impl Walk {
    fn next(&mut self, rng: &mut Rng) -> f64 {
        self.value = (self.value + (rng.unit() * 2.0 - 1.0) * self.step).clamp(self.min, self.max);
        self.value
    }
}

/// One simulated device.
#[derive(Debug)]
struct SimDevice {
    id: String,
    product: String,
    payload: Payload,
    period: Duration,
    /// Goes quiet for `silence.1` out of every `silence.0`, when set.
    silence: Option<(Duration, Duration)>,
    next_at: Instant,
    temperature: Walk,
    humidity: Walk,
    battery: f64,
    total: f64,
    mode: u8,
    /// A thermostat's setpoint, °C; `set_setpoint` commands change it.
    setpoint: f64,
    sent: u64,
}

/// The simulated fleet and the task that drives it.
#[derive(Debug)]
pub struct Simulator {
    devices: Vec<SimDevice>,
    rng: Rng,
    started: Instant,
}

impl Simulator {
    /// The fleet for the registered devices of `products` (those loaded).
    pub fn from_registry(registry: &DeviceRegistry, products: &[String]) -> Self {
        let mut rng = Rng(0x5eed_1ce5_u64);
        let now = Instant::now();
        let mut devices: Vec<SimDevice> = Vec::new();
        let mut by_product: std::collections::BTreeMap<&str, usize> = Default::default();
        let mut registered: Vec<_> = registry.iter().collect();
        registered.sort_by(|a, b| a.id.cmp(&b.id));
        for device in &registered {
            if !products.iter().any(|p| *p == device.product) {
                continue;
            }
            let Some((mut payload, period)) = Payload::for_product(&device.product) else {
                continue;
            };
            if let Payload::Gateway { subs } = &mut payload {
                if device.device_type != "gateway" {
                    continue; // a sub-device: its gateway reports for it
                }
                *subs = registered
                    .iter()
                    .filter(|d| d.groups.iter().any(|g| *g == device.id))
                    .map(|d| (d.id.clone(), d.device_type == "door"))
                    .collect();
            }
            let index = by_product.entry(device.product.as_str()).or_default();
            *index += 1;
            // Every third device of a product falls silent for 4 of every
            // 10 periods: long enough for a heartbeat or timeout of 2-3
            // periods to expire.
            let silence = index.is_multiple_of(3).then(|| (period * 10, period * 4));
            let base = 19.0 + rng.unit() * 6.0;
            devices.push(SimDevice {
                id: device.id.clone(),
                product: device.product.clone(),
                payload,
                period,
                silence,
                next_at: now + Duration::from_millis(200 + rng.below(1500)),
                temperature: Walk {
                    value: base,
                    min: -25.0,
                    max: 45.0,
                    step: 0.4,
                },
                humidity: Walk {
                    value: 35.0 + rng.unit() * 25.0,
                    min: 5.0,
                    max: 99.0,
                    step: 1.0,
                },
                battery: 60.0 + rng.unit() * 40.0,
                total: 1000.0 + rng.unit() * 500.0,
                mode: 1,
                setpoint: 21.0,
                sent: 0,
            });
        }
        Simulator {
            devices,
            rng,
            started: now,
        }
    }

    /// Applies a downlink for `device`.
    fn obey(&mut self, device: &str, payload: &[u8]) {
        let Some(device) = self.devices.iter_mut().find(|d| d.id == device) else {
            tracing::debug!(device, "a downlink for no simulated device");
            return;
        };
        match (&device.payload, payload) {
            (Payload::Thermostat, [0x02, hi, lo]) => {
                device.setpoint = f64::from(i16::from_be_bytes([*hi, *lo])) / 100.0;
                // Answer soon, as a real thermostat reports after a change.
                device.next_at = Instant::now() + Duration::from_millis(300);
            }
            _ => {
                tracing::debug!(device = %device.id, "a downlink the simulated device does not know")
            }
        }
    }

    /// How many devices send directly (gateways' sub-devices not counted).
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there is nothing to simulate.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Sends reports until `shutdown` turns true or the pipeline closes,
    /// obeying the `downlinks` commands send to its devices: a
    /// thermostat takes `02` + a setpoint (signed big-endian 0.01 °C) and
    /// reports it from its next frame on.
    pub async fn run(
        mut self,
        ingest: Ingest,
        mut downlinks: tokio::sync::mpsc::Receiver<crate::commands::transport::SimulatedDownlink>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let sent = metrics::counter!("sluice_ingest_messages_total", "source" => "simulator");
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some((device, payload)) = downlinks.recv() => {
                    self.obey(&device, &payload);
                    continue;
                }
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let now = Instant::now();
            let elapsed = now - self.started;
            for index in 0..self.devices.len() {
                let device = &mut self.devices[index];
                if device.next_at > now {
                    continue;
                }
                device.next_at = now + device.period;
                let quiet = device.silence.is_some_and(|(every, quiet)| {
                    let every = every.as_millis().max(1);
                    elapsed.as_millis() % every >= every - quiet.as_millis()
                });
                if quiet {
                    continue;
                }
                let payload = report(device, &mut self.rng);
                let device = &self.devices[index];
                let message = RawMessage {
                    device_id: device.id.clone(),
                    product: device.product.clone(),
                    topic: format!("devices/{}/{}/telemetry", device.product, device.id),
                    payload,
                    received_at: now_ms(),
                    source: SourceKind::Internal,
                };
                if ingest
                    .submit(Envelope::new(Inbound::Data(message)))
                    .await
                    .is_err()
                {
                    tracing::debug!("the pipeline closed; the simulator stops");
                    return;
                }
                sent.increment(1);
            }
        }
    }
}

/// The next report of `device`.
fn report(device: &mut SimDevice, rng: &mut Rng) -> Vec<u8> {
    device.sent += 1;
    let temperature = device.temperature.next(rng);
    let humidity = device.humidity.next(rng);
    device.battery = (device.battery - 0.01).max(5.0);
    match &device.payload {
        Payload::JsonSensor => json!({
            "ts": now_ms(),
            "temperature": round(temperature, 2),
            "humidity": round(humidity, 1),
            "pressure": round(1013.0 + rng.unit() * 6.0 - 3.0, 2),
            "battery": round(2.9 + device.battery / 100.0 * 0.7, 2),
            "rssi": -50 - i64::try_from(rng.below(40)).unwrap_or(0),
            "status": "ok",
            "door_open": rng.below(20) == 0,
        })
        .to_string()
        .into_bytes(),
        Payload::Lht65 => lht65_uplink(&device.id, temperature - 15.0, humidity, device.battery),
        Payload::Counter => {
            device.total += 0.2 + rng.unit() * 1.5;
            json!({"total": round(device.total, 2), "ts": now_ms()})
                .to_string()
                .into_bytes()
        }
        Payload::Thermostat => {
            if device.sent.is_multiple_of(15) {
                device.mode = (device.mode + 1) % 4;
            }
            let heating = device.mode == 1 || (device.mode == 3 && temperature < 21.0);
            let window = rng.below(30) == 0;
            let flags =
                device.mode | if heating { 0x10 } else { 0 } | if window { 0x20 } else { 0 };
            let mut frame = vec![1];
            frame.extend(centi(temperature));
            frame.extend(centi(device.setpoint));
            frame.push(humidity.round() as u8);
            frame.push(flags);
            frame.push(device.battery.round() as u8);
            frame
        }
        Payload::Gateway { subs } => {
            let entries: Vec<_> = subs
                .iter()
                .enumerate()
                .map(|(i, (id, door))| {
                    if *door {
                        // A door contact: opens now and then, and drops
                        // off the gateway's radio for a while.
                        let online = device.sent % 12 < 8;
                        if !online {
                            return json!({"id": id, "online": false});
                        }
                        let open = rng.below(6) == 0;
                        let mut entry = json!({"id": id, "online": true, "open": open});
                        if open {
                            entry["event"] = json!("door_opened");
                        }
                        entry
                    } else {
                        json!({
                            "id": id,
                            "temperature": round(temperature + i as f64, 2),
                            "humidity": round(humidity, 1),
                        })
                    }
                })
                .collect();
            json!({
                "ts": now_ms(),
                "gateway": {"uptime_s": device.sent * device.period.as_secs()},
                "devices": entries,
            })
            .to_string()
            .into_bytes()
        }
    }
}

/// A Dragino LHT65 fPort 2 uplink as a ChirpStack v4 event: battery voltage
/// and status, SHT temperature and humidity, and a DS18B20 probe.
fn lht65_uplink(dev_eui: &str, temperature: f64, humidity: f64, battery: f64) -> Vec<u8> {
    let millivolts = (2900.0 + battery / 100.0 * 300.0).round() as u16;
    let status: u16 = if battery > 40.0 { 3 } else { 2 };
    let mut bytes = Vec::with_capacity(11);
    bytes.extend((status << 14 | (millivolts & 0x3fff)).to_be_bytes());
    bytes.extend(centi(temperature));
    bytes.extend(((humidity * 10.0).round() as u16).to_be_bytes());
    bytes.push(0x01); // external sensor: temperature probe
    bytes.extend(centi(temperature - 1.5));
    bytes.extend([0x7f, 0xff]);
    json!({
        "fPort": 2,
        "data": base64::engine::general_purpose::STANDARD.encode(&bytes),
        "deviceInfo": {"devEui": dev_eui},
    })
    .to_string()
    .into_bytes()
}

/// A temperature as the devices send it: signed big-endian hundredths of a degree.
fn centi(celsius: f64) -> [u8; 2] {
    ((celsius * 100.0).round() as i16).to_be_bytes()
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A small deterministic generator (xorshift64*): the demo needs variety,
/// not unpredictability.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An integer in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lht65_uplink_follows_the_vendor_layout() {
        let uplink: serde_json::Value =
            serde_json::from_slice(&lht65_uplink("a84041000181c061", 28.29, 88.6, 100.0)).unwrap();
        assert_eq!(uplink["fPort"], 2);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(uplink["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(bytes.len(), 11);
        // Battery status 3, 3200 mV; 28.29 °C; 88.6 %; probe 26.79 °C.
        assert_eq!(&bytes[..7], &[0xcc, 0x80, 0x0b, 0x0d, 0x03, 0x76, 0x01]);
        assert_eq!(i16::from_be_bytes([bytes[7], bytes[8]]), 2679);
    }

    #[test]
    fn walks_stay_in_their_bounds() {
        let mut rng = Rng(7);
        let mut walk = Walk {
            value: 44.9,
            min: -25.0,
            max: 45.0,
            step: 5.0,
        };
        for _ in 0..10_000 {
            let v = walk.next(&mut rng);
            assert!((-25.0..=45.0).contains(&v));
        }
    }
}
