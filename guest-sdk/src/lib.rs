//! Write sluice data scripts in Rust.
//!
//! A data script turns one raw device message into outputs: telemetry,
//! attributes, events, alerts and status signals. With this crate a script is
//! one function plus the [`script!`] macro; build it with
//! `cargo build --release --target wasm32-wasip2` and sluice runs the
//! resulting `.wasm` component.
//!
//! A whole script, for payloads like `{"temp": 21.5, "hum": 40}`:
//!
//! ```
//! use sluice_guest::prelude::*;
//!
//! #[derive(serde::Deserialize)]
//! struct Reading {
//!     temp: f64,
//!     hum: Option<f64>,
//! }
//!
//! pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
//!     let reading: Reading = message.json()?;
//!     let mut outputs = vec![Output::telemetry(
//!         Fields::new()
//!             .with("temperature", reading.temp)
//!             .with("humidity", reading.hum),
//!     )];
//!     if let Some(limit) = param_as::<f64>("temp_max")? {
//!         if reading.temp > limit {
//!             outputs.push(Output::alert(
//!                 Severity::Warning,
//!                 "Temperature high",
//!                 format!("{} °C is above {limit} °C", reading.temp),
//!             ));
//!         }
//!     }
//!     Ok(outputs)
//! }
//!
//! sluice_guest::script!(parse);
//! # fn main() {
//! #     let message = Message::new("sensor-1", br#"{"temp": 21.5}"#.to_vec());
//! #     let outputs = parse(&message).unwrap();
//! #     assert_eq!(outputs.len(), 1);
//! # }
//! ```
//!
//! Off WebAssembly (in `cargo test` or a benchmark) the same function runs
//! natively: the host functions ([`log`], state, [`param`]) are then served
//! by an in-process stand-in that `sluice_guest::native` lets tests configure.
//!
//! Parts:
//! - [`types`]: [`Message`], [`Output`] and the values they hold;
//! - [`value`]: [`Value`] conversions and the [`Fields`] builder;
//! - [`output`]: constructors for [`Output`] and [`ScriptError`];
//! - [`message`]: payload helpers on [`Message`] (JSON, text, binary, state);
//! - [`binary`]: a big/little-endian [`Reader`] and hex/base64 helpers;
//! - [`host`]: [`log`], per-device state and [`param`];
//! - [`abi`]: the packed encoding messages and outputs cross the boundary in;
//! - [`bindings`]: the types and imports generated from the WIT world `sluice:script/script`;
//! - `alloc`: the allocator of scripts on WebAssembly (feature `allocator`, on by default);
//! - `native`: the stand-in host used off WebAssembly (not built for it).

pub mod abi;
#[cfg(any(test, all(target_arch = "wasm32", feature = "allocator")))]
mod alloc;
pub mod binary;
pub mod host;
pub mod message;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;
pub mod output;
pub mod types;
pub mod value;

/// Types and functions generated from the WIT world `sluice:script/script`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::too_many_arguments
)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "sluice:script/script@0.2.1",
        pub_export_macro: true,
        export_macro_name: "export_script",
        default_bindings_module: "sluice_guest::bindings",
        additional_derives: [PartialEq],
    });
}

pub use binary::Reader;
pub use bindings::sluice::script::host::LogLevel;
pub use bindings::sluice::script::types::{ScriptError, StateError};
pub use host::{log, param, param_as};
pub use types::{
    Alert, Command, Downlink, Event, Field, Message, Output, OutputKind, Reply, Severity,
    SourceKind, Value,
};
pub use value::Fields;

/// Everything a script usually needs, in one `use`.
pub mod prelude {
    pub use crate::binary::{Reader, base64_decode, hex_decode, hex_encode};
    pub use crate::host::{log, param, param_as};
    pub use crate::{
        Command, Downlink, Fields, LogLevel, Message, Output, OutputKind, ScriptError, Severity,
        SourceKind, Value,
    };
}

/// Exports `parse` (and `encode`, when given) as the script's entry points.
///
/// `parse` must be a function `fn(&Message) -> Result<Vec<Output>, ScriptError>`;
/// `encode`, for products that accept commands,
/// `fn(&Command) -> Result<Vec<Downlink>, ScriptError>`:
///
/// ```ignore
/// sluice_guest::script!(parse);          // parses only
/// sluice_guest::script!(parse, encode);  // also turns commands into downlinks
/// ```
///
/// On WebAssembly the macro exports `parse`, `parse-batch` and `encode` of
/// the WIT world, reading messages and commands and writing outputs and
/// downlinks in the packed encoding (without an `encode` function, the
/// exported `encode` answers `not-supported`, which sluice reads as "does
/// not accept commands"); natively it expands to nothing, so the same
/// crate can be tested and benchmarked as ordinary Rust.
#[macro_export]
macro_rules! script {
    ($parse:path) => {
        $crate::script!(@export $parse, $crate::abi::not_supported);
    };
    ($parse:path, $encode:path) => {
        $crate::script!(@export $parse, |command| $crate::abi::encode(command, $encode));
    };
    (@export $parse:path, $encode:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct SluiceScript;

            impl $crate::bindings::Guest for SluiceScript {
                fn parse(
                    message: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, $crate::ScriptError> {
                    $crate::abi::parse(message, $parse)
                }

                fn parse_batch(messages: ::std::vec::Vec<u8>) -> ::std::vec::Vec<u8> {
                    $crate::abi::parse_batch(messages, $parse)
                }

                fn encode(
                    command: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, $crate::ScriptError> {
                    let encode: fn(
                        ::std::vec::Vec<u8>,
                    ) -> ::core::result::Result<::std::vec::Vec<u8>, $crate::ScriptError> = $encode;
                    encode(command)
                }
            }

    $crate::bindings::export_script!(SluiceScript with_types_in $crate::bindings);
        };
    };
}
