// Commands for devices (the packed encoding's command) and the downlinks
// `encode` answers with (sluice:script@0.2.1).

import { JsonObject } from "./json";
import { ScriptError } from "./output";

/** A command for a device, as `encode` receives it. */
export class Command {
  constructor(
    /** sluice's id of the command; a device's `Output.reply` names it. */
    public readonly id: string,
    /** The device the command is for. */
    public readonly deviceId: string,
    /** The device's product. */
    public readonly product: string,
    /** What to do, such as `set_setpoint`. */
    public readonly name: string,
    /** The caller's parameters: the text of a JSON object (`{}` when none). */
    public readonly paramsText: string,
    /** When sluice accepted the command, in ms since the Unix epoch. */
    public readonly issuedAt: i64,
  ) {}

  /** The params, parsed by the host, with typed getters. */
  params(): JsonObject {
    return JsonObject.parse(Uint8Array.wrap(String.UTF8.encode(this.paramsText)));
  }
}

/** One payload for a device. Build it with `new Downlink(bytes)` or `Downlink.text`, then the setters. */
export class Downlink {
  /** A topic used instead of the product's command topic (MQTT, Kafka); `null` for the product's. */
  topic: string | null = null;
  /** The LoRaWAN fPort (1 to 223); 0 for none. */
  fport: u8 = 0;
  /** Whether a LoRaWAN downlink asks the device for an acknowledgement. */
  confirmed: bool = false;
  /** The MQTT QoS (0 to 2); -1 for the product's. */
  qos: i32 = -1;

  constructor(
    /** The bytes for the device, sent unchanged. */
    public readonly payload: Uint8Array,
  ) {}

  /** A downlink of `text` as UTF-8. */
  static text(text: string): Downlink {
    return new Downlink(Uint8Array.wrap(String.UTF8.encode(text)));
  }

  /** Sends it on LoRaWAN fPort `port`. */
  onPort(port: u8): Downlink {
    this.fport = port;
    return this;
  }
  /** Asks the device to acknowledge it (LoRaWAN confirmed downlink). */
  confirm(): Downlink {
    this.confirmed = true;
    return this;
  }
  /** Sends it on `topic` instead of the product's command topic. */
  onTopic(topic: string): Downlink {
    this.topic = topic;
    return this;
  }
  /** Sends it at MQTT QoS `qos` (0, 1 or 2). */
  atQos(qos: i32): Downlink {
    this.qos = qos;
    return this;
  }
}

/** What `encode` returns: downlinks, or an error. */
export class Encoded {
  private constructor(
    public readonly downlinks: Downlink[],
    public readonly error: ScriptError | null,
  ) {}

  /** The command becomes these downlinks (at least one). */
  static ok(downlinks: Downlink[]): Encoded {
    return new Encoded(downlinks, null);
  }
  /** The command cannot be sent: `code` (kebab-case) and a sentence naming why. */
  static err(code: string, message: string): Encoded {
    return new Encoded([], new ScriptError(code, message));
  }
  /** The `unknown-command` error for `command`. */
  static unknown(command: Command): Encoded {
    return Encoded.err("unknown-command", `this product has no command \`${command.name}\``);
  }
}
