// The input of a script (the packed encoding's message) and helpers on
// its payload.

import { Reader } from "./binary";
import { JsonObject } from "./json";
import { ScriptError } from "./output";
import { stateGet, stateSet } from "./host";

/** How a message reached sluice; the numbers are the packed encoding's source bytes. */
export enum SourceKind {
  Mqtt = 0,
  Kafka = 1,
  Http = 2,
  Internal = 3,
}

/** One raw message from a device, exactly as it arrived. */
export class Message {
  constructor(
    /** The device the message was routed to (for a gateway: the gateway itself). */
    public readonly deviceId: string,
    /** The product whose script is running. */
    public readonly product: string,
    /** The MQTT topic, Kafka topic or HTTP path the message came from. */
    public readonly topic: string,
    /** The payload bytes, unchanged. */
    public readonly payload: Uint8Array,
    /** When sluice received the message, in ms since the Unix epoch. */
    public readonly receivedAt: i64,
    /** How the message arrived. */
    public readonly source: SourceKind,
  ) {}

  /** The payload as UTF-8 text (invalid sequences become U+FFFD). */
  text(): string {
    return String.UTF8.decode(this.payload.buffer);
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
    return stateGet(this.deviceId);
  }

  /** Stores state for this message's device; `null`, or why the host refused. */
  setState(value: Uint8Array): ScriptError | null {
    return stateSet(this.deviceId, value);
  }
}
