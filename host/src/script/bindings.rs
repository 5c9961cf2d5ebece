//! Host-side bindings generated from the WIT world `sluice:script/script`.

#![allow(missing_docs, missing_debug_implementations, unreachable_pub)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "sluice:script/script@0.2.0",
    additional_derives: [PartialEq],
});

/// The version of the world this host speaks, as it appears in import names.
pub(crate) const WORLD_VERSION: &str = "0.2.0";

pub(crate) use self::sluice::script::host::{self as host_api, LogLevel};
pub(crate) use self::sluice::script::types::StateError;
