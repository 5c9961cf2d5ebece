// sluice-script: write sluice data scripts in AssemblyScript.
//
// A script is one exported function, `parse(message: Message): Result`, in
// `assembly/index.ts`; build it with `npm run build` and sluice runs the
// resulting `.wasm` like a Rust script: same limits, same metrics.
//
//   import { Fields, Message, Output, Result, paramFloat } from "sluice-script";
//
//   export function parse(message: Message): Result {
//     const r = message.reader();
//     const celsius = <f64>r.i16be() / 100;
//     if (r.truncated) return Result.err("short-payload", "expected 2 bytes");
//     const out = [Output.telemetry(new Fields().with("temperature", celsius))];
//     if (celsius > paramFloat("temp_max", 40)) {
//       out.push(Output.alert(Severity.Warning, "Temperature high", `${celsius} °C`));
//     }
//     return Result.ok(out);
//   }
//
// A product that accepts commands also exports `encode`:
//
//   export function encode(command: Command): Encoded {
//     if (command.name != "set_setpoint") return Encoded.unknown(command);
//     const celsius = command.params().getFloat("celsius");
//     ...
//     return Encoded.ok([new Downlink(frame)]);
//   }

export { Value, ValueKind, Field, Fields, formatNumber } from "./assembly/value";
export { Output, OutputKind, Severity, ScriptError, Result } from "./assembly/output";
export { Message, SourceKind } from "./assembly/message";
export { Command, Downlink, Encoded } from "./assembly/command";
export { JsonObject } from "./assembly/json";
export { Reader, hexEncode, hexDecode } from "./assembly/binary";
export { LogLevel, log, param, paramFloat, stateGet, stateSet } from "./assembly/host";
