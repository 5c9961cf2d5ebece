//! `sluice script new`: a Rust script crate or an AssemblyScript project
//! that builds and passes its fixtures as generated.

use std::path::{Path, PathBuf};

use toml_edit::{Array, DocumentMut, Item, Value};

/// Scaffolding failed.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a product or crate name.
    #[error("script name {0:?} must start with a lower-case letter and hold only a-z, 0-9 and '-'")]
    BadName(String),
    /// Something is already there.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The workspace manifest could not be updated.
    #[error("cannot add the script to the workspace {path}: {reason}")]
    Workspace {
        /// The manifest.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A standalone crate needs to know where the SDK is.
    #[error(
        "{0} is not a script workspace; pass --sdk <path to sluice's guest-sdk> to create a standalone script crate"
    )]
    NoSdk(PathBuf),
}

/// The language of a new script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    /// A Rust crate built with cargo for `wasm32-wasip2`.
    #[default]
    Rust,
    /// An AssemblyScript project built with `npm run build`.
    AssemblyScript,
}

/// How the new crate finds `sluice-guest`.
#[derive(Debug, Clone, PartialEq)]
pub enum Sdk {
    /// From `[workspace.dependencies]` of the workspace in the parent directory.
    Workspace,
    /// From a path; the crate gets a workspace and build settings of its own.
    Path(PathBuf),
}

/// What was created.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaffolded {
    /// The crate directory.
    pub crate_dir: PathBuf,
    /// The files written.
    pub files: Vec<PathBuf>,
    /// Whether the crate was added to a workspace's members.
    pub joined_workspace: bool,
}

/// Creates `<parent>/<name>/` with a script in `lang`, its fixtures and (for
/// Rust) a native unit test. In a script workspace (a `Cargo.toml` with
/// `[workspace.dependencies] sluice-guest`) a Rust crate joins it and an
/// AssemblyScript project finds the SDK beside `sluice-guest`; elsewhere
/// `sdk` must say where sluice's `guest-sdk` is.
pub fn scaffold(
    parent: &Path,
    name: &str,
    sdk: Option<&Path>,
    lang: Lang,
) -> Result<Scaffolded, ScaffoldError> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(ScaffoldError::BadName(name.to_owned()));
    }
    let crate_dir = parent.join(name);
    if crate_dir.exists() {
        return Err(ScaffoldError::Exists(crate_dir));
    }
    let workspace_manifest = parent.join("Cargo.toml");
    let sdk = match sdk {
        Some(path) => Sdk::Path(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())),
        None if is_script_workspace(&workspace_manifest) => Sdk::Workspace,
        None => return Err(ScaffoldError::NoSdk(parent.to_path_buf())),
    };

    let mut files = Vec::new();
    let mut write = |relative: &str, text: String| -> Result<(), ScaffoldError> {
        let path = crate_dir.join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ScaffoldError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&path, text).map_err(|source| ScaffoldError::Write {
            path: path.clone(),
            source,
        })?;
        files.push(path);
        Ok(())
    };
    if lang == Lang::AssemblyScript {
        let sdk_dir = match &sdk {
            Sdk::Path(path) => path.join("assemblyscript"),
            Sdk::Workspace => workspace_sdk(&workspace_manifest)?.join("assemblyscript"),
        };
        let package = PACKAGE_JSON
            .replace("{name}", name)
            .replace("{sdk}", &npm_file_spec(&sdk_dir));
        write("package.json", package)?;
        write("asconfig.json", ASCONFIG_JSON.to_owned())?;
        write(".gitignore", "node_modules/\nbuild/\n".to_owned())?;
        write("assembly/index.ts", INDEX_TS.replace("{name}", name))?;
        write(
            &format!("{name}.examples.json"),
            AS_EXAMPLES_JSON.to_owned(),
        )?;
        return Ok(Scaffolded {
            crate_dir,
            files,
            joined_workspace: false,
        });
    }
    write("Cargo.toml", manifest(name, &sdk))?;
    write("src/lib.rs", LIB_RS.replace("{name}", name))?;
    write(&format!("{name}.examples.json"), EXAMPLES_JSON.to_owned())?;
    if let Sdk::Path(_) = sdk {
        write(
            ".cargo/config.toml",
            "[build]\ntarget = \"wasm32-wasip2\"\n".to_owned(),
        )?;
    }
    let joined_workspace = sdk == Sdk::Workspace;
    if joined_workspace {
        add_member(&workspace_manifest, name)?;
    }
    Ok(Scaffolded {
        crate_dir,
        files,
        joined_workspace,
    })
}

/// The `guest-sdk` directory a script workspace's `sluice-guest` points at,
/// relative to the new project (which sits one level below the workspace).
fn workspace_sdk(manifest: &Path) -> Result<PathBuf, ScaffoldError> {
    let fail = |reason: &str| ScaffoldError::Workspace {
        path: manifest.to_path_buf(),
        reason: reason.to_owned(),
    };
    let text = std::fs::read_to_string(manifest).map_err(|e| fail(&e.to_string()))?;
    let doc: DocumentMut = text.parse().map_err(|_| fail("it is not valid TOML"))?;
    let path = doc["workspace"]["dependencies"]["sluice-guest"]["path"]
        .as_str()
        .ok_or_else(|| fail("workspace.dependencies.sluice-guest has no `path`"))?;
    let path = Path::new(path);
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        Path::new("..").join(path)
    })
}

/// An npm `file:` dependency on `dir`, with `/` separators.
fn npm_file_spec(dir: &Path) -> String {
    let text = dir.display().to_string().replace('\\', "/");
    format!("file:{text}")
}

fn is_script_workspace(manifest: &Path) -> bool {
    std::fs::read_to_string(manifest)
        .ok()
        .and_then(|text| text.parse::<DocumentMut>().ok())
        .is_some_and(|doc| {
            doc["workspace"]["dependencies"]
                .get("sluice-guest")
                .is_some()
        })
}

fn add_member(manifest: &Path, name: &str) -> Result<(), ScaffoldError> {
    let fail = |reason: String| ScaffoldError::Workspace {
        path: manifest.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(manifest).map_err(|e| fail(e.to_string()))?;
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| fail(e.to_string()))?;
    let members = doc["workspace"]
        .as_table_like_mut()
        .ok_or_else(|| fail("it has no [workspace] table".into()))?
        .entry("members")
        .or_insert(Item::Value(Value::Array(Array::new())));
    let array = members
        .as_array_mut()
        .ok_or_else(|| fail("workspace.members is not an array".into()))?;
    if !array.iter().any(|m| m.as_str() == Some(name)) {
        array.push(name);
    }
    std::fs::write(manifest, doc.to_string()).map_err(|e| fail(e.to_string()))
}

fn manifest(name: &str, sdk: &Sdk) -> String {
    match sdk {
        Sdk::Workspace => format!(
            r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
sluice-guest.workspace = true
"#
        ),
        Sdk::Path(path) => format!(
            r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
sluice-guest = {{ path = {path:?} }}

# A script crate of its own; `.cargo/config.toml` builds it for wasm32-wasip2.
[workspace]

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = "debuginfo"
"#,
            path = path.display().to_string()
        ),
    }
}

const LIB_RS: &str = r##"//! `{name}`: a JSON object of readings → telemetry.
//!
//! Input payload: `{"temperature": 21.5, "humidity": 40}`
//!
//! Output: `[{"type": "telemetry", "fields": {"temperature": 21.5, "humidity": 40}}]`
//!
//! Commands: `set_interval {"seconds": 60}` becomes the JSON downlink
//! `{"id": "<command id>", "interval_s": 60}`; the device answers with
//! `{"reply_to": "<command id>", "interval_s": 60}`, which becomes a reply.
//!
//! Build with `cargo build --release --target wasm32-wasip2`, check with
//! `sluice script check <this directory's workspace>`.

use sluice_guest::prelude::*;

/// Parses one message.
pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    let mut fields: Fields = message.json()?;
    if let Some(Value::Text(command_id)) = fields.take("reply_to") {
        return Ok(vec![Output::reply(command_id, fields)]);
    }
    if fields.is_empty() {
        return Err(ScriptError::new("no-readings", "the payload holds no readings"));
    }
    Ok(vec![Output::telemetry(fields)])
}

/// Turns a command for a device into what is sent to it.
pub fn encode(command: &Command) -> Result<Vec<Downlink>, ScriptError> {
    match command.name.as_str() {
        "set_interval" => {
            let params: Fields = command.params()?;
            let Some(seconds) = params.get("seconds").and_then(Value::as_i64).filter(|s| *s > 0)
            else {
                return Err(ScriptError::new(
                    "invalid-params",
                    "set_interval takes {\"seconds\": <a whole number above 0>}",
                ));
            };
            let body = format!(r#"{{"id":"{}","interval_s":{seconds}}}"#, command.id);
            Ok(vec![Downlink::new(body)])
        }
        _ => Err(command.unknown()),
    }
}

sluice_guest::script!(parse, encode);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_become_telemetry() {
        let message = Message::new("device-1", br#"{"temperature": 21.5}"#.to_vec());
        let outputs = parse(&message).unwrap();
        assert_eq!(outputs, vec![Output::telemetry(Fields::new().with("temperature", 21.5))]);
    }
}
"##;

const EXAMPLES_JSON: &str = r#"{
  "examples": [
    {
      "name": "a reading becomes telemetry",
      "payload": {"temperature": 21.5, "humidity": 40},
      "expect": [{"type": "telemetry", "fields": {"temperature": 21.5, "humidity": 40}}]
    },
    {
      "name": "a payload that is not JSON is refused",
      "payload_text": "hello",
      "expect_error": {"code": "invalid-json"}
    },
    {
      "name": "an empty object is refused",
      "payload": {},
      "expect_error": {"code": "no-readings", "message": "no readings"}
    },
    {
      "name": "set_interval becomes a JSON downlink",
      "command": {"name": "set_interval", "params": {"seconds": 60}, "id": "cmd-1"},
      "expect_downlinks": [{"payload": "{\"id\":\"cmd-1\",\"interval_s\":60}"}]
    },
    {
      "name": "the device's answer is a reply",
      "payload": {"reply_to": "cmd-1", "interval_s": 60},
      "expect": [{"type": "reply", "command_id": "cmd-1", "ok": true, "fields": {"interval_s": 60}}]
    },
    {
      "name": "an unknown command is refused",
      "command": {"name": "self_destruct"},
      "expect_error": {"code": "unknown-command"}
    }
  ]
}
"#;

const PACKAGE_JSON: &str = r#"{
  "name": "{name}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "scripts": {
    "prebuild": "npm install --no-audit --no-fund --loglevel=error",
    "build": "asc assembly/index.ts --config asconfig.json --outFile build/{name}.wasm"
  },
  "devDependencies": {
    "assemblyscript": "0.28.20",
    "sluice-script": "{sdk}"
  }
}
"#;

const ASCONFIG_JSON: &str = r#"{
  "extends": "./node_modules/sluice-script/asconfig.json"
}
"#;

const INDEX_TS: &str = r#"// `{name}`: a 2-byte reading → telemetry.
//
// Input payload (hex): `08 98`, the temperature in 0.01 °C, signed big-endian.
//
// Output: `[{"type": "telemetry", "fields": {"temperature": 22.0}}]`
//
// Commands: `set_interval {"seconds": 60}` becomes the downlink `01 00 3c`
// (the seconds as 2 bytes big-endian).
//
// Build with `npm run build` (the module lands in `build/{name}.wasm`), check
// with `sluice script check <this directory>`.

import { Command, Downlink, Encoded, Fields, Message, Output, Result } from "sluice-script";

export function parse(message: Message): Result {
  const reader = message.reader();
  const temperature = <f64>reader.i16be() / 100;
  if (reader.truncated) {
    return Result.err(
      "short-payload",
      `expected 2 bytes, got ${message.payload.length}`,
    );
  }
  return Result.ok([Output.telemetry(new Fields().with("temperature", temperature))]);
}

export function encode(command: Command): Encoded {
  if (command.name != "set_interval") return Encoded.unknown(command);
  const seconds = command.params().getInteger("seconds", -1);
  if (seconds < 1 || seconds > 0xffff) {
    return Encoded.err("invalid-params", "set_interval takes {\"seconds\": 1 to 65535}");
  }
  const frame = new Uint8Array(3);
  frame[0] = 0x01;
  frame[1] = <u8>(seconds >> 8);
  frame[2] = <u8>(seconds & 0xff);
  return Encoded.ok([new Downlink(frame)]);
}
"#;

const AS_EXAMPLES_JSON: &str = r#"{
  "examples": [
    {
      "name": "a reading becomes telemetry",
      "payload_hex": "0898",
      "expect": [{"type": "telemetry", "fields": {"temperature": 22.0}}]
    },
    {
      "name": "a negative reading",
      "payload_hex": "ff38",
      "expect": [{"type": "telemetry", "fields": {"temperature": -2.0}}]
    },
    {
      "name": "a short payload is refused",
      "payload_hex": "08",
      "expect_error": {"code": "short-payload", "message": "expected 2 bytes"}
    },
    {
      "name": "set_interval becomes its downlink",
      "command": {"name": "set_interval", "params": {"seconds": 60}},
      "expect_downlinks": [{"payload_hex": "01003c"}]
    },
    {
      "name": "an interval out of range is refused",
      "command": {"name": "set_interval", "params": {"seconds": 0}},
      "expect_error": {"code": "invalid-params"}
    }
  ]
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_suit_crates_and_products() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "Upper", "1st", "under_score", "sp ace"] {
            assert!(
                matches!(
                    scaffold(dir.path(), bad, None, Lang::Rust),
                    Err(ScaffoldError::BadName(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_workspace_gains_the_member() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Cargo.toml"),
            "[workspace]\nmembers = [\"a\"]\n\n[workspace.dependencies]\nsluice-guest = { path = \"../sdk\" }\n",
        )
        .unwrap();
        let made = scaffold(dir.path(), "door-sensor", None, Lang::Rust).unwrap();
        assert!(made.joined_workspace);
        let manifest = std::fs::read_to_string(dir.path().join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(r#"members = ["a", "door-sensor"]"#),
            "{manifest}"
        );
        assert!(made.crate_dir.join("door-sensor.examples.json").is_file());
        assert!(matches!(
            scaffold(dir.path(), "door-sensor", None, Lang::Rust),
            Err(ScaffoldError::Exists(_))
        ));
    }

    #[test]
    fn outside_a_workspace_the_sdk_path_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            scaffold(dir.path(), "x", None, Lang::Rust),
            Err(ScaffoldError::NoSdk(_))
        ));
        let made = scaffold(
            dir.path(),
            "x",
            Some(Path::new("/opt/sluice/guest-sdk")),
            Lang::Rust,
        )
        .unwrap();
        let manifest = std::fs::read_to_string(made.crate_dir.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(r#"sluice-guest = { path = "/opt/sluice/guest-sdk" }"#),
            "{manifest}"
        );
        assert!(made.crate_dir.join(".cargo/config.toml").is_file());
    }

    #[test]
    fn an_assemblyscript_project_finds_the_sdk_beside_the_workspace_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Cargo.toml"),
            "[workspace]\nmembers = []\n\n[workspace.dependencies]\nsluice-guest = { path = \"../guest-sdk\" }\n",
        )
        .unwrap();
        let made = scaffold(dir.path(), "valve", None, Lang::AssemblyScript).unwrap();
        assert!(!made.joined_workspace);
        let package = std::fs::read_to_string(made.crate_dir.join("package.json")).unwrap();
        assert!(
            package.contains(r#""sluice-script": "file:../../guest-sdk/assemblyscript""#),
            "{package}"
        );
        assert!(package.contains("build/valve.wasm"), "{package}");
        for file in ["asconfig.json", "assembly/index.ts", "valve.examples.json"] {
            assert!(made.crate_dir.join(file).is_file(), "{file}");
        }
        let manifest = std::fs::read_to_string(dir.path().join("Cargo.toml")).unwrap();
        assert!(!manifest.contains("valve"), "{manifest}");
    }
}
