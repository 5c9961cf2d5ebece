//! Core WebAssembly modules (AssemblyScript scripts) made into components of
//! the `sluice:script` world, so one engine path, one set of limits and one
//! set of metrics serve every language.
//!
//! A core module qualifies when it exports `parse`, `parse-batch`, their
//! `cabi_post_*` cleanups, `cabi_realloc` and `memory` with the canonical
//! ABI's lowered signatures, and imports nothing but `sluice:script/host`.
//! The AssemblyScript SDK (`guest-sdk/assemblyscript`) produces exactly that.

use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::{Resolve, WorldKey};

use super::bindings::WORLD_VERSION;

/// The script contract, the same file the Rust SDK is generated from.
const WIT: &str = include_str!("../../../wit/script.wit");

/// What a file starting with `\0asm` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WasmKind {
    /// A component: loaded as it is.
    Component,
    /// A core module: wrapped by [`componentize`] first.
    CoreModule,
}

/// The kind of `wasm`, or why it is not WebAssembly.
pub(crate) fn wasm_kind(wasm: &[u8]) -> Result<WasmKind, String> {
    // The header is `\0asm`, a 16-bit version and a 16-bit layer: 1 for a
    // component, 0 for a core module.
    match wasm.get(..8) {
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(WasmKind::Component),
        Some([0, b'a', b's', b'm', _, _, 0, 0]) => Ok(WasmKind::CoreModule),
        _ => Err("this is not a WebAssembly file (no `\\0asm` header)".into()),
    }
}

/// The first `sluice:script` interface among `imports` that is not of the
/// version this host speaks: a script built with an older SDK.
pub(crate) fn older_contract<'a>(mut imports: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    imports.find(|name| {
        name.strip_prefix("sluice:script/")
            .and_then(|rest| rest.split_once('@'))
            .is_some_and(|(_, version)| !super::bindings::speaks(version))
    })
}

/// The modules a core module imports from, and the names it exports.
fn module_interface(module: &[u8]) -> (Vec<String>, Vec<String>) {
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        match payload {
            Ok(wasmparser::Payload::ImportSection(section)) => {
                for import in section.into_imports().flatten() {
                    imports.push(import.module.to_owned());
                }
            }
            Ok(wasmparser::Payload::ExportSection(section)) => {
                for export in section.into_iter().flatten() {
                    exports.push(export.name.to_owned());
                }
            }
            _ => {}
        }
    }
    (imports, exports)
}

/// Wraps a core module into a component of the `sluice:script/script` world.
pub(crate) fn componentize(module: &[u8]) -> Result<Vec<u8>, String> {
    let (imports, exports) = module_interface(module);
    if let Some(old) = older_contract(imports.iter().map(String::as_str)) {
        return Err(format!("it imports `{old}`: {}", super::instance::REBUILD));
    }
    // The world at the 0.2 version the module imports (0.2.0 and 0.2.1
    // differ only in `encode`), without `encode` when it exports none.
    let current = format!("package sluice:script@{WORLD_VERSION};");
    let wit = match imports
        .iter()
        .find_map(|name| name.strip_prefix("sluice:script/host@"))
    {
        Some(version) => WIT.replace(&current, &format!("package sluice:script@{version};")),
        None => WIT.to_owned(),
    };
    let mut resolve = Resolve::default();
    let package = resolve
        .push_source("script.wit", &wit)
        .map_err(|e| format!("the built-in script contract does not parse: {e:#}"))?;
    let world = resolve
        .select_world(&[package], Some("script"))
        .map_err(|e| format!("the built-in script contract has no world `script`: {e:#}"))?;
    if !exports.iter().any(|name| name == "encode") {
        resolve.worlds[world]
            .exports
            .shift_remove(&WorldKey::Name("encode".to_owned()));
    }
    let mut module = module.to_vec();
    wit_component::embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)
        .map_err(|e| format!("cannot attach the script contract to the module: {e:#}"))?;
    ComponentEncoder::default()
        .validate(true)
        .module(&module)
        .and_then(|encoder| encoder.encode())
        .map_err(|e| {
            format!(
                "this core module does not implement the `sluice:script/script` world \
                 (build AssemblyScript scripts with the sluice-script package, Rust scripts \
                 with `--target wasm32-wasip2`): {e:#}"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_tell_components_from_modules() {
        assert_eq!(
            wasm_kind(b"\0asm\x0d\x00\x01\x00rest"),
            Ok(WasmKind::Component)
        );
        assert_eq!(
            wasm_kind(b"\0asm\x01\x00\x00\x00"),
            Ok(WasmKind::CoreModule)
        );
        assert!(
            wasm_kind(b"hello")
                .unwrap_err()
                .contains("not a WebAssembly file")
        );
    }

    #[test]
    fn a_module_without_the_exports_is_refused_with_the_world_named() {
        // An empty core module: valid WebAssembly, implements nothing.
        let error = componentize(b"\0asm\x01\x00\x00\x00").unwrap_err();
        assert!(error.contains("sluice:script/script"), "{error}");
    }
}
