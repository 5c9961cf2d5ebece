// Outputs of a script (the packed encoding's outputs, WIT `script-error`) and the
// result of `parse`.

import { Fields } from "./value";

/** How serious an alert is, lowest first. */
export enum Severity {
  Info = 0,
  Warning = 1,
  Critical = 2,
}

/** What an output reports; the numbers are the packed encoding's kinds. */
export enum OutputKind {
  Telemetry = 0,
  Attributes = 1,
  Event = 2,
  Alert = 3,
  Status = 4,
  Reply = 5,
}

/** One result of parsing a message. Build it with the static constructors. */
export class Output {
  /** The device this output is about; `null` means the message's own device. */
  deviceId: string | null = null;
  /** When the values were measured (ms since the epoch); -1 means the message's `receivedAt`. */
  timestamp: i64 = -1;
  /** Whether `timestamp` is set. */
  hasTimestamp: bool = false;

  private constructor(
    public readonly kind: OutputKind,
    public readonly fields: Fields | null,
    public readonly name: string,
    public readonly severity: Severity,
    public readonly title: string,
    public readonly description: string,
    public readonly online: bool,
  ) {}

  /** Measured values, merged into the device's latest snapshot. */
  static telemetry(fields: Fields): Output {
    return new Output(OutputKind.Telemetry, fields, "", Severity.Info, "", "", false);
  }
  /** Slowly changing properties (firmware version, configuration). */
  static attributes(fields: Fields): Output {
    return new Output(OutputKind.Attributes, fields, "", Severity.Info, "", "", false);
  }
  /** A named occurrence with its details, such as `door_opened`. */
  static event(name: string, fields: Fields = new Fields()): Output {
    return new Output(OutputKind.Event, fields, name, Severity.Info, "", "", false);
  }
  /** A condition a person should see. */
  static alert(severity: Severity, title: string, description: string): Output {
    return new Output(OutputKind.Alert, null, "", severity, title, description, false);
  }
  /** An explicit online (`true`) or offline (`false`) signal. */
  static status(online: bool): Output {
    return new Output(OutputKind.Status, null, "", Severity.Info, "", "", online);
  }

  /** The device's answer to command `commandId` (a `Command.id`): done, with `fields`. */
  static reply(commandId: string, fields: Fields = new Fields()): Output {
    return new Output(OutputKind.Reply, fields, commandId, Severity.Info, "", "", true);
  }
  /** The device's answer to command `commandId`: it failed, for `error`. */
  static replyError(commandId: string, error: string): Output {
    return new Output(OutputKind.Reply, null, commandId, Severity.Info, error, "", false);
  }

  /** Makes the output about another device (a gateway's sub-device). */
  forDevice(deviceId: string): Output {
    this.deviceId = deviceId;
    return this;
  }
  /** Sets when the values were measured, in ms since the Unix epoch. */
  at(timestampMs: i64): Output {
    this.timestamp = timestampMs;
    this.hasTimestamp = true;
    return this;
  }
}

/** Why a script rejected a message: a stable kebab-case code and a sentence for people. */
export class ScriptError {
  constructor(
    public readonly code: string,
    public readonly message: string,
  ) {}
}

/** What `parse` returns: outputs, or an error. */
export class Result {
  private constructor(
    public readonly outputs: Output[],
    public readonly error: ScriptError | null,
  ) {}

  /** The message was understood; these are its outputs (possibly none). */
  static ok(outputs: Output[]): Result {
    return new Result(outputs, null);
  }
  /** The message was rejected with `code` (kebab-case) and a sentence naming what was wrong. */
  static err(code: string, message: string): Result {
    return new Result([], new ScriptError(code, message));
  }
  /** The message was rejected with `error`. */
  static fail(error: ScriptError): Result {
    return new Result([], error);
  }
}
