// The input of a script (the packed encoding's message) and helpers on
// its payload.

import { Reader } from "./binary";
import { JsonObject } from "./json";
import { ScriptError } from "./output";
import { stateGetUtf8, stateSetUtf8 } from "./host";

/** How a message reached sluice; the numbers are the packed encoding's source bytes. */
export enum SourceKind {
  Mqtt = 0,
  Kafka = 1,
  Http = 2,
  Internal = 3,
}

/**
 * One raw message from a device, exactly as it arrived.
 *
 * The SDK copies the host's packed message into one buffer: the payload is
 * a view into it, and the device id, product and topic are decoded from it
 * the first time they are read, so a script that never reads them pays
 * nothing for them.
 */
export class Message {
  private _deviceId: string | null = null;
  private _product: string | null = null;
  private _topic: string | null = null;

  /** @internal Built by the SDK from the packed message in `raw`. */
  constructor(
    private readonly raw: ArrayBuffer,
    private readonly idAt: i32,
    private readonly idLen: i32,
    private readonly productAt: i32,
    private readonly productLen: i32,
    private readonly topicAt: i32,
    private readonly topicLen: i32,
    /** The payload bytes, unchanged. */
    public readonly payload: Uint8Array,
    /** When sluice received the message, in ms since the Unix epoch. */
    public readonly receivedAt: i64,
    /** How the message arrived. */
    public readonly source: SourceKind,
  ) {}

  /** The device the message was routed to (for a gateway: the gateway itself). */
  get deviceId(): string {
    let text = this._deviceId;
    if (text == null) {
      text = this.decode(this.idAt, this.idLen);
      this._deviceId = text;
    }
    return text;
  }

  /** The product whose script is running. */
  get product(): string {
    let text = this._product;
    if (text == null) {
      text = this.decode(this.productAt, this.productLen);
      this._product = text;
    }
    return text;
  }

  /** The MQTT topic, Kafka topic or HTTP path the message came from. */
  get topic(): string {
    let text = this._topic;
    if (text == null) {
      text = this.decode(this.topicAt, this.topicLen);
      this._topic = text;
    }
    return text;
  }

  private decode(at: i32, len: i32): string {
    return len == 0 ? "" : String.UTF8.decodeUnsafe(changetype<usize>(this.raw) + <usize>at, <usize>len);
  }

  /** The payload as UTF-8 text (invalid sequences become U+FFFD). */
  text(): string {
    const payload = this.payload;
    return payload.byteLength == 0
      ? ""
      : String.UTF8.decodeUnsafe(payload.dataStart, <usize>payload.byteLength);
  }

  /**
   * The payload parsed as a JSON object, natively by the host; when it is
   * not one, the result's `error` says why.
   */
  json(): JsonObject {
    return JsonObject.parse(this.payload);
  }

  /** A big/little-endian reader over the payload. */
  reader(): Reader {
    return new Reader(this.payload);
  }

  /** The state the script last stored for this message's device, or `null`. */
  state(): Uint8Array | null {
    return stateGetUtf8(changetype<usize>(this.raw) + <usize>this.idAt, <usize>this.idLen);
  }

  /** Stores state for this message's device; `null`, or why the host refused. */
  setState(value: Uint8Array): ScriptError | null {
    return stateSetUtf8(changetype<usize>(this.raw) + <usize>this.idAt, <usize>this.idLen, value);
  }
}
