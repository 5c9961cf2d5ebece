// The canonical-ABI glue between the `sluice:script/script` world and a
// script's `parse`. Script authors never import this file: the transform in
// `transform.js` generates the exports that call it.
//
// Layouts (canonical ABI, wasm32), offsets in bytes:
//   message (48, align 8): device-id 0, product 8, topic 16, payload 24,
//     received-at 32, source 40
//   result<list<output>, script-error> (20, align 4): tag 0, payload 4
//   output (56, align 8): option<string> device-id 0 (tag 0, string 4),
//     option<s64> timestamp 16 (tag 16, value 24), output-kind 32 (tag 32,
//     payload 36)
//   field (24, align 8): key 0, value 8 (tag 8, payload 16)
//   string / list: (pointer u32, length u32)

import { Message } from "./assembly/message";
import { Field, Fields, ValueKind } from "./assembly/value";
import { Output, OutputKind, Result } from "./assembly/output";
import { freeBlock, realloc, releaseResult, resultBlock, storeString, takeBytes, takeString } from "./assembly/memory";

export { realloc, releaseResult };

const MESSAGE_SIZE: usize = 48;
const RESULT_SIZE: usize = 20;
const OUTPUT_SIZE: usize = 56;
const FIELD_SIZE: usize = 24;

/** The message passed to `parse` as flat arguments. */
export function liftMessage(
  devicePtr: usize, deviceLen: usize,
  productPtr: usize, productLen: usize,
  topicPtr: usize, topicLen: usize,
  payloadPtr: usize, payloadLen: usize,
  receivedAt: i64, source: i32,
): Message {
  return new Message(
    takeString(devicePtr, deviceLen),
    takeString(productPtr, productLen),
    takeString(topicPtr, topicLen),
    takeBytes(payloadPtr, payloadLen),
    receivedAt,
    source,
  );
}

/** The messages passed to `parse-batch`; frees the list. */
export function liftMessages(ptr: usize, len: usize): Message[] {
  const messages = new Array<Message>(<i32>len);
  for (let i: usize = 0; i < len; i++) {
    const at = ptr + i * MESSAGE_SIZE;
    messages[<i32>i] = liftMessage(
      load<u32>(at, 0), load<u32>(at, 4),
      load<u32>(at, 8), load<u32>(at, 12),
      load<u32>(at, 16), load<u32>(at, 20),
      load<u32>(at, 24), load<u32>(at, 28),
      load<i64>(at, 32), <i32>load<u8>(at, 40),
    );
  }
  freeBlock(ptr, len * MESSAGE_SIZE);
  return messages;
}

/** `parse`'s return value: the address of a lowered result. */
export function lowerResult(result: Result): usize {
  const at = resultBlock(RESULT_SIZE);
  storeResult(at, result);
  return at;
}

/** `parse-batch`'s return value: the address of a lowered list of results. */
export function lowerResults(results: Result[]): usize {
  const len = <usize>results.length;
  const list = resultBlock(len * RESULT_SIZE);
  for (let i: usize = 0; i < len; i++) {
    storeResult(list + i * RESULT_SIZE, unchecked(results[<i32>i]));
  }
  const at = resultBlock(8);
  store<u32>(at, <u32>list);
  store<u32>(at, <u32>len, 4);
  return at;
}

function storeResult(at: usize, result: Result): void {
  const error = result.error;
  if (error != null) {
    store<u8>(at, 1);
    storeString(at + 4, error.code);
    storeString(at + 12, error.message);
    return;
  }
  const outputs = result.outputs;
  const len = <usize>outputs.length;
  const list = resultBlock(len * OUTPUT_SIZE);
  for (let i: usize = 0; i < len; i++) {
    storeOutput(list + i * OUTPUT_SIZE, unchecked(outputs[<i32>i]));
  }
  store<u8>(at, 0);
  store<u32>(at, <u32>list, 4);
  store<u32>(at, <u32>len, 8);
}

function storeOutput(at: usize, output: Output): void {
  const deviceId = output.deviceId;
  if (deviceId != null) {
    store<u8>(at, 1);
    storeString(at + 4, deviceId);
  }
  if (output.hasTimestamp) {
    store<u8>(at, 1, 16);
    store<i64>(at, output.timestamp, 24);
  }
  const kind = at + 32;
  store<u8>(kind, <u8>output.kind);
  const payload = kind + 4;
  switch (output.kind) {
    case OutputKind.Telemetry:
    case OutputKind.Attributes:
      storeFields(payload, output.fields);
      break;
    case OutputKind.Event:
      storeString(payload, output.name);
      storeFields(payload + 8, output.fields);
      break;
    case OutputKind.Alert:
      store<u8>(payload, <u8>output.severity);
      storeString(payload + 4, output.title);
      storeString(payload + 12, output.description);
      break;
    default:
      store<u8>(payload, output.online ? 1 : 0);
  }
}

function storeFields(at: usize, fields: Fields | null): void {
  if (fields == null) {
    store<u32>(at, 8);
    store<u32>(at, 0, 4);
    return;
  }
  const list = fields.list;
  const len = <usize>list.length;
  const block = resultBlock(len * FIELD_SIZE);
  for (let i: usize = 0; i < len; i++) {
    storeField(block + i * FIELD_SIZE, unchecked(list[<i32>i]));
  }
  store<u32>(at, <u32>block);
  store<u32>(at, <u32>len, 4);
}

function storeField(at: usize, field: Field): void {
  storeString(at, field.key);
  const value = field.value;
  store<u8>(at, <u8>value.kind, 8);
  switch (value.kind) {
    case ValueKind.Boolean:
      store<u8>(at, <u8>value.bits, 16);
      break;
    case ValueKind.Integer:
    case ValueKind.Float:
      store<i64>(at, value.bits, 16);
      break;
    case ValueKind.Text:
    case ValueKind.Json:
      storeString(at + 16, value.text);
      break;
    default:
      break;
  }
}
