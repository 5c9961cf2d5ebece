// Functions the host offers to scripts (WIT interface `host`), lowered to
// the canonical ABI by hand: strings go out as UTF-8 (pointer, length);
// results that do not fit in one value come back through a return area.

import { ScriptError } from "./output";
import { PackedReader, Scratch, freeBlock, takeBytes, takeString } from "./memory";
import { Fields, readFields } from "./value";

/** How important a log line is. */
export enum LogLevel {
  Trace = 0,
  Debug = 1,
  Info = 2,
  Warn = 3,
  Error = 4,
}

@external("sluice:script/host@0.2.1", "log")
declare function hostLog(level: i32, ptr: usize, len: usize): void;

@external("sluice:script/host@0.2.1", "state-get")
declare function hostStateGet(ptr: usize, len: usize, ret: usize): void;

@external("sluice:script/host@0.2.1", "state-set")
declare function hostStateSet(idPtr: usize, idLen: usize, valPtr: usize, valLen: usize, ret: usize): void;

@external("sluice:script/host@0.2.1", "param")
declare function hostParam(ptr: usize, len: usize, ret: usize): void;

@external("sluice:script/host@0.2.1", "json-fields")
declare function hostJsonFields(ptr: usize, len: usize, ret: usize): void;

// The return area of the imports: an option or result discriminant at 0 and
// its payload at 4 and 8. One call at a time uses it.
const RET_AREA: usize = memory.data(12, 8);

/** Writes a line to the host's log, tagged with the product and script version. */
export function log(level: LogLevel, message: string): void {
  const utf8 = Scratch.utf8(message);
  hostLog(<i32>level, utf8, Scratch.length);
}

/** The state this product's script last stored for `deviceId`, or `null`. */
export function stateGet(deviceId: string): Uint8Array | null {
  const id = Scratch.utf8(deviceId);
  return stateGetUtf8(id, Scratch.length);
}

/** `stateGet` of a device id given as `len` UTF-8 bytes at `ptr`. */
export function stateGetUtf8(ptr: usize, len: usize): Uint8Array | null {
  hostStateGet(ptr, len, RET_AREA);
  if (load<u8>(RET_AREA) == 0) return null;
  return takeBytes(load<u32>(RET_AREA, 4), load<u32>(RET_AREA, 8));
}

/**
 * Stores state for `deviceId`, replacing what was there; an empty value
 * deletes it. Returns `null`, or an error when the value is larger than the
 * host's limit or the host keeps state for as many devices as it allows.
 */
export function stateSet(deviceId: string, value: Uint8Array): ScriptError | null {
  const id = Scratch.utf8(deviceId);
  return stateSetUtf8(id, Scratch.length, value);
}

/** `stateSet` of a device id given as `len` UTF-8 bytes at `ptr`. */
export function stateSetUtf8(ptr: usize, len: usize, value: Uint8Array): ScriptError | null {
  hostStateSet(ptr, len, value.dataStart, <usize>value.byteLength, RET_AREA);
  if (load<u8>(RET_AREA) == 0) return null;
  const limit = load<u32>(RET_AREA, 8);
  if (load<u8>(RET_AREA, 4) == 0) {
    return new ScriptError(
      "state-too-large",
      `state of ${value.byteLength} bytes is larger than the host's limit of ${limit} bytes`,
    );
  }
  return new ScriptError(
    "state-full",
    `the host already keeps state for ${limit} devices of this product`,
  );
}

/** The product parameter `key` from the host's configuration, or `null`. */
export function param(key: string): string | null {
  const utf8 = Scratch.utf8(key);
  hostParam(utf8, Scratch.length, RET_AREA);
  if (load<u8>(RET_AREA) == 0) return null;
  return takeString(load<u32>(RET_AREA, 4), load<u32>(RET_AREA, 8));
}

/** The product parameter `key` as a number; `fallback` when unset or not a number. */
export function paramFloat(key: string, fallback: f64): f64 {
  const text = param(key);
  if (text == null) return fallback;
  const value = parseFloat(text);
  return isFinite(value) ? value : fallback;
}

/**
 * `text` parsed by the host as a JSON object: its members as fields, in
 * document order (nested objects and arrays as JSON text); or why it is
 * not one, in `error`.
 */
export function jsonFields(text: Uint8Array): JsonFields {
  hostJsonFields(text.dataStart, <usize>text.byteLength, RET_AREA);
  const ptr = load<u32>(RET_AREA, 4);
  const len = load<u32>(RET_AREA, 8);
  if (load<u8>(RET_AREA) != 0) return new JsonFields(new Fields(), takeString(ptr, len));
  const fields = readFields(new PackedReader(ptr, len));
  freeBlock(ptr, len);
  return new JsonFields(fields, null);
}

/** What `jsonFields` answers. */
export class JsonFields {
  constructor(
    public readonly fields: Fields,
    public readonly error: string | null,
  ) {}
}
