// Compiler transform that turns a script's `export function parse(message:
// Message): Result` (and, for products that accept commands, `export
// function encode(command: Command): Encoded`) into a core module with the
// exports of the `sluice:script/script` world, so that sluice can wrap it
// into a component:
//
// - after parsing, it adds a glue file beside the script's entry that lifts
//   the host's arguments, calls the script's `parse` and lowers the result;
// - after compiling, it keeps only the world's exports (`parse`,
//   `parse-batch`, `encode` when the script has one, `cabi_realloc`,
//   `memory`), under their canonical names,
//   which AssemblyScript cannot spell itself. There is no post-return
//   cleanup: the answer buffer is reused by the next call, and the call's
//   garbage is collected before it returns.

const GLUE_NAME = "__sluice_glue";

const ENCODE_GLUE = (entry) => `
import { encode as scriptEncode } from "./${entry}";
import { answerEncoded, takeCommand } from "sluice-script/abi";

export function __sluice_encode(ptr: usize, len: usize): usize {
  const answered = answerEncoded(scriptEncode(takeCommand(ptr, len)));
  __collect();
  return answered;
}
`;

const GLUE = (entry, encodes) => `
import { parse as scriptParse } from "./${entry}";
import { addResult, answer, beginResults, endResults, realloc, takeMessage, takeMessages } from "sluice-script/abi";
${encodes ? ENCODE_GLUE(entry) : ""}
// The script runs on AssemblyScript's \`minimal\` runtime: nothing is
// collected while a call runs, and everything the call allocated and did
// not keep is collected once its answer is written (the answer lives outside
// the collected heap). No object of the call is live on the stack then, so
// the collector, which does not scan the stack, cannot free one in use.
export function __sluice_parse(ptr: usize, len: usize): usize {
  const answered = answer(scriptParse(takeMessage(ptr, len)));
  __collect();
  return answered;
}

export function __sluice_parse_batch(ptr: usize, len: usize): usize {
  const messages = takeMessages(ptr, len);
  beginResults(messages.length);
  for (let i = 0; i < messages.length; i++) {
    addResult(scriptParse(unchecked(messages[i])));
  }
  const answered = endResults();
  __collect();
  return answered;
}

export function __sluice_realloc(old: usize, oldSize: usize, align: usize, newSize: usize): usize {
  return realloc(old, oldSize, align, newSize);
}
`;

// Internal export name -> the names the world's core module must have.
const EXPORTS = {
  __sluice_parse: ["parse"],
  __sluice_parse_batch: ["parse-batch"],
  __sluice_realloc: ["cabi_realloc"],
};
// The same, for exports a script may leave out.
const OPTIONAL = {
  __sluice_encode: ["encode"],
};

// Whether the entry's source exports a function `encode`.
const ENCODE = /^\s*export\s+function\s+encode\s*\(/m;

const USER_ENTRY = 1; // SourceKind.UserEntry

export default class SluiceScriptTransform {
  afterParse(parser) {
    const entries = parser.sources.filter(
      (s) =>
        s.sourceKind === USER_ENTRY &&
        !s.internalPath.startsWith("~lib/") &&
        !s.internalPath.endsWith(GLUE_NAME),
    );
    if (entries.length !== 1) {
      throw new Error(
        `sluice-script: expected one entry file exporting \`parse\`, found ${entries.map((s) => s.internalPath).join(", ") || "none"}`,
      );
    }
    const entry = entries[0].internalPath; // e.g. "assembly/index"
    const slash = entry.lastIndexOf("/");
    const dir = slash < 0 ? "" : entry.substring(0, slash + 1);
    const base = entry.substring(slash + 1);
    parser.parseFile(GLUE(base, ENCODE.test(entries[0].text)), `${dir}${GLUE_NAME}.ts`, true);
  }

  afterCompile(module) {
    const binaryen = this.binaryen;
    const exports = [];
    for (let i = 0; i < module.getNumExports(); i++) {
      exports.push(binaryen.getExportInfo(module.getExportByIndex(i)));
    }
    // Remove every export first: the script's own `parse` must be gone
    // before the glue's takes its name.
    const found = new Map();
    for (const info of exports) {
      if (info.kind === binaryen.ExternalMemory) continue;
      module.removeExport(info.name);
      if (info.name in EXPORTS || info.name in OPTIONAL) found.set(info.name, info.value);
    }
    for (const [name, internal] of found) {
      for (const external of EXPORTS[name] ?? OPTIONAL[name]) {
        module.addFunctionExport(internal, external);
      }
    }
    for (const name of Object.keys(EXPORTS)) {
      if (!found.has(name)) {
        throw new Error(`sluice-script: the glue export ${name} is missing`);
      }
    }
  }
}
