//! Host-side bindings generated from the WIT world `sluice:script/script`.

#![allow(missing_docs, missing_debug_implementations, unreachable_pub)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "sluice:script/script@0.1.0",
    additional_derives: [PartialEq],
});

pub(crate) use self::sluice::script::host::{self as host_api, LogLevel};
pub(crate) use self::sluice::script::types::{Field, OutputKind, Severity, StateError, Value};
