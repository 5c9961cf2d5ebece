// Misbehaves as the payload text says, with the behaviour names of the Rust
// guest `hostile`: `loop` spins forever, `alloc` grows memory without end,
// `panic` traps (an AssemblyScript abort is a trap), `many` returns 5,000
// outputs, `state` counts calls in per-device state; `ok` is one good
// telemetry output.

import { Fields, Message, Output, Result } from "sluice-script";

let kept = new Array<Uint8Array>();

export function parse(message: Message): Result {
  const what = message.text();
  if (what == "ok") {
    return Result.ok([Output.telemetry(new Fields().with("ok", true))]);
  }
  if (what == "loop") {
    // Endless: the payload is never empty, but the compiler cannot know.
    let spins: i64 = 0;
    while (message.payload.length > 0) spins++;
    return Result.ok([Output.telemetry(new Fields().with("spins", spins))]);
  }
  if (what == "alloc") {
    for (;;) kept.push(new Uint8Array(1 << 20));
  }
  if (what == "panic") {
    unreachable();
  }
  if (what == "many") {
    const outputs = new Array<Output>();
    for (let i = 0; i < 5000; i++) outputs.push(Output.telemetry(new Fields().with("i", i)));
    return Result.ok(outputs);
  }
  if (what == "state") {
    const previous = message.state();
    const next = new Uint8Array(1);
    next[0] = previous == null ? 1 : previous[0] + 1;
    const refused = message.setState(next);
    if (refused != null) return Result.fail(refused);
    return Result.ok([Output.telemetry(new Fields().with("count", next[0]))]);
  }
  return Result.err("unknown-behaviour", `no behaviour named ${what}`);
}
