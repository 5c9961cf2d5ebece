// `json-sensor` in AssemblyScript: a JSON object of readings → one telemetry
// output, plus an alert when `temperature` exceeds the product parameter
// `temp_max`. The same script as `scripts/json-sensor` (Rust), passing the
// same fixtures.
//
// Input payload:
//
//   {"ts": 1732262400000, "temperature": 31.5, "humidity": 48.2, "status": "ok"}
//
// Outputs (with `temp_max = "30"`):
//
//   [{"type": "telemetry", "timestamp": 1732262400000,
//     "fields": {"temperature": 31.5, "humidity": 48.2, "status": "ok"}},
//    {"type": "alert", "timestamp": 1732262400000, "severity": "warning",
//     "title": "Temperature high", "description": "temperature 31.5 is above the limit 30"}]
//
// Every member of the object becomes a field (nested objects and arrays
// stay JSON); an optional integer `ts` (milliseconds since the Unix epoch)
// becomes the outputs' timestamp instead of a field.

import { Message, Output, Result, Severity, ValueKind, formatNumber, paramFloat } from "sluice-script";

export function parse(message: Message): Result {
  const json = message.json();
  if (json.error != null) {
    return Result.err("invalid-json", `payload is not valid JSON: ${json.error!}`);
  }
  const fields = json.fields;
  const ts = fields.take("ts");
  if (ts != null && ts.kind != ValueKind.Integer) {
    return Result.err(
      "bad-timestamp",
      `\`ts\` must be an integer of milliseconds, got ${ts.toString()}`,
    );
  }
  const outputs: Output[] = [Output.telemetry(fields)];
  const temperature = fields.get("temperature");
  const limit = tempMax();
  if (
    temperature != null &&
    (temperature.kind == ValueKind.Float || temperature.kind == ValueKind.Integer) &&
    temperature.asFloat() > limit
  ) {
    outputs.push(
      Output.alert(
        Severity.Warning,
        "Temperature high",
        `temperature ${formatNumber(temperature.asFloat())} is above the limit ${formatNumber(limit)}`,
      ),
    );
  }
  if (ts != null) {
    for (let i = 0; i < outputs.length; i++) outputs[i].at(ts.bits);
  }
  return Result.ok(outputs);
}

// The `temp_max` parameter, read once: parameters are fixed for the life of
// a script instance. NaN (never exceeded) when it is not set.
let limitRead = false;
let limitValue: f64 = NaN;

function tempMax(): f64 {
  if (!limitRead) {
    limitValue = paramFloat("temp_max", NaN);
    limitRead = true;
  }
  return limitValue;
}
