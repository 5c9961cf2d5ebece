//! Host-side bindings generated from the WIT world `sluice:script/script`.

#![allow(missing_docs, missing_debug_implementations, unreachable_pub)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "sluice:script/script@0.2.1",
    additional_derives: [PartialEq],
});

/// The version of the world this host speaks, as it appears in import names.
pub(crate) const WORLD_VERSION: &str = "0.2.1";

/// Whether a script importing the world at `version` runs on this host:
/// any 0.2 version up to this one (wasmtime's linker serves older 0.2
/// imports with this host's functions).
pub(crate) fn speaks(version: &str) -> bool {
    version
        .strip_prefix("0.2.")
        .and_then(|patch| patch.parse::<u32>().ok())
        .is_some_and(|patch| patch <= 1)
}

pub(crate) use self::sluice::script::host::{self as host_api, LogLevel};
pub(crate) use self::sluice::script::types::StateError;
