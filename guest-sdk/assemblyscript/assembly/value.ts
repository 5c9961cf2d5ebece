// Typed field values and the `Fields` builder (the packed encoding's
// `value` and `fields`).

import { PackedReader } from "./memory";

/** Which kind of value a `Value` holds; the numbers are the packed encoding's tags. */
export enum ValueKind {
  Null = 0,
  Boolean = 1,
  Integer = 2,
  Float = 3,
  Text = 4,
  Json = 5,
}

/** A typed field value: null, boolean, integer, float, text, or nested JSON text. */
export class Value {
  private constructor(
    public readonly kind: ValueKind,
    public readonly bits: i64,
    public readonly text: string,
  ) {}

  // Values never change, so null and the booleans are shared.
  private static readonly NULL: Value = new Value(ValueKind.Null, 0, "");
  private static readonly TRUE: Value = new Value(ValueKind.Boolean, 1, "");
  private static readonly FALSE: Value = new Value(ValueKind.Boolean, 0, "");

  /** JSON `null`. */
  static null(): Value {
    return Value.NULL;
  }
  /** `true` or `false`. */
  static boolean(value: bool): Value {
    return value ? Value.TRUE : Value.FALSE;
  }
  /** A whole number. */
  static integer(value: i64): Value {
    return new Value(ValueKind.Integer, value, "");
  }
  /** A finite floating-point number (the host refuses NaN and infinities). */
  static float(value: f64): Value {
    return new Value(ValueKind.Float, reinterpret<i64>(value), "");
  }
  /** A UTF-8 string. */
  static text(value: string): Value {
    return new Value(ValueKind.Text, 0, value);
  }
  /** A nested JSON document (object or array), given as JSON text. */
  static json(value: string): Value {
    return new Value(ValueKind.Json, 0, value);
  }

  /** The value of any AssemblyScript number, bool or string, chosen by its type. */
  static of<T>(value: T): Value {
    if (isBoolean<T>()) {
      return Value.boolean(<bool>value);
    } else if (isInteger<T>()) {
      return Value.integer(<i64>value);
    } else if (isFloat<T>()) {
      return Value.float(<f64>value);
    } else if (isString<T>()) {
      if (isNullable<T>()) {
        if (changetype<usize>(value) == 0) return Value.null();
      }
      return Value.text(changetype<string>(value));
    } else if (isManaged<T>()) {
      if (changetype<usize>(value) == 0) return Value.null();
      return changetype<Value>(value);
    } else {
      ERROR("Value.of takes a bool, an integer, a float, a string or a Value");
    }
  }

  /** The float held, or NaN for other kinds (integers convert). */
  asFloat(): f64 {
    if (this.kind == ValueKind.Float) return reinterpret<f64>(this.bits);
    if (this.kind == ValueKind.Integer) return <f64>this.bits;
    return NaN;
  }
  /** The integer held, or 0 for other kinds. */
  asInteger(): i64 {
    return this.kind == ValueKind.Integer ? this.bits : 0;
  }
  /** The boolean held, or false for other kinds. */
  asBoolean(): bool {
    return this.kind == ValueKind.Boolean && this.bits != 0;
  }
  /** The text held (for `json` values, the JSON text), or `null` for other kinds. */
  asText(): string | null {
    return this.kind == ValueKind.Text || this.kind == ValueKind.Json ? this.text : null;
  }
  /** Whether it is JSON `null`. */
  get isNull(): bool {
    return this.kind == ValueKind.Null;
  }
  /** The value for people: `null`, `true`, `42`, `21.5`, the text, or the JSON text. */
  toString(): string {
    switch (this.kind) {
      case ValueKind.Null:
        return "null";
      case ValueKind.Boolean:
        return this.bits != 0 ? "true" : "false";
      case ValueKind.Integer:
        return this.bits.toString();
      case ValueKind.Float:
        return formatNumber(reinterpret<f64>(this.bits));
      default:
        return this.text;
    }
  }
}

/**
 * A named value, such as `temperature = 21.5`. The value is stored in the
 * field itself (its kind, bits and text, as in `Value`), so a field costs one
 * object, not two; `value` hands it out as a `Value`.
 */
export class Field {
  constructor(
    public readonly key: string,
    public readonly kind: ValueKind,
    public readonly bits: i64,
    public readonly text: string,
  ) {}

  /** `key = value`. */
  static of(key: string, value: Value): Field {
    return new Field(key, value.kind, value.bits, value.text);
  }

  /** `key = value`, the value chosen by its type as `Value.of` does. */
  static from<T>(key: string, value: T): Field {
    if (isBoolean<T>()) {
      return new Field(key, ValueKind.Boolean, <bool>value ? 1 : 0, "");
    } else if (isInteger<T>()) {
      return new Field(key, ValueKind.Integer, <i64>value, "");
    } else if (isFloat<T>()) {
      return new Field(key, ValueKind.Float, reinterpret<i64>(<f64>value), "");
    } else {
      return Field.of(key, Value.of<T>(value));
    }
  }

  /** The value. */
  get value(): Value {
    switch (this.kind) {
      case ValueKind.Null:
        return Value.null();
      case ValueKind.Boolean:
        return Value.boolean(this.bits != 0);
      case ValueKind.Integer:
        return Value.integer(this.bits);
      case ValueKind.Float:
        return Value.float(reinterpret<f64>(this.bits));
      case ValueKind.Text:
        return Value.text(this.text);
      default:
        return Value.json(this.text);
    }
  }
}

/**
 * An ordered list of fields, built with `with`. A key given twice keeps its
 * last value, at the place of its first: that is how sluice stores the
 * fields, and how `get` and `take` read them.
 */
export class Fields {
  list: Field[] = [];

  /**
   * Adds `key = value` and returns the builder, so calls chain:
   * `new Fields().with("temperature", 21.5).with("door_open", false)`.
   * Integers become integer values, floats float values, strings text;
   * pass a `Value` for null or nested JSON.
   */
  with<T>(key: string, value: T): Fields {
    this.list.push(Field.from<T>(key, value));
    return this;
  }

  /** The value of `key`, if present (its last, if given more than once). */
  get(key: string): Value | null {
    for (let i = this.list.length - 1; i >= 0; i--) {
      const field = unchecked(this.list[i]);
      if (field.key == key) return field.value;
    }
    return null;
  }

  /** Removes `key` and returns its value (its last, if given more than once). */
  take(key: string): Value | null {
    let taken: Value | null = null;
    const kept = new Array<Field>(0);
    for (let i = 0; i < this.list.length; i++) {
      const field = unchecked(this.list[i]);
      if (field.key == key) {
        taken = field.value;
      } else {
        kept.push(field);
      }
    }
    if (taken != null) this.list = kept;
    return taken;
  }

  /** How many fields there are. */
  get length(): i32 {
    return this.list.length;
  }
}

/**
 * `value` for people: whole numbers without a fraction (`15`, `-2`), others
 * as AssemblyScript prints them (`21.5`).
 */
export function formatNumber(value: f64): string {
  if (isFinite(value) && value == Math.floor(value) && Math.abs(value) < 9.0e15) {
    return (<i64>value).toString();
  }
  return value.toString();
}

/** Reads packed `fields`, as the host's `json-fields` answers them. */
export function readFields(r: PackedReader): Fields {
  const fields = new Fields();
  const count = <i32>r.u32();
  for (let i = 0; i < count && !r.short; i++) {
    const key = r.string();
    fields.list.push(readField(key, r));
  }
  return fields;
}

function readField(key: string, r: PackedReader): Field {
  switch (<i32>r.u8()) {
    case ValueKind.Boolean:
      return new Field(key, ValueKind.Boolean, r.u8() != 0 ? 1 : 0, "");
    case ValueKind.Integer:
      return new Field(key, ValueKind.Integer, r.i64(), "");
    case ValueKind.Float:
      return new Field(key, ValueKind.Float, reinterpret<i64>(r.f64()), "");
    case ValueKind.Text:
      return new Field(key, ValueKind.Text, 0, r.string());
    case ValueKind.Json:
      return new Field(key, ValueKind.Json, 0, r.string());
    default:
      return new Field(key, ValueKind.Null, 0, "");
  }
}
