// Misbehaves as the payload text says, with the behaviour names of the Rust
// guest `hostile`: `loop` spins forever, `alloc` grows memory without end,
// `panic` traps (an AssemblyScript abort is a trap), `many` returns 5,000
// outputs, `state` counts calls in per-device state; `ok` is one good
// telemetry output. `keep` keeps one string and one growing array of every
// call in globals, and `kept` checks that all of them still hold what they
// were given, across the runtime's arenas.

import { Fields, Message, Output, Result } from "sluice-script";

let kept = new Array<Uint8Array>();
const keptTexts = new Array<string>();
const keptNumbers = new Array<Array<i32>>();

/** The string `keep` keeps on its `i`th call. */
function keptText(i: i32): string {
  return `kept-${i}-${"x".repeat(i % 40)}`;
}

/** Whether every kept string and array still holds what `keep` put in it. */
function keptIntact(): bool {
  for (let i = 0; i < keptTexts.length; i++) {
    if (keptTexts[i] != keptText(i)) return false;
    const numbers = keptNumbers[i];
    if (numbers.length != i % 50) return false;
    for (let j = 0; j < numbers.length; j++) if (numbers[j] != i * 1000 + j) return false;
  }
  return true;
}

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
  if (what == "keep") {
    const i = keptTexts.length;
    keptTexts.push(keptText(i));
    // Grown by push, so it is renewed while the call's garbage piles on.
    const numbers = new Array<i32>();
    let garbage = 0;
    for (let j = 0; j < i % 50; j++) {
      numbers.push(i * 1000 + j);
      garbage += `garbage-${j}`.length;
    }
    keptNumbers.push(numbers);
    return Result.ok([
      Output.telemetry(new Fields().with("kept", keptTexts.length).with("garbage", garbage)),
    ]);
  }
  if (what == "kept") {
    return Result.ok([
      Output.telemetry(new Fields().with("kept", keptTexts.length).with("intact", keptIntact())),
    ]);
  }
  return Result.err("unknown-behaviour", `no behaviour named ${what}`);
}
