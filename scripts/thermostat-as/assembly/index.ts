// Data script for a radiator thermostat that reports an 8-byte status frame:
//
//   byte 0     frame version, 0x01
//   bytes 1-2  room temperature, signed big-endian, 0.01 °C
//   bytes 3-4  setpoint, signed big-endian, 0.01 °C
//   byte 5     relative humidity, %
//   byte 6     bits 0-3: mode (0 off, 1 heat, 2 cool, 3 auto);
//              bit 4: valve open (heating); bit 5: window open
//   byte 7     battery, %
//
// Sample: `01 08 98 08 34 2d 11 4b` →
//   telemetry {temperature: 22.0, setpoint: 21.0, humidity: 45, mode: "heat",
//              heating: true, window_open: false, battery: 75}
// plus a `mode_changed` event when the mode differs from the device's last
// frame (kept in per-device state), an alert when a window is open while the
// valve heats, and alerts below the `battery_low` (%) and `frost_below` (°C)
// params.

import {
  Fields,
  LogLevel,
  Message,
  Output,
  Result,
  Severity,
  formatNumber,
  log,
  paramFloat,
} from "sluice-script";

const MODES: string[] = ["off", "heat", "cool", "auto"];

export function parse(message: Message): Result {
  if (message.payload.length != 8) {
    return Result.err(
      "bad-length",
      `a thermostat frame has 8 bytes, this one has ${message.payload.length}`,
    );
  }
  const r = message.reader();
  const version = r.u8();
  if (version != 1) {
    return Result.err("unknown-version", `frame version ${version} is not supported (expected 1)`);
  }
  const temperature = <f64>r.i16be() / 100;
  const setpoint = <f64>r.i16be() / 100;
  const humidity = r.u8();
  const flags = r.u8();
  const battery = r.u8();
  const modeCode = flags & 0x0f;
  if (modeCode >= <u8>MODES.length) {
    return Result.err("unknown-mode", `mode ${modeCode} is not one of 0 (off) to 3 (auto)`);
  }
  const mode = MODES[modeCode];
  const heating = (flags & 0x10) != 0;
  const windowOpen = (flags & 0x20) != 0;

  const outputs: Output[] = [
    Output.telemetry(
      new Fields()
        .with("temperature", temperature)
        .with("setpoint", setpoint)
        .with("humidity", humidity)
        .with("mode", mode)
        .with("heating", heating)
        .with("window_open", windowOpen)
        .with("battery", battery),
    ),
  ];

  const previous = message.state();
  if (previous != null && previous.length == 1 && previous[0] != modeCode) {
    const from = previous[0] < <u8>MODES.length ? MODES[previous[0]] : "unknown";
    outputs.push(Output.event("mode_changed", new Fields().with("from", from).with("to", mode)));
  }
  if (previous == null || previous.length != 1 || previous[0] != modeCode) {
    const state = new Uint8Array(1);
    state[0] = modeCode;
    const refused = message.setState(state);
    if (refused != null) log(LogLevel.Warn, `mode not remembered: ${refused.message}`);
  }

  if (windowOpen && heating) {
    outputs.push(
      Output.alert(
        Severity.Warning,
        "Window open while heating",
        `the valve is open at ${formatNumber(temperature)} °C with the window open`,
      ),
    );
  }
  const batteryLow = paramFloat("battery_low", 15);
  if (<f64>battery < batteryLow) {
    outputs.push(
      Output.alert(Severity.Warning, "Battery low", `battery at ${battery} % (below ${formatNumber(batteryLow)} %)`),
    );
  }
  const frostBelow = paramFloat("frost_below", 5);
  if (temperature < frostBelow) {
    outputs.push(
      Output.alert(
        Severity.Critical,
        "Frost risk",
        `room at ${formatNumber(temperature)} °C is below ${formatNumber(frostBelow)} °C`,
      ),
    );
  }
  return Result.ok(outputs);
}
