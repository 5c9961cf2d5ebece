// JSON payloads: parsed natively by the host (the `json-fields` host
// function), read here through typed getters.

import { Fields, Value, ValueKind } from "./value";
import { jsonFields } from "./host";

/**
 * A JSON object: its members in document order as `fields`, with typed
 * getters. Nested objects and arrays are kept as their JSON text (a `json`
 * value); `getObject` parses a nested object. When the text was not a JSON
 * object, `error` says why and every getter answers its fallback.
 *
 *   const json = message.json();
 *   if (json.error != null) return Result.err("invalid-json", json.error!);
 *   const celsius = json.getFloat("temperature");
 */
export class JsonObject {
  constructor(
    /** The members, in document order. */
    public readonly fields: Fields,
    /** Why the text is not a JSON object, or `null`. */
    public readonly error: string | null,
  ) {}

  /** Parses UTF-8 JSON text. */
  static parse(text: Uint8Array): JsonObject {
    const parsed = jsonFields(text);
    return new JsonObject(parsed.fields, parsed.error);
  }

  /** Whether the object has `key`. */
  has(key: string): bool {
    return this.fields.get(key) != null;
  }
  /** The value of `key`, or `null` when absent. */
  get(key: string): Value | null {
    return this.fields.get(key);
  }
  /** `key` as a number (integers convert); `fallback` when absent or not a number. */
  getFloat(key: string, fallback: f64 = NaN): f64 {
    const value = this.fields.get(key);
    if (value == null) return fallback;
    if (value.kind == ValueKind.Float || value.kind == ValueKind.Integer) return value.asFloat();
    return fallback;
  }
  /** `key` as a whole number; `fallback` when absent or not an integer. */
  getInteger(key: string, fallback: i64 = 0): i64 {
    const value = this.fields.get(key);
    return value != null && value.kind == ValueKind.Integer ? value.bits : fallback;
  }
  /** `key` as text; `null` when absent or not a string. */
  getString(key: string): string | null {
    const value = this.fields.get(key);
    return value != null && value.kind == ValueKind.Text ? value.text : null;
  }
  /** `key` as a boolean; `fallback` when absent or not a boolean. */
  getBool(key: string, fallback: bool = false): bool {
    const value = this.fields.get(key);
    return value != null && value.kind == ValueKind.Boolean ? value.bits != 0 : fallback;
  }
  /** The JSON text of a nested object or array at `key`; `null` otherwise. */
  getJson(key: string): string | null {
    const value = this.fields.get(key);
    return value != null && value.kind == ValueKind.Json ? value.text : null;
  }
  /** The nested object at `key`, parsed; its `error` is set when there is none. */
  getObject(key: string): JsonObject {
    const text = this.getJson(key);
    if (text == null) return new JsonObject(new Fields(), `member "${key}" is not an object`);
    return JsonObject.parse(Uint8Array.wrap(String.UTF8.encode(text)));
  }
  /** The member names, in document order. */
  keys(): string[] {
    const list = this.fields.list;
    const keys = new Array<string>(list.length);
    for (let i = 0; i < list.length; i++) keys[i] = unchecked(list[i]).key;
    return keys;
  }
}
