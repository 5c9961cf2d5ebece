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
//
// Commands: `set_setpoint {"celsius": 21.5}` (5 to 30 °C) becomes the
// downlink `02` + the setpoint, signed big-endian 0.01 °C. The device's next
// frame answers it: a reply when its setpoint is the one asked, a failed
// reply when not. The device's state: byte 0 the last mode (`ff` before any
// frame), then, while a command waits, the asked setpoint (2 bytes) and the
// command id.

import {
  Command,
  Downlink,
  Encoded,
  Fields,
  LogLevel,
  Message,
  Output,
  Result,
  Severity,
  formatNumber,
  log,
  paramFloat,
  stateGet,
  stateSet,
} from "sluice-script";

const MODES: string[] = ["off", "heat", "cool", "auto"];
/** The state's mode byte before the device's first frame. */
const NO_MODE: u8 = 0xff;

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

  const state = message.state();
  const previous: i32 = state != null && state.length >= 1 && state[0] != NO_MODE ? <i32>state[0] : -1;
  if (previous >= 0 && previous != <i32>modeCode) {
    const from = previous < MODES.length ? MODES[previous] : "unknown";
    outputs.push(Output.event("mode_changed", new Fields().with("from", from).with("to", mode)));
  }
  const pending = state != null && state.length > 3;
  if (pending) {
    const asked = <i16>((<u16>state![1] << 8) | <u16>state![2]);
    const id = String.UTF8.decode(state!.buffer.slice(state!.byteOffset + 3, state!.byteOffset + state!.length));
    const reported = <i16>((<u16>message.payload[3] << 8) | <u16>message.payload[4]);
    outputs.push(
      reported == asked
        ? Output.reply(id, new Fields().with("setpoint", setpoint))
        : Output.replyError(
            id,
            `the thermostat reports a setpoint of ${formatNumber(setpoint)} °C, not the ${formatNumber(<f64>asked / 100)} °C asked`,
          ),
    );
  }
  if (previous != <i32>modeCode || pending) {
    const next = new Uint8Array(1);
    next[0] = modeCode;
    const refused = message.setState(next);
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

/** Turns `set_setpoint` into its downlink and remembers it, so the next frame can answer it. */
export function encode(command: Command): Encoded {
  if (command.name != "set_setpoint") return Encoded.unknown(command);
  const params = command.params();
  if (params.error != null) return Encoded.err("invalid-params", params.error!);
  const celsius = params.getFloat("celsius");
  if (isNaN(celsius) || params.fields.length != 1) {
    return Encoded.err("invalid-params", "set_setpoint takes {\"celsius\": <number>}");
  }
  if (celsius < 5 || celsius > 30) {
    return Encoded.err("invalid-params", `a setpoint of ${formatNumber(celsius)} °C is outside 5 to 30 °C`);
  }
  const setpoint = <i16>Math.round(celsius * 100);
  const old = stateGet(command.deviceId);
  const id = Uint8Array.wrap(String.UTF8.encode(command.id));
  const state = new Uint8Array(3 + id.length);
  state[0] = old != null && old.length >= 1 ? old[0] : NO_MODE;
  state[1] = <u8>(<u16>setpoint >> 8);
  state[2] = <u8>(<u16>setpoint & 0xff);
  state.set(id, 3);
  const refused = stateSet(command.deviceId, state);
  if (refused != null) return Encoded.err(refused.code, refused.message);
  const frame = new Uint8Array(3);
  frame[0] = 0x02;
  frame[1] = state[1];
  frame[2] = state[2];
  return Encoded.ok([new Downlink(frame)]);
}
