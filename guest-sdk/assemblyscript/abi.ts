// The glue between the `sluice:script@0.2.1` world and a script's `parse`
// (and `encode`).
// Script authors never import this file: the transform in `transform.js`
// generates the exports that call it.
//
// Messages arrive and outputs leave in the packed encoding of the world
// (`wit/script.wit`, `docs/script-abi.md`): one `list<u8>` each way. The
// canonical ABI around it, in wasm32 terms:
//
//   parse(ptr, len) -> ret        ret: result<list<u8>, script-error>
//                                 (20 bytes, align 4: tag 0; ok: ptr 4,
//                                 len 8; err: code 4..12, message 12..20)
//   parse-batch(ptr, len) -> ret  ret: list<u8> (ptr 0, len 4)
//   encode(ptr, len) -> ret       ret: as parse
//
// The answer's bytes live in the reused answer buffer (see memory.ts) and
// stay put until the next call, after the host has copied them.

import "./assembly/runtime";
import { Message } from "./assembly/message";
import { Field, Fields, ValueKind } from "./assembly/value";
import { Output, OutputKind, Result, ScriptError } from "./assembly/output";
import { Answer, PackedReader, freeBlock, realloc } from "./assembly/memory";
import { Command, Downlink, Encoded } from "./assembly/command";

export { realloc };

// The return area of `parse` and `parse-batch`.
const RET_AREA: usize = memory.data(20, 8);

/**
 * The message at the reader's position, in `raw` (the copy of the block the
 * reader reads, which starts at `base`): its strings and payload stay in
 * `raw`, referred to by offset.
 */
function readMessage(r: PackedReader, raw: ArrayBuffer, base: usize): Message {
  const idAt = r.span(base);
  const idLen = r.spanLength;
  const productAt = r.span(base);
  const productLen = r.spanLength;
  const topicAt = r.span(base);
  const topicLen = r.spanLength;
  const receivedAt = r.i64();
  const source = <i32>r.u8();
  const payloadAt = r.span(base);
  const payload = Uint8Array.wrap(raw, payloadAt, r.spanLength);
  return new Message(raw, idAt, idLen, productAt, productLen, topicAt, topicLen, payload, receivedAt, source);
}

/** The reader of `parse` and `parse-batch` messages, reused by every call. */
const MESSAGES = new PackedReader(0, 0);

/** A copy of the host's block, in the collected heap; frees the block. */
function copyBlock(ptr: usize, len: usize): ArrayBuffer {
  const raw = new ArrayBuffer(<i32>len);
  memory.copy(changetype<usize>(raw), ptr, len);
  freeBlock(ptr, len);
  return raw;
}

/** The packed message passed to `parse`; frees its block. */
export function takeMessage(ptr: usize, len: usize): Message {
  const raw = copyBlock(ptr, len);
  const base = changetype<usize>(raw);
  return readMessage(MESSAGES.reset(base, len), raw, base);
}

/** The packed messages passed to `parse-batch`; frees their block. */
export function takeMessages(ptr: usize, len: usize): Message[] {
  const raw = copyBlock(ptr, len);
  const base = changetype<usize>(raw);
  const r = MESSAGES.reset(base, len);
  const count = <i32>r.u32();
  const messages = new Array<Message>(0);
  for (let i = 0; i < count && !r.short; i++) messages.push(readMessage(r, raw, base));
  return messages;
}

/** The packed command passed to `encode`; frees its block. */
export function takeCommand(ptr: usize, len: usize): Command {
  const r = new PackedReader(ptr, len);
  const id = r.string();
  const deviceId = r.string();
  const product = r.string();
  const name = r.string();
  const params = r.string();
  const issuedAt = r.i64();
  freeBlock(ptr, len);
  return new Command(id, deviceId, product, name, params, issuedAt);
}

/** `encode`'s return value: the address of its lowered result. */
export function answerEncoded(result: Encoded): usize {
  const error = result.error;
  if (error != null) return answerError(error);
  Answer.reset();
  const downlinks = result.downlinks;
  Answer.u32(<u32>downlinks.length);
  for (let i = 0; i < downlinks.length; i++) putDownlink(unchecked(downlinks[i]));
  return answerOk();
}

function putDownlink(downlink: Downlink): void {
  const topic = downlink.topic;
  const flags =
    (topic != null ? 1 : 0) |
    (downlink.fport != 0 ? 2 : 0) |
    (downlink.confirmed ? 4 : 0) |
    (downlink.qos >= 0 ? 8 : 0);
  Answer.u8(<u8>flags);
  if (topic != null) Answer.str(topic);
  if (downlink.fport != 0) Answer.u8(downlink.fport);
  if (downlink.qos >= 0) Answer.u8(<u8>downlink.qos);
  const payload = downlink.payload;
  Answer.u32(<u32>payload.length);
  const at = Answer.reserve(<usize>payload.length);
  memory.copy(at, payload.dataStart, <usize>payload.length);
  Answer.length += <usize>payload.length;
}

/** The lowered `err(script-error)`. */
function answerError(error: ScriptError): usize {
  Answer.reset();
  // Both strings go into the answer buffer; the return area points there.
  Answer.str(error.code);
  const codeLen = load<u32>(Answer.start);
  Answer.str(error.message);
  store<u8>(RET_AREA, 1);
  store<u32>(RET_AREA, <u32>(Answer.start + 4), 4);
  store<u32>(RET_AREA, codeLen, 8);
  store<u32>(RET_AREA, <u32>(Answer.start + 8 + codeLen), 12);
  store<u32>(RET_AREA, load<u32>(Answer.start + 4 + codeLen), 16);
  return RET_AREA;
}

/** The lowered `ok(list<u8>)` of the answer buffer. */
function answerOk(): usize {
  store<u8>(RET_AREA, 0);
  store<u32>(RET_AREA, <u32>Answer.start, 4);
  store<u32>(RET_AREA, <u32>Answer.length, 8);
  return RET_AREA;
}

/** `parse`'s return value: the address of its lowered result. */
export function answer(result: Result): usize {
  const error = result.error;
  if (error != null) return answerError(error);
  Answer.reset();
  putOutputs(result.outputs);
  return answerOk();
}

/** Starts `parse-batch`'s answer of `count` results. */
export function beginResults(count: i32): void {
  Answer.reset();
  Answer.u32(<u32>count);
}

/** Adds one message's result to `parse-batch`'s answer. */
export function addResult(result: Result): void {
  const error = result.error;
  Answer.u8(error != null ? 1 : 0);
  const length = Answer.hole();
  const start = Answer.length;
  if (error != null) {
    Answer.str(error.code);
    Answer.str(error.message);
  } else {
    putOutputs(result.outputs);
  }
  Answer.patch(length, <u32>(Answer.length - start));
}

/** `parse-batch`'s return value: the address of its lowered list. */
export function endResults(): usize {
  store<u32>(RET_AREA, <u32>Answer.start);
  store<u32>(RET_AREA, <u32>Answer.length, 4);
  return RET_AREA;
}

function putOutputs(outputs: Output[]): void {
  const count = outputs.length;
  Answer.u32(<u32>count);
  for (let i = 0; i < count; i++) putOutput(unchecked(outputs[i]));
}

function putOutput(output: Output): void {
  const deviceId = output.deviceId;
  Answer.u8(<u8>output.kind);
  Answer.u8((deviceId != null ? 1 : 0) | (output.hasTimestamp ? 2 : 0));
  if (deviceId != null) Answer.str(deviceId);
  if (output.hasTimestamp) Answer.i64(output.timestamp);
  switch (output.kind) {
    case OutputKind.Telemetry:
    case OutputKind.Attributes:
      putFields(output.fields);
      break;
    case OutputKind.Event:
      Answer.str(output.name);
      putFields(output.fields);
      break;
    case OutputKind.Alert:
      Answer.u8(<u8>output.severity);
      Answer.str(output.title);
      Answer.str(output.description);
      break;
    case OutputKind.Reply:
      Answer.str(output.name);
      Answer.u8(output.online ? 1 : 0);
      Answer.str(output.title);
      putFields(output.fields);
      break;
    default:
      Answer.u8(output.online ? 1 : 0);
  }
}

function putFields(fields: Fields | null): void {
  if (fields == null) {
    Answer.u32(0);
    return;
  }
  const list = fields.list;
  const count = list.length;
  Answer.u32(<u32>count);
  for (let i = 0; i < count; i++) putField(unchecked(list[i]));
}

function putField(field: Field): void {
  Answer.str(field.key);
  Answer.u8(<u8>field.kind);
  switch (field.kind) {
    case ValueKind.Boolean:
      Answer.u8(<u8>field.bits);
      break;
    case ValueKind.Integer:
    case ValueKind.Float:
      Answer.i64(field.bits);
      break;
    case ValueKind.Text:
    case ValueKind.Json:
      Answer.str(field.text);
      break;
    default:
      break;
  }
}
