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
//
// Commands: `configure {"interval_s": 30, "temp_max": 28.5}` (either member,
// or both) becomes the JSON downlink `{"configure": {...}, "id": "<command
// id>"}`. The sensor answers with a report that carries `"reply_to": "<command
// id>"` (and `"error"` when it refused): a reply with the report's other
// members, instead of telemetry.

import {
  Command,
  Downlink,
  Encoded,
  Message,
  Output,
  Result,
  Severity,
  Value,
  ValueKind,
  formatNumber,
  paramFloat,
} from "sluice-script";

export function parse(message: Message): Result {
  const json = message.json();
  if (json.error != null) {
    return Result.err("invalid-json", `payload is not valid JSON: ${json.error!}`);
  }
  const fields = json.fields;
  const replyTo = fields.take("reply_to");
  if (replyTo != null) {
    if (replyTo.kind != ValueKind.Text) {
      return Result.err("bad-reply", `\`reply_to\` must be a command id, got ${replyTo.toString()}`);
    }
    const error = fields.take("error");
    if (error == null) return Result.ok([Output.reply(replyTo.text, fields)]);
    return Result.ok([
      Output.replyError(replyTo.text, error.kind == ValueKind.Text ? error.text : "the sensor answered an error"),
    ]);
  }
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

/** `configure`: a JSON downlink naming the command, so the reply can. */
export function encode(command: Command): Encoded {
  if (command.name != "configure") return Encoded.unknown(command);
  const params = command.params();
  if (params.error != null) return Encoded.err("invalid-params", params.error!);
  const list = params.fields.list;
  let interval: Value | null = null;
  let limit: Value | null = null;
  for (let i = 0; i < list.length; i++) {
    const field = unchecked(list[i]);
    if (field.key == "interval_s") {
      const value = field.value;
      if (value.kind != ValueKind.Integer || value.bits < 1 || value.bits > 86_400) {
        return Encoded.err("invalid-params", `\`interval_s\` = ${value.toString()} is not a valid value`);
      }
      interval = value;
    } else if (field.key == "temp_max") {
      const value = field.value;
      if (value.kind != ValueKind.Integer && value.kind != ValueKind.Float) {
        return Encoded.err("invalid-params", `\`temp_max\` = ${value.toString()} is not a valid value`);
      }
      limit = value;
    } else {
      return Encoded.err("invalid-params", `\`configure\` takes interval_s and temp_max, not "${field.key}"`);
    }
  }
  if (interval == null && limit == null) {
    return Encoded.err("invalid-params", "`configure` needs interval_s or temp_max");
  }
  // Keys in order, numbers as JSON writes them: the same text as the Rust twin.
  const members: string[] = [];
  if (interval != null) members.push(`"interval_s":${interval.bits.toString()}`);
  if (limit != null) {
    const text = limit.kind == ValueKind.Integer ? limit.bits.toString() : limit.asFloat().toString();
    members.push(`"temp_max":${text}`);
  }
  const body = `{"configure":{${members.join(",")}},"id":${quote(command.id)}}`;
  return Encoded.ok([Downlink.text(body)]);
}

/** `text` as a JSON string. */
function quote(text: string): string {
  return `"${text.replaceAll("\\", "\\\\").replaceAll("\"", "\\\"")}"`;
}
